"""Test setup: 8 simulated CPU devices (set before JAX runs anything) and shared fixtures."""

import os
import sys

os.environ.setdefault('XLA_FLAGS', '')
import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_platforms', 'cpu')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
