"""The device mesh and the one table that says how every tensor is split over it.

Every parameter and the main activations carry logical axis names (``('embed', 'mlp')``);
``LOGICAL_AXIS_RULES`` maps each name to mesh axes. A logical name that is not in the table is an
error, never a silent replication, and so is a sharded dimension that the mesh does not divide.

The mesh axes are ``data`` (pure data parallel: replicas), ``fsdp`` (data parallel with
parameters, gradients and optimizer state sharded, ZeRO-3 style) and ``tensor`` (Megatron-style
tensor parallel over heads and the MLP). Their sizes come from the config; ``-1`` means "all the
devices left over". Meshes use ``AxisType.Auto`` (the compiler propagates shardings between the
annotations), which is what Flax linen's partitioning helpers support.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ('batch', ('data', 'fsdp')),
    ('length', None),            # room for a 'sequence' mesh axis (context parallelism)
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    # parameters
    ('layers', None),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('norm', None),
)
_RULES = dict(LOGICAL_AXIS_RULES)


class ShardingError(ValueError):
    """A mesh or a logical annotation that does not fit the model or the devices."""


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves the config's axis sizes (one may be -1) against the device count."""
    unknown_keys = sorted(set(mesh_config) - set(MESH_AXES))
    missing = [name for name in MESH_AXES if name not in mesh_config]
    if unknown_keys or missing:
        raise ShardingError(f'mesh config {dict(mesh_config)}: expected exactly the axes '
                            f'{MESH_AXES}; unknown {unknown_keys}, missing {missing}')
    sizes = {name: int(mesh_config[name]) for name in MESH_AXES}
    unknown = [n for n, s in sizes.items() if s == -1]
    if len(unknown) > 1:
        raise ShardingError(f'mesh: at most one axis may be -1, got {sizes}')
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ShardingError(f'mesh.{name}={size}: sizes must be positive or -1')
    known = math.prod(s for s in sizes.values() if s != -1)
    if unknown:
        if num_devices % known:
            raise ShardingError(
                f'mesh {sizes}: the fixed axes use {known} devices, which does not divide the '
                f'{num_devices} devices available')
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ShardingError(
            f'mesh {sizes} needs {math.prod(sizes.values())} devices but {num_devices} are '
            f'available')
    return tuple(sizes[n] for n in MESH_AXES)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all (or the given) devices, from the config sizes."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def mesh_platform(mesh: Mesh) -> str:
    """'cpu', 'gpu' or 'tpu': what the mesh's devices are (compile-only ones included)."""
    return mesh.devices.flat[0].platform


def logical_to_spec(names: Sequence[str | None] | None) -> P:
    """PartitionSpec for a tuple of logical names; unknown names raise ShardingError."""
    if names is None:
        return P()
    axes = []
    for name in names:
        if name is None:
            axes.append(None)
            continue
        if name not in _RULES:
            raise ShardingError(
                f'logical axis {name!r} has no rule in sharding.LOGICAL_AXIS_RULES '
                f'(known: {sorted(_RULES)})')
        axes.append(_RULES[name])
    return P(*axes)


def _axis_size(mesh: Mesh, axis: Any) -> int:
    if axis is None:
        return 1
    if isinstance(axis, str):
        return mesh.shape[axis]
    return math.prod(mesh.shape[a] for a in axis)


def check_divisible(path: str, shape: Sequence[int], spec: P, mesh: Mesh) -> None:
    """Raises when a sharded dimension is not a multiple of its mesh axes' size."""
    for dim, axis in zip(shape, tuple(spec)):
        size = _axis_size(mesh, axis)
        if dim % size:
            raise ShardingError(
                f'{path}: dimension {dim} (shape {tuple(shape)}) is sharded over mesh axes '
                f'{axis} of size {size}, which does not divide it; mesh is {dict(mesh.shape)}')


def tree_shardings(logical_specs: Any, abstract: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of arrays from its tree of logical names (tuples of str).

    ``logical_specs`` holds, for every leaf of ``abstract``, a tuple of logical names (one per
    dimension). A leaf with no names is an error: every parameter must say how it is split.
    """
    flat_abstract, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    flat_specs = treedef.flatten_up_to(logical_specs)
    out = []
    for (path, leaf), names in zip(flat_abstract, flat_specs):
        name = jax.tree_util.keystr(path)
        if names is None or (len(names) != len(leaf.shape)):
            raise ShardingError(
                f'{name}: shape {tuple(leaf.shape)} needs one logical axis name per dimension, '
                f'got {names}')
        spec = logical_to_spec(names)
        check_divisible(name, leaf.shape, spec, mesh)
        out.append(NamedSharding(mesh, spec))
    return jax.tree_util.tree_unflatten(treedef, out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation, by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a (batch, length, ...) input: batch over the data-parallel axes."""
    return NamedSharding(mesh, logical_to_spec(('batch',) + (None,) * (ndim - 1)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split (the product of the 'batch' rule's mesh axes)."""
    return _axis_size(mesh, _RULES['batch'])


def local_batch_rows(mesh: Mesh, global_batch: int, devices: Sequence[jax.Device]) -> int:
    """How many distinct rows of a (global_batch, ...) input the given devices hold."""
    index_map = batch_sharding(mesh).devices_indices_map((global_batch, 1))
    row_slices = {index_map[d][0].indices(global_batch) for d in devices}
    rows = set()
    for r in row_slices:
        rows.update(range(*r))
    return len(rows)
