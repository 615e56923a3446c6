"""Fingerprints of arrays, so that a checkpoint whose bytes changed on disk is caught on restore.

A fingerprint is two uint32 sums over the array's words (its bytes in C order as little-endian
uint32 words; an element narrower than 4 bytes is one word, zero-extended). Word ``w`` at flat
index ``i``, with ``k = i * 0x9E3779B1`` and ``a = fmix32(w ^ k)`` (``fmix32`` is MurmurHash3's
finaliser), contributes ``a`` to the first sum and ``a * (k | 1)`` to the second, both mod 2**32.
Changing words changes ``a`` at each by a pseudo-random amount, and the sums by two different
combinations of those amounts, so a corruption goes unnoticed with probability about 2**-64
(this detects damage, it is no defence against a forger); the sums add over slices, so a
stacked leaf can be fingerprinted one layer slice at a time, in any order. About 15 integer
operations a word, fused into one pass.

The same jitted function serves both sides:

* device arrays (training saves, ``save_params``, every restore): one XLA pass over each array,
  sharded like it, the sums reduced across devices and processes: a few ms for a 7B model on
  accelerators; the mesh a checkpoint is restored onto does not matter, the sums are over the
  global array;
* host slices (the streaming converters' writer and reader): the numpy slice is viewed as
  unsigned words and run through the same function on the CPU backend, fused in one pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ALGORITHM = 'fmix32-weyl-x2-v1'


def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x) -> jax.Array:
    """uint32 words of x: a bitcast for 4-byte dtypes, zero extension for narrower ones."""
    dt = np.dtype(x.dtype)
    if dt.itemsize == 4:
        return x if dt == np.uint32 else jax.lax.bitcast_convert_type(x, jnp.uint32)
    if dt == np.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}[dt.itemsize]
    if dt != unsigned:
        x = jax.lax.bitcast_convert_type(x, unsigned)
    return x.astype(jnp.uint32)


def _sums(x, offset):
    w = _words(x)
    idx = jnp.zeros(w.shape, jnp.uint32) + offset
    stride = 1
    for d in reversed(range(w.ndim)):   # flat index mod 2**32, without a 64-bit iota
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * np.uint32(stride % 2**32)
        stride *= w.shape[d]
    k = idx * np.uint32(0x9E3779B1)
    a = _fmix32(w ^ k)
    b = a * (k | np.uint32(1))
    return jnp.stack([jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)])


_tree_sums = jax.jit(lambda tree: jax.tree.map(lambda x: _sums(x, np.uint32(0)), tree))


_jit_sums = jax.jit(_sums)


@functools.lru_cache(maxsize=None)
def _cpu():
    return jax.devices('cpu')[0]


def _name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator='.')


def entry(dtype, shape, sums) -> dict:
    s = np.asarray(sums, dtype=np.uint32)
    return {'dtype': np.dtype(dtype).name, 'shape': [int(d) for d in shape],
            'fingerprint': [int(s[0]), int(s[1])]}


def tree_fingerprints(tree: Any) -> dict[str, dict]:
    """{leaf name ('layers.mlp.gate.kernel', '0.mu.embed.embedding'): entry} of a tree of
    jax.Arrays (any sharding, any number of processes: all processes call it)."""
    return dispatch_fingerprints(tree)()


def dispatch_fingerprints(tree: Any) -> Callable[[], dict[str, dict]]:
    """Starts the fingerprint computation (asynchronously, like any jitted call) and returns a
    function that waits for it and gives tree_fingerprints' result: a checkpoint save calls
    that in orbax's background commit thread, so the training loop does not wait for it."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    groups: dict[tuple, list[int]] = {}   # one jitted call per set of devices the leaves are on
    for i, (_, x) in enumerate(flat):
        devices = getattr(getattr(x, 'sharding', None), 'device_set', None) or ()
        groups.setdefault(tuple(sorted(d.id for d in devices)), []).append(i)
    pending = [(idx, _tree_sums([flat[i][1] for i in idx])) for idx in groups.values()]
    meta = [(_name(p), x.dtype, x.shape) for p, x in flat]

    def resolve() -> dict[str, dict]:
        sums: list[Any] = [None] * len(flat)
        for idx, group_sums in pending:
            for i, s in zip(idx, jax.device_get(group_sums)):
                sums[i] = s
        return {name: entry(dt, shape, s) for (name, dt, shape), s in zip(meta, sums)}
    return resolve


def host_words(x: np.ndarray) -> np.ndarray:
    """A numpy array as unsigned words (a view: float64 becomes pairs of uint32 words)."""
    x = np.ascontiguousarray(x)
    if x.dtype.itemsize == 8:
        return x.reshape(-1).view(np.uint32)
    if x.dtype == np.bool_:
        return x.view(np.uint8)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def host_sums(x: np.ndarray, word_offset: int = 0) -> np.ndarray:
    """The two sums of a host array whose first word sits at ``word_offset`` of its leaf."""
    w = jax.device_put(host_words(x), _cpu())
    return np.asarray(_jit_sums(w, jax.device_put(np.uint32(word_offset % 2**32), _cpu())))


def words_per_element(dtype) -> int:
    return max(1, np.dtype(dtype).itemsize // 4)


class Accumulator:
    """Sums a leaf's fingerprint from its slices (each slice once, any order)."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}

    def add(self, name: str, x: np.ndarray, word_offset: int = 0) -> None:
        total = self.sums.get(name, np.zeros(2, np.uint32))
        self.sums[name] = (total + host_sums(x, word_offset)).astype(np.uint32)


def mismatches(expected: Mapping[str, Mapping], actual: Mapping[str, Mapping]) -> list[str]:
    """Descriptions of every leaf whose fingerprint (or dtype / shape) differs; leaves that are
    only on one side are listed too."""
    out = []
    for name in sorted(set(expected) | set(actual)):
        e, a = expected.get(name), actual.get(name)
        if e is None or a is None:
            out.append(f'{name}: {"not recorded" if e is None else "missing"}')
        elif (e['dtype'], list(e['shape'])) != (a['dtype'], list(a['shape'])):
            out.append(f'{name}: recorded {e["dtype"]}{list(e["shape"])}, '
                       f'read {a["dtype"]}{list(a["shape"])}')
        elif list(e['fingerprint']) != list(a['fingerprint']):
            out.append(f'{name}: contents differ from what was saved')
    return out


class IntegrityError(ValueError):
    """Arrays read back from a checkpoint are not the arrays that were saved."""
