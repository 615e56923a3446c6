#!/bin/bash
# MEDITRON-7B continued pretraining on N nodes x 8 GPUs (default 8 nodes = 64 GPUs).
#
#   mkdir -p logs && sbatch launch/slurm_7b.sh                       # from the repository root
#   sbatch --nodes=4 launch/slurm_7b.sh --config.train.steps=100   # extra args: meditron-train
#
# One task per node; each runs the same meditron-train command, which joins the job through
# jax.distributed with the coordinator on the first node (MEDITRON_* variables below).
# Mesh (configs/meditron_7b.py): fsdp=8 inside a node (parameters, gradients and Adam state
# sharded over NVLink), data=-1 = the number of nodes. The micro-batch (global batch 1600 /
# grad_accum_steps 25 = 64 sequences, one a GPU on 8 nodes) must divide by 8 x nodes: 1, 2, 4
# or 8 nodes; otherwise change optim.grad_accum_steps or data.global_batch_size (meditron-train
# names the keys if it does not divide). Check memory first: meditron-plan --config
# configs/meditron_7b.py --num_devices $((8 * NODES)).
#
# Change for your cluster: the #SBATCH account/partition/time lines, WORKDIR (shared storage
# that every node sees: orbax writes from all processes), the data/tokenizer/init_from paths in
# configs/meditron_7b.py (or override them below), NCCL_IB_HCA / NCCL_SOCKET_IFNAME in
# launch/gpu_env.sh, and the venv activation.
#SBATCH --job-name=meditron-7b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
# SIGTERM 5 minutes before the time limit: meditron-train finishes the step, saves, exits 0;
# resubmitting the same script resumes from that checkpoint.
#SBATCH --signal=TERM@300
##SBATCH --account=YOUR_ACCOUNT
##SBATCH --partition=YOUR_GPU_PARTITION

set -euo pipefail
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
CONFIG="${CONFIG:-$REPO/configs/meditron_7b.py}"
WORKDIR="${WORKDIR:-/checkpoints/runs/meditron-7b}"
source "$REPO/launch/srun_train.sh" "$@"
