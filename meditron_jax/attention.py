"""Attention: which implementation runs where, and the three attention computations the model
uses (causal self-attention over packed documents, cached attention for prefill, the decode
step's attention over the head-major cache).

Implementations: 'xla' (attention_xla.py, portable), 'cudnn' (cuDNN flash attention through
``jax.nn.dot_product_attention``, GPU with bf16/f16 only), 'splash' (the Pallas TPU kernel,
splash.py). ``resolve_attention`` decides from the platform being compiled for, which is not
``jax.default_backend()`` in a planning process (see ``compile_platform``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax import attention_xla, sharding, splash
from meditron_jax.model_config import ATTENTION_IMPLEMENTATIONS, LlamaConfig

log = logging.getLogger(__name__)

Array = jax.Array

_warned_attention: set[str] = set()
_CUDNN_DTYPES = ('bfloat16', 'float16')


_COMPILE_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    'compile_platform', default=None)


@contextlib.contextmanager
def compile_platform(platform: str):
    """Traces inside see ``platform`` as the one they compile for: a planning process compiles
    for compile-only GPUs or TPUs while its backend is 'cpu' (and a mesh's devices cannot be
    read inside jit)."""
    token = _COMPILE_PLATFORM.set(platform)
    try:
        yield
    finally:
        _COMPILE_PLATFORM.reset(token)


def current_platform() -> str:
    """The platform being compiled for: ``compile_platform``'s, else the default backend's."""
    return _COMPILE_PLATFORM.get() or jax.default_backend()


def _fall_back(implementation: str, reason: str) -> str:
    if reason not in _warned_attention:
        log.warning('attention=%s asked for but %s: falling back to the xla implementation',
                    implementation, reason)
        _warned_attention.add(reason)
    return 'xla'


def resolve_attention(implementation: str, dtype=jnp.bfloat16, platform: str | None = None) -> str:
    """The implementation to run on ``platform`` ('cpu', 'gpu', 'tpu'; None: ``current_platform()``,
    the default backend unless inside ``compile_platform``).

    'cudnn' only on gpu with a bfloat16/float16 compute dtype (cuDNN flash attention rejects
    float32); on tpu a 'cudnn' config runs the Pallas 'splash' kernel instead (said in the log);
    'splash' only on tpu. Anything else falls back to 'xla' with a logged warning, once per
    reason. Call it where the mesh is known (train, plan, load) so that the config names what
    runs; ``attention()`` calls it again at trace time, which changes nothing then."""
    platform = current_platform() if platform is None else platform
    if implementation == 'cudnn' and platform == 'tpu':
        if 'splash' not in ATTENTION_IMPLEMENTATIONS:
            return _fall_back(implementation, 'the platform is tpu and this build has no '
                              'splash attention')
        if 'cudnn->splash' not in _warned_attention:
            log.info('attention=cudnn on tpu: running the Pallas splash attention kernel '
                     '(attention=splash) instead')
            _warned_attention.add('cudnn->splash')
        return 'splash'
    if implementation == 'splash' and platform != 'tpu':
        return _fall_back(implementation, f'the platform is {platform!r}, not tpu')
    if implementation != 'cudnn':
        return implementation
    if jnp.dtype(dtype).name not in _CUDNN_DTYPES:
        return _fall_back(implementation, f'the compute dtype is {jnp.dtype(dtype).name}, and '
                          f'cuDNN flash attention needs one of {_CUDNN_DTYPES}')
    if platform != 'gpu':
        return _fall_back(implementation, f'the backend is {platform!r}, not gpu')
    return 'cudnn'


def resolve_config_attention(cfg: LlamaConfig, mesh) -> LlamaConfig:
    """``cfg`` with the attention that runs on the platform of ``mesh``'s devices."""
    return cfg.replace(attention=resolve_attention(cfg.attention, cfg.compute_dtype,
                                                   sharding.mesh_platform(mesh)))


def attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array,
              segment_ids_BxT: Array | None, implementation: str = 'xla') -> Array:
    """Causal grouped-query attention; with segment ids, no token attends across documents."""
    # An explicit 'splash' is run as asked (interpret mode when not compiling for TPU: tests);
    # anything else is resolved for the platform being compiled for ('cudnn' on TPU -> splash).
    if implementation != 'splash':
        implementation = resolve_attention(implementation, q_BxTxNxH.dtype)
    if implementation == 'splash':
        return splash.splash_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)
    if implementation == 'xla':
        # The same maths as jax's xla implementation, laid out for XLA:CPU, with a fused
        # softmax backward (attention_xla.py).
        return attention_xla.causal_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)
    mask = None
    if segment_ids_BxT is not None:
        mask = (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask, is_causal=True,
        implementation=implementation)


def cached_attention(q_BxTxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array,
                     positions_BxT: Array, implementation: str = 'xla') -> Array:
    """T new queries over a cache of S slots, slot j holding position j of its row: a query at
    position p sees slots 0..p. The mask is explicit because ``is_causal=True`` aligns the
    triangle top-left, which is wrong for fewer queries than keys (one query in a decode step)."""
    slots_S = jnp.arange(k_BxSxKxH.shape[1])
    mask_Bx1xTxS = (slots_S[None, None, :] <= positions_BxT[:, :, None])[:, None]
    if implementation == 'splash':  # the kernel is self-attention over whole 128-blocks only
        implementation = 'xla'
    return jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS,
        implementation=resolve_attention(implementation, q_BxTxNxH.dtype))


def step_attention(q_BxTxNxH: Array, k_BxKxSxH: Array, v_BxKxSxH: Array,
                   positions_BxT: Array) -> Array:
    """cached_attention over the head-major cache, written out (as jax's xla implementation
    does it: scaled scores, masked, float32 softmax) so that no operand is transposed."""
    b, t, n, h = q_BxTxNxH.shape
    kv = k_BxKxSxH.shape[1]
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum('btkgh,bksh->bkgts', q_BxTxKxGxH, k_BxKxSxH,
                        preferred_element_type=jnp.float32) / np.sqrt(h).astype(np.float32)
    slots_S = jnp.arange(k_BxKxSxH.shape[2])
    mask_Bx1x1xTxS = (slots_S[None, None, :] <= positions_BxT[:, :, None])[:, None, None]
    scores = jnp.where(mask_Bx1x1xTxS, scores, jnp.finfo(jnp.float32).min)
    probs_BxKxGxTxS = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxH.dtype)
    out_BxKxGxTxH = jnp.einsum('bkgts,bksh->bkgth', probs_BxKxGxTxS, v_BxKxSxH)
    return out_BxKxGxTxH.reshape(b, n, t, h).transpose(0, 2, 1, 3)
