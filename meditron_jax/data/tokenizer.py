"""SentencePiece tokenizer: Llama-2's (given) or one trained on the corpus (debug runs).

Llama-2 conventions: ``<unk>`` = 0, ``<s>`` (BOS) = 1, ``</s>`` (EOS) = 2, no padding piece;
a document is encoded as ``BOS + pieces + EOS``. Extra special tokens (MEDITRON's ``[BIB_REF]``,
``[TABLE]``, ...) become user-defined pieces, which SentencePiece never splits: a trained
tokenizer gets them at training time, a given model gets them appended to its vocabulary
(``add_special_tokens``), so ids of the original pieces do not move.

Padding: rows packed by the loader are zero-filled and masked by ``segment_ids == 0``, so
``pad_id`` is the model's pad piece if it has one, else ``<unk>`` (0 for Llama-2).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence

import sentencepiece as spm
from google.protobuf import message as protobuf_message
from sentencepiece import sentencepiece_model_pb2

from meditron_jax.data.sources import DataError

FILENAME = 'tokenizer.model'   # where prepare() puts the tokenizer inside the data dir


# SentencePiece's BPE encoding takes time (and memory) growing faster than the length of one
# input (measured: 50K chars 0.06 s, 500K 1.5 s, 5M 23 s), so long texts are encoded in parts of
# about this many characters, cut at a single space between two words. With whitespace-split
# pieces and a dummy prefix (Llama-2's settings) no piece crosses such a space and the second
# part's dummy prefix is that space, so the ids are the same as encoding the whole text.
LONG_TEXT_CHARS = 16_384
_WORD_BREAK = re.compile(r'(?<=\S) (?=\S)')
_VOCAB_TOO_HIGH = re.compile(r'Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)')


class TokenizerError(DataError):
    """A tokenizer file that cannot be used, or a tokenizer that cannot be trained."""


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


class Tokenizer:
    """A SentencePiece model with Llama-2's BOS/EOS handling."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise TokenizerError(f'tokenizer {model_path!r}: no such file (expected a '
                                 f'SentencePiece .model)')
        self.path = model_path
        self.sha256 = file_sha256(model_path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f'tokenizer {model_path!r}: not a SentencePiece model ({e})')
        self.vocab_size: int = self._sp.GetPieceSize()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.unk_id: int = self._sp.unk_id()
        self.pad_id: int = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.unk_id
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f'tokenizer {model_path!r}: needs BOS and EOS pieces '
                                 f'(bos_id={self.bos_id}, eos_id={self.eos_id})')
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._sp.serialized_model_proto())
        self._split_long = (proto.trainer_spec.split_by_whitespace
                            and proto.normalizer_spec.add_dummy_prefix
                            and not proto.trainer_spec.treat_whitespace_as_suffix)

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        return self.encode_batch([text], bos, eos)[0]

    def encode_batch(self, texts: Sequence[str], bos: bool = True,
                     eos: bool = True) -> list[list[int]]:
        """encode() over many texts in one call (SentencePiece releases the GIL per batch);
        texts over LONG_TEXT_CHARS are encoded in parts (same ids, linear time)."""
        if not self._split_long or all(len(t) <= LONG_TEXT_CHARS for t in texts):
            return self._sp.Encode(list(texts), out_type=int, add_bos=bos, add_eos=eos)
        parts, owners = [], []
        for i, text in enumerate(texts):
            pieces = split_long_text(text)
            parts.extend(pieces)
            owners.extend([i] * len(pieces))
        out = [[self.bos_id] if bos else [] for _ in texts]
        for i, ids in zip(owners, self._sp.Encode(parts, out_type=int)):
            out[i].extend(ids)
        for ids in out if eos else []:
            ids.append(self.eos_id)
        return out

    def encode_with_offsets(self, text: str, bos: bool = True, eos: bool = False
                            ) -> tuple[list[int], list[tuple[int, int]]]:
        """encode() plus each id's (begin, end) byte span in ``text.encode('utf-8')``; BOS and
        EOS get empty spans at the ends. The ids are exactly encode()'s."""
        proto = self._sp.Encode(text, return_type='proto')
        ids = [p.id for p in proto.pieces]
        spans = [(p.begin, p.end) for p in proto.pieces]
        end = len(text.encode('utf-8'))
        return (([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []),
                ([(0, 0)] if bos else []) + spans + ([(end, end)] if eos else []))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; BOS/EOS/padding are control pieces and decode to nothing."""
        return self._sp.DecodeIds([int(i) for i in ids])

    def piece_to_id(self, piece: str) -> int:
        return self._sp.PieceToId(piece)

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))


def split_long_text(text: str, size: int = LONG_TEXT_CHARS) -> list[str]:
    """``text`` cut at single spaces between words into parts of about ``size`` characters (the
    spaces dropped: a dummy prefix restores each); a text with no such space stays whole."""
    parts, start = [], 0
    while len(text) - start > size:
        found = _WORD_BREAK.search(text, start + size)
        if found is None:
            break
        parts.append(text[start:found.start()])
        start = found.end()
    parts.append(text[start:])
    return parts


def train(texts: Iterable[str], model_prefix: str, vocab_size: int,
          special_tokens: Sequence[str] = ()) -> str:
    """Trains a Llama-2-style BPE model on ``texts``; returns the path of the .model file.

    Byte fallback keeps every string encodable (no ``<unk>`` in practice) and digits are split,
    as in Llama-2. One thread and a fixed seed make the result the same on every machine.
    """
    corpus = model_prefix + '.train.txt'
    with open(corpus, 'w', encoding='utf-8') as f:
        for text in texts:
            # One "sentence" per line for the trainer; paragraph breaks are good split points.
            for line in text.split('\n'):
                if line.strip():
                    f.write(line + '\n')
    min_vocab = 3 + 256 + len(special_tokens) + 1
    if vocab_size < min_vocab:
        raise TokenizerError(f'data.tokenizer_vocab_size={vocab_size}: a byte-fallback '
                             f'tokenizer needs at least {min_vocab} pieces')
    spm.set_random_generator_seed(0)
    try:
        spm.SentencePieceTrainer.Train(
            input=corpus, model_prefix=model_prefix, vocab_size=vocab_size, model_type='bpe',
            character_coverage=0.9999, byte_fallback=True, split_digits=True,
            normalization_rule_name='identity', remove_extra_whitespaces=False,
            add_dummy_prefix=True, allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            user_defined_symbols=list(special_tokens),
            num_threads=1, input_sentence_size=2_000_000, shuffle_input_sentence=True,
            minloglevel=2, max_sentence_length=1 << 16)
    except RuntimeError as e:
        too_high = _VOCAB_TOO_HIGH.search(str(e))
        if too_high:
            raise TokenizerError(
                f'data.tokenizer_vocab_size={vocab_size} is more pieces than this corpus yields: '
                f'set it to at most {too_high.group(2)} (SentencePiece: "{too_high.group(0)}"), '
                f'or give more text or data.tokenizer') from None
        raise TokenizerError(f'training a {vocab_size}-piece tokenizer on {corpus!r} failed: {e}')
    finally:
        os.remove(corpus)
    # The trainer records its temp paths in the model; blank them so that the file (and its
    # hash, which the manifest and the loader check) depends on the text alone.
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_prefix + '.model', 'rb') as f:
        proto.ParseFromString(f.read())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.model_prefix = ''
    with open(model_prefix + '.model', 'wb') as f:
        f.write(proto.SerializeToString())
    return model_prefix + '.model'


def add_special_tokens(model_path: str, out_path: str, special_tokens: Sequence[str]) -> None:
    """Copies a .model, appending the special tokens it lacks as user-defined pieces."""
    Tokenizer(model_path)   # a SentencePiece model with BOS and EOS, or an error naming it
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, 'rb') as f:
        try:
            proto.ParseFromString(f.read())
        except protobuf_message.DecodeError as e:
            raise TokenizerError(f'tokenizer {model_path!r}: not a SentencePiece model ({e})')
    have = {p.piece for p in proto.pieces}
    for token in special_tokens:
        if token not in have:
            piece = proto.pieces.add()
            piece.piece = token
            piece.score = 0.0
            piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    with open(out_path, 'wb') as f:
        f.write(proto.SerializeToString())
