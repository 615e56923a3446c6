"""Every bad input to meditron-prepare and the loader gives an error naming it, and a failed
run leaves nothing half-written."""

import gzip
import json
import os
import re
import shutil

import pytest

from configs import base
from meditron_jax.data import loader, prepare, shards, tokenizer
from meditron_jax.data.sources import DataError
from tests.data_helpers import (all_files, data_config, debug_tokenizer, doc_text, records,
                                write_jsonl)


def _source(tmp_path, name='x', weight=1.0, pattern=None):
    return base.source(name, pattern or str(tmp_path / name / '*.jsonl'), weight, 0.0)


def _good(tmp_path, name='x', n=5):
    write_jsonl(str(tmp_path / name / 'a.jsonl'), [{'text': doc_text(i)} for i in range(n)])


def test_missing_and_empty_globs_name_the_source(tmp_path):
    cfg = data_config([_source(tmp_path, pattern=str(tmp_path / 'nowhere' / '*.jsonl'))])
    with pytest.raises(DataError, match=r"data.sources\[0\].files='.*nowhere/\*.jsonl' "
                                        r"\(source 'x'\) matches no files"):
        prepare.prepare(cfg, str(tmp_path / 'out'))
    os.makedirs(tmp_path / 'empty')
    _good(tmp_path)
    cfg = data_config([_source(tmp_path), _source(tmp_path, 'empty')])
    with pytest.raises(DataError, match=r"data.sources\[1\].files=.* matches no files"):
        prepare.prepare(cfg, str(tmp_path / 'out'))
    write_jsonl(str(tmp_path / 'empty' / 'table.csv'), ['a,b'])
    cfg = data_config([_source(tmp_path, 'empty', pattern=str(tmp_path / 'empty' / '*'))])
    with pytest.raises(DataError, match=r'table.csv .*unsupported file type'):
        prepare.prepare(cfg, str(tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out')


@pytest.mark.parametrize('line,message', [
    ('{"text": "unterminated', r'b.jsonl:3: malformed JSON'),
    ('{"body": "no text key"}', r"b.jsonl:3: no key 'text' \(the source's text_key\); keys are "
                                r"\['body'\]"),
    ('{"text": 42}', r"b.jsonl:3: key 'text' is int, expected a string"),
    ('["a", "list"]', r'b.jsonl:3: expected a JSON object, got list'),
])
def test_malformed_jsonl_names_file_and_line_and_writes_nothing(tmp_path, line, message):
    _good(tmp_path)
    write_jsonl(str(tmp_path / 'x' / 'b.jsonl'),
                [{'text': doc_text(50)}, {'text': doc_text(51)}, line])
    cfg = data_config([_source(tmp_path)], prepare_workers=2)
    with pytest.raises(DataError, match=message):
        prepare.prepare(cfg, str(tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out')


def test_failed_forced_rebuild_keeps_the_old_output(tmp_path):
    _good(tmp_path)
    cfg = data_config([_source(tmp_path)])
    out = str(tmp_path / 'out')
    prepare.prepare(cfg, out)
    before = all_files(out)
    write_jsonl(str(tmp_path / 'x' / 'b.jsonl'), ['not json'])
    with pytest.raises(DataError, match=r'b.jsonl:1: malformed JSON'):
        prepare.prepare(cfg, out, force=True)
    assert all_files(out) == before
    assert sorted(os.listdir(out)) == ['manifest.json', 'shards', 'tokenizer.model']


def test_bad_source_entries_name_the_key(tmp_path):
    _good(tmp_path)
    good = _source(tmp_path)
    cases = [
        ([dict(good, weight=-1.0)], r'data.sources\[0\].weight=-1.0: expected a token share'),
        ([dict(good, val_fraction=1.5)], r'data.sources\[0\].val_fraction=1.5'),
        ([good, {k: v for k, v in good.items() if k != 'text_key'}],
         r"data.sources\[1\]: keys .*missing \['text_key'\]"),
        ([good, good], r"data.sources\[1\].name='x': two sources have this name"),
        ([dict(good, weight=0.0)], r'all weights are 0'),
        ([], r'data.sources is empty'),
    ]
    for sources, message in cases:
        with pytest.raises(DataError, match=message):
            prepare.prepare(data_config(sources), str(tmp_path / 'out'))
    with pytest.raises(DataError, match=r"data.dedup='fuzzy': expected one of"):
        prepare.prepare(data_config([good], dedup='fuzzy'), str(tmp_path / 'out'))
    with pytest.raises(DataError, match=r'data.tokenizer is empty and '
                                        r'data.tokenizer_vocab_size is 0'):
        prepare.prepare(data_config([good], tokenizer=''), str(tmp_path / 'out'))


def test_weighted_source_without_tokens(tmp_path):
    _good(tmp_path)
    write_jsonl(str(tmp_path / 'y' / 'a.jsonl'), [{'text': 'too short'}] * 3)
    cfg = data_config([_source(tmp_path), _source(tmp_path, 'y', weight=0.5)])
    with pytest.raises(DataError, match=r"data.sources\[1\].weight=0.5 but source 'y' has no "
                                        r"training tokens \(3 documents read.*'too_short': 3"):
        prepare.prepare(cfg, str(tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out')
    cfg.sources = [_source(tmp_path), _source(tmp_path, 'y', weight=0.0)]
    prepare.prepare(cfg, str(tmp_path / 'out'))           # weight 0: fine
    cfg.sources = [_source(tmp_path), _source(tmp_path, 'y', weight=0.5)]
    with pytest.raises(DataError, match=r"weight=0.5 but source 'y' has no training tokens"):
        loader.make_train_iterator(cfg, str(tmp_path / 'out'), seed=0, process_index=0,
                                   process_count=1)


def test_tokenizer_hash_mismatch(tmp_path):
    _good(tmp_path)
    cfg = data_config([_source(tmp_path)])
    out = str(tmp_path / 'out')
    prepare.prepare(cfg, out)
    other = tokenizer.train([doc_text(i) for i in range(300)], str(tmp_path / 'other'), 400)
    cfg.tokenizer = other
    message = r'shards were encoded with tokenizer sha256 [0-9a-f]{64} .*other.model'
    with pytest.raises(DataError, match=message):
        prepare.prepare(cfg, out)
    with pytest.raises(DataError, match=message):
        loader.make_train_iterator(cfg, out, seed=0, process_index=0, process_count=1)
    cfg.tokenizer = debug_tokenizer()
    shutil.copy(other, os.path.join(out, tokenizer.FILENAME))     # tampered data dir
    with pytest.raises(DataError, match=r'tokenizer.model: missing or its sha256 differs'):
        loader.make_eval_iterator(cfg, out, process_index=0, process_count=1)


def test_vocabulary_that_does_not_fit_the_dtype(tmp_path):
    _good(tmp_path)
    big = str(tmp_path / 'big.model')
    tokenizer.add_special_tokens(debug_tokenizer(), big,
                                 [f'<extra_{i}>' for i in range(70_000 - 2048)])
    cfg = data_config([_source(tmp_path)], tokenizer=big, token_dtype='uint16')
    with pytest.raises(DataError, match=r"data.token_dtype='uint16' cannot hold token ids up "
                                        r"to 69999 \(tokenizer vocabulary 70000\)"):
        prepare.prepare(cfg, str(tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out')
    cfg.token_dtype = 'auto'
    cfg.special_tokens = []
    manifest = prepare.prepare(cfg, str(tmp_path / 'out'))
    assert manifest['dtype'] == 'uint32'
    tok = tokenizer.Tokenizer(big)
    write_jsonl(str(tmp_path / 'z' / 'a.jsonl'), [{'text': doc_text(0) + ' <extra_67000>'}])
    cfg.sources = [_source(tmp_path, 'z')]
    prepare.prepare(cfg, str(tmp_path / 'out2'))
    ids = records(str(tmp_path / 'out2'), 'z', 'train')[0]
    assert tok.piece_to_id('<extra_67000>') in ids and ids.max() > 65535


def test_loader_config_errors(tmp_path):
    _good(tmp_path)
    cfg = data_config([_source(tmp_path)])
    with pytest.raises(DataError, match=r'no manifest.json .*run meditron-prepare'):
        loader.make_train_iterator(cfg, str(tmp_path / 'none'), seed=0, process_index=0,
                                   process_count=1)
    prepare.prepare(cfg, str(tmp_path / 'out'))
    cfg.global_batch_size = 3
    with pytest.raises(DataError, match=r'data.global_batch_size=3: expected a positive '
                                        r'multiple of the 2 processes'):
        loader.make_train_iterator(cfg, str(tmp_path / 'out'), seed=0, process_index=0,
                                   process_count=2)
    cfg.global_batch_size = 4
    cfg.packing = 'best'
    with pytest.raises(DataError, match=r"data.packing='best'"):
        loader.make_train_iterator(cfg, str(tmp_path / 'out'), seed=0, process_index=0,
                                   process_count=1)
    cfg.packing = 'concat'
    cfg.global_batch_size = 8
    with pytest.raises(DataError, match=r"only 5 training documents; process 7 would get none"):
        loader.make_train_iterator(cfg, str(tmp_path / 'out'), seed=0, process_index=7,
                                   process_count=8)
    with open(os.path.join(tmp_path, 'out', shards.MANIFEST), 'a') as f:
        f.write('garbage')
    with pytest.raises(DataError, match=r'manifest.json:\d+: malformed manifest'):
        loader.make_train_iterator(cfg, str(tmp_path / 'out'), seed=0, process_index=0,
                                   process_count=1)


# ------------------------------------------------------------------ input files and paths


def _lines(n):
    return [json.dumps({'text': doc_text(i)}) for i in range(n)]


@pytest.mark.parametrize('suffix', ['.jsonl', '.jsonl.gz', '.txt'])
def test_invalid_utf8_deep_in_a_file_names_the_line_and_real_byte_offset(tmp_path, suffix):
    bad = b'{"text": "bad \xff byte ' + doc_text(9999).encode() + b'"}\n'
    blob = ''.join(line + '\n' for line in _lines(3000)).encode() + bad
    path = tmp_path / 'x' / f'a{suffix}'
    os.makedirs(path.parent)
    path.write_bytes(gzip.compress(blob) if suffix.endswith('.gz') else blob)
    cfg = data_config([_source(tmp_path, pattern=str(path))])
    with pytest.raises(DataError) as error:
        prepare.prepare(cfg, str(tmp_path / 'out'))
    offset = blob.index(b'\xff')
    assert offset > 500_000
    assert str(error.value).startswith(f'{path}:3001: invalid UTF-8 (invalid start byte: byte '
                                       f'0xff at byte offset {offset:,} of the ')
    assert not os.path.exists(tmp_path / 'out')


@pytest.mark.parametrize('damage', ['truncated', 'not_gzip'])
def test_corrupt_gzip_names_the_file(tmp_path, damage):
    blob = gzip.compress(''.join(line + '\n' for line in _lines(3000)).encode())
    path = tmp_path / 'x' / 'a.jsonl.gz'
    os.makedirs(path.parent)
    path.write_bytes(blob[:len(blob) // 2] if damage == 'truncated' else b'plain text\n' * 9)
    cfg = data_config([_source(tmp_path, pattern=str(path))])
    with pytest.raises(DataError, match=rf'{path}: cannot be read after line \d+ \(.*\); a '
                                        rf'truncated or corrupt gzip file\?'):
        prepare.prepare(cfg, str(tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out')


def test_lone_surrogates_are_dropped_and_counted(tmp_path):
    _good(tmp_path)
    write_jsonl(str(tmp_path / 'x' / 'b.jsonl'), [
        '{"text": "lone \\ud800 high, \\udfff low, a pair \\ud83d\\ude00 kept. %s", '
        '"title": "t\\udc00"}' % doc_text(77)])
    out = str(tmp_path / 'out')
    manifest = prepare.prepare(data_config([_source(tmp_path)]), out)
    assert manifest['sources']['x']['removed']['surrogates_removed'] == 3
    assert manifest['totals']['train']['documents'] == 6
    tok = tokenizer.Tokenizer(os.path.join(out, tokenizer.FILENAME))
    texts = [tok.decode(ids) for ids in records(out, 'x', 'train')]
    kept = [t for t in texts if 'lone' in t]
    assert len(kept) == 1 and 'lone high, low, a pair \U0001F600 kept.' in kept[0]


@pytest.mark.parametrize('content', [b'', b'\x00garbage' * 50, b'{"not": "a model"}'])
def test_tokenizer_that_is_not_sentencepiece_names_the_path(tmp_path, content):
    _good(tmp_path)
    bad = tmp_path / 'tokenizer.model'
    bad.write_bytes(content)
    with pytest.raises(DataError, match=rf"data.tokenizer: tokenizer '{bad}': not a "
                                        rf"SentencePiece model"):
        prepare.prepare(data_config([_source(tmp_path)], tokenizer=str(bad)),
                        str(tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out') and bad.read_bytes() == content


@pytest.mark.parametrize('out', ['afile', 'afile/data'])
def test_data_dir_that_is_a_file_says_a_directory_was_expected(tmp_path, out):
    _good(tmp_path)
    (tmp_path / 'afile').write_text('notes')
    with pytest.raises(DataError, match=rf'{tmp_path}/afile is a file; expected a directory to '
                                        rf'hold the prepared data {tmp_path}/{out} \(data.dir'):
        prepare.prepare(data_config([_source(tmp_path)]), str(tmp_path / out))
    assert (tmp_path / 'afile').read_text() == 'notes'


@pytest.mark.parametrize('damage', ['half', 'empty'])
def test_truncated_shard_is_named(tmp_path, damage):
    _good(tmp_path, n=12)
    cfg = data_config([_source(tmp_path)])
    out = str(tmp_path / 'out')
    prepare.prepare(cfg, out)
    shard = os.path.join(out, shards.shard_name('x', 'train', 0))
    with open(shard, 'rb') as f:
        blob = f.read()
    with open(shard, 'wb') as f:
        f.write(blob[:len(blob) // 2] if damage == 'half' else b'')
    message = rf'{shard}: unreadable ArrayRecord shard \(.+\); .*meditron-prepare with --force'
    with pytest.raises(DataError, match=message):
        loader.make_train_iterator(cfg, out, seed=0, process_index=0, process_count=1)
    with pytest.raises(DataError, match=message):
        shards.read_records(shard)


def test_tokenizer_vocab_larger_than_the_corpus_names_the_key_and_largest_that_works(tmp_path):
    _good(tmp_path, n=8)
    cfg = data_config([_source(tmp_path)], tokenizer='', tokenizer_vocab_size=4000)
    with pytest.raises(DataError) as error:
        prepare.prepare(cfg, str(tmp_path / 'out'))
    found = re.search(r'^data.tokenizer_vocab_size=4000 is more pieces than this corpus yields: '
                      r'set it to at most (\d+) ', str(error.value))
    assert found, str(error.value)
    assert not os.path.exists(tmp_path / 'out')
    largest = int(found.group(1))
    cfg.tokenizer_vocab_size = largest + 1
    with pytest.raises(DataError, match=f'set it to at most {largest} '):
        prepare.prepare(cfg, str(tmp_path / 'out'))
    cfg.tokenizer_vocab_size = largest
    assert prepare.prepare(cfg, str(tmp_path / 'out'))['tokenizer']['vocab_size'] == largest
