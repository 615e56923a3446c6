"""Task finetuning (SFT) data: ChatML ids and loss masks, chat prepare and its manifest, whole-
conversation packing, one loss path (weights = loss_mask x same document) that learns only the
assistant turns, and bad chat input named by file and line with nothing written."""

import os
import random
import string

import jax
import numpy as np
import pytest

from configs import base
from meditron_jax import model, optim, sharding, train
from meditron_jax.data import chat, chat_data, loader, prepare, shards, tokenizer
from meditron_jax.data.sources import DataError
from tests.data_helpers import write_jsonl

ANSWER = 'Drink water and rest.'
SEQ_LEN = 128         # rows of 129 tokens
LONG_CONVERSATIONS = 3


def random_string(rng: random.Random, n: int) -> str:
    return ''.join(rng.choice(string.ascii_lowercase + ' ') for _ in range(n)).strip() or 'x'


def fixed_answer_set(path: str, n: int = 48, seed: int = 0) -> list[list[dict]]:
    """Conversations whose user turn is random and whose assistant turn is ANSWER; the last
    LONG_CONVERSATIONS have a user turn far longer than a row."""
    rng = random.Random(seed)
    convs = []
    for i in range(n):
        length = 600 if i >= n - LONG_CONVERSATIONS else rng.randint(20, 40)
        convs.append([dict(role='user', content=random_string(rng, length)),
                      dict(role='assistant', content=ANSWER)])
    write_jsonl(path, [{'messages': c} for c in convs])
    return convs


def chat_config(files: str, **overrides):
    cfg = base.get_config().data
    cfg.format = 'chat'
    cfg.packing = 'first_fit'
    cfg.sources = [base.source('qa', files, 1.0, 0.0)]
    cfg.tokenizer_vocab_size = 300
    cfg.seq_len = SEQ_LEN
    cfg.global_batch_size = 8
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp('sft')
    convs = fixed_answer_set(str(root / 'chat' / 'qa.jsonl'))
    cfg = chat_config(str(root / 'chat' / '*.jsonl'))
    manifest = prepare.prepare(cfg, str(root / 'data'))
    return dict(root=root, convs=convs, cfg=cfg, dir=str(root / 'data'), manifest=manifest,
                tokenizer=tokenizer.Tokenizer(str(root / 'data' / tokenizer.FILENAME)))


def runs(mask_N: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    edges = np.diff(np.concatenate([[0], mask_N, [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_mask_is_exactly_the_assistant_contents_and_their_end_markers(prepared):
    tok = prepared['tokenizer']
    messages = [dict(role='system', content='You answer medical questions.'),
                dict(role='user', content='What lowers a fever?'),
                dict(role='assistant', content='Paracetamol, 1 g.'),
                dict(role='user', content='And for a child?'),
                dict(role='assistant', content='15 mg/kg, every 6 hours.')]
    ids_N, mask_N = chat.tokenize(messages, tok)
    # The ids are the rendered conversation encoded as one text, after BOS.
    assert ids_N.tolist() == [tok.bos_id] + tok.encode(chat.render(messages), False, False)
    assert set(np.unique(mask_N)) == {0, 1}
    im_end, im_start = tok.piece_to_id(chat.IM_END), tok.piece_to_id(chat.IM_START)
    learned = runs(mask_N)
    assert len(learned) == 2
    for (start, end), content in zip(learned, ('Paracetamol, 1 g.', '15 mg/kg, every 6 hours.')):
        assert ids_N[end - 1] == im_end                         # the end marker is learned ...
        assert tok.decode(ids_N[start:end - 1]) == content       # ... and all of the content
        assert tok.decode(ids_N[:start]).endswith(f'{chat.IM_START}assistant\n')  # not it
        assert im_start not in ids_N[start:end]
    # Everything else (BOS, system, user, headers, newlines, the user's end markers) is 0.
    assert mask_N.sum() == sum(e - s for s, e in learned)
    assert [i for i in np.flatnonzero(ids_N == im_end) if mask_N[i]] == \
        [e - 1 for _, e in learned]


def test_manifest_counts_conversations_tokens_loss_tokens_and_truncations(prepared):
    m, tok = prepared['manifest'], prepared['tokenizer']
    train_split = m['sources']['qa']['splits']['train']
    encoded = [chat.tokenize(c, tok) for c in prepared['convs']]
    assert m['data_format'] == 'chat' and train_split['documents'] == len(prepared['convs'])
    assert train_split['tokens'] == sum(len(i) for i, _ in encoded)
    assert train_split['loss_tokens'] == sum(int(k.sum()) for _, k in encoded)
    assert train_split['truncated'] == LONG_CONVERSATIONS == m['totals']['train']['truncated']
    assert tok.piece_to_id(chat.IM_END) != tok.unk_id


def test_packing_keeps_conversations_whole_and_truncates_only_the_long_ones(prepared):
    manifest = prepared['manifest']
    stored = [chat_data.decode_record(r, manifest['dtype']) for path in
              shards.split_paths(prepared['dir'], manifest, 'qa', 'train')
              for r in shards.read_records(path)]
    by_ids = {tuple(ids.tolist()): mask for ids, mask in stored}
    row = SEQ_LEN + 1
    truncated = {tuple(ids[:row].tolist()): mask[:row] for ids, mask in stored if len(ids) > row}
    assert len(truncated) == LONG_CONVERSATIONS
    it = loader.make_train_iterator(prepared['cfg'], prepared['dir'], seed=0, process_index=0,
                                    process_count=1)
    seen = set()
    for _ in range(12):   # about two epochs
        batch = next(it)
        assert set(batch) == {'tokens', 'segment_ids', 'positions', 'loss_mask'}
        for tokens, segs, positions, mask in zip(batch['tokens'], batch['segment_ids'],
                                                 batch['positions'], batch['loss_mask']):
            assert not mask[segs == 0].any()
            for s in np.unique(segs[segs > 0]):
                piece = tuple(tokens[segs == s].tolist())
                expected = by_ids.get(piece, truncated.get(piece))
                assert expected is not None, 'a conversation was split or altered'
                np.testing.assert_array_equal(mask[segs == s], expected)
                np.testing.assert_array_equal(positions[segs == s], np.arange(len(piece)))
                if piece in truncated:
                    assert len(np.unique(segs)) == 1   # alone, filling its row
                seen.add(piece)
    assert len(seen) == len(stored)


def test_text_data_gets_an_all_ones_mask_and_chat_format_mismatch_is_refused(prepared, tmp_path):
    cfg = text_config(prepared, tmp_path)
    batch = next(loader.make_train_iterator(cfg, text_dir(prepared, cfg, tmp_path), seed=0,
                                            process_index=0, process_count=1))
    assert (batch['loss_mask'] == 1).all() and (batch['segment_ids'] == 0).any()
    with pytest.raises(DataError, match=r"data.format='text' but the prepared data is chat"):
        loader.make_train_iterator(chat_config(prepared['cfg'].sources[0]['files'],
                                               format='text'), prepared['dir'], seed=0,
                                   process_index=0, process_count=1)


def text_config(prepared, tmp_path):
    """The same conversations as plain text documents, with the chat tokenizer."""
    path = str(tmp_path / 'text' / 'qa.jsonl')
    if not os.path.exists(path):
        write_jsonl(path, [{'text': chat.render(c)} for c in prepared['convs']])
    cfg = chat_config(str(tmp_path / 'text' / '*.jsonl'), format='text',
                      tokenizer=os.path.join(prepared['dir'], tokenizer.FILENAME),
                      tokenizer_vocab_size=0)
    cfg.sources = [base.source('qa', str(tmp_path / 'text' / '*.jsonl'), 1.0, 0.0)]
    cfg.clean.update(dict(normalize=False, drop_urls=False, drop_references=False, min_chars=1))
    return cfg


def text_dir(prepared, cfg, tmp_path):
    out = str(tmp_path / 'text-data')
    prepare.prepare(cfg, out)
    return out


def test_only_the_weighted_tokens_are_learned(prepared, tmp_path):
    """Random user turns, a fixed answer: with the chat mask the loss goes to ~0; the same
    conversations as plain text keep the random turns' loss."""
    config = base.get_config()
    config.model = base.model_config('tiny')
    config.model.update(dict(vocab_size=384, max_seq_len=SEQ_LEN))
    config.data = prepared['cfg']
    config.optim.update(dict(lr_peak=1e-2, lr_min=1e-3, warmup_steps=5))
    steps = 40
    cfg = train.model_config(config)
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    schedule = optim.lr_schedule(config.optim, steps)
    optimizer = optim.make_optimizer(config.optim, steps)
    _, shardings = train.abstract_state(cfg, optimizer, mesh)
    step_fn, _ = train.compile_steps(config, cfg, optimizer, schedule, shardings, mesh)

    def final_loss(data_cfg, data_dir):
        state = train.fresh_state(model.init_params(cfg, mesh, seed=0), optimizer, shardings)
        it = loader.make_train_iterator(data_cfg, data_dir, seed=0, process_index=0,
                                        process_count=1)
        losses = []
        with jax.set_mesh(mesh):
            for _ in range(steps):
                state, metrics = step_fn(state, loader.to_global_batch(next(it), mesh))
                losses.append(float(metrics['loss']))
        return np.mean(losses[-5:])

    chat_loss = final_loss(prepared['cfg'], prepared['dir'])
    text_cfg = text_config(prepared, tmp_path)
    text_loss = final_loss(text_cfg, text_dir(prepared, text_cfg, tmp_path))
    # (Measured: chat 0.07-0.09 after 40 steps, text 1.7-2.0, the random turns' share.)
    assert chat_loss < 0.15, (chat_loss, text_loss)
    assert text_loss > 1.0 and text_loss > 10 * chat_loss, (chat_loss, text_loss)


@pytest.mark.parametrize('line,message', [
    ('{"text": "no messages"}', r'c.jsonl:3: no "messages" \(nor "prompt" and "response"\)'),
    ('{"messages": [{"role": "doctor", "content": "hi"}, {"role": "assistant", '
     '"content": "ok"}]}', r"c.jsonl:3: message 0: unknown role 'doctor'"),
    ('{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", '
     '"content": "hi"}]}', r'c.jsonl:3: no assistant message'),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
     '"content": "  "}]}', r'c.jsonl:3: message 1 \(assistant\): empty content'),
    ('{"prompt": "hi", "response": ""}', r'c.jsonl:3: message 1 \(assistant\): empty content'),
    ('{"messages": [{"role": "user"', r'c.jsonl:3: malformed JSON'),
])
def test_bad_chat_input_names_file_and_line_and_writes_nothing(tmp_path, line, message):
    good = {'prompt': 'What is a fever?', 'response': 'A temperature of 38 C or more.'}
    write_jsonl(str(tmp_path / 'chat' / 'c.jsonl'), [good, good, line])
    cfg = chat_config(str(tmp_path / 'chat' / '*.jsonl'))
    with pytest.raises(DataError, match=message):
        prepare.prepare(cfg, str(tmp_path / 'out'))
    assert not os.path.exists(tmp_path / 'out')


@pytest.mark.parametrize('name,devices', [('sft_meditron_7b', 8), ('sft_meditron_70b', 128)])
def test_sft_configs_carry_the_paper_recipe(name, devices):
    import importlib
    c = importlib.import_module(f'configs.{name}').get_config()
    o = c.optim
    assert (o.b1, o.b2, o.eps, o.weight_decay) == (0.9, 0.95, 1e-5, 0.1)
    assert (o.lr_peak, o.lr_min, o.warmup_fraction) == (2e-5, 2e-6, 0.1)
    assert c.train.epochs == 3 and c.data.global_batch_size == 64
    assert c.model.compute_dtype == 'bfloat16' and c.train.init_from
    assert (c.data.format, c.data.packing) == ('chat', 'first_fit')
    # The schedule: 10% of the steps warm up, then cosine to 10% of the peak.
    schedule = optim.lr_schedule(o, 1000)
    assert float(schedule(100)) == pytest.approx(2e-5) and float(schedule(1000)) == \
        pytest.approx(2e-6)
    # The 64 sequences split evenly over the data-parallel ranks of the intended cluster.
    tp = c.mesh.tensor
    dp = devices // tp
    assert 64 % o.grad_accum_steps == 0 and (64 // o.grad_accum_steps) % dp == 0
