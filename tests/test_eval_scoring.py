"""The pure scoring functions: tokenisation rule, predictions, parser, vote, Wilson interval,
packing and the summary."""

import math

import pytest
import sentencepiece as spm

from meditron_jax.evaluate import batching, runner, scoring

import eval_helpers as eh


@pytest.fixture(scope='module')
def sp(tmp_path_factory):
    from meditron_jax.data import tokenizer
    path = tokenizer.train(eh.sample_texts(), str(tmp_path_factory.mktemp('tok') / 'tok'), 400)
    return spm.SentencePieceProcessor(model_file=path)


def test_trailing_whitespace_moves_to_the_continuation(sp):
    assert scoring.move_whitespace('Answer: \n', ' A') == ('Answer:', ' \n A')
    context, cont = scoring.continuation_ids(sp.encode, 1, 'The answer is: ', 'B')
    whole = [1] + sp.encode('The answer is: B')
    assert context == [1] + sp.encode('The answer is:') and cont == whole[len(context):]
    assert sp.decode(cont).strip() == 'B'


def test_label_tokens_skip_a_shared_prefix(sp):
    prompt = 'The answer is:\n'          # the newline starts every continuation
    context, labels = scoring.label_token_ids(sp.encode, 1, prompt, ['A', 'B', 'C'])
    assert len(set(labels)) == 3
    for label, token in zip('ABC', labels):
        whole = [1] + sp.encode('The answer is:\n' + label)
        assert whole[:len(context) + 1] == context + [token]
    with pytest.raises(ValueError, match='do not differ'):
        scoring.label_token_ids(sp.encode, 1, 'Q:', [' A', ' A'])


def test_argmax_and_acc_norm():
    assert scoring.argmax_label([-3.0, -1.0, -1.0], 'ABC') == 'B'      # first of equal maxima
    # Per character: -4/8 beats -3/2.
    assert scoring.acc_norm_label([-3.0, -4.0], [' no', ' maybeso'], ['no', 'maybe']) == 'maybe'
    assert scoring.argmax_label([-3.0, -4.0], ['no', 'maybe']) == 'no'


@pytest.mark.parametrize('text,labels,expected', [
    ('C', 'ABCD', 'C'), ('(C)', 'ABCD', 'C'), ('C.', 'ABCD', 'C'), ('C) Liver', 'ABCD', 'C'),
    ('Answer: C', 'ABCD', 'C'), (' answer: b', 'ABCD', 'B'),
    ('Reasoning... so the answer is C because', 'ABCD', 'C'),
    ('The answer is A? No wait, the answer is (D).', 'ABCD', 'D'),
    ('the answer is c.', 'ABCD', 'C'), ('E', 'ABCD', None), ('E. none', 'ABCDE', 'E'),
    ('a patient with fever', 'ABCD', None), ('The patient', 'ABCD', None), ('', 'ABCD', None),
    ('42', 'ABCD', None), ('**B**', 'ABCD', 'B'),
    ('Yes', ('yes', 'no', 'maybe'), 'yes'), ('NO.', ('yes', 'no', 'maybe'), 'no'),
    ('the answer is Maybe', ('yes', 'no', 'maybe'), 'maybe'),
    ('Answer: no, because', ('yes', 'no', 'maybe'), 'no'),
    ('Perhaps', ('yes', 'no', 'maybe'), None), ('yesterday', ('yes', 'no', 'maybe'), None),
])
def test_parser_table(text, labels, expected):
    assert scoring.parse_answer(text, list(labels)) == expected


def test_majority_vote_and_earliest_tie_break():
    assert scoring.majority_vote(['B', 'A', 'B', None, 'C']) == 'B'
    assert scoring.majority_vote(['C', 'A', 'A', 'C', 'B']) == 'C'    # tie: C came first
    assert scoring.majority_vote([None, 'A', 'C', 'C', 'A']) == 'A'
    assert scoring.majority_vote([None, None]) is None


def test_wilson_interval_values():
    lo, hi = scoring.wilson_interval(50, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    lo, hi = scoring.wilson_interval(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    lo, hi = scoring.wilson_interval(10, 10)
    assert hi == 1.0 and round(lo, 4) == 0.7225
    assert scoring.wilson_interval(0, 0) == (0.0, 1.0)
    assert scoring.mean_std([0.5, 0.7]) == (pytest.approx(0.6), pytest.approx(0.1))


def test_packing_first_fit_and_row_layout():
    bins = batching.pack([5, 3, 8, 2, 6], 10)
    assert sorted(i for b in bins for i in b) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 8, 2, 6][i] for i in b) <= 10 for b in bins) and len(bins) == 3
    row = batching.likelihood_row([1, 7, 8], [4, 5])
    assert row.tokens == [1, 7, 8, 4] and row.queries == [(2, [4]), (3, [5])]
    cut = batching.truncate_left(row, 3)
    assert cut.tokens == [7, 8, 4] and cut.queries == [(1, [4]), (2, [5])]
    with pytest.raises(ValueError, match='does not fit'):
        batching.truncate_left(row, 1)


def test_summary_per_seed_subject_and_unparseable():
    recs = []
    for seed, correct in ((1, [True, False, True, True]), (2, [True, False, False, True])):
        for i, c in enumerate(correct):
            recs.append(dict(id=str(i), seed=seed, correct=c, prediction=None if i == 1 else 'A',
                             subject='anatomy' if i < 2 else 'virology'))
    s = runner.summarise(recs, [1, 2])
    assert s['n'] == 4 and s['accuracy'] == 5 / 8 and s['unparseable'] == 2
    assert s['per_seed']['1']['accuracy'] == 0.75 and s['per_seed']['2']['accuracy'] == 0.5
    assert math.isclose(s['accuracy_std'], 0.125)
    assert s['per_subject'] == {'anatomy': dict(n=2, accuracy=0.5),
                                'virology': dict(n=2, accuracy=0.75)}
    assert s['ci95'] == list(scoring.wilson_interval(2.5, 4))


def test_cut_generation_stops_at_the_turn_end_or_next_question():
    assert runner.cut_generation(' B<|im_end|>\n<|im_start|>user') == ' B'
    assert runner.cut_generation(' C\n\nQuestion: next one') == ' C\n'
