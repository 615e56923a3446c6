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
    base.sft_recipe(c, '/data/sft/*.jsonl', '/data/sft/prepared-70b',
                    init_from='/checkpoints/runs/meditron-70b',  # the continued-pretraining workdir
                    grad_accum_steps=2)
    c.train.eval_every = 50
    c.checkpoint.every = 100
    return c
