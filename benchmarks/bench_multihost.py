"""Step time of one training job run as 2 processes x 4 CPU devices vs 1 process x 8 devices.

    python benchmarks/bench_multihost.py [--steps 40] [--log-every 10] [--seq-len 256]
                                         [--batch 8] [--mesh data=2,fsdp=4,tensor=1]

Runs meditron-train twice on the debug config with the same mesh and batch, one after the
other: in one process with 8 simulated CPU devices, then through launch/local.py as 2 processes
x 4 devices (real jax.distributed on localhost, gloo collectives between the processes). Reads
step_time_sec from each run's metrics.jsonl, drops the first logged window (it holds the
compile), and prints the medians side by side with their ratio, as a markdown table for
BENCHMARKS.md. On a 2-core machine both jobs share the same cores; the ratio measures what the
cross-process collectives (gloo over TCP loopback instead of in-process copies) and a second
Python host loop cost, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from launch import local  # noqa: E402


def run_flags(args, data_dir: str) -> list[str]:
    mesh = dict(kv.split('=') for kv in args.mesh.split(','))
    return ['--config', os.path.join(REPO, 'configs', 'debug.py'),
            f'--config.data.dir={data_dir}', f'--config.data.seq_len={args.seq_len}',
            f'--config.data.global_batch_size={args.batch}', f'--config.train.steps={args.steps}',
            f'--config.train.log_every={args.log_every}', '--config.train.eval_every=0',
            f'--config.checkpoint.every={args.steps}',
            *[f'--config.mesh.{k}={v}' for k, v in mesh.items()]]


def step_times(workdir: str) -> list[float]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return [r['step_time_sec'] for r in rows if 'step_time_sec' in r][1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--steps', type=int, default=40)
    p.add_argument('--log-every', type=int, default=10)
    p.add_argument('--seq-len', type=int, default=256)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--mesh', default='data=2,fsdp=4,tensor=1')
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix='bench_multihost_')
    data_dir = os.path.join(tmp, 'data')
    command = [sys.executable, '-m', 'meditron_jax.train']

    results = {}
    # One process, 8 devices (this run also prepares the shipped corpus into data_dir).
    env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='8', XLA_FLAGS='')
    workdir = os.path.join(tmp, 'one_process')
    start = time.perf_counter()
    subprocess.run(command + run_flags(args, data_dir) + ['--workdir', workdir], cwd=REPO,
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results['1 process x 8 devices'] = (step_times(workdir), time.perf_counter() - start)

    workdir = os.path.join(tmp, 'two_processes')
    start = time.perf_counter()
    with open(os.devnull, 'w') as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            status = local.launch(command + run_flags(args, data_dir) + ['--workdir', workdir],
                                  num_processes=2, devices_per_process=4, cwd=REPO)
        finally:
            sys.stdout = stdout
    if status:
        by_hand = ' '.join(command + run_flags(args, data_dir) + ['--workdir', workdir])
        raise SystemExit(f'the 2-process run failed with status {status}; run it by hand: '
                         f'python launch/local.py -- {by_hand}')
    results['2 processes x 4 devices'] = (step_times(workdir), time.perf_counter() - start)

    print(f'debug model, mesh {args.mesh}, batch {args.batch} x seq_len {args.seq_len}, '
          f'{args.steps} steps (median over logged windows of {args.log_every} steps after the '
          f'first); {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n')
    print('| job | median step time | windows | wall incl. start-up and compile |')
    print('|---|---|---|---|')
    for name, (times, wall) in results.items():
        print(f'| {name} | {statistics.median(times) * 1000:.1f} ms | '
              f'{", ".join(f"{t * 1000:.0f}" for t in times)} ms | {wall:.0f} s |')
    one, two = (statistics.median(t) for t, _ in results.values())
    print(f'\n2-process / 1-process step time: {two / one:.2f}x')


if __name__ == '__main__':
    main()
