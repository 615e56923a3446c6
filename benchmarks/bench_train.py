"""Training-loop figures on this machine: tokens/s and MFU, loop overhead, checkpoint blocking.

    python benchmarks/bench_train.py                       # debug and ~100M models, ~5 min
    python benchmarks/bench_train.py --presets debug --steps 40

For each model, in one process:
  1. the real loop, ``train.train()``, on the shipped corpus (prepared once into a temp dir),
     checkpointing every ``--ckpt-every`` steps; its metrics.jsonl gives the step time of every
     logged interval after the first (which holds the compile) and how long each save blocked;
  2. the same compiled step alone, on one fixed device-resident batch, with nothing else in the
     loop, timed before and after the loop and averaged: the pure compute time per step.
The loop overhead is 1 - pure / loop (the time the loop spends outside the compiled step: data,
host-to-device copies, metrics, checkpoint calls). MFU is against this CPU's measured matmul
peak (a 2048^3 float32 matmul, timed in the same run), since a CPU has no datasheet bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import configs.debug  # noqa: E402
from configs import base  # noqa: E402
from meditron_jax import model, optim, sharding, train  # noqa: E402
from meditron_jax.data import loader, prepare  # noqa: E402

SHAPES = {  # preset -> (global batch, seq_len)
    'debug': (8, 256),
    'llama_100m': (4, 128),
}


def matmul_peak_flops(n: int = 2048, reps: int = 10) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)


def run_config(preset: str, data_dir: str, steps: int, ckpt_every: int, peak: float):
    batch, seq_len = SHAPES[preset]
    c = configs.debug.get_config()
    c.model = base.model_config(preset)
    c.mesh.update(dict(data=1, fsdp=1, tensor=1))
    c.data.dir = data_dir
    c.data.seq_len, c.data.global_batch_size = seq_len, batch
    c.train.update(dict(steps=steps, log_every=5, eval_every=0, peak_flops_per_device=peak))
    c.checkpoint.update(dict(every=ckpt_every, keep=2))
    cfg = train.model_config(c)

    # The same compiled step alone on one fixed batch, timed before and after the loop (the
    # machine is shared: averaging the two brackets the loop's conditions).
    mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
    optimizer = optim.make_optimizer(c.optim, steps)
    _, shardings = train.abstract_state(cfg, optimizer, mesh)
    state = train.fresh_state(model.init_params(cfg, mesh), optimizer, shardings)
    step_fn, _ = train.compile_steps(c, cfg, optimizer, optim.lr_schedule(c.optim, steps),
                                     shardings, mesh)
    it = loader.make_train_iterator(c.data, data_dir, seed=0, process_index=0, process_count=1)
    fixed = loader.to_global_batch(next(it), mesh)

    def pure_steps(state, n):
        times = []
        with jax.set_mesh(mesh):
            for _ in range(n):
                t = time.perf_counter()
                state, m = step_fn(state, fixed)
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t)
        return state, statistics.median(times[1:])

    state, pure_before = pure_steps(state, max(steps // 2, 6))

    # The real loop.
    with tempfile.TemporaryDirectory() as workdir:
        train.train(c, workdir)
        rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    rows = [r for r in rows if 'loss' in r][1:]  # drop the interval holding the compile
    loop_step = statistics.median(r['step_time_sec'] for r in rows)
    blocks = [r['checkpoint_block_sec'] for r in rows if r['checkpoint_block_sec'] > 0]

    state, pure_after = pure_steps(state, max(steps // 2, 6))
    pure_step = (pure_before + pure_after) / 2

    tokens = batch * seq_len
    flops = cfg.flops_per_token(seq_len) * tokens
    return dict(preset=preset, params_m=cfg.num_params() / 1e6, tokens_per_step=tokens,
                loop_step_s=loop_step, pure_step_s=pure_step,
                tokens_per_sec=tokens / loop_step, mfu=flops / loop_step / peak,
                overhead=1 - pure_step / loop_step,
                ckpt_block_s=max(blocks) if blocks else float('nan'),
                ckpt_block_over_step=(max(blocks) / loop_step) if blocks else float('nan'))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--presets', nargs='+', default=['debug', 'llama_100m'])
    parser.add_argument('--steps', type=int, default=40)
    parser.add_argument('--ckpt-every', type=int, default=10)
    args = parser.parse_args()
    train.quiet_libraries()

    peak = matmul_peak_flops()
    print(f'CPU matmul peak (float32, measured): {peak / 1e9:.1f} GFLOP/s, '
          f'{jax.device_count()} device(s)')
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, 'data')
        prepare.prepare(configs.debug.get_config().data, data_dir)
        results = [run_config(p, data_dir, args.steps, args.ckpt_every, peak)
                   for p in args.presets]
    print('\n| model | params | tokens/step | loop step s | tokens/s | MFU (vs measured peak) | '
          'pure step s | loop overhead | checkpoint block s | block / step |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    for r in results:
        print(f"| {r['preset']} | {r['params_m']:.1f}M | {r['tokens_per_step']} | "
              f"{r['loop_step_s']:.3f} | {r['tokens_per_sec']:,.0f} | {r['mfu']:.1%} | "
              f"{r['pure_step_s']:.3f} | {r['overhead']:.1%} | {r['ckpt_block_s']:.3f} | "
              f"{r['ckpt_block_over_step']:.2f} |")


if __name__ == '__main__':
    main()
