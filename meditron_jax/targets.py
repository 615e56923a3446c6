"""Compile-only devices of the machines meditron-plan plans for: NVIDIA H100 / A100 (the CUDA
PJRT plugin with a target description; ``pip install -e '.[plan-gpu]'``) and TPU v5p / v5e / v4
(libtpu topologies; ``'.[tpu]'``). Nothing runs on them: ``jit(...).lower(...).compile()`` gives
the target compiler's buffer assignment and optimised HLO, on a machine with neither.

Devices are laid out as on the real machines, host-major, so that the config's
``data``/``fsdp``/``tensor`` axes fall on hosts as they will on the cluster: 8 GPUs a host
(``tensor`` <= 8 stays inside an NVLink domain), and the TPU topology's chips per host, placed by
``mesh_utils.create_device_mesh`` as ``jax.make_mesh`` places them on a real slice.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

GPUS_PER_HOST = 8
XLA_FLAGS_GPU_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'xla_flags_gpu.txt')

# GpuTargetConfigProto text: what XLA:GPU would query from the device. H100: checked on this
# stack (../shared/STACK.md). A100-SXM4-80GB: the fields of openxla's
# xla/tools/hlo_opt/gpu_specs/ with the SXM4-80GB figures (108 SMs, 164 KiB shared memory per SM
# of which 163 KiB opt-in per block, 40 MiB L2, 2,039 GB/s, 1.41 GHz boost, the memory CUDA
# reports). dnn_version: the cuDNN 9 that jax-cuda12-plugin 0.10 runs with.
_H100 = '''gpu_device_info { cuda_compute_capability { major: 9 minor: 0 }
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448 shared_memory_per_core: 233472
  threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 registers_per_core_limit: 65536
  registers_per_block_limit: 65536 }
platform_name: "CUDA" dnn_version_info { major: 9 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"'''
_A100 = '''gpu_device_info { cuda_compute_capability { major: 8 minor: 0 }
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_block_optin: 166912 shared_memory_per_core: 167936
  threads_per_core_limit: 2048 core_count: 108 fpus_per_core: 64
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 2039000000000 l2_cache_size: 41943040 clock_rate_ghz: 1.41
  device_memory_size: 85056798720 registers_per_core_limit: 65536
  registers_per_block_limit: 65536 }
platform_name: "CUDA" dnn_version_info { major: 9 minor: 8 patch: 0 }
device_description_str: "NVIDIA A100-SXM4-80GB"'''


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str                  # 'cpu', 'gpu' or 'tpu': what jax.Device.platform says
    device_memory_gb: float        # the --device_memory_gb default
    peak_flops_per_device: float   # dense bf16, for the step time at a given MFU
    gpu_target_config: str = ''    # GPU: GpuTargetConfigProto text
    tpu_version: str = ''          # TPU: the topology name's prefix ('v5p' in 'v5p:2x2x2')
    tpu_dims: int = 3              # TPU: 3-D torus (v4, v5p) or 2-D (v5e)
    tpu_chip_config: str = 'default'   # v4: 'megacore' (one device a chip, as JAX shows it)
    install: str = ''              # the extra that brings the compiler

    @property
    def compiler(self) -> str:
        return f'XLA:{self.platform.upper()}'


TARGETS = {t.name: t for t in (
    # cpu: the simulated devices of the planning machine, as before --target existed; the step
    # time uses the config's train.peak_flops_per_device (peak_flops_per_device=0 here).
    Target('cpu', 'cpu', 80.0, 0.0),
    Target('h100', 'gpu', 80.0, 989e12, gpu_target_config=_H100, install='plan-gpu'),
    Target('a100', 'gpu', 80.0, 312e12, gpu_target_config=_A100, install='plan-gpu'),
    Target('tpu-v5p', 'tpu', 95.0, 459e12, tpu_version='v5p', install='tpu'),
    Target('tpu-v5e', 'tpu', 16.0, 197e12, tpu_version='v5e', tpu_dims=2, install='tpu'),
    Target('tpu-v4', 'tpu', 32.0, 275e12, tpu_version='v4', tpu_chip_config='megacore',
           install='tpu'),
)}


class TargetError(ValueError):
    """A target that cannot be built here: unknown, a device count it has no slice for, or its
    compiler not installed."""


def get(name: str) -> Target:
    if name not in TARGETS:
        raise TargetError(f'--target={name}: expected one of {sorted(TARGETS)}')
    return TARGETS[name]


def xla_flags_gpu() -> list[str]:
    """The flags of launch/gpu_env.sh (the same file), one string each."""
    flags = []
    with open(XLA_FLAGS_GPU_FILE) as f:
        for line in f:
            flags.extend(line.split('#', 1)[0].split())
    return flags


def tpu_topology_shape(target: Target, num_devices: int) -> tuple[int, ...]:
    """The most cubic (or square) slice of ``num_devices`` chips, each side a power of two and at
    least 2 (slices are 2x2x1 hosts and up), e.g. 8 -> 2x2x2, 128 -> 4x4x8, v5e 32 -> 4x8."""
    if num_devices < 4 or num_devices & (num_devices - 1):
        raise TargetError(f'--num_devices={num_devices}: a {target.name} slice has a power of '
                          f'two >= 4 chips (4, 8, 16, ...)')
    shape = [1] * target.tpu_dims
    for _ in range(int(math.log2(num_devices))):
        shape[shape.index(min(shape))] *= 2
    if min(shape) < 2:   # 4 chips of a 3-D torus: one 2x2x1 host
        return tuple(sorted(shape, reverse=True))
    return tuple(sorted(shape))


def _compile_only_gpus(target: Target, num_devices: int) -> list:
    from jax._src import xla_bridge as xb   # the documented way (STACK.md): no public API yet
    if num_devices % GPUS_PER_HOST and num_devices > GPUS_PER_HOST:
        raise TargetError(f'--num_devices={num_devices}: {target.name} nodes hold '
                          f'{GPUS_PER_HOST} GPUs; expected a multiple of {GPUS_PER_HOST}')
    hosts, per_host = max(num_devices // GPUS_PER_HOST, 1), min(num_devices, GPUS_PER_HOST)
    try:
        topology = xb.make_pjrt_topology('cuda', 'plan', topology=f'1x{hosts}x{per_host}',
                                         target_config=target.gpu_target_config)
    except Exception as e:  # noqa: BLE001 -- the plugin missing shows as several error types
        raise TargetError(f'--target={target.name}: cannot create compile-only GPUs ({e}); '
                          f"install the CUDA compiler with pip install -e '.[plan-gpu]'") from e
    devices = topology._make_compile_only_devices()  # noqa: SLF001
    return sorted(devices, key=lambda d: (d.process_index, d.id))


def _tpu_topology(target: Target, num_devices: int):
    from jax.experimental import topologies
    shape = tpu_topology_shape(target, num_devices)
    name = f'{target.tpu_version}:{"x".join(map(str, shape))}'
    host = (2, 2, 1)[:target.tpu_dims]    # 4 chips a host on multi-host v4 / v5p / v5e slices
    try:
        return topologies.get_topology_desc(
            platform='tpu', topology_name=name, chip_config_name=target.tpu_chip_config,
            chips_per_host_bounds=host if target.tpu_dims == 3 else host + (1,), num_slices=1)
    except Exception as e:  # noqa: BLE001
        raise TargetError(f'--target={target.name}: cannot create the {name} topology ({e}); '
                          f"install libtpu with pip install -e '.[tpu]'") from e


def compile_only_devices(target: Target, num_devices: int) -> list:
    """``num_devices`` devices of the target, in host-major order."""
    if target.platform == 'gpu':
        return _compile_only_gpus(target, num_devices)
    if target.platform == 'tpu':
        return list(_tpu_topology(target, num_devices).devices)
    raise TargetError(f'{target.name}: no compile-only devices (its devices are jax.devices())')


def mesh_device_order(target: Target, devices: list, shape: tuple[int, ...]) -> list:
    """The devices in the order whose reshape to ``shape`` is the cluster's mesh: on TPU the
    physical placement ``jax.make_mesh`` makes on a slice; elsewhere host-major as given."""
    if target.platform != 'tpu':
        return list(devices)
    from jax.experimental import mesh_utils
    return list(np.asarray(mesh_utils.create_device_mesh(
        shape, devices, allow_split_physical_axes=True)).reshape(-1))


def hosts(devices: list) -> int:
    return len({d.process_index for d in devices})
