"""A training run with train.init_from=DST (DST from meditron-convert import-hf) starts at the
imported model's loss: its first logged loss is that model's loss on the first batch."""

import os

import numpy as np
import pytest
import torch
import transformers

import configs.debug
from meditron_jax import model as model_lib
from meditron_jax import params_checkpoint as pc
from meditron_jax import train
from meditron_jax.convert import hf
from meditron_jax.data import loader, prepare


def debug_config(data_dir, init_from):
    c = configs.debug.get_config()
    c.data.dir = data_dir
    c.data.seq_len, c.data.global_batch_size = 64, 8
    c.mesh.update(dict(data=2, fsdp=4, tensor=1))
    c.train.update(dict(steps=1, log_every=1, eval_every=0, init_from=init_from))
    c.checkpoint.update(dict(every=1, keep=1))
    return c


def imported_debug_model(directory, cfg: model_lib.LlamaConfig) -> str:
    """A HF Llama of the debug shape, weights large enough that its loss is far from ln(V)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.mlp_dim, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith('norm.weight'):
                p.normal_(0.0, 0.3)
    model.save_pretrained(os.path.join(directory, 'hf'))
    return hf.import_hf(os.path.join(directory, 'hf'), os.path.join(directory, 'ours'))


@pytest.mark.slow   # prepares the shipped corpus and compiles a train step
def test_training_with_init_from_starts_at_the_imported_models_loss(tmp_path):
    data_dir = str(tmp_path / 'data')
    base = debug_config(data_dir, '')
    prepare.prepare(base.data, data_dir)
    cfg = train.model_config(base)
    dst = imported_debug_model(str(tmp_path), cfg)

    # The imported model's loss on the first training batch, computed outside the loop.
    params, _ = pc.load_params(dst)
    batch = next(loader.make_train_iterator(base.data, data_dir, seed=int(base.data.shuffle_seed),
                                            process_index=0, process_count=1))
    loss_sum, count = train.loss_terms(params, cfg.replace(scan_layers=True),
                                       {k: np.asarray(v) for k, v in batch.items()})
    expected = float(loss_sum / count)
    assert abs(expected - np.log(cfg.vocab_size)) > 1.0   # not what a fresh init would give

    rows = train.train(debug_config(data_dir, dst), str(tmp_path / 'run'))
    first = next(r for r in rows if 'loss' in r)
    assert first['step'] == 1
    np.testing.assert_allclose(first['loss'], expected, rtol=1e-4)


def test_init_from_grows_the_vocabulary_for_added_tokens(tmp_path):
    """MEDITRON's case: Llama-2's vocabulary plus special tokens, padded, in the config; the
    imported checkpoint has fewer rows. Old rows are kept, new embedding rows are the mean
    embedding, new head columns zero; a checkpoint with more rows than the config is refused."""
    import jax
    from meditron_jax import sharding
    small = model_lib.preset('tiny', vocab_size=256)
    dst = imported_debug_model(str(tmp_path), small)
    c = debug_config(str(tmp_path / 'unused'), dst)
    c.model = configs.debug.base.model_config('tiny')
    c.model.vocab_size = 384
    mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
    params = jax.device_get(train.init_params(c, train.model_config(c), mesh))
    source, _ = pc.load_params(dst)
    embed, head = params['embed']['embedding'], params['lm_head']['kernel']
    assert embed.shape == (384, 64) and head.shape == (64, 384)
    np.testing.assert_array_equal(embed[:256], source['embed']['embedding'])
    np.testing.assert_allclose(embed[256:], np.broadcast_to(
        np.asarray(source["embed"]["embedding"]).mean(0), (128, 64)), atol=1e-6)
    np.testing.assert_array_equal(head[:, :256], source['lm_head']['kernel'])
    assert not head[:, 256:].any()

    c.model.vocab_size = 128
    with pytest.raises(ValueError, match=r'model\.vocab_size: checkpoint 256 vs config 128'):
        train.init_params(c, train.model_config(c), mesh)
