"""The benchmark loaders on the shipped original samples and on every kind of bad input."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from meditron_jax.evaluate import cli, loaders
from meditron_jax.evaluate.loaders import EvalInputError

import eval_helpers as eh

S = eh.SAMPLES


def write_lines(path, rows):
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return str(path)


def test_medqa_fields_and_option_counts():
    items = loaders.load('medqa', os.path.join(S, 'medqa', 'test.jsonl'))
    assert len(items) == 4 and all(list(i.options) == list('ABCDE') for i in items)
    first = items[0]
    assert first.id == '1' and first.answer == 'A' and first.question.startswith('A 34-year-old')
    assert first.context is None and first.subject is None
    items4 = loaders.load('medqa4', os.path.join(S, 'medqa4', 'test.jsonl'))
    assert all(list(i.options) == list('ABCD') for i in items4)
    with pytest.raises(EvalInputError, match=r'test.jsonl:1: expected 4 options'):
        loaders.load('medqa4', os.path.join(S, 'medqa', 'test.jsonl'))


def test_medmcqa_cop_bases_are_detected(tmp_path):
    one_based = loaders.load('medmcqa', os.path.join(S, 'medmcqa', 'dev.json'))
    assert [i.answer for i in one_based] == ['B', 'A', 'D', 'B']
    assert one_based[0].id == 'smp-dev-0000' and one_based[0].subject == 'Anatomy'
    assert one_based[0].explanation.startswith('The phrenic nerve')
    rows = [json.loads(x) for x in open(os.path.join(S, 'medmcqa', 'dev.json'))]
    zero = write_lines(tmp_path / 'hf.json', [dict(r, cop=r['cop'] - 1) for r in rows])
    assert [i.answer for i in loaders.load('medmcqa', zero)] == ['B', 'A', 'D', 'B']
    ambiguous = write_lines(tmp_path / 'amb.json', [dict(r, cop=2) for r in rows])
    with pytest.raises(EvalInputError, match='amb.json: cannot tell.*--cop_base'):
        loaders.load('medmcqa', ambiguous)
    assert {i.answer for i in loaders.load('medmcqa', ambiguous, cop_base=0)} == {'C'}
    assert {i.answer for i in loaders.load('medmcqa', ambiguous, cop_base=1)} == {'B'}
    with pytest.raises(EvalInputError, match='--cop_base 0 but .* 1-based'):
        loaders.load('medmcqa', os.path.join(S, 'medmcqa', 'dev.json'), cop_base=0)


def test_pubmedqa_keeps_only_the_ground_truth_ids():
    test = loaders.load('pubmedqa', os.path.join(S, 'pubmedqa'))
    assert [(i.id, i.answer) for i in test] == [('90000001', 'yes'), ('90000002', 'no'),
                                                ('90000003', 'maybe')]
    assert list(test[0].options) == ['yes', 'no', 'maybe']
    assert test[0].context.count('\n') == 1          # both CONTEXTS, joined by a newline
    train = loaders.load('pubmedqa', os.path.join(S, 'pubmedqa'), split='train')
    assert {i.id for i in train} == {'90000004', '90000005', '90000006'}


def test_mmlu_subjects_and_missing_ones_warn(caplog, tmp_path):
    shutil.copytree(os.path.join(S, 'mmlu'), tmp_path / 'mmlu')   # paths not warned about yet
    with caplog.at_level(logging.WARNING):
        items = loaders.load('mmlu_medical', str(tmp_path / 'mmlu'))
    assert {i.subject for i in items} == {'anatomy', 'virology'} and len(items) == 6
    assert items[0].id == 'anatomy-1' and items[0].answer == 'D'
    assert 'clinical_knowledge' in caplog.text and 'skipped' in caplog.text
    dev = loaders.load('mmlu_medical', os.path.join(S, 'mmlu'), split='dev')
    assert len(dev) == 4


MEDQA_ROW = dict(question='Q?', options=dict(A='a', B='b', C='c', D='d', E='e'), answer='c',
                 answer_idx='C')


@pytest.mark.parametrize('row,message', [
    ({k: v for k, v in MEDQA_ROW.items() if k != 'question'}, r"bad.jsonl:2: missing field "
                                                               r"'question'"),
    (dict(MEDQA_ROW, answer_idx='F'), r"bad.jsonl:2: answer_idx 'F' is not among the options"),
    (dict(MEDQA_ROW, options=dict(A='a', B='b')), r'bad.jsonl:2: expected 5 options'),
])
def test_bad_medqa_lines_name_file_and_line(tmp_path, row, message):
    path = write_lines(tmp_path / 'bad.jsonl', [MEDQA_ROW, row])
    with pytest.raises(EvalInputError, match=message):
        loaders.load('medqa', path)


def test_other_bad_inputs(tmp_path):
    empty = tmp_path / 'empty.jsonl'
    empty.write_text('\n')
    with pytest.raises(EvalInputError, match='empty.jsonl: empty file'):
        loaders.load('medqa', str(empty))
    (tmp_path / 'notjson.jsonl').write_text('{"question": \n')
    with pytest.raises(EvalInputError, match='notjson.jsonl:1: not valid JSON'):
        loaders.load('medqa', str(tmp_path / 'notjson.jsonl'))
    with pytest.raises(EvalInputError, match="unknown benchmark 'medxqa'"):
        loaders.load('medxqa', str(empty))
    rows = [json.loads(x) for x in open(os.path.join(S, 'medmcqa', 'dev.json'))]
    dup = write_lines(tmp_path / 'dup.json', rows[:2] + [dict(rows[2], id=rows[0]['id'])])
    with pytest.raises(EvalInputError, match="dup.json: id 'smp-dev-0000' appears more than"):
        loaders.load('medmcqa', dup)
    bad = write_lines(tmp_path / 'mc.json', rows[:1] + [dict(rows[1], cop=7)])
    with pytest.raises(EvalInputError, match=r'mc.json:2: cop 7 is not an option index'):
        loaders.load('medmcqa', bad)
    shutil.copytree(os.path.join(S, 'mmlu'), tmp_path / 'mmlu')
    with open(tmp_path / 'mmlu' / 'test' / 'virology_test.csv', 'a') as f:
        f.write('Q,a,b,c,d,F\n')
    with pytest.raises(EvalInputError, match=r'virology_test.csv:4: answer .F. is not among'):
        loaders.load('mmlu_medical', str(tmp_path / 'mmlu'))
    with open(tmp_path / 'mmlu' / 'test' / 'anatomy_test.csv', 'w') as f:
        f.write('Q,a,b,c,D\n')
    with pytest.raises(EvalInputError, match=r'anatomy_test.csv:1: expected 6 columns'):
        loaders.load('mmlu_medical', str(tmp_path / 'mmlu'))
    shutil.copytree(os.path.join(S, 'pubmedqa'), tmp_path / 'pq')
    (tmp_path / 'pq' / 'test_ground_truth.json').write_text('{"90000001": "perhaps"}')
    with pytest.raises(EvalInputError, match=r"entry 90000001: answer 'perhaps' is not among"):
        loaders.load('pubmedqa', str(tmp_path / 'pq'))
    (tmp_path / 'pq' / 'test_ground_truth.json').write_text('{"1": "yes"}')
    with pytest.raises(EvalInputError, match=r"ids \['1'\] are not in"):
        loaders.load('pubmedqa', str(tmp_path / 'pq'))


def test_cli_rejects_unknown_benchmark_mode_and_bad_data(tmp_path, capsys):
    for argv, message in [(['--benchmark', 'medxqa'], "invalid choice: 'medxqa'"),
                          (['--benchmark', 'medqa', '--mode', 'vibes'], "invalid choice: 'vibes'"),
                          (['--benchmark', 'medqa'], '--benchmark medqa needs --data')]:
        with pytest.raises(SystemExit):
            cli.parse_args(['--model', 'm', '--out', str(tmp_path)] + argv)
        assert message in capsys.readouterr().err
    # Bad data fails before any model is loaded (the model path does not even exist).
    (tmp_path / 'e.jsonl').write_text('')
    proc = subprocess.run([sys.executable, '-m', 'meditron_jax.evaluate', '--model', 'nowhere',
                           '--benchmark', 'medqa', '--data', str(tmp_path / 'e.jsonl'), '--out',
                           str(tmp_path / 'o')], cwd=eh.REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and 'e.jsonl: empty file' in proc.stderr
    assert not (tmp_path / 'o').exists()
