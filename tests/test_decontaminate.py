"""Benchmark decontamination in meditron-prepare (data.decontaminate): planted copies removed,
near misses kept, counts and the hits file, workers and slices, cut mode, bad benchmark files.

The benchmark files here are tiny invented items in the published formats that meditron-eval's
loaders read (MedQA JSONL, a PubMedQA directory, an MMLU data directory).
"""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import base
from meditron_jax.data import decontaminate as dc
from meditron_jax.data import decontaminate_io, prepare, shards, sources, tokenizer
from meditron_jax.evaluate import loaders
from tests.data_helpers import all_files, data_config, doc_text, records, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEDQA = [
    dict(question='A 52-year-old gardener notices a slowly enlarging violet nodule on the back '
                  'of her left hand three weeks after pruning rose bushes without gloves, and new '
                  'nodules appear along the forearm in a line. Which organism is the most likely '
                  'cause?',
         options=dict(A='Sporothrix schenckii', B='Nocardia asteroides', C='Bartonella henselae',
                      D='Mycobacterium marinum', E='Pasteurella multocida'),
         answer='Sporothrix schenckii', answer_idx='A'),
    dict(question='A 9-year-old boy has puffy eyelids each morning and tea-coloured urine two '
                  'weeks after a sore throat that resolved without treatment. Which finding on '
                  'blood tests is most expected?',
         options=dict(A='Low C3 complement', B='High platelet count', C='Low sodium',
                      D='High lipase', E='Positive blood culture'),
         answer='Low C3 complement', answer_idx='A'),
]
PUBMEDQA = {
    '91000001': dict(
        QUESTION='Does humming before sleep shorten the time taken to fall asleep in nurses on '
                 'night rotation?',
        CONTEXTS=['Nurses rotating to night shifts often report delayed sleep onset after their '
                  'return to day work.',
                  'Sixty nurses hummed a single low note for five minutes before bed or kept '
                  'their usual routine for four weeks, and sleep onset was timed by wrist '
                  'actigraphy in both groups.'],
        final_decision='maybe', LONG_ANSWER='Humming may help a little.'),
    '91000002': dict(
        QUESTION='Is the colour of a hospital corridor linked to how often visitors get lost?',
        CONTEXTS=['Visitors to a teaching hospital were followed from the entrance to the ward '
                  'they asked for.', 'Corridors painted in a distinct colour per wing saw fewer '
                  'wrong turns than corridors painted in one shared beige tone.'],
        final_decision='yes', LONG_ANSWER='Colour helps visitors find their way.'),
}
MMLU = [['Which virus family includes the agent of mumps?', 'Paramyxoviridae',
         'Picornaviridae', 'Reoviridae', 'Flaviviridae', 'A'],
        ['In a healthy adult at rest, which chamber of the heart generates the highest systolic '
         'pressure during each cardiac cycle?', 'Left ventricle', 'Right ventricle',
         'Left atrium', 'Right atrium', 'A']]


def write_benchmarks(root):
    write_jsonl(os.path.join(root, 'medqa', 'test.jsonl'), MEDQA)
    os.makedirs(os.path.join(root, 'pubmedqa'))
    with open(os.path.join(root, 'pubmedqa', 'ori_pqal.json'), 'w') as f:
        json.dump(PUBMEDQA, f)
    with open(os.path.join(root, 'pubmedqa', 'test_ground_truth.json'), 'w') as f:
        json.dump({k: v['final_decision'] for k, v in PUBMEDQA.items()}, f)
    os.makedirs(os.path.join(root, 'mmlu', 'test'))
    with open(os.path.join(root, 'mmlu', 'test', 'virology_test.csv'), 'w', newline='') as f:
        csv.writer(f).writerows(MMLU)
    return [dict(benchmark='medqa', data=os.path.join(root, 'medqa', 'test.jsonl')),
            dict(benchmark='pubmedqa', data=os.path.join(root, 'pubmedqa')),
            dict(benchmark='mmlu_medical', data=os.path.join(root, 'mmlu'))]


def _question_restyled():
    """MedQA item 1's question with its case, punctuation and spacing changed."""
    q = MEDQA[0]['question']
    return q.upper().replace(',', ' ;').replace(' ', '   ').replace('-', ' - ').replace('?', '!')


EIGHT_WORDS = 'notices a slowly enlarging violet nodule on the'  # 8 words of MedQA item 1
ABSTRACT = ' '.join(PUBMEDQA['91000002']['CONTEXTS'])


def corpus(root):
    """Two sources, several files each (so a 2-slice job splits them); the planted documents
    and their expected hits."""
    web = [{'id': f'w{i}', 'text': doc_text(i, 8)} for i in range(24)]
    web[3] = {'id': 'w3', 'text': f'{doc_text(3, 3)} Case of the week. {_question_restyled()} '
                                  f'Answer at the end. {doc_text(103, 2)}'}
    web[10] = {'id': 'w10', 'text': f'{doc_text(10, 3)} The clinician {EIGHT_WORDS} hand wrist '
                                    f'area today. {doc_text(110, 3)}'}
    web[17] = {'id': 'w17', 'text': f'{doc_text(17, 3)} Quiz: {MMLU[0][0]} {", ".join(MMLU[0][1:5])}.'
                                    f' Also: {MEDQA[1]["question"]} {doc_text(117, 2)}'}
    abstracts = [{'id': f'p{i}', 'text': doc_text(200 + i, 8)} for i in range(12)]
    abstracts[5] = {'id': 'p5', 'title': 'Corridor colours and wayfinding',
                    'text': f'{doc_text(205, 2)} {ABSTRACT}'}
    for part in range(3):
        write_jsonl(os.path.join(root, 'web', f'{part}.jsonl'), web[part * 8:(part + 1) * 8])
    for part in range(2):
        write_jsonl(os.path.join(root, 'pubmed', f'{part}.jsonl'), abstracts[part * 6:(part + 1) * 6])
    hits = [('web', 'w3', '0.jsonl', 4, 'medqa', '1'),
            ('web', 'w17', '2.jsonl', 2, 'medqa', '2'),
            ('web', 'w17', '2.jsonl', 2, 'mmlu_medical', 'virology-1'),
            ('pubmed', 'p5', '0.jsonl', 6, 'pubmedqa', '91000002')]
    return [base.source('web', os.path.join(root, 'web', '*.jsonl'), 0.5, 0.1),
            base.source('pubmed', os.path.join(root, 'pubmed', '*.jsonl'), 0.5, 0.1)], hits


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('decontam'))
    benchmarks = write_benchmarks(os.path.join(root, 'bench'))
    srcs, hits = corpus(os.path.join(root, 'in'))
    return root, benchmarks, srcs, hits


def _cfg(setup, **overrides):
    _, benchmarks, srcs, _ = setup
    return data_config(srcs, **{'decontaminate': benchmarks, **overrides})


def _texts(cfg, out):
    tok = tokenizer.Tokenizer(cfg.tokenizer)
    return {name: [tok.decode(r) for split in shards.SPLITS for r in records(out, name, split)]
            for name in ('web', 'pubmed')}


def _hits(out):
    with open(os.path.join(out, decontaminate_io.HITS_FILE)) as f:
        return [(r['source'], r['document_id'], os.path.basename(r['file']), r['line'],
                 r['benchmark'], r['item_id']) for r in map(json.loads, f)]


@pytest.fixture(scope='module')
def dropped(setup):
    cfg = _cfg(setup)
    out = os.path.join(setup[0], 'drop-1')
    return cfg, out, prepare.prepare(cfg, out)


def test_normalise_and_ngram_hashes():
    assert dc.normalise('Hello,  WORLD!\nIt\u2019s  ﬁne') == ['hello', 'world', 'it', 's', 'fine']
    ascii_text = 'A_b-C d\te9\x01(F)G.h\n' + ''.join(map(chr, range(128)))
    assert dc.normalise(ascii_text) == re.findall(r'\w+', ascii_text.casefold())  # fast path
    a = dc.normalise(MEDQA[0]['question'])
    b = dc.normalise(_question_restyled())
    assert a == b and len(a) > 13
    (la, ha), (lb, hb) = dc.item_ngrams(a, 13), dc.item_ngrams(b, 13)
    assert la == lb == 13 and ha.dtype == np.uint64 and len(ha) == len(a) - 12
    assert np.array_equal(ha, hb) and len(set(ha.tolist())) == len(ha)
    length, short = dc.item_ngrams(['which', 'virus'], 13)
    assert length == 2 and len(short) == 1                  # shorter than n: one whole-item hash
    assert dc.item_ngrams([], 13)[1].size == 0
    index = dc.build_index([('medqa', [loaders.Item('q1', MEDQA[0]['question'], {}, 'A')])], 13)
    assert np.array_equal(index.keys[13], np.sort(ha)) and set(index.owners[13]) == {0}


def test_planted_copies_removed_near_miss_kept(setup, dropped):
    cfg, out, manifest = dropped
    texts = _texts(cfg, out)
    kept = ' '.join(texts['web'] + texts['pubmed'])
    assert 'ENLARGING' not in kept and 'Corridors painted' not in kept and 'mumps' not in kept
    assert EIGHT_WORDS in kept                               # 8 shared words < 13: kept
    assert len(texts['web']) == 24 - 2 and len(texts['pubmed']) == 12 - 1
    # the same 8 words do match at n=8
    items = loaders.load('medqa', setup[1][0]['data'])
    index8 = dc.build_index([('medqa', items)], 8)
    near = [t for t in texts['web'] if EIGHT_WORDS in t]
    assert dc.match(near, index8)[0].items == [0]


def test_counts_and_hits_file(setup, dropped):
    _, out, manifest = dropped
    section = manifest['decontamination']
    assert _hits(out) == setup[3]
    assert section['hits'] == 4 and section['hits_file'] == 'decontamination.jsonl'
    assert section['sources']['web']['documents_removed'] == 2
    assert section['sources']['pubmed']['documents_removed'] == 1
    assert section['benchmarks'] == {
        'medqa': dict(items=2, items_found=2, contamination_rate=1.0),
        'pubmedqa': dict(items=2, items_found=1, contamination_rate=0.5),
        'mmlu_medical': dict(items=2, items_found=1, contamination_rate=0.5)}
    assert manifest['sources']['web']['documents_in'] == 24
    assert manifest['options']['decontamination'] == section['options']
    assert section['options']['ngram'] == 13 and section['options']['mode'] == 'drop'
    assert 'decontamination (13-grams, drop): 3 documents removed' in prepare.summary(manifest)


CONFIG = """from configs import base
def get_config():
    c = base.get_config()
    c.data.sources = {sources!r}
    c.data.tokenizer = {tokenizer!r}
    c.data.clean.min_chars = 50
    c.data.prepare_workers = 1
    return c
"""


def test_same_result_with_2_workers_and_a_2_slice_job(setup, dropped):
    cfg, out, manifest = dropped
    two = os.path.join(setup[0], 'drop-2')
    prepare.prepare(_cfg(setup, prepare_workers=2), two)
    assert all_files(two) == all_files(out)
    # the job array as the README runs it: a config file, the benchmarks on the command line
    config = os.path.join(setup[0], 'config.py')
    with open(config, 'w') as f:
        f.write(CONFIG.format(sources=setup[2], tokenizer=cfg.tokenizer))
    sliced = os.path.join(setup[0], 'sliced')
    cmd = [sys.executable, '-m', 'meditron_jax.data.prepare', f'--config={config}',
           f'--config.data.dir={sliced}',
           f'--config.data.decontaminate={tuple(setup[1])!r}']
    for step in (['--shard', '0/2'], ['--shard', '1/2'], ['--merge']):
        done = subprocess.run(cmd + step, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    assert 'decontamination (13-grams, drop): 3 documents removed' in done.stderr
    merged = shards.read_manifest(sliced)
    assert merged['decontamination'] == manifest['decontamination']
    assert _hits(sliced) == _hits(out)
    for name in ('web', 'pubmed'):
        for split in shards.SPLITS:
            assert (sorted(map(tuple, records(sliced, name, split))) ==
                    sorted(map(tuple, records(out, name, split))))
    assert merged['totals'] == manifest['totals']


def test_option_changes_refused_then_force(setup, dropped):
    cfg, out, manifest = dropped
    assert prepare.prepare(cfg, out) == manifest
    cfg = _cfg(setup, decontaminate_ngram=8)
    with pytest.raises(sources.DataError, match=r'decontamination: prepared .*ngram.*--force'):
        prepare.prepare(cfg, out)
    off = _cfg(setup, decontaminate=[])
    with pytest.raises(sources.DataError, match=r'decontamination: prepared .*config None'):
        prepare.prepare(off, out)
    again = os.path.join(setup[0], 'force')
    prepare.prepare(off, again)
    rebuilt = prepare.prepare(cfg, again, force=True)
    assert rebuilt['decontamination']['options']['ngram'] == 8
    assert rebuilt['decontamination']['sources']['web']['documents_removed'] == 3  # + 8 words
    assert os.path.exists(os.path.join(again, decontaminate_io.HITS_FILE))
    prepare.prepare(off, again, force=True)
    assert sorted(os.listdir(again)) == ['manifest.json', 'shards', 'tokenizer.model']


def test_cut_mode_removes_exactly_the_overlapping_spans(setup):
    text = 'Intro words here. Which virus family includes the agent of mumps? Paramyxoviridae, ' \
           'Picornaviridae, Reoviridae, Flaviviridae. Closing words.'
    items = loaders.load('mmlu_medical', setup[1][2]['data'])
    found = dc.match([text], dc.build_index([('mmlu_medical', items)], 13))[0]
    assert found.items == [0] and found.spans == [(3, 15)]
    assert dc.cut(text, found.spans) == 'Intro words here. Closing words.'
    assert dc.cut('A b c d e', [(0, 2), (3, 4)]) == 'c e'

    cfg = _cfg(setup, decontaminate_mode='cut')
    out = os.path.join(setup[0], 'cut')
    manifest = prepare.prepare(cfg, out)
    texts = _texts(cfg, out)
    w3 = f'{doc_text(3, 3)} Case of the week. Answer at the end. {doc_text(103, 2)}'
    w17 = f'{doc_text(17, 3)} Quiz: Also: {doc_text(117, 2)}'
    assert w3 in texts['web'] and w17 in texts['web'] and len(texts['web']) == 24
    p5 = [t for t in texts['pubmed'] if t.startswith('Corridor colours')]
    assert p5 == [f'Corridor colours and wayfinding\n\n{doc_text(205, 2)}']
    counts = manifest['decontamination']['sources']
    assert counts['web'] == dict(documents_removed=0, documents_cut=2, spans_cut=3,
                                 words_cut=len(dc.normalise(_question_restyled())) +
                                 len(dc.normalise(' '.join(MMLU[0][:5]))) +
                                 len(dc.normalise(MEDQA[1]['question'])))
    assert counts['pubmed']['documents_cut'] == 1
    assert _hits(out) == setup[3]


def test_bad_benchmark_file_named_by_file_and_line(setup, tmp_path):
    bad = write_jsonl(str(tmp_path / 'medqa.jsonl'), [MEDQA[0], MEDQA[1], '{"question": "x",'])
    cfg = _cfg(setup)
    cfg.decontaminate = [dict(benchmark='medqa', data=bad)]
    with pytest.raises(sources.DataError, match=rf'decontaminate\[0\] \(medqa\): {bad}:3: not '
                                                r'valid JSON'):
        prepare.prepare(cfg, str(tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out')
    cfg.decontaminate = [dict(benchmark='medqa5', data=bad)]
    with pytest.raises(sources.DataError, match=r"decontaminate\[0\].benchmark='medqa5': "
                                                r'expected one of'):
        prepare.prepare(cfg, str(tmp_path / 'out'))
    cfg.decontaminate = [dict(benchmark='pubmedqa', data=bad)]
    with pytest.raises(sources.DataError, match=r'no such directory'):
        prepare.prepare(cfg, str(tmp_path / 'out'))


def test_index_cache_reused_damaged_file_rebuilt(setup, dropped, tmp_path, capsys):
    _, out0, manifest0 = dropped
    cache = tmp_path / 'cache'
    cfg = _cfg(setup, decontaminate_cache=str(cache))
    first = prepare.prepare(cfg, str(tmp_path / 'a'))
    assert 'decontamination: index built' in capsys.readouterr().err
    [stored] = os.listdir(cache)
    key = decontaminate_io.cache_key(decontaminate_io.options(cfg))
    assert re.fullmatch(rf'{key}\.[0-9a-f]{{64}}\.npz', stored)

    second = prepare.prepare(cfg, str(tmp_path / 'b'))
    assert 'decontamination: index from the cache' in capsys.readouterr().err
    assert first == second == manifest0            # same manifest as without this cache
    assert all_files(str(tmp_path / 'b')) == all_files(out0)
    # The cache directory is not an output option: the finished output is reused as it is.
    assert prepare.prepare(_cfg(setup, decontaminate_cache=''), out0) == manifest0

    data = bytearray((cache / stored).read_bytes())
    data[len(data) // 2] ^= 1
    (cache / stored).write_bytes(bytes(data))
    third = prepare.prepare(cfg, str(tmp_path / 'c'))
    err = capsys.readouterr().err
    assert re.search(rf'warning: decontamination cache {re.escape(str(cache / stored))}: '
                     r'unreadable \(.*sha256.*\); removing it and rebuilding', err)
    assert 'index built' in err and third == manifest0
    assert os.listdir(cache) == [stored]     # rewritten whole (the npz bytes are reproducible)
    assert (cache / stored).read_bytes() != bytes(data)


def test_index_cache_key_off_and_unwritable(setup, tmp_path, capsys):
    cfg = _cfg(setup, decontaminate_cache='')
    assert decontaminate_io.cache_dir(cfg) == ''
    prepare.prepare(cfg, str(tmp_path / 'out'))
    err = capsys.readouterr().err
    assert 'index built' in err and 'cached as' not in err
    opts = decontaminate_io.options(cfg)
    key = decontaminate_io.cache_key(opts)
    assert decontaminate_io.cache_key({**opts, 'mode': 'cut'}) == key   # matching-only option
    assert decontaminate_io.cache_key({**opts, 'ngram': 8}) != key
    changed = [dict(b, sha256='0' * 64) if b['benchmark'] == 'medqa' else b
               for b in opts['benchmarks']]
    assert decontaminate_io.cache_key({**opts, 'benchmarks': changed}) != key

    blocker = tmp_path / 'not-a-dir'
    blocker.write_text('')
    index = dc.build_index([], 13)
    assert decontaminate_io.write_cached(index, str(blocker / 'cache'), key) is None
    assert 'not writable' in capsys.readouterr().err
    assert decontaminate_io.read_cached(str(blocker / 'cache'), key) is None
