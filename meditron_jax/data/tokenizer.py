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
from collections.abc import Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

FILENAME = 'tokenizer.model'   # where prepare() puts the tokenizer inside the data dir


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used."""


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

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        ids = self._sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = True,
                     eos: bool = True) -> list[list[int]]:
        """encode() over many texts in one call (SentencePiece releases the GIL per batch)."""
        out = self._sp.Encode(list(texts), out_type=int, add_bos=bos, add_eos=eos)
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
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, 'rb') as f:
        proto.ParseFromString(f.read())
    have = {p.piece for p in proto.pieces}
    for token in special_tokens:
        if token not in have:
            piece = proto.pieces.add()
            piece.piece = token
            piece.score = 0.0
            piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    with open(out_path, 'wb') as f:
        f.write(proto.SerializeToString())
