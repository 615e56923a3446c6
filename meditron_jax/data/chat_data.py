"""Chat (finetuning) data for meditron-prepare with ``data.format = 'chat'``.

Each ``data.sources`` entry names JSONL files of conversations, one a line (see chat.py for the
record forms). Conversations are not cleaned or deduplicated (they are kept as written); each is
tokenised by chat.tokenize into ids and a loss mask, held out for validation by a hash of its
rendered text (the source's ``val_fraction``), and stored as one ArrayRecord record::

    ids (uint16/uint32 little-endian, N of them) followed by the loss mask (uint8, N of them)

Conversations longer than a training row (``data.seq_len + 1`` tokens) are kept whole on disk;
the loader truncates them to a row, and the manifest counts them (``truncated``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator

import numpy as np
from tqdm import tqdm

from meditron_jax.data import chat
from meditron_jax.data import clean as clean_lib
from meditron_jax.data import shards as shards_lib
from meditron_jax.data import tokenizer as tokenizer_lib
from meditron_jax.data.sources import (JSONL_SUFFIXES, DataError, Source, parse_json_object,
                                       read_chunks)

FORMATS = ('text', 'chat')
LINES_PER_CHUNK = 1024


def check_format(data_cfg) -> str:
    if data_cfg.format not in FORMATS:
        raise DataError(f'data.format={data_cfg.format!r}: expected one of {FORMATS}')
    return data_cfg.format


def special_tokens(data_cfg) -> list[str]:
    """data.special_tokens, then (for chat data) the ChatML markers, appended after them so that
    existing ids never move."""
    tokens = list(data_cfg.special_tokens)
    if check_format(data_cfg) == 'chat':
        tokens += [t for t in chat.SPECIAL_TOKENS if t not in tokens]
    return tokens


def conversations(path: str) -> Iterator[tuple[int, list[dict[str, str]]]]:
    """(line number, messages) of a chat JSONL file; blank lines are skipped; a bad line raises
    DataError naming path:line."""
    if not path.endswith(JSONL_SUFFIXES):
        raise DataError(f'{path}: chat data must be JSONL ({JSONL_SUFFIXES}), one conversation '
                        f'a line')
    for first, lines in read_chunks(path, LINES_PER_CHUNK):
        for number, line in enumerate(lines, start=first):
            if not line.strip():
                continue
            where = f'{path}:{number}'
            yield number, chat.parse_record(parse_json_object(line, where), where)


def tokenizer_texts(files: list[list[str]]) -> list[str]:
    """The rendered conversations of the training files: what a tokenizer is trained on."""
    return [chat.render(messages) for paths in files for path in paths
            for _, messages in conversations(path)]


def encode_record(ids_N: np.ndarray, mask_N: np.ndarray, dtype: str) -> bytes:
    ids = np.asarray(ids_N, np.dtype(shards_lib.DTYPES[dtype]).newbyteorder('<'))
    return ids.tobytes() + np.asarray(mask_N, np.uint8).tobytes()


def decode_record(record: bytes, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32[N], loss_mask int32[N]) of a chat record."""
    dt = np.dtype(shards_lib.DTYPES[dtype]).newbyteorder('<')
    n = len(record) // (dt.itemsize + 1)
    return (np.frombuffer(record, dt, n).astype(np.int32),
            np.frombuffer(record, np.uint8, n, offset=n * dt.itemsize).astype(np.int32))


def scan(sources: list[Source], files: list[list[str]], tokenizer_path: str, dtype: str,
         row_tokens: int, sink: Callable[[int, str, bytes, int], None]) -> list[dict]:
    """Tokenises every conversation in order; sink(source, split, record, tokens) stores it.
    Returns per-source counts for the manifest (files, documents_in, and per split
    loss_tokens and truncated)."""
    tok = tokenizer_lib.Tokenizer(tokenizer_path)
    counts = [dict(files=len(f), documents_in=0,
                   splits={s: dict(loss_tokens=0, truncated=0) for s in shards_lib.SPLITS})
              for f in files]
    total = sum(os.path.getsize(p) for paths in files for p in paths)
    with tqdm(total=total, unit='B', unit_scale=True, desc='prepare chat', file=sys.stderr,
              mininterval=1 if sys.stderr.isatty() else 30) as bar:
        for index, paths in enumerate(files):
            for path in paths:
                for _, messages in conversations(path):
                    text = chat.render(messages)
                    ids_N, mask_N = chat.tokenize(messages, tok)
                    key = hashlib.blake2b(text.encode('utf-8'), digest_size=16).digest()
                    held_out = clean_lib.validation_draw(key) < sources[index].val_fraction
                    split = 'validation' if held_out else 'train'
                    c = counts[index]
                    c['documents_in'] += 1
                    c['splits'][split]['loss_tokens'] += int(mask_N.sum())
                    c['splits'][split]['truncated'] += int(len(ids_N) > row_tokens)
                    sink(index, split, encode_record(ids_N, mask_N, dtype), len(ids_N))
                    bar.update(len(text.encode('utf-8')))
    return counts


def summary(manifest: dict) -> str:
    """A table of conversations, tokens, loss tokens and truncations per source."""
    rows = [f'{"source":<14}{"convs":>7}{"train conv":>11}{"train tok":>11}{"loss tok":>10}'
            f'{"truncated":>10}{"val conv":>9}{"val tok":>9}']
    for name, s in manifest['sources'].items():
        tr, va = s['splits']['train'], s['splits']['validation']
        rows.append(f'{name:<14}{s["documents_in"]:>7}{tr["documents"]:>11}{tr["tokens"]:>11}'
                    f'{tr["loss_tokens"]:>10}{tr["truncated"] + va["truncated"]:>10}'
                    f'{va["documents"]:>9}{va["tokens"]:>9}')
    tok = manifest['tokenizer']
    rows.append(f'chat data, rows of {manifest["row_tokens"]} tokens; tokenizer: '
                f'{tok["source"]} ({tok["vocab_size"]} pieces, sha256 {tok["sha256"][:12]}), '
                f'dtype {manifest["dtype"]}')
    return '\n'.join(rows)
