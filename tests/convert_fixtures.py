"""Tiny torch Llama checkpoints for the converter tests, built with real transformers/torch.

The Meta layout is built here from a HF state dict with our own index arithmetic (not the
converter's functions), so a wrong permutation or split in the converter cannot cancel out.
"""

import json
import os

import numpy as np
import torch
import transformers

VOCAB = 250          # not a multiple of 8: exercises vocab padding
HIDDEN, LAYERS, HEADS, KV_HEADS, MLP = 64, 2, 8, 4, 128
HEAD_DIM = HIDDEN // HEADS


def hf_model(dtype=torch.float32, seed=0, vocab=VOCAB, **config) -> transformers.LlamaForCausalLM:
    """A random GQA Llama whose norm scales are random too (so misplaced norms show); ``config``
    overrides LlamaConfig fields (shape, rope_theta, rms_norm_eps)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**dict(
        vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, intermediate_size=MLP, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False), **config})
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('norm.weight'):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model.to(dtype).eval()


def tokens(batch=2, length=12, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def hf_logits(model, toks: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(toks).long()).logits.float().numpy()


# ------------------------------------------------------------------------------ Meta layout

_META_NAMES = {
    'model.embed_tokens.weight': ('tok_embeddings.weight', 1),
    'model.norm.weight': ('norm.weight', None),
    'lm_head.weight': ('output.weight', 0),
    'self_attn.q_proj.weight': ('attention.wq.weight', 0),
    'self_attn.k_proj.weight': ('attention.wk.weight', 0),
    'self_attn.v_proj.weight': ('attention.wv.weight', 0),
    'self_attn.o_proj.weight': ('attention.wo.weight', 1),
    'mlp.gate_proj.weight': ('feed_forward.w1.weight', 0),
    'mlp.up_proj.weight': ('feed_forward.w3.weight', 0),
    'mlp.down_proj.weight': ('feed_forward.w2.weight', 1),
    'input_layernorm.weight': ('attention_norm.weight', None),
    'post_attention_layernorm.weight': ('ffn_norm.weight', None),
}


def _meta_name(hf_name):
    if hf_name in _META_NAMES:
        return _META_NAMES[hf_name]
    _, _, i, rest = hf_name.split('.', 3)
    name, dim = _META_NAMES[rest]
    return f'layers.{i}.{name}', dim


def hf_rows_to_meta(w: torch.Tensor, n_heads: int, head_dim: int = HEAD_DIM) -> torch.Tensor:
    """Meta row h*H + 2j + c holds HF row h*H + c*H/2 + j (rotary pair j, component c)."""
    half = head_dim // 2
    src = [h * head_dim + c * half + j for h in range(n_heads) for j in range(half)
           for c in range(2)]
    return w[src]


def write_meta(model, directory: str, shards: int, extra=None) -> dict:
    """consolidated.XX.pth (one per rank) + params.json, as Meta's release lays them out (the
    shape, norm_eps and a non-default rope_theta from the model's config)."""
    c = model.config
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    head_dim = c.hidden_size // heads
    os.makedirs(directory, exist_ok=True)
    per_rank = [dict() for _ in range(shards)]
    for hf_name, w in model.state_dict().items():
        name, dim = _meta_name(hf_name)
        w = w.detach().clone()
        if hf_name.endswith('q_proj.weight'):
            w = hf_rows_to_meta(w, heads, head_dim)
        if hf_name.endswith('k_proj.weight'):
            w = hf_rows_to_meta(w, kv_heads, head_dim)
        assert dim is None or w.shape[dim] % shards == 0, (name, w.shape, shards)
        parts = [w] * shards if dim is None else torch.chunk(w, shards, dim=dim)
        for r, part in enumerate(parts):
            per_rank[r][name] = part.clone().contiguous()
    for r, state in enumerate(per_rank):
        state['rope.freqs'] = torch.ones(head_dim // 2)   # as in Meta's files; ignored
        state.update(extra or {})
        torch.save(state, os.path.join(directory, f'consolidated.{r:02d}.pth'))
    # 8 * 64 / 3 = 170 -> * 0.75 = 127 -> multiple of 128 = 128 = MLP (dim 128: 256)
    params = dict(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=heads,
                  n_kv_heads=kv_heads, vocab_size=-1, multiple_of=128, ffn_dim_multiplier=0.75,
                  norm_eps=c.rms_norm_eps)
    if c.rope_parameters['rope_theta'] != 10000.0:   # as Llama 3's params.json
        params['rope_theta'] = c.rope_parameters['rope_theta']
    with open(os.path.join(directory, 'params.json'), 'w') as f:
        json.dump(params, f)
    return params


def load_meta(directory: str) -> list[dict]:
    files = sorted(f for f in os.listdir(directory) if f.startswith('consolidated.'))
    return [torch.load(os.path.join(directory, f), weights_only=True) for f in files]


def leftovers(parent: str, name: str) -> list[str]:
    """Anything a failed conversion to parent/name left behind (the dir or its temp dirs)."""
    return [f for f in os.listdir(parent) if name in f]
