"""MEDITRON-70B: continued pretraining of Llama-2-70B on GAP-Replay (see ../shared/MEDITRON.md).

    meditron-plan  --config configs/meditron_70b.py --target h100  # XLA:GPU memory, no GPU
    sbatch launch/slurm_70b.sh                                 # 16 nodes x 8 GPUs

Recipe: context 4096, 512 sequences (2.1M tokens) a step, lr 1.5e-4, 2000 warmup steps, cosine
to 10%, bf16 compute. MEDITRON used 2 data x 8 tensor x 8 pipeline stages on 128 A100-80GB; we
have no pipeline stage and use tensor parallelism over the 8 GPUs of a node (NVLink) and fsdp
over the 16 nodes: each parameter is split 128 ways. 16 micro-batches of 2 sequences per fsdp
rank make a step, saving every matmul output for the backward pass (remat=save_dots): XLA:GPU's
plan (meditron-plan --target h100) puts that at 44.4 GiB a GPU
(44.8 before the fused loss), within the 72.8 GiB XLA may
allocate (XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 of 79.1 GiB), at +4% hardware FLOPs over the
model's where remat=full cost +30% (9,114 vs 7,310 TFLOP a GPU a step). 4 sequences a
micro-batch (8 micro-batches, half the all-gathers) came to 76.0 GiB: over that budget.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model = base.model_config('llama2_70b')
    c.model.vocab_size = 32128       # Llama-2's 32,000 + the special tokens, padded to 128s
    c.model.compute_dtype = 'bfloat16'
    c.model.remat = 'save_dots'
    c.model.attention = 'cudnn'
    c.mesh.update(dict(data=1, fsdp=-1, tensor=8))
    c.data.sources = base.gap_replay_sources('/data/gap-replay')
    c.data.dir = '/data/gap-replay/prepared'
    c.data.tokenizer = '/models/llama-2-70b/tokenizer.model'
    c.data.seq_len = 4096
    c.data.global_batch_size = 512
    c.data.worker_count = 4
    c.optim.update(dict(lr_peak=1.5e-4, lr_min=1.5e-5, warmup_steps=2000, grad_accum_steps=16))
    c.train.steps = 23000          # 48.1B tokens / 2.1M tokens a step
    c.train.init_from = '/checkpoints/llama-2-70b'
    c.train.peak_flops_per_device = 989e12
    c.checkpoint.every = 250
    return c
