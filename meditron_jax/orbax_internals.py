"""The one place that uses orbax's private ``orbax.checkpoint._src`` modules (orbax 0.12.8).

Why: orbax's public API saves and restores whole trees of arrays already in memory. The params
converters stream a 70B model one layer slice at a time (a stacked leaf such as
``layers.mlp.gate.kernel`` is 37.6 GB in bf16, more than host memory), and the exporters read it
back the same way. For that we open each leaf's zarr3 array through tensorstore with the very
spec orbax builds (``ArrayWriteSpec`` / ``ArrayReadSpec``, its tensorstore context) and write
orbax's own ``_METADATA`` and ``_CHECKPOINT_METADATA`` at the end, so that the result is a plain
orbax checkpoint that ``ocp.StandardCheckpointer().restore`` reads (and reshards). None of these
helpers is public; an orbax upgrade that moves them only touches this file
(tests/test_params_checkpoint.py checks the round trip through plain orbax).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


def write_spec(params_dir: str, name: str, shape: tuple[int, ...],
               write_shape: tuple[int, ...], dtype: np.dtype, compression: bool) -> dict:
    """The tensorstore spec orbax would create for leaf ``name`` (zarr3, no OCDBT, one chunk
    per ``write_shape``), as JSON for ``tensorstore.open(..., create=True)``."""
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
    return ts_utils.ArrayWriteSpec(params_dir, name, global_shape=shape, write_shape=write_shape,
                                   dtype=dtype, use_zarr3=True, use_ocdbt=False,
                                   use_compression=compression).json


def read_spec(params_dir: str, name: str, use_zarr3: bool, use_ocdbt: bool) -> dict:
    """The tensorstore spec orbax reads leaf ``name`` of an orbax PyTree checkpoint with."""
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
    return ts_utils.ArrayReadSpec(params_dir, name, use_zarr3=use_zarr3, use_ocdbt=use_ocdbt).json


def ts_context(use_ocdbt: bool) -> Any:
    """orbax's tensorstore context (its cache pool and concurrency limits)."""
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
    return ts_utils.get_ts_context(use_ocdbt=use_ocdbt)


def write_tree_metadata(params_dir: str, tree: Mapping[str, Any],
                        write_shapes: Mapping[str, tuple[int, ...]], init_ns: int,
                        commit_ns: int) -> None:
    """Writes orbax's ``_METADATA`` (the tree of zarr3 jax.Array leaves) and
    ``_CHECKPOINT_METADATA`` for arrays written with ``write_spec``. ``tree`` is the nested
    dict of leaf names (the params' structure), ``write_shapes`` each leaf's chunk shape."""
    from etils import epath
    from orbax.checkpoint._src.handlers import standard_checkpoint_handler
    from orbax.checkpoint._src.metadata import checkpoint as checkpoint_metadata
    from orbax.checkpoint._src.metadata import step_metadata_serialization
    from orbax.checkpoint._src.metadata import tree as tree_metadata
    from orbax.checkpoint._src.serialization import types as ocp_types
    parent = epath.Path(params_dir)
    context = ts_context(use_ocdbt=False)

    def info(node):
        if isinstance(node, Mapping):
            return {k: info(v) for k, v in node.items()}
        return ocp_types.ParamInfo(name=node, parent_dir=parent, value_typestr='jax.Array',
                                   write_shape=write_shapes[node], use_zarr3=True,
                                   ts_context=context)

    tree_meta = tree_metadata.InternalTreeMetadata.build(info(tree), use_ocdbt=False,
                                                         use_zarr3=True)
    with open(os.path.join(params_dir, '_METADATA'), 'w') as f:
        json.dump(tree_meta.to_json(), f)
    handler = standard_checkpoint_handler.StandardCheckpointHandler
    step_meta = checkpoint_metadata.StepMetadata(
        item_handlers=f'{handler.__module__}.{handler.__qualname__}',
        init_timestamp_nsecs=init_ns, commit_timestamp_nsecs=commit_ns)
    store = checkpoint_metadata.metadata_store(enable_write=True, blocking_write=True)
    store.write(file_path=checkpoint_metadata.step_metadata_file_path(params_dir),
                metadata=step_metadata_serialization.serialize(step_meta))
