"""The next-token loss: the output head and cross-entropy fused, a chunk of the sequence at a time.

``head_cross_entropy(x_BxTxD, head_DxV, targets, weights)`` is ``cross_entropy(x @ head, ...)``
without ever holding the whole float32 (B, T, V) logits (7B: 4,096 tokens a row x 32,000 vocab x
4 bytes = 0.5 GB a row, twice over with its gradient) and without autodiff's gradient of
``take_along_axis`` (a scatter into a zero (B, T, V) array) or of ``logsumexp`` (several passes
over the logits). Its backward is ``softmax - onehot`` in one pass. Because the loss is a scalar,
the forward pass of the differentiated function computes the gradients with respect to the hidden
states and the head directly (for a unit cotangent) while each chunk's logits are at hand, and the
backward pass only scales them: the logits are computed once, never saved, never recomputed.
When the loss is not differentiated (eval), only the loss is computed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from meditron_jax import sharding
from meditron_jax.layers import apart_on_cpu

Array = jax.Array

# A chunk is at most this many logits per batch row (C x V): 7B (V = 32,128) -> 128 positions.
CHUNK_LOGITS_PER_ROW = 1 << 22
# Up to this many chunks run as a Python loop (no scan).
UNROLLED_CHUNKS = 4


def cross_entropy(logits_BxTxV: Array, targets_BxT: Array, weights_BxT: Array
                  ) -> tuple[Array, Array]:
    """(sum of weighted token losses, sum of weights), in float32, from whole logits (eval and
    tests; training goes through head_cross_entropy)."""
    logits = logits_BxTxV.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    weights = weights_BxT.astype(jnp.float32)
    return jnp.sum((log_z - target_logit) * weights), jnp.sum(weights)


def chunk_length(seq_len: int, vocab_size: int) -> int:
    """The largest divisor of seq_len whose chunk holds at most CHUNK_LOGITS_PER_ROW logits a row."""
    limit = max(1, CHUNK_LOGITS_PER_ROW // vocab_size)
    return max(c for c in range(1, min(seq_len, limit) + 1) if seq_len % c == 0)


def head_cross_entropy(x_BxTxD: Array, head_DxV: Array, targets_BxT: Array, weights_BxT: Array,
                       compute_dtype=jnp.float32) -> tuple[Array, Array]:
    """(sum of weighted token losses, sum of weights) of the logits ``x @ head`` (float32
    accumulation, matmuls in compute_dtype), differentiable in x and head."""
    weights = weights_BxT.astype(jnp.float32)
    chunk = chunk_length(x_BxTxD.shape[1], head_DxV.shape[1])
    loss = _fused(chunk, jnp.dtype(compute_dtype).name, x_BxTxD, head_DxV,
                  targets_BxT.astype(jnp.int32), weights)
    return loss, jnp.sum(weights)


def _chunks(a: Array, chunk: int) -> Array:
    """(B, T, ...) -> (T / chunk, B, chunk, ...): scanned over the sequence, so every chunk keeps
    the batch dimension (and its data/fsdp sharding) whole."""
    b, t = a.shape[:2]
    return jnp.swapaxes(a.reshape(b, t // chunk, chunk, *a.shape[2:]), 0, 1)


def _chunk_terms(x_BxCxD, head_DxV, targets_BxC, weights_BxC, with_grads: bool):
    """One chunk: (weighted loss sum, and with_grads: d loss / d logits in compute dtype)."""
    logits = jnp.einsum('bcd,dv->bcv', x_BxCxD, head_DxV, preferred_element_type=jnp.float32)
    logits = sharding.constrain(logits, ('batch', 'length', 'act_vocab'))
    # The shifted logits are never a tensor of their own: subtracted inside the exp and from the
    # picked target logit. XLA:CPU fused the product with the row max and a whole-tensor
    # subtraction, and ran the product at two thirds of its rate (the chunk's forward 215 ->
    # 142 ms at llama_100m's vocabulary; the same numbers bit for bit).
    max_BxC = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    exp = jnp.exp(logits - max_BxC[..., None])
    sum_BxC = jnp.sum(exp, axis=-1)
    onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == targets_BxC[..., None]
    target_BxC = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1) - max_BxC
    loss = jnp.sum((jnp.log(sum_BxC) - target_BxC) * weights_BxC)
    if not with_grads:
        return loss, None
    scale_BxC = weights_BxC / sum_BxC
    dlogits = (exp * scale_BxC[..., None] - jnp.where(onehot, weights_BxC[..., None], 0.0))
    return loss, dlogits.astype(x_BxCxD.dtype)


def _transposed(x_GxMxD: Array) -> Array:
    """(G, D, M), in memory on CPU: XLA:CPU's product contracting the rows of both operands
    (the head's gradient, x^T dlogits) ran at 0.8x the rate it reaches once x^T is a copy
    of its own, and it folds a plain transpose back into the product. Elsewhere a transpose
    XLA may fold as usual."""
    return apart_on_cpu(x_GxMxD, lambda a: jnp.swapaxes(a, 1, 2))


def _forward(chunk, dtype, x_BxTxD, head_DxV, targets_BxT, weights_BxT, with_grads):
    x = x_BxTxD.astype(dtype)
    # Gathered over fsdp once, before the chunk loop (vocab stays split over tensor): left to
    # itself, XLA:GPU all-gathers the head again in every chunk.
    head = sharding.constrain(head_DxV.astype(dtype), (None, 'vocab'))

    b, t, d = x_BxTxD.shape
    # The head's gradient is accumulated per batch shard, (G, D, V) with G split like the batch,
    # so each device sums its own rows' contributions locally and one reduction follows the loop;
    # a (D, V) accumulator made XLA:GPU reduce-scatter it in every chunk.
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else sharding.data_parallel_size(mesh)

    def body(carry, xs):
        loss_sum, dhead_GxDxV = carry
        x_BxCxD, targets_BxC, weights_BxC = xs
        loss, dlogits_BxCxV = _chunk_terms(x_BxCxD, head, targets_BxC, weights_BxC, with_grads)
        loss_sum = loss if loss_sum is None else loss_sum + loss
        if not with_grads:
            return (loss_sum, dhead_GxDxV), None
        dx_BxCxD = jnp.einsum('bcv,dv->bcd', dlogits_BxCxV, head,
                              preferred_element_type=jnp.float32).astype(x_BxTxD.dtype)
        c, v = dlogits_BxCxV.shape[1:]
        rows = (b // shards) * c
        x_GxDxM = _transposed(x_BxCxD.reshape(shards, rows, d))
        per_shard = jnp.einsum('gdm,gmv->gdv', x_GxDxM, dlogits_BxCxV.reshape(shards, rows, v),
                               preferred_element_type=jnp.float32)
        if dhead_GxDxV is not None:
            per_shard = dhead_GxDxV + per_shard
        return (loss_sum, sharding.constrain(per_shard, ('batch', None, 'vocab'))), dx_BxCxD

    inputs = (x, targets_BxT, weights_BxT)
    if t // chunk <= UNROLLED_CHUNKS:
        # A few chunks: one after the other, the head's gradient the sum of theirs, where the scan
        # zero-fills its accumulator first (a (D, V) pass: 2% of llama_100m's step on CPU).
        carry, dxs = (None, None), []
        for i in range(t // chunk):
            carry, dx = body(carry, [a[:, i * chunk:(i + 1) * chunk] for a in inputs])
            dxs.append(dx)
        loss, dhead_GxDxV = carry
        dx_BxTxD = None if not with_grads else (
            jnp.concatenate(dxs, axis=1) if len(dxs) > 1 else dxs[0])
    else:
        dhead0 = None
        if with_grads:
            dhead0 = sharding.constrain(jnp.zeros((shards, *head_DxV.shape), jnp.float32),
                                        ('batch', None, 'vocab'))
        (loss, dhead_GxDxV), dx = jax.lax.scan(body, (jnp.float32(0), dhead0),
                                               tuple(_chunks(a, chunk) for a in inputs))
        dx_BxTxD = None if not with_grads else jnp.swapaxes(dx, 0, 1).reshape(b, t, d)
    if not with_grads:
        return loss, None, None
    return loss, dx_BxTxD, jnp.sum(dhead_GxDxV, axis=0).astype(head_DxV.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(chunk, dtype, x_BxTxD, head_DxV, targets_BxT, weights_BxT):
    return _forward(chunk, dtype, x_BxTxD, head_DxV, targets_BxT, weights_BxT, False)[0]


def _fused_fwd(chunk, dtype, x_BxTxD, head_DxV, targets_BxT, weights_BxT):
    loss, dx, dhead = _forward(chunk, dtype, x_BxTxD, head_DxV, targets_BxT, weights_BxT, True)
    return loss, (dx, dhead)


def _fused_bwd(chunk, dtype, residuals, g):
    dx, dhead = residuals
    return (g * dx).astype(dx.dtype), (g * dhead).astype(dhead.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)
