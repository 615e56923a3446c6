"""README promises of the meditron-train command (``python -m meditron_jax.train`` in
subprocesses): on first use it prepares the data into ``<workdir>/data`` itself; Ctrl-C (SIGINT)
is handled as SIGTERM (the current step is saved, exit status 0); ``--coordinator
--num_processes --process_id`` join processes into one jax.distributed job, where a tensor axis
spanning hosts is refused naming the mesh keys."""

import json
import os
import signal
import subprocess
import sys

import pytest

from launch import local
from meditron_jax import train
from tests.data_helpers import all_files, prepared_debug
from tests.test_train import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(REPO, 'configs', 'debug.py')
SMALL = ['--config.data.seq_len=64', '--config.data.global_batch_size=8',
         '--config.mesh.data=2', '--config.mesh.fsdp=4', '--config.mesh.tensor=1']


def train_command(workdir, *flags):
    return [sys.executable, '-m', 'meditron_jax.train', '--config', DEBUG, '--workdir',
            str(workdir), *SMALL, *flags]


def metric_rows(workdir):
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith('\n')]


@pytest.fixture(scope='module')
def interrupted(tmp_path_factory):
    """A run on a fresh workdir (no data.dir given), sent SIGINT once 3 steps are logged."""
    workdir = tmp_path_factory.mktemp('readme-cli') / 'run'
    env = dict(os.environ, XLA_FLAGS=os.environ['XLA_FLAGS'] +
               ' --xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu',
               PYTHONUNBUFFERED='1')
    proc = subprocess.Popen(
        train_command(workdir, '--config.train.steps=1000', '--config.train.log_every=1',
                      '--config.train.eval_every=0', '--config.checkpoint.every=1000'),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(metric_rows(workdir)) >= 3, proc, timeout=400)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    return dict(workdir=workdir, returncode=proc.returncode, output=out)


@pytest.mark.slow
def test_first_run_prepares_the_data_into_the_workdir(interrupted):
    data = interrupted['workdir'] / 'data'
    assert (data / 'manifest.json').is_file(), interrupted['output'][-3000:]
    # Byte for byte what meditron-prepare makes of the same config (any worker count).
    assert all_files(str(data)) == all_files(prepared_debug())


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_and_exits_0(interrupted):
    assert interrupted['returncode'] == 0, interrupted['output'][-3000:]
    assert 'received SIGINT' in interrupted['output']
    steps = [r['step'] for r in metric_rows(interrupted['workdir']) if 'loss' in r]
    saved = [int(s) for s in os.listdir(interrupted['workdir'] / 'checkpoints') if s.isdigit()]
    assert saved == [max(steps)], (saved, steps)
    assert 3 <= max(steps) < 1000


@pytest.fixture(scope='module')
def two_processes_tensor_across_hosts(tmp_path_factory):
    """2 processes x 4 CPU devices joined by the command-line flags (not the environment), with
    mesh.tensor=8: (return codes, outputs)."""
    workdir = tmp_path_factory.mktemp('readme-cli') / 'tensor8'
    coordinator = f'localhost:{local.free_port()}'
    env = {k: v for k, v in os.environ.items() if not k.startswith('MEDITRON_')}
    env.update(JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='4')
    procs = [subprocess.Popen(
        train_command(workdir, '--config.mesh.fsdp=1', '--config.mesh.data=1',
                      '--config.mesh.tensor=8', '--coordinator', coordinator,
                      '--num_processes', '2', '--process_id', str(i)),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], outputs


@pytest.mark.slow
def test_coordinator_flags_join_the_processes_into_one_job(two_processes_tensor_across_hosts):
    codes, outputs = two_processes_tensor_across_hosts
    for out in outputs:
        # Each process has 4 devices: alone, building the 8-device mesh would fail. Joined, the
        # mesh is built over both, and the run stops later, at the check of which process feeds
        # which rows: an equal share of the 8 rows between the 2 processes is 4.
        assert "this process's devices hold 8 of the 8 batch rows, not 4" in out, out[-3000:]


@pytest.mark.slow
def test_tensor_axis_across_hosts_is_refused_naming_the_mesh_keys(
        two_processes_tensor_across_hosts):
    codes, outputs = two_processes_tensor_across_hosts
    assert codes == [2, 2], outputs[0][-3000:]          # an anticipated error: one line, exit 2
    for out in outputs:
        error = [line for line in out.splitlines() if line.startswith('meditron-train: error:')]
        assert error and 'mesh.tensor' in error[-1], out[-3000:]


def test_coordinator_without_process_count_or_id_is_refused_naming_the_flags():
    with pytest.raises(ValueError, match='--num_processes.*--process_id'):
        train.maybe_initialize_distributed('localhost:1234', 0, -1)
