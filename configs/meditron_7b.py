"""MEDITRON-7B: continued pretraining of Llama-2-7B on GAP-Replay (see ../shared/MEDITRON.md).

    meditron-plan  --config configs/meditron_7b.py --target h100   # XLA:GPU memory, no GPU
    sbatch launch/slurm_7b.sh                                  # 8 nodes x 8 GPUs

Recipe: context 2048, 1600 sequences (3.3M tokens) a step, lr 3e-4 with 2000 warmup steps and
cosine to 10%, AdamW (0.9, 0.95, 1e-5), weight decay 0.1, clipping 1.0, bf16 compute. Mesh: fsdp
over the 8 GPUs of a node (parameters, gradients and optimizer state sharded there, all-gathers
on NVLink), data parallel across nodes. On 8 nodes (64 GPUs) each step is 5 micro-batches of
five 2048-token sequences per GPU, saving every matmul output for the backward pass
(remat=save_dots): XLA:GPU's plan (meditron-plan --target h100) puts that at 48.4 GiB a GPU
(49.3 before the loss fused the head),
within the 72.8 GiB that XLA may allocate (XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 of 79.1 GiB), at
+4% hardware FLOPs over the model's (save_dots_no_batch: +7%, full: +31%) and with a fifth of the
parameter all-gathers of 25 micro-batches of one sequence (BENCHMARKS.md, "Scale-out"). Check the MFU on the first log lines. Set data.sources to the prepared GAP-Replay files and train.init_from to the
converted Llama-2-7B (meditron-convert import-hf / import-meta).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model = base.model_config('llama2_7b')
    c.model.vocab_size = 32128       # Llama-2's 32,000 + the special tokens, padded to 128s
    c.model.compute_dtype = 'bfloat16'
    c.model.remat = 'save_dots'
    c.model.attention = 'cudnn'
    c.model.max_seq_len = 2048
    c.mesh.update(dict(data=-1, fsdp=8, tensor=1))
    c.data.sources = base.gap_replay_sources('/data/gap-replay')
    c.data.dir = '/data/gap-replay/prepared'
    c.data.tokenizer = '/models/llama-2-7b/tokenizer.model'
    c.data.seq_len = 2048
    c.data.global_batch_size = 1600
    c.data.worker_count = 4
    c.optim.update(dict(lr_peak=3e-4, lr_min=3e-5, warmup_steps=2000, grad_accum_steps=5))
    c.train.steps = 14600          # 48.1B tokens / 3.3M tokens a step: one epoch
    c.train.init_from = '/checkpoints/llama-2-7b'
    c.train.peak_flops_per_device = 989e12
    c.checkpoint.every = 500
    return c
