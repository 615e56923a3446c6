"""README promises of meditron-train, in process: bfloat16 compute keeps float32 master weights;
config errors name their keys before anything is written; the shipped 7B and 70B configs load
and validate on their target device counts; ``checkpoint.keep`` prunes old steps; a crash in the
middle of a save leaves no step that looks complete; resuming with a changed learning rate (and
step count) is allowed and logged, and the new schedule is used."""

import os
import shutil
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

import configs.debug
from meditron_jax import checkpoint, model, optim, sharding, train
from tests.config_helpers import validate_shipped_config
from tests.data_helpers import prepared_debug
from tests.test_train_step import random_batch, run_steps, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def debug_config(**train_overrides):
    c = configs.debug.get_config()
    c.data.dir = prepared_debug()
    c.data.prepare_workers = 1
    c.data.seq_len, c.data.global_batch_size = 64, 8
    c.mesh.update(dict(data=2, fsdp=4, tensor=1))
    c.train.update(dict(steps=6, log_every=1, eval_every=0, eval_steps=1))
    c.train.update(train_overrides)
    c.checkpoint.update(dict(every=2, keep=2))
    return c


def step_dirs(workdir):
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


# ------------------------------------------------------------------------- mixed precision


def test_bfloat16_compute_keeps_float32_master_weights_and_float32_like_losses():
    batches = [random_batch(seed=s) for s in range(2)]
    bf16 = tiny_config()
    bf16.model.compute_dtype = 'bfloat16'
    losses16, state16 = run_steps(bf16, batches, jax.devices()[:1])
    # Master weights and Adam's moments stay float32 after the bf16 steps.
    assert {x.dtype for x in jax.tree.leaves(state16.params)} == {np.dtype('float32')}
    assert {x.dtype for x in jax.tree.leaves(state16.opt_state)
            if np.issubdtype(x.dtype, np.floating)} == {np.dtype('float32')}
    assert losses16[-1] < losses16[0]
    # The first step's loss against float32 compute on the same initial params and batch
    # (run_steps initialises with seed 0; the loss alone is cheaper to compile than a step).
    cfg32 = train.model_config(tiny_config())
    params = model.init_params(cfg32, sharding.make_mesh(tiny_config().mesh, jax.devices()[:1]))
    loss_sum, count = jax.jit(train.loss_terms, static_argnums=1)(params, cfg32, batches[0])
    loss32 = float(loss_sum / count)
    assert losses16[0] == pytest.approx(loss32, rel=1e-3)   # measured: 7e-6
    assert losses16[0] != loss32, 'the float32 loss exactly: the bfloat16 setting changed nothing'


# ---------------------------------------------------------------------- config validation


@pytest.mark.parametrize('changes,keys', [
    (dict(global_batch_size=12), ['data.global_batch_size', 'mesh.data', 'mesh.fsdp']),
    (dict(grad_accum_steps=3), ['optim.grad_accum_steps', 'data.global_batch_size']),
    (dict(seq_len=1024), ['data.seq_len', 'model.max_seq_len']),
])
def test_config_errors_name_the_keys_before_anything_is_written(changes, keys, tmp_path):
    config = debug_config()
    for key, value in changes.items():
        section = 'optim' if key == 'grad_accum_steps' else 'data'
        config[section][key] = value
    workdir = tmp_path / 'run'
    with pytest.raises(ValueError) as error:
        train.train(config, str(workdir))
    message = str(error.value)
    assert all(k in message for k in keys), message
    assert not workdir.exists()


@pytest.mark.parametrize('name,devices,mesh,billions', [
    ('meditron_7b', 64, dict(data=8, fsdp=8, tensor=1), 6.7),       # 8 nodes x 8 GPUs
    ('meditron_70b', 128, dict(data=1, fsdp=16, tensor=8), 69.0),   # 16 nodes x 8 GPUs
])
def test_shipped_config_loads_and_validates_on_its_target_devices(name, devices, mesh, billions):
    out = validate_shipped_config(name, devices)
    assert out['mesh'] == mesh
    assert out['params'] == pytest.approx(billions * 1e9, rel=0.02)
    assert out['dtypes'] == ['float32', 'bfloat16']


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope='module')
def run6(tmp_path_factory):
    """6 steps, a checkpoint every 2, keep=2."""
    workdir = str(tmp_path_factory.mktemp('readme-train') / 'run')
    train.train(debug_config(), workdir)
    return workdir


def test_checkpoint_keep_prunes_all_but_the_newest_steps(run6):
    assert step_dirs(run6) == [4, 6]
    assert sorted(os.listdir(os.path.join(run6, 'checkpoints'))) == ['4', '6']


CRASH_MID_SAVE = '''
import os, sys
import grain
import jax.numpy as jnp
from meditron_jax import checkpoint
manager = checkpoint.make_manager(sys.argv[1], 3)
params = {'w': jnp.ones((2048, 4096))}          # 32 MB a tree: the async write takes a while
opt_state = {'mu': jnp.zeros((2048, 4096))}
data = iter(grain.MapDataset.range(8).to_iter_dataset())
next(data)
checkpoint.save(manager, 1, params, opt_state, data, {'step': 1}, {})
checkpoint.wait(manager)
next(data)
checkpoint.save(manager, 2, params, opt_state, data, {'step': 2}, {})
root = os.path.join(sys.argv[1], 'checkpoints')
for _ in range(100000):                          # killed once step 2 is being written
    names = os.listdir(root)
    if '2' in names:
        os._exit(3)                              # too late: the save completed
    if any(n.startswith('2.') for n in names):
        os._exit(9)
os._exit(4)
'''


def test_a_crash_mid_save_leaves_nothing_that_looks_complete(tmp_path):
    workdir = str(tmp_path / 'crashed')
    done = subprocess.run([sys.executable, '-c', CRASH_MID_SAVE, workdir], cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 9, (done.returncode, done.stderr[-3000:])
    names = os.listdir(os.path.join(workdir, 'checkpoints'))
    assert '1' in names and '2' not in names, names
    assert any(n.startswith('2.orbax-checkpoint-tmp') for n in names), \
        f'the crash did not happen mid-save: {names}'
    assert checkpoint.read_config(workdir) == (1, {'step': 1})
    # Resuming picks step 1, with its data position (one element consumed before that save).
    manager = checkpoint.make_manager(workdir, 3)
    abstract = {'w': jax.ShapeDtypeStruct((2048, 4096), np.float32)}
    data = iter(grain.MapDataset.range(8).to_iter_dataset())
    step, params, _, _ = checkpoint.restore_latest(
        manager, abstract, {'mu': jax.ShapeDtypeStruct((2048, 4096), np.float32)}, data,
        {'step': 1})
    manager.close()
    assert step == 1 and float(params['w'][0, 0]) == 1.0 and next(data) == 1


def test_resume_with_a_changed_learning_rate_is_logged_and_uses_it(run6, tmp_path, caplog):
    workdir = str(tmp_path / 'new-lr')
    shutil.copytree(run6, workdir)
    config = debug_config(steps=8)
    old_peak = config.optim.lr_peak
    config.optim.lr_peak = old_peak / 3
    with caplog.at_level('WARNING'):
        rows = train.train(config, workdir)
    text = caplog.text
    assert 'resuming step 6 with config changes' in text
    assert 'optim.lr_peak' in text and repr((old_peak, old_peak / 3)) in text, text
    assert 'train.steps' in text
    # Steps 7 and 8 ran with the new schedule (warmup: lr is proportional to the peak).
    assert [r['step'] for r in rows] == [7, 8]
    new = optim.lr_schedule(config.optim, 8)
    for r in rows:   # the old peak would give 3x this
        assert r['lr'] == pytest.approx(float(new(r['step'] - 1)), rel=1e-6) and r['lr'] > 0
    assert step_dirs(workdir) == [6, 8]
