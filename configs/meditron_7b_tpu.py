"""MEDITRON-7B on a TPU v5p slice: configs/meditron_7b.py's recipe and global batch (1600
sequences of 2048 tokens, lr 3e-4, ...) on 64 v5p chips (v5p-128, topology 4x4x4, 16 hosts of 4
chips), with the splash attention kernel.

    launch/tpu_pod.sh meditron-7b ZONE v5p-128 configs/meditron_7b_tpu.py
    meditron-plan --config configs/meditron_7b_tpu.py --target tpu-v5p --num_devices 64

Mesh: fsdp over all 64 chips: the slice's ICI torus joins every chip (there is no slow
inter-node link to keep fsdp inside). 1600 sequences a step are 25 a chip: 5 micro-batches of 5
sequences a chip (1 or 25 are the other whole splits), with nothing rematerialised.

Planned (XLA:TPU, the real train step compiled for compile-only v5p devices with libtpu 0.0.42,
jax 0.10.2): 53.3 GiB a chip (arguments 1.2 + temporaries 52.2, outputs aliased; XLA's own peak
50.6) of the v5p's 95 GiB; 60.1 before the MLP's backward recomputed SwiGLU's output
(layers.swiglu_down), 80.2 before SwiGLU's backward kept only gate and up (c0aa549).
remat=save_dots_no_batch (recomputes the norms, RoPE, SwiGLU and the attention forward in the
backward pass) came to 32.9 GiB (peak 30.1) before both: the fallback if a real run needs more
room.
"""

from configs import meditron_7b


def get_config():
    c = meditron_7b.get_config()
    c.model.attention = 'splash'
    c.model.remat = 'none'
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.optim.grad_accum_steps = 5            # 1600 / 5 = 320 a micro-batch = 5 a chip on 64
    c.train.peak_flops_per_device = 459e12  # v5p dense bf16 peak per chip
    return c
