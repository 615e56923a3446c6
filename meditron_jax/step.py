"""The pure core of training: the train state, the loss, ``train_step`` and ``eval_step``, and
the helpers that place them on a mesh (abstract and fresh states with their shardings, the steps
jitted once with explicit in/out shardings and a donated state). No files, logging or signals:
the loop and the command that use them are in train.py.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from meditron_jax import loss as loss_lib, model, sharding

Array = jax.Array


# A batch: int32 (rows, seq_len + 1) arrays; loss_mask is all ones for text (see data/loader.py).
BATCH_KEYS = ('tokens', 'segment_ids', 'positions', 'loss_mask')


class TrainState(flax.struct.PyTreeNode):
    step: Array
    params: Any
    opt_state: Any
    skipped: Array            # updates not applied because the loss or gradients were not finite
    first_nonfinite: Array    # the first such step (-1: none); train.nonfinite='error' reports it


# ------------------------------------------------------------------------- pure functions


def loss_terms(params, cfg: model.LlamaConfig, batch: dict) -> tuple[Array, Array]:
    """(summed next-token loss, number of predicted tokens) for one packed batch.

    Rows hold seq_len + 1 tokens; a token is predicted only from the same document (segment),
    and counts where loss_mask is 1 (all of a text document, the assistant turns of a chat).
    """
    tokens, segments, positions = batch['tokens'], batch['segment_ids'], batch['positions']
    hidden_BxTxD = model.forward_hidden(params, cfg, tokens[:, :-1], positions[:, :-1],
                                        segments[:, :-1])
    same_document = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
    weights = same_document & (batch['loss_mask'][:, 1:] != 0)
    # The head is applied inside the loss, a chunk of the sequence at a time (loss.py).
    return loss_lib.head_cross_entropy(hidden_BxTxD, params['lm_head']['kernel'], tokens[:, 1:],
                                       weights, cfg.compute_dtype)


def _split_micro(batch: dict, k: int) -> dict:
    """(B, ...) -> (k, B/k, ...) taking every k-th row, so each device's rows stay local."""
    def split(x):
        b = x.shape[0]
        return x.reshape(b // k, k, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict, *, cfg: model.LlamaConfig,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               grad_accum_steps: int) -> tuple[TrainState, dict]:
    """One optimizer step over the global batch, accumulating over micro-batches in a scan."""
    grad_fn = jax.value_and_grad(functools.partial(loss_terms, cfg=cfg), has_aux=True)
    if grad_accum_steps == 1:
        (loss_sum, count), grads = grad_fn(state.params, batch=batch)
    else:
        def micro_step(carry, micro):
            (l, c), g = grad_fn(state.params, batch=micro)
            acc_l, acc_c, acc_g = carry
            return (acc_l + l, acc_c + c, jax.tree.map(jnp.add, acc_g, g)), None
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (loss_sum, count, grads), _ = jax.lax.scan(
            micro_step, (jnp.float32(0), jnp.float32(0), zeros),
            _split_micro(batch, grad_accum_steps))
    denom = jnp.maximum(count, 1.0)
    loss = loss_sum / denom
    # The mean gradient is grads / denom; the optimizer divides inside its one pass.
    grad_norm = optax.global_norm(grads) / denom
    # A non-finite update is never applied: the optimizer (optim.make_optimizer) returns zero
    # updates and its unchanged state inside the same fused pass. The loop then stops
    # (nonfinite='error', naming the first bad step, checked at log steps so the host never
    # waits on a step) or goes on.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params,
                                          grad_divisor=denom, grad_norm=grad_norm, apply=finite)
    step = state.step + 1
    new_state = state.replace(
        step=step, params=optax.apply_updates(state.params, updates), opt_state=opt_state,
        skipped=state.skipped + (~finite).astype(jnp.int32),
        first_nonfinite=jnp.where((state.first_nonfinite < 0) & ~finite, step,
                                  state.first_nonfinite))
    metrics = dict(loss=loss, grad_norm=grad_norm, lr=schedule(state.step), tokens=count,
                   skipped=new_state.skipped, first_nonfinite=new_state.first_nonfinite)
    return new_state, metrics


def eval_step(params, batch: dict, *, cfg: model.LlamaConfig) -> dict:
    loss_sum, count = loss_terms(params, cfg, batch)
    return dict(loss_sum=loss_sum, tokens=count)


# ------------------------------------------------------------------------ states and shardings


def abstract_state(cfg: model.LlamaConfig, optimizer, mesh) -> tuple[TrainState, TrainState]:
    """(abstract TrainState with shardings, the TrainState of shardings)."""
    param_shardings = model.param_shardings(cfg, mesh)
    abstract_params, _ = model.param_specs(cfg)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    replicated = sharding.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_opt, param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                           skipped=replicated, first_nonfinite=replicated)
    abstract = TrainState(step=scalar, params=abstract_params, opt_state=abstract_opt,
                          skipped=scalar, first_nonfinite=scalar)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return abstract, shardings


def make_state(step: int, params, opt_state, shardings: TrainState, skipped: int = 0
               ) -> TrainState:
    """A state at `step` around (already sharded) params and optimizer state."""
    put = lambda x, s: jax.device_put(jnp.int32(x), s)
    return TrainState(step=put(step, shardings.step), params=params, opt_state=opt_state,
                      skipped=put(skipped, shardings.skipped),
                      first_nonfinite=put(-1, shardings.first_nonfinite))


def fresh_state(params, optimizer, shardings: TrainState) -> TrainState:
    """A step-0 state around given (already sharded) params, with a fresh optimizer."""
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    return make_state(0, params, opt_state, shardings)


def compile_steps(config, cfg, optimizer, schedule, shardings: TrainState, mesh):
    """The jitted train and eval steps, with explicit in/out shardings and a donated state."""
    batch_sharding = sharding.batch_sharding(mesh)
    batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
    step_fn = jax.jit(
        functools.partial(train_step, cfg=cfg, optimizer=optimizer, schedule=schedule,
                          grad_accum_steps=int(config.optim.grad_accum_steps)),
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_step, cfg=cfg),
                      in_shardings=(shardings.params, batch_shardings),
                      out_shardings=sharding.replicated(mesh))
    return step_fn, eval_fn
