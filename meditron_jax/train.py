"""meditron-train: continued pretraining of a Llama-2, from one CPU to a GPU cluster.

    meditron-train --config configs/debug.py --workdir runs/debug [--config.train.steps=50]

The core is ``train_step(state, batch) -> (state, metrics)`` (step.py), a pure function jitted
once with explicit shardings and a donated state. ``train`` is the loop around it, in labelled
steps: distributed setup, data, state (resume / init_from / random), compile, then step / log /
evaluate / checkpoint until done or preempted. Re-running the same command on the same workdir
resumes from the latest complete checkpoint, data order included.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from meditron_jax import checkpoint, cli, host_memory, init_from, model, optim, sharding
from meditron_jax import metrics as metrics_lib
from meditron_jax.data import loader, prepare
# The pure core lives in step.py; these names stay reachable as train.X (plan.py, tests).
from meditron_jax.step import (BATCH_KEYS, TrainState, abstract_state,  # noqa: F401
                               compile_steps, eval_step, fresh_state, loss_terms, make_state,
                               train_step)

log = logging.getLogger(__name__)


def peak_flops_per_device(config, mesh) -> float:
    """The FLOP/s that MFU is measured against: train.peak_flops_per_device (an accelerator's
    dense bf16 peak) on GPU/TPU; on a CPU, where no such figure holds, this host's float32 GEMM
    rate, measured now (the best of 3 1024^3 products on one device, shared out among the
    process's CPU devices, which share its cores)."""
    if any(d.platform != 'cpu' for d in mesh.devices.flat):
        return float(config.train.peak_flops_per_device)
    n = 1024
    a = jax.device_put(np.ones((n, n), np.float32), jax.local_devices()[0])
    product = jax.jit(lambda a: a @ a)
    jax.block_until_ready(product(a))
    best = float('inf')
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(product(a))
        best = min(best, time.perf_counter() - start)
    host = 2 * n ** 3 / best
    per_device = host / jax.local_device_count()
    log.info('MFU on CPU: against this host\'s float32 GEMM rate, measured at %.1f GFLOP/s '
             '(%.1f a device)', host / 1e9, per_device / 1e9)
    return per_device


class NonFiniteError(FloatingPointError):
    pass


# ------------------------------------------------------------------------ setup helpers


def model_config(config: ml_collections.ConfigDict) -> model.LlamaConfig:
    return model.LlamaConfig(**config.model.to_dict())


def validate_config(config: ml_collections.ConfigDict, mesh, local_devices=None,
                    num_processes: int | None = None) -> None:
    """Checks that cut across sections, with the keys named. ``local_devices`` /
    ``num_processes``: this process's devices and the process count (default: JAX's); the
    planner passes the cluster's (its compile-only devices know their host)."""
    local_devices = jax.local_devices() if local_devices is None else local_devices
    num_processes = jax.process_count() if num_processes is None else num_processes
    gbs, k = int(config.data.global_batch_size), int(config.optim.grad_accum_steps)
    dp = sharding.data_parallel_size(mesh)
    if k < 1 or gbs % k:
        raise ValueError(f'optim.grad_accum_steps={k} must divide data.global_batch_size={gbs}')
    if (gbs // k) % dp:
        raise ValueError(f'the micro-batch data.global_batch_size / optim.grad_accum_steps = '
                         f'{gbs // k} must be a multiple of the data-parallel size {dp} '
                         f'(mesh.data x mesh.fsdp)')
    if gbs % num_processes:
        raise ValueError(f'data.global_batch_size={gbs} must divide over '
                         f'{num_processes} processes')
    # Each process feeds the rows its devices hold: they must be an equal, distinct share.
    # (A 'tensor' axis spanning hosts would make two processes hold the same rows.)
    num_local = sharding.local_batch_rows(mesh, gbs, local_devices)
    if num_local != gbs // num_processes:
        raise ValueError(f'mesh {dict(mesh.shape)}: this process\'s devices hold {num_local} of '
                         f'the {gbs} batch rows, not {gbs // num_processes} (an equal '
                         f'share): keep the tensor axis within a host (mesh.tensor <= devices per '
                         f'host) so the batch axes split across processes')
    for key in ('train.steps', 'train.log_every', 'checkpoint.every'):
        section, name = key.split('.')
        if int(config[section][name]) < 1:
            raise ValueError(f'{key}={config[section][name]}: expected >= 1')
    if config.data.seq_len > config.model.max_seq_len:
        raise ValueError(f'data.seq_len={config.data.seq_len} exceeds '
                         f'model.max_seq_len={config.model.max_seq_len}')
    if not float(config.train.peak_flops_per_device) > 0:
        raise ValueError(f'train.peak_flops_per_device={config.train.peak_flops_per_device}: '
                         f'expected > 0 (FLOP/s of one device, for MFU)')
    if config.train.nonfinite not in ('error', 'skip'):
        raise ValueError(f"train.nonfinite={config.train.nonfinite!r}, expected 'error' or 'skip'")


def maybe_initialize_distributed(coordinator: str = '', num_processes: int = 0,
                                 process_id: int = -1) -> None:
    """Joins a multi-process job: explicit coordinator flags/env, SLURM's variables, or with
    MEDITRON_DISTRIBUTED=auto (launch/tpu_pod.sh sets it on every TPU VM worker) whatever JAX
    discovers itself: on a TPU slice the coordinator, process count and id come from the TPU
    VM's metadata server."""
    auto = os.environ.get('MEDITRON_DISTRIBUTED', '')
    if auto not in ('', 'auto'):
        raise ValueError(f"MEDITRON_DISTRIBUTED={auto!r}: expected 'auto' (JAX discovers the "
                         f'TPU slice or cluster) or unset')
    coordinator = coordinator or os.environ.get('MEDITRON_COORDINATOR', '')
    num_processes = num_processes or int(os.environ.get('MEDITRON_NUM_PROCESSES', '0'))
    if process_id < 0:
        process_id = int(os.environ.get('MEDITRON_PROCESS_ID', '-1'))
    if coordinator:
        if num_processes < 1 or process_id < 0:
            raise ValueError(f'--coordinator={coordinator} needs --num_processes and '
                             f'--process_id (got {num_processes}, {process_id})')
        jax.distributed.initialize(coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in os.environ:
        jax.distributed.initialize()  # coordinator, process count and id from SLURM
    elif auto:
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as e:
            raise ValueError(f'MEDITRON_DISTRIBUTED=auto, but JAX found no TPU slice or cluster '
                             f'to join ({str(e).strip()}); run on the workers of a TPU VM '
                             f'slice (launch/tpu_pod.sh) or pass --coordinator') from e


class _Preemption:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning('received %s: finishing the current step, then saving and exiting',
                    signal.Signals(signum).name)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def any_process(self, step: int, every: int) -> bool:
        """Whether any process was signalled. Across processes this needs a collective, which
        waits for the step just dispatched: it runs only every `every` steps, which all
        processes agree on."""
        if jax.process_count() == 1:
            return self.requested
        if step % every:
            return False
        flags_all = multihost_utils.process_allgather(np.array(self.requested))
        return bool(np.any(flags_all))


def steps_for(config: ml_collections.ConfigDict, manifest: dict) -> int:
    """train.steps, or with train.epochs > 0 the steps that pass over the prepared training
    tokens that many times: ceil(epochs x tokens / (global_batch_size x (seq_len + 1))). First-fit
    packing pads rows, so chat runs see each conversation a little fewer times than this."""
    epochs = float(config.train.epochs)
    if epochs <= 0:
        return int(config.train.steps)
    tokens = int(manifest['totals']['train']['tokens'])
    per_step = int(config.data.global_batch_size) * (int(config.data.seq_len) + 1)
    steps = max(1, int(np.ceil(epochs * tokens / per_step)))
    if jax.process_index() == 0:  # printed, not logged: the run's length is worth seeing
        print(f'train.epochs={epochs:g} over {tokens} training tokens at {per_step} tokens a '
              f'step: {steps} steps', file=sys.stderr)
    return steps


def init_params(config, cfg, mesh):
    """Random params, or train.init_from's (see meditron_jax/init_from.py)."""
    if not config.train.init_from:
        return model.init_params(cfg, mesh, seed=int(config.train.seed))
    return init_from.load(config.train.init_from, cfg, mesh)


# ------------------------------------------------------------------------------ the loop


def train(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Runs (or resumes) training; returns the metrics logged by this call."""
    # 1. Mesh and model.
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise cli.ConfigError(f'--workdir={workdir} is a file; expected a directory (created '
                              f'when missing)')
    mesh = sharding.make_mesh(config.mesh)
    cfg = model.resolve_config_attention(model_config(config), mesh)  # cudnn on gpu, splash on tpu
    validate_config(config, mesh)
    if config.train.init_from and not init_from.has_steps(workdir):  # a resume does not use it
        init_from.check(config.train.init_from, cfg)  # before data preparation (hours)
    prepare.prepare_options(config.data)   # sources, dedup, tokenizer: before anything is written
    is_primary = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    log.info('mesh %s over %d devices (%d processes); model %.1fM params',
             dict(mesh.shape), mesh.size, jax.process_count(), cfg.num_params() / 1e6)

    # 2. Data: prepare the corpus on first use (process 0), then the grain iterators.
    data_dir = config.data.dir or os.path.join(workdir, 'data')
    if is_primary:  # cheap when prepared; refuses shards made with other cleaning options
        prepare.prepare(config.data, data_dir)
    multihost_utils.sync_global_devices('data prepared')
    manifest = loader.open_prepared(config.data, data_dir)[0]
    tokenizer_vocab = manifest['tokenizer']['vocab_size']
    if tokenizer_vocab > cfg.vocab_size:
        raise ValueError(f'the tokenizer in {data_dir} has {tokenizer_vocab} pieces but '
                         f'model.vocab_size={cfg.vocab_size}: raise model.vocab_size (a multiple '
                         f'of 128, e.g. {-(-tokenizer_vocab // 128) * 128}); train.init_from grows '
                         f'a smaller checkpoint\'s embedding to match')
    train_iter = loader.make_train_iterator(
        config.data, data_dir, seed=int(config.data.shuffle_seed),
        process_index=jax.process_index(), process_count=jax.process_count())

    # 3. State: resume from the workdir, else init_from, else random.
    steps = steps_for(config, manifest)
    schedule = optim.lr_schedule(config.optim, steps)
    optimizer = optim.make_optimizer(config.optim, steps)
    abstract, shardings = abstract_state(cfg, optimizer, mesh)
    manager = checkpoint.make_manager(workdir, int(config.checkpoint.keep))
    config_dict = config.to_dict()
    restored = checkpoint.restore_latest(manager, abstract.params, abstract.opt_state, train_iter,
                                         config_dict)
    if restored is not None:
        start, params, opt_state, loop_counters = restored
        state = make_state(start, params, opt_state, shardings, loop_counters.get('skipped', 0))
        log.info('resumed from step %d of %s', start, manager.directory)
    else:
        start = 0
        state = fresh_state(init_params(config, cfg, mesh), optimizer, shardings)
    if is_primary:
        with open(os.path.join(workdir, 'config.json'), 'w') as f:
            json.dump(config_dict, f, indent=2)

    # 4. Compile once.
    step_fn, eval_fn = compile_steps(config, cfg, optimizer, schedule, shardings, mesh)
    tokens_per_step = int(config.data.global_batch_size) * int(config.data.seq_len)
    flops_per_step = cfg.flops_per_token(int(config.data.seq_len)) * tokens_per_step
    peak_flops = peak_flops_per_device(config, mesh) * mesh.size
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_primary, resume_step=start)
    progress = metrics_lib.Progress(start, steps)

    def evaluate(step: int) -> dict:
        eval_iter = loader.make_eval_iterator(config.data, data_dir,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count())
        loss_sum = count = 0.0
        for _ in range(int(config.train.eval_steps)):
            out = jax.device_get(eval_fn(state.params, loader.to_global_batch(next(eval_iter),
                                                                                mesh)))
            loss_sum, count = loss_sum + float(out['loss_sum']), count + float(out['tokens'])
        return dict(step=step, val_loss=loss_sum / max(count, 1.0))

    def check_finite(first_nonfinite: int, detail: str = '') -> None:
        if first_nonfinite >= 0 and config.train.nonfinite == 'error':
            raise NonFiniteError(
                f'step {first_nonfinite}: non-finite loss or gradient norm (that update was not '
                f'applied and no checkpoint was saved after it{detail}). Set '
                f'train.nonfinite=skip to skip such updates and go on')

    def save(step: int) -> float:
        check_finite(int(jax.device_get(state.first_nonfinite)))  # never checkpoint past a NaN
        return checkpoint.save(manager, step, state.params, state.opt_state, train_iter,
                               config_dict, dict(skipped=int(jax.device_get(state.skipped))))

    # 5. The loop: step, log, evaluate, checkpoint; stop early on SIGTERM / SIGINT.
    logged = []
    step = start
    last_log_time, last_log_step, block_sec = time.perf_counter(), start, 0.0
    outside_sec = 0.0  # evaluation and checkpoint time in the current log window
    with jax.set_mesh(mesh), _Preemption() as preemption:
        while step < steps:
            batch = loader.to_global_batch(next(train_iter), mesh)
            state, step_metrics = step_fn(state, batch)
            step += 1

            if step % int(config.train.log_every) == 0 or step == steps:
                m = jax.device_get(step_metrics)
                check_finite(int(m['first_nonfinite']),
                             f'; at step {step} loss {m["loss"]}, grad norm {m["grad_norm"]}')
                now = time.perf_counter()
                sec_per_step = (now - last_log_time - outside_sec) / (step - last_log_step)
                last_log_time, last_log_step, outside_sec = now, step, 0.0
                row = dict(step=step, loss=float(m['loss']), perplexity=float(np.exp(
                    min(float(m['loss']), 50.0))), lr=float(m['lr']),
                    grad_norm=float(m['grad_norm']), tokens_per_sec=tokens_per_step / sec_per_step,
                    step_time_sec=sec_per_step,
                    mfu=flops_per_step / sec_per_step / peak_flops,
                    skipped_updates=int(m['skipped']), checkpoint_block_sec=block_sec)
                writer.write(row)
                logged.append(row)
                progress.log(row)

            if int(config.train.eval_every) and step % int(config.train.eval_every) == 0:
                t = time.perf_counter()
                row = evaluate(step)
                outside_sec += time.perf_counter() - t
                writer.write(row)
                logged.append(row)
                progress.log(row)

            stop = preemption.any_process(step, int(config.train.log_every))
            if step % int(config.checkpoint.every) == 0 or step == steps or stop:
                t = time.perf_counter()
                block_sec = save(step)
                outside_sec += time.perf_counter() - t
            if stop:
                log.warning('preempted: saved step %d, exiting', step)
                break

    checkpoint.wait(manager)
    manager.close()
    writer.close()
    return logged


# -------------------------------------------------------------------------------- command

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a get_config() file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and data.')
_COORDINATOR = flags.DEFINE_string('coordinator', '', 'host:port of process 0 (multi-process).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'This process\'s index.')
_DEBUG = flags.DEFINE_bool('debug', False, cli.DEBUG_HELP)


def quiet_libraries() -> None:
    """Our progress lines at INFO; orbax (which logs every save step) and jax at WARNING."""
    absl_logging.set_verbosity(absl_logging.WARNING)  # absl's verbosity is the root logger's
    logging.getLogger('meditron_jax').setLevel(logging.INFO)


def main(argv):
    quiet_libraries()
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError('--config and --workdir are required')
    cli.check_declared(_CONFIG.value, f'--config={flags.FLAGS["config"].config_filename}')
    host_memory.configure_for_cpu_step()  # before the backend starts
    maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if jax.process_index() != 0:  # one copy of the progress lines; every process's warnings
        logging.getLogger('meditron_jax').setLevel(logging.WARNING)
    train(_CONFIG.value, _WORKDIR.value)


def run(argv: list[str] | None = None):
    """Console entry point (meditron-train): anticipated errors are one line, exit status 2
    (``--debug`` or MEDITRON_DEBUG=1 for the traceback)."""
    cli.run_absl('meditron-train', main, argv)


if __name__ == '__main__':
    sys.exit(run())
