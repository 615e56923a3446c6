"""``meditron-eval``: wires loaders, prompts, the scorer / generator and the summary, and writes

    OUT/predictions.jsonl   one line per (seed, item)
    OUT/summary.json        written last; an interrupted run leaves none
    OUT/results.md          with --benchmark all: a table laid out like the paper's Table 4

Example (the shipped samples, seconds on a CPU)::

    python -m meditron_jax.evaluate --model WORKDIR_OR_PARAMS --tokenizer tok.model \\
        --benchmark medqa --data meditron_jax/evaluate/samples/medqa/test.jsonl --out /tmp/ev
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from meditron_jax.evaluate import batching, loaders, runner
from meditron_jax.evaluate.loaders import EvalInputError

log = logging.getLogger(__name__)

PAPER_SEEDS = (1234, 432, 32)
# --benchmark all: where each benchmark's files sit under --data_dir (test, few-shot pool).
ALL_LAYOUT = {
    'mmlu_medical': ('mmlu', 'mmlu'),
    'pubmedqa': ('pubmedqa', 'pubmedqa'),
    'medmcqa': ('medmcqa/dev.json', 'medmcqa/train.json'),
    'medqa': ('medqa/test.jsonl', 'medqa/train.jsonl'),
    'medqa4': ('medqa4/test.jsonl', 'medqa4/train.jsonl'),
}
TABLE_NAMES = {'mmlu_medical': 'MMLU-Medical', 'pubmedqa': 'PubMedQA', 'medmcqa': 'MedMCQA',
               'medqa': 'MedQA', 'medqa4': 'MedQA-4-Option'}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='meditron-eval', description=__doc__.split('\n')[0])
    p.add_argument('--model', required=True, help='params checkpoint or training workdir')
    p.add_argument('--tokenizer', help="SentencePiece .model (default: the model's own)")
    p.add_argument('--benchmark', required=True, choices=loaders.BENCHMARKS + ('all',))
    p.add_argument('--data', help='the test file (pubmedqa, mmlu_medical: the directory)')
    p.add_argument('--data_dir', help='--benchmark all: directory laid out as ' +
                   ', '.join(f'{t}' for t, _ in ALL_LAYOUT.values()))
    p.add_argument('--fewshot_data', help='train/dev file of the demonstrations (default for '
                   'pubmedqa: the non-test PQA-L items of --data; mmlu_medical: its dev csvs)')
    p.add_argument('--mode', default='likelihood', choices=runner.MODES)
    p.add_argument('--shots', type=int, default=0)
    p.add_argument('--seeds', help='comma-separated (default: 1234,432,32 with shots or '
                   'sc_cot, else 1234)')
    p.add_argument('--prompt_style', default='meditron', choices=('meditron', 'harness'))
    p.add_argument('--chat', action='store_true', help='wrap prompts in the ChatML user turn')
    p.add_argument('--limit', type=int, help='only the first N items')
    p.add_argument('--batch_size', type=int, default=8,
                   help='packed sequences (likelihood) or prompts (generation) per step')
    p.add_argument('--out', required=True)
    p.add_argument('--cop_base', type=int, choices=(0, 1),
                   help="MedMCQA's cop numbering when the file does not show it")
    p.add_argument('--max_new_tokens', type=int,
                   help='generation length (default 32 for generate, 512 for cot/sc_cot)')
    p.add_argument('--samples', type=int, default=5, help='sc_cot generations per item')
    p.add_argument('--mesh', default='data=1,fsdp=-1,tensor=1',
                   help='mesh axis sizes for the model, e.g. data=1,fsdp=-1,tensor=1')
    args = p.parse_args(argv)
    if args.benchmark == 'all' and not args.data_dir:
        p.error('--benchmark all needs --data_dir')
    if args.benchmark != 'all' and not args.data:
        p.error(f'--benchmark {args.benchmark} needs --data')
    if args.shots < 0 or args.samples < 1 or args.batch_size < 1:
        p.error('--shots must be >= 0, --samples and --batch_size >= 1')
    try:
        args.seeds = ([int(s) for s in args.seeds.split(',')] if args.seeds else
                      list(PAPER_SEEDS if args.shots or args.mode == 'sc_cot' else PAPER_SEEDS[:1]))
    except ValueError:
        p.error(f'--seeds {args.seeds!r}: expected comma-separated integers')
    try:
        args.mesh = {k: int(v) for k, v in (kv.split('=') for kv in args.mesh.split(','))}
    except ValueError:
        p.error(f'--mesh {args.mesh!r}: expected data=N,fsdp=N,tensor=N')
    if args.max_new_tokens is None:
        args.max_new_tokens = 32 if args.mode == 'generate' else 512
    return args


def load_tokenizer(path: str | None, model) -> runner.SPTokenizer:
    import sentencepiece as spm
    if path:
        if not os.path.isfile(path):
            raise EvalInputError(f'--tokenizer {path}: no such file (expected a SentencePiece '
                                 f'.model)')
        sp = spm.SentencePieceProcessor(model_file=path)
    else:
        sp = getattr(model, 'tokenizer', None)
        if sp is None:
            raise EvalInputError('the model carries no tokenizer: pass --tokenizer PATH (a '
                                 'SentencePiece .model)')
    if sp.get_piece_size() > model.true_vocab_size:
        raise EvalInputError(f'the tokenizer has {sp.get_piece_size()} pieces but the model '
                             f'only {model.true_vocab_size}')
    return runner.SPTokenizer(sp)


def write_atomic(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(tmp, path)


def fewshot_pool(benchmark: str, data: str, fewshot_data: str | None, shots: int,
                 cop_base: int | None) -> list:
    if shots == 0:
        return []
    if benchmark in ('pubmedqa', 'mmlu_medical'):
        split = 'train' if benchmark == 'pubmedqa' else 'dev'
        return loaders.load(benchmark, fewshot_data or data, split=split)
    if not fewshot_data:
        raise EvalInputError(f'--shots {shots} with {benchmark} needs --fewshot_data (its '
                             f'train file)')
    return loaders.load(benchmark, fewshot_data, cop_base=cop_base)


def evaluate(args, model, tok, scorer, benchmark: str, data: str, fewshot_data: str | None,
             out: str) -> dict:
    """One benchmark, every seed; writes OUT/predictions.jsonl then OUT/summary.json."""
    items = loaders.load(benchmark, data, cop_base=args.cop_base)
    if args.limit:
        items = items[:args.limit]
    loaders.check_count(benchmark, items, args.limit)
    pool = fewshot_pool(benchmark, data, fewshot_data, args.shots, args.cop_base)
    os.makedirs(out, exist_ok=True)
    summary_path = os.path.join(out, 'summary.json')
    if os.path.exists(summary_path):
        os.remove(summary_path)       # never leave an old summary beside new predictions
    records = []
    for seed in args.seeds:
        texts = runner.build_prompts(benchmark, args.prompt_style, items, pool, args.shots,
                                     seed, args.chat, cot=args.mode in ('cot', 'sc_cot'))
        if scorer is not None:
            records += runner.score_options(scorer, tok, items, texts, args.mode, args.chat,
                                            seed)
        else:
            records += runner.generate_records(model, tok, items, texts, args.mode, seed,
                                               args.max_new_tokens, args.samples,
                                               args.batch_size)
    summary = dict(benchmark=benchmark, mode=args.mode, shots=args.shots, seeds=args.seeds,
                   prompt_style=args.prompt_style, chat=args.chat,
                   **runner.summarise(records, args.seeds),
                   model=os.path.abspath(args.model), tokenizer_sha256=tok.sha256,
                   data=os.path.abspath(data))
    write_atomic(os.path.join(out, 'predictions.jsonl'),
                 ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records))
    write_atomic(summary_path, json.dumps(summary, indent=2) + '\n')
    print(f'{benchmark} {args.mode}: accuracy {summary["accuracy"]:.4f} '
          f'(95% CI {summary["ci95"][0]:.3f}-{summary["ci95"][1]:.3f}, n={summary["n"]}, '
          f'unparseable {summary["unparseable"]}) -> {out}')
    return summary


def results_table(model_name: str, summaries: dict[str, dict]) -> str:
    """Accuracy (%) +- std over seeds, columns in the paper's order."""
    cols = [b for b in TABLE_NAMES if b in summaries]
    head = '| Model | ' + ' | '.join(TABLE_NAMES[b] for b in cols) + ' | Avg |'
    cells = [f'{100 * summaries[b]["accuracy"]:.1f} ± {100 * summaries[b]["accuracy_std"]:.1f}'
             for b in cols]
    avg = 100 * sum(summaries[b]['accuracy'] for b in cols) / len(cols)
    return '\n'.join([head, '|' + '---|' * (len(cols) + 2),
                      f'| {model_name} | ' + ' | '.join(cells) + f' | {avg:.1f} |']) + '\n'


def run(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    args = parse_args(argv)
    try:
        main(args)
    except EvalInputError as e:
        sys.exit(f'meditron-eval: error: {e}')


def main(args) -> dict:
    if args.benchmark == 'all':
        found = {b: (os.path.join(args.data_dir, t), os.path.join(args.data_dir, f))
                 for b, (t, f) in ALL_LAYOUT.items()
                 if os.path.exists(os.path.join(args.data_dir, t))}
        if not found:
            raise EvalInputError(f'--data_dir {args.data_dir}: none of '
                                 f'{[t for t, _ in ALL_LAYOUT.values()]} found')
    else:
        found = {args.benchmark: (args.data, args.fewshot_data)}
    for b, (data, _) in found.items():    # bad data fails before the model is loaded
        loaders.load(b, data, cop_base=args.cop_base)
    if args.tokenizer and not os.path.isfile(args.tokenizer):
        raise EvalInputError(f'--tokenizer {args.tokenizer}: no such file')
    import meditron_jax
    from meditron_jax import sharding
    model = meditron_jax.load(args.model, mesh=sharding.make_mesh(args.mesh))
    tok = load_tokenizer(args.tokenizer, model)
    scorer = None         # one for every benchmark: compiled programs are reused
    if args.mode not in runner.GENERATIVE_MODES:
        scorer = batching.Scorer(model, args.batch_size)
    if args.benchmark != 'all':
        return evaluate(args, model, tok, scorer, args.benchmark, args.data, args.fewshot_data,
                        args.out)
    summaries = {}
    for b, (data, fewshot) in found.items():
        fewshot = fewshot if os.path.exists(fewshot) else None
        summaries[b] = evaluate(args, model, tok, scorer, b, data, fewshot,
                                os.path.join(args.out, b))
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, 'results.md'),
                 results_table(os.path.basename(os.path.normpath(args.model)), summaries))
    return summaries
