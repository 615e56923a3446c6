"""Keep freed host memory for reuse when the compiled step runs on the CPU.

XLA:CPU allocates each execution's temporary buffer (every activation of a train step: 0.66 GB
at bench_vs_torch's small shape, 1.6 GB at llama_100m) with ``posix_memalign`` from its worker
threads. glibc serves a request over 64 MB in a thread's arena with a fresh ``mmap`` and unmaps
it on free, so every step faulted its whole temporary buffer in again, one zeroed 4 KiB page at
a time: 170,000 page faults and 0.3 s of kernel time in a 2 CPU-s step at the small shape,
406,000 and 0.75 s at llama_100m. Kept, bench_vs_torch's scanned llama_100m step takes
2.82 s instead of 3.76 (BENCHMARKS.md).

``keep_freed_memory`` sets glibc's malloc to one arena (the main one, which grows with ``brk``
and serves large requests from its heap), with ``mmap`` and trimming off, so the buffer a step
frees is the buffer the next step gets, already mapped. It must run before the JAX backend
starts (the worker threads pick their arena on their first allocation), and only where the
program runs on the CPU: a GPU or TPU host's large host buffers (checkpoint staging) should go
back to the system as usual, and its many threads keep their own arenas. The cost is that the
process keeps its peak heap: the debug run's peak resident memory is 1.61 GB instead of 1.36
(its page faults 0.6M instead of 13.6M, 64 s instead of 73), llama_100m's 3.71 GiB instead of
3.47. ``MEDITRON_KEEP_HOST_MEMORY=0`` turns it off, ``=1`` forces it on.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os

import jax

log = logging.getLogger(__name__)

ENV = 'MEDITRON_KEEP_HOST_MEMORY'
# Device files of the accelerators JAX can run on (NVIDIA, AMD, TPU VMs old and new).
ACCELERATOR_DEVICE_FILES = ('/dev/nvidia[0-9]*', '/dev/kfd', '/dev/accel[0-9]*', '/dev/vfio/[0-9]*')
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def runs_on_cpu(jax_platforms: str | None = None) -> bool:
    """Whether this process's JAX backend will be the CPU, decided without starting it: the
    first of ``jax_platforms`` (default: jax's setting, JAX_PLATFORMS) when set, else whether
    the machine has no accelerator device file."""
    if jax_platforms is None:
        jax_platforms = jax.config.jax_platforms
    first = (jax_platforms or '').split(',')[0].strip()
    if first:
        return first == 'cpu'
    return not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES)


def keep_freed_memory() -> bool:
    """One malloc arena, no ``mmap``, no trimming (see the module docstring); True when glibc
    took all three settings, False where malloc is not glibc's (nothing changed then)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # A trim threshold of -1 is SIZE_MAX in glibc: the heap's top is never given back.
    return all(mallopt(param, value) == 1
               for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def configure_for_cpu_step() -> bool:
    """``keep_freed_memory`` if the step will run on the CPU (or ``MEDITRON_KEEP_HOST_MEMORY=1``),
    unless ``MEDITRON_KEEP_HOST_MEMORY=0``. Call before anything starts the JAX backend.
    Returns whether the settings are in effect."""
    wanted = os.environ.get(ENV, '')
    if wanted not in ('', '0', '1'):
        raise ValueError(f'{ENV}={wanted!r}: expected 0 (off), 1 (on) or unset (on for CPU runs)')
    if wanted == '0' or (wanted == '' and not runs_on_cpu()):
        return False
    kept = keep_freed_memory()
    log.debug('host memory: freed buffers kept for reuse (%s)', 'on' if kept else 'not glibc')
    return kept
