"""The steps of meditron-prepare, shared by a one-pass run (prepare.py) and a job array's
slices and merge (slices.py): options and their check against an existing output, the temp dir
and the commit that moves a finished output into place (manifest last), the tokenizer, the
shards and the manifest, and the summary table.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import socket
from typing import Any

from meditron_jax.data import chat_data
from meditron_jax.data import clean as clean_lib
from meditron_jax.data import decontaminate_io
from meditron_jax.data import scan
from meditron_jax.data import shards as shards_lib
from meditron_jax.data import tokenizer as tokenizer_lib
from meditron_jax.data.sources import DataError, Source, parse_sources

TOKENIZER_TRAIN_CHARS = 300_000_000  # text read to train a tokenizer (the first, in input order)
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
        try:   # a SentencePiece model, checked before any long work
            tokenizer_lib.Tokenizer(data_cfg.tokenizer)
        except tokenizer_lib.TokenizerError as e:
            raise DataError(f'data.tokenizer: {e}') from None
        tokenizer = tokenizer_lib.file_sha256(data_cfg.tokenizer)
    elif data_cfg.tokenizer_vocab_size > 0:
        tokenizer = f'trained:{int(data_cfg.tokenizer_vocab_size)}'
    else:
        raise DataError('data.tokenizer is empty and data.tokenizer_vocab_size is 0: give a '
                        'SentencePiece .model or a vocabulary size to train one')
    if data_cfg.shard_max_tokens <= 0:
        raise DataError(f'data.shard_max_tokens={data_cfg.shard_max_tokens}: expected > 0')
    if chat_data.check_format(data_cfg) == 'chat' and data_cfg.decontaminate:
        raise DataError('data.decontaminate filters pretraining text; it is not applied to '
                        'data.format="chat" (finetuning data built from benchmarks\' train '
                        'splits): leave data.decontaminate empty for chat data')
    # Text options stay as they were (existing outputs remain valid); chat adds its own.
    chat_options = (dict(data_format='chat', seq_len=int(data_cfg.seq_len))
                    if chat_data.check_format(data_cfg) == 'chat' else {})
    return dict(**chat_options,
        format=shards_lib.FORMAT_VERSION,
        sources=[dict(name=s.name, files=s.files, val_fraction=s.val_fraction,
                      text_key=s.text_key) for s in sources],
        clean=dataclasses.asdict(clean_lib.CleanOptions.from_config(data_cfg.clean)),
        dedup=data_cfg.dedup,
        minhash_threshold=(float(data_cfg.minhash_threshold) if data_cfg.dedup == 'minhash'
                           else None),
        tokenizer=tokenizer,
        special_tokens=chat_data.special_tokens(data_cfg),
        token_dtype=data_cfg.token_dtype,
        shard_max_tokens=int(data_cfg.shard_max_tokens),
        decontamination=decontaminate_io.options(data_cfg),   # None when off
    )


def check_matches(manifest: dict, options: dict, data_cfg, where: str) -> None:
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


# ----------------------------------------------------------------------------- the output dir


def num_workers(data_cfg) -> int:
    return max(1, int(data_cfg.prepare_workers) or os.cpu_count() or 1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def make_tmp_dir(out_dir: str) -> str:
    """A fresh temp dir inside out_dir; removes those left by dead runs on this host."""
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise DataError(f'{existing} is a file; expected a directory to hold the prepared data '
                        f'{out_dir} (data.dir, default <workdir>/data)')
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
    for name in (shards_lib.SHARDS_DIR, tokenizer_lib.FILENAME, decontaminate_io.HITS_FILE):
        dst = os.path.join(out_dir, name)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        elif os.path.exists(dst):
            os.remove(dst)
        if os.path.exists(os.path.join(tmp, name)):
            os.rename(os.path.join(tmp, name), dst)
    os.replace(os.path.join(tmp, manifest_name), manifest)


# ----------------------------------------------------------------------------- tokenizer


def _tokenizer_info(path: str, source: str, source_sha256: str) -> dict[str, Any]:
    tok = tokenizer_lib.Tokenizer(path)
    return dict(file=tokenizer_lib.FILENAME, sha256=tok.sha256, source=source,
                source_sha256=source_sha256, vocab_size=tok.vocab_size, bos_id=tok.bos_id,
                eos_id=tok.eos_id, pad_id=tok.pad_id)


def train_tokenizer(data_cfg, sources, files, workers: int, out_path: str) -> None:
    """Trains a tokenizer on the first TOKENIZER_TRAIN_CHARS of cleaned training text."""
    if data_cfg.format == 'chat':
        texts = chat_data.tokenizer_texts(files)
        return _train_tokenizer_on(texts, data_cfg, sources, out_path)
    texts, chars = [], 0

    def sink(index, split, digest, text, num_tokens):
        nonlocal chars
        if split == 'train':
            texts.append(text)
            chars += len(text)
        return chars < TOKENIZER_TRAIN_CHARS

    scan.scan(sources, files, data_cfg, workers, None, None, 'none', sink, 'tokenizer text')
    _train_tokenizer_on(texts, data_cfg, sources, out_path)


def _train_tokenizer_on(texts: list[str], data_cfg, sources, out_path: str) -> None:
    if not texts:
        raise DataError(f'data.sources {[s.name for s in sources]}: no training text left '
                        f'after cleaning to train a tokenizer on')
    prefix = out_path[:-len('.model')] + '-training'
    trained = tokenizer_lib.train(texts, prefix, int(data_cfg.tokenizer_vocab_size),
                                  chat_data.special_tokens(data_cfg))
    os.replace(trained, out_path)
    os.remove(prefix + '.vocab')


def _setup_tokenizer(data_cfg, sources, files, workers: int, tmp: str) -> dict[str, Any]:
    """Puts the tokenizer (given + special tokens, or trained) at tmp/tokenizer.model."""
    out = os.path.join(tmp, tokenizer_lib.FILENAME)
    if data_cfg.tokenizer:
        tokenizer_lib.add_special_tokens(data_cfg.tokenizer, out,
                                         chat_data.special_tokens(data_cfg))
        return _tokenizer_info(out, os.path.abspath(data_cfg.tokenizer),
                               tokenizer_lib.file_sha256(data_cfg.tokenizer))
    train_tokenizer(data_cfg, sources, files, workers, out)
    return _tokenizer_info(out, 'trained', tokenizer_lib.file_sha256(out))


# ----------------------------------------------------------------------------- shards + manifest


def write_shards(data_cfg, sources, files, workers: int, tmp: str, keep_digests: bool,
                 desc: str) -> dict[str, Any]:
    """Tokenizer, then every document into its (source, split) shards; returns the manifest."""
    decontam_index = decontaminate_io.write_index(data_cfg, tmp)   # first: bad files fail fast
    info = _setup_tokenizer(data_cfg, sources, files, workers, tmp)
    dtype = shards_lib.token_dtype(data_cfg.token_dtype, info['vocab_size'])
    writers = {(i, split): shards_lib.ShardWriter(tmp, s.name, split, data_cfg.shard_max_tokens,
                                                  keep_digests)
               for i, s in enumerate(sources) for split in shards_lib.SPLITS}

    if data_cfg.format == 'chat':
        return _write_chat_shards(data_cfg, sources, files, tmp, info, dtype, writers)

    def sink(index, split, digest, payload, num_tokens):
        writers[index, split].write(payload, num_tokens, digest)

    counts = scan.scan(sources, files, data_cfg, workers,
                       os.path.join(tmp, tokenizer_lib.FILENAME), dtype, data_cfg.dedup, sink, desc,
                       decontam_index)
    splits = {key: w.close() for key, w in writers.items()}
    manifest = build_manifest(sources, dtype, info, [
        dict(files=c.files, documents_in=c.documents_in, removed=c.removed()) for c in counts],
        splits)
    if decontam_index:
        manifest['decontamination'] = decontaminate_io.finish(data_cfg, sources, counts,
                                                              decontam_index, tmp)
    return manifest


def _write_chat_shards(data_cfg, sources, files, tmp: str, info, dtype: str, writers
                       ) -> dict[str, Any]:
    row_tokens = int(data_cfg.seq_len) + 1

    def sink(index, split, record, num_tokens):
        writers[index, split].write(record, num_tokens)

    counts = chat_data.scan(sources, files, os.path.join(tmp, tokenizer_lib.FILENAME), dtype,
                            row_tokens, sink)
    splits = {key: w.close() for key, w in writers.items()}
    for (i, split), info_split in splits.items():
        info_split.update(counts[i]['splits'][split])
    manifest = build_manifest(sources, dtype, info, [
        dict(files=c['files'], documents_in=c['documents_in']) for c in counts], splits)
    manifest.update(data_format='chat', row_tokens=row_tokens)
    for split in shards_lib.SPLITS:
        for key in ('loss_tokens', 'truncated'):
            manifest['totals'][split][key] = sum(splits[i, split][key]
                                                 for i in range(len(sources)))
    return manifest


def build_manifest(sources, dtype, tokenizer_info, per_source, splits) -> dict[str, Any]:
    """The manifest (without options): per-source counts and splits, and the totals."""
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


def finish(manifest: dict, options: dict, tmp: str, out_dir: str, manifest_name: str,
           sources: list[Source] | None) -> dict:
    """Records the options, checks the output can be trained on (when ``sources``), writes
    the manifest and moves the output from tmp into out_dir."""
    manifest['options'] = options
    if sources is not None:
        shards_lib.check_trainable(sources, manifest, out_dir)
    shards_lib.write_json(os.path.join(tmp, manifest_name), manifest)
    _commit(tmp, out_dir, manifest_name)
    return manifest


# ----------------------------------------------------------------------------- reporting


def summary(manifest: dict) -> str:
    """A table of documents, tokens and removals per source."""
    if manifest.get('data_format') == 'chat':
        return chat_data.summary(manifest)
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
    rows.extend(decontaminate_io.summary_lines(manifest))
    return '\n'.join(rows)
