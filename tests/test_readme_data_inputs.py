"""README promises about meditron-prepare's inputs and outputs, on one small prepared corpus:
``.jsonl.gz``, ``.txt`` and ``.txt.gz`` files and a non-default ``text_key`` are read, and
``data.shard_max_tokens`` splits a source's split into several shards that the loader reads
in full."""

import gzip
import json
import os

import numpy as np
import pytest

from configs import base
from meditron_jax.data import clean, loader, prepare, shards, sources, tokenizer
from tests.data_helpers import data_config, doc_text, records

SHARD_MAX_TOKENS = 400     # a document here is ~60-90 tokens: several shards per split


def _write_gz(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, 'wt', encoding='utf-8') as f:
        f.write(text)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    """Three sources, one per input format, prepared once: {'cfg', 'dir', 'texts': {source:
    raw texts in input order}}."""
    root = tmp_path_factory.mktemp('readme-inputs')
    texts = {'gz': [doc_text(i) for i in range(40)],
             'txt': [doc_text(100 + i) for i in range(6)],
             'txtgz': [doc_text(200 + i) for i in range(6)]}
    # .jsonl.gz whose text is under 'body'; a decoy 'text' key must not be read.
    lines = ''.join(json.dumps({'id': f'd{i}', 'body': t, 'text': 'decoy ' * 40}) + '\n'
                    for i, t in enumerate(texts['gz']))
    _write_gz(str(root / 'in' / 'gz' / 'part.jsonl.gz'), lines)
    for i, t in enumerate(texts['txt']):          # one document per .txt file
        os.makedirs(root / 'in' / 'txt', exist_ok=True)
        (root / 'in' / 'txt' / f'{i:02d}.txt').write_text(t)
    for i, t in enumerate(texts['txtgz']):
        _write_gz(str(root / 'in' / 'txtgz' / f'{i:02d}.txt.gz'), t)
    cfg = data_config([
        base.source('gz', str(root / 'in' / 'gz' / '*.jsonl.gz'), 0.5, 0.1, text_key='body'),
        base.source('txt', str(root / 'in' / 'txt' / '*.txt'), 0.25, 0.0),
        base.source('txtgz', str(root / 'in' / 'txtgz' / '*.txt.gz'), 0.25, 0.0),
    ], shard_max_tokens=SHARD_MAX_TOKENS)
    out = str(root / 'out')
    prepare.prepare(cfg, out)
    return dict(cfg=cfg, dir=out, texts=texts)


def _stored_texts(corpus, name):
    tok = tokenizer.Tokenizer(os.path.join(corpus['dir'], tokenizer.FILENAME))
    return [tok.decode(ids) for split in shards.SPLITS
            for ids in records(corpus['dir'], name, split)]


def _cleaned(corpus, text):
    return clean.clean(text, '', clean.CleanOptions.from_config(corpus['cfg'].clean),
                       clean.CleanStats())


@pytest.mark.parametrize('name', ['txt', 'txtgz'])
def test_txt_and_txt_gz_files_are_one_document_each(corpus, name):
    expected = [_cleaned(corpus, t) for t in corpus['texts'][name]]
    assert sorted(_stored_texts(corpus, name)) == sorted(expected)
    assert shards.read_manifest(corpus['dir'])['sources'][name]['documents_in'] == len(expected)


def test_jsonl_gz_is_read_with_the_sources_text_key(corpus):
    stored = _stored_texts(corpus, 'gz')
    assert sorted(stored) == sorted(_cleaned(corpus, t) for t in corpus['texts']['gz'])
    assert not any('decoy' in t for t in stored)
    # The same file with the default text_key reads the decoys instead.
    default = sources.Source('gz', corpus['cfg'].sources[0]['files'], 1.0, 0.0, 'text')
    path, = sources.resolve_files(default, 0)
    (first, lines), = list(sources.read_chunks(path, 1000))
    docs = sources.parse_chunk(path, first, lines, default.text_key)
    assert len(docs) == 40 and all(d.text.startswith('decoy') for d in docs)


def test_shard_max_tokens_gives_several_shards_per_split_and_the_loader_reads_all(corpus):
    manifest = shards.read_manifest(corpus['dir'])
    split = manifest['sources']['gz']['splits']['train']
    assert len(split['shards']) >= 3, split['shards']
    paths = shards.split_paths(corpus['dir'], manifest, 'gz', 'train')
    assert len(paths) == len(split['shards']) and all(os.path.isfile(p) for p in paths)
    for s in split['shards']:
        # A shard is closed once it reaches the limit, so only its last document crosses it.
        assert 0 < s['documents'] and s['tokens'] < SHARD_MAX_TOKENS + 200, s
    assert sum(s['documents'] for s in split['shards']) == split['documents']
    # The loader's per-source dataset spans every shard, in stored order.
    _, parsed = loader.open_prepared(corpus['cfg'], corpus['dir'])
    docs = loader.process_documents(corpus['dir'], manifest, parsed[0], 'train', 0, 1)
    assert len(docs) == split['documents']
    dtype = np.dtype(manifest['dtype']).newbyteorder('<')
    from_loader = [np.frombuffer(docs[i], dtype).tolist() for i in range(len(docs))]
    assert from_loader == [r.tolist() for r in records(corpus['dir'], 'gz', 'train')]
    # And its batches hold tokens of the last shard's documents too.
    last = {tuple(np.frombuffer(r, dtype)[1:9]) for r in shards.read_records(paths[-1])}
    it = loader.make_train_iterator(corpus['cfg'], corpus['dir'], seed=0, process_index=0,
                                    process_count=1)
    rows = [row for _ in range(40) for row in next(it)['tokens']]
    seen = {tuple(row[i:i + 8]) for row in rows for i in range(len(row) - 7)}
    assert last & seen, 'no document of the last shard appeared in 40 batches (over an epoch)'
