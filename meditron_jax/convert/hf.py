"""Hugging Face Llama checkpoints <-> params checkpoints, one tensor at a time.

Import reads ``config.json`` plus ``model.safetensors``, sharded safetensors
(``model.safetensors.index.json``) or ``pytorch_model*.bin`` (``torch.load(weights_only=True,
mmap=True)``: no pickled code runs). Safetensors are read with plain file reads at the offsets in
their header, not through a memory map, so the pages of tensors already converted do not stay in
the process. Export writes ``model-0000k-of-0000n.safetensors`` shards (``shard_size`` bytes at
most, a larger tensor alone in its shard) with the index, ``config.json``,
``generation_config.json`` and, when given, the tokenizer; each shard's header is written first
(all shapes are known from the config) and then each tensor in turn, so a shard is never whole in
memory.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import struct
from collections.abc import Callable, Iterable

import numpy as np

from meditron_jax import destination
from meditron_jax import model as model_lib
from meditron_jax import params_checkpoint as pc
from meditron_jax.convert import common
from meditron_jax.convert.common import ConversionError

# safetensors dtype codes <-> numpy
_ST_DTYPES = {'F64': 'float64', 'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16'}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
# Non-parameter buffers some older HF checkpoints carry.
IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)
MAX_HEADER_BYTES = 100_000_000   # the safetensors format's own limit


# ------------------------------------------------------------------------------ safetensors


class SafetensorsFile:
    """Header-indexed reads of one .safetensors file (the format: 8-byte little-endian header
    length, JSON header {name: {dtype, shape, data_offsets}}, then raw bytes)."""

    def __init__(self, path: str):
        self.path = path
        with open(path, 'rb') as f:
            head = f.read(8)
            if len(head) != 8:
                raise ConversionError(f'{path}: not a safetensors file (shorter than 8 bytes)')
            (n,) = struct.unpack('<Q', head)
            size = os.fstat(f.fileno()).st_size
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise ConversionError(
                    f'{path}: not a valid safetensors file: its header claims {n} bytes, but the '
                    f'file has {size} bytes (and headers are at most {MAX_HEADER_BYTES})')
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise ConversionError(f'{path}: unreadable safetensors header: {e}') from e
        if not isinstance(header, dict):
            raise ConversionError(f'{path}: safetensors header is not a JSON object')
        header.pop('__metadata__', None)
        self.data_start = 8 + n
        self.entries = header
        for name, e in header.items():
            try:
                begin, end = (int(v) for v in e['data_offsets'])
            except (KeyError, TypeError, ValueError):
                raise ConversionError(f'{path}: tensor {name} has no valid data_offsets') from None
            if not 0 <= begin <= end <= size - self.data_start:
                raise ConversionError(
                    f'{path}: tensor {name} claims bytes {begin}..{end} of the data, but the file '
                    f'holds {size - self.data_start} data bytes')

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]['shape'])

    def dtype(self, name: str) -> np.dtype:
        code = self.entries[name]['dtype']
        if code not in _ST_DTYPES:
            raise ConversionError(f'{self.path}: tensor {name} has dtype {code}; expected one of '
                                  f'{sorted(_ST_DTYPES)}')
        return common.np_dtype(_ST_DTYPES[code])

    def read(self, name: str) -> np.ndarray:
        begin, end = self.entries[name]['data_offsets']
        out = np.empty(self.shape(name), self.dtype(name))
        if out.nbytes != end - begin:
            raise ConversionError(f'{self.path}: tensor {name} {list(out.shape)} needs '
                                  f'{out.nbytes} bytes, header says {end - begin}')
        with open(self.path, 'rb') as f:
            f.seek(self.data_start + begin)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
                raise ConversionError(f'{self.path}: truncated data for tensor {name}')
        return out


def write_safetensors(path: str, entries: list[tuple[str, np.dtype, tuple[int, ...]]],
                      produce: Callable[[str], np.ndarray],
                      metadata: dict[str, str] | None = None) -> int:
    """Writes the header from ``entries``, then asks ``produce`` for one tensor at a time."""
    header: dict = {'__metadata__': metadata or {'format': 'pt'}}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {'dtype': _ST_CODES[common.dtype_name(dtype)], 'shape': list(shape),
                        'data_offsets': [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(',', ':')).encode()
    blob += b' ' * (-len(blob) % 8)   # data aligned to 8 bytes, as the reference writer does
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(blob)))
        f.write(blob)
        for name, dtype, shape in entries:
            x = produce(name)
            if x.dtype != dtype or tuple(x.shape) != tuple(shape) or not x.flags.c_contiguous:
                raise AssertionError(f'{name}: produced {x.dtype} {x.shape}, '
                                     f'planned {dtype} {shape}')
            f.write(memoryview(x.reshape(-1).view(np.uint8)))
    return offset


# ------------------------------------------------------------------------------ torch .bin


class TorchFiles:
    """Tensors of torch-pickled files (``torch.load(weights_only=True, mmap=True)``), loaded
    lazily; ``release()`` drops the mappings so converted pages leave the process."""

    def __init__(self, paths: Iterable[str]):
        self.paths = list(paths)
        self._loaded: dict[str, dict] = {}
        self.index: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        for path in self.paths:
            for name, t in self._load(path).items():
                self.index[name] = path
                self.shapes[name] = tuple(t.shape)
                self.dtypes[name] = common.np_dtype(str(t.dtype).removeprefix('torch.'))
        self.release()

    def _load(self, path: str) -> dict:
        import pickle
        import torch
        if path not in self._loaded:
            try:
                state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
            except pickle.UnpicklingError as e:
                raise ConversionError(
                    f'{path}: refused by torch.load(weights_only=True): the file holds pickled '
                    f'objects other than tensors, and no pickled code is run. {e}') from e
            except RuntimeError as e:
                raise ConversionError(f'{path}: not a torch checkpoint: {e}') from e
            if not isinstance(state, dict):
                raise ConversionError(f'{path}: holds a {type(state).__name__}, expected a dict '
                                      f'of tensor name -> tensor')
            bad = [f'{k} ({type(v).__name__})' for k, v in state.items()
                   if not isinstance(v, torch.Tensor)]
            if bad:
                raise ConversionError(f'{path}: entries that are not tensors: {", ".join(bad)}')
            self._loaded[path] = state
        return self._loaded[path]

    def read(self, name: str) -> np.ndarray:
        return common.torch_to_numpy(self._load(self.index[name])[name])

    def release(self) -> None:
        self._loaded.clear()


class SafetensorsFiles:
    def __init__(self, paths: Iterable[str]):
        self.files = [SafetensorsFile(p) for p in paths]
        self.index = {name: f for f in self.files for name in f.entries}
        self.shapes = {name: f.shape(name) for name, f in self.index.items()}
        self.dtypes = {name: f.dtype(name) for name, f in self.index.items()}

    def read(self, name: str) -> np.ndarray:
        return self.index[name].read(name)

    def release(self) -> None:
        pass


def open_hf_weights(src: str):
    """The weight files of a HF checkpoint directory, safetensors preferred."""
    def from_index(index_file):
        index = pc.read_json(index_file, 'weights index')
        if not isinstance(index, dict) or not isinstance(index.get('weight_map'), dict):
            raise ConversionError(f'{index_file}: no "weight_map" object')
        weight_map = index['weight_map']
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(src, f))]
        if missing:
            raise ConversionError(f'{index_file} names shard files that do not exist: {missing}')
        return [os.path.join(src, f) for f in files]

    if os.path.exists(os.path.join(src, 'model.safetensors.index.json')):
        return SafetensorsFiles(from_index(os.path.join(src, 'model.safetensors.index.json')))
    if os.path.exists(os.path.join(src, 'model.safetensors')):
        return SafetensorsFiles([os.path.join(src, 'model.safetensors')])
    if os.path.exists(os.path.join(src, 'pytorch_model.bin.index.json')):
        return TorchFiles(from_index(os.path.join(src, 'pytorch_model.bin.index.json')))
    bins = sorted(glob.glob(os.path.join(src, 'pytorch_model*.bin')))
    if bins:
        return TorchFiles(bins)
    raise ConversionError(
        f'{src}: no weights found; expected model.safetensors, model.safetensors.index.json, '
        f'pytorch_model.bin.index.json or pytorch_model*.bin; found {sorted(os.listdir(src))}')


# ----------------------------------------------------------------------------------- config


def config_from_hf(hf: dict, where: str) -> tuple[model_lib.LlamaConfig, int]:
    """(LlamaConfig, true vocab size) from a HF Llama config.json; unsupported features raise."""
    problems = []
    if hf.get('model_type', 'llama') != 'llama':
        problems.append(f'model_type={hf.get("model_type")!r}, expected "llama"')
    for key in ('attention_bias', 'mlp_bias'):
        if hf.get(key):
            problems.append(f'{key}=true is not supported (Llama-2 has no biases)')
    if hf.get('hidden_act', 'silu') != 'silu':
        problems.append(f'hidden_act={hf.get("hidden_act")!r}, expected "silu"')
    rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
    rope_type = rope.get('rope_type', rope.get('type', 'default'))
    if rope_type != 'default':
        problems.append(f'rope_type={rope_type!r}: only default RoPE is supported')
    heads = hf.get('num_attention_heads')
    if heads and hf.get('head_dim') not in (None, hf['hidden_size'] // heads):
        problems.append(f'head_dim={hf["head_dim"]} differs from hidden_size / heads')
    required = ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
                'intermediate_size')
    problems += [f'missing key {k!r}' for k in required if k not in hf]
    if problems:
        raise ConversionError(f'{where}: ' + '; '.join(problems))
    theta = rope.get('rope_theta', hf.get('rope_theta', 10000.0))
    cfg = model_lib.LlamaConfig(
        vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
        num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
        num_kv_heads=hf.get('num_key_value_heads') or hf['num_attention_heads'],
        mlp_dim=hf['intermediate_size'], max_seq_len=hf.get('max_position_embeddings', 4096),
        rope_theta=float(theta), rms_eps=float(hf.get('rms_norm_eps', 1e-5)))
    return cfg, hf['vocab_size']


def config_to_hf(cfg: model_lib.LlamaConfig, true_vocab: int, dtype: str,
                 token_ids: dict) -> dict:
    import transformers
    return {
        'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
        'vocab_size': true_vocab, 'hidden_size': cfg.hidden_size,
        'intermediate_size': cfg.mlp_dim, 'num_hidden_layers': cfg.num_layers,
        'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.num_kv_heads,
        'head_dim': cfg.head_dim, 'hidden_act': 'silu',
        'max_position_embeddings': cfg.max_seq_len, 'rms_norm_eps': cfg.rms_eps,
        'rope_theta': cfg.rope_theta,
        'rope_parameters': {'rope_theta': cfg.rope_theta, 'rope_type': 'default'},
        'attention_bias': False, 'attention_dropout': 0.0, 'mlp_bias': False,
        'tie_word_embeddings': False, 'initializer_range': cfg.init_std, 'pretraining_tp': 1,
        'use_cache': True, 'dtype': dtype, 'transformers_version': transformers.__version__,
        **token_ids,
    }


def _token_ids(hf: dict) -> dict:
    ids = {'bos_token_id': 1, 'eos_token_id': 2}
    ids.update({k: hf[k] for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')
                if hf.get(k) is not None})
    return ids


# ----------------------------------------------------------------------------------- import


def import_hf(src: str, dst: str, *, dtype: str | None = None, pad_vocab_multiple: int = 1,
              force: bool = False, tokenizer: str | None = None) -> str:
    """HF Llama checkpoint directory -> params checkpoint at ``dst`` (with the source's
    tokenizer.model, or ``tokenizer``, when there is one)."""
    config_path = os.path.join(src, 'config.json')
    if not os.path.isfile(config_path):
        raise ConversionError(f'{src}: config.json is missing (the model shape comes from it)')
    destination.check_destination(dst, 'params', force, [src])   # before reading any weight
    hf = pc.read_json(config_path, 'HF config file')
    if not isinstance(hf, dict):
        raise ConversionError(f'{config_path}: expected a JSON object')
    cfg, true_vocab = config_from_hf(hf, config_path)
    weights = open_hf_weights(src)
    found = {n: s for n, s in weights.shapes.items() if not n.endswith(IGNORED_SUFFIXES)}
    read = weights.read
    if hf.get('tie_word_embeddings') and 'lm_head.weight' not in found:
        # A tied head is stored once, as the embedding; ours is untied.
        found['lm_head.weight'] = found.get('model.embed_tokens.weight', ())
        read = lambda n: weights.read('model.embed_tokens.weight' if n == 'lm_head.weight' else n)
    plan = common.torch_tensor_plan(cfg, true_vocab)
    pc.check_names_and_shapes(found, {n: s for n, _, _, s in plan}, src,
                              error=ConversionError, torch_shapes=True)
    dtype = dtype or common.widest_dtype(weights.dtypes[n] for n in found)
    cfg = cfg.replace(vocab_size=common.padded_vocab(true_vocab, pad_vocab_multiple),
                      param_dtype=dtype)
    return common.import_stream(
        read, plan, cfg, dst, true_vocab=true_vocab, force=force,
        extra_meta={'source': f'hf:{os.path.abspath(src)}', 'token_ids': _token_ids(hf)},
        end_of_layer=weights.release, src=src, tokenizer=common.source_tokenizer(
            tokenizer, [os.path.join(src, 'tokenizer.model')], true_vocab))


# ----------------------------------------------------------------------------------- export


def copy_tokenizer(tokenizer: str, dst: str, cfg: model_lib.LlamaConfig, token_ids: dict) -> None:
    """A SentencePiece .model file (written as tokenizer.model with a LlamaTokenizer config) or a
    directory of HF tokenizer files (copied as they are)."""
    names = ('tokenizer.model', 'tokenizer.json', 'tokenizer_config.json',
             'special_tokens_map.json', 'added_tokens.json')
    if os.path.isdir(tokenizer):
        found = [n for n in names if os.path.exists(os.path.join(tokenizer, n))]
        if not found:
            raise ConversionError(f'tokenizer directory {tokenizer} has none of {list(names)}')
        for n in found:
            shutil.copyfile(os.path.join(tokenizer, n), os.path.join(dst, n))
        return
    if not os.path.isfile(tokenizer):
        raise ConversionError(f'tokenizer {tokenizer} does not exist')
    shutil.copyfile(tokenizer, os.path.join(dst, 'tokenizer.model'))
    tok_config = {
        'tokenizer_class': 'LlamaTokenizer', 'bos_token': '<s>', 'eos_token': '</s>',
        'unk_token': '<unk>', 'add_bos_token': True, 'add_eos_token': False,
        'model_max_length': cfg.max_seq_len, 'legacy': False,
    }
    with open(os.path.join(dst, 'tokenizer_config.json'), 'w') as f:
        json.dump(tok_config, f, indent=2)


def plan_shards(entries: list[tuple[str, np.dtype, tuple[int, ...]]], shard_size: int
                ) -> list[list[tuple[str, np.dtype, tuple[int, ...]]]]:
    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = int(np.prod(entry[2])) * np.dtype(entry[1]).itemsize
        if current and size + nbytes > shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def export_hf(src: str, dst: str, *, dtype: str | None = None, shard_size: int = 5 * 2**30,
              tokenizer: str | None = None, force: bool = False) -> str:
    """Params checkpoint (or training workdir) -> HF directory that
    ``AutoModelForCausalLM.from_pretrained`` loads."""
    destination.check_destination(dst, 'hf', force, [src])   # before any other work
    if tokenizer:
        common.check_tokenizer(tokenizer, None, dirs=True)
    return common.export_with_fallback(src, lambda reader: _export_hf(
        reader, src, dst, dtype=dtype, shard_size=shard_size, tokenizer=tokenizer, force=force))


def _export_hf(reader: pc.ParamsReader, src: str, dst: str, *, dtype: str | None,
               shard_size: int, tokenizer: str | None, force: bool) -> str:
    cfg, true_vocab = reader.config, reader.true_vocab_size
    dtype = dtype or cfg.param_dtype
    np_dt = common.np_dtype(dtype)
    if tokenizer:
        common.check_tokenizer(tokenizer, true_vocab, dirs=True)
    plan = common.torch_tensor_plan(cfg, true_vocab)
    by_name = {name: (rule, layer) for name, rule, layer, _ in plan}
    shards = plan_shards([(name, np_dt, shape) for name, _, _, shape in plan], shard_size)
    token_ids = reader.meta.get('token_ids') or {'bos_token_id': 1, 'eos_token_id': 2}
    path, tmp = destination.prepare_destination(dst, force, 'hf', [src])
    try:
        weight_map, total = {}, 0
        for k, shard in enumerate(shards):
            fname = f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
            total += write_safetensors(
                os.path.join(tmp, fname), shard,
                lambda name: common.export_tensor(reader, *by_name[name], np_dt))
            weight_map.update({name: fname for name, _, _ in shard})
        with open(os.path.join(tmp, 'model.safetensors.index.json'), 'w') as f:
            json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
        with open(os.path.join(tmp, 'config.json'), 'w') as f:
            json.dump(config_to_hf(cfg, true_vocab, dtype, token_ids), f, indent=2)
        with open(os.path.join(tmp, 'generation_config.json'), 'w') as f:
            json.dump({k: v for k, v in token_ids.items()}, f, indent=2)
        if tokenizer:
            copy_tokenizer(tokenizer, tmp, cfg, token_ids)
        destination.finish_destination(tmp, path, 'hf')
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logging.info('exported %s -> %s (%d shards, %.1f MB)', src, path, len(shards), total / 1e6)
    return path
