"""One ordered pass over every input file: workers parse, clean, hash and tokenize chunks of
lines; the main process takes the results in input order and makes the decisions that depend
on other documents (exact and near duplicates) and the train/validation split. Because chunks
are fixed by the input and results are consumed in order, the output does not depend on the
number of workers.
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from tqdm import tqdm

from meditron_jax.data import clean as clean_lib
from meditron_jax.data import decontaminate as decontam_lib
from meditron_jax.data import decontaminate_io
from meditron_jax.data import shards as shards_lib
from meditron_jax.data import tokenizer as tokenizer_lib
from meditron_jax.data.sources import Source, parse_chunk, read_chunks

LINES_PER_CHUNK = 256               # unit of work for one worker call


_WORKER: dict[str, Any] = {}


def _init_worker(clean_options, dedup: str, text_keys: list[str], tokenizer_path: str | None,
                 dtype: str | None, decontam_index: str | None = None) -> None:
    _WORKER.update(clean=clean_options, dedup=dedup, text_keys=text_keys, dtype=dtype,
                   tokenizer=tokenizer_lib.Tokenizer(tokenizer_path) if tokenizer_path else None,
                   decontam=decontaminate_io.load_index(decontam_index) if decontam_index
                   else None)


def _work(item: tuple[int, str, int, list[str]]
          ) -> tuple[int, int, clean_lib.CleanStats, decontam_lib.Counts, list]:
    """Parses, cleans, decontaminates, hashes (and tokenizes) one chunk.

    Returns (source index, characters read, cleaning counts, decontamination counts,
    [(digest, payload, tokens, sig)]), the payload being the cleaned text, or the token ids'
    bytes when a tokenizer is loaded.
    """
    source_index, path, first_line, lines = item
    stats, found = clean_lib.CleanStats(), decontam_lib.Counts()
    docs, texts = [], []
    for doc in parse_chunk(path, first_line, lines, _WORKER['text_keys'][source_index]):
        text = clean_lib.clean(doc.text, doc.title, _WORKER['clean'], stats)
        if text is not None:
            docs.append(doc)
            texts.append(text)
    if _WORKER['decontam'] is not None:
        index, mode = _WORKER['decontam']
        texts = decontam_lib.filter_documents(texts, docs, index, mode,
                                              _WORKER['clean'].min_chars, found)
    kept = []
    for text in texts:
        if text is None:
            continue
        if _WORKER['dedup'] == 'minhash':
            words = clean_lib.dedup_words(text)
            kept.append([clean_lib.digest(words), text, 0, clean_lib.minhash_signature(words)])
        else:  # in bounded memory, for very long documents
            kept.append([clean_lib.text_digest(text), text, 0, None])
    tokenizer = _WORKER['tokenizer']
    if tokenizer is not None and kept:
        dtype = np.dtype(shards_lib.DTYPES[_WORKER['dtype']]).newbyteorder('<')
        for doc, ids in zip(kept, tokenizer.encode_batch([d[1] for d in kept])):
            doc[1] = np.asarray(ids, dtype=dtype).tobytes()
            doc[2] = len(ids)
    return source_index, sum(map(len, lines)), stats, found, [tuple(d) for d in kept]


def _ordered_map(fn: Callable, items: Iterable, workers: int, initargs: tuple) -> Iterator:
    """fn over items in order, on ``workers`` processes, with a bounded number in flight."""
    if workers <= 1:
        _init_worker(*initargs)
        yield from map(fn, items)
        return
    # spawn, not fork: the caller may have started JAX's threads, which fork would copy broken.
    with multiprocessing.get_context('spawn').Pool(workers, _init_worker, initargs) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------- the scan


@dataclasses.dataclass
class _SourceCounts:
    files: int = 0
    documents_in: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    clean: clean_lib.CleanStats = dataclasses.field(default_factory=clean_lib.CleanStats)
    decontam: decontam_lib.Counts = dataclasses.field(default_factory=decontam_lib.Counts)

    def removed(self) -> dict[str, int]:
        return dict(exact_duplicates=self.exact_duplicates, near_duplicates=self.near_duplicates,
                    **dataclasses.asdict(self.clean))


def scan(sources: list[Source], files: list[list[str]], data_cfg, workers: int,
          tokenizer_path: str | None, dtype: str | None, dedup: str,
          sink: Callable[[int, str, bytes, Any, int], bool], desc: str,
          decontam_index: str | None = None) -> list[_SourceCounts]:
    """Runs the workers over every file in order; sink(source, split, digest, payload, tokens)
    gets each kept document and returns False to stop early. ``decontam_index``: the file
    decontaminate_io.write_index made, when data.decontaminate is set."""
    counts = [_SourceCounts(files=len(f)) for f in files]
    exact_seen: set[bytes] = set()
    near = clean_lib.NearDuplicateIndex(data_cfg.minhash_threshold) if dedup == 'minhash' else None

    def items():
        for index, paths in enumerate(files):
            for path in paths:
                for first_line, lines in read_chunks(path, LINES_PER_CHUNK):
                    yield index, path, first_line, lines

    initargs = (clean_lib.CleanOptions.from_config(data_cfg.clean), dedup,
                [s.text_key for s in sources], tokenizer_path, dtype, decontam_index)
    total = sum(os.path.getsize(p) for paths in files for p in paths)
    results = _ordered_map(_work, items(), workers, initargs)
    with tqdm(total=total, unit='B', unit_scale=True, desc=desc, file=sys.stderr,
              mininterval=1 if sys.stderr.isatty() else 30) as bar:   # shown in job logs too
        try:
            for index, chars, stats, found, docs in results:
                bar.update(chars)
                source, count = sources[index], counts[index]
                count.clean.add(stats)
                count.decontam.add(found)
                count.documents_in += stats.too_short + found.documents_removed + len(docs)
                for digest, payload, num_tokens, signature in docs:
                    if dedup != 'none':
                        if digest in exact_seen:
                            count.exact_duplicates += 1
                            continue
                        if near is not None and near.seen_or_add(signature):
                            count.near_duplicates += 1
                            continue
                        exact_seen.add(digest)
                    held_out = clean_lib.validation_draw(digest) < source.val_fraction
                    split = 'validation' if held_out else 'train'
                    if sink(index, split, digest, payload, num_tokens) is False:
                        return counts
        finally:
            results.close()  # stops the worker pool when leaving early or on an error
    return counts
