"""meditron-plan: per-device memory, FLOPs, collectives and step time of a run, before the
cluster is booked, from the target's own compiler.

    meditron-plan --config configs/meditron_70b.py [--target h100] [--num_devices 128]
                  [--device_memory_gb 80] [--mfu 0.4] [--sweep] [--config.data.global_batch_size=...]

Compiles the real train step (``step.compile_steps``, the same function, shardings and donation
as ``meditron-train``) ahead of time for the config's full mesh, from abstract (shape-only)
inputs: nothing is allocated and nothing runs. ``--target`` picks the compiler and devices:
``cpu`` (default) simulated CPU devices and XLA:CPU; ``h100`` / ``a100`` compile-only GPUs of the
CUDA plugin and XLA:GPU, with the XLA flags of launch/gpu_env.sh (meditron_jax/xla_flags_gpu.txt,
the one list both use); ``tpu-v5p`` / ``tpu-v5e`` / ``tpu-v4`` a libtpu topology and XLA:TPU.
Devices are laid out host by host as on the cluster (meditron_jax/targets.py), and the attention
is the one the target runs (cudnn on GPU, splash on TPU: ``model.resolve_attention``). Prints per
device: XLA's argument / output / alias / temporary bytes and peak next to the analytic
parameter / optimizer / gradient bytes, the collectives per step, whether the fused attention
kernel is in the program, FLOPs per step and the step time and tokens/s at a given MFU. Exits
with status 1 when the peak exceeds ``--device_memory_gb`` (default: the target's memory).
``--sweep`` compiles a grid of (micro-batch per device, remat policy) and marks the fastest that
fits with 3 GiB to spare.

``--num_devices`` is the cluster size. A mesh with a -1 axis needs one; the default is the
MEDITRON clusters: 128 devices (16 nodes x 8 GPUs) for models above 30B parameters, 64 (8 nodes x
8) below; a mesh with no -1 axis uses its product.

Accuracy, honestly:
- Parameter, optimizer-state and gradient bytes are exact: they follow from the shapes and the
  shardings of the logical-axis table (tests check them against params x 4 bytes and Adam's
  2 x params x 4 bytes over the shard count, and against XLA's argument size).
- Activations and temporaries are the target compiler's buffer assignment
  (``memory_analysis().temp``) minus the gradient bytes. With a GPU or TPU target that is the
  program the cluster compiles, on the pinned jaxlib; still unaccounted are the CUDA context,
  NCCL buffers and the cuDNN workspace (about 1-3 GiB a GPU) and fragmentation, hence the 3 GiB
  headroom. A compile-only build does not build the cuDNN graph: whether cuDNN accepts a shape
  is only known on a GPU. XLA:TPU's temporaries come out above its own ``peak_memory_in_bytes``
  (both printed; the limit uses the larger sum). With ``--target cpu``, XLA:CPU keeps float32
  copies of bfloat16 activation stacks and runs the xla attention: an upper bound of the right
  order (1.7x too high for the 70B config), not the GPU figure.
- FLOPs: XLA's ``cost_analysis()`` counts the body of a loop once and XLA:GPU gives none, so the
  plan compiles 1- and 2-layer unrolled copies of the step for one micro-batch on XLA:CPU (the
  same mesh shape, the xla attention) and extrapolates (k micro-batches x (outside + L x one
  layer)); that figure includes rematerialised recomputation (hardware FLOPs), unlike the
  analytic model FLOPs (6N + attention) that MFU uses.
- Collectives are counted from the optimised HLO of the target, loops times their trip count
  (meditron_jax/hlo_stats.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from meditron_jax import hlo_stats, targets

GiB = 2 ** 30
LARGE_MODEL_PARAMS = 30e9          # above this, the default cluster is MEDITRON-70B's 16 x 8
GPUS_PER_NODE = targets.GPUS_PER_HOST
HEADROOM_GIB = 3.0                 # CUDA context, NCCL, cuDNN workspace, fragmentation


@dataclasses.dataclass
class Plan:
    """Per-device figures (bytes, FLOPs, seconds) for one config on one mesh of one target."""
    target: str
    compiler: str
    device_kind: str
    hosts: int
    mesh: dict
    num_devices: int
    micro_batch_per_device: float
    remat: str
    attention: str                 # what runs (model.resolve_attention on the target)
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
    xla_peak_bytes: int | None     # XLA's own peak_memory_in_bytes, where the target has one
    hlo: hlo_stats.HloStats
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
        return max(self.xla_argument_bytes + self.xla_output_bytes - self.xla_alias_bytes
                   + self.xla_temp_bytes, self.xla_peak_bytes or 0)

    def memory_figures(self) -> str:
        """The sum behind ``peak_bytes``, in GiB, for the over-memory message."""
        g = lambda n: f'{n / GiB:.2f}'
        if self.xla_temp_bytes is None:
            return 'analytic parameters + optimizer + gradients + batch + residual stream'
        return (f'arguments {g(self.xla_argument_bytes)} + outputs {g(self.xla_output_bytes)} - '
                f'aliased {g(self.xla_alias_bytes)} + temporaries {g(self.xla_temp_bytes)} GiB'
                + (f'; XLA peak {g(self.xla_peak_bytes)} GiB' if self.xla_peak_bytes else ''))

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


def check_flags(num_devices: int | None, device_memory_gb: float | None, mfu: float) -> None:
    """The command's flags, checked before anything is compiled."""
    from meditron_jax import cli
    if num_devices is not None and num_devices < 1:
        raise cli.ConfigError(f'--num_devices={num_devices}: expected a positive device count '
                              f'(leave it out for the default)')
    if device_memory_gb is not None and not device_memory_gb > 0:
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
    from meditron_jax import model, optim, sharding, step
    steps = int(config.train.steps)
    optimizer = optim.make_optimizer(config.optim, steps)
    schedule = optim.lr_schedule(config.optim, steps)
    with model.compile_platform(sharding.mesh_platform(mesh)):  # the target's attention
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
    per parameter against 6 x tokens per parameter, negligible. ``mesh`` is a CPU mesh (XLA:CPU
    counts every op; XLA:GPU counts none), and the attention the xla one: a fused kernel is an
    opaque custom call to cost analysis.
    """
    k = int(config.optim.grad_accum_steps)
    micro = ml_collections.ConfigDict(config.to_dict())
    micro.optim.grad_accum_steps = 1
    counts = []
    for layers in (1, 2):
        small = cfg.replace(num_layers=layers, scan_layers=False, attention='xla')
        compiled, _, _ = _compile_step(micro, small, mesh, int(config.data.global_batch_size) // k)
        counts.append(_flops(compiled))
    if None in counts:
        return None
    per_layer = counts[1] - counts[0]
    return k * (counts[0] + (cfg.num_layers - 1) * per_layer)


def make_plan(config: ml_collections.ConfigDict, devices=None, xla_flops: bool = True,
              target: targets.Target | None = None, flops_devices=None,
              hlo_out: str | None = None) -> Plan:
    """Compiles the config's train step for a mesh over ``devices`` (default: all) of ``target``
    (default cpu) and measures. ``flops_devices``: CPU devices for the FLOP-count compiles
    (default: ``devices`` on cpu, else the first CPU devices). For GPU targets XLA_FLAGS must
    have been set (``targets.xla_flags_gpu()``) before JAX started, as ``main`` does."""
    from meditron_jax import model, sharding, train
    target = target or targets.get('cpu')
    devices = list(jax.devices() if devices is None else devices)
    shape = sharding.mesh_shape(config.mesh, len(devices))
    mesh = sharding.make_mesh(config.mesh, targets.mesh_device_order(target, devices, shape))
    cfg = model.resolve_config_attention(train.model_config(config), mesh)
    if target.platform == 'cpu':
        train.validate_config(config, mesh)
    else:   # the cluster's processes: one a host
        train.validate_config(config, mesh, [d for d in devices if d.process_index == 0],
                              targets.hosts(devices))
    gbs, k = int(config.data.global_batch_size), int(config.optim.grad_accum_steps)
    seq_len = int(config.data.seq_len)

    start = time.perf_counter()
    compiled, abstract, batch = _compile_step(config, cfg, mesh, gbs)
    compile_sec = time.perf_counter() - start
    memory = compiled.memory_analysis()
    hlo_text = compiled.as_text()
    if hlo_out:
        with open(hlo_out, 'w') as f:
            f.write(hlo_text)

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

    xla_flops_per_step = None
    if xla_flops:
        if target.platform == 'cpu' and flops_devices is None:
            flops_mesh = mesh
        else:
            flops_devices = list(flops_devices or jax.devices('cpu')[:len(devices)])
            if len(flops_devices) < len(devices):
                raise targets.TargetError(
                    f'the FLOP count needs {len(devices)} CPU devices, {len(flops_devices)} are '
                    f'here (jax_num_cpu_devices)')
            flops_mesh = sharding.make_mesh(config.mesh, flops_devices[:len(devices)])
        xla_flops_per_step = _extrapolated_flops(config, cfg, flops_mesh)
    tokens_per_step = gbs * seq_len
    peak_flops = target.peak_flops_per_device or float(config.train.peak_flops_per_device)
    return Plan(
        target=target.name, compiler=target.compiler, device_kind=devices[0].device_kind,
        hosts=targets.hosts(devices) if target.platform != 'cpu' else 1,
        mesh=dict(mesh.shape), num_devices=mesh.size, micro_batch_per_device=micro_rows_per_device,
        remat=cfg.remat, attention=cfg.attention,
        param_bytes=param_bytes, opt_state_bytes=_shard_bytes(abstract.opt_state),
        grad_bytes=param_bytes, batch_bytes=_shard_bytes(batch),
        analytic_param_bytes=analytic_params, analytic_opt_state_bytes=2 * analytic_params,
        xla_argument_bytes=getattr(memory, 'argument_size_in_bytes', None),
        xla_output_bytes=getattr(memory, 'output_size_in_bytes', None),
        xla_alias_bytes=getattr(memory, 'alias_size_in_bytes', None),
        xla_temp_bytes=getattr(memory, 'temp_size_in_bytes', None),
        xla_peak_bytes=getattr(memory, 'peak_memory_in_bytes', None) or None,
        hlo=hlo_stats.parse(hlo_text),
        attention_scores_bytes=b * heads_per_device * seq_len * seq_len * 4,
        residual_stream_bytes=cfg.num_layers * b * seq_len * cfg.hidden_size * compute_bytes,
        model_flops_per_step=cfg.flops_per_token(seq_len) * tokens_per_step / mesh.size,
        xla_flops_raw=_flops(compiled), xla_flops_per_step=xla_flops_per_step,
        tokens_per_step=tokens_per_step, peak_flops_per_device=peak_flops,
        compile_sec=compile_sec)


def report(plan: Plan, device_memory_gb: float, mfu: float) -> str:
    from meditron_jax import plan_report
    return plan_report.report(plan, device_memory_gb, mfu)


# -------------------------------------------------------------------------------- command

# Flags live in their own FlagValues: meditron_jax.train (imported for the real step) defines
# --config on the global absl FLAGS for meditron-train.
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a get_config() file.',
                                          flag_values=FLAGS)
_TARGET = flags.DEFINE_enum('target', 'cpu', sorted(targets.TARGETS),
                            'Compiler and devices to plan for (cpu: simulated CPU devices).',
                            flag_values=FLAGS)
_NUM_DEVICES = flags.DEFINE_integer(
    'num_devices', None, 'Devices in the cluster to plan for (default: the product of the mesh '
    'sizes, or with a -1 axis 128 for models above 30B parameters, 64 below).', flag_values=FLAGS)
_DEVICE_MEMORY_GB = flags.DEFINE_float(
    'device_memory_gb', None, 'Memory of one device, GiB (default: the target\'s: 80 for '
    'cpu/h100/a100, 95 tpu-v5p, 16 tpu-v5e, 32 tpu-v4).', flag_values=FLAGS)
_MFU = flags.DEFINE_float('mfu', 0.4, 'Model-FLOPs utilisation for the step-time estimate.',
                          flag_values=FLAGS)
_XLA_FLOPS = flags.DEFINE_bool('xla_flops', True, 'Also compile 1- and 2-layer unrolled steps to '
                               'extrapolate XLA\'s FLOP count.', flag_values=FLAGS)
_SWEEP = flags.DEFINE_bool('sweep', False, 'Compile a grid of (micro-batch per device, remat) '
                           'and print memory and FLOPs of each.', flag_values=FLAGS)
_SWEEP_MICRO = flags.DEFINE_list('sweep_micro_batches', [], 'Micro-batches per device for '
                                 '--sweep (default: the config\'s, half and double).',
                                 flag_values=FLAGS)
_HLO_OUT = flags.DEFINE_string('hlo_out', None, 'Write the compiled step\'s optimised HLO text '
                                'to this file (to read the program the target runs).',
                                flag_values=FLAGS)
_DEBUG = flags.DEFINE_bool('debug', False, 'Show the traceback of anticipated errors too '
                           '(also MEDITRON_DEBUG=1).', flag_values=FLAGS)


def start_jax(target: targets.Target, num_devices: int) -> list:
    """Sets up JAX for the target before its backends start; returns the devices to plan on."""
    if jax._src.xla_bridge.backends_are_initialized():  # noqa: SLF001
        raise RuntimeError('JAX was initialised before meditron-plan could set the device count')
    if target.platform == 'gpu':   # the cluster's flags: they change the program (STACK.md)
        os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', '')]
                                           + targets.xla_flags_gpu()).strip()
    if target.platform == 'tpu':   # compile only: no chips to guard, share libtpu with others
        os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    # The CUDA plugin and libtpu stay out of the backends (no driver, no TPU metadata server):
    # their compilers are reached through compile-only devices.
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', num_devices)   # cpu devices / the FLOP counts
    if target.platform == 'cpu':
        return jax.devices()
    return targets.compile_only_devices(target, num_devices)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if _CONFIG.value is None:
        raise app.UsageError('--config is required')
    from meditron_jax import cli
    config = _CONFIG.value
    cli.check_declared(config, f'--config={FLAGS["config"].config_filename}')
    check_flags(_NUM_DEVICES.value, _DEVICE_MEMORY_GB.value, _MFU.value)
    target = targets.get(_TARGET.value)
    memory_gb = _DEVICE_MEMORY_GB.value or target.device_memory_gb
    if _NUM_DEVICES.value is None:
        num_devices, reason = default_num_devices_and_reason(config)
        print(f'planning for {num_devices} devices ({reason})', file=sys.stderr, flush=True)
    else:
        num_devices, reason = _NUM_DEVICES.value, '--num_devices'
    try:
        devices = start_jax(target, num_devices)
        if _SWEEP.value:
            from meditron_jax import plan_sweep
            micro = [float(m) for m in _SWEEP_MICRO.value] or None
            rows = plan_sweep.sweep(config, devices, target, micro, xla_flops=_XLA_FLOPS.value)
            print(plan_sweep.table(rows, memory_gb, HEADROOM_GIB), flush=True)
            return 0
        plan = make_plan(config, devices, xla_flops=_XLA_FLOPS.value, target=target,
                         hlo_out=_HLO_OUT.value)
    except jax.errors.JaxRuntimeError as e:
        if 'RESOURCE_EXHAUSTED' not in str(e):
            raise
        # XLA:TPU refuses to compile a program over the chip's HBM: that is the plan's answer.
        print(f'DOES NOT FIT: {target.compiler} could not compile the step into '
              f'{target.name} memory: {str(e).splitlines()[0]}', file=sys.stderr, flush=True)
        return 1
    except ValueError as e:  # name where the device count came from in mesh / batch errors
        if cli.one_line(e) is None:
            raise
        raise cli.ConfigError(f'{cli.one_line(e)} [planning for {num_devices} devices: '
                              f'{reason}]') from e
    print(report(plan, memory_gb, _MFU.value), flush=True)
    if plan.peak_bytes > memory_gb * GiB:
        print(f'DOES NOT FIT: estimated peak {plan.peak_bytes / GiB:.2f} GiB per device '
              f'({plan.memory_figures()}) exceeds --device_memory_gb={memory_gb:g}',
              file=sys.stderr, flush=True)
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
