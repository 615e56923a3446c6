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
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
import torch

D, F, V, T, CHUNK = 768, 2048, 32000, 1024, 512
# (name, m, k, n, transpose the first operand, transpose the second): op(a) @ op(b) is (m, n).
CASES = [('peak 2048^3', 2048, 2048, 2048, False, False),
         ('mlp x @ W', T, D, F, False, False),
         ('mlp dy @ W^T', T, F, D, False, True),
         ('mlp x^T @ dy', D, T, F, True, False),
         ('down x @ W', T, F, D, False, False),
         ('down dy @ W^T', T, D, F, False, True),
         ('down x^T @ dy', F, T, D, True, False),
         ('qkv x @ W', T, D, D + 2 * 256, False, False),
         ('head x @ W', CHUNK, D, V, False, False),
         ('head dy @ W^T', CHUNK, V, D, False, True),
         ('head x^T @ dy', D, CHUNK, V, True, False)]


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
    for name, m, k, n, ta, tb in CASES:
        a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
        flops = 2 * m * k * n
        xa, xb = jax.numpy.asarray(a), jax.numpy.asarray(b)
        xla = flops / _median_seconds(jax.jit(_product(ta, tb)), xa, xb) / 1e9
        ref = flops / _median_seconds(_product(ta, tb), torch.from_numpy(a),
                                      torch.from_numpy(b)) / 1e9
        apart = '-'
        if ta:
            apart = f'{flops / _median_seconds(jax.jit(_product(ta, tb, True)), xa, xb) / 1e9:.0f}'
        print(f'| {name} | {m} x {k} x {n} | {xla:.0f} | {ref:.0f} | {xla / ref:.2f} | {apart} |')


if __name__ == '__main__':
    main()
