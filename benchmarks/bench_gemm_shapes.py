"""XLA:CPU's float32 GEMM against torch's (MKL) at the products of the bench_vs_torch step.

    python benchmarks/bench_gemm_shapes.py

Each product is jitted on its own (XLA) and run eagerly (torch, 2 threads), on the same random
operands, in the orientation the step uses: forward ``x @ W``, input gradient ``dy @ W^T``,
weight gradient ``x^T @ dy`` (contracting the rows of both). Prints GFLOP/s (median of 10 runs
after a warm-up) and the ratio XLA / torch, side by side in one run. For the weight gradients
a last column gives XLA's rate with x^T a buffer of its own (behind an optimization barrier, as
``layers.matmul_cpu`` forms it): XLA:CPU runs the product contracting the rows of both operands
through its generic dot, a plain product through YNNPACK. Shapes: llama_100m's
(D 768, F 2048, V 32,000, 1,024 tokens; the loss's chunks of 512 rows) and a 2048^3 peak.

A last line adds the products up as one llama_100m step runs them (10 layers: gate and up twice
each, down, q/k/v as one product, o; the head in its two chunks), each at the rate measured for it
here, the kernels' gradients at the rate of the form the step uses (x^T a copy but for the down
projection): what the step's projections and head cost at XLA's rate and at torch's. Attention's
batched products (about 5% of the FLOPs) are not in it.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
import torch

D, F, V, T, CHUNK, LAYERS = 768, 2048, 32000, 1024, 512, 10
QKV = D + 2 * 256
# (name, m, k, n, transpose the first operand, transpose the second, how many a llama_100m step
# runs): op(a) @ op(b) is (m, n).
CASES = [('peak 2048^3', 2048, 2048, 2048, False, False, 0),
         ('mlp x @ W', T, D, F, False, False, 2 * LAYERS),
         ('mlp dy @ W^T', T, F, D, False, True, 2 * LAYERS),
         ('mlp x^T @ dy', D, T, F, True, False, 2 * LAYERS),
         ('down x @ W', T, F, D, False, False, LAYERS),
         ('down dy @ W^T', T, D, F, False, True, LAYERS),
         ('down x^T @ dy', F, T, D, True, False, LAYERS),
         ('qkv x @ W', T, D, QKV, False, False, LAYERS),
         ('qkv dy @ W^T', T, QKV, D, False, True, LAYERS),
         ('qkv x^T @ dy', D, T, QKV, True, False, LAYERS),
         ('o x @ W', T, D, D, False, False, LAYERS),
         ('o dy @ W^T', T, D, D, False, True, LAYERS),
         ('o x^T @ dy', D, T, D, True, False, LAYERS),
         ('head x @ W', CHUNK, D, V, False, False, T // CHUNK),
         ('head dy @ W^T', CHUNK, V, D, False, True, T // CHUNK),
         ('head x^T @ dy', D, CHUNK, V, True, False, T // CHUNK)]
# The kernel gradients the step forms from autodiff's product (layers.matmul_cpu is not used).
AUTODIFF_FORM = ('down x^T @ dy',)


def _median_seconds(f, *args, reps: int = 10) -> float:
    for _ in range(2):                  # warm-up: compile, and the first calls' page faults
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _product(ta: bool, tb: bool, apart: bool = False):
    op = (lambda a: jax.lax.optimization_barrier(a.T)) if apart else (lambda a: a.T)
    return lambda a, b: (op(a) if ta else a) @ (b.T if tb else b)


def main() -> None:
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    print('| product | m x k x n | XLA GFLOP/s | torch GFLOP/s | XLA / torch '
          '| XLA GFLOP/s, x^T a copy |')
    print('|---|---|---:|---:|---:|---:|')
    step_xla = step_torch = step_gflop = 0.0
    for name, m, k, n, ta, tb, count in CASES:
        a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
        flops = 2 * m * k * n
        xa, xb = jax.numpy.asarray(a), jax.numpy.asarray(b)
        xla = flops / _median_seconds(jax.jit(_product(ta, tb)), xa, xb) / 1e9
        ref = flops / _median_seconds(_product(ta, tb), torch.from_numpy(a),
                                      torch.from_numpy(b)) / 1e9
        apart, in_step = '-', xla
        if ta:
            copied = flops / _median_seconds(jax.jit(_product(ta, tb, True)), xa, xb) / 1e9
            apart = f'{copied:.0f}'
            in_step = xla if name in AUTODIFF_FORM else copied
        print(f'| {name} | {m} x {k} x {n} | {xla:.0f} | {ref:.0f} | {xla / ref:.2f} | {apart} |')
        step_gflop += count * flops / 1e9
        step_xla += count * flops / 1e9 / in_step
        step_torch += count * flops / 1e9 / ref
    print(f'\nllama_100m step, projections + head ({step_gflop:.0f} GFLOP) at these rates: '
          f'XLA {step_xla * 1e3:,.0f} ms, torch {step_torch * 1e3:,.0f} ms '
          f'(XLA / torch time {step_xla / step_torch:.2f})')


if __name__ == '__main__':
    main()
