"""The training loop end to end on the debug config and the shipped corpus: metrics and
checkpoints appear, a SIGKILLed run resumes to the same per-step losses, SIGTERM saves the current
step, a corrupted latest checkpoint falls back, and an incompatible config is refused."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import configs.debug
from meditron_jax import checkpoint, train
from meditron_jax.data import loader, prepare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """The shipped corpus, prepared once for this module."""
    path = str(tmp_path_factory.mktemp('data') / 'prepared')
    prepare.prepare(configs.debug.get_config().data, path)
    return path


def debug_config(data_dir, **train_overrides):
    c = configs.debug.get_config()
    c.data.dir = data_dir
    c.data.seq_len, c.data.global_batch_size = 64, 8
    c.mesh.update(dict(data=2, fsdp=4, tensor=1))
    c.train.update(dict(steps=12, log_every=1, eval_every=6, eval_steps=2))
    c.train.update(train_overrides)
    c.checkpoint.update(dict(every=4, keep=5))
    return c


def read_metrics(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return ({r['step']: r['loss'] for r in rows if 'loss' in r},
            {r['step']: r['val_loss'] for r in rows if 'val_loss' in r})


def overrides(config):
    """The config as --config.x.y=v flags (for the subprocess runs)."""
    flat = []
    for section in ('data', 'mesh', 'train', 'checkpoint'):
        for key, value in config[section].items():
            if not isinstance(value, (int, float, str)) or isinstance(value, bool):
                continue
            flat.append(f'--config.{section}.{key}={value}')
    return flat


def start_run(config, workdir):
    env = dict(os.environ, XLA_FLAGS=os.environ['XLA_FLAGS'] +
               ' --xla_force_host_platform_device_count=8',
               JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
    cmd = [sys.executable, '-m', 'meditron_jax.train', '--config',
           os.path.join(REPO, 'configs', 'debug.py'), '--workdir', str(workdir),
           *overrides(config)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f'run exited early ({proc.returncode}):\n{proc.stdout.read()}')
        time.sleep(0.2)
    proc.kill()
    raise AssertionError('timed out waiting for the run')


@pytest.fixture(scope='module')
def uninterrupted(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('uninterrupted'))
    train.train(debug_config(data_dir), workdir)
    return workdir


def test_debug_run_loss_falls_and_writes_metrics_checkpoints_tensorboard(uninterrupted):
    losses, val = read_metrics(uninterrupted)
    assert sorted(losses) == list(range(1, 13))
    assert np.mean([losses[s] for s in (10, 11, 12)]) < losses[1] - 0.5
    assert sorted(val) == [6, 12] and val[12] < val[6]
    row = json.loads(open(os.path.join(uninterrupted, 'metrics.jsonl')).readline())
    for key in ('step', 'loss', 'lr', 'grad_norm', 'tokens_per_sec', 'mfu'):
        assert key in row
    # On CPU, against the host's measured GEMM rate: a tiny model's step runs well below it
    # (against the debug configs' old assumed 1e11 FLOP/s it read 0.7-1.3 on these VMs).
    assert 0 < row['mfu'] < 1
    assert os.listdir(os.path.join(uninterrupted, 'tensorboard'))[0].startswith('events.out')
    assert sorted(int(s) for s in os.listdir(os.path.join(uninterrupted, 'checkpoints'))
                  if s.isdigit()) == [4, 8, 12]
    assert json.load(open(os.path.join(uninterrupted, 'config.json')))['train']['steps'] == 12


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_losses(data_dir, uninterrupted, tmp_path):
    config = debug_config(data_dir)
    workdir = tmp_path / 'killed'
    proc = start_run(config, workdir)
    # Kill hard as soon as step 4's checkpoint is complete (its tmp dir renamed).
    wait_for(lambda: (workdir / 'checkpoints' / '4').is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_losses, _ = read_metrics(workdir)
    assert 4 <= max(killed_losses) < 12, 'the run was not killed mid-way'

    train.train(config, str(workdir))
    expected, expected_val = read_metrics(uninterrupted)
    resumed, resumed_val = read_metrics(workdir)
    assert resumed == expected  # exactly: same batches in the same order, same numbers
    assert resumed_val == expected_val

    # The data state saved at step 4 is exactly "4 batches consumed": a fresh iterator restored
    # from it yields the 5th batch of an uninterrupted iterator, not the 4th or the 6th.
    kwargs = dict(seed=config.data.shuffle_seed, process_index=0, process_count=1)
    reference = loader.make_train_iterator(config.data, data_dir, **kwargs)
    batches = [next(reference) for _ in range(6)]
    restored = loader.make_train_iterator(config.data, data_dir, **kwargs)
    state = json.loads((workdir / 'checkpoints' / '4' / 'data' /
                        'process_0-of-1.json').read_text())
    restored.set_state(state)
    nxt = next(restored)
    np.testing.assert_array_equal(nxt['tokens'], batches[4]['tokens'])
    assert not np.array_equal(nxt['tokens'], batches[3]['tokens'])


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(data_dir, tmp_path):
    config = debug_config(data_dir, steps=1000)
    config.checkpoint.every = 1000
    workdir = tmp_path / 'preempted'
    proc = start_run(config, workdir)
    wait_for(lambda: (workdir / 'metrics.jsonl').exists()
             and len((workdir / 'metrics.jsonl').read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    losses, _ = read_metrics(workdir)
    saved = [int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit()]
    assert saved == [max(losses)], (saved, max(losses))
    assert 3 <= max(losses) < 1000


def test_corrupted_latest_checkpoint_falls_back_to_previous(uninterrupted, data_dir, tmp_path,
                                                            caplog):
    workdir = tmp_path / 'corrupt'
    shutil.copytree(uninterrupted, workdir)
    params_dir = workdir / 'checkpoints' / '12' / 'params'
    shutil.rmtree(params_dir)
    params_dir.mkdir()
    config = debug_config(data_dir, steps=14)
    with caplog.at_level('WARNING'):
        train.train(config, str(workdir))
    assert 'checkpoint step 12' in caplog.text and 'could not be restored' in caplog.text
    losses, _ = read_metrics(workdir)
    expected, _ = read_metrics(uninterrupted)
    # Resumed from step 8 and retrained 9..12 exactly (steps raised to 14: a compatible change;
    # all of these steps are in the warmup, whose learning rates do not depend on train.steps).
    assert [losses[s] for s in range(9, 13)] == [expected[s] for s in range(9, 13)]
    assert sorted(losses) == list(range(1, 15))
    # The unreadable step was moved aside, so step 12 was saved again, and so was the end.
    names = os.listdir(workdir / 'checkpoints')
    assert '12.unreadable' in names
    assert {'8', '12', '14'} <= set(names)
    assert checkpoint.read_config(str(workdir))[0] == 14


def flip_middle_of_params(step_dir, nbytes=64):
    """XORs nbytes in the middle of a step's largest params data file; returns its path."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / 'params') for f in fs
             if not f.startswith('_') and 'manifest' not in f]
    path = max(files, key=os.path.getsize)
    with open(path, 'r+b') as f:
        f.seek(os.path.getsize(path) // 2)
        data = f.read(nbytes)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0x5A for b in data))
    return path


def test_flipped_bytes_in_the_latest_step_are_caught_and_the_previous_step_used(
        uninterrupted, data_dir, tmp_path, caplog):
    from meditron_jax.convert import export_hf
    from meditron_jax import params_checkpoint
    workdir = tmp_path / 'flipped'
    shutil.copytree(uninterrupted, workdir)
    flip_middle_of_params(workdir / 'checkpoints' / '12')
    # export reads the workdir as it is: step 12 is reported, step 8 exported, nothing moved.
    with caplog.at_level('WARNING'):
        export_hf(str(workdir), str(tmp_path / 'hf'))
    assert 'checkpoint step 12 cannot be exported' in caplog.text
    import safetensors.numpy
    exported = {}
    for f in sorted(os.listdir(tmp_path / 'hf')):
        if f.endswith('.safetensors'):
            exported.update(safetensors.numpy.load_file(str(tmp_path / 'hf' / f)))
    step8 = params_checkpoint.ParamsReader(uninterrupted, step=8).read('final_norm.scale')
    np.testing.assert_array_equal(exported['model.norm.weight'], step8.astype(np.float32))
    assert '12' in os.listdir(workdir / 'checkpoints')
    # training: step 12 is named, moved aside, and the run resumes from step 8.
    caplog.clear()
    with caplog.at_level('WARNING'):
        train.train(debug_config(data_dir, steps=13), str(workdir))
    assert 'checkpoint step 12' in caplog.text and 'could not be restored' in caplog.text
    # Orbax/tensorstore read the flipped bytes without complaint: the fingerprints catch them.
    assert re.search(r'IntegrityError: .*params/[\w.]+: contents differ from what was saved',
                     caplog.text)
    losses, _ = read_metrics(workdir)
    expected, _ = read_metrics(uninterrupted)
    assert [losses[s] for s in range(9, 13)] == [expected[s] for s in range(9, 13)]
    assert '12.unreadable' in os.listdir(workdir / 'checkpoints')


def test_incompatible_config_is_refused_naming_the_keys(uninterrupted, data_dir, tmp_path):
    workdir = tmp_path / 'changed'
    shutil.copytree(uninterrupted, workdir)
    config = debug_config(data_dir, steps=14)
    config.model.num_layers = 2
    with pytest.raises(ValueError, match=r'model\.num_layers: checkpoint 4 vs config 2'):
        train.train(config, str(workdir))


def test_optimizer_structure_change_is_refused_naming_the_key(uninterrupted, data_dir, tmp_path):
    workdir = tmp_path / 'noclip'
    shutil.copytree(uninterrupted, workdir)
    config = debug_config(data_dir, steps=14)
    config.optim.clip_norm = 0.0
    with pytest.raises(ValueError, match=r'optim\.clip_norm: checkpoint 1\.0 vs config 0\.0'):
        train.train(config, str(workdir))


def test_workdir_checkpoint_keeps_grain_state_and_config(uninterrupted):
    step, saved = checkpoint.read_config(uninterrupted)
    assert step == 12 and saved['model']['num_layers'] == 4
    assert (os.path.exists(os.path.join(uninterrupted, 'checkpoints', '12', 'data',
                                        'process_0-of-1.json')))


def test_load_workdir_reproduces_the_logged_validation_loss(uninterrupted, data_dir):
    import meditron_jax
    from meditron_jax import model
    m = meditron_jax.load(uninterrupted)
    config = debug_config(data_dir)
    batches = loader.make_eval_iterator(config.data, data_dir, process_index=0, process_count=1)
    loss_sum = count = 0.0
    for _ in range(config.train.eval_steps):
        b = next(batches)
        # Rows are packed: run with their positions and segments, as training does.
        logits = model.forward(m.params, m.config, b['tokens'][:, :-1], b['positions'][:, :-1],
                               b['segment_ids'][:, :-1])
        seg = b['segment_ids']
        weights = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
        s, c = model.cross_entropy(logits, b['tokens'][:, 1:], weights)
        loss_sum, count = loss_sum + float(s), count + float(c)
    _, val = read_metrics(uninterrupted)
    assert loss_sum / count == pytest.approx(val[12], rel=1e-5)
    assert m(np.arange(16)[None]).shape == (1, 16, m.config.vocab_size)
    assert m.tokenizer.GetPieceSize() == m.true_vocab_size   # the prepared data's tokenizer


def diverging_config(data_dir, **train_overrides):
    config = debug_config(data_dir, steps=6, eval_every=0, **train_overrides)
    config.optim.update(dict(lr_peak=1e12, warmup_steps=0, clip_norm=0.0))
    return config


@pytest.fixture(scope='module')
def first_bad_step(data_dir, tmp_path_factory):
    """The first step whose update is skipped, read off a skip-mode run logging every step."""
    rows = train.train(diverging_config(data_dir, log_every=1, nonfinite='skip'),
                       str(tmp_path_factory.mktemp('skip-every-step')))
    bad = [r['step'] for r in rows if r['skipped_updates'] > 0]
    assert bad and bad[0] > 1, rows   # the first update is finite: there are rows before it
    return bad[0]


def test_nonfinite_loss_stops_the_run_naming_the_step(data_dir, tmp_path, first_bad_step):
    workdir = tmp_path / 'diverged'
    with pytest.raises(train.NonFiniteError, match=rf'^step {first_bad_step}: non-finite loss'):
        train.train(diverging_config(data_dir, log_every=1), str(workdir))
    losses, _ = read_metrics(workdir)
    assert sorted(losses) == list(range(1, first_bad_step))   # logged up to the bad step only
    assert all(np.isfinite(v) for v in losses.values())


def test_nonfinite_skip_mode_counts_skipped_updates_and_goes_on(data_dir, tmp_path,
                                                                 first_bad_step):
    rows = train.train(diverging_config(data_dir, log_every=3, nonfinite='skip'),
                       str(tmp_path / 'skipping'))
    assert [r['step'] for r in rows] == [3, 6]
    assert rows[-1]['skipped_updates'] == 6 - first_bad_step + 1


def test_export_hf_reads_a_training_workdir_directly(uninterrupted, tmp_path):
    import torch
    import transformers
    import meditron_jax
    from meditron_jax.convert import export_hf
    export_hf(uninterrupted, str(tmp_path / 'hf'))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf'),
                                                           dtype=torch.float32)
    tokens = np.arange(1, 33)[None] % 2048
    with torch.no_grad():
        expected = hf(torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(meditron_jax.load(uninterrupted)(tokens))
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(data_dir, tmp_path):
    config = debug_config(data_dir)
    config.model.vocab_size = 1024
    with pytest.raises(ValueError, match=r'2048 pieces but model\.vocab_size=1024.*e\.g\. 2048'):
        train.train(config, str(tmp_path / 'small-vocab'))
