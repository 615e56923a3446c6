"""Data-path throughput on one CPU core: meditron-prepare and the grain loader, in tokens/s.

    python benchmarks/bench_data.py                 # ~1 min; prints a table for BENCHMARKS.md
    python benchmarks/bench_data.py --scale 20 --batches 300

Corpus: the shipped corpus's generator (scripts/make_corpus.py) run ``--scale`` times with other
seeds, so documents are distinct (dedup keeps them) and have the shipped corpus's lengths
(~150-700 tokens: short documents are the loader's worst case, since its cost is per document).
Prepare: clean + exact dedup + split + tokenize + write, one worker process, with the tokenizer
trained first (its training time is reported apart). Loader: prepared shards -> per-source
shuffle -> token-share mixture -> concat-then-split packing -> batches, in one process pinned to
one core, after a warm-up, at the debug shape and at MEDITRON-7B's row length.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import base  # noqa: E402
from meditron_jax.data import loader, prepare, tokenizer  # noqa: E402


def _corpus_generator():
    spec = importlib.util.spec_from_file_location('make_corpus',
                                                  os.path.join(REPO, 'scripts', 'make_corpus.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_corpus(root: str, scale: int) -> list[dict]:
    gen = _corpus_generator()
    counts = dict(guidelines=(gen.guideline, 150), abstracts=(gen.abstract, 330),
                  replay=(gen.replay, 110))
    sources = []
    for name, (make, n) in counts.items():
        os.makedirs(os.path.join(root, name))
        for part in range(scale):
            rng = random.Random(f'{name}-{part}')
            with open(os.path.join(root, name, f'part-{part:03d}.jsonl'), 'w') as f:
                for i in range(n):
                    doc = make(rng, part * n + i)
                    f.write(json.dumps(doc) + '\n')
        sources.append(base.source(name, os.path.join(root, name, '*.jsonl'),
                                   dict(guidelines=0.3, abstracts=0.6, replay=0.1)[name], 0.05))
    return sources


def bench_prepare(root: str, sources: list[dict]) -> tuple[dict, str]:
    cfg = base.get_config().data
    cfg.sources = sources
    cfg.clean.min_chars = 100
    cfg.prepare_workers = 1
    cfg.tokenizer_vocab_size = 2048
    start = time.perf_counter()
    model = prepare.prepare(cfg, os.path.join(root, 'trained'))
    trained_s = time.perf_counter() - start
    cfg.tokenizer = os.path.join(root, 'trained', tokenizer.FILENAME)
    start, cpu_start = time.perf_counter(), time.process_time()
    manifest = prepare.prepare(cfg, os.path.join(root, 'data'))
    given_s, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(manifest['totals'][s]['tokens'] for s in manifest['totals'])
    docs = sum(s['documents_in'] for s in manifest['sources'].values())
    del model
    return dict(tokens=tokens, documents=docs, seconds_with_training=trained_s,
                seconds=given_s, tokens_per_sec=tokens / given_s,
                tokens_per_cpu_sec=tokens / cpu), cfg.tokenizer


def bench_loader(data_dir: str, sources, tokenizer_path: str, seq_len: int, batch: int,
                 batches: int) -> dict:
    cfg = base.get_config().data
    cfg.sources = sources
    cfg.tokenizer = tokenizer_path
    cfg.seq_len, cfg.global_batch_size = seq_len, batch
    it = loader.make_train_iterator(cfg, data_dir, seed=0, process_index=0, process_count=1)
    for _ in range(max(5, batches // 10)):
        next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    tokens = 0
    for _ in range(batches):
        tokens += next(it)['tokens'].size
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return dict(seq_len=seq_len, batch=batch, batches=batches, tokens=tokens, seconds=seconds,
                tokens_per_sec=tokens / seconds, tokens_per_cpu_sec=tokens / cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--scale', type=int, default=10, help='copies of the corpus generator')
    parser.add_argument('--batches', type=int, default=200)
    args = parser.parse_args()
    if hasattr(os, 'sched_setaffinity'):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})   # one core
    with tempfile.TemporaryDirectory() as root:
        sources = write_corpus(os.path.join(root, 'raw'), args.scale)
        prep, tok = bench_prepare(root, sources)
        rows = [bench_loader(os.path.join(root, 'data'), sources, tok, seq_len, batch,
                             args.batches) for seq_len, batch in ((256, 8), (2048, 16))]
    print(f'prepare (1 core): {prep["documents"]} documents, {prep["tokens"]} tokens in '
          f'{prep["seconds"]:.1f} s = {prep["tokens_per_sec"]:,.0f} tokens/s '
          f'({prep["tokens_per_cpu_sec"]:,.0f} per CPU-second) '
          f'(with tokenizer training: {prep["seconds_with_training"]:.1f} s)')
    for r in rows:
        print(f'loader (1 core): seq_len {r["seq_len"]}, batch {r["batch"]}: {r["batches"]} '
              f'batches, {r["tokens"]} tokens in {r["seconds"]:.2f} s = '
              f'{r["tokens_per_sec"]:,.0f} tokens/s ({r["tokens_per_cpu_sec"]:,.0f} per CPU-second; '
              f'the two differ when other processes share the core)')


if __name__ == '__main__':
    main()
