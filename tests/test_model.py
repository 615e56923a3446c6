"""The Llama-2 model: parity with Hugging Face, masks, remat, presets, config errors.

Jitted functions here compile with ``xla_backend_optimization_level=0``: the same XLA program
with less LLVM optimisation of its CPU kernels, which cuts compile time about threefold and keeps this module fast. Random parameters come from numpy in the
shapes ``param_specs`` gives, because the RNG of ``init_params`` alone takes seconds to compile
on CPU; test_sharding.py covers ``init_params``.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax import attention as attention_lib, model as M

FAST_COMPILE = {'xla_backend_optimization_level': 0}
# One jitted forward for the whole module: equal (cfg, shapes) share one compile.
forward = jax.jit(M.forward, static_argnums=1, compiler_options=FAST_COMPILE)


def random_params(cfg: M.LlamaConfig, seed: int = 0):
    """Stacked params in the model's scheme; norm scales near 1, matrices scaled to keep
    activations O(1) so that logit differences are not hidden by tiny values."""
    abstract, _ = M.param_specs(cfg)
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = jax.tree_util.keystr(path)
        if 'scale' in name:
            return (1.0 + 0.1 * rng.standard_normal(spec.shape)).astype(np.float32)
        fan_in = cfg.hidden_size  # every matrix reads the hidden state, except these two
        if 'embedding' in name:
            fan_in = 1
        elif "['down']" in name:
            fan_in = cfg.mlp_dim
        return (rng.standard_normal(spec.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def loss_fn(cfg):
    def loss(params, tokens_BxT):
        logits = M.forward(params, cfg, tokens_BxT)
        total, count = M.cross_entropy(logits[:, :-1], tokens_BxT[:, 1:],
                                       jnp.ones_like(tokens_BxT[:, 1:]))
        return total / count
    return loss


@pytest.fixture(scope='module')
def cfg():
    return M.preset('tiny')


@pytest.fixture(scope='module')
def params(cfg):
    return random_params(cfg)


@pytest.fixture(scope='module')
def tokens(cfg):
    return np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)


@pytest.fixture(scope='module')
def xla_logits(cfg, params, tokens):
    return np.asarray(forward(params, cfg, tokens))


# ----------------------------------------------------------------- parity with transformers


def hf_state_dict_to_params(state_dict, cfg: M.LlamaConfig):
    """HF LlamaForCausalLM state dict (torch (out, in) linears) -> our stacked params."""
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def w(name):
        return state_dict[name].detach().float().numpy()

    layers = []
    for i in range(cfg.num_layers):
        pre = f'model.layers.{i}.'
        layers.append({
            'attn_norm': {'scale': w(pre + 'input_layernorm.weight')},
            'attn': {
                'q': {'kernel': w(pre + 'self_attn.q_proj.weight').T.reshape(d, n, h)},
                'k': {'kernel': w(pre + 'self_attn.k_proj.weight').T.reshape(d, k, h)},
                'v': {'kernel': w(pre + 'self_attn.v_proj.weight').T.reshape(d, k, h)},
                'o': {'kernel': w(pre + 'self_attn.o_proj.weight').T.reshape(n, h, d)},
            },
            'mlp_norm': {'scale': w(pre + 'post_attention_layernorm.weight')},
            'mlp': {
                'gate': {'kernel': w(pre + 'mlp.gate_proj.weight').T},
                'up': {'kernel': w(pre + 'mlp.up_proj.weight').T},
                'down': {'kernel': w(pre + 'mlp.down_proj.weight').T},
            },
        })
    return {
        'embed': {'embedding': w('model.embed_tokens.weight')},
        'layers': jax.tree.map(lambda *xs: np.stack(xs), *layers),
        'final_norm': {'scale': w('model.norm.weight')},
        'lm_head': {'kernel': w('lm_head.weight').T},
    }


@pytest.fixture(scope='module')
def hf_model(cfg):
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    assert cfg.num_heads > cfg.num_kv_heads > 0 and cfg.num_layers >= 2  # GQA, a real stack
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM._from_config(
        hf_cfg, attn_implementation='eager', dtype=torch.float32).eval()
    # HF's init (std 0.02, unit norms) gives near-constant logits; randomise every weight so
    # that a transposed or misplaced tensor shows up far above the tolerance.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith('norm.weight'):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif 'embed_tokens' in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)
    assert hf.config._attn_implementation == 'eager'
    return hf


@pytest.mark.parametrize('scan_layers', [True, False], ids=['scanned', 'unscanned'])
def test_logits_and_loss_match_hf_llama(cfg, hf_model, tokens, scan_layers):
    import torch
    cfg = cfg.replace(scan_layers=scan_layers)
    params = hf_state_dict_to_params(hf_model.state_dict(), cfg)
    abstract, _ = M.param_specs(cfg.replace(scan_layers=True))
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, abstract)
    params = M.to_layout(params, cfg)

    with torch.no_grad():
        ids = torch.from_numpy(tokens).long()
        hf_out = hf_model(input_ids=ids, labels=ids)
    hf_logits = hf_out.logits.numpy()

    def logits_and_loss(p, t):
        logits = M.forward(p, cfg, t)
        total, count = M.cross_entropy(logits[:, :-1], t[:, 1:], jnp.ones_like(t[:, 1:]))
        return logits, total / count

    logits, loss = jax.jit(logits_and_loss, compiler_options=FAST_COMPILE)(params, tokens)
    logits = np.asarray(logits)
    assert logits.dtype == np.float32 and logits.shape == hf_logits.shape
    assert hf_logits.std() > 0.5  # logits vary enough (std ~1) for 1e-5 to be a real bound
    np.testing.assert_allclose(logits, hf_logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(float(loss), hf_out.loss.item(), rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------------ masks


def test_packed_documents_match_each_document_alone(cfg, params):
    rng = np.random.default_rng(2)
    doc_a = rng.integers(0, cfg.vocab_size, 5).astype(np.int32)
    doc_b = rng.integers(0, cfg.vocab_size, 7).astype(np.int32)
    packed = np.concatenate([doc_a, doc_b])[None]
    segment_ids = np.array([[1] * 5 + [2] * 7], np.int32)
    positions = np.array([list(range(5)) + list(range(7))], np.int32)
    packed_logits = np.asarray(forward(params, cfg, packed, positions, segment_ids))[0]
    logits_a = np.asarray(forward(params, cfg, doc_a[None]))[0]
    logits_b = np.asarray(forward(params, cfg, doc_b[None]))[0]
    np.testing.assert_allclose(packed_logits[:5], logits_a, rtol=0, atol=1e-5)
    np.testing.assert_allclose(packed_logits[5:], logits_b, rtol=0, atol=1e-5)
    # Without the document mask the second document would see the first: the check bites.
    unmasked = np.asarray(forward(params, cfg, packed, positions, np.ones_like(segment_ids)))[0]
    assert np.abs(unmasked[5:] - logits_b).max() > 1e-2


def test_causal_changing_token_t_changes_no_earlier_logit(cfg, params, tokens, xla_logits):
    t = 9
    changed = tokens.copy()
    changed[:, t] = (changed[:, t] + 1) % cfg.vocab_size
    logits = np.asarray(forward(params, cfg, changed))
    np.testing.assert_allclose(logits[:, :t], xla_logits[:, :t], rtol=0, atol=1e-6)
    assert np.abs(logits[:, t:] - xla_logits[:, t:]).max(axis=(0, 2)).min() > 1e-3


# ------------------------------------------------------------------------ remat


@pytest.mark.parametrize('scan_layers,scan_unroll', [(True, 0), (True, 1), (False, 0)],
                         ids=['scanned-unrolled', 'scanned-loop', 'unscanned'])
def test_remat_policies_give_the_same_gradients_as_none(cfg, params, tokens, scan_layers,
                                                        scan_unroll):
    base = cfg.replace(scan_layers=scan_layers, scan_unroll=scan_unroll)
    params = M.to_layout(params, base)
    grads = {}
    for policy in M.REMAT_POLICIES:
        c = base.replace(remat=policy)
        grad_fn = jax.grad(loss_fn(c))
        # The policy really puts a rematerialisation into the program (or none for 'none').
        assert ('remat' in str(jax.make_jaxpr(grad_fn)(params, tokens))) == (policy != 'none')
        grads[policy] = jax.jit(grad_fn, compiler_options=FAST_COMPILE)(params, tokens)
    assert set(grads) == {'none', 'full', 'save_dots', 'save_dots_no_batch'}
    for policy, g in grads.items():
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g),
                                jax.tree.leaves(grads['none'])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6,
                                       err_msg=f'{policy}: {jax.tree_util.keystr(path)}')


def test_save_dots_on_cpu_recomputes_no_product(cfg, params, tokens):
    """remat=save_dots still sees the projections' products on CPU, where they sit inside custom
    VJPs (layers.matmul_cpu, swiglu_down): its compiled gradient has as many dots as no remat at
    all, where remat=full recomputes the forward's."""
    def dots(policy):
        c = cfg.replace(remat=policy)
        text = jax.jit(jax.grad(loss_fn(c))).lower(M.to_layout(params, c), tokens).compile()
        return text.as_text().count(' dot(')
    none = dots('none')
    assert dots('save_dots') == none
    assert dots('full') > none


# ------------------------------------------------------------------ scanned stack's loop


def test_scan_unroll_is_chosen_per_platform():
    tiny = M.preset('tiny')                                    # 2 layers
    assert M.scan_unroll(tiny) == 2                            # XLA:CPU: no loop
    assert M.scan_unroll(tiny.replace(num_layers=M.CPU_UNROLL_MAX_LAYERS + 1)) == 1
    assert M.scan_unroll(tiny.replace(scan_unroll=1)) == 1     # the config's, when set
    assert M.scan_unroll(tiny.replace(scan_unroll=5)) == 2
    for platform in ('gpu', 'tpu'):
        with attention_lib.compile_platform(platform):
            assert M.scan_unroll(tiny) == 1
    with pytest.raises(ValueError, match=r'scan_unroll=-1 must be >= 0'):
        tiny.replace(scan_unroll=-1)


def test_unrolled_scan_has_no_loop_and_the_same_gradients(cfg, params, tokens):
    grads = {}
    for unroll in (1, 0):
        grad_fn = jax.grad(loss_fn(cfg.replace(scan_unroll=unroll)))
        text = jax.jit(grad_fn).lower(params, tokens).as_text()
        assert ('stablehlo.while' in text) == (unroll == 1), unroll
        grads[unroll] = jax.jit(grad_fn, compiler_options=FAST_COMPILE)(params, tokens)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads[0]),
                            jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------- attention


def test_cudnn_attention_falls_back_to_xla_on_cpu_with_a_warning(
        cfg, params, tokens, xla_logits, caplog):
    assert jax.default_backend() == 'cpu' and cfg.compute_dtype == 'float32'
    attention_lib._warned_attention.clear()  # each reason is logged once per process
    c = cfg.replace(attention='cudnn')
    with caplog.at_level(logging.WARNING):
        logits = forward(params, c, tokens)
        # Each reason cuDNN cannot run, named: float32 compute (also on GPU), a non-gpu backend.
        assert M.resolve_attention('cudnn', jnp.float32) == 'xla'
        assert M.resolve_attention('cudnn', jnp.bfloat16) == 'xla'
        assert M.resolve_attention('xla', jnp.bfloat16) == 'xla'
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2, messages  # once per reason, not once per layer or call
    assert 'attention=cudnn' in messages[0] and 'float32' in messages[0]
    assert "backend is 'cpu'" in messages[1] and 'falling back to the xla' in messages[1]
    np.testing.assert_array_equal(np.asarray(logits), xla_logits)


# ------------------------------------------------------------------------- presets

# Published Llama-2 shapes (Touvron et al. 2023, and the HF config.json files).
PUBLISHED = {
    'llama2_7b': dict(hidden=4096, layers=32, heads=32, kv_heads=32, mlp=11008,
                      params=6_738_415_616),
    'llama2_13b': dict(hidden=5120, layers=40, heads=40, kv_heads=40, mlp=13824,
                       params=13_015_864_320),
    'llama2_70b': dict(hidden=8192, layers=80, heads=64, kv_heads=8, mlp=28672,
                       params=68_976_648_192),
}


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_preset_matches_published_llama2_shapes_and_counts(name):
    cfg, want = M.preset(name), PUBLISHED[name]
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim) == (
        want['hidden'], want['layers'], want['heads'], want['kv_heads'], want['mlp'])
    assert (cfg.vocab_size, cfg.head_dim, cfg.max_seq_len) == (32000, 128, 4096)
    assert (cfg.rope_theta, cfg.rms_eps) == (10000.0, 1e-5)
    abstract, _ = M.param_specs(cfg)  # the shapes the model really creates (no allocation)
    counted = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
    assert counted == cfg.num_params() == want['params']
    layers = abstract['layers']
    assert layers['attn']['k']['kernel'].shape == (want['layers'], want['hidden'],
                                                   want['kv_heads'], 128)
    assert layers['mlp']['down']['kernel'].shape == (want['layers'], want['mlp'],
                                                     want['hidden'])


# --------------------------------------------------------------------- bad configs


def test_heads_not_dividing_hidden_raises_naming_both():
    with pytest.raises(ValueError, match=r'num_heads=6 does not divide hidden_size=64'):
        M.preset('tiny', num_heads=6, num_kv_heads=6)


def test_kv_heads_not_dividing_heads_raises_naming_both():
    with pytest.raises(ValueError, match=r'num_kv_heads=3 does not divide num_heads=8'):
        M.preset('tiny', num_kv_heads=3)


def test_rope_from_the_cpu_table_matches_rope_computed():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 16, 4, 8), dtype=np.float32))
    positions = jnp.asarray(rng.integers(0, 64, (2, 16)), jnp.int32)
    computed = jax.jit(lambda x, p: M.rope(x, p, 10000.0))
    from_table = jax.jit(lambda x, p: M.rope(x, p, 10000.0, 64))
    np.testing.assert_allclose(from_table(x, positions), computed(x, positions), rtol=0, atol=1e-6)
    # The CPU program gathers from the table: no cos or sin is evaluated in it.
    assert 'cosine' in computed.lower(x, positions).compile().as_text()
    assert 'cosine' not in from_table.lower(x, positions).compile().as_text()
    # A position past the table reads NaN, not a clamped angle.
    out = np.asarray(from_table(x, positions.at[1, 3].set(64)))
    assert np.isnan(out[1, 3]).all() and not np.isnan(np.delete(out.reshape(32, -1), 19, 0)).any()


@pytest.mark.parametrize('equation,kernel_shape', [('btd,df->btf', (6, 10)),
                                                    ('btnh,nhd->btd', (2, 3, 6))],
                         ids=['mlp', 'o'])
def test_cpu_contract_gradients_match_einsum_and_keep_x_transposed_apart(equation,
                                                                       kernel_shape):
    """contract's CPU form (layers.matmul_cpu: the kernel's gradient from a copy of x^T) against
    autodiff of jnp.einsum; in the compiled CPU gradient no product contracts the rows of both
    operands (the form XLA:CPU ran through its slow generic dot)."""
    keys = jax.random.split(jax.random.key(6), 3)
    x_shape = (2, 5, *kernel_shape[:-1]) if equation.startswith('btnh') else (2, 5, 6)
    x = jax.random.normal(keys[0], x_shape)
    kernel = jax.random.normal(keys[1], kernel_shape)
    ours = jax.vjp(lambda x, k: M.contract(equation, x, k), x, kernel)
    theirs = jax.vjp(lambda x, k: jnp.einsum(equation, x, k), x, kernel)
    dy = jax.random.normal(keys[2], ours[0].shape)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1](dy), theirs[1](dy)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(M.contract(equation, x, k) * dy), (0, 1)))
    text = grad.lower(x, kernel).compile().as_text()
    assert ' dot(' in text
    assert 'lhs_contracting_dims={0}, rhs_contracting_dims={0}' not in text


def test_swiglu_gradients_match_autodiff():
    keys = jax.random.split(jax.random.key(3), 3)
    gate, up, dh = (jax.random.normal(k, (3, 5, 7)) * 3 for k in keys)
    plain = lambda g, u: jax.nn.silu(g) * u
    ours = jax.vjp(M.swiglu, gate, up)
    theirs = jax.vjp(plain, gate, up)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)
    for a, b in zip(ours[1](dh), theirs[1](dh)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_swiglu_down_gradients_match_autodiff():
    """The MLP's second half, whose backward recomputes swiglu's output, against autodiff."""
    keys = jax.random.split(jax.random.key(5), 4)
    gate, up = (jax.random.normal(k, (3, 5, 7)) * 3 for k in keys[:2])
    down = jax.random.normal(keys[2], (7, 4))
    dy = jax.random.normal(keys[3], (3, 5, 4))
    plain = lambda g, u, w: jnp.einsum('btf,fd->btd', jax.nn.silu(g) * u, w)
    ours = jax.vjp(M.swiglu_down, gate, up, down)
    theirs = jax.vjp(plain, gate, up, down)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1](dy), theirs[1](dy)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_rms_norm_cpu_backward_matches_autodiff(dtype):
    """The CPU form (its own backward, saving x and 1/rms) against autodiff of the plain
    formula, which is what GPU/TPU run; values and both gradients."""
    keys = jax.random.split(jax.random.key(4), 3)
    x = (jax.random.normal(keys[0], (3, 5, 16)) * 2 + 0.5).astype(dtype)
    scale = 1 + 0.1 * jax.random.normal(keys[1], (16,))
    dy = jax.random.normal(keys[2], (3, 5, 16)).astype(dtype)

    def plain(x, scale, out_dtype=dtype):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-5)
        return scale.astype(out_dtype) * x32.astype(out_dtype)

    ours = jax.vjp(lambda x, s: M.rms_norm(x, s, 1e-5, dtype), x, scale)
    theirs = jax.vjp(plain, x, scale)
    assert ours[0].dtype == dtype
    ours_grads, their_grads = ours[1](dy), theirs[1](dy)
    assert [g.dtype for g in ours_grads] == [g.dtype for g in their_grads]
    if dtype == jnp.float32:
        np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)
        for a, b in zip(ours_grads, their_grads):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        return
    # bfloat16: autodiff rounds the products for the scale's gradient to bfloat16 before summing
    # them, ours sums in float32; both against the float32 computation, ours at least as close.
    np.testing.assert_array_equal(ours[0], theirs[0])
    exact = jax.vjp(lambda x, s: plain(x, s, jnp.float32),
                    x.astype(jnp.float32), scale)[1](dy.astype(jnp.float32))
    for a, b, ref in zip(ours_grads, their_grads, exact):
        a, b, ref = (np.asarray(v, np.float32) for v in (a, b, ref))
        err_ours, err_theirs = np.abs(a - ref).max(), np.abs(b - ref).max()
        assert err_ours <= 1.01 * err_theirs + 1e-3, (err_ours, err_theirs)
        np.testing.assert_allclose(a, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
