"""The params checkpoint's format: its files and metadata (``meditron_params.json``), the leaf
names and shapes of model.py's stacked scheme, and the one check of tensor names and shapes
against the scheme (used by the checkpoint readers, save_params and the converters).
params_checkpoint.py describes the layout on disk and holds the load/save API.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from meditron_jax import integrity
from meditron_jax import model as model_lib

FORMAT = 'meditron_jax.params'
VERSION = 1
META_FILE = 'meditron_params.json'
PARAMS_DIR = 'params'
TOKENIZER_FILE = 'tokenizer.model'   # optional: the SentencePiece model of the params


class ParamsCheckpointError(ValueError):
    """A params checkpoint that is missing, incomplete or does not match its config."""


# ----------------------------------------------------------------------------- layout helpers


def leaf_name(path: tuple) -> str:
    """'layers.mlp.gate.kernel' for a jax key path: orbax's name for the leaf's array."""
    return '.'.join(str(getattr(k, 'key', k)) for k in path)


def leaf_shapes(cfg: model_lib.LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every leaf of the canonical stacked params, by orbax name, with its shape."""
    abstract, _ = model_lib.param_specs(cfg.replace(scan_layers=True))
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    return {leaf_name(path): tuple(leaf.shape) for path, leaf in flat}


def is_stacked(name: str) -> bool:
    """Leaves under 'layers' carry a leading layer axis and are written one layer at a time."""
    return name.startswith('layers.')


def nest(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, last = name.split('.')
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree


def config_to_json(cfg: model_lib.LlamaConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_json(d: Mapping[str, Any], where: str = '') -> model_lib.LlamaConfig:
    fields = {f.name for f in dataclasses.fields(model_lib.LlamaConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ParamsCheckpointError(f'{where}: unknown model config keys {unknown}; '
                                    f'known: {sorted(fields)}')
    return model_lib.LlamaConfig(**d)


# ------------------------------------------------------------------------------ json files


def read_json(path: str, what: str = 'JSON file') -> Any:
    """A JSON file's content; invalid JSON is reported with the file, line and column."""
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ParamsCheckpointError(f'{path}: not a valid {what}: {e.msg} at line {e.lineno} '
                                    f'column {e.colno}') from None


def write_meta(directory: str, cfg: model_lib.LlamaConfig, true_vocab_size: int | None,
                extra: Mapping[str, Any] | None, digests: Mapping[str, dict]) -> None:
    true_vocab_size = cfg.vocab_size if true_vocab_size is None else int(true_vocab_size)
    if not 0 < true_vocab_size <= cfg.vocab_size:
        raise ParamsCheckpointError(f'true_vocab_size={true_vocab_size} must be in '
                                    f'1..vocab_size={cfg.vocab_size}')
    meta = dict(format=FORMAT, version=VERSION, model=config_to_json(cfg),
                true_vocab_size=true_vocab_size, dtype=cfg.param_dtype, **(extra or {}),
                digest_algorithm=integrity.ALGORITHM, digests=dict(digests))
    with open(os.path.join(directory, META_FILE), 'w') as f:
        json.dump(meta, f, indent=2)


# ---------------------------------------------------------------------------------- reading


def is_params_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), META_FILE))


def read_metadata(path: str | os.PathLike) -> dict:
    """The whole ``meditron_params.json`` (config, true vocab size, dtype, provenance)."""
    meta_path = os.path.join(os.fspath(path), META_FILE)
    if not os.path.isfile(meta_path):
        raise ParamsCheckpointError(
            f'{path} is not a params checkpoint: {META_FILE} is missing (write one with '
            f'meditron-convert import-hf/import-meta or params_checkpoint.save_params)')
    meta = read_json(meta_path, 'params checkpoint metadata file')
    if not isinstance(meta, dict) or meta.get('format') != FORMAT or meta.get('version') != VERSION:
        raise ParamsCheckpointError(f'{meta_path}: format {meta.get("format")!r} version '
                                    f'{meta.get("version")!r}, expected {FORMAT!r} {VERSION}')
    return meta


def read_config(path: str | os.PathLike) -> model_lib.LlamaConfig:
    """The LlamaConfig stored with the params (vocab_size = embedding rows, padding included)."""
    return config_from_json(read_metadata(path)['model'], os.path.join(os.fspath(path), META_FILE))


def check_names_and_shapes(found: Mapping[str, tuple], expected: Mapping[str, tuple],
                           where: str, *, error: type[Exception] = ParamsCheckpointError,
                           found_word: str = 'found', expected_word: str = 'expected',
                           torch_shapes: bool = False) -> None:
    """The one check of tensor names and shapes (stored params, params to save, a converter's
    source files): missing, unexpected and wrongly shaped tensors, all listed in one ``error``
    that starts with ``where``. Shapes print as torch's ``[out, in]`` when ``torch_shapes``,
    else as tuples."""
    text = (lambda s: str(list(s))) if torch_shapes else (lambda s: str(tuple(s)))
    expected = dict(expected)
    missing = [f'{n} {text(s)}' for n, s in expected.items() if n not in found]
    extra = [f'{n} {text(s)}' for n, s in found.items() if n not in expected]
    wrong = [f'{n}: {found_word} {text(found[n])}, {expected_word} {text(s)}'
             for n, s in expected.items() if n in found and tuple(found[n]) != tuple(s)]
    problems = []
    if missing:
        problems.append(f'missing tensors: {", ".join(missing)}')
    if extra:
        problems.append(f'unexpected tensors: {", ".join(extra)}')
    if wrong:
        problems.append(f'wrong shapes: {"; ".join(wrong)}')
    if problems:
        raise error(f'{where}: ' + ' | '.join(problems))


def _stored_shapes(params_dir: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    import orbax.checkpoint as ocp
    meta = ocp.StandardCheckpointer().metadata(params_dir)
    tree = getattr(meta, 'item_metadata', meta)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {leaf_name(p): (tuple(m.shape), np.dtype(m.dtype)) for p, m in flat}


def check_stored_shapes(path: str, cfg: model_lib.LlamaConfig, params_dir: str | None = None
                        ) -> dict[str, np.dtype]:
    """Names and shapes on disk must be exactly the config's; returns each leaf's stored dtype."""
    stored = _stored_shapes(params_dir or os.path.join(path, PARAMS_DIR))
    expected = leaf_shapes(cfg)
    check_names_and_shapes({n: shape for n, (shape, _) in stored.items()}, expected,
                           f'{path}: params do not match {META_FILE}', found_word='stored',
                           expected_word='config needs')
    return {n: stored[n][1] for n in expected}


def verify(path: str, meta: Mapping[str, Any], params: Any) -> None:
    """Raises ParamsCheckpointError naming each array whose fingerprint differs from the one
    recorded at save time (checkpoints written before fingerprints existed pass unchecked)."""
    if not meta.get('digests'):
        return
    bad = integrity.mismatches(meta['digests'], integrity.tree_fingerprints(params))
    if bad:
        raise ParamsCheckpointError(f'{path}: damaged checkpoint, arrays differ from what was '
                                    f'saved: {"; ".join(bad)}')
