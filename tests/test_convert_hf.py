"""meditron-convert import-hf / export-hf on a tiny random GQA Llama saved by real transformers:
logits match transformers, export loads cleanly in AutoModelForCausalLM, HF -> ours -> HF is
bit-identical, and meditron_jax.load reads the result."""

import contextlib
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors
import sentencepiece as spm
import torch
import transformers

import meditron_jax
from meditron_jax import model as model_lib
from meditron_jax import params_checkpoint as pc
from meditron_jax.convert import hf

import convert_fixtures as fx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def model32():
    return fx.hf_model(torch.float32)


@pytest.fixture(scope='module')
def hf_dirs(model32, tmp_path_factory):
    """The same model as one safetensors file, as sharded safetensors, and as a .bin."""
    root = tmp_path_factory.mktemp('hf')
    single, sharded, binary = root / 'single', root / 'sharded', root / 'bin'
    model32.save_pretrained(single)
    model32.save_pretrained(sharded, max_shard_size='40KB')
    model32.config.save_pretrained(binary)
    torch.save(model32.state_dict(), binary / 'pytorch_model.bin')
    assert (sharded / 'model.safetensors.index.json').exists()
    return {'single': str(single), 'sharded': str(sharded), 'bin': str(binary)}


def our_logits(path, toks):
    m = meditron_jax.load(path)
    return np.asarray(m(toks))[..., :m.true_vocab_size]


@pytest.mark.parametrize('layout', ['single', 'sharded', 'bin'])
def test_import_hf_gives_transformers_logits(layout, hf_dirs, model32, tmp_path):
    dst = hf.import_hf(hf_dirs[layout], str(tmp_path / 'ours'))
    cfg = pc.read_config(dst)
    assert (cfg.num_kv_heads, cfg.vocab_size, cfg.param_dtype) == (fx.KV_HEADS, fx.VOCAB, 'float32')
    toks = fx.tokens()
    np.testing.assert_allclose(our_logits(dst, toks), fx.hf_logits(model32, toks), atol=1e-5)


@contextlib.contextmanager
def transformers_warnings_to_caplog():
    """transformers' loggers do not propagate to the root logger (pytest's caplog) unless the
    environment says so (CI=true does): make them, whatever the environment."""
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    hf_logging.enable_propagation()
    try:
        yield
    finally:
        hf_logging.disable_propagation()
        hf_logging.set_verbosity(verbosity)


def test_export_hf_loads_in_transformers_without_key_warnings_and_same_logits(
        hf_dirs, model32, tmp_path, caplog):
    ours = hf.import_hf(hf_dirs['single'], str(tmp_path / 'ours'), pad_vocab_multiple=128)
    assert pc.read_config(ours).vocab_size == 256
    assert pc.read_metadata(ours)['true_vocab_size'] == fx.VOCAB
    out = hf.export_hf(ours, str(tmp_path / 'hf_out'), shard_size=60_000)
    files = sorted(os.listdir(out))
    assert {'config.json', 'generation_config.json', 'model.safetensors.index.json'} <= set(files)
    assert sum(f.endswith('.safetensors') for f in files) > 2
    with caplog.at_level(logging.WARNING), transformers_warnings_to_caplog():
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
            out, output_loading_info=True)
    assert info['missing_keys'] == set() or not info['missing_keys'], info
    assert not info['unexpected_keys'] and not info['mismatched_keys'], info
    assert not [r for r in caplog.records
                if 'missing' in r.getMessage().lower() or 'unexpected' in r.getMessage().lower()]
    assert loaded.config.vocab_size == fx.VOCAB
    toks = fx.tokens(seed=3)
    np.testing.assert_allclose(fx.hf_logits(loaded.eval(), toks), fx.hf_logits(model32, toks),
                               atol=1e-5)
    np.testing.assert_allclose(our_logits(ours, toks), fx.hf_logits(loaded, toks), atol=1e-5)


def _tensors(directory):
    out = {}
    for f in os.listdir(directory):
        if f.endswith('.safetensors'):
            with safetensors.safe_open(os.path.join(directory, f), 'pt') as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def test_hf_to_ours_to_hf_is_bit_identical_in_bfloat16(tmp_path):
    src = tmp_path / 'bf16'
    fx.hf_model(torch.bfloat16, seed=5).save_pretrained(src)
    ours = hf.import_hf(str(src), str(tmp_path / 'ours'), pad_vocab_multiple=64)
    assert pc.read_config(ours).param_dtype == 'bfloat16'
    out = hf.export_hf(ours, str(tmp_path / 'back'))
    before, after = _tensors(src), _tensors(out)
    assert sorted(before) == sorted(after)
    for name, t in before.items():
        assert after[name].dtype == torch.bfloat16 and torch.equal(after[name], t), name
    with open(os.path.join(out, 'config.json')) as f:
        assert json.load(f)['dtype'] == 'bfloat16'


def test_dtype_cast_on_import_and_export(hf_dirs, model32, tmp_path):
    ours = hf.import_hf(hf_dirs['single'], str(tmp_path / 'ours'), dtype='bfloat16')
    assert pc.read_config(ours).param_dtype == 'bfloat16'
    out = hf.export_hf(ours, str(tmp_path / 'f16'), dtype='float16')
    t = _tensors(out)['model.layers.1.mlp.down_proj.weight']
    ref = model32.state_dict()['model.layers.1.mlp.down_proj.weight']
    assert t.dtype == torch.float16
    assert torch.equal(t, ref.to(torch.bfloat16).to(torch.float16))


def test_export_hf_writes_a_loadable_tokenizer(hf_dirs, tmp_path):
    text = tmp_path / 'corpus.txt'
    text.write_text('\n'.join(f'the patient {i} was given aspirin and rest' for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / 'tok'),
                                   vocab_size=40, user_defined_symbols=['[BIB_REF]'])
    ours = hf.import_hf(hf_dirs['single'], str(tmp_path / 'ours'))
    out = hf.export_hf(ours, str(tmp_path / 'hf_out'), tokenizer=str(tmp_path / 'tok.model'))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / 'tok.model'))
    sentence = 'the patient was given aspirin [BIB_REF]'
    assert tok(sentence)['input_ids'] == [sp.bos_id()] + sp.encode(sentence)


def test_cli_import_then_refuses_non_empty_destination(hf_dirs, tmp_path):
    dst = tmp_path / 'ours'
    cmd = [sys.executable, '-m', 'meditron_jax.convert', 'import-hf', hf_dirs['sharded'], str(dst)]
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert pc.read_config(dst) == model_lib.LlamaConfig(
        vocab_size=fx.VOCAB, hidden_size=fx.HIDDEN, num_layers=fx.LAYERS, num_heads=fx.HEADS,
        num_kv_heads=fx.KV_HEADS, mlp_dim=fx.MLP, max_seq_len=64, param_dtype='float32')
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert 'holds a previous params checkpoint; pass --force' in second.stderr
