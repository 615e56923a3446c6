"""Model compile time and forward+backward throughput: scanned vs unscanned layer stack.

    python benchmarks/bench_model.py [--preset debug] [--batch 8] [--seq-len 256] [--steps 30]
                                     [--remat none] [--num-layers L]

On one device (the first of the default backend), for each layout: the time to trace + lower
and to compile ``jit(value_and_grad(loss))`` (mean next-token cross-entropy over the batch),
then ``--steps`` timed steps, the two layouts alternating step by step so that both see the
same machine load. Prints a markdown table (median step time, tokens/s, model GFLOP/s from
``LlamaConfig.flops_per_token``) with the unscanned / scanned ratios, for BENCHMARKS.md.
Parameters are identical in both layouts.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from meditron_jax import model as M  # noqa: E402
from meditron_jax import sharding as S  # noqa: E402


def loss_fn(cfg: M.LlamaConfig):
    def loss(params, tokens_BxT):
        logits = M.forward(params, cfg, tokens_BxT)
        total, count = M.cross_entropy(logits[:, :-1], tokens_BxT[:, 1:],
                                       jnp.ones_like(tokens_BxT[:, 1:]))
        return total / count
    return loss


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--preset', default='debug')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--seq-len', type=int, default=256)
    parser.add_argument('--steps', type=int, default=30)
    parser.add_argument('--remat', default='none', choices=sorted(M.REMAT_POLICIES))
    parser.add_argument('--num-layers', type=int, default=None,
                        help="override the preset's depth (compile time grows with it unscanned)")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    overrides = {} if args.num_layers is None else dict(num_layers=args.num_layers)
    base = M.preset(args.preset, remat=args.remat, **overrides)
    mesh = S.make_mesh(dict(data=1, fsdp=1, tensor=1), [device])
    stacked = jax.device_get(M.init_params(base.replace(scan_layers=True), mesh))
    tokens = np.random.default_rng(0).integers(
        0, base.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
    tokens = jax.device_put(tokens, device)
    tokens_per_step = args.batch * args.seq_len

    variants = {}
    for name, scan in (('scanned', True), ('unscanned', False)):
        cfg = base.replace(scan_layers=scan)
        params = jax.device_put(M.to_layout(stacked, cfg), device)
        step = jax.jit(jax.value_and_grad(loss_fn(cfg)))
        t0 = time.perf_counter()
        lowered = step.lower(params, tokens)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        for _ in range(2):  # warm-up: first-run allocations
            jax.block_until_ready(compiled(params, tokens))
        variants[name] = dict(compiled=compiled, params=params, lower_s=t1 - t0,
                              compile_s=t2 - t1, times=[])

    losses = {}
    for _ in range(args.steps):
        for name, v in variants.items():
            t0 = time.perf_counter()
            loss, _ = jax.block_until_ready(v['compiled'](v['params'], tokens))
            v['times'].append(time.perf_counter() - t0)
            losses[name] = float(loss)

    print(f'# {args.preset} preset, {base.num_layers} layers ({base.num_params():,} params), batch {args.batch} x '
          f'{args.seq_len} tokens, forward+backward, remat={args.remat}, '
          f'{args.steps} timed steps each')
    print(f'# jax {jax.__version__}, {device.platform} device {device.device_kind!r}, '
          f'{os.cpu_count()} host cores, {platform.processor() or platform.machine()}')
    print('# loss: ' + ', '.join(f'{k} {v:.6f}' for k, v in losses.items()))
    print()
    flops_per_step = base.flops_per_token(args.seq_len) * tokens_per_step
    print('| stack | trace+lower s | compile s | step ms (median) | step ms (min) | tokens/s '
          '| model GFLOP/s |')
    print('|---|---:|---:|---:|---:|---:|---:|')
    rows = {}
    for name, v in variants.items():
        median = statistics.median(v['times'])
        rows[name] = dict(lower=v['lower_s'], compile=v['compile_s'], median=median,
                          min=min(v['times']), tps=tokens_per_step / median)
        r = rows[name]
        print(f"| {name} | {r['lower']:.2f} | {r['compile']:.2f} | {1e3 * r['median']:.1f} | "
              f"{1e3 * r['min']:.1f} | {r['tps']:,.0f} | {flops_per_step / median / 1e9:.1f} |")
    s, u = rows['scanned'], rows['unscanned']
    print(f"| unscanned / scanned | {u['lower'] / s['lower']:.2f}x | "
          f"{u['compile'] / s['compile']:.2f}x | {u['median'] / s['median']:.2f}x | "
          f"{u['min'] / s['min']:.2f}x | {u['tps'] / s['tps']:.2f}x | |")


if __name__ == '__main__':
    main()
