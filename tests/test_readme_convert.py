"""README promises of meditron-convert, on one tiny Llama whose RoPE theta (500000) and RMS eps
(1e-6) are not the defaults and whose 8 kv heads split over Meta's 8 model-parallel ranks (70B's
layout: one kv head a rank):
- import-hf and import-meta read theta and eps from config.json / params.json (the logits match
  transformers', and the default values would not: a converter that ignored them fails here);
- Meta's 8 rank files merge to exactly the parameters the HF import gives;
- the export commands run end to end as ``python -m meditron_jax.convert``: export-hf with
  ``--shard-size`` (several shards, an index, loads in transformers with our logits) and
  export-meta ``--shards 8`` (the source's rank files again, bit for bit).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors
import torch
import transformers

import meditron_jax
from meditron_jax import model as model_lib
from meditron_jax import params_checkpoint as pc
from meditron_jax.convert import hf, meta

import convert_fixtures as fx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THETA, EPS = 500000.0, 1e-6
VOCAB = 248   # Meta splits the head's vocab rows over the ranks: a multiple of 8
SHAPE = dict(hidden_size=128, num_attention_heads=16, num_key_value_heads=8,
             intermediate_size=256, rope_theta=THETA, rms_norm_eps=EPS)
RANKS = 8


@pytest.fixture(scope='module')
def model32():
    return fx.hf_model(torch.float32, seed=11, vocab=VOCAB, **SHAPE)


@pytest.fixture(scope='module')
def imported(model32, tmp_path_factory):
    """The model as a HF directory and as 8 Meta rank files, each imported."""
    root = tmp_path_factory.mktemp('readme-convert')
    model32.save_pretrained(root / 'hf')
    params = fx.write_meta(model32, str(root / 'meta'), RANKS)
    assert (params['rope_theta'], params['norm_eps']) == (THETA, EPS)
    return dict(hf_src=str(root / 'hf'), meta_src=str(root / 'meta'),
                hf=hf.import_hf(str(root / 'hf'), str(root / 'from_hf')),
                meta=meta.import_meta(str(root / 'meta'), str(root / 'from_meta')))


def tokens(seed=3, length=40):
    """Long enough that RoPE's frequencies (theta) matter."""
    return np.random.default_rng(seed).integers(0, VOCAB, (2, length)).astype(np.int32)


def convert_command(*args):
    return subprocess.run([sys.executable, '-m', 'meditron_jax.convert', *args], cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize('source', ['hf', 'meta'])
def test_import_reads_rope_theta_and_rms_eps_from_the_source_config(source, imported, model32):
    m = meditron_jax.load(imported[source])
    assert (m.config.rope_theta, m.config.rms_eps) == (THETA, EPS)
    toks = tokens()
    expected = fx.hf_logits(model32, toks)
    np.testing.assert_allclose(np.asarray(m(toks)), expected, atol=1e-5)
    if source == 'hf':   # (the same model either way)
        # The Llama-2 defaults give other logits, beyond the tolerance: the check tells them apart.
        forward = jax.jit(model_lib.forward, static_argnums=1)
        for defaults in (dict(rope_theta=10000.0), dict(rms_eps=1e-5)):
            wrong = forward(m.params, m.config.replace(**defaults), toks)
            assert np.abs(np.asarray(wrong) - expected).max() > 1e-4, defaults


def test_import_meta_merges_eight_ranks_into_the_hf_import_bit_for_bit(imported):
    ranks = sorted(f for f in os.listdir(imported['meta_src']) if f.startswith('consolidated.'))
    assert ranks == [f'consolidated.{r:02d}.pth' for r in range(RANKS)]
    wk = torch.load(os.path.join(imported['meta_src'], ranks[0]), weights_only=True)[
        'layers.0.attention.wk.weight']
    assert wk.shape == (128 // 16, 128)             # one kv head (head_dim rows) a rank
    cfg = pc.read_config(imported['meta'])
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim, cfg.vocab_size) == (16, 8, 256, VOCAB)
    from_meta, _ = pc.load_params(imported['meta'])
    from_hf, _ = pc.load_params(imported['hf'])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 from_meta, from_hf)


def test_export_hf_command_with_shard_size_writes_shards_transformers_loads(imported, model32,
                                                                            tmp_path):
    dst = str(tmp_path / 'hf_out')
    done = convert_command('export-hf', imported['hf'], dst, '--shard-size', '100KB')
    assert done.returncode == 0, done.stderr[-3000:]
    files = sorted(f for f in os.listdir(dst) if f.endswith('.safetensors'))
    n = len(files)
    assert n >= 4 and files == [f'model-{k:05d}-of-{n:05d}.safetensors' for k in range(1, n + 1)]
    with open(os.path.join(dst, 'model.safetensors.index.json')) as f:
        index = json.load(f)['weight_map']
    for name in files:
        with safetensors.safe_open(os.path.join(dst, name), 'pt') as st:
            keys = list(st.keys())
            size = sum(st.get_tensor(k).numel() * 4 for k in keys)
        assert all(index[k] == name for k in keys)
        assert len(keys) == 1 or size <= 100_000, (name, keys, size)   # only a lone tensor > 100KB
    assert sorted(index) == sorted(model32.state_dict())
    with open(os.path.join(dst, 'config.json')) as f:
        config = json.load(f)
    assert config['rms_norm_eps'] == EPS
    loaded = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    assert loaded.config.rope_parameters['rope_theta'] == THETA
    toks = tokens(seed=4)
    np.testing.assert_allclose(fx.hf_logits(loaded, toks), fx.hf_logits(model32, toks), atol=1e-5)


def test_export_meta_command_with_eight_shards_gives_the_source_rank_files(imported, tmp_path):
    dst = str(tmp_path / 'meta_out')
    done = convert_command('export-meta', imported['meta'], dst, '--shards', str(RANKS))
    assert done.returncode == 0, done.stderr[-3000:]
    original, written = fx.load_meta(imported['meta_src']), fx.load_meta(dst)
    assert len(written) == RANKS
    for r in range(RANKS):
        del original[r]['rope.freqs']
        assert sorted(written[r]) == sorted(original[r])
        for name, t in original[r].items():
            assert torch.equal(written[r][name], t), (r, name)
    with open(os.path.join(dst, 'params.json')) as f:
        params = json.load(f)
    assert (params['rope_theta'], params['norm_eps']) == (THETA, EPS)
    assert (params['n_heads'], params['n_kv_heads'], params['vocab_size']) == (16, 8, VOCAB)
