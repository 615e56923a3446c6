"""Long documents: the tokenizer encodes a text longer than LONG_TEXT_CHARS in parts cut at
single spaces between words, in linear time, and the ids are exactly SentencePiece's ids for the
whole text (so prepared shards do not depend on the cut)."""

import sentencepiece as spm

from meditron_jax.data import tokenizer
from tests.data_helpers import debug_tokenizer, doc_text


def long_text(n_docs: int) -> str:
    # Runs of spaces, tabs, newlines, digits, a special token and non-ASCII text around the cuts.
    return '\n\n'.join(f'{doc_text(i)}  double  spaces\tand tabs 12345 [BIB_REF] ünïcödé  '
                       for i in range(n_docs))


def test_long_text_ids_equal_whole_text_encoding():
    tok = tokenizer.Tokenizer(debug_tokenizer())
    whole = spm.SentencePieceProcessor(model_file=debug_tokenizer())
    texts = [long_text(400), 'a short one', 'x' * (3 * tokenizer.LONG_TEXT_CHARS), long_text(30)]
    assert len(tokenizer.split_long_text(texts[0])) > 5
    assert tokenizer.split_long_text(texts[2]) == [texts[2]]     # no space: one part
    got = tok.encode_batch(texts)
    assert got == [whole.Encode(t, out_type=int, add_bos=True, add_eos=True) for t in texts]
    assert tok.encode(texts[0], bos=False, eos=False) == whole.Encode(texts[0], out_type=int)


def test_parts_rejoin_to_the_text():
    text = long_text(200)
    parts = tokenizer.split_long_text(text, size=1000)
    assert ' '.join(parts) == text
    assert all(len(p) < 1000 + 200 for p in parts[:-1])
    assert all(not p[:1].isspace() and not p[-1:].isspace() for p in parts[1:-1])


def test_streamed_digest_equals_the_digest_of_all_words():
    from meditron_jax.data import clean
    text = long_text(300) + ' Straße İstanbul ǅ ﬁne \u00a0nbsp\u2028sep ' + 'x' * 5000
    for size in (1, 7, 1000, 1 << 20):
        assert clean.text_digest(text, size) == clean.digest(clean.dedup_words(text))
    assert clean.text_digest('') == clean.digest([]) and clean.text_digest(' , ') == clean.digest([])
