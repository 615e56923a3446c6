"""meditron-convert: import Llama-2 weights, export trained params.

    meditron-convert import-hf   SRC DST [--dtype bfloat16] [--pad-vocab-multiple 128]
                                 [--tokenizer PATH] [--force]
    meditron-convert import-meta SRC DST [--dtype ...] [--pad-vocab-multiple ...]
                                 [--tokenizer PATH] [--force]
    meditron-convert export-hf   SRC DST [--dtype ...] [--shard-size 5GB] [--tokenizer PATH]
                                 [--force]
    meditron-convert export-meta SRC DST [--shards N] [--dtype ...] [--tokenizer PATH] [--force]

The model shape always comes from the source (config.json, params.json or the params
checkpoint), never from flags. Output appears at DST only when the conversion succeeded.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time

from meditron_jax import params_checkpoint
from meditron_jax.convert import common, hf, meta

_SIZE = re.compile(r'^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$', re.IGNORECASE)


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, '1000' -> 1000 bytes."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f'{text!r} is not a size like 5GB, 500MiB or 1000000')
    power = 'KMGT'.find(m.group(2).upper()) + 1
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='meditron-convert', description=__doc__.split('\n')[0])
    sub = p.add_subparsers(dest='command', required=True)
    dtypes = sorted(common.NP_DTYPES)
    for name, text in (('import-hf', 'HF Llama directory -> params checkpoint'),
                       ('import-meta', 'Meta consolidated.*.pth directory -> params checkpoint'),
                       ('export-hf', 'params checkpoint or training workdir -> HF directory '
                                     '(safetensors)'),
                       ('export-meta', 'params checkpoint or training workdir -> Meta '
                                       'consolidated.*.pth')):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument('src')
        s.add_argument('dst')
        s.add_argument('--dtype', choices=dtypes, default=None,
                       help='cast to this dtype (default: keep the source dtype)')
        s.add_argument('--force', action='store_true', help='replace a non-empty DST')
        if name.startswith('import'):
            s.add_argument('--pad-vocab-multiple', type=int, default=1,
                           help='pad embedding rows / head columns with zeros to a multiple of '
                                'this (e.g. 128); export drops them again')
        if name == 'export-hf':
            s.add_argument('--shard-size', type=parse_size, default=parse_size('5GB'),
                           help='largest safetensors shard (default 5GB)')
        if name == 'export-meta':
            s.add_argument('--shards', type=int, default=1,
                           help='model-parallel ranks: 1 for 7B, 2 for 13B, 8 for 70B')
        if name.startswith('export'):
            s.add_argument('--tokenizer', default=None,
                           help='SentencePiece tokenizer.model (or, for export-hf, a directory '
                                'of HF tokenizer files) to write next to the weights')
        else:
            s.add_argument('--tokenizer', default=None,
                           help='SentencePiece tokenizer.model to keep with the params (default: '
                                "the source's tokenizer.model when there is one)")
    return p


def main(argv: list[str] | None = None) -> str:
    args = parser().parse_args(argv)
    start = time.perf_counter()
    if args.command == 'import-hf':
        out = hf.import_hf(args.src, args.dst, dtype=args.dtype,
                           pad_vocab_multiple=args.pad_vocab_multiple, force=args.force,
                           tokenizer=args.tokenizer)
    elif args.command == 'import-meta':
        out = meta.import_meta(args.src, args.dst, dtype=args.dtype,
                               pad_vocab_multiple=args.pad_vocab_multiple, force=args.force,
                               tokenizer=args.tokenizer)
    elif args.command == 'export-hf':
        out = hf.export_hf(args.src, args.dst, dtype=args.dtype, shard_size=args.shard_size,
                           tokenizer=args.tokenizer, force=args.force)
    else:
        out = meta.export_meta(args.src, args.dst, shards=args.shards, dtype=args.dtype,
                               tokenizer=args.tokenizer, force=args.force)
    logging.info('%s: %s -> %s in %.1f s', args.command, args.src, out,
                 time.perf_counter() - start)
    return out


def run() -> None:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    try:
        main(sys.argv[1:])
    except (common.ConversionError, params_checkpoint.ParamsCheckpointError,
            FileExistsError, FileNotFoundError) as e:
        print(f'meditron-convert: error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    run()
