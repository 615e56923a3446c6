"""Every refusal of meditron-convert names what is wrong and leaves nothing at the destination:
missing, extra and wrongly shaped tensors, a .bin holding a pickled
object, a Meta rank lacking a tensor, and a source that fails half-way through the stream (destinations: test_convert_safety.py)."""

import os

import pytest
import safetensors.torch
import torch

from meditron_jax import params_checkpoint as pc
from meditron_jax.convert import ConversionError, hf, meta

import convert_fixtures as fx


@pytest.fixture(scope='module')
def state():
    model = fx.hf_model(torch.float32, seed=3)
    return model.config, {k: v.contiguous() for k, v in model.state_dict().items()}


def write_hf(directory, config, tensors):
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    safetensors.torch.save_file(tensors, os.path.join(directory, 'model.safetensors'))
    return str(directory)


def assert_refused(tmp_path, src_fn, match):
    dst = tmp_path / 'dst'
    with pytest.raises(ConversionError, match=match):
        src_fn(str(dst))
    assert fx.leftovers(str(tmp_path), 'dst') == []


def test_missing_tensor_is_named_with_its_shape(state, tmp_path):
    config, tensors = state
    tensors = {k: v for k, v in tensors.items() if k != 'model.layers.1.mlp.up_proj.weight'}
    src = write_hf(tmp_path / 'src', config, tensors)
    assert_refused(tmp_path, lambda d: hf.import_hf(src, d),
                   r'missing tensors: model\.layers\.1\.mlp\.up_proj\.weight \[128, 64\]')


def test_extra_tensor_is_named_with_its_shape(state, tmp_path):
    config, tensors = state
    tensors = dict(tensors, **{'model.layers.2.mlp.up_proj.weight': torch.zeros(128, 64)})
    src = write_hf(tmp_path / 'src', config, tensors)
    assert_refused(tmp_path, lambda d: hf.import_hf(src, d),
                   r'unexpected tensors: model\.layers\.2\.mlp\.up_proj\.weight \[128, 64\]')


def test_wrong_shape_names_found_and_expected(state, tmp_path):
    config, tensors = state
    tensors = dict(tensors, **{'model.layers.0.self_attn.k_proj.weight': torch.zeros(64, 64)})
    src = write_hf(tmp_path / 'src', config, tensors)
    assert_refused(tmp_path, lambda d: hf.import_hf(src, d),
                   r'model\.layers\.0\.self_attn\.k_proj\.weight: found \[64, 64\], '
                   r'expected \[32, 64\]')


class _Payload:
    """Unpickling this would create a file: proof that pickled code ran."""
    marker = ''

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_bin_with_pickled_object_is_refused_without_running_it(state, tmp_path):
    config, tensors = state
    src = tmp_path / 'src'
    src.mkdir()
    config.save_pretrained(src)
    payload = _Payload()
    payload.marker = str(tmp_path / 'pwned')
    torch.save(dict(tensors, evil=payload), src / 'pytorch_model.bin')
    assert_refused(tmp_path, lambda d: hf.import_hf(str(src), d),
                   r'pytorch_model\.bin: refused by torch\.load\(weights_only=True\)')
    assert not (tmp_path / 'pwned').exists()


def test_bin_with_a_non_tensor_value_is_refused(state, tmp_path):
    config, tensors = state
    src = tmp_path / 'src'
    src.mkdir()
    config.save_pretrained(src)
    torch.save(dict(tensors, step=3), src / 'pytorch_model.bin')
    assert_refused(tmp_path, lambda d: hf.import_hf(str(src), d),
                   r'entries that are not tensors: step \(int\)')


def test_truncated_safetensors_is_refused_before_anything_is_written(state, tmp_path):
    config, tensors = state
    src = write_hf(tmp_path / 'src', config, tensors)
    path = os.path.join(src, 'model.safetensors')
    with open(path, 'r+b') as f:          # the last tensors' bytes are gone
        f.truncate(os.path.getsize(path) - 4096)
    assert_refused(tmp_path, lambda d: hf.import_hf(src, d),
                   r'model\.safetensors: tensor [\w.]+ claims bytes \d+\.\.\d+ of the '
                   r'data, but the file holds \d+ data bytes')


def test_failure_half_way_through_the_stream_leaves_nothing(state, tmp_path):
    from meditron_jax.convert import common
    config, tensors = state
    src = write_hf(tmp_path / 'src', config, tensors)
    weights = hf.open_hf_weights(src)
    cfg, true_vocab = hf.config_from_hf(config.to_dict(), 'config.json')
    plan = common.torch_tensor_plan(cfg, true_vocab)
    done = []

    def read(name):                       # the source becomes unreadable after 10 tensors
        if len(done) == 10:
            raise ConversionError(f'{name}: read error')
        done.append(name)
        return weights.read(name)
    assert_refused(tmp_path, lambda d: common.import_stream(
        read, plan, cfg, d, true_vocab=true_vocab, force=False, extra_meta={}, src=src),
        r'model\.layers\.1\.self_attn\.q_proj\.weight: read error')


def test_meta_rank_lacking_a_tensor_is_named(tmp_path):
    src = str(tmp_path / 'meta')
    fx.write_meta(fx.hf_model(seed=6), src, 2)
    rank1 = os.path.join(src, 'consolidated.01.pth')
    state = torch.load(rank1, weights_only=True)
    del state['layers.1.feed_forward.w3.weight']
    torch.save(state, rank1)
    assert_refused(tmp_path, lambda d: meta.import_meta(src, d),
                   r'not present in every rank: layers\.1\.feed_forward\.w3\.weight '
                   r"\(only in \['consolidated\.00\.pth'\]\)")


def test_meta_wrong_shape_is_named(tmp_path):
    src = str(tmp_path / 'meta')
    model = fx.hf_model(seed=6)
    fx.write_meta(model, src, 1)
    path = os.path.join(src, 'consolidated.00.pth')
    state = torch.load(path, weights_only=True)
    state['layers.0.attention.wk.weight'] = torch.zeros(64, 64)
    torch.save(state, path)
    assert_refused(tmp_path, lambda d: meta.import_meta(src, d),
                   r'layers\.0\.attention\.wk\.weight: found \[64, 64\], expected \[32, 64\]')
