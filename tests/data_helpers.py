"""Helpers shared by tests/test_data_*.py: tiny corpora and the shipped corpus, prepared once."""

from __future__ import annotations

import atexit
import functools
import json
import os
import random
import shutil
import tempfile

import numpy as np

from configs import base, debug
from meditron_jax.data import prepare, shards, tokenizer

WORDS = ('patient dose trial renal cardiac infection therapy outcome cohort risk blood '
         'pressure insulin fever cough review guideline adult child week daily oral '
         'score sample median ratio follow evidence treatment clinic nurse acute').split()


def doc_text(seed: int, sentences: int = 6) -> str:
    """A distinct, deterministic pseudo-medical paragraph (about 60 chars per sentence)."""
    rng = random.Random(seed)
    return ' '.join(' '.join(rng.choice(WORDS) for _ in range(8)).capitalize() + f' {seed}.'
                    for _ in range(sentences))


def write_jsonl(path: str, records: list) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + '\n')
    return path


def data_config(sources: list[dict], **overrides):
    """The base data config with these sources and the shipped corpus's tokenizer."""
    cfg = base.get_config().data
    cfg.sources = sources
    cfg.tokenizer = debug_tokenizer()
    cfg.clean.min_chars = 50
    cfg.prepare_workers = 1
    cfg.seq_len = 64
    cfg.global_batch_size = 4
    for key, value in overrides.items():
        target = cfg
        *path, last = key.split('.')
        for p in path:
            target = target[p]
        target[last] = value
    return cfg


@functools.lru_cache(maxsize=None)
def prepared_debug() -> str:
    """configs/debug.py's data, prepared once per test process (one worker)."""
    root = tempfile.mkdtemp(prefix='meditron-data-test-')
    atexit.register(shutil.rmtree, root, True)
    cfg = debug_data_config()
    prepare.prepare(cfg, os.path.join(root, 'data'))
    return os.path.join(root, 'data')


def debug_data_config():
    cfg = debug.get_config().data
    cfg.prepare_workers = 1
    return cfg


def debug_tokenizer() -> str:
    return os.path.join(prepared_debug(), tokenizer.FILENAME)


def records(data_dir: str, source: str, split: str) -> list[np.ndarray]:
    """All token arrays of one (source, split), in stored order."""
    manifest = shards.read_manifest(data_dir)
    dtype = np.dtype(manifest['dtype']).newbyteorder('<')
    out = []
    for path in shards.split_paths(data_dir, manifest, source, split):
        out.extend(np.frombuffer(r, dtype).astype(np.int32) for r in shards.read_records(path))
    return out


def all_files(root: str) -> dict[str, bytes]:
    """Relative path -> bytes of every file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, root)] = f.read()
    return out
