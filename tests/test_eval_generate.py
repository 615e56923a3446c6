"""meditron-eval's generative modes (generate, cot, sc_cot) end to end, through
``Model.generate`` (issue 9's contract: token-id prompts -> new token ids, greedy at temperature
0, seeded sampling otherwise). Greedy outputs are checked against transformers' own greedy
decoding of the same prompt ids."""

import json
import os
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch
import transformers

import meditron_jax
from meditron_jax import sharding
from meditron_jax.convert import hf
from meditron_jax.evaluate import loaders, runner, scoring

import eval_helpers as eh

pytestmark = pytest.mark.skipif(not hasattr(meditron_jax.Model, 'generate'),
                                reason='needs Model.generate (the generation issue)')
NEW_TOKENS = 6


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp('eval_generate')
    ckpt, tok = eh.build(str(d))
    model = meditron_jax.load(ckpt, mesh=sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1)))
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(
        hf.export_hf(ckpt, str(d / 'hf'))).float().eval()
    return dict(ckpt=ckpt, tok=tok, model=model, torch=torch_model,
                sp=spm.SentencePieceProcessor(model_file=tok))


def test_generate_mode_is_greedy_decoding_of_the_exact_prompt(built):
    items = loaders.load('pubmedqa', os.path.join(eh.SAMPLES, 'pubmedqa'))
    tok = runner.SPTokenizer(built['sp'])
    texts = runner.build_prompts('pubmedqa', 'harness', items, [], 0, 1, False, False)
    records = runner.generate_records(built['model'], tok, items, texts, 'generate', 1,
                                      NEW_TOKENS, 1, batch_size=2)
    for rec, text in zip(records, texts):
        ids = [built['sp'].bos_id()] + built['sp'].encode(text)
        with torch.no_grad():
            out = built['torch'].generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                                          do_sample=False, eos_token_id=None, pad_token_id=0)
        new = out[0, len(ids):].tolist()
        if built['sp'].eos_id() in new:
            new = new[:new.index(built['sp'].eos_id())]
        assert rec['generation'] == runner.cut_generation(built['sp'].decode(new))
        assert rec['parsed'] == scoring.parse_answer(rec['generation'], ['yes', 'no', 'maybe'])
        assert rec['prediction'] == rec['parsed']
        assert rec['correct'] == (rec['parsed'] == rec['answer'])


def test_cot_and_sc_cot_commands(built, tmp_path):
    outs = {}
    for mode, extra in (('cot', []), ('sc_cot', ['--samples', '3']), ('sc_cot', ['--samples',
                                                                                   '3'])):
        out = tmp_path / f'{mode}{len(outs)}'
        proc = subprocess.run(
            [sys.executable, '-m', 'meditron_jax.evaluate', '--model', built['ckpt'],
             '--tokenizer', built['tok'], '--benchmark', 'medqa4', '--data',
             os.path.join(eh.SAMPLES, 'medqa4', 'test.jsonl'), '--mode', mode, '--limit', '2',
             '--max_new_tokens', str(NEW_TOKENS), '--out', str(out), '--seeds', '5'] + extra,
            cwd=eh.REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out / 'summary.json').read_text())
        lines = [json.loads(x) for x in (out / 'predictions.jsonl').open()]
        assert summary['mode'] == mode and summary['n'] == 2 and len(lines) == 2
        assert summary['unparseable'] == sum(r['prediction'] is None for r in lines)
        for r in lines:
            assert r['prompt'].endswith("Let's think step by step.")
            if mode == 'sc_cot':
                assert len(r['generation']) == 3 and len(r['parsed']) == 3
                assert r['prediction'] == scoring.majority_vote(r['parsed'])
            else:
                assert r['parsed'] == scoring.parse_answer(r['generation'], list('ABCD'))
        outs[len(outs)] = lines
    assert outs[1] == outs[2]          # sc_cot is seeded: the same seed, the same samples
