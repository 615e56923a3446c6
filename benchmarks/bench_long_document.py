"""One very long document: SentencePiece on the whole text vs the tokenizer's parts, side by side.

    python benchmarks/bench_long_document.py                  # ~1 min; --chars 500000 2000000

SentencePiece's BPE encoding of one input takes time growing faster than its length;
``Tokenizer.encode_batch`` cuts texts over ``LONG_TEXT_CHARS`` at single spaces between words
(same ids, checked here on every size). Text: the shipped corpus's words, space separated, in one
paragraph (the worst case: a 50 MB one-line document took 305 s to prepare) or with a paragraph
break every ~2,000 characters. Tokenizer: a 2048-piece BPE model trained on the shipped
corpus (as in configs/debug.py). Prints seconds for each way, their ratio, and the peak RSS of a
meditron-prepare run (1 worker) over one document of the largest size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import sentencepiece as spm  # noqa: E402

from configs import base  # noqa: E402
from meditron_jax.data import prepare, tokenizer  # noqa: E402
from tests.data_helpers import WORDS, data_config, debug_tokenizer  # noqa: E402


def long_text(chars: int, seed: int = 0, paragraphs: bool = False) -> str:
    rng = random.Random(seed)
    out, n = [], 0
    while n < chars:
        word = rng.choice(WORDS) + ('\n\n' if paragraphs and rng.random() < 1 / 250 else ' ')
        out.append(word)
        n += len(word)
    return ''.join(out).strip()


def peak_rss_gb() -> float:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 1e6


def prepare_one(root: str) -> None:
    cfg = data_config([base.source('x', os.path.join(root, 'x', '*.jsonl'), 1.0, 0.0)])
    with open('/proc/self/clear_refs', 'w') as f:   # resets the peak (inherited at fork)
        f.write('5')
    before = peak_rss_gb()
    start = time.perf_counter()
    prepare.prepare(cfg, os.path.join(root, 'out'))
    print(f'{time.perf_counter() - start:.1f} s, peak RSS {peak_rss_gb():.2f} GB (at the start: '
          f'{before:.2f} GB)')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--chars', type=int, nargs='+', default=[500_000, 2_000_000, 5_000_000])
    parser.add_argument('--prepare_dir', default='', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare_dir:
        return prepare_one(args.prepare_dir)
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(os.path.join(root, 'x'))
        with open(os.path.join(root, 'x', 'a.jsonl'), 'w') as f:
            f.write(json.dumps({'text': long_text(max(args.chars), seed=1)}) + '\n')
        debug_tokenizer()   # the shipped corpus's tokenizer, trained once, outside the measure
        # In a fresh process, so that its peak RSS is the preparation's own.
        done = subprocess.run([sys.executable, __file__, '--prepare_dir', root], check=True,
                              capture_output=True, text=True)
        prepare_line = (f'meditron-prepare, 1 worker, one {max(args.chars):,}-character '
                        f'one-paragraph document: {done.stdout.strip()}')
    model = debug_tokenizer()
    whole = spm.SentencePieceProcessor(model_file=model)
    parts = tokenizer.Tokenizer(model)
    print('| characters | paragraphs | whole text (s) | in parts (s) | speed-up | same ids |')
    print('|---|---|---|---|---|---|')
    for chars in args.chars:
        for paragraphs in (False, True):
            text = long_text(chars, paragraphs=paragraphs)
            start = time.perf_counter()
            expected = whole.Encode(text, out_type=int, add_bos=True, add_eos=True)
            whole_sec = time.perf_counter() - start
            start = time.perf_counter()
            got = parts.encode(text)
            parts_sec = time.perf_counter() - start
            print(f'| {chars:,} | {"~2,000 chars" if paragraphs else "one"} | {whole_sec:.2f} | '
                  f'{parts_sec:.2f} | {whole_sec / parts_sec:.1f}x | {got == expected} |',
                  flush=True)
    print(prepare_line)

if __name__ == '__main__':
    main()
