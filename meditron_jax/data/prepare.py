"""meditron-prepare: raw text -> cleaned, deduplicated, split, tokenized ArrayRecord shards.

    meditron-prepare --config configs/debug.py --config.data.dir=/tmp/debug-data
    meditron-prepare --config CFG --shard 3/16      # one slice of the input files (SLURM array)
    meditron-prepare --config CFG --merge           # after all slices: exact dedup + manifest

Chat (finetuning) data, ``data.format='chat'``, takes its own path (chat_data.py): no cleaning
or deduplication, ids + loss mask per conversation, the same tokenizer, shards and manifest.

Steps (steps.py, shared with the job-array slices in slices.py): read (sources.py) -> clean
(clean.py) -> deduplicate -> split train/validation by a hash of each document -> tokenize ->
shards + manifest.json (shards.py). Workers parse, clean, hash and tokenize fixed chunks of
input lines; the main process takes their results in input order and makes every decision that
depends on other documents (duplicates), so the output is the same byte for byte whatever the
number of workers. Everything is written into a temp dir inside the output dir and moved into
place when complete, ``manifest.json`` last: without a manifest an output is incomplete, and a
failed run leaves none behind.
"""

from __future__ import annotations

import os
import shutil
import sys

from meditron_jax.data import shards as shards_lib
from meditron_jax.data import slices
from meditron_jax.data import steps
from meditron_jax.data.sources import DataError, parse_sources, resolve_files
# Part of meditron-prepare's API (train.py and tests call prepare.prepare_options/summary).
from meditron_jax.data.steps import prepare_options, summary  # noqa: F401


# ----------------------------------------------------------------------------- the pipeline


def is_prepared(out_dir: str) -> bool:
    """True when out_dir holds a complete output (its manifest.json)."""
    try:
        return shards_lib.read_manifest(out_dir) is not None
    except DataError:
        return False


def prepare(data_cfg, out_dir: str, *, force: bool = False) -> dict:
    """Prepares data_cfg's sources into out_dir unless a complete output is there already.

    Returns the manifest. An existing output made with other options is an error unless
    ``force``, which rebuilds it. Nothing half-written is left behind on failure.
    """
    options = prepare_options(data_cfg)
    manifest = shards_lib.read_manifest(out_dir)
    sources = parse_sources(data_cfg.sources)
    if manifest is not None and not force:
        steps.check_matches(manifest, options, data_cfg, out_dir)
        shards_lib.check_trainable(sources, manifest, out_dir)   # weights may have changed
        return manifest
    files = [resolve_files(s, i) for i, s in enumerate(sources)]
    created = not os.path.exists(out_dir)
    tmp = steps.make_tmp_dir(out_dir)
    try:
        manifest = steps.write_shards(data_cfg, sources, files, steps.num_workers(data_cfg),
                                      tmp, keep_digests=False, desc='prepare')
        manifest = steps.finish(manifest, options, tmp, out_dir, shards_lib.MANIFEST, sources)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)
    print(summary(manifest), file=sys.stderr)
    return manifest


# ----------------------------------------------------------------------------- CLI


def _main(argv) -> None:
    """Errors (DataError and the others meditron_jax.cli anticipates) become one line
    ``meditron-prepare: error: ...`` and exit status 2."""
    from absl import flags
    from meditron_jax import cli
    del argv
    flag = flags.FLAGS
    cli.check_declared(flag.config, f'--config={flag["config"].config_filename}')
    data_cfg = flag.config.data
    out_dir = data_cfg.dir or (os.path.join(flag.workdir, 'data') if flag.workdir else '')
    if not out_dir:
        raise DataError('data.dir is empty and no --workdir: say where the shards go, '
                        'e.g. --config.data.dir=/path/to/data')
    if data_cfg.format == 'chat' and (flag.tokenizer_only or flag.merge or flag.shard):
        raise DataError('data.format="chat" is prepared in one pass: drop --shard, --merge '
                        'and --tokenizer_only')
    if flag.tokenizer_only:
        print(slices.train_tokenizer_only(data_cfg, out_dir))
    elif flag.merge:
        slices.merge(data_cfg, out_dir, force=flag.force)
    elif flag.shard:
        index, count = slices.parse_slice(flag.shard)
        manifest = slices.prepare_slice(data_cfg, out_dir, index, count, force=flag.force)
        print(summary(manifest), file=sys.stderr)
    else:
        prepare(data_cfg, out_dir, force=flag.force)


def run(argv=None) -> None:
    """Console entry point ``meditron-prepare`` (flags are defined here, not at import, so
    that importing this module from meditron-train defines none)."""
    from absl import flags
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
    from meditron_jax import cli
    flags.DEFINE_bool('debug', False, cli.DEBUG_HELP)
    cli.run_absl('meditron-prepare', _main, argv)


if __name__ == '__main__':
    run()
