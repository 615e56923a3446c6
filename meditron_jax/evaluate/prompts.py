"""Every prompt, in one table: benchmark x style (``meditron``: the paper's instructions;
``harness``: lm-evaluation-harness's templates, so numbers compare across tools).

A prompt is

    header + (demo block + cue + ' ' + demo answer + '\\n\\n') * shots + item block + cue

and, with ``--chat``, that whole text is the user turn of ``chat.wrap_prompt`` (and the
continuations lose their leading space, since the assistant turn starts on a new line). The
answer scored (likelihood) or parsed (generation) is the label: "A".."E" or yes/no/maybe.
``cot`` replaces the final cue with ``cot_cue``; the answer is then parsed after the last
"the answer is".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from meditron_jax.data import chat
from meditron_jax.evaluate.loaders import Item

STYLES = ('meditron', 'harness')


@dataclasses.dataclass(frozen=True)
class Template:
    header: str        # once, before the demonstrations; may use {subject}
    block: str         # one question: {question}, {options}, {context}
    option: str        # one line of {options}: {label}, {text}
    cue: str           # what the answer follows
    cot_cue: str       # the cue in the cot / sc_cot modes


_MEDQA = ('You are a medical doctor taking the US Medical Licensing Examination. You need to '
          'demonstrate your understanding of basic and clinical science, medical knowledge, and '
          'mechanisms underlying health, disease, patient care, and modes of therapy. Show your '
          'ability to apply the knowledge essential for medical practice. For the following '
          'multiple-choice question, select one correct answer from A to {last}. Base your '
          'answer on the current and standard practices referenced in medical guidelines.')
_MEDMCQA = ('You are a medical doctor answering real-world medical entrance exam questions. '
            'Based on your understanding of basic and clinical science, medical knowledge, and '
            'mechanisms underlying health, disease, patient care, and modes of therapy, answer '
            'the following multiple-choice question. Select one correct answer from A to D. Base '
            'your answer on the current and standard practices referenced in medical guidelines.')
_PUBMEDQA = ('As an expert doctor in clinical science and medical knowledge, can you tell me if '
             'the following statement is correct? Answer yes, no, or maybe.')
_MMLU = ('You are a medical doctor answering questions about {subject}. Based on your '
         'understanding of basic and clinical science, medical knowledge, and mechanisms '
         'underlying health, disease, patient care, and modes of therapy, answer the following '
         'multiple-choice question. Select one correct answer from A to D.')

_MCQ_BLOCK = 'Question: {question}\n\nOptions:\n{options}\n'
_THINK = "Let's think step by step."

TEMPLATES: dict[str, dict[str, Template]] = {
    'medqa': {
        'meditron': Template(_MEDQA.format(last='E') + '\n\n', _MCQ_BLOCK, '{label}. {text}',
                             'The answer is:', _THINK),
        'harness': Template('', 'Question: {question}\n{options}\n', '{label}. {text}',
                            'Answer:', 'Answer: ' + _THINK),
    },
    'medqa4': {
        'meditron': Template(_MEDQA.format(last='D') + '\n\n', _MCQ_BLOCK, '{label}. {text}',
                             'The answer is:', _THINK),
        'harness': Template('', 'Question: {question}\n{options}\n', '{label}. {text}',
                            'Answer:', 'Answer: ' + _THINK),
    },
    'medmcqa': {
        'meditron': Template(_MEDMCQA + '\n\n', _MCQ_BLOCK, '{label}. {text}',
                             'The answer is:', _THINK),
        'harness': Template('', 'Question: {question}\nChoices:\n{options}\n', '{label}. {text}',
                            'Answer:', 'Answer: ' + _THINK),
    },
    'pubmedqa': {
        'meditron': Template(_PUBMEDQA + '\n\n',
                             '{context}\n\nQuestion: {question}\n\nOptions:\n{options}\n',
                             '{label}', 'The answer is:', _THINK),
        'harness': Template('', 'Abstract: {context}\nQuestion: {question}\n', '', 'Answer:',
                            'Answer: ' + _THINK),
    },
    'mmlu_medical': {
        'meditron': Template(_MMLU + '\n\n', _MCQ_BLOCK, '{label}. {text}', 'The answer is:',
                             _THINK),
        'harness': Template('The following are multiple choice questions (with answers) about '
                            '{subject}.\n\n', '{question}\n{options}\n', '{label}. {text}',
                            'Answer:', 'Answer: ' + _THINK),
    },
}


def template(benchmark: str, style: str) -> Template:
    if style not in STYLES:
        raise ValueError(f'unknown prompt style {style!r}; expected one of {STYLES}')
    return TEMPLATES[benchmark][style]


def _subject(item: Item) -> str:
    return (item.subject or 'medicine').replace('_', ' ')


def render_block(benchmark: str, style: str, item: Item) -> str:
    """One question with its options (and abstract), without the cue."""
    t = template(benchmark, style)
    options = '\n'.join(t.option.format(label=label, text=text)
                        for label, text in item.options.items()) if t.option else ''
    question = item.question.strip() if style == 'harness' else item.question
    return t.block.format(question=question, options=options,
                          context=item.context or '', subject=_subject(item))


def render_prompt(benchmark: str, style: str, item: Item, demos: Sequence[Item] = (),
                  cot: bool = False) -> str:
    """The text before the answer (the user turn, under --chat)."""
    t = template(benchmark, style)
    parts = [t.header.format(subject=_subject(item))]
    for demo in demos:
        parts.append(render_block(benchmark, style, demo) + t.cue + ' ' + demo.answer + '\n\n')
    parts.append(render_block(benchmark, style, item) + (t.cot_cue if cot else t.cue))
    return ''.join(parts)


def model_input(prompt: str, chat_mode: bool) -> str:
    """The exact text given to the model: the prompt, or its ChatML wrapping."""
    return chat.wrap_prompt(prompt) if chat_mode else prompt


def continuations(item: Item, chat_mode: bool) -> list[str]:
    """The strings scored after the model input, in label order."""
    return [label if chat_mode else ' ' + label for label in item.options]


def sft_answer(item: Item) -> str:
    """The assistant turn for finetuning: the gold label, then the explanation if any."""
    if item.explanation:
        return f'{item.answer}\n\nExplanation: {item.explanation.strip()}'
    return item.answer
