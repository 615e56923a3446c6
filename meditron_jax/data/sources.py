"""The ``data.sources`` entries: validation, file globs and reading raw documents.

Input formats, by file name: ``.jsonl`` / ``.jsonl.gz`` (one JSON object per line with the
source's ``text_key`` and optional ``id`` / ``title``), ``.txt`` / ``.txt.gz`` (the whole file
is one document). Reading is split in two so that the main process only moves lines around and
the workers do the parsing: ``read_chunks`` yields raw lines with their line numbers,
``parse_chunk`` turns them into documents and raises ``DataError`` naming file and line.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

_NAME = re.compile(r'^[A-Za-z0-9_\-]+$')
JSONL_SUFFIXES = ('.jsonl', '.jsonl.gz')
TEXT_SUFFIXES = ('.txt', '.txt.gz')


class DataError(ValueError):
    """Bad input data or data config; the message names the file / line / key at fault."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One validated ``data.sources[i]`` entry."""
    name: str
    files: str          # glob
    weight: float       # share of training tokens
    val_fraction: float
    text_key: str


@dataclasses.dataclass(frozen=True)
class Document:
    path: str
    line: int           # 1-based line number in ``path`` (1 for whole-file documents)
    doc_id: str
    title: str
    text: str


def parse_sources(sources: Sequence[Any]) -> list[Source]:
    """Validates the config entries; errors name ``data.sources[i].key``."""
    if not sources:
        raise DataError('data.sources is empty: expected a list of source(name, files, weight, '
                        'val_fraction, text_key) entries (see configs/base.py)')
    out, seen = [], set()
    for i, entry in enumerate(sources):
        where = f'data.sources[{i}]'
        try:
            keys = set(entry.keys())
        except AttributeError:
            raise DataError(f'{where}: expected a dict, got {type(entry).__name__}')
        expected = {'name', 'files', 'weight', 'val_fraction', 'text_key'}
        if keys != expected:
            raise DataError(f'{where}: keys {sorted(keys)}; expected exactly {sorted(expected)} '
                            f'(missing {sorted(expected - keys)}, '
                            f'unknown {sorted(keys - expected)})')
        name, files = entry['name'], entry['files']
        if not isinstance(name, str) or not _NAME.match(name):
            raise DataError(f'{where}.name={name!r}: expected letters, digits, "_" or "-"')
        if name in seen:
            raise DataError(f'{where}.name={name!r}: two sources have this name')
        seen.add(name)
        if not isinstance(files, str) or not files:
            raise DataError(f'{where}.files={files!r}: expected a non-empty glob')
        weight, val = entry['weight'], entry['val_fraction']
        if not isinstance(weight, (int, float)) or weight < 0:
            raise DataError(f'{where}.weight={weight!r}: expected a token share >= 0')
        if not isinstance(val, (int, float)) or not 0 <= val < 1:
            raise DataError(f'{where}.val_fraction={val!r}: expected a fraction in [0, 1)')
        if not isinstance(entry['text_key'], str) or not entry['text_key']:
            raise DataError(f'{where}.text_key={entry["text_key"]!r}: expected a JSON key')
        out.append(Source(name, os.path.expanduser(files), float(weight), float(val),
                          entry['text_key']))
    if sum(s.weight for s in out) <= 0:
        raise DataError(f'data.sources: all weights are 0 '
                        f'({[s.name for s in out]}); at least one source must be trained on')
    return out


def resolve_files(source: Source, index: int) -> list[str]:
    """The source's files, sorted; an empty glob or an unknown format is an error."""
    paths = sorted(p for p in glob.glob(source.files, recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f'data.sources[{index}].files={source.files!r} (source '
                        f'{source.name!r}) matches no files')
    for p in paths:
        if not p.endswith(JSONL_SUFFIXES + TEXT_SUFFIXES):
            raise DataError(f'{p} (data.sources[{index}].files={source.files!r}): unsupported '
                            f'file type; expected one of {JSONL_SUFFIXES + TEXT_SUFFIXES}')
    return paths


def _open(path: str):
    return gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb')


def _decode(path: str, data: bytes, line: int, offset: int) -> str:
    """UTF-8 text of one line (or whole .txt file) starting at byte ``offset`` of ``path``."""
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError as e:
        if line == 0:  # a whole .txt file: the line of the bad byte
            line = data.count(b'\n', 0, e.start) + 1
        stream = 'uncompressed stream' if path.endswith('.gz') else 'file'
        raise DataError(f'{path}:{line}: invalid UTF-8 ({e.reason}: byte 0x{data[e.start]:02x} '
                        f'at byte offset {offset + e.start:,} of the {stream}); expected UTF-8 '
                        f'text') from None


def read_chunks(path: str, lines_per_chunk: int) -> Iterator[tuple[int, list[str]]]:
    """(first line number, raw lines) for a JSONL file; one chunk with the whole text for .txt.

    Lines are split on b'\\n' and decoded one by one, so a decoding error names the line and
    the byte's real offset; a truncated or corrupt .gz names the file and the last good line.
    """
    number = 0
    try:
        with _open(path) as f:
            if path.endswith(TEXT_SUFFIXES):
                yield 1, [_decode(path, f.read(), 0, 0)]
                return
            chunk, first, offset = [], 1, 0
            for number, raw in enumerate(f, start=1):
                chunk.append(_decode(path, raw, number, offset))
                offset += len(raw)
                if len(chunk) == lines_per_chunk:
                    yield first, chunk
                    chunk, first = [], number + 1
            if chunk:
                yield first, chunk
    except (EOFError, OSError, zlib.error) as e:
        kind = 'gzip file' if path.endswith('.gz') else 'file'
        raise DataError(f'{path}: cannot be read after line {number} ({e}); a truncated or '
                        f'corrupt {kind}?') from None


def parse_json_object(line: str, where: str) -> dict:
    """One JSONL line as a dict, or a DataError naming ``where`` (path:line)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f'{where}: malformed JSON ({e.msg} at column {e.colno}); '
                        f'expected one JSON object per line')
    if not isinstance(record, dict):
        raise DataError(f'{where}: expected a JSON object, got {type(record).__name__}')
    return record


def parse_chunk(path: str, first_line: int, lines: list[str], text_key: str) -> list[Document]:
    """Documents of one chunk from read_chunks; blank JSONL lines are skipped."""
    if path.endswith(TEXT_SUFFIXES):
        return [Document(path, 1, os.path.basename(path), '', lines[0])]
    docs = []
    for offset, line in enumerate(lines):
        number = first_line + offset
        if not line.strip():
            continue
        record = parse_json_object(line, f'{path}:{number}')
        if text_key not in record:
            raise DataError(f'{path}:{number}: no key {text_key!r} (the source\'s text_key); '
                            f'keys are {sorted(record)[:10]}')
        text = record[text_key]
        if not isinstance(text, str):
            raise DataError(f'{path}:{number}: key {text_key!r} is {type(text).__name__}, '
                            f'expected a string')
        title = record.get('title') or ''
        if not isinstance(title, str):
            raise DataError(f'{path}:{number}: key "title" is {type(title).__name__}, '
                            f'expected a string')
        docs.append(Document(path, number, str(record.get('id', f'{number}')), title, text))
    return docs
