# Environment for meditron-train on NVIDIA GPU nodes; sourced by slurm_7b.sh and slurm_70b.sh.
# Every XLA flag below is parsed by the pinned jaxlib (tests/test_launch.py sources this file
# and starts JAX with it: XLA aborts on an unknown flag). Flags change between jaxlib versions:
# re-run that test after an upgrade.

# XLA: overlap the fsdp all-gathers / reduce-scatters and the data-parallel all-reduce with the
# matmuls of the scanned layers.
#   latency_hiding_scheduler      schedule collectives early and compute while they run
#   pipelined_{all_gather,...}    prefetch the next layer's parameters inside the layer scan
#   while_loop_double_buffering   unroll the scan by two so that prefetch has a buffer to land in
#   highest_priority_async_stream collectives on their own high-priority CUDA stream
#   *_combine_threshold_bytes     merge small collectives (norm scales, biases) into big ones;
#                                 a starting point: raise them if the profile shows many small
#                                 NCCL calls, lower them if memory is tight
#   triton_gemm=false             cuBLAS for the GEMMs (Triton's are slower for these shapes
#                                 on A100/H100 in our experience; try true after an upgrade)
export XLA_FLAGS="${XLA_FLAGS:-} \
 --xla_gpu_enable_latency_hiding_scheduler=true \
 --xla_gpu_enable_pipelined_all_gather=true \
 --xla_gpu_enable_pipelined_reduce_scatter=true \
 --xla_gpu_enable_pipelined_all_reduce=true \
 --xla_gpu_enable_while_loop_double_buffering=true \
 --xla_gpu_enable_highest_priority_async_stream=true \
 --xla_gpu_all_gather_combine_threshold_bytes=268435456 \
 --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 \
 --xla_gpu_all_reduce_combine_threshold_bytes=268435456 \
 --xla_gpu_enable_triton_gemm=false"

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
