"""host_memory: freed large buffers stay mapped for the next step (checked by page faults in a
fresh process, since malloc's arenas are fixed once threads have allocated), and the choice of
when to do it."""

import os
import subprocess
import sys
import textwrap

import pytest

from meditron_jax import host_memory

# A new thread (as XLA:CPU's workers are) mallocs, touches and frees a 256 MB buffer, twice;
# prints the page faults of the second round.
_PROBE = textwrap.dedent('''
    import ctypes, resource, threading
    from meditron_jax import host_memory
    kept = host_memory.configure_for_cpu_step()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    faults = []
    def round_trip():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buf = libc.malloc(256 * 2**20)
        ctypes.memset(buf, 1, 256 * 2**20)
        libc.free(buf)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    for _ in range(2):
        t = threading.Thread(target=round_trip)
        t.start()
        t.join()
    print(kept, faults[1])
''')


def probe(setting: str) -> tuple[bool, int]:
    env = dict(os.environ, MEDITRON_KEEP_HOST_MEMORY=setting, JAX_PLATFORMS='cpu')
    out = subprocess.run([sys.executable, '-c', _PROBE], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == 'True', int(out[1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="glibc's malloc only")
def test_freed_buffer_is_reused_without_page_faults():
    pages = 256 * 2**20 // 4096
    kept, faults = probe('1')
    assert kept
    assert faults < pages // 100, faults  # the second buffer is the first one, still mapped
    kept, faults = probe('0')
    assert not kept
    assert faults > pages // 2, faults  # glibc's default: a fresh mmap, faulted in again


def test_runs_on_cpu_follows_jax_platforms(monkeypatch):
    assert host_memory.runs_on_cpu('cpu')
    assert not host_memory.runs_on_cpu('cuda,cpu')
    # Unset: the machine's accelerator device files decide.
    monkeypatch.setattr(host_memory, 'ACCELERATOR_DEVICE_FILES', ('/nonexistent/nvidia[0-9]*',))
    assert host_memory.runs_on_cpu('')
    monkeypatch.setattr(host_memory, 'ACCELERATOR_DEVICE_FILES', (os.devnull,))
    assert not host_memory.runs_on_cpu('')


def test_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, 'yes')
    with pytest.raises(ValueError, match='MEDITRON_KEEP_HOST_MEMORY'):
        host_memory.configure_for_cpu_step()
    monkeypatch.setenv(host_memory.ENV, '0')
    assert host_memory.configure_for_cpu_step() is False
