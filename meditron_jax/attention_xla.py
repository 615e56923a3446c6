"""Causal grouped-query attention written out, with its backward in one fused softmax pass.

model.attention's 'xla' implementation (CPU, and GPU/TPU where no fused kernel is chosen). The
maths is jax.nn.dot_product_attention's (scaled float32 scores, masked, softmax, values), but:
- the kv-head groups stay one score tensor, contracted with (b, k) as the batch dimensions,
  where jax's version vmaps over the group and XLA:CPU then transposed the score tensor (and its
  gradient) between the group-major and the batch-major layouts in every layer;
- queries, keys and values are put head-major once, (B, K, G*T, H) and (B, K, S, H), so that all
  six contractions are plain batched matrix products: contracting (g, t) across the (B, T, K, G,
  H) layout ran XLA:CPU's batched dots at a seventh of its GEMM rate, with transposes of the
  scores around them;
- the backward is written by hand (custom_vjp): dS = P * (dP - rowsum(dO * O)), the softmax
  gradient in one elementwise pass, from the saved probabilities (autodiff of softmax + where
  made several passes over the scores and saved the mask as well).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax.layers import apart_on_cpu

Array = jax.Array


def _mask(segment_ids_BxT: Array | None, t: int) -> Array:
    """(B or 1, 1, 1, T, T) bool: causal, and within one document when segment ids are given."""
    causal_TxT = jnp.tril(jnp.ones((t, t), jnp.bool_))
    if segment_ids_BxT is None:
        return causal_TxT[None, None, None]
    same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return (same_BxTxT & causal_TxT)[:, None, None]


def _heads_major(x_BxTxKxGxH: Array) -> Array:
    """(B, T, K, G, H) -> (B, K, G*T, H): each kv head's queries as one row block."""
    b, t, k, g, h = x_BxTxKxGxH.shape
    return jnp.transpose(x_BxTxKxGxH, (0, 2, 3, 1, 4)).reshape(b, k, g * t, h)


def _tokens_major(x_BxKxMxH: Array, t: int) -> Array:
    """_heads_major's inverse, to (B, T, K*G, H)."""
    b, k, m, h = x_BxKxMxH.shape
    g = m // t
    return jnp.transpose(x_BxKxMxH.reshape(b, k, g, t, h), (0, 3, 1, 2, 4)).reshape(
        b, t, k * g, h)


def _transposed(x_BxKxMxS: Array) -> Array:
    """(B, K, S, M), in memory on CPU: XLA:CPU ran a product contracting the rows of its left
    operand (P^T dO, dS^T Q) at a fifth of its GEMM rate, and folds a plain transpose back into
    the product; a copy and a plain product took 0.65x the time. Elsewhere a transpose XLA may
    fold into the product as usual."""
    return apart_on_cpu(x_BxKxMxS, lambda x: jnp.swapaxes(x, 2, 3))


def _probs(q_BxKxMxH, k_BxKxSxH, segment_ids_BxT):
    b, kv, m, _ = q_BxKxMxH.shape
    t = k_BxKxSxH.shape[2]
    scale = np.float32(1.0 / np.sqrt(q_BxKxMxH.shape[-1]))
    scores = jnp.einsum('bkmh,bksh->bkms', q_BxKxMxH, k_BxKxSxH,
                        preferred_element_type=jnp.float32) * scale
    # Every row sees at least its own position, so its max is finite and masked entries are 0.
    scores = jnp.where(_mask(segment_ids_BxT, t), scores.reshape(b, kv, m // t, t, t), -jnp.inf)
    exp = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    return (exp / jnp.sum(exp, axis=-1, keepdims=True)).reshape(b, kv, m, t)


def _forward(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT):
    b, t, n, h = q_BxTxNxH.shape
    kv = k_BxSxKxH.shape[2]
    q = _heads_major(q_BxTxNxH.reshape(b, t, kv, n // kv, h))
    k = jnp.swapaxes(k_BxSxKxH, 1, 2)
    v = jnp.swapaxes(v_BxSxKxH, 1, 2)
    probs_BxKxMxS = _probs(q, k, segment_ids_BxT).astype(v.dtype)
    out_BxKxMxH = jnp.einsum('bkms,bksh->bkmh', probs_BxKxMxS, v)
    return _tokens_major(out_BxKxMxH, t), (q, k, v, out_BxKxMxH, probs_BxKxMxS)


@jax.custom_vjp
def causal_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array,
                     segment_ids_BxT: Array | None) -> Array:
    """softmax(q k^T / sqrt(H), causal + same-segment mask) v, GQA (K kv heads divide N)."""
    return _forward(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)[0]


def _fwd(q, k, v, segment_ids_BxT):
    out, heads_major = _forward(q, k, v, segment_ids_BxT)
    return out, (heads_major, segment_ids_BxT)


def _bwd(residuals, dout_BxTxNxH):
    (q, k, v, out, probs_BxKxMxS), segment_ids_BxT = residuals
    b, t, n, h = dout_BxTxNxH.shape
    kv = k.shape[1]
    scale = np.float32(1.0 / np.sqrt(h))
    dout = _heads_major(dout_BxTxNxH.reshape(b, t, kv, n // kv, h)).astype(v.dtype)
    dv = jnp.einsum('bksm,bkmh->bksh', _transposed(probs_BxKxMxS), dout,
                    preferred_element_type=jnp.float32)
    dprobs = jnp.einsum('bkmh,bksh->bkms', dout, v, preferred_element_type=jnp.float32)
    # sum_s P * dP = sum_h dO * O (the same number, from (M, H) arrays, not (M, S) ones).
    delta_BxKxM = jnp.einsum('bkmh,bkmh->bkm', dout.astype(jnp.float32),
                             out.astype(jnp.float32))
    dscores = (probs_BxKxMxS.astype(jnp.float32) * (dprobs - delta_BxKxM[..., None])
               * scale).astype(q.dtype)
    dq = jnp.einsum('bkms,bksh->bkmh', dscores, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum('bksm,bkmh->bksh', _transposed(dscores), q,
                    preferred_element_type=jnp.float32)
    to_tokens = lambda a, dtype: jnp.swapaxes(a, 1, 2).astype(dtype)
    return (_tokens_major(dq, t).astype(q.dtype), to_tokens(dk, k.dtype), to_tokens(dv, v.dtype),
            None)


causal_attention.defvjp(_fwd, _bwd)
