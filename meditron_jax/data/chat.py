"""ChatML: the one place that knows how conversations become text (and, for finetuning, ids and
loss masks).

    <|im_start|>{role}\n{content}<|im_end|>\n        per message (the format MEDITRON used)

Finetuning data, ``meditron-eval --chat`` and generation all render through here, so a finetuned
model is evaluated with exactly the template it was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
