# The part of the SLURM scripts that every model shares: sourced by slurm_7b.sh and
# slurm_70b.sh after they set REPO, CONFIG and WORKDIR. One task per node; the first node hosts
# jax.distributed's coordinator; every task runs the same meditron-train command.
cd "$REPO"
VENV="${VENV:-$REPO/.venv}"          # or replace with: module load ... / conda activate ...
[ -f "$VENV/bin/activate" ] && source "$VENV/bin/activate"
source launch/gpu_env.sh

# sed reads the whole list: `head -n 1` would close the pipe early and, with pipefail, fail the job
COORDINATOR_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
export MEDITRON_COORDINATOR="${COORDINATOR_HOST}:${COORDINATOR_PORT:-12355}"
export MEDITRON_NUM_PROCESSES="$SLURM_NNODES"
echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes, coordinator $MEDITRON_COORDINATOR, workdir $WORKDIR"

# MEDITRON_PROCESS_ID must be evaluated per task, hence the inner shell.
srun --kill-on-bad-exit=1 --label bash -c \
  'MEDITRON_PROCESS_ID="$SLURM_PROCID" exec meditron-train --config "$0" --workdir "$1" "${@:2}"' \
  "$CONFIG" "$WORKDIR" "$@"
