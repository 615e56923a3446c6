"""Generation: the KV cache gives the full forward pass's logits, greedy output is transformers'
token for token, sampling is seeded and filtered as specified, an 8-device mesh gives the tokens
of one device, and bad input is refused with a clear message."""

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch

import meditron_jax
from meditron_jax import generate, generate_cli, sharding
from meditron_jax import model as model_lib
from meditron_jax.convert import cli as convert_cli
from meditron_jax.convert import hf

import convert_fixtures as fx

MAX_NEW = 12
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def hf_model():
    return fx.hf_model(torch.float32)


@pytest.fixture(scope='module')
def checkpoints(hf_model, tmp_path_factory):
    """The tiny HF Llama imported twice: bare (no tokenizer), and from a source directory that
    holds a tokenizer.model (which must travel into the params checkpoint)."""
    root = tmp_path_factory.mktemp('gen')
    hf_model.save_pretrained(root / 'hf')
    corpus = root / 'corpus.txt'   # a tokenizer of the model's vocabulary size
    files = sorted(glob.glob(os.path.join(REPO, 'meditron_jax/data/corpus/*/*.jsonl')))[:2]
    corpus.write_text('\n'.join(json.loads(line)['text'].replace('\n', ' ')
                                for f in files for line in open(f)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / 'tok'),
                                   vocab_size=fx.VOCAB, user_defined_symbols=['<|im_end|>'],
                                   minloglevel=2)
    shutil.copytree(root / 'hf', root / 'hf_tok')
    shutil.copyfile(root / 'tok.model', root / 'hf_tok' / 'tokenizer.model')
    bare = hf.import_hf(str(root / 'hf'), str(root / 'bare'), pad_vocab_multiple=8)
    with_tok = convert_cli.main(['import-hf', str(root / 'hf_tok'), str(root / 'with_tok'),
                                 '--pad-vocab-multiple', '8'])
    return dict(bare=bare, with_tok=with_tok, tokenizer=str(root / 'tok.model'), root=root)


@pytest.fixture(scope='module')
def model(checkpoints):
    return meditron_jax.load(checkpoints['bare'])


def prompts(lengths=(3, 9, 1, 14), seed=5):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, fx.VOCAB, n).tolist() for n in lengths]


@pytest.mark.parametrize('scan_layers,num_kv_heads,step_form',
                         [(True, 4, False), (False, 4, False), (True, 8, False), (False, 4, True)],
                         ids=['scanned-gqa', 'unscanned-gqa', 'scanned-mha', 'step-cache-gqa'])
def test_cached_decoding_gives_full_forward_logits_at_every_position(scan_layers, num_kv_heads,
                                                                      step_form):
    cfg = model_lib.preset('tiny', scan_layers=scan_layers, num_kv_heads=num_kv_heads,
                           init_std=0.1)
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    params = model_lib.to_layout(model_lib.init_params(cfg, mesh), cfg)
    tokens_BxT = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)
    full_BxTxV = np.asarray(jax.jit(model_lib.forward, static_argnums=1)(params, cfg, tokens_BxT))
    forward_cached = jax.jit(model_lib.forward_cached, static_argnums=1)
    # Row 0 prefills 5 tokens, row 1 only 3 (right padding): each then decodes from its own
    # position, one token a step, up to position 11.
    lengths = np.array([5, 3])
    cache = model_lib.init_cache(cfg, 2, 16)
    assert cache['k'].shape == (cfg.num_layers, 2, 16, num_kv_heads, cfg.head_dim)
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    logits, cache = forward_cached(params, cfg, tokens_BxT[:, :5], positions, cache)
    for b in range(2):
        np.testing.assert_allclose(logits[b, :lengths[b]], full_BxTxV[b, :lengths[b]], atol=1e-5)
    if step_form:   # the decode loop's per-layer, head-major form (generate.decode)
        cache = model_lib.step_cache(cache)
        assert cache[0]['k_BxKxSxH'].shape == (2, num_kv_heads, 16, cfg.head_dim)
    pos = lengths.copy()
    while pos.min() < 12:
        pos_B = np.minimum(pos, 11)
        step_tokens = np.asarray(tokens_BxT)[np.arange(2), pos_B][:, None]
        logits, cache = forward_cached(params, cfg, jnp.asarray(step_tokens),
                                       jnp.asarray(pos_B[:, None]), cache)
        for b in range(2):
            if pos[b] < 12:
                np.testing.assert_allclose(logits[b, 0], full_BxTxV[b, pos[b]], atol=1e-5)
        pos += 1


def test_greedy_matches_transformers_generate_for_each_prompt_of_a_batch(model, hf_model):
    ps = prompts()
    ours = model.generate(ps, MAX_NEW)
    assert model.eos_id == 2   # from the imported config.json, as transformers uses it
    for p, out in zip(ps, ours):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p)),
                                    do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=0)
        assert out == ref[0, len(p):].tolist()
    assert all(len(o) == MAX_NEW or o[-1] == 2 for o in ours)


def test_sampling_seeded_filters_and_never_padding_ids(model):
    ps = prompts()
    greedy = model.generate(ps, MAX_NEW)
    a = model.generate(ps, MAX_NEW, temperature=1.0, seed=3)
    assert a == model.generate(ps, MAX_NEW, temperature=1.0, seed=3)
    assert a != model.generate(ps, MAX_NEW, temperature=1.0, seed=4)
    assert a != greedy
    # A row's sample does not depend on its batch: its key is (seed, row index, step).
    assert model.generate(ps[:2], MAX_NEW, temperature=1.0, seed=3) == a[:2]
    assert model.generate(ps, MAX_NEW, temperature=0.7, top_k=1, top_p=0.9, seed=9) == greedy
    assert model.generate(ps, MAX_NEW, temperature=0.0, top_k=5, top_p=0.5, seed=9) == greedy

    probs = np.array([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.4, 0.1]])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    kept = lambda x: np.isfinite(np.asarray(x))
    np.testing.assert_array_equal(kept(generate.top_p_filter(logits, 0.75)),
                                  [[0, 1, 0, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(kept(generate.top_p_filter(logits, 0.85)),
                                  [[0, 1, 1, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(kept(generate.top_p_filter(logits, 1.0)), np.ones((2, 4)))
    np.testing.assert_array_equal(kept(generate.top_p_filter(logits, 0.1)),
                                  [[0, 1, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(kept(generate.top_k_filter(logits, 2)),   # ties kept
                                  [[0, 1, 0, 1], [1, 1, 1, 0]])

    # Padding ids (250..255) made the most likely by far: never produced, greedy or sampled.
    params = jax.tree.map(lambda x: x, model.params)
    params['lm_head']['kernel'] = params['lm_head']['kernel'].at[:, fx.VOCAB:].set(50.0)
    padded = meditron_jax.Model(config=model.config, params=params,
                                true_vocab_size=model.true_vocab_size)
    for kwargs in (dict(), dict(temperature=3.0), dict(temperature=3.0, top_p=0.99, top_k=40)):
        outs = padded.generate(ps, MAX_NEW, **kwargs)
        assert max(max(o) for o in outs) < fx.VOCAB, kwargs


def test_eight_devices_with_data_fsdp_tensor_axes_give_one_device_tokens(model, checkpoints):
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    sharded = meditron_jax.load(checkpoints['bare'], mesh=mesh)
    assert len(sharded.params['layers']['attn']['k']['kernel'].sharding.device_set) == 8
    ps = prompts((5, 2, 11))
    for kwargs in (dict(), dict(temperature=1.0, top_k=20, top_p=0.9, seed=7)):
        assert sharded.generate(ps, MAX_NEW, **kwargs) == model.generate(ps, MAX_NEW, **kwargs)


def _cli(checkpoints, *args):
    return generate_cli.main(['--model', checkpoints['with_tok'], *args])


BAD_INPUTS = [
    (lambda m, c: m.generate([[5, 6], []], 4), 'prompt 1 is empty'),
    (lambda m, c: m.generate([[5] * 60], 5), r'prompt 0 has 60 tokens: with max_new_tokens=5 '
                                             r'that is 65, more than the model.s max_seq_len=64'),
    (lambda m, c: m.generate([[5, 300]], 4), r'prompt 0 holds token ids \[300\] outside'),
    (lambda m, c: m.generate([[5]], 4, top_p=0.0), r'top_p=0.0 must be in \(0, 1\]'),
    (lambda m, c: m.generate([[5]], 4, top_p=1.5), r'top_p=1.5 must be in \(0, 1\]'),
    (lambda m, c: m.generate([[5]], 0), 'max_new_tokens=0 must be an integer >= 1'),
    (lambda m, c: m.generate([[5]], 4, temperature=-1), 'temperature=-1 must be >= 0'),
    (lambda m, c: m.generate([[5]], 4, top_k=-2), 'top_k=-2 must be an integer >= 0'),
    (lambda m, c: m.generate('hello', 4), 'prompts must be a non-empty list of lists'),
    (lambda m, c: m.generate([[5]], 4, stop=['\n']), 'stop string .* needs a tokenizer'),
    (lambda m, c: m.complete(['hi'], 4), 'this model has no tokenizer'),
    (lambda m, c: generate_cli.main(['--model', c['bare'], '--prompt', 'the patient',
                                     '--max_new_tokens', '3']),
     'carries no tokenizer: pass --tokenizer PATH'),
    (lambda m, c: _cli(c, '--prompt', '  ', '--max_new_tokens', '3'),
     '--prompt 0: the prompt is empty'),
    (lambda m, c: _cli(c, '--prompt', 'the patient ' * 20, '--max_new_tokens', '40'),
     r'prompt 0 has \d+ tokens: with --max_new_tokens=40'),
    (lambda m, c: _cli(c, '--prompt', 'a', '--max_new_tokens', '3', '--top_p', '0'),
     r'top_p=0.0 must be in \(0, 1\]'),
    (lambda m, c: _cli(c, '--prompt_file', str(c['root'] / 'bad.jsonl'), '--max_new_tokens',
                       '3'), r'bad.jsonl:2: expected an object with a "prompt" string'),
    (lambda m, c: _cli(c, '--prompt', 'a', '--max_new_tokens', '3', '--mesh', 'data=3'),
     'expected exactly the axes'),
]


@pytest.mark.parametrize('call,message', BAD_INPUTS, ids=[m[:32] for _, m in BAD_INPUTS])
def test_bad_input_gets_its_message(call, message, model, checkpoints):
    (checkpoints['root'] / 'bad.jsonl').write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises((generate.GenerationError, sharding.ShardingError), match=message):
        call(model, checkpoints)


def test_cli_completes_with_the_tokenizer_that_import_hf_copied(checkpoints, capsys):
    path = checkpoints['with_tok']
    assert os.path.isfile(os.path.join(path, 'tokenizer.model'))
    m = meditron_jax.load(path)
    assert isinstance(m.tokenizer, spm.SentencePieceProcessor) and m.eos_id == m.tokenizer.eos_id()
    texts = ['the patient was', 'aspirin', 'rest and']
    m8 = meditron_jax.load(path, mesh=sharding.make_mesh(dict(data=2, fsdp=2, tensor=2)))
    expected = m8.complete(texts, 6, temperature=0.8, seed=2)
    prompt_file = checkpoints['root'] / 'prompts.jsonl'
    prompt_file.write_text(''.join(json.dumps(dict(id=i, prompt=t)) + '\n'
                                   for i, t in enumerate(texts)))
    out = checkpoints['root'] / 'out.jsonl'
    _cli(checkpoints, '--prompt_file', str(prompt_file), '--max_new_tokens', '6',
         '--temperature', '0.8', '--seed', '2', '--batch_size', '4', '--out', str(out),
         '--mesh', 'data=2,fsdp=2,tensor=2')
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r['id'], r['prompt'], r['completion']) for r in rows] == list(
        zip(range(3), texts, expected))
    capsys.readouterr()
    _cli(checkpoints, '--prompt', texts[0], '--max_new_tokens', '6', '--temperature', '0.8',
         '--seed', '2', '--mesh', 'data=2,fsdp=2,tensor=2')
    assert capsys.readouterr().out == expected[0] + '\n'
