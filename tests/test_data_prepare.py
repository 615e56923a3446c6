"""meditron-prepare: round trip, cleaning, dedup, split stability, determinism, slices."""

import glob
import json
import os
import subprocess
import sys

import pytest

from configs import base
from meditron_jax.data import clean, prepare, shards, slices, sources, tokenizer
from tests.data_helpers import (all_files, data_config, debug_data_config, doc_text,
                                prepared_debug, records, write_jsonl)


def _expected_documents(cfg):
    """Each source's cleaned texts in input order, first copies only (exact dedup by hand)."""
    options = clean.CleanOptions.from_config(cfg.clean)
    seen, out = set(), {}
    for i, source in enumerate(sources.parse_sources(cfg.sources)):
        texts = []
        for path in sources.resolve_files(source, i):
            with open(path) as f:
                for line in f:
                    record = json.loads(line)
                    text = clean.clean(record['text'], record.get('title', ''), options,
                                       clean.CleanStats())
                    key = text and clean.digest(clean.dedup_words(text))
                    if text is not None and key not in seen:
                        seen.add(key)
                        texts.append(text)
        out[source.name] = texts
    return out


def test_round_trip_token_for_token():
    data_dir = prepared_debug()
    cfg = debug_data_config()
    tok = tokenizer.Tokenizer(os.path.join(data_dir, tokenizer.FILENAME))
    for name, texts in _expected_documents(cfg).items():
        stored = records(data_dir, name, 'train') + records(data_dir, name, 'validation')
        assert sorted(map(tuple, stored)) == sorted(tuple(tok.encode(t)) for t in texts)
        decoded = sorted(tok.decode(ids) for ids in stored)
        assert decoded == sorted(texts)
        assert all(ids[0] == tok.bos_id and ids[-1] == tok.eos_id and
                   list(ids).count(tok.eos_id) == 1 for ids in stored)


def test_manifest_counts_match_shards_and_cleaning_removed_something():
    data_dir = prepared_debug()
    manifest = shards.read_manifest(data_dir)
    assert manifest['dtype'] == 'uint16' and manifest['tokenizer']['vocab_size'] == 2048
    for name, info in manifest['sources'].items():
        for split in shards.SPLITS:
            stored = records(data_dir, name, split)
            assert info['splits'][split]['documents'] == len(stored)
            assert info['splits'][split]['tokens'] == sum(map(len, stored))
    removed = {k: sum(s['removed'][k] for s in manifest['sources'].values())
               for k in manifest['sources']['guidelines']['removed']}
    # The shipped corpus plants these (scripts/make_corpus.py).
    assert removed['exact_duplicates'] == 3 and removed['too_short'] == 2
    assert removed['urls_removed'] >= 2 and removed['reference_sections_removed'] == 2


def test_cleaning_steps():
    options = clean.CleanOptions(min_chars=10)
    stats = clean.CleanStats()
    text = ('Intro\u00a0text  with   spaces.\r\nSee https://example.org/a?b=1, or www.example.com.'
            '\n\n\n\nReferences\n1. A. Author. Title.\n\n# Next section\nKept.')
    out = clean.clean(text, 'The title', options, stats)
    assert out == ('The title\n\nIntro text with spaces.\nSee , or .\n\n# Next section\nKept.')
    assert (stats.urls_removed, stats.reference_sections_removed) == (2, 1)
    assert clean.clean('too short', '', options, stats) is None and stats.too_short == 1
    raw = clean.clean(text, '', clean.CleanOptions(False, False, False, False, 0), stats)
    assert raw == text


def _dup_corpus(tmp_path):
    a, b, c = doc_text(1, 12), doc_text(2, 12), doc_text(3, 12)
    near_b = b.replace('.', ' indeed.', 1)           # one word added: Jaccard of 5-grams ~0.9
    write_jsonl(str(tmp_path / 'in' / 'x.jsonl'), [
        {'text': a}, {'text': b}, {'text': a.upper().replace(' ', '   ')},  # exact (normalised)
        {'text': c}, {'text': near_b}, {'text': a}])
    return data_config([base.source('x', str(tmp_path / 'in' / '*.jsonl'), 1.0, 0.0)])


@pytest.mark.parametrize('mode,kept,exact,near', [('exact', 4, 2, 0), ('minhash', 3, 2, 1),
                                                  ('none', 6, 0, 0)])
def test_dedup_removes_planted_duplicates(tmp_path, mode, kept, exact, near):
    cfg = _dup_corpus(tmp_path)
    cfg.dedup = mode
    manifest = prepare.prepare(cfg, str(tmp_path / 'out'))
    info = manifest['sources']['x']
    assert info['splits']['train']['documents'] == kept
    removed = info['removed']
    assert (removed['exact_duplicates'], removed['near_duplicates']) == (exact, near)
    tok = tokenizer.Tokenizer(cfg.tokenizer)
    texts = [tok.decode(r) for r in records(str(tmp_path / 'out'), 'x', 'train')]
    assert texts[:2] == [doc_text(1, 12), doc_text(2, 12)]   # first copies kept, in input order


def test_split_is_stable_when_rerun_or_files_added(tmp_path):
    docs = [{'text': doc_text(i)} for i in range(200)]
    write_jsonl(str(tmp_path / 'in' / 'a.jsonl'), docs)
    cfg = data_config([base.source('x', str(tmp_path / 'in' / '*.jsonl'), 1.0, 0.2)])
    prepare.prepare(cfg, str(tmp_path / 'one'))
    held_out = {tuple(r) for r in records(str(tmp_path / 'one'), 'x', 'validation')}
    assert 20 <= len(held_out) <= 60                 # about 20% of 200
    prepare.prepare(cfg, str(tmp_path / 'again'))
    assert all_files(str(tmp_path / 'one')) == all_files(str(tmp_path / 'again'))

    write_jsonl(str(tmp_path / 'in' / '0-new.jsonl'),
                [{'text': doc_text(i)} for i in range(200, 300)])
    prepare.prepare(cfg, str(tmp_path / 'more'))
    held_out_more = {tuple(r) for r in records(str(tmp_path / 'more'), 'x', 'validation')}
    tok = tokenizer.Tokenizer(cfg.tokenizer)
    old = {tuple(tok.encode(clean.clean(d['text'], '', clean.CleanOptions(min_chars=50),
                                        clean.CleanStats()))) for d in docs}
    assert held_out_more & old == held_out
    assert len(held_out_more) > len(held_out)


def test_output_identical_whatever_the_number_of_workers(tmp_path):
    cfg = debug_data_config()
    cfg.dedup = 'minhash'
    outputs = []
    for workers in (1, 2):
        cfg.prepare_workers = workers
        prepare.prepare(cfg, str(tmp_path / f'w{workers}'))
        outputs.append(all_files(str(tmp_path / f'w{workers}')))
    assert outputs[0] == outputs[1]
    assert any(k.endswith('.array_record') for k in outputs[0])


def test_rerun_does_nothing_other_options_fail_force_rebuilds(tmp_path):
    write_jsonl(str(tmp_path / 'in' / 'a.jsonl'), [{'text': doc_text(i)} for i in range(20)])
    cfg = data_config([base.source('x', str(tmp_path / 'in' / '*.jsonl'), 1.0, 0.1)])
    out = str(tmp_path / 'out')
    first = prepare.prepare(cfg, out)
    assert prepare.is_prepared(out)
    stamp = os.stat(os.path.join(out, shards.MANIFEST)).st_mtime_ns
    assert prepare.prepare(cfg, out) == first
    assert os.stat(os.path.join(out, shards.MANIFEST)).st_mtime_ns == stamp
    cfg.clean.min_chars = 10_000
    with pytest.raises(sources.DataError, match=r'clean: prepared .*min_chars.*--force'):
        prepare.prepare(cfg, out)
    cfg.clean.min_chars = 50
    cfg.dedup = 'none'
    rebuilt = prepare.prepare(cfg, out, force=True)
    assert rebuilt['options']['dedup'] == 'none'
    assert sorted(os.listdir(out)) == ['manifest.json', 'shards', 'tokenizer.model']


def test_slices_and_merge_equal_a_single_run(tmp_path):
    # 4 files, one duplicate across files that land in different slices.
    for f in range(4):
        docs = [{'text': doc_text(100 * f + i)} for i in range(15)]
        if f == 3:
            docs.append({'text': doc_text(0)})           # also in file 0 (slice 0)
        write_jsonl(str(tmp_path / 'in' / f'{f}.jsonl'), docs)
    write_jsonl(str(tmp_path / 'in2' / 'r.jsonl'), [{'text': doc_text(1000 + i)} for i in range(9)])
    cfg = data_config([base.source('x', str(tmp_path / 'in' / '*.jsonl'), 0.8, 0.2),
                       base.source('y', str(tmp_path / 'in2' / '*.jsonl'), 0.2, 0.2)])
    single = prepare.prepare(cfg, str(tmp_path / 'single'))
    sliced = str(tmp_path / 'sliced')
    for i in range(2):
        slices.prepare_slice(cfg, sliced, i, 2)
    with pytest.raises(sources.DataError, match=r'slices \[1\] of 2 are missing'):
        slices.prepare_slice(cfg, sliced, 0, 2)      # complete already: does nothing
        os.rename(slices.slice_dir(sliced, 1, 2), str(tmp_path / 'aside'))
        slices.merge(cfg, sliced)
    os.rename(str(tmp_path / 'aside'), slices.slice_dir(sliced, 1, 2))
    merged = slices.merge(cfg, sliced)
    for name in ('x', 'y'):
        for split in shards.SPLITS:
            assert (sorted(map(tuple, records(sliced, name, split))) ==
                    sorted(map(tuple, records(str(tmp_path / 'single'), name, split))))
    assert merged['sources']['x']['removed']['exact_duplicates'] == 1
    assert merged['totals'] == single['totals']
    assert merged['options'] == single['options']
    assert sorted(os.listdir(sliced)) == ['manifest.json', 'shards', 'tokenizer.model']


def test_slices_need_a_given_tokenizer(tmp_path):
    cfg = debug_data_config()
    with pytest.raises(sources.DataError, match='--shard needs data.tokenizer'):
        slices.prepare_slice(cfg, str(tmp_path), 0, 2)
    path = slices.train_tokenizer_only(cfg, str(tmp_path))
    assert tokenizer.file_sha256(path) == shards.read_manifest(prepared_debug())['tokenizer'][
        'sha256']


def test_given_tokenizer_gets_the_special_tokens(tmp_path):
    base_model = str(tmp_path / 'plain.model')
    tokenizer.train([doc_text(i) for i in range(300)], base_model[:-6], 400)
    write_jsonl(str(tmp_path / 'in' / 'a.jsonl'),
                [{'text': doc_text(i) + ' As shown [BIB_REF] and [TABLE].'} for i in range(5)])
    cfg = data_config([base.source('x', str(tmp_path / 'in' / '*.jsonl'), 1.0, 0.0)],
                      tokenizer=base_model)
    manifest = prepare.prepare(cfg, str(tmp_path / 'out'))
    tok = tokenizer.Tokenizer(str(tmp_path / 'out' / tokenizer.FILENAME))
    assert tok.vocab_size == 400 + len(cfg.special_tokens) == manifest['tokenizer']['vocab_size']
    plain = tokenizer.Tokenizer(base_model)
    assert plain.encode('renal dose') == tok.encode('renal dose')   # old ids unchanged
    bib = tok.piece_to_id('[BIB_REF]')
    assert bib >= 400 and bib in records(str(tmp_path / 'out'), 'x', 'train')[0]


def test_command_line(tmp_path):
    out = str(tmp_path / 'data')
    cmd = [sys.executable, '-m', 'meditron_jax.data.prepare', '--config', 'configs/debug.py',
           f'--config.data.dir={out}', '--config.data.prepare_workers=2']
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 'guidelines' in done.stderr and 'exact_duplicates=2' in done.stderr
    assert all_files(out) == all_files(prepared_debug())    # 2 workers == 1 worker
    bad = cmd[:-1] + ['--config.data.clean.min_chars=5', '--shard', '3/2']
    done = subprocess.run(bad, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--shard='3/2': expected 0 <= i < n" in done.stderr
    assert not glob.glob(os.path.join(out, '.tmp-*'))
