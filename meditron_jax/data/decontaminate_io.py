"""Decontamination in meditron-prepare: config checks, the index file the workers share,
``decontamination.jsonl`` and the manifest's ``decontamination`` section (the matching itself is
in decontaminate.py).

    data.decontaminate = [dict(benchmark='medqa', data='/data/medqa/test.jsonl'),
                          dict(benchmark='pubmedqa', data='/data/pubmedqa')]   # meditron-eval's

The benchmark files are pinned in the prepare options by sha256, so changing one (or the n-gram
size or the mode) is an option change, and all slices of a --shard job must have read the same
files for --merge to accept them.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from meditron_jax.data import decontaminate as decontam_lib
from meditron_jax.data.sources import DataError

HITS_FILE = 'decontamination.jsonl'
INDEX_FILE = 'decontamination-index.npz'     # in prepare's temp dir, never in the output
SINGLE_FILE = ('medqa', 'medqa4', 'medmcqa')


def _loaders():
    # meditron-eval's loaders (the benchmark names and file layouts it reads), imported only
    # when decontamination is asked for: plain preparation does not need the evaluate package.
    try:
        from meditron_jax.evaluate import loaders
    except ImportError as e:
        raise DataError(f'data.decontaminate needs meditron-eval\'s loaders '
                        f'(meditron_jax.evaluate): {e}') from None
    return loaders


def benchmark_files(benchmark: str, path: str) -> list[str]:
    """The files the meditron-eval loader reads for ``benchmark`` at ``path`` (test split)."""
    if benchmark in SINGLE_FILE:
        return [path]
    if benchmark == 'pubmedqa':
        return [os.path.join(path, 'ori_pqal.json'), os.path.join(path, 'test_ground_truth.json')]
    subjects = _loaders().MMLU_MEDICAL_SUBJECTS
    return [p for p in (os.path.join(path, 'test', f'{s}_test.csv') for s in subjects)
            if os.path.isfile(p)]


def options(data_cfg) -> dict[str, Any] | None:
    """The decontamination options as they go into prepare's options; None when off."""
    n, mode, entries = data_cfg.decontaminate_ngram, data_cfg.decontaminate_mode, \
        data_cfg.decontaminate
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f'data.decontaminate_ngram={n!r}: expected a number of words >= 1 '
                        f'(13 is the GPT-3 / PaLM choice)')
    if mode not in decontam_lib.MODES:
        raise DataError(f'data.decontaminate_mode={mode!r}: expected one of '
                        f'{decontam_lib.MODES}')
    if not entries:
        return None
    names = _loaders().BENCHMARKS
    benchmarks, seen = [], set()
    for i, entry in enumerate(entries):
        where = f'data.decontaminate[{i}]'
        try:
            keys = set(entry.keys())
        except AttributeError:
            raise DataError(f'{where}: expected dict(benchmark=NAME, data=PATH), got '
                            f'{type(entry).__name__}') from None
        if keys != {'benchmark', 'data'}:
            raise DataError(f'{where}: keys {sorted(keys)}; expected exactly '
                            f"['benchmark', 'data']")
        name, path = entry['benchmark'], entry['data']
        if name not in names:
            raise DataError(f'{where}.benchmark={name!r}: expected one of {names}')
        if name in seen:
            raise DataError(f'{where}.benchmark={name!r}: listed twice')
        seen.add(name)
        path = os.path.abspath(os.path.expanduser(str(path)))
        want_dir = name not in SINGLE_FILE
        if not (os.path.isdir(path) if want_dir else os.path.isfile(path)):
            raise DataError(f'{where}.data={entry["data"]!r}: no such '
                            f'{"directory" if want_dir else "file"} (expected the {name} '
                            f'{"directory" if want_dir else "file"} meditron-eval reads)')
        digest = hashlib.sha256()
        for file in benchmark_files(name, path):
            if not os.path.isfile(file):
                raise DataError(f'{where}: {file}: no such file (the {name} layout '
                                f'meditron-eval reads)')
            digest.update(os.path.relpath(file, path).encode() + b'\0')
            with open(file, 'rb') as f:
                digest.update(hashlib.sha256(f.read()).digest())
        benchmarks.append(dict(benchmark=name, data=path, sha256=digest.hexdigest()))
    return dict(ngram=int(n), mode=mode, benchmarks=benchmarks)


def build(opts: dict[str, Any]) -> decontam_lib.Index:
    """Reads every benchmark (meditron-eval's loaders, test split) into one index."""
    loaders = _loaders()
    benchmarks = []
    for i, entry in enumerate(opts['benchmarks']):
        try:
            items = loaders.load(entry['benchmark'], entry['data'])
        except loaders.EvalInputError as e:
            raise DataError(f'data.decontaminate[{i}] ({entry["benchmark"]}): {e}') from None
        benchmarks.append((entry['benchmark'], items))
    return decontam_lib.build_index(benchmarks, opts['ngram'])


def save_index(index: decontam_lib.Index, mode: str, path) -> None:
    """The index as one npz (``path``: a file name or a binary file), read by load_index."""
    words = list(index.vocab)
    arrays = dict(ngram=np.int64(index.ngram), mode=np.str_(mode),
                  vocab_words=np.frombuffer('\n'.join(words).encode('utf-8'), np.uint8),
                  vocab_hashes=np.array([index.vocab[w] for w in words], np.uint64),
                  item_benchmarks=np.array([b for b, _ in index.items], dtype=np.str_),
                  item_ids=np.array([i for _, i in index.items], dtype=np.str_))
    for length in index.keys:
        arrays[f'keys_{length}'] = index.keys[length]
        arrays[f'owners_{length}'] = index.owners[length]
    np.savez(path, **arrays)


def load_index(path: str) -> tuple[decontam_lib.Index, str]:
    """(index, mode) as save_index wrote them (the workers' copy)."""
    with np.load(path, allow_pickle=False) as z:
        text = z['vocab_words'].tobytes().decode('utf-8')
        words = text.split('\n') if text else []
        lengths = sorted(int(k[len('keys_'):]) for k in z.files if k.startswith('keys_'))
        index = decontam_lib.Index(
            int(z['ngram']), dict(zip(words, z['vocab_hashes'].tolist())),
            {n: z[f'keys_{n}'] for n in lengths}, {n: z[f'owners_{n}'] for n in lengths},
            list(zip(z['item_benchmarks'].tolist(), z['item_ids'].tolist())))
        return index, str(z['mode'])


def write_index(data_cfg, tmp: str) -> str | None:
    """Builds the index into ``tmp`` for the workers (or takes it from the cache, see
    cache_dir); None when decontamination is off."""
    opts = options(data_cfg)
    if opts is None:
        return None
    path = os.path.join(tmp, INDEX_FILE)
    directory = cache_dir(data_cfg)
    key = cache_key(opts)
    index = read_cached(directory, key) if directory else None
    if index is not None:
        print(f'decontamination: index from the cache ({directory}, key {key[:16]})',
              file=sys.stderr)
    else:
        index = build(opts)
        stored = write_cached(index, directory, key) if directory else None
        print(f'decontamination: index built ({len(index.items)} items)' +
              (f', cached as {stored}' if stored else ''), file=sys.stderr)
    save_index(index, opts['mode'], path)
    return path


# ----------------------------------------------------------------------------- index cache

CACHE_FORMAT = 1    # bump when normalisation, hashing or the index file's layout change


def cache_dir(data_cfg) -> str:
    """Where built indexes are kept ('' = nowhere): data.decontaminate_cache, 'auto' being
    $XDG_CACHE_HOME (or ~/.cache) /meditron_jax/decontaminate."""
    where = str(data_cfg.get('decontaminate_cache', 'auto') or '')
    if where == 'auto':
        root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
        where = os.path.join(root, 'meditron_jax', 'decontaminate')
    return os.path.abspath(os.path.expanduser(where)) if where else ''


def cache_key(opts: dict[str, Any]) -> str:
    """What the index depends on: the format, the n-gram size and each benchmark's name and
    files (by sha256; not their path, nor the mode, which only the matching uses)."""
    pinned = dict(format=CACHE_FORMAT, ngram=opts['ngram'],
                  benchmarks=[(b['benchmark'], b['sha256']) for b in opts['benchmarks']])
    return hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_cached(directory: str, key: str) -> decontam_lib.Index | None:
    """The cached index for ``key``, or None. Files are named <key>.<sha256 of the file>.npz;
    one whose bytes do not hash to its name (or that does not load) is reported and skipped."""
    try:
        names = sorted(n for n in os.listdir(directory)
                       if n.startswith(key + '.') and n.endswith('.npz'))
    except OSError:
        return None
    for name in names:
        path = os.path.join(directory, name)
        try:
            if _file_sha256(path) != name[len(key) + 1:-len('.npz')]:
                raise ValueError('its contents do not match the sha256 in its name')
            index, _ = load_index(path)
            if index.ngram <= 0:
                raise ValueError(f'n-gram size {index.ngram}')
            return index
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            print(f'warning: decontamination cache {path}: unreadable ({e}); removing it and '
                  f'rebuilding the index', file=sys.stderr)
            try:    # only whole files are renamed into place, so this one is damaged
                os.remove(path)
            except OSError:
                pass
    return None


def write_cached(index: decontam_lib.Index, directory: str, key: str) -> str | None:
    """Stores ``index`` under ``key`` (temp file, then rename: concurrent writers each leave a
    whole file); the path, or None with a warning when the directory is not writable."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{key}.', suffix='.npz')
        try:
            with os.fdopen(fd, 'wb') as f:
                save_index(index, '', f)
            path = os.path.join(directory, f'{key}.{_file_sha256(tmp)}.npz')
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path
    except OSError as e:
        print(f'warning: decontamination cache {directory}: not writable ({e}); continuing '
              f'without it', file=sys.stderr)
        return None


# ----------------------------------------------------------------------------- results


def _write_hits(path: str, records: Sequence[dict]) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        for r in records:
            f.write(json.dumps(r) + '\n')


def _section(opts, items_per_benchmark: dict[str, int], per_source: dict[str, dict],
             records: Sequence[dict]) -> dict[str, Any]:
    found: dict[str, set] = {name: set() for name in items_per_benchmark}
    for r in records:
        found[r['benchmark']].add(r['item_id'])
    return dict(options=opts, hits_file=HITS_FILE, hits=len(records), sources=per_source,
                benchmarks={name: dict(items=total, items_found=len(found[name]),
                                       contamination_rate=round(len(found[name]) / total, 6)
                                       if total else 0.0)
                            for name, total in items_per_benchmark.items()})


def finish(data_cfg, sources, counts, index_path: str, tmp: str) -> dict[str, Any]:
    """Writes tmp/decontamination.jsonl (input order); returns the manifest section.
    ``counts`` are scan's per-source counts (``.decontam``: a decontaminate.Counts)."""
    with np.load(index_path, allow_pickle=False) as z:     # the item list only
        items_per_benchmark = dict(collections.Counter(z['item_benchmarks'].tolist()))
    records = [dict(source=s.name, document_id=doc_id, file=path, line=line,
                    benchmark=benchmark, item_id=item_id)
               for s, c in zip(sources, counts)
               for doc_id, path, line, benchmark, item_id in c.decontam.hits]
    _write_hits(os.path.join(tmp, HITS_FILE), records)
    return _section(options(data_cfg), items_per_benchmark,
                    {s.name: c.decontam.totals() for s, c in zip(sources, counts)}, records)


def merge(data_cfg, sources, dirs: Sequence[str], slices: Sequence[dict], tmp: str
          ) -> dict[str, Any] | None:
    """The slices' hits in input order (as one run writes them) and summed counts."""
    if not slices[0].get('decontamination'):
        return None
    order = {s.name: i for i, s in enumerate(sources)}
    records = []
    for d in dirs:
        with open(os.path.join(d, HITS_FILE), encoding='utf-8') as f:
            records.extend(json.loads(line) for line in f)
    records.sort(key=lambda r: (order[r['source']], r['file'], r['line']))   # stable
    per_source = {}
    for s in sources:
        per_source[s.name] = {}
        for m in slices:
            for key, value in m['decontamination']['sources'][s.name].items():
                per_source[s.name][key] = per_source[s.name].get(key, 0) + value
    _write_hits(os.path.join(tmp, HITS_FILE), records)
    items = {name: b['items'] for name, b in slices[0]['decontamination']['benchmarks'].items()}
    return _section(options(data_cfg), items, per_source, records)


def summary_lines(manifest: dict) -> list[str]:
    """One line for prepare's summary table (none when decontamination was off)."""
    section = manifest.get('decontamination')
    if not section:
        return []
    opts = section['options']
    removed = sum(s['documents_removed'] for s in section['sources'].values())
    cut = sum(s['documents_cut'] for s in section['sources'].values())
    found = ', '.join(f'{name} {b["items_found"]}/{b["items"]}'
                      for name, b in section['benchmarks'].items())
    return [f'decontamination ({opts["ngram"]}-grams, {opts["mode"]}): {removed} documents '
            f'removed, {cut} cut; benchmark items found: {found} (see {HITS_FILE})']
