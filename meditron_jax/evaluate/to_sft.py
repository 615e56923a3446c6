"""``meditron-prepare-sft``: a benchmark's training file -> chat SFT JSONL, one conversation per
item::

    {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}]}

PROMPT is exactly the text that ``meditron-eval --chat`` wraps for that item (zero-shot, same
``--prompt_style``), so ``chat.render(messages)`` starts with exactly what the model is given at
evaluation; ANSWER is the gold label (what the prompt asks for), then the file's explanation when
it has one (MedMCQA's ``exp``, PubMedQA's ``LONG_ANSWER``).

    meditron-prepare-sft --benchmark medqa --data train.jsonl --out sft.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from meditron_jax.evaluate import loaders, prompts
from meditron_jax.evaluate.loaders import EvalInputError, Item

# The split read from a directory benchmark: PubMedQA's non-test PQA-L items, MMLU's dev csvs.
DEFAULT_SPLIT = {'pubmedqa': 'train', 'mmlu_medical': 'dev'}


def conversation(benchmark: str, style: str, item: Item) -> dict:
    prompt = prompts.render_prompt(benchmark, style, item)
    return {'messages': [{'role': 'user', 'content': prompt},
                         {'role': 'assistant', 'content': prompts.sft_answer(item)}]}


def convert(benchmark: str, data: str, out: str, style: str = 'meditron',
            cop_base: int | None = None, split: str | None = None) -> int:
    """Writes ``out`` (via a temp file, renamed when complete); returns the item count."""
    items: Sequence[Item] = loaders.load(benchmark, data,
                                         split=split or DEFAULT_SPLIT.get(benchmark, 'test'),
                                         cop_base=cop_base)
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f'.{os.path.basename(out)}.tmp')
    try:
        with open(tmp, 'w', encoding='utf-8') as f:
            for item in items:
                f.write(json.dumps(conversation(benchmark, style, item), ensure_ascii=False)
                        + '\n')
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(items)


def run(argv=None) -> None:
    p = argparse.ArgumentParser(prog='meditron-prepare-sft', description=__doc__.split('\n')[0])
    p.add_argument('--benchmark', required=True, choices=loaders.BENCHMARKS)
    p.add_argument('--data', required=True, help='train file (pubmedqa, mmlu_medical: directory)')
    p.add_argument('--out', required=True, help='output JSONL')
    p.add_argument('--prompt_style', default='meditron', choices=prompts.STYLES)
    p.add_argument('--cop_base', type=int, choices=(0, 1))
    p.add_argument('--split', help='directory benchmarks: pubmedqa train|test, mmlu_medical '
                   'dev|test|val (default: train / dev)')
    args = p.parse_args(argv)
    try:
        n = convert(args.benchmark, args.data, args.out, args.prompt_style, args.cop_base,
                    args.split)
    except EvalInputError as e:
        sys.exit(f'meditron-prepare-sft: error: {e}')
    print(f'{args.benchmark}: {n} conversations -> {args.out}')


if __name__ == '__main__':
    run()
