"""SFT runs through the training loop (configs/sft_debug.py on the shipped chat set): a SIGKILLed
run resumes to the same per-step losses, train.epochs sets the steps from the prepared tokens,
and train.init_from takes a training workdir (growing the vocabulary)."""

import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import configs.sft_debug
import meditron_jax
from meditron_jax import train
from meditron_jax.data import prepare
from tests.test_train import overrides, read_metrics, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sft_config(data_dir, **train_overrides):
    c = configs.sft_debug.get_config()
    c.data.dir = data_dir
    c.data.seq_len, c.data.global_batch_size = 64, 8
    c.mesh.update(dict(data=2, fsdp=4, tensor=1))
    c.train.update(dict(epochs=0.0, steps=12, log_every=1, eval_every=6, eval_steps=1))
    c.train.update(train_overrides)
    c.checkpoint.update(dict(every=4, keep=5))
    return c


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('sft-data') / 'prepared')
    manifest = prepare.prepare(sft_config(path).data, path)
    assert manifest['totals']['train']['truncated'] > 0   # some conversations exceed 65 tokens
    return path


@pytest.fixture(scope='module')
def uninterrupted(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('sft-uninterrupted'))
    train.train(sft_config(data_dir), workdir)
    return workdir


def test_epochs_set_the_steps_from_the_prepared_tokens(data_dir):
    config = sft_config(data_dir, epochs=3.0)
    manifest = prepare.prepare(config.data, data_dir)
    tokens = manifest['totals']['train']['tokens']
    assert train.steps_for(config, manifest) == math.ceil(3 * tokens / (8 * 65))
    assert train.steps_for(sft_config(data_dir), manifest) == 12


def test_sft_loss_falls(uninterrupted):
    losses, val = read_metrics(uninterrupted)
    assert sorted(losses) == list(range(1, 13)) and sorted(val) == [6, 12]
    assert np.mean([losses[s] for s in (10, 11, 12)]) < losses[1] - 0.5


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_losses_on_chat_data(
        data_dir, uninterrupted, tmp_path):
    config = sft_config(data_dir)
    workdir = tmp_path / 'killed'
    env = dict(os.environ, XLA_FLAGS=os.environ['XLA_FLAGS'] +
               ' --xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu',
               PYTHONUNBUFFERED='1')
    cmd = [sys.executable, '-m', 'meditron_jax.train', '--config',
           os.path.join(REPO, 'configs', 'sft_debug.py'), '--workdir', str(workdir),
           *overrides(config)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (workdir / 'checkpoints' / '4').is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed, _ = read_metrics(workdir)
    assert 4 <= max(killed) < 12, 'the run was not killed mid-way'

    train.train(config, str(workdir))
    assert read_metrics(workdir) == read_metrics(uninterrupted)   # exactly, val losses too


def test_init_from_a_training_workdir_grows_the_vocabulary(data_dir, uninterrupted, tmp_path):
    config = sft_config(data_dir, steps=1, eval_every=0, init_from=uninterrupted)
    config.model.vocab_size = 640
    config.optim.update(dict(lr_peak=0.0, lr_min=0.0))   # one step that changes nothing
    workdir = str(tmp_path / 'finetuned')
    train.train(config, workdir)
    before, after = meditron_jax.load(uninterrupted).params, meditron_jax.load(workdir).params
    embed_before = np.asarray(before['embed']['embedding'])
    embed_after = np.asarray(after['embed']['embedding'])
    assert embed_after.shape == (640, embed_before.shape[1])
    np.testing.assert_array_equal(embed_after[:512], embed_before)
    np.testing.assert_allclose(embed_after[512:], embed_before.mean(0, keepdims=True)
                               .repeat(128, 0), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(after['layers']['attn']['q']['kernel']),
                                  np.asarray(before['layers']['attn']['q']['kernel']))
