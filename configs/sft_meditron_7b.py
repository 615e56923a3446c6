"""MEDITRON-7B task finetuning (SFT): the continued-pretraining output finetuned on chat data.

    meditron-prepare-sft --benchmark medqa --data /data/medqa/train.jsonl \
                         --out /data/sft/medqa.jsonl
    meditron-prepare --config configs/sft_meditron_7b.py      # tokenise: ids + loss masks
    meditron-plan    --config configs/sft_meditron_7b.py      # memory, no GPU
    meditron-train   --config configs/sft_meditron_7b.py \
                     --workdir /checkpoints/runs/meditron-7b-sft

Recipe (the MEDITRON paper's finetuning): AdamW (0.9, 0.95, eps 1e-5), lr 2e-5 with 10% linear
warmup and cosine decay to 10% (2e-6), weight decay 0.1, clipping 1.0, global batch 64 sequences,
3 epochs (train.epochs: the steps follow from the prepared token count and are printed at start),
bf16 compute, loss on the assistant turns only. init_from is the continued-pretraining workdir
(its latest complete step); the tokenizer is Llama-2's, to which prepare appends the corpus
tokens then <|im_start|> and <|im_end|> (32,007 pieces, within the 32,128 rows), so the ids the
pretraining saw do not move. One node of 8 GPUs: fsdp over its 8 GPUs, 8 micro-batches of one
sequence per GPU. On more nodes, keep the product data x fsdp x grad_accum_steps = 64.
Set data.sources to the chat JSONL files (one source per benchmark, or a mixture by weight).
"""

from configs import base
from configs import meditron_7b


def get_config():
    c = meditron_7b.get_config()   # the model, numerics and tokenizer of the pretraining run
    c.mesh.update(dict(data=-1, fsdp=8, tensor=1))
    base.sft_recipe(c, '/data/sft/*.jsonl', '/data/sft/prepared-7b',
                    init_from='/checkpoints/runs/meditron-7b',   # the continued-pretraining workdir
                    grad_accum_steps=8)
    c.data.seq_len = 2048
    c.train.eval_every = 100
    c.checkpoint.every = 200
    return c
