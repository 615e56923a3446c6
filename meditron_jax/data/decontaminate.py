"""Benchmark decontamination: training documents that hold benchmark n-grams are dropped or cut.

Both sides are normalised the same way (NFKC, case-folded, word tokens: punctuation and
whitespace do not count). Each word gets a 64-bit hash (blake2b) and each run of n words a 64-bit
polynomial hash of its word hashes, finished with a bit mixer. An item's text is what a model
sees of it: PubMedQA's abstract, the question and the options' texts. An item of fewer than n
words is matched whole (its one window of all its words).

The index is built once (``build_index``) from the benchmark files read by meditron-eval's
loaders; prepare saves it next to its temp output and every worker (and every --shard slice,
which rebuilds it from the same files, pinned by sha256 in the options) matches documents
against the same set. A document matches when any of its windows does; ``drop`` removes it,
``cut`` removes the matching words (and the punctuation up to the next word) and keeps the
rest, unless what is left is under ``clean.min_chars``.

The pipeline's side (config checks, the index file, decontamination.jsonl and the manifest
section) is in decontaminate_io.py; this file holds the pure functions.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import unicodedata
from collections.abc import Sequence
from itertools import count, repeat
from typing import Any

import numpy as np

MODES = ('drop', 'cut')
_WORD = re.compile(r'\w+')
# ASCII text (nearly all of it) takes a faster path with the same result: lower case, and every
# character that \w does not match becomes a space (str.translate has a fast ASCII mode).
_ASCII_WORDS = {c: (chr(c).lower() if chr(c).isalnum() or chr(c) == '_' else ' ')
                for c in range(128)}
BLOOM_BITS_PER_KEY = 16    # filter slots per indexed hash (two probes each, low and high bits):
BLOOM_SECOND_PROBE = np.uint64(32)   # ~10% of windows pass the first probe, ~2% both
BUILD_BATCH_ITEMS = 512       # benchmark items normalised at a time
SEPARATOR = '\x00'    # laid between texts by normalised_words: never a word (normalise drops it)
_AFTER_SPAN = re.compile(r'[^\w\s]*\s*')     # punctuation then spaces after a cut span
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)   # odd: multiplying by it is a bijection mod 2^64
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)       # splitmix64's finaliser
_MIX2 = np.uint64(0x94D049BB133111EB)


def normalise(text: str) -> list[str]:
    """The words matching is done on: NFKC, case-folded, punctuation and spacing dropped."""
    if text.isascii():
        return text.translate(_ASCII_WORDS).split()
    return _WORD.findall(unicodedata.normalize('NFKC', text).casefold())


def normalised_words(texts: Sequence[str]) -> list[str]:
    """normalise() of each text, laid end to end, each followed by one SEPARATOR.

    One translate + split for the whole batch (per-text calls cost more than the work): ASCII
    texts are translated apart (str.translate's fast mode) and the others normalised apart; the
    pieces hold only word characters and spaces, so splitting them again gives the same words.
    """
    pieces = [t.translate(_ASCII_WORDS) if t.isascii() else ' '.join(normalise(t))
              for t in texts]
    pieces.append('')
    return f' {SEPARATOR} '.join(pieces).split()


def item_text(item: Any) -> str:
    """Everything a model sees of a benchmark item (a meditron-eval ``Item``)."""
    parts = [item.context or '', item.question, *item.options.values()]
    return '\n'.join(p for p in parts if p)


def word_hash(word: str) -> int:
    """A word's 64-bit hash; never 0 (0 marks a word that no benchmark holds)."""
    return int.from_bytes(hashlib.blake2b(word.encode('utf-8'), digest_size=8).digest(),
                          'little') or 1


def window_hashes(word_hashes: np.ndarray, length: int) -> np.ndarray:
    """The 64-bit hash of every run of ``length`` consecutive words (uint64, one per start)."""
    count = len(word_hashes) - length + 1
    if count <= 0 or length <= 0:
        return np.zeros(0, np.uint64)
    acc = word_hashes[:count].copy()
    for j in range(1, length):          # sum of h[i + j] * M^(length - 1 - j), mod 2^64
        acc *= _MULTIPLIER
        acc += word_hashes[j:j + count]
    acc += np.uint64(length)            # runs of different lengths hash apart
    acc ^= acc >> np.uint64(30)
    acc *= _MIX1
    acc ^= acc >> np.uint64(27)
    acc *= _MIX2
    acc ^= acc >> np.uint64(31)
    return acc


def item_ngrams(words: Sequence[str], n: int) -> tuple[int, np.ndarray]:
    """(window length, hashes) of an item: its n-grams, or one hash of all its words when it
    has fewer than n (an empty item has none). build_index computes the same values in bulk."""
    length = min(n, len(words))
    hashes = np.array([word_hash(w) for w in words], dtype=np.uint64)
    return length, window_hashes(hashes, length)


@dataclasses.dataclass
class Index:
    """Benchmark n-grams: per window length, sorted hashes and the item each came from."""
    ngram: int
    vocab: dict[str, int]                          # every benchmark word -> its hash
    keys: dict[int, np.ndarray]                    # window length -> sorted uint64 hashes
    owners: dict[int, np.ndarray]                  # window length -> int32 item number
    items: list[tuple[str, str]]                   # item number -> (benchmark, item id)

    @functools.cached_property
    def lookup(self) -> dict[str, int]:
        """Word -> its row of hash_table (1..len(vocab)); SEPARATOR -> the last row."""
        out = {w: i for i, w in enumerate(self.vocab, 1)}
        out[SEPARATOR] = len(out) + 1
        return out

    @functools.cached_property
    def hash_table(self) -> np.ndarray:
        """uint64 word hashes by lookup row; rows 0 (unknown words) and last (SEPARATOR) are 0."""
        return np.fromiter([0, *self.vocab.values(), 0], np.uint64, len(self.vocab) + 2)

    def word_hashes(self, words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(hash of each word, 0 for words no benchmark has and separators; the separators'
        positions) of normalised_words' output."""
        rows = np.fromiter(map(self.lookup.get, words, repeat(0)), np.int64, len(words))
        return self.hash_table[rows], np.flatnonzero(rows == len(self.hash_table) - 1)

    @functools.cached_property
    def bloom(self) -> np.ndarray:
        """A filter on two bit ranges of every indexed hash: False at either = not indexed."""
        total = sum(len(k) for k in self.keys.values())
        bits = min(28, max(16, int(total * BLOOM_BITS_PER_KEY).bit_length()))  # <= 256 MiB
        out = np.zeros(1 << bits, bool)
        mask = np.uint64((1 << bits) - 1)
        for keys in self.keys.values():
            out[keys & mask] = True
            out[(keys >> BLOOM_SECOND_PROBE) & mask] = True
        return out

    def items_per_benchmark(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for benchmark, _ in self.items:
            out[benchmark] = out.get(benchmark, 0) + 1
        return out


def _batches(seq: Sequence, size: int):
    return (seq[i:i + size] for i in range(0, len(seq), size))


def build_index(benchmarks: Sequence[tuple[str, Sequence[Any]]], n: int) -> Index:
    """The index of every item of every (benchmark name, items) pair.

    All items are normalised (512 at a time) and laid end to end like documents in ``match``
    (a separator, hash 0, after each, so no window spans two); each distinct word is hashed once.
    Items of n words or more give their n-grams in one vectorised pass; shorter ones, grouped by
    length, one hash each.
    """
    items, texts = [], []
    for name, bench_items in benchmarks:
        for item in bench_items:
            items.append((name, str(item.id)))
            texts.append(item_text(item))
    # Each word numbered by its first occurrence (1-based; 0: separators), a batch of items at a
    # time so that the word lists stay small (less memory to fault in than one list of all).
    first_seen, next_ids = {SEPARATOR: 0}, count(1)
    rows = np.concatenate([np.zeros(0, np.int64)] + [
        np.fromiter(map(first_seen.setdefault, words, next_ids), np.int64, len(words))
        for words in map(normalised_words, _batches(texts, BUILD_BATCH_ITEMS))])
    del first_seen[SEPARATOR]
    index = Index(n, {w: word_hash(w) for w in first_seen}, {}, {}, items)
    table = np.zeros(len(rows) + 1, np.uint64)
    table[np.fromiter(first_seen.values(), np.int64, len(first_seen))] = np.fromiter(
        index.vocab.values(), np.uint64, len(index.vocab))
    hashes, ends = table[rows], np.flatnonzero(rows == 0)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    counts = ends - starts                           # words per item
    keys: dict[int, np.ndarray] = {}
    owners: dict[int, np.ndarray] = {}
    if (counts >= n).any():
        windows = window_hashes(hashes, n)
        unknown = np.concatenate([[0], np.cumsum(hashes == 0)])
        whole = unknown[n:n + len(windows)] == unknown[:len(windows)]   # no boundary inside
        keys[n] = windows[whole]
        owner_of_word = np.repeat(np.arange(len(items), dtype=np.int32), counts + 1)
        owners[n] = owner_of_word[:len(windows)][whole]
    for length in np.unique(counts[(counts > 0) & (counts < n)]).tolist():
        numbers = np.flatnonzero(counts == length)
        words_hashes = hashes[starts[numbers, None] + np.arange(length)].reshape(-1)
        keys[length] = window_hashes(words_hashes, length)[::length]
        owners[length] = numbers.astype(np.int32)
    for length in sorted(keys):
        order = np.argsort(keys[length])   # an n-gram repeated in one item stays listed twice
        index.keys[length], index.owners[length] = keys[length][order], owners[length][order]
    return index


@dataclasses.dataclass
class Match:
    """What a document shares with the benchmarks."""
    items: list[int]                     # item numbers (Index.items), ascending
    spans: list[tuple[int, int]]         # merged [first word, end word) ranges of its normalise()


def match(texts: Sequence[str], index: Index) -> list[Match | None]:
    """For each document, its Match, or None when it holds no benchmark window.

    All documents go through one vectorised pass: their word hashes are laid end to end with a
    0 between documents, and a window holding a 0 (a word no benchmark has, or a boundary) can
    not match.
    """
    if not texts:
        return []
    hashes, ends = index.word_hashes(normalised_words(texts))
    starts = np.concatenate([[0], ends[:-1] + 1])
    found: list[tuple[set, list]] = [(set(), []) for _ in texts]
    unknown = np.concatenate([[0], np.cumsum(hashes == 0)])
    bloom = index.bloom
    mask = np.uint64(len(bloom) - 1)
    for length, keys in index.keys.items():
        windows = window_hashes(hashes, length)
        count = len(windows)
        candidates = np.flatnonzero((unknown[length:length + count] == unknown[:count]) &
                                    bloom[windows & mask])
        candidates = candidates[bloom[(windows[candidates] >> BLOOM_SECOND_PROBE) & mask]]
        if not len(candidates):
            continue
        where = np.searchsorted(keys, windows[candidates])
        hit = keys[np.minimum(where, len(keys) - 1)] == windows[candidates]
        if not hit.any():
            continue
        first_word, lo = candidates[hit], where[hit]
        hi = np.searchsorted(keys, keys[lo], side='right')
        doc = np.searchsorted(starts, first_word, side='right') - 1
        first = first_word - starts[doc]
        owners = index.owners[length]
        for d, f, a, b in zip(doc.tolist(), first.tolist(), lo.tolist(), hi.tolist()):
            found[d][0].update(owners[a:b].tolist())
            found[d][1].append((f, f + length))
    return [Match(sorted(items), merge_spans(spans)) if items else None
            for items, spans in found]


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or touching [start, end) ranges joined, in order."""
    out: list[list[int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def word_offsets(text: str) -> list[tuple[str, int, int]] | None:
    """(normalised word, start, end in ``text``) for each word of normalise(text); None in the
    rare case where normalising the whole text splits words differently than word by word."""
    out = [(w, m.start(), m.end()) for m in _WORD.finditer(text)
           for w in normalise(m.group())]
    if [w for w, _, _ in out] != normalise(text):
        return None
    return out


def cut(text: str, spans: Sequence[tuple[int, int]]) -> str | None:
    """``text`` without the words of ``spans`` (ranges of normalise(text)), nor the punctuation
    and spaces that follow each up to the next word. None when the words cannot be located
    (the caller then drops the document)."""
    offsets = word_offsets(text)
    if offsets is None:
        return None
    pieces, pos = [], 0
    for first, end in spans:
        start = offsets[first][1]
        stop = _AFTER_SPAN.match(text, offsets[end - 1][2]).end()
        pieces.append(text[pos:start])
        pos = max(pos, stop)
    pieces.append(text[pos:])
    return ''.join(pieces).strip()


@dataclasses.dataclass
class Counts:
    """What decontamination did to one source (summed over chunks)."""
    documents_removed: int = 0       # dropped ('drop'), or left under clean.min_chars ('cut')
    documents_cut: int = 0           # kept with spans cut out ('cut')
    spans_cut: int = 0
    words_cut: int = 0
    hits: list = dataclasses.field(default_factory=list)  # (document id, file, line, bench, item)

    def add(self, other: 'Counts') -> None:
        for f in dataclasses.fields(self):
            if f.name != 'hits':
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        self.hits.extend(other.hits)

    def totals(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != 'hits'}


def filter_documents(texts: Sequence[str], docs: Sequence[Any], index: Index, mode: str,
                     min_chars: int, counts: Counts) -> list[str | None]:
    """Each document's text after decontamination (None = dropped); hits go to ``counts``.
    ``docs`` are the sources.Document each text came from (id, file, line)."""
    out: list[str | None] = list(texts)
    for i, found in enumerate(match(texts, index)):
        if found is None:
            continue
        doc = docs[i]
        counts.hits.extend((doc.doc_id, doc.path, doc.line, *index.items[item])
                           for item in found.items)
        text = cut(texts[i], found.spans) if mode == 'cut' else None
        if text is None or len(text) < min_chars:
            counts.documents_removed += 1
            out[i] = None
        else:
            counts.documents_cut += 1
            counts.spans_cut += len(found.spans)
            counts.words_cut += sum(end - start for start, end in found.spans)
            out[i] = text
    return out
