"""One seed of one benchmark in one mode: items -> prompts -> model outputs -> prediction
records, and the summary over records. The model is reached only through a ``Scorer`` (forward
passes) or ``Model.generate`` (generative modes); prompts and scoring come from prompts.py and
scoring.py."""

from __future__ import annotations

import collections
import hashlib
import random
from collections.abc import Sequence

from tqdm import tqdm

from meditron_jax.data import chat
from meditron_jax.evaluate import batching, prompts, scoring
from meditron_jax.evaluate.loaders import EvalInputError, Item

MODES = ('likelihood', 'top_token', 'generate', 'cot', 'sc_cot')
GENERATIVE_MODES = ('generate', 'cot', 'sc_cot')
SC_COT_TEMPERATURE = 0.8


class SPTokenizer:
    """The few things evaluation needs from a sentencepiece.SentencePieceProcessor."""

    def __init__(self, sp):
        self.sp = sp
        self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
        self.sha256 = hashlib.sha256(sp.serialized_model_proto()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def select_demos(pool: Sequence[Item], k: int, seed: int, subject: str | None = None
                 ) -> list[Item]:
    """k demonstrations drawn with ``seed``: the same for every item of a seed (and subject,
    when the pool has one per subject, as MMLU's dev csvs)."""
    if k <= 0:
        return []
    candidates = [d for d in pool if d.subject == subject] if subject is not None else []
    candidates = candidates or list(pool)
    if len(candidates) < k:
        raise EvalInputError(f'--shots {k} but the few-shot pool has only {len(candidates)} items'
                         + (f' for subject {subject}' if subject else ''))
    key = f'{seed}:{subject}' if subject is not None else str(seed)
    return random.Random(key).sample(candidates, k)


def build_prompts(benchmark: str, style: str, items: Sequence[Item], pool: Sequence[Item],
                  shots: int, seed: int, chat_mode: bool, cot: bool) -> list[str]:
    """The exact model input text of every item."""
    by_subject = {d.subject for d in pool}
    texts = []
    for item in items:
        subject = item.subject if item.subject in by_subject else None
        demos = select_demos(pool, shots, seed, subject)
        texts.append(prompts.model_input(
            prompts.render_prompt(benchmark, style, item, demos, cot), chat_mode))
    return texts


def _record(item: Item, seed: int, prompt: str, prediction, **extra) -> dict:
    rec = dict(id=item.id, seed=seed, prompt=prompt, options=item.options, answer=item.answer,
               prediction=prediction, correct=prediction == item.answer)
    if item.subject is not None:
        rec['subject'] = item.subject
    rec.update(extra)
    return rec


def score_options(scorer: batching.Scorer, tok: SPTokenizer, items: Sequence[Item],
                  texts: Sequence[str], mode: str, chat_mode: bool, seed: int) -> list[dict]:
    """likelihood / top_token records."""
    conts = [prompts.continuations(item, chat_mode) for item in items]
    records = []
    if mode == 'likelihood':
        prompt_ids = []
        for text, cs in zip(texts, conts):
            pairs = [scoring.continuation_ids(tok.encode, tok.bos_id, text, c) for c in cs]
            prompt_ids.append((pairs[0][0], [cont for _, cont in pairs]))
        bar = tqdm(total=len(items), unit='item', desc=f'{mode} seed {seed}', mininterval=1.0)
        flat = [s for scores in batching.option_loglikelihoods(scorer, prompt_ids, bar)
                for s in scores]
        start = 0
        for item, text, cs in zip(items, texts, conts):
            scores, start = flat[start:start + len(cs)], start + len(cs)
            labels = list(item.options)
            norm = scoring.acc_norm_label(scores, cs, labels)
            records.append(_record(item, seed, text, scoring.argmax_label(scores, labels),
                                   continuations=cs, scores=scores, prediction_norm=norm,
                                   correct_norm=norm == item.answer))
    else:
        queries = [scoring.label_token_ids(tok.encode, tok.bos_id, text, cs)
                   for text, cs in zip(texts, conts)]
        bar = tqdm(total=len(items), unit='item', desc=f'{mode} seed {seed}', mininterval=1.0)
        out = batching.next_token_logprobs(scorer, queries, bar)
        for item, text, cs, scores in zip(items, texts, conts, out):
            records.append(_record(item, seed, text, scoring.argmax_label(scores, list(
                item.options)), continuations=cs, scores=scores))
    bar.close()
    return records


def cut_generation(text: str) -> str:
    """The model's answer to this item only: up to an end-of-turn or the next question."""
    for marker in (chat.IM_END, '\nQuestion:'):
        text = text.split(marker)[0]
    return text


def generate_texts(model, tok: SPTokenizer, texts: Sequence[str], max_new_tokens: int,
                   temperature: float, seed: int, batch_size: int, bar=None) -> list[str]:
    """Model.generate over batches of prompts; new text up to EOS."""
    if not hasattr(model, 'generate'):
        raise RuntimeError('this Model has no .generate(): the generative modes need the '
                           'generation support of meditron_jax (issue 9)')
    outs = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        ids = [[tok.bos_id] + tok.encode(t) for t in chunk]
        new = model.generate(ids, max_new_tokens, temperature=temperature, top_k=0, top_p=1.0,
                             seed=seed + start)
        for row in new:
            row = list(row)
            if tok.eos_id in row:
                row = row[:row.index(tok.eos_id)]
            outs.append(tok.decode(row))
        if bar is not None:
            bar.update(len(chunk))
    return outs


def generate_records(model, tok: SPTokenizer, items: Sequence[Item], texts: Sequence[str],
                     mode: str, seed: int, max_new_tokens: int, samples: int,
                     batch_size: int) -> list[dict]:
    """generate / cot / sc_cot records (``generation`` and ``parsed``; lists for sc_cot)."""
    n_samples = samples if mode == 'sc_cot' else 1
    temperature = SC_COT_TEMPERATURE if mode == 'sc_cot' else 0.0
    bar = tqdm(total=len(items) * n_samples, unit='gen', desc=f'{mode} seed {seed}',
               mininterval=1.0)
    runs = [generate_texts(model, tok, texts, max_new_tokens, temperature,
                           seed * 1_000_003 + s * 7919, batch_size, bar)
            for s in range(n_samples)]
    bar.close()
    records = []
    for i, (item, text) in enumerate(zip(items, texts)):
        labels = list(item.options)
        gens = [cut_generation(run[i]) for run in runs]
        parsed = [scoring.parse_answer(g, labels) for g in gens]
        if mode == 'sc_cot':
            records.append(_record(item, seed, text, scoring.majority_vote(parsed),
                                   generation=gens, parsed=parsed))
        else:
            records.append(_record(item, seed, text, parsed[0], generation=gens[0],
                                   parsed=parsed[0]))
    return records


def _accuracy(records: Sequence[dict], key: str = 'correct') -> float:
    return sum(bool(r[key]) for r in records) / len(records) if records else 0.0


def summarise(records: Sequence[dict], seeds: Sequence[int]) -> dict:
    """accuracy (mean of correct), Wilson ci95 on the items, unparseable, acc_norm, and the
    per-seed and per-subject breakdowns."""
    by_seed = collections.defaultdict(list)
    for r in records:
        by_seed[r['seed']].append(r)
    n = len(by_seed[seeds[0]])
    accuracy = _accuracy(records)
    summary = dict(n=n, accuracy=accuracy,
                   ci95=list(scoring.wilson_interval(accuracy * n, n)),
                   unparseable=sum(r.get('prediction') is None for r in records))
    if all('correct_norm' in r for r in records):
        summary['accuracy_norm'] = _accuracy(records, 'correct_norm')
    per_seed = {}
    for seed in seeds:
        rs = by_seed[seed]
        acc = _accuracy(rs)
        entry = dict(n=len(rs), accuracy=acc, ci95=list(scoring.wilson_interval(acc * len(rs),
                                                                              len(rs))),
                     unparseable=sum(r.get('prediction') is None for r in rs))
        if 'accuracy_norm' in summary:
            entry['accuracy_norm'] = _accuracy(rs, 'correct_norm')
        per_seed[str(seed)] = entry
    summary['per_seed'] = per_seed
    summary['accuracy_std'] = scoring.mean_std([e['accuracy'] for e in per_seed.values()])[1]
    subjects = sorted({r['subject'] for r in records if 'subject' in r})
    if subjects:
        summary['per_subject'] = {
            s: dict(n=len([r for r in by_seed[seeds[0]] if r.get('subject') == s]),
                    accuracy=_accuracy([r for r in records if r.get('subject') == s]))
            for s in subjects}
    return summary
