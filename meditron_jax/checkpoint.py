"""Training checkpoints: an orbax CheckpointManager in ``<workdir>/checkpoints``.

Each step directory holds six items:
    params     the model parameters (in the layout model.scan_layers gives, see model.py)
    opt_state  the optimizer state (sharded like the parameters)
    data       the grain iterator state, one JSON per process (grain.checkpoint)
    config     the resolved run config (JSON)
    loop       the loop's own counters (skipped non-finite updates)
    digests    each params / opt_state array's fingerprint (integrity.py), computed on the devices
               when the step is saved and checked when it is restored: a step whose bytes
               changed on disk is treated like an unreadable one (reported, the previous used)
The step number is the directory name. Saves are asynchronous: ``save`` returns once the arrays
are copied off the devices, and orbax writes to ``<step>.orbax-checkpoint-tmp`` before renaming,
so a crash mid-save leaves nothing that looks complete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from meditron_jax import integrity

log = logging.getLogger(__name__)

ITEMS = ('params', 'opt_state', 'data', 'config', 'loop', 'digests')

# model.* keys whose change makes a checkpoint unusable: the shapes and layout of what was saved.
SHAPE_KEYS = ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads', 'mlp_dim',
              'param_dtype', 'scan_layers')


class FingerprintsHandler(ocp.handlers.JsonCheckpointHandler):
    """The ``digests`` item: JSON, whose content may be given as a function that computes it
    (integrity.dispatch_fingerprints); orbax runs this in its background commit thread, so the
    fingerprints, dispatched to the devices before the save, are waited for off the loop."""

    async def _save_fn(self, x, directory):
        await super()._save_fn(x() if callable(x) else x, directory)


@ocp.args.register_with_handler(FingerprintsHandler, for_save=True)
@dataclasses.dataclass
class FingerprintsSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(FingerprintsHandler, for_restore=True)
@dataclasses.dataclass
class FingerprintsRestore(ocp.args.CheckpointArgs):
    item: Any = None


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any,
         data_iterator: Any, config: dict, loop: dict) -> float:
    """Starts an async save of one step; returns how long the call blocked, in seconds."""
    start = time.perf_counter()
    digests = state_fingerprints(params, opt_state)
    saved = manager.save(step, args=ocp.args.Composite(
        digests=FingerprintsSave(digests),
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config),
        loop=ocp.args.JsonSave(loop)))
    if not saved:  # orbax skips steps at or below the newest on disk
        raise RuntimeError(f'checkpoint step {step} was not saved: {manager.directory} already '
                           f'holds steps {sorted(manager.all_steps())}')
    return time.perf_counter() - start


def state_fingerprints(params: Any, opt_state: Any):
    """A function giving the step's ``digests`` item; the computation starts now, on the
    devices, and is waited for when the function is called."""
    pending = integrity.dispatch_fingerprints({'params': params, 'opt_state': opt_state})

    def resolve() -> dict:
        flat = pending()
        out = {'algorithm': integrity.ALGORITHM, 'params': {}, 'opt_state': {}}
        for name, e in flat.items():
            item, leaf = name.split('.', 1)
            out[item][leaf] = e
        return out
    return resolve


def verify_state(manager: ocp.CheckpointManager, step: int, **trees: Any) -> None:
    """Raises IntegrityError naming each restored array whose fingerprint differs from the one
    saved with ``step`` (steps saved before fingerprints existed pass unchecked)."""
    if not _has_item(manager, step, 'digests'):
        log.info('checkpoint step %d has no fingerprints (saved by an older version): not '
                 'checked', step)
        return
    saved = manager.restore(step, args=ocp.args.Composite(digests=FingerprintsRestore()))
    saved = dict(saved['digests'])
    bad = [f'{item}/{m}' for item, tree in trees.items()
           for m in integrity.mismatches(saved.get(item, {}), integrity.tree_fingerprints(tree))]
    if bad:
        raise integrity.IntegrityError(
            f'arrays differ from what was saved (damaged on disk): {"; ".join(bad[:8])}'
            + (f' and {len(bad) - 8} more' if len(bad) > 8 else ''))


def restore_latest(manager: ocp.CheckpointManager, abstract_params: Any, abstract_opt_state: Any,
                   data_iterator: Any, config: dict) -> tuple[int, Any, Any, dict] | None:
    """Restores the newest readable step: (step, params, opt_state, loop counters), or None.

    The saved config is checked against ``config`` first (check_compatible: a change of model
    shape or optimizer structure is refused, naming the keys; other changes are logged). A step
    whose files fail to read (deleted or corrupted after it completed) is reported, moved aside to
    ``<step>.unreadable`` (so later saves of that step number are possible) and the previous one
    tried. Arrays are placed with the shardings in the abstract targets, so a checkpoint saved on
    one mesh restores onto another.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    unreadable = []
    for step in steps:
        try:
            saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            saved = None
            log.warning('checkpoint step %d: config unreadable (%s)', step, e)
        if saved is not None:
            changed = check_compatible(dict(saved['config']), config)
            if changed:
                log.warning('resuming step %d with config changes (checkpoint -> now): %s',
                            step, changed)
        check_data_process_count(manager, step)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
                **({'loop': ocp.args.JsonRestore()} if _has_item(manager, step, 'loop') else {})))
            verify_state(manager, step, params=restored['params'],
                         opt_state=restored['opt_state'])
        except Exception as e:  # noqa: BLE001 - any unreadable step falls back to the previous
            log.warning('checkpoint step %d in %s could not be restored (%s: %s); trying the '
                        'previous step', step, manager.directory, type(e).__name__,
                        str(e).splitlines()[0][:300] if str(e) else '')
            unreadable.append(step)
            continue
        _move_aside(manager, unreadable)
        return step, restored['params'], restored['opt_state'], dict(restored.get('loop') or {})
    if steps:
        raise RuntimeError(f'none of the checkpoint steps {steps} in {manager.directory} could be '
                           f'restored (each step\'s error is in the warnings above)')
    return None


def _has_item(manager: ocp.CheckpointManager, step: int, item: str) -> bool:
    return os.path.isdir(os.path.join(os.fspath(manager.directory), str(step), item))


def _move_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Renames unreadable steps to ``<step>.unreadable`` (process 0, after every process tried)."""
    if not steps:
        return
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('checkpoint fallback')
    if jax.process_index() == 0:
        root = os.fspath(manager.directory)
        for step in steps:
            target = os.path.join(root, f'{step}.unreadable')
            suffix = 0
            while os.path.exists(target):
                suffix += 1
                target = os.path.join(root, f'{step}.unreadable{suffix}')
            os.rename(os.path.join(root, str(step)), target)
            log.warning('moved unreadable checkpoint step %d to %s', step, target)
    multihost_utils.sync_global_devices('checkpoint fallback done')
    manager.reload()


class DataStateError(ValueError):
    """A checkpoint's data-iterator state cannot be restored in this job."""


def saved_process_count(manager: ocp.CheckpointManager, step: int) -> int | None:
    """How many processes wrote the data-iterator state of ``step`` (None: no state files).

    grain's handler writes one ``process_<i>-of-<n>.json`` per process into the ``data`` item.
    """
    data_dir = os.path.join(os.fspath(manager.directory), str(step), 'data')
    names = os.listdir(data_dir) if os.path.isdir(data_dir) else []
    counts = {int(m.group(1)) for m in (re.fullmatch(r'process_\d+-of-(\d+)\.json', n)
                                        for n in names) if m}
    return counts.pop() if len(counts) == 1 else None


def check_data_process_count(manager: ocp.CheckpointManager, step: int) -> None:
    """Raises DataStateError when ``step`` was saved by a different number of processes.

    Params and optimizer state restore onto any mesh, but the data position does not carry over
    to another process count: grain keeps one iterator state per process, and each process reads
    its own documents (``[process_index::process_count]``), so the states describe positions in
    streams that a job of another size does not have. Every earlier step has the same problem, so
    this is an error, not a fallback.
    """
    saved = saved_process_count(manager, step)
    if saved is not None and saved != jax.process_count():
        raise DataStateError(
            f'checkpoint step {step} in {manager.directory} was written by {saved} processes '
            f'(data/process_*-of-{saved}.json) but this job has {jax.process_count()}: the data '
            f'iterator\'s state is per process (each reads documents '
            f'[process_index::process_count]) and cannot be carried over to another process '
            f'count. Resume with {saved} processes (devices per process and the mesh may '
            f'change), or start a new --workdir.')


def _read_only(workdir: str, step: int | None) -> tuple[ocp.CheckpointManager, int]:
    """A read-only manager of a workdir's checkpoints and the step to read (latest if None)."""
    manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'checkpoints'),
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_names=ITEMS)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f'{workdir}/checkpoints holds no complete checkpoint step')
    return manager, step


def restore_params(workdir: str, abstract_params: Any, step: int | None = None
                   ) -> tuple[int, Any, dict]:
    """Params and config of a training workdir's latest (or given) complete step, checked
    against their fingerprints. Without ``step``, a damaged or unreadable latest step is
    reported and the previous one used (the workdir is not modified)."""
    manager, latest = _read_only(workdir, step)
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    try:
        for s in steps:
            try:
                restored = manager.restore(s, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params),
                    config=ocp.args.JsonRestore()))
                verify_state(manager, s, params=restored['params'])
            except Exception as e:  # noqa: BLE001 - a damaged step falls back to the previous
                if s == steps[-1]:
                    raise RuntimeError(f'checkpoint step {s} in {manager.directory} could not be '
                                       f'restored: {type(e).__name__}: {e}') from e
                log.warning('checkpoint step %d in %s could not be restored (%s: %s); trying the '
                            'previous step', s, manager.directory, type(e).__name__,
                            str(e).splitlines()[0][:300] if str(e) else '')
                continue
            return s, restored['params'], dict(restored['config'])
    finally:
        manager.close()


def complete_steps(workdir: str) -> list[int]:
    """A workdir's complete checkpoint steps, newest first."""
    manager, _ = _read_only(workdir, None)
    steps = sorted(manager.all_steps(), reverse=True)
    manager.close()
    return steps


def read_digests(workdir: str, step: int) -> dict:
    """The fingerprints saved with a step ({} for steps saved before they existed)."""
    path = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step), 'digests')
    if not os.path.isdir(path):
        return {}
    manager, step = _read_only(workdir, step)
    saved = manager.restore(step, args=ocp.args.Composite(digests=FingerprintsRestore()))
    manager.close()
    return dict(saved['digests'])


def read_config(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """The resolved config saved with a workdir's latest (or given) step."""
    manager, step = _read_only(workdir, step)
    config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    manager.close()
    return step, dict(config['config'])


def config_differences(saved: dict, current: dict, prefix: str = '') -> dict[str, tuple]:
    """Flattened {key: (saved, current)} for every key whose value differs."""
    out = {}
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f'{prefix}{key}'
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_differences(a, b, name + '.'))
        elif a != b and not (isinstance(a, (list, tuple)) and list(a) == list(b or [])):
            out[name] = (a, b)
    return out


def check_compatible(saved: dict, current: dict) -> dict[str, tuple]:
    """Raises if the model shape / layout or the optimizer's state structure changed; returns
    the other (allowed) differences, warning when they break exact data resume."""
    diffs = config_differences(saved, current)
    refused = {k: v for k, v in diffs.items()
               if k.startswith('model.') and k.split('.', 1)[1] in SHAPE_KEYS}
    clip = [(c.get('optim', {}).get('clip_norm', 0) or 0) > 0 for c in (saved, current)]
    if clip[0] != clip[1]:  # clipping adds or removes a stage of the optimizer state
        refused['optim.clip_norm'] = diffs['optim.clip_norm']
    if refused:
        detail = ', '.join(f'{k}: checkpoint {a!r} vs config {b!r}' for k, (a, b) in refused.items())
        raise ValueError(f'the config does not match what the checkpoint holds ({detail}); '
                         f'use a new --workdir, or train.init_from for a params-only start')
    data = sorted(k for k in diffs if k.startswith('data.') and k != 'data.dir')
    if data:
        log.warning('data config changed (%s): training continues, but the batches after the '
                    'resume are no longer those an uninterrupted run would have seen', data)
    return diffs


def wait(manager: ocp.CheckpointManager) -> None:
    manager.wait_until_finished()
    jax.effects_barrier()
