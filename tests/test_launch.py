"""The launch scripts: the XLA flags of launch/gpu_env.sh exist in the pinned jaxlib (XLA aborts
on an unknown one), and the SLURM scripts give each task the coordinator (first node), the
process count and its own process id. SLURM itself is not here: `scontrol` and `srun` are
stand-ins on PATH that expand the node list and run one task per node, and `meditron-train`
is a stand-in that prints what it was given (the real training path is tests/test_multihost.py)."""

import os
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_env_xla_flags_are_known_to_jaxlib():
    probe = f'{sys.executable} -c "import jax; jax.numpy.zeros(1).block_until_ready()"'
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
    ok = subprocess.run(['bash', '-c', f'source launch/gpu_env.sh && echo "$XLA_FLAGS" && {probe}'],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert '--xla_gpu_enable_latency_hiding_scheduler=true' in ok.stdout
    # The probe can fail: a misspelt flag aborts JAX.
    bad = subprocess.run(['bash', '-c', f'source launch/gpu_env.sh && '
                          f'XLA_FLAGS="$XLA_FLAGS --xla_gpu_enable_latency_hiding_schedulr=true" '
                          f'{probe}'], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and 'Unknown flag' in bad.stderr


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize('script,nodes', [('slurm_7b.sh', 2), ('slurm_70b.sh', 3)])
def test_slurm_script_gives_each_task_the_coordinator_and_its_id(tmp_path, script, nodes):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    _executable(bin_dir / 'scontrol', '#!/bin/bash\n'
                '[ "$1 $2" = "show hostnames" ] || exit 2\n'
                'for h in $(echo "$3" | tr , " "); do echo "$h"; done\n')
    _executable(bin_dir / 'srun', '#!/bin/bash\n'
                'while [[ "$1" == --* ]]; do shift; done\n'
                'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_PROCID=$i "$@" || exit $?; done\n')
    _executable(bin_dir / 'meditron-train', '#!/bin/bash\n'
                'echo "task $MEDITRON_PROCESS_ID of $MEDITRON_NUM_PROCESSES at '
                '$MEDITRON_COORDINATOR: $*"\n')
    hosts = [f'gpu{i:03d}' for i in range(nodes)]
    env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', SLURM_JOB_ID='42',
               SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST=','.join(hosts),
               SLURM_SUBMIT_DIR=REPO, VENV=str(tmp_path / 'no-venv'),
               WORKDIR=str(tmp_path / 'run'), COORDINATOR_PORT='23456')
    out = subprocess.run(['bash', os.path.join(REPO, 'launch', script), '--config.train.steps=7'],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    tasks = [line for line in out.stdout.splitlines() if line.startswith('task ')]
    config = os.path.join(REPO, 'configs',
                          script.replace('slurm_', 'meditron_').replace('.sh', '.py'))
    assert tasks == [f'task {i} of {nodes} at gpu000:23456: --config {config} --workdir '
                     f'{tmp_path / "run"} --config.train.steps=7' for i in range(nodes)]
