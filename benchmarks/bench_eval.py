"""meditron-eval likelihood throughput (items/s): packed forward passes vs a plain loop of one
forward pass per (item, option), side by side in one run, on the debug model.

    python benchmarks/bench_eval.py                     # ~2-4 min on 2 CPU cores
    python benchmarks/bench_eval.py --items 1000 --baseline_items 200 --batch_size 2

Data: a generated 1,000-item MedQA-format file (5 options, invented template questions of
60-120 words), harness prompts, zero-shot. Model: the 'debug' preset with random weights and a
SentencePiece tokenizer (2,000 pieces) trained on the shipped corpus. Packed: ``batching.Scorer`` (rows packed
first-fit with segment ids into ``batch_size`` sequences per forward pass). Plain loop: each
(item, option) row alone, padded to a multiple of 32 tokens (so compiles are few; they are done
before timing), through ``Model.__call__`` and a numpy log-softmax over the true vocabulary.
The baseline is timed on the first ``--baseline_items`` items (its rate is per item, so a subset
measures it). Both time steady state: the packed run is done twice and the second timed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402

import meditron_jax  # noqa: E402
from meditron_jax import model as model_lib, sharding  # noqa: E402
from meditron_jax.data import tokenizer  # noqa: E402
from meditron_jax.evaluate import batching, loaders, runner, scoring  # noqa: E402

WORDS = ('patient fever cough pain chest abdominal renal hepatic cardiac pulmonary acute chronic '
         'history examination laboratory serum elevated decreased normal biopsy infection '
         'therapy dose mg daily week year old man woman child presents with shows reveals '
         'following most likely diagnosis next step management treatment mechanism drug '
         'artery vein nerve muscle bone blood pressure heart rate temperature emergency '
         'department clinic physician recent travel smoking alcohol family mother father').split()


def make_medqa(path: str, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, 'w') as f:
        for i in range(n):
            question = ' '.join(rng.choice(WORDS) for _ in range(rng.randint(60, 120))) + '?'
            options = {k: ' '.join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))
                       for k in 'ABCDE'}
            answer = rng.choice('ABCDE')
            f.write(json.dumps(dict(question=question, options=options, answer=options[answer],
                                    answer_idx=answer, meta_info='step1')) + '\n')


def plain_loop(model, pairs) -> tuple[list[float], float]:
    """One forward pass per row; returns (log-likelihoods, seconds) after compiling."""
    vocab = model.true_vocab_size

    def padded(context, cont):
        tokens = list(context) + list(cont)[:-1]
        width = -(-len(tokens) // 32) * 32
        return np.asarray([tokens + [0] * (width - len(tokens))], np.int32)

    for width in sorted({padded(c, x).shape[1] for c, x in pairs}):    # compile every shape
        model(np.zeros((1, width), np.int32)).block_until_ready()
    start, out = time.perf_counter(), []
    for context, cont in pairs:
        logits = np.asarray(model(padded(context, cont)))[0, :, :vocab].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        first = len(context) - 1
        out.append(float(sum(logp[first + i, t] for i, t in enumerate(cont))))
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--items', type=int, default=1000)
    p.add_argument('--baseline_items', type=int, default=200)
    p.add_argument('--batch_size', type=int, default=2,
                   help='packed sequences per forward pass (small is fastest on CPU caches)')
    args = p.parse_args()
    tmp = tempfile.mkdtemp()
    data = os.path.join(tmp, 'medqa.jsonl')
    make_medqa(data, args.items)
    texts = []      # the shipped corpus, as the debug run's tokenizer is trained
    for path in sorted(glob.glob(os.path.join(REPO, 'meditron_jax', 'data', 'corpus', '*',
                                              '*.jsonl'))):
        with open(path) as f:
            texts += [json.loads(line)['text'] for line in f]
    tok_path = tokenizer.train(texts, os.path.join(tmp, 'tok'), 2000)
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    cfg = model_lib.preset('debug')
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = meditron_jax.Model(config=cfg, params=model_lib.init_params(cfg, mesh),
                               true_vocab_size=sp.get_piece_size())
    items = loaders.load('medqa', data)
    tok = runner.SPTokenizer(sp)
    prompts = runner.build_prompts('medqa', 'harness', items, [], 0, 0, False, False)

    scorer = batching.Scorer(model, args.batch_size)
    runner.score_options(scorer, tok, items, prompts, 'likelihood', False, 0)  # compile
    start = time.perf_counter()
    records = runner.score_options(scorer, tok, items, prompts, 'likelihood', False, 0)
    packed_s = time.perf_counter() - start

    sub = items[:args.baseline_items]
    pairs = [scoring.continuation_ids(tok.encode, tok.bos_id, t, ' ' + label)
             for t, item in zip(prompts, sub) for label in item.options]
    plain, plain_s = plain_loop(model, pairs)
    packed_scores = [s for r in records[:len(sub)] for s in r['scores']]
    max_diff = float(np.max(np.abs(np.asarray(plain) - np.asarray(packed_scores))))

    lengths = [len(c) + len(x) - 1 for c, x in pairs]
    rows_per_seq = scorer.seq_len_for([batching.Row([0] * n, []) for n in lengths])
    packed_rate, plain_rate = len(items) / packed_s, len(sub) / plain_s
    print(f'model debug ({cfg.num_params() / 1e6:.1f}M params), {jax.devices()[0].platform}, '
          f'{len(items)} items x 5 options, prompt+option rows {min(lengths)}-{max(lengths)} '
          f'tokens (mean {np.mean(lengths):.0f}), packed seq_len {rows_per_seq} x batch '
          f'{scorer.batch_size}')
    print('| method | items | seconds | items/s |')
    print('|---|---|---|---|')
    print(f'| packed (batching.Scorer) | {len(items)} | {packed_s:.1f} | {packed_rate:.1f} |')
    print(f'| plain loop, one forward per (item, option) | {len(sub)} | {plain_s:.1f} | '
          f'{plain_rate:.1f} |')
    print(f'speedup: {packed_rate / plain_rate:.1f}x; max |score difference| on the common '
          f'items: {max_diff:.2e}; load average {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
    main()
