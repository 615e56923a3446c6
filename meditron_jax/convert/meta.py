"""Meta's Llama-2 release layout <-> params checkpoints.

Meta: ``params.json`` + ``consolidated.00.pth .. consolidated.NN.pth``, one per model-parallel
rank (7B: 1, 13B: 2, 70B: 8). Each rank holds a slice of every matrix, cut along the dimension
fairscale's parallel layers split (``SPLIT_DIM``); norms are replicated. q and k rows interleave
each rotary pair (2i, 2i+1) per head; HF and we split each head in halves, so import permutes
(``meta_to_hf_rows``) and export permutes back. GQA: wk/wv hold ``n_kv_heads * head_dim`` rows,
cut by rank like wq (70B, 8 ranks: one kv head each).

Memory: import reads one tensor from every rank (memory-mapped, ``weights_only``), concatenates
and writes it, so the peak is about the largest merged tensor twice. Export writes every rank's
file at once: ``torch.save`` of a skeleton of unallocated tensors under
``torch.serialization.skip_data()`` lays out the files, then each merged tensor is read once,
permuted, cut into rank slices and written at its storage's offset in each file.
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
import pickle
import shutil
import struct
import zipfile

import numpy as np

from meditron_jax import destination
from meditron_jax import model as model_lib
from meditron_jax import params_checkpoint as pc
from meditron_jax.convert import common
from meditron_jax.convert.common import ConversionError
from meditron_jax.convert.hf import TorchFiles

_HF_TO_META = {
    'model.embed_tokens.weight': 'tok_embeddings.weight',
    'model.norm.weight': 'norm.weight',
    'lm_head.weight': 'output.weight',
    'self_attn.q_proj.weight': 'attention.wq.weight',
    'self_attn.k_proj.weight': 'attention.wk.weight',
    'self_attn.v_proj.weight': 'attention.wv.weight',
    'self_attn.o_proj.weight': 'attention.wo.weight',
    'mlp.gate_proj.weight': 'feed_forward.w1.weight',
    'mlp.up_proj.weight': 'feed_forward.w3.weight',
    'mlp.down_proj.weight': 'feed_forward.w2.weight',
    'input_layernorm.weight': 'attention_norm.weight',
    'post_attention_layernorm.weight': 'ffn_norm.weight',
}
# Meta tensor (name without 'layers.{i}.') -> the dimension model-parallel ranks split.
SPLIT_DIM = {
    'tok_embeddings.weight': 1, 'output.weight': 0,
    'attention.wq.weight': 0, 'attention.wk.weight': 0, 'attention.wv.weight': 0,
    'attention.wo.weight': 1,
    'feed_forward.w1.weight': 0, 'feed_forward.w3.weight': 0, 'feed_forward.w2.weight': 1,
    'attention_norm.weight': None, 'ffn_norm.weight': None, 'norm.weight': None,
}
IGNORED = ('rope.freqs',)   # a buffer in Meta's files, recomputed by every implementation


def hf_to_meta_name(name: str) -> str:
    if name in _HF_TO_META:
        return _HF_TO_META[name]
    _, _, i, rest = name.split('.', 3)           # model.layers.{i}.rest
    return f'layers.{i}.{_HF_TO_META[rest]}'


def split_dim(meta_name: str) -> int | None:
    return SPLIT_DIM[meta_name.split('.', 2)[2] if meta_name.startswith('layers.') else meta_name]


def meta_to_hf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """q/k rows, Meta's interleaved rotary pairs -> HF's rotate-half halves, per head."""
    rows, cols = w.shape
    pairs = w.reshape(n_heads, rows // n_heads // 2, 2, cols)
    return pairs.transpose(0, 2, 1, 3).reshape(rows, cols)


def hf_to_meta_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    rows, cols = w.shape
    halves = w.reshape(n_heads, 2, rows // n_heads // 2, cols)
    return halves.transpose(0, 2, 1, 3).reshape(rows, cols)


def _rope_heads(hf_name: str, cfg: model_lib.LlamaConfig) -> int | None:
    if hf_name.endswith('q_proj.weight'):
        return cfg.num_heads
    if hf_name.endswith('k_proj.weight'):
        return cfg.num_kv_heads
    return None


# ----------------------------------------------------------------------------------- config


def mlp_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward hidden size rule."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def mlp_rule_for(dim: int, target: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that make Meta's rule give ``target``."""
    base = int(2 * 4 * dim / 3)
    candidates = [m for m in (256, 128, 64, 32, 16, 8, 4, 2, 1) if target % m == 0]
    for m in candidates:
        if mlp_dim(dim, m, None) == target:
            return m, None
    for m in candidates:
        for mult in (round(target / base, 6), target / base, (target + 0.5) / base):
            if mlp_dim(dim, m, mult) == target:
                return m, mult
    raise ConversionError(f'no (multiple_of, ffn_dim_multiplier) gives mlp_dim={target} '
                          f'for dim={dim} under Meta\'s rule')


def config_from_meta(params: dict, vocab_rows: int, where: str
                     ) -> tuple[model_lib.LlamaConfig, int]:
    required = ('dim', 'n_layers', 'n_heads')
    missing = [k for k in required if k not in params]
    if missing:
        raise ConversionError(f'{where}: missing keys {missing}')
    dim = params['dim']
    vocab = params.get('vocab_size', -1)
    true_vocab = vocab_rows if vocab in (-1, None) else vocab   # Llama-2 ships -1
    cfg = model_lib.LlamaConfig(
        vocab_size=true_vocab, hidden_size=dim, num_layers=params['n_layers'],
        num_heads=params['n_heads'], num_kv_heads=params.get('n_kv_heads') or params['n_heads'],
        mlp_dim=mlp_dim(dim, params.get('multiple_of', 256), params.get('ffn_dim_multiplier')),
        max_seq_len=params.get('max_seq_len', 4096),
        rope_theta=float(params.get('rope_theta', 10000.0)),
        rms_eps=float(params.get('norm_eps', 1e-5)))
    return cfg, true_vocab


def config_to_meta(cfg: model_lib.LlamaConfig, true_vocab: int) -> dict:
    multiple_of, multiplier = mlp_rule_for(cfg.hidden_size, cfg.mlp_dim)
    out = {'dim': cfg.hidden_size, 'n_layers': cfg.num_layers, 'n_heads': cfg.num_heads,
           'n_kv_heads': cfg.num_kv_heads, 'vocab_size': true_vocab, 'multiple_of': multiple_of,
           'norm_eps': cfg.rms_eps, 'rope_theta': cfg.rope_theta, 'max_seq_len': cfg.max_seq_len}
    if multiplier is not None:
        out['ffn_dim_multiplier'] = multiplier
    return out


# ----------------------------------------------------------------------------------- import


def _merged_shapes(shards: list[TorchFiles], src: str) -> dict[str, tuple[int, ...]]:
    names = [set(s.shapes) - set(IGNORED) for s in shards]
    union = set().union(*names)
    files = [os.path.basename(s.paths[0]) for s in shards]
    uneven = [f'{n} (only in {[f for f, ns in zip(files, names) if n in ns]})'
              for n in sorted(union) if any(n not in ns for ns in names)]
    if uneven:
        raise ConversionError(f'{src}: tensors not present in every rank: {", ".join(uneven)}')
    merged, problems = {}, []
    for n in sorted(union):
        shapes = [s.shapes[n] for s in shards]
        try:
            d = split_dim(n)
        except (KeyError, ValueError, IndexError):
            merged[n] = shapes[0]          # an unknown tensor: reported as unexpected later
            continue
        if d is None or len(shards) == 1:
            if any(s != shapes[0] for s in shapes):
                problems.append(f'{n}: replicated but shapes differ by rank {shapes}')
            merged[n] = shapes[0]
            continue
        others = {s[:d] + s[d + 1:] for s in shapes}
        if len(others) != 1:
            problems.append(f'{n}: rank shapes {shapes} differ outside dimension {d}')
            continue
        merged[n] = shapes[0][:d] + (sum(s[d] for s in shapes),) + shapes[0][d + 1:]
    if problems:
        raise ConversionError(f'{src}: ' + '; '.join(problems))
    return merged


def import_meta(src: str, dst: str, *, dtype: str | None = None, pad_vocab_multiple: int = 1,
                force: bool = False, tokenizer: str | None = None) -> str:
    """Meta consolidated checkpoint directory -> params checkpoint at ``dst`` (with
    tokenizer.model from ``src`` or its parent, or ``tokenizer``, when there is one)."""
    params_path = os.path.join(src, 'params.json')
    if not os.path.isfile(params_path):
        raise ConversionError(f'{src}: params.json is missing (the model shape comes from it)')
    paths = sorted(glob.glob(os.path.join(src, 'consolidated.*.pth')))
    if not paths:
        raise ConversionError(f'{src}: no consolidated.*.pth files; '
                              f'found {sorted(os.listdir(src))}')
    destination.check_destination(dst, 'params', force, [src])   # before reading any weight
    params = pc.read_json(params_path, 'Meta params file')
    if not isinstance(params, dict):
        raise ConversionError(f'{params_path}: expected a JSON object')
    shards = [TorchFiles([p]) for p in paths]
    found = _merged_shapes(shards, src)
    vocab_rows = found.get('tok_embeddings.weight', (0,))[0]
    cfg, true_vocab = config_from_meta(params, vocab_rows, params_path)
    plan = common.torch_tensor_plan(cfg, true_vocab)
    pc.check_names_and_shapes(found, {hf_to_meta_name(n): s for n, _, _, s in plan}, src,
                              error=ConversionError, torch_shapes=True)
    dtype = dtype or common.widest_dtype(s.dtypes[n] for s in shards for n in found)
    cfg = cfg.replace(vocab_size=common.padded_vocab(true_vocab, pad_vocab_multiple),
                      param_dtype=dtype)

    def read(hf_name: str) -> np.ndarray:
        name = hf_to_meta_name(hf_name)
        d = split_dim(name)
        parts = [s.read(name) for s in (shards if d is not None else shards[:1])]
        w = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=d)
        heads = _rope_heads(hf_name, cfg)
        return meta_to_hf_rows(w, heads) if heads else w

    def release():
        for s in shards:
            s.release()

    return common.import_stream(
        read, plan, cfg, dst, true_vocab=true_vocab, force=force,
        extra_meta={'source': f'meta:{os.path.abspath(src)}',
                    'token_ids': {'bos_token_id': 1, 'eos_token_id': 2}},
        end_of_layer=release, src=src, tokenizer=common.source_tokenizer(
            tokenizer, [os.path.join(src, 'tokenizer.model'),   # Meta keeps it one level up
                        os.path.join(os.path.dirname(os.path.abspath(src)), 'tokenizer.model')],
            true_vocab))


# ----------------------------------------------------------------------------------- export


class _SkeletonUnpickler(pickle.Unpickler):
    """Reads a torch.save data.pkl without running anything: tensor name -> storage key."""

    def find_class(self, module, name):
        if (module, name) == ('collections', 'OrderedDict'):
            return collections.OrderedDict
        if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
            return lambda storage, *args: storage
        if module == 'torch' and name.endswith('Storage'):
            return name
        raise pickle.UnpicklingError(f'unexpected global {module}.{name} in a skeleton')

    def persistent_load(self, pid):
        return pid[2]          # ('storage', storage type, key, location, numel)


def _storage_offsets(path: str) -> dict[str, int]:
    """Tensor name -> byte offset of its data in a torch.save zip file (stored, uncompressed)."""
    with zipfile.ZipFile(path) as z, open(path, 'rb') as f:
        pkl = next(n for n in z.namelist() if n.endswith('/data.pkl'))
        prefix = pkl[:-len('data.pkl')]
        keys = _SkeletonUnpickler(z.open(pkl)).load()
        offsets = {}
        for name, key in keys.items():
            info = z.getinfo(f'{prefix}data/{key}')
            if info.compress_type != zipfile.ZIP_STORED:
                raise AssertionError(f'{path}: {name} is compressed in the zip')
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack('<HH', local[26:30])
            offsets[name] = info.header_offset + 30 + name_len + extra_len
    return offsets


def export_meta(src: str, dst: str, *, shards: int = 1, dtype: str | None = None,
                tokenizer: str | None = None, force: bool = False) -> str:
    """Params checkpoint (or training workdir) -> Meta layout with ``shards`` model-parallel
    ranks."""
    destination.check_destination(dst, 'meta', force, [src])   # before any other work
    if shards < 1:
        raise ConversionError(f'--shards={shards} must be >= 1')
    if tokenizer:
        common.check_tokenizer(tokenizer, None, dirs=False)
    return common.export_with_fallback(src, lambda reader: _export_meta(
        reader, src, dst, shards=shards, dtype=dtype, tokenizer=tokenizer, force=force))


def _export_meta(reader: pc.ParamsReader, src: str, dst: str, *, shards: int, dtype: str | None,
                 tokenizer: str | None, force: bool) -> str:
    import torch
    cfg, true_vocab = reader.config, reader.true_vocab_size
    if tokenizer:
        common.check_tokenizer(tokenizer, true_vocab, dirs=False)
    dtype = dtype or cfg.param_dtype
    np_dt = common.np_dtype(dtype)
    plan = common.torch_tensor_plan(cfg, true_vocab)
    bad = []
    for hf_name, _, _, shape in plan:
        d = split_dim(hf_to_meta_name(hf_name))
        if d is not None and shape[d] % shards:
            bad.append(f'{hf_to_meta_name(hf_name)} {list(shape)} (dimension {d})')
    if cfg.num_kv_heads % shards:
        bad.insert(0, f'num_kv_heads={cfg.num_kv_heads}')
    if bad:
        raise ConversionError(f'cannot split into {shards} model-parallel ranks: {shards} does not '
                              f'divide {", ".join(bad[:8])}' + (' ...' if len(bad) > 8 else ''))

    def rank_shape(hf_name, shape):
        d = split_dim(hf_to_meta_name(hf_name))
        return shape if d is None else shape[:d] + (shape[d] // shards,) + shape[d + 1:]

    path, tmp = destination.prepare_destination(dst, force, 'meta', [src])
    try:
        files = [os.path.join(tmp, f'consolidated.{r:02d}.pth') for r in range(shards)]
        for file in files:
            # torch.empty does not touch its pages; skip_data writes no bytes for them.
            skeleton = collections.OrderedDict(
                (hf_to_meta_name(n), torch.empty(rank_shape(n, s), dtype=common.torch_dtype(dtype)))
                for n, _, _, s in plan)
            with torch.serialization.skip_data():
                torch.save(skeleton, file)
            del skeleton
        offsets = [_storage_offsets(file) for file in files]
        handles = [open(file, 'r+b') for file in files]
        try:
            for hf_name, rule, layer, _ in plan:
                w = common.export_tensor(reader, rule, layer, np_dt)
                heads = _rope_heads(hf_name, cfg)
                if heads:
                    w = hf_to_meta_rows(w, heads)
                name = hf_to_meta_name(hf_name)
                d = split_dim(name)
                parts = [w] * shards if d is None else np.split(w, shards, axis=d)
                for f, off, part in zip(handles, offsets, parts):
                    f.seek(off[name])
                    f.write(memoryview(np.ascontiguousarray(part).reshape(-1).view(np.uint8)))
        finally:
            for f in handles:
                f.close()
        with open(os.path.join(tmp, 'params.json'), 'w') as f:
            json.dump(config_to_meta(cfg, true_vocab), f, indent=2)
        if tokenizer:
            shutil.copyfile(tokenizer, os.path.join(tmp, 'tokenizer.model'))
        destination.finish_destination(tmp, path, 'meta')
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logging.info('exported %s -> %s (%d model-parallel ranks)', src, path, shards)
    return path
