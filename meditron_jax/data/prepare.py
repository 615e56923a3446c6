"""meditron-prepare: raw text -> cleaned, deduplicated, split, tokenized ArrayRecord shards.

    meditron-prepare --config configs/debug.py --config.data.dir=/tmp/debug-data
    meditron-prepare --config CFG --shard 3/16      # one slice of the input files (SLURM array)
    meditron-prepare --config CFG --merge           # after all slices: exact dedup + manifest

Steps: read (sources.py) -> clean (clean.py) -> deduplicate -> split train/validation by a hash
of each document -> tokenize -> shards + manifest.json (shards.py). Workers parse, clean, hash and
tokenize fixed chunks of input lines; the main process takes their results in input order and
makes every decision that depends on other documents (duplicates), so the output is the same
byte for byte whatever the number of workers. Everything is written into a temp dir inside the
output dir and moved into place when complete, ``manifest.json`` last: without a manifest an
output is incomplete, and a failed run leaves none behind.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import multiprocessing
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from tqdm import tqdm

from meditron_jax.data import clean as clean_lib
from meditron_jax.data import shards as shards_lib
from meditron_jax.data import tokenizer as tokenizer_lib
from meditron_jax.data.sources import DataError, Source, parse_chunk, parse_sources, read_chunks
from meditron_jax.data.sources import resolve_files

LINES_PER_CHUNK = 256               # unit of work for one worker call
TOKENIZER_TRAIN_CHARS = 300_000_000  # text read to train a tokenizer (the first, in input order)
SLICES_DIR = 'slices'
SLICE_MANIFEST = 'slice.json'
DEDUP_MODES = ('exact', 'minhash', 'none')


# ----------------------------------------------------------------------------- options


def prepare_options(data_cfg) -> dict[str, Any]:
    """The config values that determine the prepared output (not weights, batch or workers)."""
    sources = parse_sources(data_cfg.sources)
    if data_cfg.dedup not in DEDUP_MODES:
        raise DataError(f'data.dedup={data_cfg.dedup!r}: expected one of {DEDUP_MODES}')
    if data_cfg.dedup == 'minhash' and not 0 < data_cfg.minhash_threshold < 1:
        raise DataError(f'data.minhash_threshold={data_cfg.minhash_threshold!r}: expected a '
                        f'Jaccard similarity in (0, 1)')
    if data_cfg.tokenizer:
        if not os.path.isfile(data_cfg.tokenizer):
            raise DataError(f'data.tokenizer={data_cfg.tokenizer!r}: no such file (expected a '
                            f'SentencePiece .model)')
        tokenizer = tokenizer_lib.file_sha256(data_cfg.tokenizer)
    elif data_cfg.tokenizer_vocab_size > 0:
        tokenizer = f'trained:{int(data_cfg.tokenizer_vocab_size)}'
    else:
        raise DataError('data.tokenizer is empty and data.tokenizer_vocab_size is 0: give a '
                        'SentencePiece .model or a vocabulary size to train one')
    if data_cfg.shard_max_tokens <= 0:
        raise DataError(f'data.shard_max_tokens={data_cfg.shard_max_tokens}: expected > 0')
    return dict(
        format=shards_lib.FORMAT_VERSION,
        sources=[dict(name=s.name, files=s.files, val_fraction=s.val_fraction,
                      text_key=s.text_key) for s in sources],
        clean=dataclasses.asdict(clean_lib.CleanOptions.from_config(data_cfg.clean)),
        dedup=data_cfg.dedup,
        minhash_threshold=float(data_cfg.minhash_threshold) if data_cfg.dedup == 'minhash' else None,
        tokenizer=tokenizer,
        special_tokens=list(data_cfg.special_tokens),
        token_dtype=data_cfg.token_dtype,
        shard_max_tokens=int(data_cfg.shard_max_tokens),
    )


def _check_matches(manifest: dict, options: dict, data_cfg, where: str) -> None:
    """A complete output made with other options is an error (never silently reused)."""
    old = manifest['options']
    if data_cfg.tokenizer and old['tokenizer'] != options['tokenizer']:
        raise DataError(
            f'{where}: shards were encoded with tokenizer sha256 '
            f'{manifest["tokenizer"]["source_sha256"]} ({manifest["tokenizer"]["source"]}), but '
            f'data.tokenizer={data_cfg.tokenizer!r} has sha256 {options["tokenizer"]}; re-run '
            f'meditron-prepare with --force or use another data.dir')
    diff = sorted(k for k in set(old) | set(options) if old.get(k) != options.get(k))
    if diff:
        details = '; '.join(f'{k}: prepared {old.get(k)!r}, config {options.get(k)!r}'
                            for k in diff)
        raise DataError(f'{where} was prepared with other options ({details}); re-run with '
                        f'--force (prepare(force=True)) or use another data.dir')


# ----------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(clean_options, dedup: str, text_keys: list[str], tokenizer_path: str | None,
                 dtype: str | None) -> None:
    _WORKER.update(clean=clean_options, dedup=dedup, text_keys=text_keys, dtype=dtype,
                   tokenizer=tokenizer_lib.Tokenizer(tokenizer_path) if tokenizer_path else None)


def _work(item: tuple[int, str, int, list[str]]) -> tuple[int, int, clean_lib.CleanStats, list]:
    """Parses, cleans, hashes (and tokenizes) one chunk.

    Returns (source index, characters read, cleaning counts, [(digest, payload, tokens, sig)]),
    the payload being the cleaned text, or the token ids' bytes when a tokenizer is loaded.
    """
    source_index, path, first_line, lines = item
    stats = clean_lib.CleanStats()
    kept = []
    for doc in parse_chunk(path, first_line, lines, _WORKER['text_keys'][source_index]):
        text = clean_lib.clean(doc.text, doc.title, _WORKER['clean'], stats)
        if text is not None:
            words = clean_lib.dedup_words(text)
            sig = clean_lib.minhash_signature(words) if _WORKER['dedup'] == 'minhash' else None
            kept.append([clean_lib.digest(words), text, 0, sig])
    tokenizer = _WORKER['tokenizer']
    if tokenizer is not None and kept:
        dtype = np.dtype(shards_lib.DTYPES[_WORKER['dtype']]).newbyteorder('<')
        for doc, ids in zip(kept, tokenizer.encode_batch([d[1] for d in kept])):
            doc[1] = np.asarray(ids, dtype=dtype).tobytes()
            doc[2] = len(ids)
    return source_index, sum(map(len, lines)), stats, [tuple(d) for d in kept]


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

    def removed(self) -> dict[str, int]:
        return dict(exact_duplicates=self.exact_duplicates, near_duplicates=self.near_duplicates,
                    **dataclasses.asdict(self.clean))


def _scan(sources: list[Source], files: list[list[str]], data_cfg, workers: int,
          tokenizer_path: str | None, dtype: str | None, dedup: str,
          sink: Callable[[int, str, bytes, Any, int], bool], desc: str) -> list[_SourceCounts]:
    """Runs the workers over every file in order; sink(source, split, digest, payload, tokens)
    gets each kept document and returns False to stop early."""
    counts = [_SourceCounts(files=len(f)) for f in files]
    exact_seen: set[bytes] = set()
    near = clean_lib.NearDuplicateIndex(data_cfg.minhash_threshold) if dedup == 'minhash' else None

    def items():
        for index, paths in enumerate(files):
            for path in paths:
                for first_line, lines in read_chunks(path, LINES_PER_CHUNK):
                    yield index, path, first_line, lines

    initargs = (clean_lib.CleanOptions.from_config(data_cfg.clean), dedup,
                [s.text_key for s in sources], tokenizer_path, dtype)
    total = sum(os.path.getsize(p) for paths in files for p in paths)
    results = _ordered_map(_work, items(), workers, initargs)
    with tqdm(total=total, unit='B', unit_scale=True, desc=desc, file=sys.stderr,
              disable=None) as bar:
        try:
            for index, chars, stats, docs in results:
                bar.update(chars)
                source, count = sources[index], counts[index]
                count.clean.add(stats)
                count.documents_in += stats.too_short + len(docs)
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


# ----------------------------------------------------------------------------- the pipeline


def is_prepared(out_dir: str) -> bool:
    """True when out_dir holds a complete output (its manifest.json)."""
    try:
        return shards_lib.read_manifest(out_dir) is not None
    except DataError:
        return False


def _num_workers(data_cfg) -> int:
    return max(1, int(data_cfg.prepare_workers) or os.cpu_count() or 1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _make_tmp_dir(out_dir: str) -> str:
    """A fresh temp dir inside out_dir; removes those left by dead runs on this host."""
    os.makedirs(out_dir, exist_ok=True)
    host = socket.gethostname()
    for path in glob.glob(os.path.join(out_dir, '.tmp-prepare-*')):
        owner, _, pid = os.path.basename(path)[len('.tmp-prepare-'):].rpartition('-')
        if owner == host and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
    tmp = os.path.join(out_dir, f'.tmp-prepare-{host}-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _commit(tmp: str, out_dir: str, manifest_name: str) -> None:
    """Moves a finished output into place; the manifest goes last, so a crash part-way leaves
    an output that is_prepared() reports incomplete."""
    manifest = os.path.join(out_dir, manifest_name)
    if os.path.exists(manifest):
        os.remove(manifest)
    for name in (shards_lib.SHARDS_DIR, tokenizer_lib.FILENAME):
        dst = os.path.join(out_dir, name)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        elif os.path.exists(dst):
            os.remove(dst)
        if os.path.exists(os.path.join(tmp, name)):
            os.rename(os.path.join(tmp, name), dst)
    os.replace(os.path.join(tmp, manifest_name), manifest)


def _tokenizer_info(path: str, source: str, source_sha256: str) -> dict[str, Any]:
    tok = tokenizer_lib.Tokenizer(path)
    return dict(file=tokenizer_lib.FILENAME, sha256=tok.sha256, source=source,
                source_sha256=source_sha256, vocab_size=tok.vocab_size, bos_id=tok.bos_id,
                eos_id=tok.eos_id, pad_id=tok.pad_id)


def _train_tokenizer(data_cfg, sources, files, workers: int, out_path: str) -> None:
    """Trains a tokenizer on the first TOKENIZER_TRAIN_CHARS of cleaned training text."""
    texts, chars = [], 0

    def sink(index, split, digest, text, num_tokens):
        nonlocal chars
        if split == 'train':
            texts.append(text)
            chars += len(text)
        return chars < TOKENIZER_TRAIN_CHARS

    _scan(sources, files, data_cfg, workers, None, None, 'none', sink, 'tokenizer text')
    if not texts:
        raise DataError(f'data.sources {[s.name for s in sources]}: no training text left '
                        f'after cleaning to train a tokenizer on')
    prefix = out_path[:-len('.model')] + '-training'
    trained = tokenizer_lib.train(texts, prefix, int(data_cfg.tokenizer_vocab_size),
                                  list(data_cfg.special_tokens))
    os.replace(trained, out_path)
    os.remove(prefix + '.vocab')


def _setup_tokenizer(data_cfg, sources, files, workers: int, tmp: str) -> dict[str, Any]:
    """Puts the tokenizer (given + special tokens, or trained) at tmp/tokenizer.model."""
    out = os.path.join(tmp, tokenizer_lib.FILENAME)
    if data_cfg.tokenizer:
        tokenizer_lib.add_special_tokens(data_cfg.tokenizer, out, list(data_cfg.special_tokens))
        return _tokenizer_info(out, os.path.abspath(data_cfg.tokenizer),
                               tokenizer_lib.file_sha256(data_cfg.tokenizer))
    _train_tokenizer(data_cfg, sources, files, workers, out)
    return _tokenizer_info(out, 'trained', tokenizer_lib.file_sha256(out))


def _write_shards(data_cfg, sources, files, workers: int, tmp: str, keep_digests: bool,
                  desc: str) -> dict[str, Any]:
    """Tokenizer, then every document into its (source, split) shards; returns the manifest."""
    info = _setup_tokenizer(data_cfg, sources, files, workers, tmp)
    dtype = shards_lib.token_dtype(data_cfg.token_dtype, info['vocab_size'])
    writers = {(i, split): shards_lib.ShardWriter(tmp, s.name, split, data_cfg.shard_max_tokens,
                                                  keep_digests)
               for i, s in enumerate(sources) for split in shards_lib.SPLITS}

    def sink(index, split, digest, payload, num_tokens):
        writers[index, split].write(payload, num_tokens, digest)

    counts = _scan(sources, files, data_cfg, workers, os.path.join(tmp, tokenizer_lib.FILENAME),
                   dtype, data_cfg.dedup, sink, desc)
    splits = {key: w.close() for key, w in writers.items()}
    return _manifest(sources, dtype, info, [
        dict(files=c.files, documents_in=c.documents_in, removed=c.removed()) for c in counts],
        splits)


def _manifest(sources, dtype, tokenizer_info, per_source, splits) -> dict[str, Any]:
    out = dict(format=shards_lib.FORMAT_VERSION, dtype=dtype, tokenizer=tokenizer_info,
               sources={}, totals={split: dict(documents=0, tokens=0)
                                   for split in shards_lib.SPLITS})
    for i, (source, counts) in enumerate(zip(sources, per_source)):
        out['sources'][source.name] = dict(
            counts, splits={split: splits[i, split] for split in shards_lib.SPLITS})
        for split in shards_lib.SPLITS:
            for key in ('documents', 'tokens'):
                out['totals'][split][key] += splits[i, split][key]
    return out


def _finish(manifest: dict, options: dict, tmp: str, out_dir: str, manifest_name: str,
            sources: list[Source] | None) -> dict:
    manifest['options'] = options
    if sources is not None:
        shards_lib.check_trainable(sources, manifest, out_dir)
    shards_lib.write_json(os.path.join(tmp, manifest_name), manifest)
    _commit(tmp, out_dir, manifest_name)
    return manifest


def prepare(data_cfg, out_dir: str, *, force: bool = False) -> dict:
    """Prepares data_cfg's sources into out_dir unless a complete output is there already.

    Returns the manifest. An existing output made with other options is an error unless
    ``force``, which rebuilds it. Nothing half-written is left behind on failure.
    """
    options = prepare_options(data_cfg)
    manifest = shards_lib.read_manifest(out_dir)
    if manifest is not None and not force:
        _check_matches(manifest, options, data_cfg, out_dir)
        return manifest
    sources = parse_sources(data_cfg.sources)
    files = [resolve_files(s, i) for i, s in enumerate(sources)]
    created = not os.path.exists(out_dir)
    tmp = _make_tmp_dir(out_dir)
    try:
        manifest = _write_shards(data_cfg, sources, files, _num_workers(data_cfg), tmp,
                                 keep_digests=False, desc='prepare')
        manifest = _finish(manifest, options, tmp, out_dir, shards_lib.MANIFEST, sources)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)
    print(summary(manifest), file=sys.stderr)
    return manifest


# ----------------------------------------------------------------------------- slices


def slice_dir(out_dir: str, index: int, count: int) -> str:
    return os.path.join(out_dir, SLICES_DIR, f'{index:05d}-of-{count:05d}')


def parse_slice(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(x) for x in text.split('/'))
    except ValueError:
        raise DataError(f'--shard={text!r}: expected i/n, e.g. 3/16')
    if not 0 <= index < count:
        raise DataError(f'--shard={text!r}: expected 0 <= i < n')
    return index, count


def prepare_slice(data_cfg, out_dir: str, index: int, count: int, *,
                  force: bool = False) -> dict:
    """Prepares slice ``index`` of ``count`` (files[index::count] of every source) into
    out_dir/slices/; ``merge`` combines the slices once all are done."""
    options = prepare_options(data_cfg)
    if not data_cfg.tokenizer:
        raise DataError('--shard needs data.tokenizer (every slice must use the same one): give '
                        'a .model, or train one first with `meditron-prepare --config ... '
                        '--tokenizer_only` and pass --config.data.tokenizer=<the path it prints>')
    target = slice_dir(out_dir, index, count)
    existing = shards_lib.read_manifest(target, SLICE_MANIFEST)
    if existing is not None and not force:
        _check_matches(existing, options, data_cfg, target)
        return existing
    sources = parse_sources(data_cfg.sources)
    files = [resolve_files(s, i)[index::count] for i, s in enumerate(sources)]
    tmp = _make_tmp_dir(out_dir)
    try:
        manifest = _write_shards(data_cfg, sources, files, _num_workers(data_cfg), tmp,
                                 keep_digests=True, desc=f'slice {index}/{count}')
        os.makedirs(target, exist_ok=True)
        return _finish(manifest, options, tmp, target, SLICE_MANIFEST, None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge(data_cfg, out_dir: str, *, force: bool = False) -> dict:
    """Combines all slices into the final output: exact dedup across slices, one manifest."""
    options = prepare_options(data_cfg)
    manifest = shards_lib.read_manifest(out_dir)
    if manifest is not None and not force:
        _check_matches(manifest, options, data_cfg, out_dir)
        return manifest
    root = os.path.join(out_dir, SLICES_DIR)
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    counts = {int(n.split('-of-')[1]) for n in names if '-of-' in n}
    if len(counts) != 1:
        raise DataError(f'{root}: expected the slices of one --shard i/n run, found '
                        f'{names or "none"}')
    count = counts.pop()
    dirs = [slice_dir(out_dir, i, count) for i in range(count)]
    missing = [i for i, d in enumerate(dirs) if shards_lib.read_manifest(d, SLICE_MANIFEST) is None]
    if missing:
        raise DataError(f'{root}: slices {missing} of {count} are missing or incomplete; run '
                        f'meditron-prepare --shard i/{count} for each before --merge')
    slices = [shards_lib.read_manifest(d, SLICE_MANIFEST) for d in dirs]
    for d, s in zip(dirs, slices):
        _check_matches(s, options, data_cfg, d)
    sources = parse_sources(data_cfg.sources)
    tmp = _make_tmp_dir(out_dir)
    try:
        shutil.copy(os.path.join(dirs[0], tokenizer_lib.FILENAME),
                    os.path.join(tmp, tokenizer_lib.FILENAME))
        manifest = _merge_into(tmp, sources, dirs, slices, data_cfg.shard_max_tokens)
        manifest['tokenizer'] = slices[0]['tokenizer']
        manifest = _finish(manifest, options, tmp, out_dir, shards_lib.MANIFEST, sources)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(root)
    print(summary(manifest), file=sys.stderr)
    return manifest


def _merge_into(tmp: str, sources, dirs, slices, shard_max_tokens: int) -> dict[str, Any]:
    itemsize = np.dtype(slices[0]['dtype']).itemsize
    seen: set[bytes] = set()
    per_source, splits = [], {}
    total = sum(len(s['sources'][src.name]['splits'][split]['shards'])
                for s in slices for src in sources for split in shards_lib.SPLITS)
    with tqdm(total=total, unit='shard', desc='merge', file=sys.stderr, disable=None) as bar:
        for i, source in enumerate(sources):
            cross_slice = 0
            for split in shards_lib.SPLITS:
                writer = shards_lib.ShardWriter(tmp, source.name, split, shard_max_tokens)
                for d, s in zip(dirs, slices):
                    for shard in s['sources'][source.name]['splits'][split]['shards']:
                        path = os.path.join(d, shard['file'])
                        for record, key in zip(shards_lib.read_records(path),
                                               shards_lib.read_digests(path)):
                            if key in seen:
                                cross_slice += 1
                                continue
                            seen.add(key)
                            writer.write(record, len(record) // itemsize)
                        bar.update(1)
                splits[i, split] = writer.close()
            removed = collections.Counter()
            for s in slices:
                removed.update(s['sources'][source.name]['removed'])
            removed['exact_duplicates'] += cross_slice
            per_source.append(dict(
                files=sum(s['sources'][source.name]['files'] for s in slices),
                documents_in=sum(s['sources'][source.name]['documents_in'] for s in slices),
                removed=dict(removed)))
    return _manifest(sources, slices[0]['dtype'], slices[0]['tokenizer'], per_source, splits)


def train_tokenizer_only(data_cfg, out_dir: str) -> str:
    """Trains the corpus tokenizer alone (before a --shard run); returns its path."""
    sources = parse_sources(data_cfg.sources)
    files = [resolve_files(s, i) for i, s in enumerate(sources)]
    if data_cfg.tokenizer_vocab_size <= 0:
        raise DataError('--tokenizer_only needs data.tokenizer_vocab_size > 0')
    tmp = _make_tmp_dir(out_dir)
    try:
        path = os.path.join(tmp, 'trained-tokenizer.model')
        _train_tokenizer(data_cfg, sources, files, _num_workers(data_cfg), path)
        final = os.path.join(out_dir, 'trained-tokenizer.model')
        os.replace(path, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- reporting + CLI


def summary(manifest: dict) -> str:
    """A table of documents, tokens and removals per source."""
    rows = [f'{"source":<14}{"docs in":>9}{"removed":>9}{"train docs":>11}{"train tok":>11}'
            f'{"val docs":>9}{"val tok":>9}  removed by step']
    for name, s in manifest['sources'].items():
        removed = s['removed']
        dropped = sum(removed[k] for k in ('exact_duplicates', 'near_duplicates', 'too_short'))
        tr, va = s['splits']['train'], s['splits']['validation']
        detail = ', '.join(f'{k}={v}' for k, v in sorted(removed.items()) if v)
        rows.append(f'{name:<14}{s["documents_in"]:>9}{dropped:>9}{tr["documents"]:>11}'
                    f'{tr["tokens"]:>11}{va["documents"]:>9}{va["tokens"]:>9}  {detail}')
    tok = manifest['tokenizer']
    rows.append(f'tokenizer: {tok["source"]} ({tok["vocab_size"]} pieces, sha256 '
                f'{tok["sha256"][:12]}), dtype {manifest["dtype"]}')
    return '\n'.join(rows)


def _main(argv) -> None:
    from absl import flags
    del argv
    flag = flags.FLAGS
    data_cfg = flag.config.data
    out_dir = data_cfg.dir or (os.path.join(flag.workdir, 'data') if flag.workdir else '')
    try:
        if not out_dir:
            raise DataError('data.dir is empty and no --workdir: say where the shards go, '
                            'e.g. --config.data.dir=/path/to/data')
        if flag.tokenizer_only:
            print(train_tokenizer_only(data_cfg, out_dir))
        elif flag.merge:
            merge(data_cfg, out_dir, force=flag.force)
        elif flag.shard:
            index, count = parse_slice(flag.shard)
            manifest = prepare_slice(data_cfg, out_dir, index, count, force=flag.force)
            print(summary(manifest), file=sys.stderr)
        else:
            prepare(data_cfg, out_dir, force=flag.force)
    except DataError as e:
        print(f'meditron-prepare: error: {e}', file=sys.stderr)
        sys.exit(1)


def run(argv=None) -> None:
    """Console entry point ``meditron-prepare`` (flags are defined here, not at import, so
    that importing this module from meditron-train defines none)."""
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file('config', None, 'Config file with get_config().',
                                    lock_config=True)
    flags.mark_flags_as_required(['config'])
    flags.DEFINE_string('workdir', '', 'Run dir; the shards go to <workdir>/data unless '
                        'data.dir is set.')
    flags.DEFINE_bool('force', False, 'Rebuild even if a complete output exists.')
    flags.DEFINE_string('shard', '', 'i/n: prepare only slice i of n of the input files (a '
                        'SLURM array task); then run --merge once.')
    flags.DEFINE_bool('merge', False, 'Merge the slices of a --shard run into the final output.')
    flags.DEFINE_bool('tokenizer_only', False, 'Only train the corpus tokenizer (before a '
                      '--shard run) and print its path.')
    app.run(_main, argv)


if __name__ == '__main__':
    run()
