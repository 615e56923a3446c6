"""What the HF and Meta converters share: the tensor-name table, torch <-> numpy, streaming.

Every torch checkpoint we read or write is described with Hugging Face's names and torch's
(out, in) layout; meta.py renames, splits and permutes on top of that. ``TENSORS`` is the one
table from a HF tensor to our leaf (model.py's scheme) and back.

Vocabulary: torch files hold ``true_vocab_size`` rows (the tokenizer's size, the HF/Meta config's
``vocab_size``). Ours may hold more (``pad_vocab_multiple``): the extra embedding rows and
lm_head columns are zeros, and export drops them again, so import -> export is bit-identical.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from meditron_jax import model as model_lib
from meditron_jax import params_checkpoint as pc


class ConversionError(ValueError):
    """A source that does not match the expected tensors, or an unusable destination."""


Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One HF tensor <-> one of our leaves (``{i}`` = layer index for stacked leaves)."""
    hf_name: str
    leaf: str
    to_ours: Callable[[np.ndarray, model_lib.LlamaConfig], np.ndarray]
    to_torch: Callable[[np.ndarray, model_lib.LlamaConfig], np.ndarray]
    torch_shape: Callable[[model_lib.LlamaConfig, int], Shape]   # (cfg, true vocab) -> shape

    @property
    def per_layer(self) -> bool:
        return '{i}' in self.hf_name


def _same(x, cfg):
    return x


def _t(x, cfg):
    return x.T


def _heads_in(n_attr):
    # (n*H, D) torch -> (D, n, H) ours
    return lambda w, c: w.T.reshape(c.hidden_size, getattr(c, n_attr), c.head_dim)


def _heads_out(x, c):
    return x.reshape(c.hidden_size, -1).T


TENSORS: tuple[TensorRule, ...] = (
    TensorRule('model.embed_tokens.weight', 'embed.embedding', _same, _same,
               lambda c, v: (v, c.hidden_size)),
    TensorRule('model.layers.{i}.self_attn.q_proj.weight', 'layers.attn.q.kernel',
               _heads_in('num_heads'), _heads_out,
               lambda c, v: (c.num_heads * c.head_dim, c.hidden_size)),
    TensorRule('model.layers.{i}.self_attn.k_proj.weight', 'layers.attn.k.kernel',
               _heads_in('num_kv_heads'), _heads_out,
               lambda c, v: (c.num_kv_heads * c.head_dim, c.hidden_size)),
    TensorRule('model.layers.{i}.self_attn.v_proj.weight', 'layers.attn.v.kernel',
               _heads_in('num_kv_heads'), _heads_out,
               lambda c, v: (c.num_kv_heads * c.head_dim, c.hidden_size)),
    TensorRule('model.layers.{i}.self_attn.o_proj.weight', 'layers.attn.o.kernel',
               lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
               lambda x, c: x.reshape(-1, c.hidden_size).T,
               lambda c, v: (c.hidden_size, c.num_heads * c.head_dim)),
    TensorRule('model.layers.{i}.mlp.gate_proj.weight', 'layers.mlp.gate.kernel', _t, _t,
               lambda c, v: (c.mlp_dim, c.hidden_size)),
    TensorRule('model.layers.{i}.mlp.up_proj.weight', 'layers.mlp.up.kernel', _t, _t,
               lambda c, v: (c.mlp_dim, c.hidden_size)),
    TensorRule('model.layers.{i}.mlp.down_proj.weight', 'layers.mlp.down.kernel', _t, _t,
               lambda c, v: (c.hidden_size, c.mlp_dim)),
    TensorRule('model.layers.{i}.input_layernorm.weight', 'layers.attn_norm.scale', _same, _same,
               lambda c, v: (c.hidden_size,)),
    TensorRule('model.layers.{i}.post_attention_layernorm.weight', 'layers.mlp_norm.scale',
               _same, _same, lambda c, v: (c.hidden_size,)),
    TensorRule('model.norm.weight', 'final_norm.scale', _same, _same,
               lambda c, v: (c.hidden_size,)),
    TensorRule('lm_head.weight', 'lm_head.kernel', _t, _t, lambda c, v: (v, c.hidden_size)),
)


def torch_tensor_plan(cfg: model_lib.LlamaConfig, true_vocab: int
                      ) -> list[tuple[str, TensorRule, int | None, Shape]]:
    """(HF name, rule, layer, torch shape) for every tensor, in HF's order: embedding, layer 0
    (attention, MLP, norms), ..., final norm, head. Readers and writers stream in this order."""
    plan = []
    for rule in TENSORS:
        if not rule.per_layer and rule.leaf == 'embed.embedding':
            plan.append((rule.hf_name, rule, None, rule.torch_shape(cfg, true_vocab)))
    for i in range(cfg.num_layers):
        for rule in TENSORS:
            if rule.per_layer:
                plan.append((rule.hf_name.format(i=i), rule, i, rule.torch_shape(cfg, true_vocab)))
    for rule in TENSORS:
        if not rule.per_layer and rule.leaf != 'embed.embedding':
            plan.append((rule.hf_name, rule, None, rule.torch_shape(cfg, true_vocab)))
    return plan


def padded_vocab(true_vocab: int, multiple: int) -> int:
    if multiple < 1:
        raise ConversionError(f'pad_vocab_multiple={multiple} must be >= 1')
    return -(-true_vocab // multiple) * multiple


def pad_vocab(leaf: str, x: np.ndarray, cfg: model_lib.LlamaConfig) -> np.ndarray:
    """Zero rows of the embedding / zero columns of the head up to cfg.vocab_size."""
    if leaf == 'embed.embedding' and x.shape[0] < cfg.vocab_size:
        return np.concatenate([x, np.zeros((cfg.vocab_size - x.shape[0],) + x.shape[1:], x.dtype)])
    if leaf == 'lm_head.kernel' and x.shape[1] < cfg.vocab_size:
        return np.concatenate([x, np.zeros((x.shape[0], cfg.vocab_size - x.shape[1]), x.dtype)],
                              axis=1)
    return x


def unpad_vocab(leaf: str, x: np.ndarray, true_vocab: int) -> np.ndarray:
    if leaf == 'embed.embedding':
        return x[:true_vocab]
    if leaf == 'lm_head.kernel':
        return x[:, :true_vocab]
    return x


# ----------------------------------------------------------------------------------- dtypes

NP_DTYPES = {'float32': np.dtype(np.float32), 'float16': np.dtype(np.float16),
             'bfloat16': np.dtype(ml_dtypes.bfloat16), 'float64': np.dtype(np.float64)}


def np_dtype(name: str) -> np.dtype:
    if name not in NP_DTYPES:
        raise ConversionError(f'dtype {name!r} not supported; expected one of {sorted(NP_DTYPES)}')
    return NP_DTYPES[name]


def dtype_name(dtype: np.dtype) -> str:
    for name, dt in NP_DTYPES.items():
        if np.dtype(dtype) == dt:
            return name
    raise ConversionError(f'dtype {dtype} is not a floating type we convert; '
                          f'expected one of {sorted(NP_DTYPES)}')


def widest_dtype(dtypes: Iterable[np.dtype]) -> str:
    """The source's dtype: the widest floating dtype among its tensors (casting loses nothing)."""
    names = {dtype_name(d) for d in dtypes}
    for name in ('float64', 'float32', 'bfloat16', 'float16'):
        if name in names:
            if len(names) > 1:
                logging.warning('source tensors have dtypes %s; storing all as %s',
                                sorted(names), name)
            return name
    raise ConversionError('source has no tensors')


def torch_to_numpy(t) -> np.ndarray:
    """A torch tensor -> numpy, bfloat16 included (as ml_dtypes.bfloat16), without a copy."""
    import torch
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def numpy_to_torch(x: np.ndarray):
    import torch
    x = np.ascontiguousarray(x)
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


TORCH_DTYPES = {'float32': 'float32', 'float16': 'float16', 'bfloat16': 'bfloat16',
                'float64': 'float64'}


def torch_dtype(name: str):
    import torch
    return getattr(torch, TORCH_DTYPES[name])


# --------------------------------------------------------------------------------- streaming


def source_tokenizer(tokenizer: str | None, candidates: Iterable[str], true_vocab: int
                     ) -> str | None:
    """The tokenizer.model to copy into an imported checkpoint: ``tokenizer`` when given (it must
    load and fit the vocabulary), else the first candidate file that exists, else None."""
    import sentencepiece as spm
    path = tokenizer or next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
        return None
    if not os.path.isfile(path):
        raise ConversionError(f'tokenizer {path}: no such file (expected a SentencePiece .model)')
    try:
        pieces = spm.SentencePieceProcessor(model_file=path).GetPieceSize()
    except (OSError, RuntimeError) as e:
        raise ConversionError(f'tokenizer {path}: not a SentencePiece model ({e})') from e
    if pieces > true_vocab:
        raise ConversionError(f'tokenizer {path} has {pieces} pieces but the model only '
                              f'{true_vocab} vocabulary rows')
    logging.info('tokenizer %s travels with the params', path)
    return path


def import_stream(read: Callable[[str], np.ndarray], plan, cfg: model_lib.LlamaConfig, dst: str,
                  *, true_vocab: int, force: bool, extra_meta: Mapping,
                  end_of_layer: Callable[[], None] = lambda: None, src: str,
                  tokenizer: str | None = None) -> str:
    """Reads the plan's torch tensors one at a time, converts and writes them to a params
    checkpoint; ``end_of_layer`` lets a reader drop the file mappings of the layer just done.
    ``tokenizer`` (a SentencePiece file) is copied in as ``tokenizer.model``."""
    with pc.ParamsWriter(dst, cfg, true_vocab_size=true_vocab, force=force,
                         extra_meta=extra_meta, sources=(src,)) as writer:
        if tokenizer:
            shutil.copyfile(tokenizer, os.path.join(writer.tmp, pc.TOKENIZER_FILE))
        last_layer = None
        for name, rule, layer, _ in plan:
            if layer != last_layer:
                end_of_layer()
                last_layer = layer
            x = pad_vocab(rule.leaf, rule.to_ours(read(name), cfg), cfg)
            writer.write(rule.leaf, x, layer)
        end_of_layer()
    return writer.path


def export_tensor(reader: pc.ParamsReader, rule: TensorRule, layer: int | None,
                  dtype: np.dtype) -> np.ndarray:
    """One torch-layout tensor (true vocab, requested dtype, C-contiguous) from a checkpoint."""
    x = reader.read(rule.leaf, layer)
    x = unpad_vocab(rule.leaf, x, reader.true_vocab_size)
    return np.ascontiguousarray(rule.to_torch(x, reader.config), dtype=dtype)


def export_with_fallback(src: str, export: Callable[[pc.ParamsReader], str]) -> str:
    """Runs ``export`` on a params checkpoint, or on a training workdir's latest complete step;
    a step that cannot be read or fails its fingerprints is reported and the previous one tried,
    as training does (the workdir is left as it is)."""
    if pc.is_params_checkpoint(src) or not os.path.isdir(os.path.join(src, 'checkpoints')):
        return export(pc.ParamsReader(src))
    from meditron_jax import checkpoint
    steps = checkpoint.complete_steps(src)
    for i, step in enumerate(steps):
        try:
            try:
                reader = pc.ParamsReader(src, step)
            except Exception as e:  # noqa: BLE001 - whatever a damaged step's files raise
                raise pc.ParamsCheckpointError(f'{type(e).__name__}: {e}') from e
            return export(reader)
        except pc.ParamsCheckpointError as e:
            if i == len(steps) - 1:
                raise pc.ParamsCheckpointError(
                    f'{src}: no checkpoint step could be exported (steps {steps}); step {step}: '
                    f'{str(e).splitlines()[0][:300]}') from e
            logging.warning('%s: checkpoint step %d cannot be exported (%s); trying the previous '
                            'step', src, step, str(e).splitlines()[0][:300])
    raise FileNotFoundError(f'{src}/checkpoints holds no complete checkpoint step')


def check_tokenizer(path: str, model_vocab: int | None, dirs: bool) -> None:
    """Refuses, before any weight is written, a ``--tokenizer`` that does not exist, is not a
    SentencePiece model (or, with ``dirs``, a directory of HF tokenizer files), or has more
    pieces than the model has vocabulary rows."""
    names = ('tokenizer.model', 'tokenizer.json', 'tokenizer_config.json',
             'special_tokens_map.json', 'added_tokens.json')
    if not os.path.exists(path):
        raise ConversionError(f'--tokenizer {path} does not exist')
    if os.path.isdir(path):
        found = [n for n in names if os.path.isfile(os.path.join(path, n))]
        if not dirs or not found:
            expected = (f'a SentencePiece .model file or a directory with one of {list(names)}'
                        if dirs else 'a SentencePiece .model file')
            raise ConversionError(f'--tokenizer {path} is a directory; expected {expected}')
        for n in found:
            if n.endswith('.json'):
                pc.read_json(os.path.join(path, n), 'tokenizer file')
        if 'tokenizer.model' in found:
            check_tokenizer(os.path.join(path, 'tokenizer.model'), model_vocab, dirs=False)
        return
    import sentencepiece as spm
    try:
        pieces = spm.SentencePieceProcessor(model_file=path).get_piece_size()
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError / OSError
        raise ConversionError(f'--tokenizer {path} is not a SentencePiece model '
                              f'({type(e).__name__}: {str(e)[:200]})') from None
    if model_vocab is not None and pieces > model_vocab:
        raise ConversionError(f'--tokenizer {path} has {pieces} pieces but the model has '
                              f'{model_vocab} vocabulary entries: not this model\'s tokenizer')
