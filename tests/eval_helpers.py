"""A tiny random Llama saved as a params checkpoint, with a real SentencePiece tokenizer trained
on the shipped evaluation samples, for the meditron-eval tests."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax import model as model_lib
from meditron_jax import params_checkpoint, sharding
from meditron_jax.data import chat, tokenizer
from meditron_jax.evaluate import prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, 'meditron_jax', 'evaluate', 'samples')
TOKENIZER_VOCAB = 420        # not a multiple of 8: the model's vocab is padded past it


def sample_texts() -> list[str]:
    texts = []
    for path in glob.glob(os.path.join(SAMPLES, '**', '*.*'), recursive=True):
        with open(path, encoding='utf-8') as f:
            texts.append(f.read())
    for bench in prompts.TEMPLATES.values():
        for t in bench.values():
            texts.append(t.header + t.cue + t.cot_cue)
    return texts


def build(directory: str, seed: int = 0) -> tuple[str, str]:
    """(params checkpoint path, tokenizer .model path). Padding rows of the head get large
    weights, so scoring that looked past the true vocabulary would give other numbers."""
    tok_path = tokenizer.train(sample_texts(), os.path.join(directory, 'tok'), TOKENIZER_VOCAB,
                               special_tokens=chat.SPECIAL_TOKENS)
    cfg = model_lib.preset('tiny', vocab_size=-(-TOKENIZER_VOCAB // 8) * 8, max_seq_len=2048,
                           init_std=0.3)
    mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
    params = model_lib.init_params(cfg, mesh, seed)
    head = np.array(params["lm_head"]["kernel"])
    head[:, TOKENIZER_VOCAB:] = 5.0
    params['lm_head']['kernel'] = jnp.asarray(head)
    path = params_checkpoint.save_params(os.path.join(directory, 'ckpt'), params, cfg,
                                         true_vocab_size=TOKENIZER_VOCAB)
    return path, tok_path


def cpu_devices() -> int:
    return len(jax.devices())
