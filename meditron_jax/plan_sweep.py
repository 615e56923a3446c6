"""meditron-plan --sweep: the config compiled over a grid of (micro-batch per device, remat
policy), the global batch fixed (``grad_accum_steps`` follows from the micro-batch), and the
fastest point that fits marked.

"Fastest" is the fewest hardware FLOPs per step (XLA:CPU's count of the unrolled step, so
rematerialised recomputation included): every point trains the same tokens with the same model
FLOPs, and recomputation is the cost that differs. FLOPs within 1% count as equal, and among
equals the larger micro-batch wins: larger matmuls, and with fsdp each micro-batch gathers the
parameters again (forward and backward), so fewer micro-batches move fewer bytes (the
collectives column).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from meditron_jax import model, plan as plan_lib, sharding, targets

GiB = 2 ** 30


@dataclasses.dataclass
class Row:
    micro_batch_per_device: float
    grad_accum_steps: int
    remat: str
    plan: plan_lib.Plan | None      # None: the point does not compile (the error is kept)
    error: str = ''


def grid(config: ml_collections.ConfigDict, num_devices: int,
         micro_batches: list[float] | None) -> list[tuple[int, int]]:
    """(micro-batch per device, grad_accum_steps) pairs whose micro-batch divides the global
    batch: the given micro-batches, else 1 to 8 and the config's."""
    gbs = int(config.data.global_batch_size)
    dp = _data_parallel(config, num_devices)
    if micro_batches is None:
        config_b = gbs / int(config.optim.grad_accum_steps) / dp
        micro_batches = sorted({*range(1, 9), config_b})
    pairs = []
    for b in micro_batches:
        if b >= 1 and b == int(b) and gbs % (int(b) * dp) == 0:
            pairs.append((int(b), gbs // (int(b) * dp)))
    if not pairs:
        raise ValueError(f'--sweep_micro_batches={micro_batches}: none gives a whole number of '
                         f'sequences per device whose micro-batch divides '
                         f'data.global_batch_size={gbs} over {dp} data-parallel devices')
    return sorted(set(pairs))


def _data_parallel(config, num_devices: int) -> int:
    sizes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, num_devices)))
    return sizes['data'] * sizes['fsdp']


def sweep(config: ml_collections.ConfigDict, devices: list, target: targets.Target,
          micro_batches: list[float] | None = None, remats=None,
          xla_flops: bool = True) -> list[Row]:
    rows = []
    for b, k in grid(config, len(devices), micro_batches):
        for remat in remats or sorted(model.REMAT_POLICIES):
            c = ml_collections.ConfigDict(config.to_dict())
            c.optim.grad_accum_steps = k
            c.model.remat = remat
            try:
                p = plan_lib.make_plan(c, devices, xla_flops=xla_flops, target=target)
                rows.append(Row(b, k, remat, p))
            except Exception as e:  # noqa: BLE001 -- a point XLA rejects is a row, not an abort
                rows.append(Row(b, k, remat, None, f'{type(e).__name__}: {str(e)[:120]}'))
    return rows


def best(rows: list[Row], memory_gb: float, headroom_gb: float) -> Row | None:
    fits = [r for r in rows if r.plan is not None
            and r.plan.peak_bytes <= (memory_gb - headroom_gb) * GiB]
    if not fits:
        return None
    flops = lambda r: r.plan.xla_flops_per_step or r.plan.model_flops_per_step
    fewest = min(flops(r) for r in fits)
    return min(fits, key=lambda r: (flops(r) > 1.01 * fewest, -r.micro_batch_per_device, flops(r)))


def table(rows: list[Row], memory_gb: float, headroom_gb: float) -> str:
    chosen = best(rows, memory_gb, headroom_gb)
    lines = [f'sweep: memory per device (limit {memory_gb:g} GiB - {headroom_gb:g} GiB headroom) '
             f'and FLOPs per device per step',
             '  micro  accum  remat                peak GiB   TFLOP (incl. remat)  recompute  '
             'collectives GiB',
             '  -----  -----  ------------------  ---------  -------------------  ---------  '
             '---------------']
    for r in rows:
        if r.plan is None:
            lines.append(f'  {r.micro_batch_per_device:5g}  {r.grad_accum_steps:5d}  '
                         f'{r.remat:18s}  does not compile: {r.error}')
            continue
        p = r.plan
        flops = p.xla_flops_per_step
        extra = f'{flops / p.model_flops_per_step - 1:+8.0%}' if flops else '     n/a'
        fits = p.peak_bytes <= (memory_gb - headroom_gb) * GiB
        comm = sum(c.bytes for c in p.hlo.collectives.values())
        mark = '  <- fastest that fits' if r is chosen else ('' if fits else '  (over)')
        lines.append(f'  {r.micro_batch_per_device:5g}  {r.grad_accum_steps:5d}  {r.remat:18s}  '
                     f'{p.peak_bytes / GiB:9.2f}  '
                     + (f'{flops / 1e12:19.1f}' if flops else f'{"n/a":>19s}')
                     + f'  {extra}  {comm / GiB:15.1f}{mark}')
    if chosen is None:
        lines.append('no point fits')
    lines.append('recompute: hardware FLOPs over the analytic model FLOPs (6N + attention); '
                 'collectives: all-gather + reduce-scatter + all-reduce bytes per step')
    return '\n'.join(lines)
