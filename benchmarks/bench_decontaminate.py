"""meditron-prepare with and without benchmark decontamination, side by side, in tokens/s.

    python benchmarks/bench_decontaminate.py            # ~2 min; prints a table for BENCHMARKS.md
    python benchmarks/bench_decontaminate.py --scale 10 --rounds 3

Corpus: the shipped corpus's generator at ``--scale`` copies with other seeds (bench_data.py's
corpus: distinct documents, so dedup keeps them), plus planted copies of a few benchmark items.
Benchmarks: a generated stand-in of 10,000 items in the published file formats: the published
test sizes (MedQA and MedQA-4 1,273 each, MedMCQA 4,183, MMLU medical 1,871) and PubMedQA's
1,000 labelled items make 9,600, and MedQA and MedQA-4 get 200 more MedQA-like items each (1,473
each), with realistic lengths (MedQA-like questions ~120 words + 5 options,
MedMCQA/MMLU ~25 words + 4 options, PubMedQA abstracts ~250 words). Their words are drawn from
the corpus's own words (so nearly every corpus n-gram is a candidate that must be looked up: the
costly case for the matcher). The three configurations (without decontamination; with it and no
index cache, so the run reads and hashes the benchmarks; with it and the index taken from
data.decontaminate_cache, filled by one run before the timed rounds) run one worker pinned to
one core, alternated round by round so that all see the same machine load.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import base  # noqa: E402
from meditron_jax.data import decontaminate_io, prepare, tokenizer  # noqa: E402

PUBLISHED = dict(medqa=1273, medqa4=1273, medmcqa=4183, pubmedqa=1000, mmlu_medical=1871)
EXTRA_MEDQA = 200     # more MedQA-like items in each of medqa and medqa4: 10,000 items in all
PLANTED = 20          # items of each of medqa and pubmedqa copied into corpus documents


def _bench_data():
    spec = importlib.util.spec_from_file_location(
        'bench_data', os.path.join(REPO, 'benchmarks', 'bench_data.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _words(rng: random.Random, pool: list[str], count: int) -> str:
    start = rng.randrange(len(pool))
    words = [rng.choice(pool) for _ in range(count)]          # corpus word frequencies
    words[0] = pool[start].capitalize()
    return ' '.join(words)


def write_benchmarks(root: str, pool: list[str], seed: int = 0) -> list[dict]:
    """The stand-in benchmark files; returns data.decontaminate."""
    rng = random.Random(seed)
    out = []

    def medqa(name, n_options):
        path = os.path.join(root, name, 'test.jsonl')
        os.makedirs(os.path.dirname(path))
        with open(path, 'w') as f:
            for i in range(PUBLISHED[name] + EXTRA_MEDQA):
                options = {k: _words(rng, pool, rng.randint(1, 5)) for k in 'ABCDE'[:n_options]}
                f.write(json.dumps(dict(question=_words(rng, pool, rng.randint(80, 160)) + '?',
                                        options=options, answer=options['A'],
                                        answer_idx='A', id=f'{name}-{i}')) + '\n')
        out.append(dict(benchmark=name, data=path))

    medqa('medqa', 5)
    medqa('medqa4', 4)
    path = os.path.join(root, 'medmcqa', 'dev.json')
    os.makedirs(os.path.dirname(path))
    with open(path, 'w') as f:
        for i in range(PUBLISHED['medmcqa']):
            f.write(json.dumps(dict(id=f'mcqa-{i}', question=_words(rng, pool, rng.randint(8, 40)),
                                    opa=_words(rng, pool, 2), opb=_words(rng, pool, 2),
                                    opc=_words(rng, pool, 3), opd=_words(rng, pool, 1),
                                    cop=1 + i % 4, exp='', subject_name='Medicine')) + '\n')
    out.append(dict(benchmark='medmcqa', data=path))
    pqa = os.path.join(root, 'pubmedqa')
    os.makedirs(pqa)
    entries = {str(30000000 + i): dict(
        QUESTION=_words(rng, pool, rng.randint(10, 20)) + '?',
        CONTEXTS=[_words(rng, pool, rng.randint(50, 80)) + '.' for _ in range(4)],
        final_decision='yes', LONG_ANSWER='') for i in range(PUBLISHED['pubmedqa'])}
    with open(os.path.join(pqa, 'ori_pqal.json'), 'w') as f:
        json.dump(entries, f)
    with open(os.path.join(pqa, 'test_ground_truth.json'), 'w') as f:
        json.dump({k: 'yes' for k in entries}, f)
    out.append(dict(benchmark='pubmedqa', data=pqa))
    mmlu = os.path.join(root, 'mmlu')
    os.makedirs(os.path.join(mmlu, 'test'))
    subjects = ('anatomy', 'clinical_knowledge', 'college_medicine', 'professional_medicine')
    for s, subject in enumerate(subjects):
        with open(os.path.join(mmlu, 'test', f'{subject}_test.csv'), 'w', newline='') as f:
            w = csv.writer(f)
            for _ in range(PUBLISHED['mmlu_medical'] // len(subjects) + (s < 3)):
                w.writerow([_words(rng, pool, rng.randint(8, 60))] +
                           [_words(rng, pool, rng.randint(1, 4)) for _ in range(4)] + ['A'])
    out.append(dict(benchmark='mmlu_medical', data=mmlu))
    return out


def plant(corpus_root: str, benchmarks: list[dict]) -> None:
    """A file per source of documents holding copies of benchmark items (the hit path)."""
    from meditron_jax.evaluate import loaders
    medqa = loaders.load('medqa', benchmarks[0]['data'])[:PLANTED]
    pubmedqa = loaders.load('pubmedqa', benchmarks[3]['data'])[:PLANTED]
    with open(os.path.join(corpus_root, 'guidelines', 'planted.jsonl'), 'w') as f:
        for i, item in enumerate(medqa):
            f.write(json.dumps(dict(id=f'planted-{i}', text=f'Practice question {i}. '
                                    f'{item.question.upper()} Discussion follows.')) + '\n')
    with open(os.path.join(corpus_root, 'abstracts', 'planted.jsonl'), 'w') as f:
        for i, item in enumerate(pubmedqa):
            f.write(json.dumps(dict(id=f'pmid-{i}', title=item.question,
                                    text=item.context)) + '\n')


def corpus_words(corpus_root: str) -> list[str]:
    words = []
    for dirpath, _, names in os.walk(corpus_root):
        for name in sorted(names):
            with open(os.path.join(dirpath, name)) as f:
                for line in f:
                    words.extend(json.loads(line)['text'].split())
    return words


def timed_prepare(cfg, out: str) -> dict:
    start, cpu_start = time.perf_counter(), time.process_time()
    manifest = prepare.prepare(cfg, out)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(manifest['totals'][s]['tokens'] for s in manifest['totals'])
    return dict(manifest=manifest, seconds=seconds, cpu=cpu, tokens=tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--scale', type=int, default=10, help='copies of the corpus generator')
    parser.add_argument('--rounds', type=int, default=3, help='timed runs of each configuration')
    args = parser.parse_args()
    if hasattr(os, 'sched_setaffinity'):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})   # one core
    with tempfile.TemporaryDirectory() as root:
        sources = _bench_data().write_corpus(os.path.join(root, 'raw'), args.scale)
        pool = corpus_words(os.path.join(root, 'raw'))
        benchmarks = write_benchmarks(os.path.join(root, 'bench'), pool)
        plant(os.path.join(root, 'raw'), benchmarks)
        cfg = base.get_config().data
        cfg.sources = sources
        cfg.clean.min_chars = 100
        cfg.prepare_workers = 1
        cfg.tokenizer_vocab_size = 2048
        prepare.prepare(cfg, os.path.join(root, 'trained'))
        cfg.tokenizer = os.path.join(root, 'trained', tokenizer.FILENAME)

        start, cpu_start = time.perf_counter(), time.process_time()
        opts = dict(decontaminate_io.options(_with(cfg, benchmarks, '')))
        index = decontaminate_io.build(opts)
        build_s, build_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        ngrams = sum(len(k) for k in index.keys.values())

        cold = _with(cfg, benchmarks, cache='')                 # reads and hashes every run
        warm = _with(cfg, benchmarks, cache=os.path.join(root, 'cache'))
        prepare.prepare(warm, os.path.join(root, 'fill-cache'))  # the cache's first (cold) run
        configs = {'off': cfg, 'cold': cold, 'warm': warm}
        runs = {name: [] for name in configs}
        for r in range(args.rounds):
            for name, run_cfg in configs.items():
                runs[name].append(timed_prepare(run_cfg, os.path.join(root, f'{name}-{r}')))
    off = runs['off']
    tokens_off, tokens_on = off[0]['tokens'], runs['cold'][0]['tokens']
    section = runs['cold'][0]['manifest']['decontamination']
    assert runs['warm'][0]['manifest'] == runs['cold'][0]['manifest']   # same result
    docs = sum(s['documents_in'] for s in off[0]['manifest']['sources'].values())
    print(f'corpus: {docs} documents, {tokens_off} tokens kept without decontamination, '
          f'{tokens_on} with; benchmarks: {len(index.items)} items, {ngrams} '
          f'(n-gram, item) entries, {len(index.vocab)} words; index build (read + hash the '
          f'benchmarks) {build_s:.2f} s wall, {build_cpu:.2f} CPU-s')
    print(f'hits: {section["hits"]}, documents removed: '
          f'{sum(s["documents_removed"] for s in section["sources"].values())}, items found: '
          + ', '.join(f'{k} {v["items_found"]}' for k, v in section['benchmarks'].items()))
    # All rates count the corpus's tokens (as prepared without decontamination), so that the
    # few documents decontamination removes do not make it look slower.
    print('| prepare, 1 worker, 1 core | corpus tokens/s (wall, median) | per CPU-second '
          '(median) | CPU slowdown | runs (wall s) |')
    print('|---|---:|---:|---:|---|')
    labels = dict(off='without decontamination',
                  cold='with decontamination, no cache (index built in the run)',
                  warm='with decontamination, index from the cache')
    cpu_off = statistics.median(tokens_off / r['cpu'] for r in off)
    for name, rows in runs.items():
        wall = statistics.median(tokens_off / r['seconds'] for r in rows)
        cpu = statistics.median(tokens_off / r['cpu'] for r in rows)
        slowdown = '' if name == 'off' else f'{100 * (cpu_off / cpu - 1):.1f}%'
        print(f'| {labels[name]} | {wall:,.0f} | {cpu:,.0f} | {slowdown} | '
              + ', '.join(f'{r["seconds"]:.1f}' for r in rows) + ' |')
    print('target: under 20% slower')


def _with(cfg, benchmarks, cache: str):
    out = cfg.copy_and_resolve_references()
    out.decontaminate = benchmarks
    out.decontaminate_cache = cache
    return out


if __name__ == '__main__':
    main()
