"""TPU attention: JAX's Pallas splash-attention kernel (``model.attention = 'splash'``).

Splash attention is the TPU flash attention: blockwise, online softmax, no (T, T) score tensor
in memory, and whole blocks skipped where the causal mask is empty (about half the work at
T = 2048). It takes what model.attention takes (causal, segment ids for packed documents,
grouped-query heads) and returns the same values, computed another way.

What the kernel wants, and what we do about it (jax 0.10.2,
jax.experimental.pallas.ops.tpu.splash_attention):
- One sequence, head-major: q (N, T, H), k and v (K, T, H), segment ids (T,). We transpose our
  (B, T, N, H) layout and ``vmap`` over the batch.
- GQA: ``make_splash_mha`` reads kv head ``n // (N / K)`` for query head n, our grouping.
- No softmax scale: q is multiplied by 1/sqrt(H) first, the scale of the xla path.
- Block sizes are multiples of 128 that divide T (the kernel's lane width); up to 512 a block.
- The mask is static (causal, per head), turned into block tables by numpy at trace time.
- The kernel is a custom call that XLA cannot partition: under a mesh it runs inside
  ``shard_map``, batch over the data-parallel axes and heads over ``tensor``, as the logical
  axis table of sharding.py says for the activations; each device then runs the kernel on its
  own rows and heads with no communication (attention is independent per row and head).
- Off TPU the kernel runs in Pallas's interpret mode (slow, exact): CPU tests compare it with
  the xla attention. The platform is the mesh's devices' when a mesh is set (a planning process
  compiles for TPU devices while ``jax.default_backend()`` is 'cpu'), else the default backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from meditron_jax import sharding

Array = jax.Array

LANES = 128          # the kernel's blocks are multiples of the TPU vector lane width
MAX_BLOCK = 512      # larger blocks amortise the per-block overhead; 512 is MaxText's default


def block_size(seq_len: int) -> int:
    """The largest multiple of 128 up to MAX_BLOCK that divides seq_len."""
    if seq_len % LANES:
        raise ValueError(f"attention='splash' needs a sequence length that is a multiple of "
                         f'{LANES} (the TPU kernel\'s block width), got {seq_len}; set '
                         f"data.seq_len to a multiple of {LANES} or use model.attention='xla'")
    return max(b for b in range(LANES, MAX_BLOCK + 1, LANES) if seq_len % b == 0)


def platform() -> str:
    """The platform the current computation is compiled for: the mesh's devices' if a mesh
    with devices is set, else JAX's default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def _kernel(num_heads: int, seq_len: int, interpret: bool):
    """The splash kernel for one sequence of ``num_heads`` query heads, built at each trace: its
    block tables are arrays of the trace that made them (jax caches the numpy mask processing
    per shape, so rebuilding costs little)."""
    b = block_size(seq_len)
    blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                               block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                               block_kv_dq=b)
    mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len))] * num_heads)
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _local_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array,
                     segment_ids_BxT: Array, interpret: bool) -> Array:
    """The kernel over the rows and heads at hand (one device's shard under a mesh)."""
    _, t, n, h = q_BxTxNxH.shape
    if k_BxSxKxH.shape[1] != t:
        raise ValueError(f"attention='splash' is self-attention: q has {t} positions, k "
                         f'{k_BxSxKxH.shape[1]}')
    kernel = _kernel(n, t, interpret)
    scale = jnp.asarray(1.0 / np.sqrt(h), q_BxTxNxH.dtype)
    q_BxNxTxH = jnp.swapaxes(q_BxTxNxH * scale, 1, 2)
    k_BxKxSxH = jnp.swapaxes(k_BxSxKxH, 1, 2)
    v_BxKxSxH = jnp.swapaxes(v_BxSxKxH, 1, 2)
    one_row = lambda q, k, v, seg: kernel(q, k, v, segment_ids=splash.SegmentIds(q=seg, kv=seg))
    out_BxNxTxH = jax.vmap(one_row)(q_BxNxTxH, k_BxKxSxH, v_BxKxSxH, segment_ids_BxT)
    return jnp.swapaxes(out_BxNxTxH, 1, 2)


def splash_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array,
                     segment_ids_BxT: Array | None, *, interpret: bool | None = None) -> Array:
    """Causal grouped-query attention with JAX's splash kernel; with segment ids, no token
    attends across documents (the values of model.attention's xla path).

    ``interpret=None``: interpret mode unless compiling for TPU (see ``platform``)."""
    b, t, n, _ = q_BxTxNxH.shape
    kv = k_BxSxKxH.shape[2]
    if n % kv:
        raise ValueError(f"attention='splash': {kv} kv heads do not divide {n} query heads")
    if interpret is None:
        interpret = platform() != 'tpu'
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.zeros((b, t), jnp.int32)    # one document a row
    segment_ids_BxT = segment_ids_BxT.astype(jnp.int32)
    local = functools.partial(_local_attention, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)
    heads = sharding.logical_to_spec(('batch', 'length', 'act_heads', None))
    kv_heads = sharding.logical_to_spec(('batch', 'length', 'act_kv_heads', None))
    rows = sharding.logical_to_spec(('batch', 'length'))
    # shard_map needs whole shards: name the dimension and mesh axes that do not divide.
    sharding.check_divisible("attention='splash' q", q_BxTxNxH.shape, heads, mesh)
    sharding.check_divisible("attention='splash' k/v", k_BxSxKxH.shape, kv_heads, mesh)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(heads, kv_heads, kv_heads, rows),
                            out_specs=heads, check_vma=False)
    return sharded(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)

