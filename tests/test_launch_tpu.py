"""launch/tpu_pod.sh: creates or reuses the slice, copies the code to every worker and runs the
same meditron-train command on all of them with MEDITRON_DISTRIBUTED=auto. Cloud TPU is not
here: `gcloud` is a stand-in on PATH that records its arguments and runs `tpu-vm ssh
--worker=all --command` in one shell per fake worker home (as the real one runs it on each TPU
VM), and each worker's venv holds stand-ins for pip and meditron-train (which prints what it was
given). The real script runs unchanged; the no-argument jax.distributed.initialize() it relies
on is checked below, against the real JAX."""

import json
import os
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = 3

FAKE_GCLOUD = r'''#!/bin/bash
# gcloud compute tpus tpu-vm VERB ...: record, then act like the real one on fake workers.
printf '%s\n' "$(printf '%q ' "$@")" >> "$FAKE/calls"
[ "$1 $2 $3" = "compute tpus tpu-vm" ] || exit 64
verb="$4"; shift 4
case "$verb" in
  describe) [ -n "$FAKE_STATE" ] || { echo "NOT_FOUND" >&2; exit 1; }
            echo "$FAKE_STATE $FAKE_TYPE" ;;
  create|delete) ;;
  scp) for w in "$FAKE"/worker*; do cp "$1" "$w/${2#*:}"; done ;;
  ssh) for arg; do case "$arg" in --command=*) cmd="${arg#--command=}" ;; esac; done
       for w in "$FAKE"/worker*; do HOME="$w" bash -c "$cmd" || exit $?; done ;;
  *) exit 64 ;;
esac
'''

FAKE_TRAIN = r'''#!/bin/bash
echo "worker $(basename "$HOME") MEDITRON_DISTRIBUTED=$MEDITRON_DISTRIBUTED cwd=$(basename "$PWD"): $*"
[ -f "$PWD/configs/meditron_7b_tpu.py" ] || { echo "code not copied" >&2; exit 5; }
exit "${FAKE_TRAIN_STATUS:-0}"
'''


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _pod(tmp_path):
    fake = tmp_path / 'fake'
    (fake / 'bin').mkdir(parents=True)
    _executable(fake / 'bin' / 'gcloud', FAKE_GCLOUD)
    for i in range(WORKERS):
        venv = fake / f'worker{i}' / 'meditron_jax' / '.venv' / 'bin'
        venv.mkdir(parents=True)
        _executable(venv / 'python', '#!/bin/bash\nexit 0\n')
        _executable(venv / 'pip', '#!/bin/bash\necho "pip $*" >> "$HOME/pip.log"\n')
        _executable(venv / 'meditron-train', FAKE_TRAIN)
        (venv / 'activate').write_text(f'export PATH="{venv}:$PATH"\n')
    return fake


def _launch(fake, *args, state='', tpu_type='v5p-16', **env):
    env = dict(os.environ, PATH=f'{fake / "bin"}:{os.environ["PATH"]}', FAKE=str(fake),
               FAKE_STATE=state, FAKE_TYPE=tpu_type, **env)
    out = subprocess.run(['bash', os.path.join(REPO, 'launch', 'tpu_pod.sh'), *args],
                         cwd=str(fake), env=env, capture_output=True, text=True, timeout=120)
    calls = (fake / 'calls').read_text().splitlines() if (fake / 'calls').exists() else []
    return out, calls


ARGS = ('med7', 'us-east5-a', 'v5p-16', 'configs/meditron_7b_tpu.py')


def test_new_slice_is_created_and_every_worker_runs_the_same_command(tmp_path):
    fake = _pod(tmp_path)
    out, calls = _launch(fake, *ARGS, '--config.train.steps=7', "--config.train.init_from=a b",
                         WORKDIR='/mnt/shared/run one', SPOT='1')
    assert out.returncode == 0, out.stderr
    verbs = [c.split()[3] for c in calls]
    assert verbs == ['describe', 'create', 'scp', 'ssh']
    assert calls[1] == ('compute tpus tpu-vm create med7 --zone us-east5-a --accelerator-type '
                        'v5p-16 --version v2-alpha-tpuv5 --spot ')
    assert '--worker=all' in calls[2] and '--worker=all' in calls[3]
    lines = [line for line in out.stdout.splitlines() if line.startswith('worker ')]
    # Arguments with spaces arrive whole; the log is streamed back and the code is in place.
    assert lines == [f'worker worker{i} MEDITRON_DISTRIBUTED=auto cwd=meditron_jax: --config '
                     f'configs/meditron_7b_tpu.py --workdir /mnt/shared/run one '
                     f'--config.train.steps=7 --config.train.init_from=a b'
                     for i in range(WORKERS)]
    for i in range(WORKERS):
        home = fake / f'worker{i}'
        assert (home / 'pip.log').read_text() == 'pip install -q -e .[tpu]\n'
        assert (home / 'meditron-train.pid').read_text().strip().isdigit()
        assert 'MEDITRON_DISTRIBUTED=auto' in (home / 'meditron-train.log').read_text()


@pytest.mark.parametrize('state,expected_verbs', [
    ('READY', ['describe', 'scp', 'ssh']),
    ('PREEMPTED', ['describe', 'delete', 'create', 'scp', 'ssh']),
])
def test_existing_slice_is_reused_or_recreated_after_preemption(tmp_path, state, expected_verbs):
    fake = _pod(tmp_path)
    out, calls = _launch(fake, *ARGS, state=state)
    assert out.returncode == 0, out.stderr
    assert [c.split()[3] for c in calls] == expected_verbs
    assert not any('--spot' in c for c in calls)   # only when asked (SPOT=1)
    assert out.stdout.count('MEDITRON_DISTRIBUTED=auto') == WORKERS


@pytest.mark.parametrize('state,tpu_type,message', [
    ('READY', 'v5p-128', 'is a v5p-128, not the v5p-16 asked for'),
    ('CREATING', 'v5p-16', 'is CREATING, expected READY or PREEMPTED'),
])
def test_a_slice_that_cannot_be_used_is_refused_naming_why(tmp_path, state, tpu_type, message):
    fake = _pod(tmp_path)
    out, calls = _launch(fake, *ARGS, state=state, tpu_type=tpu_type)
    assert out.returncode == 1 and message in out.stderr
    assert [c.split()[3] for c in calls] == ['describe']


def test_a_failing_worker_fails_the_launch_and_a_missing_config_is_refused(tmp_path):
    fake = _pod(tmp_path)
    out, _ = _launch(fake, *ARGS, state='READY', FAKE_TRAIN_STATUS='3')
    assert out.returncode == 3
    out, calls = _launch(fake, *ARGS[:3], 'configs/nope.py')
    assert out.returncode == 2 and 'CONFIG=configs/nope.py: no such file' in out.stderr


def test_a_run_still_going_on_a_worker_is_not_started_twice(tmp_path):
    fake = _pod(tmp_path)
    (fake / 'worker0' / 'meditron-train.pid').write_text(f'{os.getpid()}\n')  # a live process
    out, _ = _launch(fake, *ARGS, state='READY')
    assert out.returncode == 1
    assert 'meditron-train is already running on ' in out.stderr and str(os.getpid()) in out.stderr
    assert 'worker worker0' not in out.stdout


AUTO_INIT = '''
import json
from meditron_jax import train
try:
    train.maybe_initialize_distributed()
except ValueError as e:
    print(json.dumps(str(e)))
'''


def test_auto_distributed_calls_jax_discovery_and_says_when_it_finds_nothing():
    # Off a TPU VM (and outside any cluster JAX knows), the real discovery finds nothing. In a
    # subprocess: a failed jax.distributed.initialize must not leave state in the test process.
    env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'MEDITRON_'))}
    done = subprocess.run([sys.executable, '-c', AUTO_INIT], cwd=REPO, capture_output=True,
                          text=True, timeout=120,
                          env=dict(env, MEDITRON_DISTRIBUTED='auto', JAX_PLATFORMS='cpu'))
    assert done.returncode == 0, done.stderr[-2000:]
    message = json.loads(done.stdout.strip().splitlines()[-1])
    assert 'MEDITRON_DISTRIBUTED=auto, but JAX found no TPU slice or cluster to join' in message


def test_an_unknown_distributed_mode_is_refused_naming_the_variable(monkeypatch):
    from meditron_jax import train
    monkeypatch.setenv('MEDITRON_DISTRIBUTED', 'yes')
    with pytest.raises(ValueError, match="MEDITRON_DISTRIBUTED='yes': expected 'auto'"):
        train.maybe_initialize_distributed()
