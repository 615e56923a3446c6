"""Params-only checkpoints: what ``meditron-convert`` writes, ``train.init_from`` and
``meditron_jax.load`` read, and the export commands turn back into torch files.

On disk (``DST/``)::

    meditron_params.json   {"format": "meditron_jax.params", "version": 1,
                            "model": {LlamaConfig fields}, "true_vocab_size": int,
                            "dtype": "bfloat16", "source": "...", "token_ids": {...},
                            "digest_algorithm": "fmix32x2-v1",
                            "digests": {leaf: {dtype, shape, fingerprint}}}
    .meditron-output.json  what meditron-convert / save_params wrote here (destination.py)
    params/                an orbax PyTree checkpoint of the canonical stacked params
                           (model.py's scheme): restorable with plain orbax, e.g.
                           ocp.StandardCheckpointer().restore(DST/'params', targets)
                           with jax.ShapeDtypeStruct(shape, dtype, sharding=...) targets,
                           which reshards onto any mesh.

``model.vocab_size`` is the number of embedding rows (padded, e.g. to a multiple of 128, so
that the vocab dimension shards evenly); ``true_vocab_size`` is the tokenizer's size. Rows
``true_vocab_size..vocab_size`` of ``embed/embedding`` and the matching columns of
``lm_head/kernel`` are padding: written as zeros on import, dropped on export.

Two writers produce ``params/``, for two kinds of input:

* ``save_params(path, params, cfg)``: a tree of (possibly sharded, multi-host) jax.Arrays already
  in device memory. It is orbax's own save (OCDBT, each process writes its shards).
* ``ParamsWriter``: streaming, for the converters. A 70B model's stacked leaves are far larger
  than host memory allows (``layers/mlp/gate/kernel`` is (80, 8192, 28672), 37.6 GB in bf16),
  so the writer never builds a leaf: it creates each leaf's zarr3 array with the tensorstore
  spec orbax itself builds (``ArrayWriteSpec``, no OCDBT, one chunk per layer slice, zstd), writes
  one layer slice at a time through tensorstore, and at the end writes orbax's ``_METADATA``
  (``InternalTreeMetadata``) and ``_CHECKPOINT_METADATA``. Peak host memory is a few layer
  slices (the slice just read, tensorstore's copy and its compressed chunk, with at most one
  write in flight while the next slice is read), never a whole stacked leaf.

Both writers record each leaf's fingerprint (integrity.py) in ``meditron_params.json``; both
readers recompute it and refuse a damaged array by name.

Readers: ``load_params`` restores through orbax onto the given shardings (each device reads its
own slice; no whole tensor is materialised on the host), and ``ParamsReader`` reads one layer
slice at a time (the exporters), for checkpoints from either writer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from meditron_jax import destination, integrity
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


def _nest(flat: Mapping[str, Any]) -> dict:
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


def _write_meta(directory: str, cfg: model_lib.LlamaConfig, true_vocab_size: int | None,
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
    missing = [f'{n} {expected[n]}' for n in expected if n not in stored]
    extra = [f'{n} {stored[n][0]}' for n in stored if n not in expected]
    wrong = [f'{n}: stored {stored[n][0]}, config needs {expected[n]}'
             for n in expected if n in stored and stored[n][0] != expected[n]]
    if missing or extra or wrong:
        raise ParamsCheckpointError(
            f'{path}: params do not match {META_FILE}: missing {missing}, unexpected {extra}, '
            f'wrong shape {wrong}')
    return {n: stored[n][1] for n in expected}


def load_params(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None,
                shardings: Any = None, dtype: str | None = None
                ) -> tuple[model_lib.Params, model_lib.LlamaConfig]:
    """(params in the canonical stacked layout as jax.Arrays, LlamaConfig).

    Placement: ``shardings`` (a tree like the params) if given, else
    ``model.param_shardings(cfg, mesh)`` for a mesh, else the first device. Each device reads
    only its own slice through orbax/tensorstore. ``dtype`` casts on read (default: as stored,
    which is what the returned config's ``param_dtype`` says). The arrays are checked against
    the fingerprints saved with them (before any cast); a mismatch raises naming the arrays.
    """
    path = os.path.abspath(os.fspath(path))
    cfg = read_config(path).replace(scan_layers=True)
    stored_dtypes = check_stored_shapes(path, cfg)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=jax.numpy.dtype(dtype).name)
    abstract, _ = model_lib.param_specs(cfg)
    if shardings is None:
        if mesh is not None:
            shardings = model_lib.param_shardings(cfg, mesh)
        else:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, abstract)

    def target(p, leaf, sharding):
        return jax.ShapeDtypeStruct(leaf.shape, stored_dtypes[leaf_name(p)], sharding=sharding)

    targets = jax.tree_util.tree_map_with_path(target, abstract, shardings)
    import orbax.checkpoint as ocp
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(os.path.join(path, PARAMS_DIR), targets)
    # tensorstore raises ValueError/OSError for unreadable or damaged files, and orbax re-raises
    # some of them (a chunk that no longer decompresses) as a bare Exception.
    except Exception as e:  # noqa: BLE001
        raise ParamsCheckpointError(f'{path}: the params could not be read ({type(e).__name__}: '
                                    f'{str(e).splitlines()[0][:300] if str(e) else ""})') from e
    verify(path, read_metadata(path), params)
    if dtype is not None:
        flat, treedef = jax.tree.flatten(params)
        for i, x in enumerate(flat):   # one leaf at a time: the stored copy goes as we go
            flat[i] = x.astype(dtype)
            del x
        params = jax.tree.unflatten(treedef, flat)
    return params, cfg


def verify(path: str, meta: Mapping[str, Any], params: Any) -> None:
    """Raises ParamsCheckpointError naming each array whose fingerprint differs from the one
    recorded at save time (checkpoints written before fingerprints existed pass unchecked)."""
    if not meta.get('digests'):
        return
    bad = integrity.mismatches(meta['digests'], integrity.tree_fingerprints(params))
    if bad:
        raise ParamsCheckpointError(f'{path}: damaged checkpoint, arrays differ from what was '
                                    f'saved: {"; ".join(bad)}')


class ParamsReader:
    """Reads one leaf or one layer slice at a time, as numpy, from either writer's output.

    Every leaf read whole (or all of whose layer slices are read, each once) is checked against
    the fingerprint saved with it; a mismatch raises ParamsCheckpointError naming the leaf.
    ``step`` picks a training workdir's step (default: the latest complete one).
    """

    def __init__(self, path: str | os.PathLike, step: int | None = None):
        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
        self.path = os.path.abspath(os.fspath(path))
        if not is_params_checkpoint(self.path) and os.path.isdir(
                os.path.join(self.path, 'checkpoints')):
            self.meta, params_dir = workdir_meta(self.path, step)
            if not self.meta['model']['scan_layers']:
                raise ParamsCheckpointError(
                    f'{self.path}: trained with model.scan_layers=False (per-layer params); '
                    f'load it with meditron_jax.load and write a params checkpoint with '
                    f'params_checkpoint.save_params first')
        else:
            self.meta, params_dir = read_metadata(self.path), os.path.join(self.path, PARAMS_DIR)
        self.config = config_from_json(self.meta['model'], self.path).replace(scan_layers=True)
        self.true_vocab_size = int(self.meta['true_vocab_size'])
        self.dtypes = check_stored_shapes(self.path, self.config, params_dir)
        self.shapes = leaf_shapes(self.config)
        tree_meta = read_json(os.path.join(params_dir, '_METADATA'), 'orbax metadata file')
        use_ocdbt = os.path.exists(os.path.join(params_dir, 'manifest.ocdbt'))
        self._specs = {
            name: ts_utils.ArrayReadSpec(params_dir, name, use_zarr3=bool(tree_meta['use_zarr3']),
                                         use_ocdbt=use_ocdbt).json
            for name in self.shapes}
        self._context = ts_utils.get_ts_context(use_ocdbt=use_ocdbt)
        self._open: dict[str, Any] = {}
        self.digests = dict(self.meta.get('digests') or {})
        self._sums = integrity.Accumulator()
        self._read: dict[str, set[int]] = {}

    def _array(self, name: str):
        import tensorstore as ts
        if name not in self._specs:
            raise KeyError(f'{name!r} is not a parameter; known: {sorted(self._specs)}')
        if name not in self._open:
            self._open[name] = ts.open(self._specs[name], read=True,
                                       context=self._context).result()
        return self._open[name]

    def read(self, name: str, layer: int | None = None) -> np.ndarray:
        arr = self._array(name)
        try:
            x = np.asarray((arr if layer is None else arr[layer]).read().result())
        except ValueError as e:   # tensorstore: a missing, truncated or undecodable chunk
            where = name if layer is None else f'{name}[{layer}]'
            raise ParamsCheckpointError(f'{self.path}: array {where} could not be read: '
                                        f'{str(e).splitlines()[0][:300]}') from e
        self._check(name, layer, x)
        return x

    def _check(self, name: str, layer: int | None, x: np.ndarray) -> None:
        if name not in self.digests:
            return
        done = self._read.setdefault(name, set())
        key = -1 if layer is None else layer
        if key in done or -1 in done:
            return
        done.add(key)
        offset = 0 if layer is None else layer * x.size * integrity.words_per_element(x.dtype)
        self._sums.add(name, x, offset)
        shape = self.shapes[name]
        if key == -1 or len(done) == shape[0]:
            got = integrity.entry(x.dtype, shape, self._sums.sums[name])
            bad = integrity.mismatches({name: self.digests[name]}, {name: got})
            if bad:
                raise ParamsCheckpointError(f'{self.path}: damaged checkpoint, {bad[0]} '
                                            f'(fingerprint recorded at save time)')


def workdir_meta(workdir: str, step: int | None = None) -> tuple[dict, str]:
    """Metadata (with the step's params fingerprints) and params directory of a training
    workdir's latest (or given) complete step, so that the exporters read a trained model
    directly. The true vocabulary is the prepared data's tokenizer's when its manifest is
    there."""
    from meditron_jax import checkpoint
    step, config = checkpoint.read_config(workdir, step)
    cfg = model_lib.LlamaConfig(**config['model'])
    true_vocab = cfg.vocab_size
    manifest = os.path.join(config['data']['dir'] or os.path.join(workdir, 'data'),
                            'manifest.json')
    if os.path.isfile(manifest):
        with open(manifest) as f:
            true_vocab = int(json.load(f)['tokenizer']['vocab_size'])
    meta = dict(model=config_to_json(cfg), true_vocab_size=true_vocab,
                source=f'training workdir {workdir} step {step}', step=step,
                digests=checkpoint.read_digests(workdir, step).get('params', {}))
    return meta, os.path.join(workdir, 'checkpoints', str(step), 'params')


def find_tokenizer(path: str | os.PathLike) -> str | None:
    """The SentencePiece model that travels with a params checkpoint (``tokenizer.model``,
    copied there by meditron-convert import-*) or a training workdir (its prepared data's), or
    None."""
    path = os.fspath(path)
    if is_params_checkpoint(path):
        candidate = os.path.join(path, TOKENIZER_FILE)
    else:
        from meditron_jax import checkpoint
        _, config = checkpoint.read_config(path)
        data_dir = config['data']['dir'] or os.path.join(path, 'data')
        candidate = os.path.join(data_dir, TOKENIZER_FILE)
    return candidate if os.path.isfile(candidate) else None


# ---------------------------------------------------------------------------------- writing


def save_params(path: str | os.PathLike, params: model_lib.Params, cfg: model_lib.LlamaConfig,
                *, true_vocab_size: int | None = None, force: bool = False,
                extra_meta: Mapping[str, Any] | None = None) -> str:
    """Saves in-memory params (stacked or per-layer layout, jax.Arrays, any sharding, any number
    of processes) with orbax's own save; all processes call it. Returns the final path."""
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    if 'layers' not in params:
        params = model_lib.stack_layers(params, cfg.num_layers)
    dtypes = {str(np.dtype(x.dtype)) for x in jax.tree.leaves(params)}
    cfg = cfg.replace(scan_layers=True,
                      param_dtype=dtypes.pop() if len(dtypes) == 1 else cfg.param_dtype)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    got = {leaf_name(p): tuple(x.shape) for p, x in flat}
    _check_names_and_shapes(got, leaf_shapes(cfg), what='params')
    primary = jax.process_index() == 0
    # Every process must agree on the temp dir: it is derived from the path, not random.
    path = os.path.realpath(os.path.abspath(os.fspath(path)))
    tmp = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.tmp-save')
    digests = integrity.tree_fingerprints(params)   # all processes: a global computation
    if primary:
        destination.check_destination(path, 'params', force)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    multihost_utils.sync_global_devices('meditron_jax.save_params:start')
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
            ckptr.wait_until_finished()
        if primary:
            _write_meta(tmp, cfg, true_vocab_size, extra_meta, digests)
            destination.finish_destination(tmp, path, 'params')
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    multihost_utils.sync_global_devices('meditron_jax.save_params:done')
    return path


def _check_names_and_shapes(got: Mapping[str, tuple], expected: Mapping[str, tuple],
                            what: str) -> None:
    missing = [f'{n} {s}' for n, s in expected.items() if n not in got]
    extra = [f'{n} {s}' for n, s in got.items() if n not in expected]
    wrong = [f'{n}: got {got[n]}, expected {s}' for n, s in expected.items()
             if n in got and tuple(got[n]) != tuple(s)]
    if missing or extra or wrong:
        raise ParamsCheckpointError(f'{what}: missing {missing}, unexpected {extra}, '
                                    f'wrong shape {wrong}')


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

    def _open(self, name: str):
        import tensorstore as ts
        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
        if name not in self._arrays:
            shape = self.shapes[name]
            write_shape = (1,) + shape[1:] if is_stacked(name) else shape
            spec = ts_utils.ArrayWriteSpec(
                self.params_dir, name, global_shape=shape, write_shape=write_shape,
                dtype=self.dtype, use_zarr3=True, use_ocdbt=False,
                use_compression=self.compression)
            self._arrays[name] = ts.open(spec.json, create=True, open=False).result()
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
            _write_meta(self.tmp, self.cfg, self.true_vocab_size, self.extra_meta, digests)
            destination.finish_destination(self.tmp, self.path, 'params')
        except BaseException:
            self.abort()
            raise
        return self.path

    def _write_orbax_metadata(self) -> None:
        from etils import epath
        from orbax.checkpoint._src.handlers import standard_checkpoint_handler
        from orbax.checkpoint._src.metadata import checkpoint as checkpoint_metadata
        from orbax.checkpoint._src.metadata import step_metadata_serialization
        from orbax.checkpoint._src.metadata import tree as tree_metadata
        from orbax.checkpoint._src.serialization import types as ocp_types

        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
        parent = epath.Path(self.params_dir)
        context = ts_utils.get_ts_context(use_ocdbt=False)
        infos = _nest({
            name: ocp_types.ParamInfo(
                name=name, parent_dir=parent, value_typestr='jax.Array',
                write_shape=((1,) + shape[1:]) if is_stacked(name) else shape, use_zarr3=True,
                ts_context=context)
            for name, shape in self.shapes.items()})
        tree_meta = tree_metadata.InternalTreeMetadata.build(infos, use_ocdbt=False, use_zarr3=True)
        with open(os.path.join(self.params_dir, '_METADATA'), 'w') as f:
            json.dump(tree_meta.to_json(), f)
        handler = standard_checkpoint_handler.StandardCheckpointHandler
        step_meta = checkpoint_metadata.StepMetadata(
            item_handlers=f'{handler.__module__}.{handler.__qualname__}',
            init_timestamp_nsecs=self._init_ns, commit_timestamp_nsecs=time.time_ns())
        store = checkpoint_metadata.metadata_store(enable_write=True, blocking_write=True)
        store.write(file_path=checkpoint_metadata.step_metadata_file_path(self.params_dir),
                    metadata=step_metadata_serialization.serialize(step_meta))


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
