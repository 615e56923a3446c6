"""SFT debug run: finetunes the debug model on the medical chat set shipped with the package.

From random weights (a 512-piece tokenizer is trained on the conversations):

    meditron-train --config configs/sft_debug.py --workdir runs/sft_debug

From a debug pretraining run (pretrain -> finetune: its tokenizer gains <|im_start|> and
<|im_end|>, 2050 pieces, and init_from grows the embedding to 2176 rows):

    meditron-train --config configs/debug.py --workdir runs/debug
    meditron-train --config configs/sft_debug.py:runs/debug --workdir runs/sft_debug_from_debug

The chat set (meditron_jax/data/sft/medical_qa.jsonl) is 40 short question/answer conversations
written for the project; 2 are held out for validation. The loss is on the assistant turns only.
Measured on 2 shared CPU cores: from random weights 92 steps (60 epochs) in about 1 minute, the
training loss falls from 6.2 to 0.05; from a 40-step debug pretraining run 86 steps, 6.0 -> 0.04.
The validation loss (unseen questions) stays high (5-7). Greedy decoding of the 34 single-question
training prompts (chat.wrap_prompt) reproduced all 34 training answers in both cases, which is
what `meditron_jax.load(workdir).complete(...)` should return.
"""

import os

from configs import base
import meditron_jax

CHAT_SET = os.path.join(os.path.dirname(meditron_jax.__file__), 'data', 'sft', 'medical_qa.jsonl')


def get_config(pretrained_workdir: str = ''):
    c = base.get_config()
    c.model = base.model_config('debug')
    c.data.format = 'chat'
    c.data.packing = 'first_fit'
    c.data.sources = [base.source('medical_qa', CHAT_SET, weight=1.0, val_fraction=0.1)]
    c.data.seq_len = 256
    c.data.global_batch_size = 8
    if pretrained_workdir:
        c.train.init_from = pretrained_workdir
        c.data.tokenizer = os.path.join(pretrained_workdir, 'data', 'tokenizer.model')
        c.model.vocab_size = 2176       # 2048 + the two ChatML tokens, padded to 128s
    else:
        c.data.tokenizer_vocab_size = 512
        c.model.vocab_size = 512
    c.optim.lr_peak, c.optim.lr_min = 3e-3, 3e-4
    c.optim.warmup_fraction = 0.1
    c.train.epochs = 60
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.eval_steps = 1
    # A rough CPU figure, for meditron-plan's cpu target; training on a CPU measures its own.
    c.train.peak_flops_per_device = 1e11
    c.checkpoint.every = 50
    c.checkpoint.keep = 2
    return c
