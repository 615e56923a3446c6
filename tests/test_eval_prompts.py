"""Golden prompt strings per benchmark and style, few-shot selection per seed, --chat wrapping, and
the benchmark -> SFT converter presenting exactly what eval --chat gives the model."""

import json
import os
import subprocess
import sys

import pytest

from meditron_jax.data import chat
from meditron_jax.evaluate import loaders, prompts, runner, to_sft
from meditron_jax.evaluate.loaders import Item

import eval_helpers as eh

MCQ = Item(id='1', question='Which organ makes bile? ', options=dict(A='Liver', B='Lung',
                                                                     C='Skin', D='Bone'),
           answer='A', subject='clinical_knowledge')
PQA = Item(id='9', question='Does it work?', options=dict(yes='yes', no='no', maybe='maybe'),
           answer='maybe', context='First part.\nSecond part.')
DEMO = Item(id='2', question='Where is the femur?', options=dict(A='Arm', B='Thigh', C='Neck',
                                                                 D='Ear'), answer='B',
            subject='clinical_knowledge')


def test_harness_templates():
    assert prompts.render_prompt('medqa4', 'harness', MCQ) == (
        'Question: Which organ makes bile?\nA. Liver\nB. Lung\nC. Skin\nD. Bone\nAnswer:')
    assert prompts.render_prompt('medmcqa', 'harness', MCQ) == (
        'Question: Which organ makes bile?\nChoices:\nA. Liver\nB. Lung\nC. Skin\nD. Bone\n'
        'Answer:')
    assert prompts.render_prompt('pubmedqa', 'harness', PQA) == (
        'Abstract: First part.\nSecond part.\nQuestion: Does it work?\nAnswer:')
    assert prompts.render_prompt('mmlu_medical', 'harness', MCQ, [DEMO]) == (
        'The following are multiple choice questions (with answers) about clinical knowledge.'
        '\n\nWhere is the femur?\nA. Arm\nB. Thigh\nC. Neck\nD. Ear\nAnswer: B\n\n'
        'Which organ makes bile?\nA. Liver\nB. Lung\nC. Skin\nD. Bone\nAnswer:')
    assert prompts.continuations(MCQ, chat_mode=False) == [' A', ' B', ' C', ' D']
    assert prompts.continuations(PQA, chat_mode=False) == [' yes', ' no', ' maybe']


def test_meditron_templates():
    medqa = prompts.render_prompt('medqa4', 'meditron', MCQ, [DEMO])
    assert medqa.startswith('You are a medical doctor taking the US Medical Licensing '
                            'Examination.')
    assert 'select one correct answer from A to D.' in medqa
    assert medqa.endswith(
        'medical guidelines.\n\nQuestion: Where is the femur?\n\nOptions:\nA. Arm\nB. Thigh\n'
        'C. Neck\nD. Ear\nThe answer is: B\n\nQuestion: Which organ makes bile? \n\nOptions:\n'
        'A. Liver\nB. Lung\nC. Skin\nD. Bone\nThe answer is:')
    pqa = prompts.render_prompt('pubmedqa', 'meditron', PQA)
    assert pqa == (
        'As an expert doctor in clinical science and medical knowledge, can you tell me if the '
        'following statement is correct? Answer yes, no, or maybe.\n\nFirst part.\nSecond part.'
        '\n\nQuestion: Does it work?\n\nOptions:\nyes\nno\nmaybe\nThe answer is:')
    cot = prompts.render_prompt('medqa', 'meditron', MCQ, cot=True)
    assert cot.endswith("D. Bone\nLet's think step by step.")
    assert 'about clinical knowledge.' in prompts.render_prompt('mmlu_medical', 'meditron', MCQ)


def test_chat_wraps_the_prompt_and_drops_the_leading_space():
    text = prompts.model_input('Q?\nAnswer:', chat_mode=True)
    assert text == '<|im_start|>user\nQ?\nAnswer:<|im_end|>\n<|im_start|>assistant\n'
    assert prompts.continuations(MCQ, chat_mode=True) == ['A', 'B', 'C', 'D']


def test_fewshot_demos_are_stable_per_seed_and_shared_by_items():
    pool = loaders.load('medqa', os.path.join(eh.SAMPLES, 'medqa', 'train.jsonl'))
    first = runner.select_demos(pool, 2, 1234)
    assert [d.id for d in first] == [d.id for d in runner.select_demos(pool, 2, 1234)]
    others = {tuple(d.id for d in runner.select_demos(pool, 2, s)) for s in (432, 32, 7, 8)}
    assert len(others | {tuple(d.id for d in first)}) > 1
    items = loaders.load('medqa', os.path.join(eh.SAMPLES, 'medqa', 'test.jsonl'))
    texts = runner.build_prompts('medqa', 'harness', items, pool, 2, 1234, False, False)
    demo_part = texts[0][:texts[0].index(items[0].question)]
    assert all(t.startswith(demo_part) for t in texts)
    assert all(d.question in demo_part for d in first)
    with pytest.raises(ValueError, match='--shots 9 but the few-shot pool has only 4'):
        runner.select_demos(pool, 9, 1)
    mmlu_dev = loaders.load('mmlu_medical', os.path.join(eh.SAMPLES, 'mmlu'), split='dev')
    assert {d.subject for d in runner.select_demos(mmlu_dev, 2, 5, 'virology')} == {'virology'}


@pytest.mark.parametrize('benchmark,data', [
    ('medqa', 'medqa/train.jsonl'), ('medmcqa', 'medmcqa/train.json'), ('pubmedqa', 'pubmedqa'),
    ('mmlu_medical', 'mmlu')])
def test_sft_conversation_renders_to_what_eval_chat_gives_the_model(tmp_path, benchmark, data):
    out = tmp_path / 'sft.jsonl'
    proc = subprocess.run([sys.executable, '-m', 'meditron_jax.evaluate.to_sft', '--benchmark',
                           benchmark, '--data', os.path.join(eh.SAMPLES, data), '--out',
                           str(out), '--prompt_style', 'harness'],
                          cwd=eh.REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    convs = [json.loads(x) for x in out.open()]
    split = to_sft.DEFAULT_SPLIT.get(benchmark, 'test')
    items = loaders.load(benchmark, os.path.join(eh.SAMPLES, data), split=split)
    assert len(convs) == len(items)
    texts = runner.build_prompts(benchmark, 'harness', items, [], 0, 1234, True, False)
    for conv, item, text in zip(convs, items, texts):
        rendered = chat.render(conv['messages'])
        assert rendered.startswith(text)
        answer = rendered[len(text):]
        assert answer.startswith(item.answer) and answer.endswith(chat.IM_END + '\n')
        if item.explanation:
            assert item.explanation.strip() in answer
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.')]


def test_sft_converter_bad_input_writes_nothing(tmp_path):
    (tmp_path / 'bad.jsonl').write_text('{"question": "Q"}\n')
    proc = subprocess.run([sys.executable, '-m', 'meditron_jax.evaluate.to_sft', '--benchmark',
                           'medqa', '--data', str(tmp_path / 'bad.jsonl'), '--out',
                           str(tmp_path / 'sft.jsonl')], cwd=eh.REPO, capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert "bad.jsonl:1: missing field 'options'" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ['bad.jsonl']
