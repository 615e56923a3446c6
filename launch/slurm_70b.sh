#!/bin/bash
# MEDITRON-70B continued pretraining on 16 nodes x 8 GPUs (MEDITRON's own cluster size).
#
#   mkdir -p logs && sbatch launch/slurm_70b.sh                      # from the repository root
#   sbatch launch/slurm_70b.sh --config.train.steps=100    # extra args go to meditron-train
#
# One task per node; each runs the same meditron-train command, which joins the job through
# jax.distributed with the coordinator on the first node (MEDITRON_* variables below).
# Mesh (configs/meditron_70b.py): tensor=8 inside a node (heads and MLP split over NVLink),
# fsdp=-1 = the number of nodes (parameters, gradients and Adam state split 16 ways more, so
# each GPU holds 1/128 of the 70B state: about 6 GiB of params + Adam, see meditron-plan).
# The micro-batch (512 / grad_accum_steps 16 = 32 sequences) must divide by the fsdp size:
# 1, 2, 4, 8, 16 or 32 nodes; on 8 nodes set --config.optim.grad_accum_steps=32 to keep the
# same per-GPU micro-batch. Check memory first: meditron-plan --config configs/meditron_70b.py.
#
# Change for your cluster: the #SBATCH account/partition/time lines, WORKDIR (shared storage
# that every node sees: orbax writes from all processes), the data/tokenizer/init_from paths in
# configs/meditron_70b.py (or override them below), NCCL_IB_HCA / NCCL_SOCKET_IFNAME in
# launch/gpu_env.sh, and the venv activation.
#SBATCH --job-name=meditron-70b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=72:00:00
#SBATCH --output=logs/%x-%j.out
# SIGTERM 10 minutes before the time limit: meditron-train finishes the step, saves (about
# 840 GB of params + Adam state for 70B: allow for your file system's write rate), exits 0;
# resubmitting the same script resumes from that checkpoint.
#SBATCH --signal=TERM@600
##SBATCH --account=YOUR_ACCOUNT
##SBATCH --partition=YOUR_GPU_PARTITION

set -euo pipefail
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
CONFIG="${CONFIG:-$REPO/configs/meditron_70b.py}"
WORKDIR="${WORKDIR:-/checkpoints/runs/meditron-70b}"
source "$REPO/launch/srun_train.sh" "$@"
