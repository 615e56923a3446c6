"""``ParamsWriter``: streams a params checkpoint to disk one leaf or one layer slice at a time
(the converters), so that no stacked leaf is ever built in host memory; the arrays are zarr3 with
orbax's own specs and metadata (orbax_internals.py), so plain orbax restores the result.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from meditron_jax import destination, integrity, orbax_internals
from meditron_jax import model as model_lib
from meditron_jax.params_format import (PARAMS_DIR, ParamsCheckpointError, is_stacked,
                                        leaf_name, leaf_shapes, nest, write_meta)


class ParamsWriter:
    """Streams a params checkpoint to disk, one leaf or one layer slice at a time.

        with ParamsWriter(dst, cfg, true_vocab_size=32005) as w:
            w.write('embed.embedding', emb_VxD)
            for i in range(cfg.num_layers):
                w.write('layers.mlp.gate.kernel', gate_DxF, layer=i)
            ...
        # leaving the block without an error checks completeness and renames into place;
        # an error removes the temp dir.

    Values are cast to ``cfg.param_dtype``. At most one write is in flight, so the caller reads
    the next tensor while the previous one is encoded and written.
    """

    def __init__(self, path: str | os.PathLike, cfg: model_lib.LlamaConfig, *,
                 true_vocab_size: int | None = None, force: bool = False,
                 extra_meta: Mapping[str, Any] | None = None, compression: bool = True,
                 sources: tuple[str, ...] = ()):
        self.cfg = cfg.replace(scan_layers=True)
        self.dtype = np.dtype(jax.numpy.dtype(self.cfg.param_dtype))
        self.shapes = leaf_shapes(self.cfg)
        self.true_vocab_size = true_vocab_size
        self.extra_meta = dict(extra_meta or {})
        self.compression = compression
        self.path, self.tmp = destination.prepare_destination(path, force, 'params', sources)
        self.params_dir = os.path.join(self.tmp, PARAMS_DIR)
        os.makedirs(self.params_dir)
        self._arrays: dict[str, Any] = {}
        self._written: dict[str, set[int]] = {n: set() for n in self.shapes}
        self._pending = None
        self._init_ns = time.time_ns()
        self._sums = integrity.Accumulator()
        self.bytes_written = 0

    def __enter__(self) -> 'ParamsWriter':
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def abort(self) -> None:
        self._wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _write_shape(self, name: str) -> tuple[int, ...]:
        """One chunk per layer slice for stacked leaves, one chunk for the others."""
        shape = self.shapes[name]
        return (1,) + shape[1:] if is_stacked(name) else shape

    def _open(self, name: str):
        import tensorstore as ts
        if name not in self._arrays:
            spec = orbax_internals.write_spec(self.params_dir, name, self.shapes[name],
                                              self._write_shape(name), self.dtype,
                                              self.compression)
            self._arrays[name] = ts.open(spec, create=True, open=False).result()
        return self._arrays[name]

    def write(self, name: str, value: np.ndarray, layer: int | None = None) -> None:
        if name not in self.shapes:
            raise ParamsCheckpointError(f'{name!r} is not a parameter of the model; '
                                        f'expected one of {sorted(self.shapes)}')
        shape = self.shapes[name]
        if is_stacked(name):
            if layer is None or not 0 <= layer < shape[0]:
                raise ParamsCheckpointError(f'{name}: layer={layer}, expected 0..{shape[0] - 1}')
            shape = shape[1:]
        elif layer is not None:
            raise ParamsCheckpointError(f'{name} has no layer axis, got layer={layer}')
        if tuple(value.shape) != shape:
            where = name if layer is None else f'{name}[{layer}]'
            raise ParamsCheckpointError(f'{where}: shape {tuple(value.shape)}, expected {shape}')
        value = np.asarray(value, dtype=self.dtype)   # strided views are fine: no copy here
        arr = self._open(name)
        self._wait()
        self._pending = (arr if layer is None else arr[layer]).write(value)
        key = -1 if layer is None else layer
        if key in self._written[name]:
            raise ParamsCheckpointError(f'{name}{"" if layer is None else f"[{layer}]"} written '
                                        f'twice')
        # Fingerprinted while tensorstore encodes and writes the slice.
        offset = 0 if layer is None else layer * value.size * integrity.words_per_element(
            self.dtype)
        self._sums.add(name, value, offset)
        self._written[name].add(key)
        self.bytes_written += value.nbytes

    def missing(self) -> list[str]:
        out = []
        for name, done in self._written.items():
            need = set(range(self.shapes[name][0])) if is_stacked(name) else {-1}
            lacking = sorted(need - done)
            if lacking:
                out.append(name if lacking == [-1] else f'{name} layers {lacking}')
        return out

    def commit(self) -> str:
        """Checks every leaf was written, writes orbax's metadata, moves into place."""
        try:
            self._wait()
            missing = self.missing()
            if missing:
                raise ParamsCheckpointError(f'{self.path}: nothing written for {missing}')
            self._write_orbax_metadata()
            digests = {n: integrity.entry(self.dtype, self.shapes[n], self._sums.sums[n])
                       for n in self.shapes}
            write_meta(self.tmp, self.cfg, self.true_vocab_size, self.extra_meta, digests)
            destination.finish_destination(self.tmp, self.path, 'params')
        except BaseException:
            self.abort()
            raise
        return self.path

    def _write_orbax_metadata(self) -> None:
        orbax_internals.write_tree_metadata(
            self.params_dir, nest({name: name for name in self.shapes}),
            {name: self._write_shape(name) for name in self.shapes}, self._init_ns,
            time.time_ns())


def iter_leaf_slices(params: model_lib.Params) -> Iterator[tuple[str, int | None, Any]]:
    """(name, layer or None, value) over stacked params, one layer slice at a time."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in flat:
        name = leaf_name(path)
        if is_stacked(name):
            for i in range(leaf.shape[0]):
                yield name, i, leaf[i]
        else:
            yield name, None, leaf
