"""meditron-plan: per-device memory, FLOPs and step time of a run, before the cluster is booked.

    meditron-plan --config configs/meditron_70b.py [--num_devices 128] [--device_memory_gb 80]
                  [--mfu 0.4] [--config.data.global_batch_size=...]

Compiles the real train step (``step.compile_steps``, the same function, shardings and donation
as ``meditron-train``) ahead of time for the config's full mesh on simulated CPU devices, from
abstract (shape-only) inputs: nothing is allocated, so the 70B config plans on a laptop in under a
minute. Prints per device: parameters, optimizer state, gradients, activations and temporaries,
FLOPs per step, and the step time and tokens/s at a given model-FLOPs utilisation (MFU). Exits
with status 1 when the estimated peak exceeds ``--device_memory_gb``.

``--num_devices`` is the cluster size. A mesh with a -1 axis needs one; the default is the
MEDITRON clusters: 128 devices (16 nodes x 8 GPUs) for models above 30B parameters, 64 (8 nodes x
8) below; a mesh with no -1 axis uses its product.

Accuracy, honestly:
- Parameter, optimizer-state and gradient bytes are exact: they follow from the shapes and the
  shardings of the logical-axis table (the test checks them against params x 4 bytes and Adam's
  2 x params x 4 bytes over the shard count, and against XLA's argument size).
- Activations and temporaries are XLA's *CPU* buffer assignment (``memory_analysis().temp``),
  minus the gradient bytes. XLA:GPU schedules and fuses differently, and on CPU
  ``attention='cudnn'`` falls back to the XLA attention, which materialises the (B, N, T, T)
  score and probability tensors that cuDNN's fused (flash) attention never holds. Treat the
  figure as an upper bound of the right order, not as the GPU number; the score-tensor size of
  one layer is printed so you can judge how much of it is attention. Also unaccounted: the CUDA
  context, NCCL buffers and cuDNN workspace (about 1-3 GiB a GPU), and fragmentation.
- XLA's ``cost_analysis()`` counts the body of a loop once, so for a scanned stack inside a
  gradient-accumulation scan its raw figure is about one layer of one micro-batch. The plan
  therefore also compiles 1- and 2-layer unrolled copies of the step at the micro-batch size and
  extrapolates (k micro-batches x (outside + L x one layer)); that figure includes rematerialised
  recomputation (hardware FLOPs), unlike the analytic model FLOPs (6N + attention) that MFU uses.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

GiB = 2 ** 30
LARGE_MODEL_PARAMS = 30e9          # above this, the default cluster is MEDITRON-70B's 16 x 8
GPUS_PER_NODE = 8


@dataclasses.dataclass
class Plan:
    """Per-device figures (bytes, FLOPs, seconds) for one config on one mesh."""
    mesh: dict
    num_devices: int
    micro_batch_per_device: float
    param_bytes: int               # from the shardings of the abstract state
    opt_state_bytes: int
    grad_bytes: int                # gradients, sharded like the parameters, in param_dtype
    batch_bytes: int
    analytic_param_bytes: float    # num_params x dtype bytes / (devices a parameter spans)
    analytic_opt_state_bytes: float
    xla_argument_bytes: int | None
    xla_output_bytes: int | None
    xla_alias_bytes: int | None
    xla_temp_bytes: int | None
    attention_scores_bytes: int    # one layer's (b, N/tensor, T, T) float32 scores, XLA attention
    residual_stream_bytes: int     # the scan carry saved per layer for backward: L x b x T x D
    model_flops_per_step: float    # analytic 6N + attention, per device
    xla_flops_raw: float | None    # cost_analysis of the real step (loop bodies counted once)
    xla_flops_per_step: float | None  # extrapolated from 1- and 2-layer unrolled compiles
    tokens_per_step: int
    peak_flops_per_device: float
    compile_sec: float

    @property
    def activation_bytes(self) -> int | None:
        """XLA's temporaries less the gradients: activations, remat buffers and workspace."""
        if self.xla_temp_bytes is None:
            return None
        return max(self.xla_temp_bytes - self.grad_bytes, 0)

    @property
    def peak_bytes(self) -> int:
        """Arguments + (non-aliased) outputs + temporaries; analytic figures where XLA has none."""
        if self.xla_temp_bytes is None:
            return (self.param_bytes + self.opt_state_bytes + self.grad_bytes + self.batch_bytes
                    + self.residual_stream_bytes)
        return (self.xla_argument_bytes + self.xla_output_bytes - self.xla_alias_bytes
                + self.xla_temp_bytes)

    def step_time_sec(self, mfu: float) -> float:
        return self.model_flops_per_step / (mfu * self.peak_flops_per_device)

    def tokens_per_sec(self, mfu: float) -> float:
        return self.tokens_per_step / self.step_time_sec(mfu)


def default_num_devices(config: ml_collections.ConfigDict) -> int:
    return default_num_devices_and_reason(config)[0]


def default_num_devices_and_reason(config: ml_collections.ConfigDict) -> tuple[int, str]:
    """The device count to plan for when --num_devices is not given, and where it came from."""
    from meditron_jax import sharding
    sizes = [int(config.mesh[a]) for a in sharding.MESH_AXES]
    if -1 not in sizes:
        return math.prod(sizes), f'the product of the mesh sizes {dict(config.mesh)}'
    from meditron_jax import train
    params = train.model_config(config).num_params()
    nodes = 16 if params > LARGE_MODEL_PARAMS else 8
    return nodes * GPUS_PER_NODE, (
        f'the default for a mesh with a -1 axis and a model of {params / 1e9:.1f}B parameters: '
        f'{nodes} nodes x {GPUS_PER_NODE} GPUs; pass --num_devices for another cluster')


def check_flags(num_devices: int | None, device_memory_gb: float, mfu: float) -> None:
    """The command's flags, checked before anything is compiled."""
    from meditron_jax import cli
    if num_devices is not None and num_devices < 1:
        raise cli.ConfigError(f'--num_devices={num_devices}: expected a positive device count '
                              f'(leave it out for the default)')
    if not device_memory_gb > 0:
        raise cli.ConfigError(f'--device_memory_gb={device_memory_gb:g}: expected the memory of '
                              f'one device in GiB, > 0 (A100/H100 80GB: 80)')
    if not 0 < mfu <= 1:
        raise cli.ConfigError(f'--mfu={mfu:g}: expected a model-FLOPs utilisation in (0, 1], '
                              f'e.g. 0.4')


def _shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (device 0's share)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def _abstract_batch(config, mesh, rows: int):
    from meditron_jax import sharding, step
    spec = sharding.batch_sharding(mesh)
    shape = (rows, int(config.data.seq_len) + 1)   # rows hold seq_len + 1 tokens (step.py)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=spec)
            for k in step.BATCH_KEYS}


def _compile_step(config, cfg, mesh, rows: int):
    """The real jitted train step, lowered from abstract inputs and compiled."""
    from meditron_jax import optim, step
    steps = int(config.train.steps)
    optimizer = optim.make_optimizer(config.optim, steps)
    schedule = optim.lr_schedule(config.optim, steps)
    abstract, shardings = step.abstract_state(cfg, optimizer, mesh)
    step_fn, _ = step.compile_steps(config, cfg, optimizer, schedule, shardings, mesh)
    batch = _abstract_batch(config, mesh, rows)
    with jax.set_mesh(mesh):
        compiled = step_fn.lower(abstract, batch).compile()
    return compiled, abstract, batch


def _flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):       # older jax: one dict per computation
        cost = cost[0] if cost else None
    return float(cost['flops']) if cost and 'flops' in cost else None


def _extrapolated_flops(config, cfg, mesh) -> float | None:
    """Hardware FLOPs per device per step from 1- and 2-layer unrolled compiles of one micro-batch.

    Unrolled, every op is counted; (2-layer) - (1-layer) is one layer, the rest is the embedding,
    head, loss and optimizer. The optimizer is then counted k times instead of once: a few FLOPs
    per parameter against 6 x tokens per parameter, negligible.
    """
    k = int(config.optim.grad_accum_steps)
    micro = ml_collections.ConfigDict(config.to_dict())
    micro.optim.grad_accum_steps = 1
    counts = []
    for layers in (1, 2):
        small = cfg.replace(num_layers=layers, scan_layers=False)
        compiled, _, _ = _compile_step(micro, small, mesh, int(config.data.global_batch_size) // k)
        counts.append(_flops(compiled))
    if None in counts:
        return None
    per_layer = counts[1] - counts[0]
    return k * (counts[0] + (cfg.num_layers - 1) * per_layer)


def make_plan(config: ml_collections.ConfigDict, devices=None, xla_flops: bool = True) -> Plan:
    """Compiles the config's train step for a mesh over ``devices`` (default: all) and measures."""
    from meditron_jax import sharding, train
    cfg = train.model_config(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    train.validate_config(config, mesh)
    gbs, k = int(config.data.global_batch_size), int(config.optim.grad_accum_steps)
    seq_len = int(config.data.seq_len)

    start = time.perf_counter()
    compiled, abstract, batch = _compile_step(config, cfg, mesh, gbs)
    compile_sec = time.perf_counter() - start
    memory = compiled.memory_analysis()

    param_bytes = _shard_bytes(abstract.params)
    # Analytic: a parameter is split over the mesh axes its table entry names; for the count we
    # take the shard count of the largest parameter group (the weight matrices) and keep the small
    # replicated norm scales whole.
    itemsize = jnp.dtype(cfg.param_dtype).itemsize
    norm_params = (2 * cfg.num_layers + 1) * cfg.hidden_size
    matrix_shards = mesh.shape['fsdp'] * mesh.shape['tensor']
    analytic_params = ((cfg.num_params() - norm_params) / matrix_shards + norm_params) * itemsize
    micro_rows_per_device = gbs / k / sharding.data_parallel_size(mesh)
    b = max(int(micro_rows_per_device), 1)
    heads_per_device = max(cfg.num_heads // mesh.shape['tensor'], 1)
    compute_bytes = jnp.dtype(cfg.compute_dtype).itemsize

    xla_flops_per_step = _extrapolated_flops(config, cfg, mesh) if xla_flops else None
    tokens_per_step = gbs * seq_len
    return Plan(
        mesh=dict(mesh.shape), num_devices=mesh.size, micro_batch_per_device=micro_rows_per_device,
        param_bytes=param_bytes, opt_state_bytes=_shard_bytes(abstract.opt_state),
        grad_bytes=param_bytes, batch_bytes=_shard_bytes(batch),
        analytic_param_bytes=analytic_params, analytic_opt_state_bytes=2 * analytic_params,
        xla_argument_bytes=getattr(memory, 'argument_size_in_bytes', None),
        xla_output_bytes=getattr(memory, 'output_size_in_bytes', None),
        xla_alias_bytes=getattr(memory, 'alias_size_in_bytes', None),
        xla_temp_bytes=getattr(memory, 'temp_size_in_bytes', None),
        attention_scores_bytes=b * heads_per_device * seq_len * seq_len * 4,
        residual_stream_bytes=cfg.num_layers * b * seq_len * cfg.hidden_size * compute_bytes,
        model_flops_per_step=cfg.flops_per_token(seq_len) * tokens_per_step / mesh.size,
        xla_flops_raw=_flops(compiled), xla_flops_per_step=xla_flops_per_step,
        tokens_per_step=tokens_per_step,
        peak_flops_per_device=float(config.train.peak_flops_per_device),
        compile_sec=compile_sec)


def report(plan: Plan, device_memory_gb: float, mfu: float) -> str:
    gib = lambda n: f'{n / GiB:8.2f} GiB' if n is not None else '     n/a    '
    tflop = lambda f: f'{f / 1e12:10.1f} TFLOP' if f is not None else '       n/a'
    lines = [
        f'mesh {plan.mesh} = {plan.num_devices} devices; '
        f'{plan.micro_batch_per_device:g} sequences per device per micro-batch; '
        f'compiled in {plan.compile_sec:.0f} s (XLA:CPU)',
        '',
        'memory per device                  plan          analytic',
        f'  parameters               {gib(plan.param_bytes)}   {gib(plan.analytic_param_bytes)}',
        f'  optimizer state (Adam)   {gib(plan.opt_state_bytes)}   '
        f'{gib(plan.analytic_opt_state_bytes)}',
        f'  gradients                {gib(plan.grad_bytes)}   {gib(plan.analytic_param_bytes)}',
        f'  activations + temporaries{gib(plan.activation_bytes)}   '
        f'{gib(plan.residual_stream_bytes)}  (analytic: saved residual stream only)',
        f'     of which one layer\'s XLA attention scores (b,N,T,T) f32: '
        f'{plan.attention_scores_bytes / GiB:.2f} GiB (absent with cuDNN flash attention)',
        f'  batch                    {gib(plan.batch_bytes)}',
        f'  XLA: arguments {gib(plan.xla_argument_bytes)}, outputs {gib(plan.xla_output_bytes)} '
        f'(aliased {gib(plan.xla_alias_bytes)}), temporaries {gib(plan.xla_temp_bytes)}',
        f'  estimated peak           {gib(plan.peak_bytes)}   of {device_memory_gb:g} GiB',
        '',
        'FLOPs per device per step',
        f'  model (6N + attention, analytic){tflop(plan.model_flops_per_step)}',
        f'  XLA, extrapolated (incl. remat)  {tflop(plan.xla_flops_per_step)}',
        f'  XLA cost_analysis raw           {tflop(plan.xla_flops_raw)}  '
        f'(loop bodies counted once)',
        '',
        f'at {mfu:.0%} MFU of {plan.peak_flops_per_device / 1e12:g} TFLOP/s per device: '
        f'{plan.step_time_sec(mfu):.2f} s a step, '
        f'{plan.tokens_per_sec(mfu):,.0f} tokens/s '
        f'({plan.tokens_per_step:,} tokens a step)',
    ]
    return '\n'.join(lines)


# -------------------------------------------------------------------------------- command

# Flags live in their own FlagValues: meditron_jax.train (imported for the real step) defines
# --config on the global absl FLAGS for meditron-train.
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a get_config() file.',
                                          flag_values=FLAGS)
_NUM_DEVICES = flags.DEFINE_integer(
    'num_devices', None, 'Devices in the cluster to plan for (default: the product of the mesh '
    'sizes, or with a -1 axis 128 for models above 30B parameters, 64 below).', flag_values=FLAGS)
_DEVICE_MEMORY_GB = flags.DEFINE_float('device_memory_gb', 80.0,
                                       'Memory of one device, GiB (A100/H100 80GB: 80).',
                                       flag_values=FLAGS)
_MFU = flags.DEFINE_float('mfu', 0.4, 'Model-FLOPs utilisation for the step-time estimate.',
                          flag_values=FLAGS)
_XLA_FLOPS = flags.DEFINE_bool('xla_flops', True, 'Also compile 1- and 2-layer unrolled steps to '
                               'extrapolate XLA\'s FLOP count.', flag_values=FLAGS)
_DEBUG = flags.DEFINE_bool('debug', False, 'Show the traceback of anticipated errors too '
                           '(also MEDITRON_DEBUG=1).', flag_values=FLAGS)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if _CONFIG.value is None:
        raise app.UsageError('--config is required')
    from meditron_jax import cli
    config = _CONFIG.value
    cli.check_declared(config, f'--config={FLAGS["config"].config_filename}')
    check_flags(_NUM_DEVICES.value, _DEVICE_MEMORY_GB.value, _MFU.value)
    if _NUM_DEVICES.value is None:
        num_devices, reason = default_num_devices_and_reason(config)
        print(f'planning for {num_devices} devices ({reason})', file=sys.stderr, flush=True)
    else:
        num_devices, reason = _NUM_DEVICES.value, '--num_devices'
    if jax._src.xla_bridge.backends_are_initialized():  # noqa: SLF001
        raise RuntimeError('JAX was initialised before meditron-plan could set the device count')
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', num_devices)
    try:
        plan = make_plan(config, xla_flops=_XLA_FLOPS.value)
    except ValueError as e:  # name where the device count came from in mesh / batch errors
        if cli.one_line(e) is None:
            raise
        raise cli.ConfigError(f'{cli.one_line(e)} [planning for {num_devices} devices: '
                              f'{reason}]') from e
    print(report(plan, _DEVICE_MEMORY_GB.value, _MFU.value), flush=True)
    if plan.peak_bytes > _DEVICE_MEMORY_GB.value * GiB:
        print(f'DOES NOT FIT: estimated peak {plan.peak_bytes / GiB:.2f} GiB per device exceeds '
              f'--device_memory_gb={_DEVICE_MEMORY_GB.value:g}', file=sys.stderr, flush=True)
        return 1
    print('fits', flush=True)
    return 0


def run(argv: list[str] | None = None) -> int:
    """Console entry point (meditron-plan); returns the exit status (1: does not fit, 2: an
    error, one line ``meditron-plan: error: ...``; --debug or MEDITRON_DEBUG=1 for the traceback)."""
    from meditron_jax import cli
    logging.basicConfig(level=logging.WARNING)
    argv = sys.argv if argv is None else argv
    debug = cli.debug_requested(argv)
    try:
        return main(FLAGS(argv))
    except Exception as e:  # noqa: BLE001 -- report() re-raises what it does not recognise
        return cli.report('meditron-plan', e, debug)


if __name__ == '__main__':
    sys.exit(run())
