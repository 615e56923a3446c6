"""Multi-host training on the real path, and checkpoints across meshes and process counts.

A job of 2 processes x 4 CPU devices (launch/local.py: real jax.distributed on localhost, gloo
collectives) trains the debug model on a (data=2, fsdp=4) mesh spanning both processes; its
losses equal one process's on 8 devices fed the same global batches, each process read only its
own documents, and its checkpoint restores in a single process, except for the data position,
which is refused with an explanation (grain keeps one state per process). A checkpoint saved on
fsdp=8 restores with the same values onto (data=2, fsdp=2, tensor=2) and onto one device, and
training continues there with the losses of an uninterrupted run.
"""

import os
import shutil
import sys

import jax
import numpy as np
import pytest

import configs.debug
from launch import local
from meditron_jax import checkpoint, model, optim, sharding, train
from meditron_jax.data import loader, prepare
from meditron_jax.data import shards as shards_lib

BATCH_KEYS = train.BATCH_KEYS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('data') / 'prepared')
    prepare.prepare(configs.debug.get_config().data, path)
    return path


def small_config(data_dir, data=2, fsdp=4, tensor=1, steps=STEPS):
    c = configs.debug.get_config()
    c.data.dir = data_dir
    c.data.seq_len, c.data.global_batch_size = 64, 8
    c.mesh.update(dict(data=data, fsdp=fsdp, tensor=tensor))
    c.train.update(dict(steps=steps, log_every=1, eval_every=steps, eval_steps=1))
    c.checkpoint.update(dict(every=3, keep=5))
    return c


def as_flags(config):
    out = []
    for section in ('data', 'mesh', 'train', 'checkpoint'):
        for key, value in config[section].items():
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                out.append(f'--config.{section}.{key}={value}')
    return out


def read_losses(workdir):
    import json
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return rows


def reference_run(config, local_batches):
    """One process, 8 devices, the same mesh: train_step on the given global batches."""
    cfg = train.model_config(config)
    mesh = sharding.make_mesh(config.mesh)
    optimizer = optim.make_optimizer(config.optim, STEPS)
    schedule = optim.lr_schedule(config.optim, STEPS)
    _, shardings = train.abstract_state(cfg, optimizer, mesh)
    state = train.fresh_state(model.init_params(cfg, mesh, seed=int(config.train.seed)),
                              optimizer, shardings)
    step_fn, _ = train.compile_steps(config, cfg, optimizer, schedule, shardings, mesh)
    losses = []
    with jax.set_mesh(mesh):
        for batch in local_batches:
            state, metrics = step_fn(state, loader.to_global_batch(batch, mesh))
            losses.append(float(metrics['loss']))
    return losses, jax.device_get(state.params)


def documents_by_shard(config, data_dir, process_count):
    """Every training document, as a string of token characters, with the process that owns it
    (its index in the source's stored order, modulo the process count)."""
    manifest = shards_lib.read_manifest(data_dir)
    dtype = np.dtype(shards_lib.DTYPES[manifest['dtype']]).newbyteorder('<')
    docs = []
    for source in config.data.sources:
        records = [r for path in shards_lib.split_paths(data_dir, manifest, source['name'], 'train')
                   for r in shards_lib.read_records(path)]
        docs += [(''.join(map(chr, 0x4E00 + np.frombuffer(r, dtype).astype(np.int64))),
                  i % process_count) for i, r in enumerate(records)]
    return docs


def owners_of_pieces(batches, docs, min_len=8):
    """For each document piece (a run of one segment id in a row) of at least min_len tokens that
    occurs in exactly one document: that document's owner."""
    owners = []
    for batch in batches:
        for tokens, segments in zip(batch['tokens'], batch['segment_ids']):
            for seg in np.unique(segments[segments > 0]):
                piece = ''.join(map(chr, 0x4E00 + tokens[segments == seg].astype(np.int64)))
                if len(piece) < min_len:
                    continue
                hits = [owner for text, owner in docs if piece in text]
                if len(hits) == 1:
                    owners.append(hits[0])
    return owners


def load_local_batches(workdir, process):
    arrays = np.load(os.path.join(workdir, f'local_batches.process_{process}.npz'))
    n = len(arrays.files) // len(BATCH_KEYS)
    return [{k: arrays[f'{k}_{i}'] for k in BATCH_KEYS}
            for i in range(n)]


@pytest.mark.slow
def test_two_processes_train_like_one_and_read_their_own_documents(data_dir, tmp_path, capfd):
    config = small_config(data_dir)
    workdir = str(tmp_path / 'run')
    command = [sys.executable, os.path.join(REPO, 'tests', 'multihost_worker.py'), '--config',
               os.path.join(REPO, 'configs', 'debug.py'), '--workdir', workdir, *as_flags(config)]
    status = local.launch(command, num_processes=2, devices_per_process=4, timeout=400, cwd=REPO)
    out = capfd.readouterr().out
    assert status == 0, out[-5000:]

    # Only process 0 wrote metrics (one row per step, one validation row) and progress lines.
    rows = read_losses(workdir)
    assert [r['step'] for r in rows if 'loss' in r] == list(range(1, STEPS + 1))
    assert [r['step'] for r in rows if 'val_loss' in r] == [STEPS]
    assert any(line.startswith('[p0] ') and 'step 1/' in line for line in out.splitlines())
    assert not any(line.startswith('[p1] ') and 'step 1/' in line for line in out.splitlines())

    # Each process fed its own shard of the data: the batches of loader(process i of 2) ...
    local_batches = [load_local_batches(workdir, p) for p in range(2)]
    for p in range(2):
        expected = loader.make_train_iterator(config.data, data_dir, seed=0, process_index=p,
                                              process_count=2)
        for got in local_batches[p][:STEPS]:
            want = next(expected)
            for key in BATCH_KEYS:
                np.testing.assert_array_equal(got[key], want[key])
    # ... made of documents that only that process owns (found by content in the shards).
    docs = documents_by_shard(config, data_dir, 2)
    for p in range(2):
        owners = owners_of_pieces(local_batches[p][:STEPS], docs)
        assert len(owners) >= 10, f'process {p}: too few identifiable pieces ({len(owners)})'
        assert set(owners) == {p}, f'process {p} read documents of processes {set(owners)}'

    # The same global batches (process 0's rows, then process 1's) in one process on 8 devices.
    global_batches = [{k: np.concatenate([local_batches[0][i][k], local_batches[1][i][k]])
                       for k in BATCH_KEYS} for i in range(STEPS)]
    losses, params = reference_run(config, global_batches)
    np.testing.assert_allclose([r['loss'] for r in rows if 'loss' in r], losses, rtol=2e-5)

    # The checkpoint's params restore in one process, onto another mesh (fsdp=8).
    cfg = train.model_config(config)
    mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
    abstract, _ = train.abstract_state(cfg, optim.make_optimizer(config.optim, STEPS), mesh)
    step, restored, _ = checkpoint.restore_params(workdir, abstract.params)
    assert step == STEPS
    # ... checked against the fingerprints the two processes computed when saving.
    digests = checkpoint.read_digests(workdir, step)
    assert set(digests['params']) == {jax.tree_util.keystr(p, simple=True, separator='.')
                                      for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6),
                 restored, params)

    # Resuming the whole run in one process is refused, naming the cause and the way out.
    with pytest.raises(checkpoint.DataStateError,
                       match=r'written by 2 processes .* this job has 1.*Resume with 2 processes'):
        train.train(small_config(data_dir, steps=STEPS + 2), workdir)


def restore_on(config, workdir, devices):
    """(params, opt_state, train iterator, mesh) of workdir's latest step on a mesh over devices."""
    cfg = train.model_config(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    optimizer = optim.make_optimizer(config.optim, int(config.train.steps))
    abstract, _ = train.abstract_state(cfg, optimizer, mesh)
    it = loader.make_train_iterator(config.data, config.data.dir, seed=0, process_index=0,
                                    process_count=1)
    manager = checkpoint.make_manager(workdir, 5)
    step, params, opt_state, _ = checkpoint.restore_latest(manager, abstract.params,
                                                           abstract.opt_state, it,
                                                           config.to_dict())
    manager.close()
    return step, params, opt_state, it, mesh


@pytest.mark.slow
def test_checkpoint_restores_onto_other_meshes_and_training_continues(data_dir, tmp_path):
    run = str(tmp_path / 'fsdp8')
    fsdp8 = small_config(data_dir, data=1, fsdp=8)
    losses = {r['step']: r['loss'] for r in train.train(fsdp8, run) if 'loss' in r}
    # A copy of the run as it was at step 3 (the step 6 checkpoint and later metrics removed).
    def copy_at_step_3(name):
        path = str(tmp_path / name)
        shutil.copytree(run, path)
        shutil.rmtree(os.path.join(path, 'checkpoints', str(STEPS)))
        return path

    step, ref_params, ref_opt, _, _ = restore_on(fsdp8, copy_at_step_3('probe'), jax.devices())
    assert step == 3
    ref_params, ref_opt = jax.device_get((ref_params, ref_opt))

    # Same values on (data=2, fsdp=2, tensor=2) and on one device.
    mixed = small_config(data_dir, data=2, fsdp=2, tensor=2)
    one = small_config(data_dir, data=1, fsdp=1, tensor=1)
    for config, devices in ((mixed, jax.devices()), (one, jax.devices()[:1])):
        copy = copy_at_step_3(f'probe_{len(devices)}')
        _, params, opt_state, it, mesh = restore_on(config, copy, devices)
        assert params['embed']['embedding'].sharding.mesh.shape == mesh.shape
        jax.tree.map(np.testing.assert_array_equal, jax.device_get((params, opt_state)),
                     (ref_params, ref_opt))

    # Training continues on the new mesh with the uninterrupted run's losses: through the loop
    # on (2, 2, 2) ...
    resumed = train.train(mixed, copy_at_step_3('mixed'))
    np.testing.assert_allclose([r['loss'] for r in resumed if 'loss' in r],
                               [losses[s] for s in range(4, STEPS + 1)], rtol=2e-5)
    # ... and one step by hand on one device, with the restored data position.
    _, params, opt_state, it, mesh = restore_on(one, copy_at_step_3('one'), jax.devices()[:1])
    cfg = train.model_config(one)
    optimizer = optim.make_optimizer(one.optim, STEPS)
    _, shardings = train.abstract_state(cfg, optimizer, mesh)
    step_fn, _ = train.compile_steps(one, cfg, optimizer, optim.lr_schedule(one.optim, STEPS),
                                     shardings, mesh)
    state = train.make_state(3, params, opt_state, shardings)
    with jax.set_mesh(mesh):
        _, metrics = step_fn(state, loader.to_global_batch(next(it), mesh))
    np.testing.assert_allclose(float(metrics['loss']), losses[4], rtol=2e-5)
