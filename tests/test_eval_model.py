"""meditron-eval's forward-pass modes on a real (tiny, random) model: likelihood scores equal an
independent transformers computation, top_token looks only at the labels' first tokens within the
true vocabulary, and the command writes its files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers

import meditron_jax
from meditron_jax import sharding
from meditron_jax.convert import hf
from meditron_jax.evaluate import batching, loaders, runner, scoring

import eval_helpers as eh

MEDQA = os.path.join(eh.SAMPLES, 'medqa')


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp('eval_model')
    ckpt, tok = eh.build(str(d))
    hf_dir = hf.export_hf(ckpt, str(d / 'hf'))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    model = meditron_jax.load(ckpt, mesh=sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1)))
    sp = spm.SentencePieceProcessor(model_file=tok)
    return dict(ckpt=ckpt, tok=tok, torch=torch_model, model=model, sp=sp,
                scorer=batching.Scorer(model, batch_size=8))


def torch_logprobs(torch_model, ids):
    with torch.no_grad():
        logits = torch_model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def torch_loglik(torch_model, sp, prompt, continuation):
    """The harness's rule, written out independently: trailing prompt whitespace moves to the
    continuation; continuation ids = whole[len(context):]."""
    stripped = prompt.rstrip()
    continuation = prompt[len(stripped):] + continuation
    context = [sp.bos_id()] + sp.encode(stripped)
    whole = [sp.bos_id()] + sp.encode(stripped + continuation)
    logp = torch_logprobs(torch_model, whole)
    return sum(logp[i - 1, whole[i]] for i in range(len(context), len(whole)))


@pytest.mark.parametrize('chat_mode,style,shots', [(False, 'harness', 1), (True, 'meditron', 0)])
def test_likelihood_scores_equal_transformers(built, chat_mode, style, shots):
    items = loaders.load_medqa(os.path.join(MEDQA, 'test.jsonl'))
    pool = loaders.load_medqa(os.path.join(MEDQA, 'train.jsonl'))
    tok = runner.SPTokenizer(built['sp'])
    texts = runner.build_prompts('medqa', style, items, pool, shots, 1234, chat_mode, False)
    records = runner.score_options(built['scorer'], tok, items, texts, 'likelihood', chat_mode,
                                   1234)
    rows = []
    for text, rec in zip(texts, records):
        pairs = [scoring.continuation_ids(tok.encode, tok.bos_id, text, c)
                 for c in rec['continuations']]
        rows += batching.option_rows(pairs[0][0], [cont for _, cont in pairs])[0]
    assert len(rows) < 5 * len(items)                                 # options share a prompt
    bins = batching.pack([len(r.tokens) for r in rows], built['scorer'].seq_len_for(rows))
    assert len(bins) < len(rows)                                      # rows really were packed
    for rec, text in zip(records, texts):
        expected = [torch_loglik(built['torch'], built['sp'], text, c)
                    for c in rec['continuations']]
        np.testing.assert_allclose(rec['scores'], expected, rtol=1e-4, atol=2e-3)
        assert rec['prediction'] == 'ABCDE'[int(np.argmax(expected))]
        assert rec['prompt'] == text
        assert text.startswith('<|im_start|>user\n') == chat_mode


def test_top_token_is_the_next_token_distribution_restricted_to_labels(built):
    items = loaders.load_pubmedqa(os.path.join(eh.SAMPLES, 'pubmedqa'))
    tok = runner.SPTokenizer(built['sp'])
    texts = runner.build_prompts('pubmedqa', 'harness', items, [], 0, 1, False, False)
    records = runner.score_options(built['scorer'], tok, items, texts, 'top_token', False, 1)
    for rec, text in zip(records, texts):
        context = [built['sp'].bos_id()] + built['sp'].encode(text.rstrip())
        label_ids = [built['sp'].encode(text.rstrip() + ' ' + label)[len(context) - 1]
                     for label in ('yes', 'no', 'maybe')]
        logp = torch_logprobs(built['torch'], context)[-1]
        assert logp.shape[0] == eh.TOKENIZER_VOCAB      # transformers sees only the true vocab
        np.testing.assert_allclose(rec['scores'], logp[label_ids], rtol=1e-4, atol=1e-3)
        assert rec['prediction'] == ('yes', 'no', 'maybe')[int(np.argmax(logp[label_ids]))]
        assert rec['continuations'] == [' yes', ' no', ' maybe']


def test_cli_all_benchmarks_writes_predictions_summary_and_results(built, tmp_path):
    out = tmp_path / 'out'
    proc = subprocess.run(
        [sys.executable, '-m', 'meditron_jax.evaluate', '--model', built['ckpt'],
         '--tokenizer', built['tok'], '--benchmark', 'all', '--data_dir', eh.SAMPLES,
         '--shots', '1', '--seeds', '7,8', '--out', str(out), '--batch_size', '2',
         '--prompt_style', 'harness', '--limit', '3'],
        cwd=eh.REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'medqa: 3 items (first 3)' in proc.stdout
    for bench, n in [('medqa', 3), ('medqa4', 3), ('medmcqa', 3), ('pubmedqa', 3),
                     ('mmlu_medical', 3)]:
        summary = json.loads((out / bench / 'summary.json').read_text())
        lines = [json.loads(x) for x in (out / bench / 'predictions.jsonl').open()]
        assert len(lines) == 2 * n and summary['n'] == n
        assert {'id', 'prompt', 'options', 'answer', 'prediction', 'correct', 'continuations',
                'scores'} <= set(lines[0])
        assert summary['accuracy'] == pytest.approx(np.mean([r['correct'] for r in lines]))
        assert (summary['benchmark'], summary['mode'], summary['shots'], summary['seeds']) == (
            bench, 'likelihood', 1, [7, 8])
        assert set(summary['per_seed']) == {'7', '8'} and 'accuracy_norm' in summary
        lo, hi = summary['ci95']
        assert lo <= summary['accuracy'] <= hi
        assert len(summary['tokenizer_sha256']) == 64
    summary = json.loads((out / 'mmlu_medical' / 'summary.json').read_text())
    assert set(summary['per_subject']) == {'anatomy'}
    table = (out / 'results.md').read_text()
    assert table.splitlines()[0] == ('| Model | MMLU-Medical | PubMedQA | MedMCQA | MedQA | '
                                     'MedQA-4-Option | Avg |')
    assert not [f for f in os.listdir(out / 'medqa') if f.startswith('.')]   # no temp files


def test_a_failed_run_leaves_no_summary(built, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'summary.json').write_text('{"accuracy": 0.9}')      # from an earlier run
    proc = subprocess.run(
        [sys.executable, '-m', 'meditron_jax.evaluate', '--model', built['ckpt'],
         '--tokenizer', built['tok'], '--benchmark', 'medqa', '--data',
         os.path.join(MEDQA, 'test.jsonl'), '--fewshot_data', os.path.join(MEDQA, 'train.jsonl'),
         '--shots', '9', '--out', str(out)], cwd=eh.REPO, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode != 0
    assert '--shots 9 but the few-shot pool has only 4 items' in proc.stderr
    assert os.listdir(out) == []
