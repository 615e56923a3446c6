"""MEDITRON-7B on a TPU v5p slice: configs/meditron_7b.py's recipe and global batch on 64 v5p
chips (v5p-128, topology 4x4x4, 16 hosts of 4 chips), with the splash attention kernel.

    launch/tpu_pod.sh NAME ZONE v5p-128 configs/meditron_7b_tpu.py     # create/reuse, train

Mesh: fsdp over all 64 chips (the slice's ICI torus joins every chip, so there is no slow
inter-node link to keep data parallelism on). 1600 sequences a step are 25 per chip: 5
micro-batches of 5 sequences per chip, with the matmul outputs saved for the backward pass
(remat=save_dots_no_batch: no recomputed matmuls). PLANNED_GIB below is XLA:TPU's buffer
assignment for this step (arguments + outputs - aliased + temporaries per chip), compiled for
compile-only v5p devices with libtpu (pip install -e '.[tpu]'); a v5p chip has 95 GiB.
Re-plan after changing the batch, the mesh or remat (tests/test_tpu_configs.py checks that it
still loads and validates; the compile is in BENCHMARKS.md's command).
"""

from configs import meditron_7b

PLANNED_GIB = None   # filled in from the compile, see the docstring


def get_config():
    c = meditron_7b.get_config()
    c.model.attention = 'splash'
    c.model.remat = 'save_dots_no_batch'
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.optim.grad_accum_steps = 5          # 1600 / 5 = 320 a micro-batch = 5 per chip on 64
    c.train.peak_flops_per_device = 459e12  # v5p dense bf16 peak per chip
    return c
