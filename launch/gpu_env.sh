# Environment for meditron-train on NVIDIA GPU nodes; sourced by slurm_7b.sh and slurm_70b.sh.
# Every XLA flag it sets is parsed by the pinned jaxlib (tests/test_launch.py sources this file
# and starts JAX with it: XLA aborts on an unknown flag).

# XLA: the flag list lives in meditron_jax/xla_flags_gpu.txt (one flag a line, with why), the one
# source that meditron-plan --target h100/a100 also compiles with.
MEDITRON_XLA_FLAGS_FILE="$(dirname "${BASH_SOURCE[0]}")/../meditron_jax/xla_flags_gpu.txt"
export XLA_FLAGS="${XLA_FLAGS:-} $(sed -e 's/#.*//' "$MEDITRON_XLA_FLAGS_FILE" | xargs)"

# JAX preallocates this fraction of GPU memory (default 0.75); leave some for NCCL and cuDNN.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

# NCCL. WARN prints transport problems without flooding the log; INFO shows the chosen
# transport (NET/IB vs socket) on the first collective, worth doing once per new cluster.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Cluster-specific, uncomment and set: the InfiniBand adapters and the interface NCCL uses to
# bootstrap (see `ibv_devinfo` and `ip addr` on a compute node).
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3
# export NCCL_SOCKET_IFNAME=ib0
# On some NVSwitch systems NVLink SHARP hangs or fails at start-up with older drivers:
# export NCCL_NVLS_ENABLE=0

# One copy of the grain reader per host; no thread oversubscription from numpy/BLAS.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export PYTHONUNBUFFERED=1
