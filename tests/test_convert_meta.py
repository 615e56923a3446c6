"""meditron-convert import-meta / export-meta: a Meta-layout checkpoint built in the test from a
HF model (interleaved q/k rotary rows, split by model-parallel rank, GQA) imports to the HF
model's logits, and export-meta -> import-meta is bit-identical."""

import json
import os

import jax
import numpy as np
import pytest
import torch

import meditron_jax
from meditron_jax import params_checkpoint as pc
from meditron_jax.convert import meta

import convert_fixtures as fx


META_VOCAB = 252   # Meta's ranks split the head's vocab rows: divisible by 4, not by 8


@pytest.fixture(scope='module')
def model32():
    return fx.hf_model(torch.float32, seed=2, vocab=META_VOCAB)


@pytest.mark.parametrize('shards', [1, 4])   # 4 ranks, 4 kv heads: one kv head a rank, as 70B
def test_import_meta_gives_hf_logits_and_export_round_trips(shards, model32, tmp_path):
    src = str(tmp_path / 'meta')
    fx.write_meta(model32, src, shards)
    ours = meta.import_meta(src, str(tmp_path / 'ours'))
    cfg = pc.read_config(ours)
    assert (cfg.mlp_dim, cfg.num_kv_heads, cfg.vocab_size) == (fx.MLP, fx.KV_HEADS, META_VOCAB)
    toks = fx.tokens(seed=7)  # ids < 250 < META_VOCAB
    m = meditron_jax.load(ours)
    np.testing.assert_allclose(np.asarray(m(toks)), fx.hf_logits(model32, toks), atol=1e-5)

    exported = meta.export_meta(ours, str(tmp_path / 'meta_out'), shards=shards)
    original, written = fx.load_meta(src), fx.load_meta(exported)
    assert len(written) == shards
    for r in range(shards):
        del original[r]['rope.freqs']
        assert sorted(original[r]) == sorted(written[r])
        for name, t in original[r].items():
            assert torch.equal(written[r][name], t), (r, name)
    with open(os.path.join(exported, 'params.json')) as f:
        params = json.load(f)
    assert meta.mlp_dim(params['dim'], params['multiple_of'],
                        params.get('ffn_dim_multiplier')) == fx.MLP
    assert params['n_kv_heads'] == fx.KV_HEADS and params['vocab_size'] == META_VOCAB

    again = meta.import_meta(exported, str(tmp_path / 'again'))
    first, _ = pc.load_params(ours)
    second, _ = pc.load_params(again)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 first, second)


def test_export_meta_in_bfloat16_with_padded_vocab_keeps_true_vocab(tmp_path):
    src = str(tmp_path / 'meta')
    fx.write_meta(fx.hf_model(torch.bfloat16, seed=4), src, 2)
    ours = meta.import_meta(src, str(tmp_path / 'ours'), pad_vocab_multiple=128)
    cfg = pc.read_config(ours)
    assert (cfg.vocab_size, cfg.param_dtype) == (256, 'bfloat16')
    params, _ = pc.load_params(ours)
    assert not np.asarray(params['embed']['embedding'][fx.VOCAB:], np.float32).any()
    assert not np.asarray(params['lm_head']['kernel'][:, fx.VOCAB:], np.float32).any()
    assert np.asarray(params['lm_head']['kernel'][:, :fx.VOCAB], np.float32).any()
    exported = meta.export_meta(ours, str(tmp_path / 'out'), shards=2)
    original, written = fx.load_meta(src), fx.load_meta(exported)
    for r in range(2):
        assert written[r]['tok_embeddings.weight'].shape == (fx.VOCAB, fx.HIDDEN // 2)
        for name, t in written[r].items():
            assert t.dtype == torch.bfloat16 and torch.equal(t, original[r][name]), name


def test_export_meta_refuses_ranks_that_do_not_divide_kv_heads(model32, tmp_path):
    src = str(tmp_path / 'meta')
    fx.write_meta(model32, src, 1)
    ours = meta.import_meta(src, str(tmp_path / 'ours'))
    with pytest.raises(meta.ConversionError, match=r'num_kv_heads=4'):
        meta.export_meta(ours, str(tmp_path / 'out'), shards=8)
    assert fx.leftovers(str(tmp_path), 'out') == []


def test_meta_ffn_rule_matches_the_released_sizes():
    assert meta.mlp_dim(4096, 256, None) == 11008           # 7B
    assert meta.mlp_dim(5120, 256, None) == 13824           # 13B
    assert meta.mlp_dim(8192, 4096, 1.3) == 28672           # 70B's params.json
    for dim, target in ((4096, 11008), (8192, 28672), (64, 128), (768, 2048)):
        assert meta.mlp_dim(dim, *meta.mlp_rule_for(dim, target)) == target
