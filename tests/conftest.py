"""Test setup: 8 simulated CPU devices (set before JAX runs anything) and shared fixtures."""

import os
import sys
import tempfile

# Tiny models: XLA's backend optimisations cost more compile time than they save in run time
# (about 3x faster compiles). Subprocesses that tests start inherit the flag, so programs compiled
# in and out of process are the same.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_backend_optimization_level=0').strip()
# CPU only, also in the subprocesses tests start: with the plan-gpu / tpu extras installed the
# CUDA plugin would look for a driver and libtpu for TPU chips (meditron-plan reaches their
# compilers through compile-only devices).
os.environ['JAX_PLATFORMS'] = 'cpu'
# Caches that default to the user's (meditron-prepare's decontamination index) go to a temp dir,
# also for subprocesses: tests never write to ~/.cache.
os.environ['XDG_CACHE_HOME'] = tempfile.mkdtemp(prefix='meditron-test-cache-')
import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_platforms', 'cpu')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
