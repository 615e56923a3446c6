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

Files: this one (the load/save API), params_format.py (the metadata file, leaf names and shapes,
the name/shape check), params_writer.py (``ParamsWriter``), params_reader.py (``ParamsReader``)
and orbax_internals.py (the orbax private helpers the streaming writer and reader rely on).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from meditron_jax import destination, integrity
from meditron_jax import model as model_lib
# The format, the streaming writer and the reader live in their own modules; their names are
# part of this module's API (pc.ParamsWriter, pc.read_config, ...), used by the converters,
# meditron_jax.load, init_from and the tests.
from meditron_jax.params_format import (  # noqa: F401
    FORMAT, META_FILE, PARAMS_DIR, TOKENIZER_FILE, VERSION, ParamsCheckpointError,
    check_names_and_shapes, check_stored_shapes, config_from_json, config_to_json, is_stacked,
    is_params_checkpoint, leaf_name, leaf_shapes, nest, read_config, read_json, read_metadata,
    verify, write_meta)
from meditron_jax.params_reader import ParamsReader, workdir_meta  # noqa: F401
from meditron_jax.params_writer import ParamsWriter, iter_leaf_slices  # noqa: F401


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
    check_names_and_shapes(got, leaf_shapes(cfg), 'params', found_word='got')
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
            write_meta(tmp, cfg, true_vocab_size, extra_meta, digests)
            destination.finish_destination(tmp, path, 'params')
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    multihost_utils.sync_global_devices('meditron_jax.save_params:done')
    return path
