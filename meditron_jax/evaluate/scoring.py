"""Scoring as pure functions over items and model outputs: tokenisation of (prompt, option),
likelihood / acc_norm / top-token predictions, the answer parser, the SC-CoT vote, Wilson
intervals. No model and no files here."""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Callable, Sequence

Encode = Callable[[str], list[int]]


# ------------------------------------------------------------------------ tokenisation


def move_whitespace(prompt: str, continuation: str) -> tuple[str, str]:
    """lm-evaluation-harness's rule: the prompt's trailing whitespace starts the continuation."""
    stripped = prompt.rstrip()
    return stripped, prompt[len(stripped):] + continuation


def continuation_ids(encode: Encode, bos_id: int, prompt: str, continuation: str
                     ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): context = [BOS] + encode(prompt), whole = [BOS] +
    encode(prompt + continuation), continuation = whole[len(context):] (after moving the
    prompt's trailing whitespace into the continuation)."""
    prompt, continuation = move_whitespace(prompt, continuation)
    context = [bos_id] + list(encode(prompt))
    whole = [bos_id] + list(encode(prompt + continuation))
    cont = whole[len(context):]
    if not cont:
        raise ValueError(f'continuation {continuation!r} encodes to no tokens after '
                         f'{prompt[-40:]!r}')
    return context, cont


def label_token_ids(encode: Encode, bos_id: int, prompt: str, continuations: Sequence[str]
                    ) -> tuple[list[int], list[int]]:
    """(context ids, one token id per label) for top_token: the tokens the continuations share
    (e.g. a newline moved from the prompt) extend the context, and each label is the first token
    where they differ."""
    pairs = [continuation_ids(encode, bos_id, prompt, c) for c in continuations]
    context = pairs[0][0]
    conts = [cont for _, cont in pairs]
    common = 0
    while all(len(c) > common for c in conts) and len({c[common] for c in conts}) == 1:
        common += 1
    if any(len(c) <= common for c in conts):
        raise ValueError(f'continuations {list(continuations)} do not differ in a token')
    firsts = [c[common] for c in conts]
    if len(set(firsts)) != len(firsts):
        raise ValueError(f'continuations {list(continuations)} share a first token: '
                         f'top_token cannot tell them apart')
    return context + conts[0][:common], firsts


# ------------------------------------------------------------------------ predictions


def argmax_label(scores: Sequence[float], labels: Sequence[str]) -> str:
    """The label of the highest score; the first one on ties."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return labels[best]


def acc_norm_label(scores: Sequence[float], continuations: Sequence[str],
                   labels: Sequence[str]) -> str:
    """The harness's acc_norm: log-likelihood per character of the continuation."""
    return argmax_label([s / max(len(c), 1) for s, c in zip(scores, continuations)], labels)


_ANSWER_IS = re.compile(r'answer\s+is', re.IGNORECASE)
_PREFIX = re.compile(r'^(?:[\s:*#(\[]|answer\b|option\b|choice\b)*', re.IGNORECASE)


def parse_answer(text: str, labels: Sequence[str]) -> str | None:
    """The label an output names, or None.

    Accepts "C", "(C)", "C.", "C) ...", "Answer: C", "... the answer is C" (after the last
    "answer is"), and yes/no/maybe in any case. A letter past the option count is rejected."""
    matches = list(_ANSWER_IS.finditer(text))
    rest = text[matches[-1].end():] if matches else text
    rest = _PREFIX.sub('', rest)
    if not rest:
        return None
    if labels[0].isalpha() and len(labels[0]) == 1:     # letter options
        m = re.match(r'([A-Za-z])(?:[).:,\]*]|\s|$)', rest)
        if not m or (m.group(1).islower() and not re.match(r'[a-z](?:[).:,\]*]|\s*$)', rest)):
            return None
        letter = m.group(1).upper()
        return letter if letter in labels else None
    word = re.match(r'([A-Za-z]+)', rest)
    if not word:
        return None
    word = word.group(1).lower()
    return word if word in labels else None


def majority_vote(parsed: Sequence[str | None]) -> str | None:
    """The most frequent parsed answer; ties go to the one that appears first."""
    counts = collections.Counter(p for p in parsed if p is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(p for p in parsed if p is not None and counts[p] == top)


# ------------------------------------------------------------------------ statistics


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if correct <= 0 else max(0.0, centre - half)
    hi = 1.0 if correct >= n else min(1.0, centre + half)
    return lo, hi


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
