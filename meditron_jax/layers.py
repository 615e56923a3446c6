"""The model's parameter-free array functions: ``contract`` (a linear map as one dot_general)
and ``contract_shared`` (several of one input), their 2-D products on CPU through
``matmul_cpu`` (the kernel's gradient from a copy of x^T); RMS normalisation, rotary embeddings,
SwiGLU with a hand-written backward and ``swiglu_down`` (SwiGLU and the down projection,
recomputing SwiGLU's output for the backward). model.py builds the layers on them.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax import sharding

Array = jax.Array


def contract(equation: str, x: Array, kernel: Array) -> Array:
    """A batch-free einsum as one dot_general contracting in the input's dimension order.

    jnp.einsum orders the contracted dimensions its own way ('btnh,nhd->btd' contracts (h, n)),
    and XLA:CPU then transposed the whole kernel to match, on every call (in a decode step, the
    o projection's weights at each layer each step)."""
    inputs, out = equation.split('->')
    lhs, rhs = inputs.split(',')
    summed = [c for c in lhs if c in rhs]
    if sorted(c for c in lhs + rhs if c not in summed) != sorted(out) or any(
            c in out for c in summed):
        raise ValueError(f'contract: {equation!r} is not a batch-free contraction')
    # The free dimensions that lead both lhs and out ('bt' of 'btd,df->btf') are flattened into
    # one token dimension around the dot: XLA:CPU lowered the weight gradient of a dot with two
    # such dimensions badly (the MLP's gradient at batch 4 x 256 took 175 ms as 3-D dots, 98 ms
    # on 2-D tokens). The reshape keeps the batch sharding (rows split evenly over data/fsdp).
    lead = 0
    while (lead < len(lhs) and lead < len(out) and lhs[lead] == out[lead]
           and lhs[lead] not in rhs):
        lead += 1
    if lead > 1:
        lead_shape = x.shape[:lead]
        z = next(ch for ch in 'zyxwvu' if ch not in equation)
        y = contract(z + lhs[lead:] + ',' + rhs + '->' + z + out[lead:],
                     x.reshape(-1, *x.shape[lead:]), kernel)
        return y.reshape(*lead_shape, *y.shape[1:])
    # On CPU, a contraction over several kernel dimensions or into several ('znh,nhd->zd',
    # 'zd,dnh->znh': the attention projections) is a plain 2-D matrix product on reshaped
    # operands: as a 3-D dot_general XLA:CPU copied each attention kernel to a transposed
    # layout for its gradient, every layer every step (2.5% of a small model's step). The
    # GPU/TPU programs keep the dot_general (the 2-D form cost XLA:GPU 0.5 GiB a GPU at 7B).
    free_rhs = [c for c in rhs if c not in summed]
    if (lead == 1 and lhs == lhs[0] + ''.join(summed) and rhs == ''.join(summed + free_rhs)
            and out == lhs[0] + ''.join(free_rhs) and (len(summed) > 1 or len(free_rhs) > 1)):
        k = len(summed)
        dims0 = (tuple(range(1, 1 + k)), tuple(range(k)))

        def two_d(x, kernel):
            y = matmul_cpu(x.reshape(x.shape[0], -1),
                           kernel.reshape(math.prod(kernel.shape[:k]), -1))
            return y.reshape(x.shape[0], *kernel.shape[k:])
        return jax.lax.platform_dependent(
            x, kernel, cpu=two_d,
            default=lambda x, kernel: jax.lax.dot_general(x, kernel, (dims0, ((), ()))))
    if len(lhs) == len(rhs) == 2 and lhs[1] == rhs[0] and out == lhs[0] + rhs[1]:
        # 'zd,df->zf' (the MLP's gate and up): on CPU, matmul_cpu.
        return jax.lax.platform_dependent(x, kernel, cpu=matmul_cpu, default=jnp.matmul)
    dims = (tuple(lhs.index(c) for c in summed), tuple(rhs.index(c) for c in summed))
    y = jax.lax.dot_general(x, kernel, (dims, ((), ())))
    natural = [c for c in lhs if c not in summed] + [c for c in rhs if c not in summed]
    return y if natural == list(out) else jnp.transpose(y, [natural.index(c) for c in out])


@jax.custom_vjp
def matmul_cpu(x_ZxD: Array, kernel_DxF: Array) -> Array:
    """x @ kernel, 2-D, for CPU programs: its backward forms the kernel's gradient from x^T as a
    copy of its own (an optimization barrier), x^T @ dy. Left to autodiff, the gradient was one
    dot contracting the rows of both operands, which XLA:CPU ran through its generic dot, not
    YNNPACK's: at the MLP's (1024 x 768) x (1024 x 2048), 25.3 ms against 19.0 ms with x^T a copy
    (2-core AMD EPYC). In-process A/B of the bench_vs_torch step, the gate and up projections:
    -3.1% small, -5.1% llama_100m (scanned), -6.7% llama_100m (unscanned); then the q/k/v and o
    projections as well: a further -0.7% small, -2.4% llama_100m. Not the down projection's,
    whose x^T would be swiglu's recomputed output (+3.9%)."""
    return jnp.matmul(x_ZxD, kernel_DxF)


def _matmul_cpu_fwd(x, kernel):
    return jnp.matmul(x, kernel), (x, kernel)


def _matmul_cpu_bwd(residuals, dy_ZxF):
    x, kernel = residuals
    x_DxZ = jax.lax.optimization_barrier(x.T)
    return (jnp.matmul(dy_ZxF, kernel.T).astype(x.dtype),
            jnp.matmul(x_DxZ, dy_ZxF).astype(kernel.dtype))


matmul_cpu.defvjp(_matmul_cpu_fwd, _matmul_cpu_bwd)


def contract_shared(x_ZxD: Array, kernels: list[Array]) -> list[Array]:
    """[contract('zd,d...->z...', x, kernel) for each kernel]: linear maps of one input (the q, k
    and v projections).

    On CPU they are one 2-D matrix product with the kernels side by side, (D, sum of their
    sizes), split after: as separate products each kept a copy of x for its gradient of its own
    (a scanned stack then copies each into and out of its stacked residuals). GPU/TPU keep one
    dot_general a kernel."""
    def cpu(x, *kernels):
        flat = [k.reshape(k.shape[0], -1) for k in kernels]
        y = matmul_cpu(x, jnp.concatenate(flat, axis=1))
        ends = list(itertools.accumulate(f.shape[1] for f in flat))[:-1]
        return [part.reshape(x.shape[0], *k.shape[1:])
                for part, k in zip(jnp.split(y, ends, axis=1), kernels)]

    def default(x, *kernels):
        return [jax.lax.dot_general(x, k, (((1,), (0,)), ((), ()))) for k in kernels]
    return jax.lax.platform_dependent(x_ZxD, *kernels, cpu=cpu, default=default)


def rms_norm(x: Array, scale: Array, eps: float, dtype) -> Array:
    """scale * x / rms(x) over the last axis, computed in float32, returned in ``dtype``.

    On CPU its backward keeps only x and the (B, T, 1) reciprocal rms and recomputes x / rms:
    left to autodiff, the normalised x was saved as well, a (B, T, D) buffer a norm that a
    scanned stack copies into and out of its stacked residuals (-1% of the small and llama_100m
    steps, in-process A/B). GPU/TPU keep autodiff's form, which their remat policies see into."""
    return jax.lax.platform_dependent(
        x, scale, cpu=functools.partial(_rms_norm_saving_input, eps, dtype),
        default=functools.partial(_rms_norm, eps, dtype))


def _rms_norm_fwd(eps, dtype, x, scale):
    """(the norm, the residuals its CPU backward keeps: x, scale and the reciprocal rms)."""
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * (x32 * r).astype(dtype), (x, scale, r)


def _rms_norm(eps, dtype, x, scale):
    return _rms_norm_fwd(eps, dtype, x, scale)[0]


_rms_norm_saving_input = jax.custom_vjp(_rms_norm, nondiff_argnums=(0, 1))


def _rms_norm_bwd(eps, dtype, residuals, dy):
    x, scale, r = residuals
    x_hat = x.astype(jnp.float32) * r
    dy = dy.astype(jnp.float32)
    dscale = jnp.sum(dy * x_hat, axis=tuple(range(x.ndim - 1)))
    dx_hat = dy * scale.astype(jnp.float32)
    dx = r * (dx_hat - x_hat * jnp.mean(dx_hat * x_hat, axis=-1, keepdims=True))
    return dx.astype(x.dtype), dscale.astype(scale.dtype)


_rms_norm_saving_input.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rope(x_BxTxNxH: Array, positions_BxT: Array, theta: float, max_len: int | None = None
         ) -> Array:
    """Rotary embedding, rotate-half layout (HF): pairs are (i, i + H/2).

    With ``max_len`` (the model's max_seq_len), on CPU the cosines and sines are gathered by
    position from a (max_len, H/2) table computed once, when tracing: computed in the program,
    XLA:CPU fused them into the rotation and evaluated cos and sin again for every element of q
    and k, once per head (-2.9% of the small model's step, -2.6% at llama_100m, in-process A/B;
    the same losses bit for bit). A position at or past max_len reads NaN there. GPU/TPU compute
    them in the program."""
    head_dim = x_BxTxNxH.shape[-1]
    computed = functools.partial(_rope_cos_sin, head_dim, theta)
    if max_len is None:
        cos, sin = computed(positions_BxT)
    else:
        cos, sin = jax.lax.platform_dependent(
            positions_BxT, cpu=functools.partial(_rope_cos_sin_gathered, head_dim, theta, max_len),
            default=computed)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


def _rope_cos_sin(head_dim: int, theta: float, positions_BxT: Array) -> tuple[Array, Array]:
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq
    return jnp.cos(angles_BxTxH2), jnp.sin(angles_BxTxH2)


@functools.lru_cache(maxsize=16)
def _rope_table(head_dim: int, theta: float, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) of positions 0..max_len-1, (max_len, H/2): the same XLA operations as
    _rope_cos_sin, run once on the default backend (a constant of the program)."""
    with jax.ensure_compile_time_eval():
        cos, sin = _rope_cos_sin(head_dim, theta, jnp.arange(max_len)[None])
        return np.asarray(cos)[0], np.asarray(sin)[0]


def _rope_cos_sin_gathered(head_dim: int, theta: float, max_len: int, positions_BxT: Array
                           ) -> tuple[Array, Array]:
    return tuple(jnp.take(table, positions_BxT, axis=0, mode='fill', fill_value=jnp.nan)
                 for table in _rope_table(head_dim, theta, max_len))


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """silu(gate) * up, whose backward keeps gate and up only and recomputes the sigmoid in the
    pass that forms both gradients. Left to autodiff, silu(gate) and its sigmoid were each saved
    as a (B, T, F) buffer of its own (XLA:CPU: a pass over memory each, forward and back)."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, dh):
    gate, up = residuals
    g = gate.astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    dh = dh.astype(jnp.float32)
    dgate = dh * up.astype(jnp.float32) * sig * (1 + g * (1 - sig))
    return dgate.astype(gate.dtype), (dh * g * sig).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@jax.custom_vjp
def swiglu_down(gate_BxTxF: Array, up_BxTxF: Array, down_FxD: Array) -> Array:
    """swiglu(gate, up) @ down, whose backward keeps gate, up and the kernel and recomputes
    swiglu's output (one elementwise pass) where autodiff saved it for the kernel's gradient: a
    (B, T, F) buffer a layer, which a scanned stack copied into and out of its stacked residuals
    (-2.3% of the small model's scanned CPU step; the v5p 7B plan, remat none, 60.1 -> 53.3 GiB a
    chip; the H100 plan, remat=save_dots, unchanged)."""
    return _swiglu_down_fwd(gate_BxTxF, up_BxTxF, down_FxD)[0]


def _mlp_hidden(gate, up):
    return sharding.constrain(swiglu(gate, up), ('batch', 'length', 'act_mlp'))


def _swiglu_down_fwd(gate, up, down):
    return contract('btf,fd->btd', _mlp_hidden(gate, up), down), (gate, up, down)


def _swiglu_down_bwd(residuals, dy_BxTxD):
    gate, up, down = residuals
    h = _mlp_hidden(gate, up)
    dy = dy_BxTxD.reshape(-1, dy_BxTxD.shape[-1])
    dh = jnp.matmul(dy, down.T).reshape(h.shape)
    dgate, dup = _swiglu_bwd((gate, up), dh)
    return dgate, dup, jnp.matmul(h.reshape(-1, h.shape[-1]).T, dy).astype(down.dtype)


swiglu_down.defvjp(_swiglu_down_fwd, _swiglu_down_bwd)


def apart_on_cpu(x: Array, f=lambda a: a) -> Array:
    """f(x) behind an optimization barrier when compiling for CPU; on GPU and TPU plain f(x),
    which XLA fuses or folds as usual.

    What the barrier does on XLA:CPU, as checked in the optimised HLO: algebraic simplification
    no longer folds a transpose f back into the product that consumes it (the attention's P^T
    and dS^T, the loss's x^T stay copies of their own), and XLA's loop fusion keeps f(x) a
    buffer. It is not a guarantee against every fusion: YNNPACK's fusion pass, which runs
    later, was seen fusing across it."""
    return jax.lax.platform_dependent(
        x, cpu=lambda a: jax.lax.optimization_barrier(f(a)), default=f)
