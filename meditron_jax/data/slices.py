"""--shard i/n and --merge: preparing a corpus too large for one machine as a job array.

Slice i of n takes files[i::n] of every source (sorted by path), runs the whole pipeline on them
with the given tokenizer and writes a complete output of its own to
``<data.dir>/slices/<i>-of-<n>/`` (plus each document's 16-byte key). ``merge`` runs once all
slices are complete: it copies their records in (source, slice) order into the final shards,
dropping exact duplicates across slices, sums the counts and writes the manifest, then removes
the slices. Near duplicates are found within a slice only.
"""

from __future__ import annotations

import collections
import os
import shutil
import sys
from typing import Any

import numpy as np
from tqdm import tqdm

from meditron_jax.data import decontaminate_io
from meditron_jax.data import shards as shards_lib
from meditron_jax.data import steps
from meditron_jax.data import tokenizer as tokenizer_lib
from meditron_jax.data.steps import prepare_options, summary
from meditron_jax.data.sources import DataError, parse_sources, resolve_files

SLICES_DIR = 'slices'
SLICE_MANIFEST = 'slice.json'



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
        steps.check_matches(existing, options, data_cfg, target)
        return existing
    sources = parse_sources(data_cfg.sources)
    files = [resolve_files(s, i)[index::count] for i, s in enumerate(sources)]
    tmp = steps.make_tmp_dir(out_dir)
    try:
        manifest = steps.write_shards(data_cfg, sources, files, steps.num_workers(data_cfg),
                                      tmp, keep_digests=True, desc=f'slice {index}/{count}')
        os.makedirs(target, exist_ok=True)
        return steps.finish(manifest, options, tmp, target, SLICE_MANIFEST, None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge(data_cfg, out_dir: str, *, force: bool = False) -> dict:
    """Combines all slices into the final output: exact dedup across slices, one manifest."""
    options = prepare_options(data_cfg)
    manifest = shards_lib.read_manifest(out_dir)
    if manifest is not None and not force:
        steps.check_matches(manifest, options, data_cfg, out_dir)
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
        steps.check_matches(s, options, data_cfg, d)
    sources = parse_sources(data_cfg.sources)
    tmp = steps.make_tmp_dir(out_dir)
    try:
        shutil.copy(os.path.join(dirs[0], tokenizer_lib.FILENAME),
                    os.path.join(tmp, tokenizer_lib.FILENAME))
        manifest = _merge_into(tmp, sources, dirs, slices, data_cfg.shard_max_tokens)
        manifest['tokenizer'] = slices[0]['tokenizer']
        decontamination = decontaminate_io.merge(data_cfg, sources, dirs, slices, tmp)
        if decontamination:
            manifest['decontamination'] = decontamination
        manifest = steps.finish(manifest, options, tmp, out_dir, shards_lib.MANIFEST, sources)
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
    with tqdm(total=total, unit='shard', desc='merge', file=sys.stderr,
              mininterval=1 if sys.stderr.isatty() else 30) as bar:
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
    return steps.build_manifest(sources, slices[0]['dtype'], slices[0]['tokenizer'], per_source,
                                splits)


def train_tokenizer_only(data_cfg, out_dir: str) -> str:
    """Trains the corpus tokenizer alone (before a --shard run); returns its path."""
    sources = parse_sources(data_cfg.sources)
    files = [resolve_files(s, i) for i, s in enumerate(sources)]
    if data_cfg.tokenizer_vocab_size <= 0:
        raise DataError('--tokenizer_only needs data.tokenizer_vocab_size > 0')
    tmp = steps.make_tmp_dir(out_dir)
    try:
        path = os.path.join(tmp, 'trained-tokenizer.model')
        steps.train_tokenizer(data_cfg, sources, files, steps.num_workers(data_cfg), path)
        final = os.path.join(out_dir, 'trained-tokenizer.model')
        os.replace(path, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
