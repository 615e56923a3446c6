#!/bin/bash
# Train on a Cloud TPU VM slice: create it (or reuse it), copy this repository to every worker,
# install it, and run the same meditron-train command on all workers at once.
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR_TYPE CONFIG [meditron-train flags...]
#   launch/tpu_pod.sh meditron-7b us-east5-a v5p-128 configs/meditron_7b_tpu.py
#   launch/tpu_pod.sh meditron-70b us-east5-a v5p-256 configs/meditron_70b_tpu.py \
#       --config.train.steps=100
#
# Environment (defaults in brackets):
#   WORKDIR          checkpoints and metrics; must be storage that every worker sees and that
#                    outlives the VMs (a Filestore NFS or Cloud Storage FUSE mount)
#                    [/mnt/meditron/runs/NAME]
#   RUNTIME_VERSION  TPU VM image [v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5litepod,
#                    tpu-ubuntu2204-base otherwise]
#   SPOT=1           create a Spot slice (cheaper, preemptible)
#   REMOTE_DIR       where the code goes on each worker, relative to the home directory
#                    [meditron_jax]
#
# One process per TPU VM host. meditron-train runs with MEDITRON_DISTRIBUTED=auto, so
# jax.distributed.initialize() finds the coordinator, process count and process id from the TPU
# VM metadata server itself (no coordinator flag). The mesh in the config spans all chips.
# Preemption: the VM's shutdown sends SIGTERM; meditron-train finishes the step, saves a
# checkpoint to WORKDIR and exits 0, as on SLURM. Run this script again: a PREEMPTED slice is
# deleted and recreated, and training resumes from the latest checkpoint. A Spot VM's notice is
# about 30 s: too short for a 70B step and save, so set checkpoint.every from the work you can lose.
# meditron-train runs under nohup with its pid in ~/meditron-train.pid and its output in
# ~/meditron-train.log on each worker; this script follows the log, and a dropped connection
# does not stop the run. To stop it (it saves first):
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \
#       --command='kill -TERM $(cat ~/meditron-train.pid)'
set -euo pipefail

if [ $# -lt 4 ]; then
  echo "usage: $0 NAME ZONE ACCELERATOR_TYPE CONFIG [meditron-train flags...]" >&2
  exit 2
fi
NAME="$1" ZONE="$2" ACCELERATOR_TYPE="$3" CONFIG="$4"
shift 4
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -f "$REPO/$CONFIG" ]; then
  echo "$0: CONFIG=$CONFIG: no such file under $REPO (give a path relative to the repository," \
       "e.g. configs/meditron_7b_tpu.py)" >&2
  exit 2
fi
WORKDIR="${WORKDIR:-/mnt/meditron/runs/$NAME}"
REMOTE_DIR="${REMOTE_DIR:-meditron_jax}"
case "$ACCELERATOR_TYPE" in
  v5p-*) DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
  v5litepod-*) DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
  *) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
esac
RUNTIME_VERSION="${RUNTIME_VERSION:-$DEFAULT_RUNTIME}"
TPU=(gcloud compute tpus tpu-vm)

create() {
  local spot=()
  [ "${SPOT:-0}" = 1 ] && spot=(--spot)
  echo "creating $ACCELERATOR_TYPE slice $NAME in $ZONE ($RUNTIME_VERSION)"
  "${TPU[@]}" create "$NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR_TYPE" \
    --version "$RUNTIME_VERSION" "${spot[@]}"
}

# 1. The slice: reuse a READY one of the right type, recreate a preempted one, else create.
if described="$("${TPU[@]}" describe "$NAME" --zone "$ZONE" \
                  --format='value(state,acceleratorType)' 2>/dev/null)"; then
  read -r state type <<< "$described"
  if [ "$type" != "$ACCELERATOR_TYPE" ]; then
    echo "$0: TPU $NAME in $ZONE is a $type, not the $ACCELERATOR_TYPE asked for; pick another" \
         "NAME or delete it: ${TPU[*]} delete $NAME --zone $ZONE" >&2
    exit 1
  fi
  case "$state" in
    READY) echo "reusing $ACCELERATOR_TYPE slice $NAME in $ZONE" ;;
    PREEMPTED|TERMINATED)
      echo "$NAME is $state: deleting and recreating it"
      "${TPU[@]}" delete "$NAME" --zone "$ZONE" --quiet
      create ;;
    *)
      echo "$0: TPU $NAME in $ZONE is $state, expected READY or PREEMPTED; wait for it or" \
           "delete it" >&2
      exit 1 ;;
  esac
else
  create
fi

# 2. The code: the repository's tracked files as they are now, to every worker.
archive="$(mktemp "${TMPDIR:-/tmp}/meditron-code.XXXXXX.tar.gz")"
trap 'rm -f "$archive"' EXIT
git -C "$REPO" ls-files -z | tar -C "$REPO" --null -T - -czf "$archive"
"${TPU[@]}" scp "$archive" "$NAME:meditron-code.tar.gz" --zone "$ZONE" --worker=all

# 3. Install and train, on all workers. Arguments are quoted once here (printf %q) and parsed
#    once by the remote shell.
train_cmd="$(printf '%q ' meditron-train --config "$CONFIG" --workdir "$WORKDIR" "$@")"
remote="set -e
if [ -f ~/meditron-train.pid ] && kill -0 \$(cat ~/meditron-train.pid) 2>/dev/null; then
  echo \"meditron-train is already running on \$(hostname) (pid \$(cat ~/meditron-train.pid));\" \\
       \"stop it first: kill -TERM \$(cat ~/meditron-train.pid)\" >&2
  exit 1
fi
mkdir -p ~/$REMOTE_DIR && tar -xzf ~/meditron-code.tar.gz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[tpu]'
source .venv/bin/activate
export MEDITRON_DISTRIBUTED=auto
: > ~/meditron-train.log   # before tail, which may start before the job's redirection
nohup $train_cmd >> ~/meditron-train.log 2>&1 < /dev/null &
pid=\$!
echo \$pid > ~/meditron-train.pid
tail -n +1 -f --pid=\$pid ~/meditron-train.log
wait \$pid"
echo "running on all workers of $NAME: $train_cmd"
"${TPU[@]}" ssh "$NAME" --zone "$ZONE" --worker=all --command="$remote"
