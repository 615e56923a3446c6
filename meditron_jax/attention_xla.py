"""Causal grouped-query attention written out, with its backward in one fused softmax pass.

model.attention's 'xla' implementation (CPU, and GPU/TPU where no fused kernel is chosen). The
maths is jax.nn.dot_product_attention's (scaled float32 scores, masked, softmax, values), but:
- the kv-head groups stay one (B, K, G, T, S) score tensor, contracted with (b, k) as the batch
  dimensions, where jax's version vmaps over the group and XLA:CPU then transposed the score
  tensor (and its gradient) between the group-major and the batch-major layouts in every layer;
- the backward is written by hand (custom_vjp): dS = P * (dP - rowsum(dO * O)), the softmax
  gradient in one elementwise pass, from the saved probabilities (autodiff of softmax + where
  made several passes over the scores and saved the mask as well).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _mask(segment_ids_BxT: Array | None, t: int) -> Array:
    """(B or 1, 1, 1, T, T) bool: causal, and within one document when segment ids are given."""
    causal_TxT = jnp.tril(jnp.ones((t, t), jnp.bool_))
    if segment_ids_BxT is None:
        return causal_TxT[None, None, None]
    same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return (same_BxTxT & causal_TxT)[:, None, None]


def _grouped(q_BxTxNxH: Array, kv_heads: int) -> Array:
    b, t, n, h = q_BxTxNxH.shape
    return q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h)


def _probs(q_BxTxKxGxH, k_BxSxKxH, segment_ids_BxT):
    scale = np.float32(1.0 / np.sqrt(q_BxTxKxGxH.shape[-1]))
    scores = jnp.einsum('btkgh,bskh->bkgts', q_BxTxKxGxH, k_BxSxKxH,
                        preferred_element_type=jnp.float32) * scale
    mask = _mask(segment_ids_BxT, q_BxTxKxGxH.shape[1])
    # Every row sees at least its own position, so its max is finite and masked entries are 0.
    scores = jnp.where(mask, scores, -jnp.inf)
    exp = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    return exp / jnp.sum(exp, axis=-1, keepdims=True)


def _forward(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT):
    q = _grouped(q_BxTxNxH, k_BxSxKxH.shape[2])
    probs_BxKxGxTxS = _probs(q, k_BxSxKxH, segment_ids_BxT).astype(v_BxSxKxH.dtype)
    out_BxTxKxGxH = jnp.einsum('bkgts,bskh->btkgh', probs_BxKxGxTxS, v_BxSxKxH)
    return out_BxTxKxGxH.reshape(q_BxTxNxH.shape), probs_BxKxGxTxS


@jax.custom_vjp
def causal_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array,
                     segment_ids_BxT: Array | None) -> Array:
    """softmax(q k^T / sqrt(H), causal + same-segment mask) v, GQA (K kv heads divide N)."""
    return _forward(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)[0]


def _fwd(q, k, v, segment_ids_BxT):
    out, probs = _forward(q, k, v, segment_ids_BxT)
    return out, (q, k, v, out, probs, segment_ids_BxT)


def _bwd(residuals, dout_BxTxNxH):
    q, k, v, out, probs_BxKxGxTxS, segment_ids_BxT = residuals
    kv = k.shape[2]
    scale = np.float32(1.0 / np.sqrt(q.shape[-1]))
    dout = _grouped(dout_BxTxNxH, kv)
    dv_BxSxKxH = jnp.einsum('bkgts,btkgh->bskh', probs_BxKxGxTxS, dout.astype(v.dtype),
                            preferred_element_type=jnp.float32).astype(v.dtype)
    dprobs = jnp.einsum('btkgh,bskh->bkgts', dout, v, preferred_element_type=jnp.float32)
    # sum_s P * dP = sum_h dO * O (the same number, from (B, T, N, H) arrays, not (T, S) ones).
    delta_BxKxGxT = jnp.einsum('btkgh,btkgh->bkgt', dout.astype(jnp.float32),
                               _grouped(out, kv).astype(jnp.float32))
    dscores = (probs_BxKxGxTxS.astype(jnp.float32) * (dprobs - delta_BxKxGxT[..., None])
               * scale).astype(q.dtype)
    dq = jnp.einsum('bkgts,bskh->btkgh', dscores, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum('bkgts,btkgh->bskh', dscores, _grouped(q, kv),
                    preferred_element_type=jnp.float32)
    return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv_BxSxKxH, None


causal_attention.defvjp(_fwd, _bwd)
