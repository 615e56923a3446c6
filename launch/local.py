#!/usr/bin/env python3
"""Starts N processes of one command on this machine, as a multi-host job would: each with M
simulated CPU devices, joined by jax.distributed through a coordinator on localhost.

    python launch/local.py --num_processes 2 --devices_per_process 4 -- \\
        meditron-train --config configs/debug.py --workdir runs/debug-2proc

Every process runs the same command; it learns its place from the environment
(MEDITRON_COORDINATOR, MEDITRON_NUM_PROCESSES, MEDITRON_PROCESS_ID, read by
train.maybe_initialize_distributed, as SLURM's variables are on a cluster). Output lines are
prefixed with the process id. If one process fails, the others are stopped (a collective would
otherwise wait for it forever) and the launcher exits with the first failure's status.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def process_env(base: dict, coordinator: str, num_processes: int, process_id: int,
                devices_per_process: int) -> dict:
    env = dict(base)
    env.update(MEDITRON_COORDINATOR=coordinator, MEDITRON_NUM_PROCESSES=str(num_processes),
               MEDITRON_PROCESS_ID=str(process_id), JAX_PLATFORMS='cpu',
               JAX_NUM_CPU_DEVICES=str(devices_per_process), PYTHONUNBUFFERED='1')
    # An inherited device-count flag would fight JAX_NUM_CPU_DEVICES.
    flags = [f for f in env.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    env['XLA_FLAGS'] = ' '.join(flags)
    return env


def _pump(stream, prefix: str, out) -> None:
    for line in stream:
        out.write(f'{prefix}{line}')
        out.flush()


def launch(command: list[str], num_processes: int, devices_per_process: int,
           port: int = 0, timeout: float = 0.0, cwd: str | None = None) -> int:
    """Runs the job; returns 0 when every process exits 0, else the first failure's status."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f'--num_processes={num_processes} and --devices_per_process='
                         f'{devices_per_process} must be positive')
    if not command:
        raise ValueError('no command given (put it after --)')
    coordinator = f'localhost:{port or free_port()}'
    procs, pumps = [], []
    for i in range(num_processes):
        p = subprocess.Popen(command, cwd=cwd, env=process_env(os.environ, coordinator,
                                                                num_processes, i,
                                                                devices_per_process),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        t = threading.Thread(target=_pump, args=(p.stdout, f'[p{i}] ', sys.stdout), daemon=True)
        t.start()
        procs.append(p)
        pumps.append(t)
    deadline = time.monotonic() + timeout if timeout else None
    status = 0
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.returncode not in (None, 0)]
        late = deadline is not None and time.monotonic() > deadline
        if failed or late:
            status = failed[0].returncode if failed else 124
            reason = (f'process {procs.index(failed[0])} exited with {status}' if failed
                      else f'timed out after {timeout:g} s')
            print(f'[launch] {reason}; stopping the others', file=sys.stderr, flush=True)
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            grace = time.monotonic() + 10
            while any(p.poll() is None for p in procs) and time.monotonic() < grace:
                time.sleep(0.1)
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    for p in procs:
        p.wait()
    for t in pumps:
        t.join(timeout=5)
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode != 0), 0)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     usage='%(prog)s [options] -- COMMAND [ARGS...]')
    parser.add_argument('--num_processes', type=int, default=2)
    parser.add_argument('--devices_per_process', type=int, default=4)
    parser.add_argument('--port', type=int, default=0, help='coordinator port (0: a free one)')
    parser.add_argument('--timeout', type=float, default=0.0, help='seconds; 0: none')
    argv = sys.argv[1:] if argv is None else argv
    if '--' in argv:
        split = argv.index('--')
        args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    else:
        args, command = parser.parse_known_args(argv)
    return launch(command, args.num_processes, args.devices_per_process, args.port, args.timeout)


if __name__ == '__main__':
    sys.exit(main())
