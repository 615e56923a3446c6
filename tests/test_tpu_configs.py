"""configs/meditron_{7b,70b}_tpu.py: they load, validate on their v5p slice's chip count (as
test_readme_train checks the GPU configs), keep the GPU configs' recipe and global batch, and
use the splash kernel with a sequence length it tiles."""

import importlib
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VALIDATE = '''
import json, sys
import jax
jax.config.update('jax_num_cpu_devices', int(sys.argv[2]))
jax.config.update('jax_platforms', 'cpu')
import importlib
from meditron_jax import model, sharding, splash, train
config = importlib.import_module('configs.' + sys.argv[1]).get_config()
mesh = sharding.make_mesh(config.mesh)
train.validate_config(config, mesh)
cfg = train.model_config(config)
model.param_shardings(cfg, mesh)        # every parameter's split divides: shapes only
block = splash.block_size(int(config.data.seq_len))
rows = int(config.data.global_batch_size) // int(config.optim.grad_accum_steps)
print(json.dumps(dict(mesh=dict(mesh.shape), attention=cfg.attention, block=block,
                      rows_per_chip=rows / sharding.data_parallel_size(mesh))))
'''

RECIPE = ('data.seq_len', 'data.global_batch_size', 'data.sources', 'optim.lr_peak',
          'optim.lr_min', 'optim.warmup_steps', 'optim.b1', 'optim.b2', 'optim.weight_decay',
          'optim.clip_norm', 'train.steps', 'train.init_from', 'model.compute_dtype',
          'model.vocab_size', 'model.hidden_size', 'model.num_layers')


@pytest.mark.parametrize('name,chips,rows_per_chip', [
    ('meditron_7b_tpu', 64, 5),      # v5p-128
    ('meditron_70b_tpu', 128, 1),    # v5p-256
])
def test_tpu_config_validates_on_its_slice_and_keeps_the_recipe(name, chips, rows_per_chip):
    done = subprocess.run([sys.executable, '-c', VALIDATE, name, str(chips)], cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == dict(mesh=dict(data=1, fsdp=chips, tensor=1), attention='splash', block=512,
                       rows_per_chip=rows_per_chip)
    tpu = importlib.import_module(f'configs.{name}').get_config()
    gpu = importlib.import_module(f'configs.{name.removesuffix("_tpu")}').get_config()
    for key in RECIPE:
        section, field = key.split('.')
        assert tpu[section][field] == gpu[section][field], key
    assert tpu.train.peak_flops_per_device == 459e12
