"""What the checkpoint fingerprints (integrity.py) cost per save, side by side in one run.

    python benchmarks/bench_checkpoint.py                    # llama_100m, 8 CPU devices, ~3 min
    python benchmarks/bench_checkpoint.py --preset debug --repeats 3

1. Training saves: ``checkpoint.save`` of params + Adam state (fsdp over the devices) with the
   fingerprints and with them switched off (``state_fingerprints`` replaced by an empty record),
   alternating, ``--repeats`` times each; reported: the time ``save`` blocked the loop and the
   time until the step was on disk (``wait_until_finished``), medians; plus the fingerprint pass
   alone.
2. Restores: ``restore_latest`` of the same step with and without the check.
3. The streaming writer (meditron-convert import): ``ParamsWriter`` of the params with the
   per-slice fingerprints and with ``Accumulator.add`` recording zeros.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grain  # noqa: E402

from meditron_jax import checkpoint, integrity, model, params_checkpoint, sharding  # noqa: E402


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def median(xs):
    return statistics.median(xs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--preset', default='llama_100m')
    p.add_argument('--repeats', type=int, default=3)
    args = p.parse_args()
    import optax
    cfg = model.preset(args.preset, param_dtype='float32')
    n = len(jax.devices())
    mesh = sharding.make_mesh(dict(data=1, fsdp=n, tensor=1))
    params = model.init_params(cfg, mesh, seed=0)
    opt_state = optax.adam(1e-3).init(params)   # eager: mu, nu sharded like the params
    jax.block_until_ready(opt_state)
    state_mb = (nbytes(params) + nbytes(opt_state)) / 1e6
    print(f'{args.preset}: params + Adam state {state_mb:.0f} MB, {n} {jax.devices()[0].platform} '
          f'devices')

    checkpoint.state_fingerprints(params, opt_state)()          # compile once
    t = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        checkpoint.state_fingerprints(params, opt_state)()
        t.append(time.perf_counter() - start)
    fp_alone = median(t)

    real_fp = checkpoint.state_fingerprints
    results = {True: ([], []), False: ([], [])}
    root = tempfile.mkdtemp(prefix='bench_ckpt_')
    manager = checkpoint.make_manager(root, keep=2)
    data_it = iter(grain.MapDataset.range(100).to_iter_dataset())
    step = 0
    for i in range(args.repeats + 1):   # round 0 warms up (orbax's first save, compiles)
        for with_fp in (False, True):
            checkpoint.state_fingerprints = real_fp if with_fp else (lambda p, o: {}.copy)
            step += 1
            start = time.perf_counter()
            blocked = checkpoint.save(manager, step, params, opt_state, data_it, {}, {})
            manager.wait_until_finished()
            if i:
                results[with_fp][0].append(blocked)
                results[with_fp][1].append(time.perf_counter() - start)
    checkpoint.state_fingerprints = real_fp
    print(f'training save ({args.repeats} each, alternating, medians):')
    for with_fp in (False, True):
        b, d = results[with_fp]
        print(f'  {"with" if with_fp else "without"} fingerprints: blocked {median(b):.3f} s, '
              f'on disk after {median(d):.3f} s')
    extra = median(results[True][1]) - median(results[False][1])
    print(f'  fingerprint pass alone: {fp_alone:.3f} s ({state_mb / 1e3 / fp_alone:.2f} GB/s); '
          f'added per save: {extra:+.3f} s = '
          f'{100 * extra / median(results[False][1]):+.1f}% of a save')

    # Restore of the last step (saved with fingerprints) with and without the check.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            (params, opt_state))
    real_verify = checkpoint.verify_state
    rt = {True: [], False: []}
    for i in range(args.repeats + 1):
        for check in (False, True):
            checkpoint.verify_state = real_verify if check else (lambda *a, **k: None)
            start = time.perf_counter()
            data_it = iter(grain.MapDataset.range(100).to_iter_dataset())
            got = checkpoint.restore_latest(manager, abstract[0], abstract[1], data_it, {})
            jax.block_until_ready(got[1])
            if i:
                rt[check].append(time.perf_counter() - start)
    checkpoint.verify_state = real_verify
    print(f'training restore: without check {median(rt[False]):.3f} s, with '
          f'{median(rt[True]):.3f} s ({100 * (median(rt[True]) / median(rt[False]) - 1):+.1f}%)')

    # The streaming writer, as meditron-convert import uses it.
    host = jax.device_get(params)
    slices = list(params_checkpoint.iter_leaf_slices(host))
    real_add = integrity.Accumulator.add
    wt = {True: [], False: []}
    for i in range(args.repeats + 1):
        for with_fp in (False, True):
            integrity.Accumulator.add = real_add if with_fp else (
                lambda self, name, *a: self.sums.setdefault(name, np.zeros(2, np.uint32)))
            path = os.path.join(root, f'stream-{i}-{with_fp}')
            start = time.perf_counter()
            with params_checkpoint.ParamsWriter(path, cfg) as w:
                for name, layer, value in slices:
                    w.write(name, np.asarray(value), layer)
            if i:
                wt[with_fp].append(time.perf_counter() - start)
    integrity.Accumulator.add = real_add
    mb = nbytes(params) / 1e6
    print(f'streaming writer ({mb:.0f} MB of params): without fingerprints '
          f'{median(wt[False]):.3f} s, with {median(wt[True]):.3f} s '
          f'({100 * (median(wt[True]) / median(wt[False]) - 1):+.1f}%)')


if __name__ == '__main__':
    main()
