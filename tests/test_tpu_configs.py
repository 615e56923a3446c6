"""configs/meditron_{7b,70b}_tpu.py: they load, validate on their v5p slice's chip count (as
test_readme_train checks the GPU configs), keep the GPU configs' recipe and global batch, and
use the splash kernel with a sequence length it tiles."""

import importlib

import pytest

from tests.config_helpers import validate_shipped_config

RECIPE = ('data.seq_len', 'data.global_batch_size', 'data.sources', 'optim.lr_peak',
          'optim.lr_min', 'optim.warmup_steps', 'optim.b1', 'optim.b2', 'optim.weight_decay',
          'optim.clip_norm', 'train.steps', 'train.init_from', 'model.compute_dtype',
          'model.vocab_size', 'model.hidden_size', 'model.num_layers')


@pytest.mark.parametrize('name,chips,rows_per_chip', [
    ('meditron_7b_tpu', 64, 5),      # v5p-128
    ('meditron_70b_tpu', 128, 1),    # v5p-256
])
def test_tpu_config_validates_on_its_slice_and_keeps_the_recipe(name, chips, rows_per_chip):
    out = validate_shipped_config(name, chips)
    out = {k: out[k] for k in ('mesh', 'attention', 'block', 'rows_per_device')}
    assert out == dict(mesh=dict(data=1, fsdp=chips, tensor=1), attention='splash', block=512,
                       rows_per_device=rows_per_chip)
    tpu = importlib.import_module(f'configs.{name}').get_config()
    gpu = importlib.import_module(f'configs.{name.removesuffix("_tpu")}').get_config()
    for key in RECIPE:
        section, field = key.split('.')
        assert tpu[section][field] == gpu[section][field], key
    assert tpu.train.peak_flops_per_device == 459e12
