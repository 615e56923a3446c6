"""MEDITRON-70B on a TPU v5p slice: configs/meditron_70b.py's recipe and global batch (512
sequences of 4096 tokens, lr 1.5e-4, ...) on 128 v5p chips (v5p-256, topology 4x4x8, 32 hosts of
4 chips), with the splash attention kernel.

    launch/tpu_pod.sh meditron-70b ZONE v5p-256 configs/meditron_70b_tpu.py
    meditron-plan --config configs/meditron_70b_tpu.py --target tpu-v5p --num_devices 128

Mesh: fsdp over all 128 chips and no tensor parallelism: the slice's ICI torus joins every chip
(there is no slow inter-node link to keep fsdp inside), and each parameter is split 128 ways.
512 sequences a step are 4 a chip: 4 micro-batches of one sequence a chip, with every matmul
output saved for the backward pass (remat=save_dots_no_batch: no recomputed matmuls, where
remat=full recomputes the whole forward, about a third more FLOPs).

Planned (XLA:TPU, the real train step compiled for compile-only v5p devices with libtpu 0.0.42,
jax 0.10.2): 69.8 GiB a chip (arguments 6.0 + temporaries 63.8, outputs aliased; XLA's own peak
64.3) of the v5p's 95 GiB. remat=full with all 4 sequences in one micro-batch came to 49.2 GiB
(peak 38.7): the fallback if a real run needs more room.
"""

from configs import meditron_70b


def get_config():
    c = meditron_70b.get_config()
    c.model.attention = 'splash'
    c.model.remat = 'save_dots_no_batch'
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.optim.grad_accum_steps = 4            # 512 / 4 = 128 a micro-batch = 1 a chip on 128
    c.train.peak_flops_per_device = 459e12  # v5p dense bf16 peak per chip
    return c
