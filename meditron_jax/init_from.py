"""train.init_from: starting a run from existing weights (a fresh optimizer and schedule).

The source is a params checkpoint (``meditron-convert import-hf/import-meta`` or
``params_checkpoint.save_params``) or a training workdir (its latest complete step, e.g. a
pretraining run to finetune). ``check`` reads only metadata, so meditron-train runs it before
preparing data: a typo or a model of another shape is reported in seconds, not hours later.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp

from meditron_jax import checkpoint, model

log = logging.getLogger(__name__)


class InitFromError(ValueError):
    """train.init_from names no usable checkpoint, or one of another model shape."""


def has_steps(workdir: str) -> bool:
    """Whether a workdir holds checkpoint steps (complete or not), so that a run resumes rather
    than starting from init_from, which may since have moved."""
    root = os.path.join(workdir, 'checkpoints')
    return os.path.isdir(root) and any(name.isdigit() for name in os.listdir(root))


def check(path: str, cfg: model.LlamaConfig) -> model.LlamaConfig:
    """The source's model config, after checking it against the run's ``cfg``: the same shape,
    and a vocabulary no larger (a smaller one is grown, see ``grow_vocab``)."""
    from meditron_jax import params_checkpoint
    if params_checkpoint.is_params_checkpoint(path):
        source = params_checkpoint.read_config(path).replace(scan_layers=True)
        params_checkpoint.check_stored_shapes(path, source)
    elif os.path.isdir(os.path.join(path, 'checkpoints')):
        source = model.LlamaConfig(**checkpoint.read_config(path)[1]['model'])
    else:
        what = ('no such file or directory' if not os.path.exists(path) else
                f'neither a params checkpoint (no {params_checkpoint.META_FILE}) nor a training '
                f'workdir (no checkpoints/)')
        raise InitFromError(f'train.init_from={path}: {what}; expected the output of '
                            f'meditron-convert import-hf/import-meta or a training workdir')
    mismatch = {k: (getattr(source, k), getattr(cfg, k)) for k in checkpoint.SHAPE_KEYS
                if k not in ('param_dtype', 'vocab_size', 'scan_layers')
                and getattr(source, k) != getattr(cfg, k)}
    if source.vocab_size > cfg.vocab_size:
        mismatch['vocab_size'] = (source.vocab_size, cfg.vocab_size)
    if mismatch:
        raise InitFromError(f'train.init_from={path}: model shape differs from the config: ' +
                            ', '.join(f'model.{k}: checkpoint {a} vs config {b}'
                                      for k, (a, b) in mismatch.items()))
    return source


def grow_vocab(params, vocab_size: int):
    """Embedding rows / head columns appended up to ``vocab_size`` (stacked layout): new rows are
    the mean embedding, new head columns zero, so the new tokens start with the average input
    and a neutral logit (MEDITRON adds special tokens to Llama-2's 32,000 and pads to 128s)."""
    embed, head = params['embed']['embedding'], params['lm_head']['kernel']
    extra = vocab_size - embed.shape[0]
    new_rows = jnp.broadcast_to(embed.mean(axis=0, keepdims=True), (extra, embed.shape[1]))
    return {**params,
            'embed': {'embedding': jnp.concatenate([embed, new_rows.astype(embed.dtype)])},
            'lm_head': {'kernel': jnp.pad(head, ((0, 0), (0, extra)))}}


def load(path: str, cfg: model.LlamaConfig, mesh):
    """The source's params in ``cfg``'s layout, dtype and vocabulary, sharded on ``mesh``."""
    from meditron_jax import params_checkpoint
    source = check(path, cfg)
    if params_checkpoint.is_params_checkpoint(path):
        params, _ = params_checkpoint.load_params(path, mesh=mesh)
    else:  # a training workdir: its latest complete step, in the layout it was saved in
        abstract, _ = model.param_specs(source)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, model.param_shardings(source, mesh))
        step, params, _ = checkpoint.restore_params(path, target)
        log.info('init_from: step %d of the training workdir %s', step, path)
    if source.vocab_size < cfg.vocab_size:
        log.info('init_from: growing the vocabulary from %d to %d rows', source.vocab_size,
                 cfg.vocab_size)
    stacked = source.replace(scan_layers=True)
    grow = lambda p: grow_vocab(p, cfg.vocab_size) if source.vocab_size < cfg.vocab_size else p
    to_model = jax.jit(
        lambda p: jax.tree.map(lambda x: x.astype(jnp.dtype(cfg.param_dtype)),
                               model.to_layout(grow(model.to_layout(p, stacked)), cfg)),
        out_shardings=model.param_shardings(cfg, mesh))
    log.info('initialised params from %s', path)
    return to_model(params)
