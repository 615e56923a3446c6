"""MEDITRON-70B task finetuning (SFT): the continued-pretraining output finetuned on chat data.

    meditron-prepare --config configs/sft_meditron_70b.py     # tokenise: ids + loss masks
    meditron-plan    --config configs/sft_meditron_70b.py     # memory, no GPU
    meditron-train   --config configs/sft_meditron_70b.py \
                     --workdir /checkpoints/runs/meditron-70b-sft

Recipe (the MEDITRON paper's finetuning, as for 7B, see sft_meditron_7b.py): AdamW (0.9, 0.95,
eps 1e-5), lr 2e-5, 10% warmup, cosine to 10%, weight decay 0.1, global batch 64, 3 epochs
(train.epochs), bf16 compute, loss on the assistant turns. The mesh, context (4096) and memory
plan are the pretraining run's (configs/meditron_70b.py: tensor 8 within a node, fsdp over 16
nodes); 2 micro-batches of 2 sequences per fsdp rank make the 64-sequence step.
"""

from configs import base
from configs import meditron_70b


def get_config():
    c = meditron_70b.get_config()  # the model, numerics, mesh and tokenizer of the pretraining run
    c.data.format = 'chat'
    c.data.packing = 'first_fit'
    c.data.sources = [base.source('sft', '/data/sft/*.jsonl', weight=1.0, val_fraction=0.05)]
    c.data.dir = '/data/sft/prepared-70b'
    c.data.global_batch_size = 64
    c.optim.update(dict(lr_peak=2e-5, lr_min=2e-6, warmup_steps=0, warmup_fraction=0.1,
                        decay_steps=0, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1,
                        clip_norm=1.0, grad_accum_steps=2))
    c.train.epochs = 3.0
    c.train.init_from = '/checkpoints/runs/meditron-70b'  # the continued-pretraining workdir
    c.train.eval_every = 50
    c.train.eval_steps = 10
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    return c
