"""Cleaning and duplicate keys for one document (pure functions; the workers call these).

The steps, each switchable under ``data.clean``: unicode NFKC normalisation and whitespace
tidying, dropping URLs, dropping reference / bibliography sections (MEDITRON dropped reference
lists), prepending the title (as MEDITRON did) and a minimum length. Duplicates are found on a
normalised form (case-folded words), so copies that differ only in case, spacing or punctuation
count as exact duplicates; near duplicates use MinHash signatures over word 5-grams.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata
from collections.abc import Mapping
from typing import Any

import numpy as np

MINHASH_PERMUTATIONS = 128
MINHASH_SEED = 1
MINHASH_SCHEME = 'affine32'   # datasketch 2's default, named: LeanMinHash needs it
SHINGLE_WORDS = 5

_URL = re.compile(r'(?:\b(?:https?|ftp)://|\bwww\.)[^\s<>"]*[^\s<>".,;:!?)\]\'}]', re.IGNORECASE)
_REFERENCES = re.compile(
    r'^[ \t]*(?:#+[ \t]*)?(?:references?|bibliography|works cited|literature cited|'
    r'reference list|cited literature)[ \t]*:?[ \t]*$', re.IGNORECASE | re.MULTILINE)
_NEXT_HEADER = re.compile(r'^[ \t]*#', re.MULTILINE)
_SPACES = re.compile(r'[^\S\n]+')
_BLANK_LINES = re.compile(r'\n{3,}')
_CONTROL = re.compile(r'[\x00-\x08\x0b-\x1f\x7f]')
_WORDS = re.compile(r'\w+')
_WHITESPACE = re.compile(r'\s')
# Lone UTF-16 surrogates: JSON can spell them ("\\ud800") but no UTF-8 text holds them, so the
# tokenizer (and any UTF-8 writer) rejects them. A valid pair is decoded by json into one
# character, so only unpaired ones remain here.
_SURROGATES = re.compile('[\ud800-\udfff]')


@dataclasses.dataclass(frozen=True)
class CleanOptions:
    normalize: bool = True
    drop_urls: bool = True
    drop_references: bool = True
    prepend_title: bool = True
    min_chars: int = 200

    @classmethod
    def from_config(cls, clean_cfg: Mapping[str, Any]) -> 'CleanOptions':
        return cls(**{f.name: clean_cfg[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class CleanStats:
    """What the cleaning removed, summed over documents."""
    too_short: int = 0             # documents dropped (under min_chars after cleaning)
    urls_removed: int = 0
    reference_sections_removed: int = 0
    surrogates_removed: int = 0    # lone surrogate code points (invalid in UTF-8) dropped

    def add(self, other: 'CleanStats') -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def normalize(text: str) -> str:
    """NFKC, unix newlines, no control characters, single spaces, at most one blank line."""
    text = unicodedata.normalize('NFKC', text).replace('\r\n', '\n').replace('\r', '\n')
    text = _CONTROL.sub(' ', text)
    text = '\n'.join(line.strip() for line in _SPACES.sub(' ', text).split('\n'))
    return _BLANK_LINES.sub('\n\n', text).strip()


def drop_references(text: str) -> tuple[str, int]:
    """Removes each references section: its heading up to the next '#' heading or the end."""
    removed = 0
    while (match := _REFERENCES.search(text)) is not None:
        end = _NEXT_HEADER.search(text, match.end())
        text = text[:match.start()] + (text[end.start():] if end else '')
        removed += 1
    return text, removed


def drop_urls(text: str) -> tuple[str, int]:
    return _URL.subn('', text)


def clean(text: str, title: str, options: CleanOptions, stats: CleanStats) -> str | None:
    """The cleaned text, or None when the document is dropped (counted in ``stats``)."""
    text, n = _SURROGATES.subn('', text)
    title, m = _SURROGATES.subn('', title)
    stats.surrogates_removed += n + m
    if options.normalize:
        text = unicodedata.normalize('NFKC', text)
        title = unicodedata.normalize('NFKC', title)
    if options.drop_references:
        text, n = drop_references(text)
        stats.reference_sections_removed += n
    if options.drop_urls:
        text, n = drop_urls(text)
        stats.urls_removed += n
    title = title.strip()
    if options.prepend_title and title and not text.lstrip().startswith(title):
        text = f'{title}\n\n{text}'
    if options.normalize:
        text = normalize(text)
    if not text.strip() or len(text) < options.min_chars:
        stats.too_short += 1
        return None
    return text


def dedup_words(text: str) -> list[str]:
    return _WORDS.findall(text.casefold())


def digest(words: list[str]) -> bytes:
    """16-byte hash of the normalised words: the exact-duplicate key and the split key."""
    return hashlib.blake2b(' '.join(words).encode('utf-8'), digest_size=16).digest()


def text_digest(text: str, segment_chars: int = 1 << 20) -> bytes:
    """``digest(dedup_words(text))`` without the list of every word of a huge document (about
    60 bytes a word): the words of one segment at a time, each cut at a whitespace character,
    which no word spans (case folding maps each character on its own)."""
    hasher = hashlib.blake2b(digest_size=16)
    start, separator = 0, ''
    while start < len(text):
        cut = _WHITESPACE.search(text, start + segment_chars)
        end = cut.start() if cut else len(text)
        words = _WORDS.findall(text[start:end].casefold())
        if words:
            hasher.update((separator + ' '.join(words)).encode('utf-8'))
            separator = ' '
        start = end
    return hasher.digest()


def validation_draw(key: bytes) -> float:
    """A number in [0, 1) fixed by the document alone: it is held out when below val_fraction."""
    return int.from_bytes(key[8:16], 'little') / 2.0 ** 64


def minhash_signature(words: list[str]) -> np.ndarray:
    """MinHash (datasketch) hash values over word 5-grams (the words themselves if fewer)."""
    from datasketch import MinHash  # imported here: only the 'minhash' mode needs it
    n = SHINGLE_WORDS
    shingles = ([' '.join(words[i:i + n]) for i in range(len(words) - n + 1)]
                if len(words) >= n else [' '.join(words)])
    m = MinHash(num_perm=MINHASH_PERMUTATIONS, seed=MINHASH_SEED, scheme=MINHASH_SCHEME)
    m.update_batch([s.encode('utf-8') for s in shingles])
    return m.hashvalues


class NearDuplicateIndex:
    """MinHash LSH over the documents kept so far (datasketch), in input order."""

    def __init__(self, threshold: float):
        from datasketch import MinHashLSH
        self._lsh = MinHashLSH(threshold=threshold, num_perm=MINHASH_PERMUTATIONS)
        self._count = 0

    def seen_or_add(self, hashvalues: np.ndarray) -> bool:
        """True when a kept document is a near duplicate; otherwise keeps this one."""
        from datasketch import LeanMinHash
        m = LeanMinHash(seed=MINHASH_SEED, hashvalues=hashvalues, scheme=MINHASH_SCHEME)
        if self._lsh.query(m):
            return True
        self._lsh.insert(self._count, m, check_duplication=False)
        self._count += 1
        return False
