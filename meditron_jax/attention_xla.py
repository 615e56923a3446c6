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
  made several passes over the scores and saved the mask as well);
- the queries go in blocks, each against the keys up to its own end (``MIN_BLOCK``): the masked
  score blocks above the diagonal are not computed (-2.8% of the small model's step on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax.layers import apart_on_cpu

Array = jax.Array


# Queries are taken in blocks of at least MIN_BLOCK positions (at most MAX_BLOCKS blocks, a
# whole number of them), each against the keys up to its own end only: the score blocks above
# the diagonal, all masked, are never computed (T=256 in 2 blocks: 3/4 of the scores; 4 blocks:
# 5/8).
MIN_BLOCK = 128
MAX_BLOCKS = 4


def _num_blocks(t: int) -> int:
    for n in range(min(MAX_BLOCKS, t // MIN_BLOCK), 1, -1):
        if t % n == 0:
            return n
    return 1


def _mask(segment_ids_BxT: Array | None, start: int, rows: int, keys: int) -> Array:
    """(B or 1, 1, 1, rows, keys) bool for the queries at start..start+rows-1 against the keys at
    0..keys-1: causal, and within one document when segment ids are given."""
    causal = np.arange(start, start + rows)[:, None] >= np.arange(keys)[None, :]
    if segment_ids_BxT is None:
        return jnp.asarray(causal)[None, None, None]
    same = (segment_ids_BxT[:, start:start + rows, None]
            == segment_ids_BxT[:, None, :keys])
    return (same & causal)[:, None, None]


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


def _probs(q_BxKxMxH, k_BxKxSxH, mask):
    b, kv, m, _ = q_BxKxMxH.shape
    rows, keys = mask.shape[-2:]
    scale = np.float32(1.0 / np.sqrt(q_BxKxMxH.shape[-1]))
    scores = jnp.einsum('bkmh,bksh->bkms', q_BxKxMxH, k_BxKxSxH,
                        preferred_element_type=jnp.float32) * scale
    # Every row sees at least its own position, so its max is finite and masked entries are 0.
    scores = jnp.where(mask, scores.reshape(b, kv, m // rows, rows, keys), -jnp.inf)
    exp = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    return (exp / jnp.sum(exp, axis=-1, keepdims=True)).reshape(b, kv, m, keys)


def _query_block(x_BxTxNxH: Array, i: int, rows: int, kv: int) -> Array:
    """Query block i (positions i*rows..), head-major (B, K, G*rows, H)."""
    b, _, n, h = x_BxTxNxH.shape
    return _heads_major(x_BxTxNxH[:, i * rows:(i + 1) * rows].reshape(b, rows, kv, n // kv, h))


def _forward(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT):
    t = q_BxTxNxH.shape[1]
    kv = k_BxSxKxH.shape[2]
    rows = t // _num_blocks(t)
    k = jnp.swapaxes(k_BxSxKxH, 1, 2)
    v = jnp.swapaxes(v_BxSxKxH, 1, 2)
    outs, blocks = [], []
    for i in range(t // rows):
        keys = (i + 1) * rows
        q = _query_block(q_BxTxNxH, i, rows, kv)
        probs_BxKxMxS = _probs(q, k[:, :, :keys], _mask(segment_ids_BxT, i * rows, rows, keys)
                               ).astype(v.dtype)
        out_BxKxMxH = jnp.einsum('bkms,bksh->bkmh', probs_BxKxMxS, v[:, :, :keys])
        outs.append(_tokens_major(out_BxKxMxH, rows))
        blocks.append((q, out_BxKxMxH, probs_BxKxMxS))
    return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0], (k, v, blocks)


@jax.custom_vjp
def causal_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array,
                     segment_ids_BxT: Array | None) -> Array:
    """softmax(q k^T / sqrt(H), causal + same-segment mask) v, GQA (K kv heads divide N)."""
    return _forward(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)[0]


def _fwd(q, k, v, segment_ids_BxT):
    out, saved = _forward(q, k, v, segment_ids_BxT)
    return out, (saved, segment_ids_BxT)


def _bwd(residuals, dout_BxTxNxH):
    (k, v, blocks), segment_ids_BxT = residuals
    t = dout_BxTxNxH.shape[1]
    kv, s = k.shape[1], k.shape[2]
    rows = t // len(blocks)
    scale = np.float32(1.0 / np.sqrt(k.shape[-1]))
    dqs, dks, dvs = [], [], []
    for i, (q, out, probs_BxKxMxS) in enumerate(blocks):
        keys = (i + 1) * rows
        k_i, v_i = k[:, :, :keys], v[:, :, :keys]
        dout = _query_block(dout_BxTxNxH, i, rows, kv).astype(v.dtype)
        dv = jnp.einsum('bksm,bkmh->bksh', _transposed(probs_BxKxMxS), dout,
                        preferred_element_type=jnp.float32)
        dprobs = jnp.einsum('bkmh,bksh->bkms', dout, v_i, preferred_element_type=jnp.float32)
        # sum_s P * dP = sum_h dO * O (the same number, from (M, H) arrays, not (M, S) ones).
        delta_BxKxM = jnp.einsum('bkmh,bkmh->bkm', dout.astype(jnp.float32),
                                 out.astype(jnp.float32))
        dscores = (probs_BxKxMxS.astype(jnp.float32) * (dprobs - delta_BxKxM[..., None])
                   * scale).astype(q.dtype)
        dq = jnp.einsum('bkms,bksh->bkmh', dscores, k_i, preferred_element_type=jnp.float32)
        dk = jnp.einsum('bksm,bkmh->bksh', _transposed(dscores), q,
                        preferred_element_type=jnp.float32)
        dqs.append(_tokens_major(dq, rows).astype(q.dtype))
        # Block i's keys are the first (i + 1) * rows: zero beyond (XLA fuses the pads into the sum).
        pad = ((0, 0), (0, 0), (0, s - keys), (0, 0))
        dks.append(jnp.pad(dk, pad))
        dvs.append(jnp.pad(dv, pad))
    to_tokens = lambda parts, dtype: jnp.swapaxes(sum(parts), 1, 2).astype(dtype)
    dq = jnp.concatenate(dqs, axis=1) if len(dqs) > 1 else dqs[0]
    return dq, to_tokens(dks, k.dtype), to_tokens(dvs, v.dtype), None


causal_attention.defvjp(_fwd, _bwd)
