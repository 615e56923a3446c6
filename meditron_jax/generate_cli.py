"""meditron-generate: completions from a params checkpoint or a training workdir.

    meditron-generate --model PATH [--tokenizer PATH] (--prompt TEXT | --prompt_file FILE.jsonl)
        --max_new_tokens N [--temperature T --top_k K --top_p P --seed S --batch_size B]
        [--stop STR ...] [--chat] [--mesh data=1,fsdp=-1,tensor=1] [--out FILE.jsonl]

Prompts are encoded with BOS by the model's tokenizer (the checkpoint's, or ``--tokenizer``).
``--prompt`` may be repeated; a ``--prompt_file`` holds one JSON object a line with a "prompt"
string (other fields are copied to the output). Without ``--out`` each completion is printed;
with it, one JSON object a line ({..., "prompt", "completion"}) is written, atomically.
``--chat`` wraps each prompt as a ChatML user turn (data/chat.py) and stops at <|im_end|>.
The mesh spans all local devices, as in training: ``--mesh data=1,fsdp=-1,tensor=1`` (one axis
may be -1, the devices left over); prompts are split over data x fsdp, kv heads over tensor.
``python -m meditron_jax.generate_cli`` is the same command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from meditron_jax.generate import GenerationError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='meditron-generate', description=__doc__.split('\n')[0])
    p.add_argument('--model', required=True, help='params checkpoint or training workdir')
    p.add_argument('--tokenizer', default=None,
                   help="SentencePiece .model (default: the checkpoint's own)")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument('--prompt', action='append', help='a prompt text (repeatable)')
    prompts.add_argument('--prompt_file', help='JSONL, one {"prompt": "..."} a line')
    p.add_argument('--max_new_tokens', type=int, required=True)
    p.add_argument('--temperature', type=float, default=0.0, help='0 = greedy (default)')
    p.add_argument('--top_k', type=int, default=0, help='0 = off')
    p.add_argument('--top_p', type=float, default=1.0, help='1 = off')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--batch_size', type=int, default=8, help='prompts per compiled call')
    p.add_argument('--stop', action='append', default=None, help='stop string (repeatable)')
    p.add_argument('--chat', action='store_true', help='wrap prompts as ChatML user turns')
    p.add_argument('--mesh', default='data=1,fsdp=-1,tensor=1',
                   help='mesh axis sizes over the local devices (default data=1,fsdp=-1,tensor=1)')
    p.add_argument('--out', default=None, help='write JSONL here instead of printing')
    return p


def parse_mesh(text: str) -> dict[str, int]:
    sizes = {}
    for part in text.split(','):
        name, eq, value = part.partition('=')
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            eq = ''
        if not eq:
            raise GenerationError(f'--mesh {text!r}: expected comma-separated axis=size pairs, '
                                  f'e.g. data=1,fsdp=-1,tensor=1')
    return sizes


def read_prompts(args) -> list[dict]:
    """Records with a "prompt" text, from --prompt or --prompt_file (file:line in errors)."""
    if args.prompt is not None:
        records = [dict(prompt=t) for t in args.prompt]
        where = [f'--prompt {i}' for i in range(len(records))]
    else:
        if not os.path.exists(args.prompt_file):
            raise GenerationError(f'--prompt_file {args.prompt_file}: no such file')
        records, where = [], []
        with open(args.prompt_file, encoding='utf-8') as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                loc = f'{args.prompt_file}:{n}'
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise GenerationError(f'{loc}: not JSON ({e})') from None
                if not isinstance(record, dict) or not isinstance(record.get('prompt'), str):
                    raise GenerationError(f'{loc}: expected an object with a "prompt" string')
                records.append(record)
                where.append(loc)
        if not records:
            raise GenerationError(f'--prompt_file {args.prompt_file}: holds no prompts')
    for record, loc in zip(records, where):
        if not record['prompt'].strip():
            raise GenerationError(f'{loc}: the prompt is empty')
    return records


def main(argv: list[str] | None = None) -> list[str]:
    args = parser().parse_args(argv)
    from meditron_jax import generate, sharding
    from meditron_jax.data import chat
    generate.check_settings(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if args.batch_size < 1:
        raise GenerationError(f'--batch_size={args.batch_size} must be >= 1')
    records = read_prompts(args)
    if args.tokenizer is not None and not os.path.isfile(args.tokenizer):
        raise GenerationError(f'--tokenizer {args.tokenizer}: no such file')
    import jax
    import meditron_jax
    from tqdm import tqdm
    mesh = sharding.make_mesh(parse_mesh(args.mesh), jax.local_devices())
    model = meditron_jax.load(args.model, mesh=mesh)
    if args.tokenizer is not None:
        import sentencepiece as spm
        model.tokenizer = spm.SentencePieceProcessor(model_file=args.tokenizer)
        model.eos_id = model.tokenizer.eos_id() if model.tokenizer.eos_id() >= 0 else None
    tok = model.tokenizer
    if tok is None:
        raise GenerationError(f'{args.model} carries no tokenizer: pass --tokenizer PATH '
                              f'(a SentencePiece .model)')
    if tok.GetPieceSize() > model.true_vocab_size:
        raise GenerationError(f'tokenizer has {tok.GetPieceSize()} pieces, more than the '
                              f"model's vocabulary of {model.true_vocab_size}")
    stop = list(args.stop or []) + ([chat.IM_END] if args.chat else [])
    texts = [chat.wrap_prompt(r['prompt']) if args.chat else r['prompt'] for r in records]
    prompts = [[tok.bos_id()] + tok.encode(t, out_type=int) for t in texts]
    for i, ids in enumerate(prompts):   # all checked before any work is done
        if len(ids) + args.max_new_tokens > model.config.max_seq_len:
            raise GenerationError(
                f'prompt {i} has {len(ids)} tokens: with --max_new_tokens={args.max_new_tokens} '
                f"that is {len(ids) + args.max_new_tokens}, more than the model's max_seq_len="
                f'{model.config.max_seq_len}')
    completions = []
    settings = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, stop=stop or None)
    starts = range(0, len(prompts), args.batch_size)
    for start in tqdm(starts, desc='generate', unit='batch', file=sys.stderr):
        batch = prompts[start:start + args.batch_size]
        outs = generate.generate(model, batch, args.max_new_tokens, row_offset=start, **settings)
        completions += generate.decode_completions(outs, tok, stop)
    if args.out:
        tmp = f'{args.out}.tmp-{os.getpid()}'
        with open(tmp, 'w', encoding='utf-8') as f:
            for record, text in zip(records, completions):
                f.write(json.dumps(dict(record, completion=text), ensure_ascii=False) + '\n')
        os.replace(tmp, args.out)
    else:
        for text in completions:
            print(text)
    return completions


def run() -> None:
    logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(levelname)s %(message)s')
    from meditron_jax import params_checkpoint, sharding
    try:
        main(sys.argv[1:])
    except (GenerationError, params_checkpoint.ParamsCheckpointError, sharding.ShardingError,
            FileNotFoundError) as e:
        print(f'meditron-generate: error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    run()
