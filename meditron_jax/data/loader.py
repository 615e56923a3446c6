"""The grain pipeline: prepared shards -> packed, mixed, resumable batches.

Per source: ArrayRecord shards -> this process's documents (``[process_index::process_count]``,
so no document is read by two hosts and none is skipped) -> shuffled with a seed per epoch ->
repeated. The sources are then interleaved by *token* share: the config's weights are fractions
of training tokens (GAP-Replay's 1% replay), turned into per-document rates with the manifest's
mean document lengths. Documents are packed into rows of ``seq_len + 1`` tokens, concat-then-split
(Megatron-style: a document may continue on a later row, no padding) or first-fit (whole
documents, zero padding; longer ones truncated), and batched per process.

A batch is a dict of int32 arrays of shape (global_batch_size // process_count, seq_len + 1):
``tokens``; ``segment_ids``, 1, 2, ... for the documents of a row and 0 for padding;
``positions``, restarting at 0 where each document (or its continuation) starts; and
``loss_mask``, 1 where a token is learned: everywhere for text, on the assistant turns for chat
data (``data.format='chat'``, packed first-fit: conversations whole, a longer one truncated to a
row; see chat_data.py). The model reads ``tokens[:, :-1]`` and predicts ``tokens[:, 1:]`` where
``segment_ids[:, 1:] == segment_ids[:, :-1] != 0``, weighted by ``loss_mask[:, 1:]``. The element
order is a pure function of the seed and the number of batches taken; the
iterator's ``get_state()`` (or ``grain.checkpoint.CheckpointSave``) resumes it exactly.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, FirstFitPackIterDataset

from meditron_jax import sharding as sharding_lib
from meditron_jax.data import chat_data
from meditron_jax.data import shards as shards_lib
from meditron_jax.data import tokenizer as tokenizer_lib
from meditron_jax.data.sources import DataError, Source, parse_sources

PACKINGS = ('concat', 'first_fit')
# Records are read in the iterating thread: a read costs ~20 us (mmap'd local shards) while
# grain's prefetch threads cost more than that in GIL hand-offs (measured: 1.2M tokens/s with
# none, 0.25M with 2 or 8; BENCHMARKS.md). For slow storage, use data.worker_count processes.
READ_THREADS = 0
READ_PREFETCH = 0


class _Decode(grain.transforms.Map):
    """Record bytes -> {'tokens': int32 ids} (+ 'loss_mask' for chat records, + per-token source
    ids for tests)."""

    def __init__(self, dtype: str, source_index: int | None = None, chat: bool = False):
        self._dtype_name = dtype
        self._dtype = np.dtype(shards_lib.DTYPES[dtype]).newbyteorder('<')
        self._source_index = source_index
        self._chat = chat

    def map(self, record: bytes) -> dict[str, np.ndarray]:
        if self._chat:
            tokens, mask = chat_data.decode_record(record, self._dtype_name)
            out = {'tokens': tokens, 'loss_mask': mask}
        else:
            tokens = np.frombuffer(record, self._dtype).astype(np.int32)
            out = {'tokens': tokens}
        if self._source_index is not None:
            out['source_ids'] = np.full_like(tokens, self._source_index)
        return out


class _Truncate(grain.transforms.Map):
    def __init__(self, length: int):
        self._length = length

    def map(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v[:self._length] for k, v in element.items()}


class _Rename(grain.transforms.Map):
    """Packer output names -> the batch contract (tokens, segment_ids, positions, loss_mask;
    the mask is all ones for text, padding being excluded by its segment id 0)."""

    def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {'tokens': row['tokens'].astype(np.int32),
               'segment_ids': row['tokens_segment_ids'].astype(np.int32),
               'positions': row['tokens_positions'].astype(np.int32),
               'loss_mask': (row['loss_mask'].astype(np.int32) if 'loss_mask' in row
                             else np.ones(row['tokens'].shape, np.int32))}
        if 'source_ids' in row:
            out['source_ids'] = row['source_ids'].astype(np.int32)
        return out


class _ShuffleRepeat(grain.MapDataset):
    """The parent repeated forever, each epoch in a fresh random order (numpy permutations).

    grain's ``shuffle`` computes each index with a cycle-walking cipher that costs about 0.4 ms
    on small datasets (hundreds of documents: a process's share of a small source); a cached
    permutation costs 4 bytes per document and nothing per read.
    """

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed = seed
        self._length = len(parent)
        self._permutations: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):       # pickled into grain worker processes: no lock, no cache
        state = dict(self.__dict__)
        del state['_lock']
        state['_permutations'] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f'_ShuffleRepeat(seed={self._seed})'

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._permutations.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self._seed, epoch]).permutation(self._length)
                # Reader threads straddle at most two epochs; keep those.
                self._permutations = {e: p for e, p in self._permutations.items()
                                      if e >= epoch - 1}
                self._permutations[epoch] = perm
            return perm

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, offset = divmod(index, self._length)
        return self._parent[int(self._permutation(epoch)[offset])]


def _seed(*parts: Any) -> int:
    """A 32-bit seed from any values (stable across runs and Python versions)."""
    text = '/'.join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), 'little')


def open_prepared(data_cfg, data_dir: str) -> tuple[dict[str, Any], list[Source]]:
    """The manifest, after checking it against the config (tokenizer hash, sources, weights)."""
    sources = parse_sources(data_cfg.sources)
    manifest = shards_lib.read_manifest(data_dir)
    if manifest is None:
        raise DataError(f'{data_dir}: no {shards_lib.MANIFEST} (no complete prepared data); '
                        f'run meditron-prepare --config ... --config.data.dir={data_dir}')
    where = os.path.join(data_dir, shards_lib.MANIFEST)
    tok = manifest['tokenizer']
    path = os.path.join(data_dir, tok['file'])
    if not os.path.isfile(path) or tokenizer_lib.file_sha256(path) != tok['sha256']:
        raise DataError(f'{path}: missing or its sha256 differs from {where} '
                        f'(tokenizer.sha256={tok["sha256"]}); the data dir was modified: '
                        f're-run meditron-prepare --force')
    if data_cfg.tokenizer:
        configured = tokenizer_lib.file_sha256(data_cfg.tokenizer)
        if configured != tok['source_sha256']:
            raise DataError(f'{where}: shards were encoded with tokenizer sha256 '
                            f'{tok["source_sha256"]} ({tok["source"]}), but data.tokenizer='
                            f'{data_cfg.tokenizer!r} has sha256 {configured}; re-run '
                            f'meditron-prepare --force or point data.dir at matching shards')
    shards_lib.check_trainable(sources, manifest, data_dir)
    return manifest, sources


def is_chat(data_cfg, manifest) -> bool:
    """Whether the prepared data is chat data (then packed first-fit, conversations whole)."""
    chat = manifest.get('data_format', 'text') == 'chat'
    if chat != (data_cfg.format == 'chat'):
        raise DataError(f'data.format={data_cfg.format!r} but the prepared data is '
                        f'{"chat" if chat else "text"}; re-run meditron-prepare --force')
    if chat and data_cfg.packing != 'first_fit':
        raise DataError(f'data.packing={data_cfg.packing!r}: chat data is packed whole, set '
                        f'data.packing="first_fit"')
    return chat


def _check_batch(data_cfg, process_index: int, process_count: int) -> int:
    if not 0 <= process_index < process_count:
        raise DataError(f'process_index={process_index} with process_count={process_count}')
    if data_cfg.seq_len <= 0:
        raise DataError(f'data.seq_len={data_cfg.seq_len}: expected > 0')
    if data_cfg.global_batch_size <= 0 or data_cfg.global_batch_size % process_count:
        raise DataError(f'data.global_batch_size={data_cfg.global_batch_size}: expected a '
                        f'positive multiple of the {process_count} processes')
    if data_cfg.packing not in PACKINGS:
        raise DataError(f'data.packing={data_cfg.packing!r}: expected one of {PACKINGS}')
    return data_cfg.global_batch_size // process_count


def process_documents(data_dir: str, manifest, source: Source, split: str,
                      process_index: int, process_count: int) -> grain.MapDataset:
    """This process's share of one (source, split)'s records (bytes), in stored order."""
    paths = shards_lib.split_paths(data_dir, manifest, source.name, split)
    if not paths:
        return grain.MapDataset.source([])
    try:
        records = grain.sources.ArrayRecordDataSource(paths)
    except RuntimeError:  # ArrayRecord does not say which file: find it
        shards_lib.check_readable(paths)
        raise
    return grain.MapDataset.source(records)[process_index::process_count]


def _mix_rates(manifest, sources: list[Source], split: str) -> list[float]:
    """Per-document sampling rates giving each source its weight as a share of tokens."""
    rates = []
    for s in sources:
        info = manifest['sources'][s.name]['splits'][split]
        rates.append(s.weight / (info['tokens'] / info['documents']))
    return rates


def _pack_and_batch(ds: grain.IterDataset, data_cfg, local_batch: int, with_source_ids: bool,
                    seed: int, chat: bool = False) -> grain.IterDataset:
    length = data_cfg.seq_len + 1
    lengths = {'tokens': length, **({'source_ids': length} if with_source_ids else {}),
               **({'loss_mask': length} if chat else {})}
    if data_cfg.packing == 'concat':
        ds = ConcatThenSplitIterDataset(ds, length_struct=lengths)
    else:
        ds = ds.map(_Truncate(length))
        ds = FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=local_batch,
                                     seed=seed, shuffle_bins=False)
    return ds.map(_Rename()).batch(local_batch, drop_remainder=True)


def _to_iter(ds: grain.MapDataset) -> grain.IterDataset:
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                                prefetch_buffer_size=READ_PREFETCH))


def train_dataset(data_cfg, data_dir: str, *, seed: int, process_index: int, process_count: int,
                  with_source_ids: bool = False) -> grain.IterDataset:
    """The infinite training pipeline (see the module docstring); ``with_source_ids`` adds a
    per-token 'source_ids' feature (the source's index in data.sources), for measuring."""
    local_batch = _check_batch(data_cfg, process_index, process_count)
    manifest, sources = open_prepared(data_cfg, data_dir)
    chat = is_chat(data_cfg, manifest)
    mixed, weighted = [], [(i, s) for i, s in enumerate(sources) if s.weight > 0]
    for i, source in weighted:
        docs = process_documents(data_dir, manifest, source, 'train', process_index,
                                 process_count)
        if not len(docs):
            total = manifest['sources'][source.name]['splits']['train']['documents']
            raise DataError(f'data.sources[{i}] ({source.name!r}): {process_count} processes '
                            f'but only {total} training documents; process {process_index} '
                            f'would get none')
        docs = _ShuffleRepeat(docs, _seed(seed, data_cfg.shuffle_seed, source.name))
        mixed.append(docs.map(_Decode(manifest['dtype'], i if with_source_ids else None, chat)))
    rates = _mix_rates(manifest, [s for _, s in weighted], 'train')
    ds = grain.MapDataset.mix(mixed, rates) if len(mixed) > 1 else mixed[0]
    ds = _pack_and_batch(_to_iter(ds), data_cfg, local_batch, with_source_ids,
                         _seed(seed, 'pack'), chat)
    if data_cfg.worker_count > 0:
        from absl import flags
        # grain 0.2.18 reads an absl flag in mp_prefetch; unparsed flags raise (see STACK.md).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
    return ds


def make_train_iterator(data_cfg, data_dir: str, *, seed: int, process_index: int,
                        process_count: int) -> grain.DatasetIterator:
    """Infinite iterator of this process's training batches; get_state()/set_state() resume it
    exactly (also through grain.checkpoint.CheckpointSave / CheckpointRestore)."""
    return iter(train_dataset(data_cfg, data_dir, seed=seed, process_index=process_index,
                              process_count=process_count))


def make_eval_iterator(data_cfg, data_dir: str, *, process_index: int,
                       process_count: int) -> grain.DatasetIterator:
    """This process's validation batches: the held-out documents of the weighted sources, mixed
    by the same token shares, in a fixed order (the same batches on every call), repeated so
    that it never ends."""
    local_batch = _check_batch(data_cfg, process_index, process_count)
    manifest, sources = open_prepared(data_cfg, data_dir)
    chat = is_chat(data_cfg, manifest)
    mixed, used = [], []
    for i, source in enumerate(sources):
        if source.weight <= 0:
            continue
        docs = process_documents(data_dir, manifest, source, 'validation', process_index,
                                 process_count)
        if len(docs):
            mixed.append(docs.repeat(reseed_each_epoch=False).map(
                _Decode(manifest['dtype'], chat=chat)))
            used.append(source)
    if not mixed:
        raise DataError(f'{os.path.join(data_dir, shards_lib.MANIFEST)}: no validation documents '
                        f'for process {process_index} of {process_count} in the weighted sources '
                        f'{[s.name for s in sources if s.weight > 0]}; raise their val_fraction')
    rates = _mix_rates(manifest, used, 'validation')
    ds = grain.MapDataset.mix(mixed, rates) if len(mixed) > 1 else mixed[0]
    return iter(_pack_and_batch(_to_iter(ds), data_cfg, local_batch, False, 0, chat))


def to_global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh
                    ) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over the mesh's batch axes.

    Every process holds an equal, distinct share of the rows (train.validate_config checks the
    mesh allows that); the global shape is given so that JAX raises rather than building a
    smaller batch when it does not."""
    sharding = sharding_lib.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(
                sharding, np.asarray(v), global_shape=(len(v) * jax.process_count(),
                                                       *np.shape(v)[1:]))
            for k, v in local_batch.items()}
