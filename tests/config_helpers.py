"""Validating a shipped config as meditron-train would on its cluster, in a fresh process with
as many simulated CPU devices as the cluster has (shared by the GPU and TPU config tests)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VALIDATE = '''
import json, sys
import jax
jax.config.update('jax_num_cpu_devices', int(sys.argv[2]))
jax.config.update('jax_platforms', 'cpu')
import importlib
from meditron_jax import model, sharding, splash, train
from meditron_jax.data import sources
config = importlib.import_module('configs.' + sys.argv[1]).get_config()
mesh = sharding.make_mesh(config.mesh)
train.validate_config(config, mesh)
cfg = train.model_config(config)
model.param_shardings(cfg, mesh)        # every parameter's split divides: shapes only
sources.parse_sources(config.data.sources)
rows = int(config.data.global_batch_size) // int(config.optim.grad_accum_steps)
block = splash.block_size(int(config.data.seq_len)) if cfg.attention == 'splash' else None
print(json.dumps(dict(mesh=dict(mesh.shape), params=cfg.num_params(),
                      dtypes=[cfg.param_dtype, cfg.compute_dtype], attention=cfg.attention,
                      block=block, rows_per_device=rows / sharding.data_parallel_size(mesh))))
'''


def validate_shipped_config(name: str, devices: int) -> dict:
    """configs/<name>.py validated on `devices` devices: its mesh, parameter count, dtypes,
    attention, splash block (or None) and sequences per device per micro-batch."""
    done = subprocess.run([sys.executable, '-c', VALIDATE, name, str(devices)], cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
