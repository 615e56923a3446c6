"""The prepared-data format: ArrayRecord shards of token ids and ``manifest.json``.

Layout of a data dir::

    manifest.json                       written last: its presence marks a complete output
    tokenizer.model                     the SentencePiece model the shards were encoded with
    shards/<source>.<split>.<k>.array_record   one record per document: token ids, little-endian
                                        uint16 (vocabulary <= 65536) or uint32, BOS ... EOS

A record is the raw bytes of the document's ids (``np.frombuffer(record, dtype)``), so the loader
decodes it with no copy and no parsing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from meditron_jax.data.sources import DataError

FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
SHARDS_DIR = 'shards'
SPLITS = ('train', 'validation')
# group_size 1: grain reads single records; token ids compress poorly (about 1.3x), and
# decompression would cost the loader far more than the disk saved.
WRITER_OPTIONS = 'group_size:1,uncompressed'
DTYPES = {'uint16': np.uint16, 'uint32': np.uint32}


def token_dtype(choice: str, vocab_size: int) -> str:
    """'uint16' when every id fits, else 'uint32'; a chosen dtype that is too small is an error."""
    if choice == 'auto':
        return 'uint16' if vocab_size <= 1 << 16 else 'uint32'
    if choice not in DTYPES:
        raise DataError(f'data.token_dtype={choice!r}: expected "auto", "uint16" or "uint32"')
    if vocab_size - 1 > np.iinfo(DTYPES[choice]).max:
        raise DataError(f'data.token_dtype={choice!r} cannot hold token ids up to '
                        f'{vocab_size - 1} (tokenizer vocabulary {vocab_size}); use "uint32" '
                        f'or "auto"')
    return choice


def shard_name(source: str, split: str, index: int) -> str:
    return f'{SHARDS_DIR}/{source}.{split}.{index:05d}.array_record'


class ShardWriter:
    """Writes one (source, split)'s documents, starting a new shard every ``max_tokens``."""

    def __init__(self, root: str, source: str, split: str, max_tokens: int,
                 keep_digests: bool = False):
        self._root, self._source, self._split = root, source, split
        self._max_tokens = max_tokens
        self._keep_digests = keep_digests
        self.shards: list[dict[str, Any]] = []
        self._writer = None
        self._digests: list[bytes] = []

    def _open(self) -> None:
        name = shard_name(self._source, self._split, len(self.shards))
        os.makedirs(os.path.join(self._root, SHARDS_DIR), exist_ok=True)
        self._writer = ArrayRecordWriter(os.path.join(self._root, name), WRITER_OPTIONS)
        self.shards.append(dict(file=name, documents=0, tokens=0))

    def write(self, record: bytes, num_tokens: int, digest: bytes = b'') -> None:
        if self._writer is None or (self.shards[-1]['tokens'] >= self._max_tokens):
            self._close_current()
            self._open()
        self._writer.write(record)
        self.shards[-1]['documents'] += 1
        self.shards[-1]['tokens'] += num_tokens
        if self._keep_digests:
            self._digests.append(digest)

    def _close_current(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        if self._keep_digests:
            with open(os.path.join(self._root, self.shards[-1]['file'] + '.digests'), 'wb') as f:
                f.write(b''.join(self._digests))
            self._digests = []

    def close(self) -> dict[str, Any]:
        """Split summary for the manifest: documents, tokens, shards."""
        self._close_current()
        return dict(documents=sum(s['documents'] for s in self.shards),
                    tokens=sum(s['tokens'] for s in self.shards), shards=self.shards)


def shard_error(path: str, error: Exception) -> DataError:
    """The error for a shard ArrayRecord cannot read (truncated, overwritten, not a shard)."""
    detail = str(error).strip() or 'truncated or corrupt'
    return DataError(f'{path}: unreadable ArrayRecord shard ({detail}); the prepared data was '
                     f'damaged: re-run meditron-prepare with --force')


def check_readable(paths: list[str]) -> None:
    """Opens each shard (its footer and index); the first that fails is named in a DataError."""
    for path in paths:
        try:
            ArrayRecordReader(path).close()
        except (RuntimeError, OSError) as e:
            raise shard_error(path, e) from None


def read_records(path: str) -> list[bytes]:
    """All records of one shard, in order (used by merging and by tests)."""
    try:
        reader = ArrayRecordReader(path)
        try:
            return list(reader.read_all()) if reader.num_records() else []
        finally:
            reader.close()
    except (RuntimeError, OSError) as e:
        raise shard_error(path, e) from None


def read_digests(path: str) -> list[bytes]:
    with open(path + '.digests', 'rb') as f:
        blob = f.read()
    return [blob[i:i + 16] for i in range(0, len(blob), 16)]


def read_manifest(data_dir: str, name: str = MANIFEST) -> dict[str, Any] | None:
    """The manifest of a complete output, or None when there is none."""
    path = os.path.join(data_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f'{path}:{e.lineno}: malformed manifest ({e.msg}); delete the data '
                            f'dir or run meditron-prepare with --force')
    if manifest.get('format') != FORMAT_VERSION:
        raise DataError(f'{path}: format {manifest.get("format")!r}, expected '
                        f'{FORMAT_VERSION}; re-run meditron-prepare with --force')
    return manifest


def write_json(path: str, obj: Mapping[str, Any]) -> None:
    """Writes JSON atomically (temp file + rename)."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write('\n')
    os.replace(tmp, path)


def check_trainable(sources, manifest: Mapping[str, Any], data_dir: str) -> None:
    """Every source with a weight must have training tokens to sample from."""
    for i, source in enumerate(sources):
        if source.weight <= 0:
            continue
        prepared = manifest['sources'].get(source.name)
        if prepared is None:
            raise DataError(f'data.sources[{i}] ({source.name!r}) is not in '
                            f'{os.path.join(data_dir, MANIFEST)} (prepared: '
                            f'{sorted(manifest["sources"])}); re-run meditron-prepare')
        if prepared['splits']['train']['tokens'] == 0:
            raise DataError(
                f'data.sources[{i}].weight={source.weight} but source {source.name!r} has no '
                f'training tokens ({prepared["documents_in"]} documents read, removed: '
                f'{prepared["removed"]}, {prepared["splits"]["validation"]["documents"]} held '
                f'out); set its weight to 0 or give it data')


def split_paths(data_dir: str, manifest: Mapping[str, Any], source: str, split: str) -> list[str]:
    """Absolute paths of one (source, split)'s shards, in order."""
    try:
        info = manifest['sources'][source]['splits'][split]
    except KeyError:
        raise DataError(f'{os.path.join(data_dir, MANIFEST)}: no source {source!r} '
                        f'(prepared sources: {sorted(manifest["sources"])}); the config\'s '
                        f'data.sources differ from the prepared data: re-run meditron-prepare')
    return [os.path.join(data_dir, s['file']) for s in info['shards'] if s['documents']]
