"""Debug run: a 1.3M-parameter Llama on the corpus shipped with the package, on one CPU.

    meditron-train --config configs/debug.py --workdir runs/debug

Prepares the shipped corpus into <workdir>/data on first use (a SentencePiece tokenizer of 2048
pieces is trained on it), then trains 300 steps of 8 x 256 tokens. Expect a few minutes on 2 CPU
cores (measured: 3m45s after a fresh install, 2,000-5,000 tokens/s) and the loss to fall from
7.6 (ln 2048) to about 0.6, validation loss about 0.55 at step 300 (the shipped corpus is
template-generated, so it is learnable well below natural-text perplexities).
"""

import os

from configs import base
import meditron_jax

CORPUS = os.path.join(os.path.dirname(meditron_jax.__file__), 'data', 'corpus')


def get_config():
    c = base.get_config()
    c.model = base.model_config('debug')
    c.data.sources = [
        base.source('guidelines', f'{CORPUS}/guidelines/*.jsonl', weight=0.30, val_fraction=0.05),
        base.source('abstracts', f'{CORPUS}/abstracts/*.jsonl', weight=0.60, val_fraction=0.05),
        base.source('replay', f'{CORPUS}/replay/*.jsonl', weight=0.10, val_fraction=0.05),
    ]
    c.data.tokenizer_vocab_size = c.model.vocab_size
    c.data.seq_len = 256
    c.data.global_batch_size = 8
    c.data.clean.min_chars = 100
    c.optim.lr_peak = 3e-3
    c.optim.lr_min = 3e-4
    c.optim.warmup_steps = 30
    c.train.steps = 300
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_steps = 4
    # A rough CPU figure, for meditron-plan's cpu target; training on a CPU measures its own.
    c.train.peak_flops_per_device = 1e11
    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    return c
