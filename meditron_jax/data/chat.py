"""ChatML: the one place that knows how conversations become text (and, for finetuning, ids and
loss masks).

    <|im_start|>{role}\n{content}<|im_end|>\n        per message (the format MEDITRON used)

Finetuning ids are ``BOS + encode(render(messages))``, the conversation encoded as one text (so a
prompt rendered by generation_prompt tokenizes exactly as it did in training), with a loss mask
of 1 on the tokens of each assistant message's content and on its ``<|im_end|>``, 0 on BOS,
system and user messages, role headers and the newlines between messages.

Finetuning data, ``meditron-eval --chat`` and generation all render through here, so a finetuned
model is evaluated with exactly the template it was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from meditron_jax.data.sources import DataError

IM_START = '<|im_start|>'
IM_END = '<|im_end|>'
SPECIAL_TOKENS = (IM_START, IM_END)
ROLES = ('system', 'user', 'assistant')


def header(role: str) -> str:
    """The text that opens a message: ``<|im_start|>{role}\\n``."""
    if role not in ROLES:
        raise ValueError(f'unknown chat role {role!r}, expected one of {ROLES}')
    return f'{IM_START}{role}\n'


def render_message(role: str, content: str) -> str:
    return f'{header(role)}{content}{IM_END}\n'


def render(messages: Sequence[Mapping[str, str]]) -> str:
    """A whole conversation as ChatML text."""
    return ''.join(render_message(m['role'], m['content']) for m in messages)


def generation_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The conversation so far, then an open assistant header: what the model continues."""
    return render(messages) + header('assistant')


def wrap_prompt(text: str, system: str | None = None) -> str:
    """A single user turn (after an optional system turn), ready for the assistant's answer:
    how ``meditron-eval --chat`` presents a benchmark prompt and how SFT data built from the
    benchmarks is rendered."""
    messages = ([dict(role='system', content=system)] if system else []) + [
        dict(role='user', content=text)]
    return generation_prompt(messages)


def parse_record(record: Any, where: str) -> list[dict[str, str]]:
    """One JSONL record -> its messages, checked. ``{"messages": [{"role", "content"}, ...]}`` or
    the short form ``{"prompt": ..., "response": ...}`` (a user turn, then the assistant's).
    Errors start with ``where`` (file:line)."""
    if not isinstance(record, dict):
        raise DataError(f'{where}: expected a JSON object, got {type(record).__name__}')
    if 'messages' in record:
        messages = record['messages']
        if not isinstance(messages, list) or not messages:
            raise DataError(f'{where}: "messages" must be a non-empty list of '
                            f'{{"role", "content"}} objects')
    elif 'prompt' in record and 'response' in record:
        messages = [dict(role='user', content=record['prompt']),
                    dict(role='assistant', content=record['response'])]
    else:
        raise DataError(f'{where}: no "messages" (nor "prompt" and "response"); keys are '
                        f'{sorted(record)[:10]}')
    out = []
    for i, m in enumerate(messages):
        at = f'{where}: message {i}'
        if not isinstance(m, dict) or set(m) != {'role', 'content'}:
            got = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise DataError(f'{at}: expected exactly the keys ["content", "role"], got {got}')
        if m['role'] not in ROLES:
            raise DataError(f'{at}: unknown role {m["role"]!r}, expected one of {ROLES}')
        if not isinstance(m['content'], str) or not m['content'].strip():
            raise DataError(f'{at} ({m["role"]}): empty content (expected a non-empty string)')
        if IM_START in m['content'] or IM_END in m['content']:
            raise DataError(f'{at} ({m["role"]}): content holds a ChatML marker '
                            f'({IM_START} or {IM_END})')
        out.append(dict(role=m['role'], content=m['content']))
    if not any(m['role'] == 'assistant' for m in out):
        raise DataError(f'{where}: no assistant message (nothing to learn from)')
    return out


def tokenize(messages: Sequence[Mapping[str, str]], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32[N], loss_mask uint8[N]) of a conversation (see the module docstring).

    ``tokenizer``: a data.tokenizer.Tokenizer whose vocabulary holds SPECIAL_TOKENS as pieces."""
    for token in SPECIAL_TOKENS:
        if tokenizer.piece_to_id(token) == tokenizer.unk_id:
            raise DataError(f'tokenizer {tokenizer.path!r} has no piece {token!r}: chat data needs '
                            f'{SPECIAL_TOKENS} added as special tokens (data.format="chat" does)')
    ids, spans = tokenizer.encode_with_offsets(render(messages), bos=True, eos=False)
    # Byte spans of what is learned: each assistant content and its closing <|im_end|>.
    learned, offset = [], 0
    for m in messages:
        start = offset + len(header(m['role']).encode('utf-8'))
        end = start + len(m['content'].encode('utf-8')) + len(IM_END.encode('utf-8'))
        if m['role'] == 'assistant':
            learned.append((start, end))
        offset = end + 1  # the newline after <|im_end|>
    begin_N = np.array([b for b, _ in spans], np.int64)
    end_N = np.array([e for _, e in spans], np.int64)
    mask_N = np.zeros(len(ids), bool)
    for start, end in learned:
        # A piece overlaps the span; an empty piece (a dummy prefix) counts where it stands.
        mask_N |= np.where(end_N > begin_N, (begin_N < end) & (end_N > start),
                           (begin_N >= start) & (begin_N < end))
    mask_N[0] = False  # BOS
    return np.asarray(ids, np.int32), mask_N.astype(np.uint8)
