"""attention='splash': JAX's Pallas splash kernel against the xla attention in interpret mode on
CPU (forward and gradients; causal, several packed documents a row, padding, GQA; alone, under
a mesh through shard_map, and inside the model), and compiled for a TPU v5p slice with libtpu."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax import model, sharding, splash

B, T, N, K, H = 2, 256, 4, 2, 32    # two 128-blocks a row: the kernel's smallest tiling


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in [(B, T, N, H), (B, T, K, H), (B, T, K, H)])
    # Row 0: four documents, one crossing the 128-token block edge; row 1: three, then padding.
    segments = np.zeros((B, T), np.int32)
    for row, edges in enumerate([(0, 40, 100, 190, T), (0, 128, 150, 200)]):
        for i, (start, end) in enumerate(zip(edges, edges[1:])):
            segments[row, start:end] = i + 1
    return q, k, v, jnp.asarray(segments)


def _loss(attention):
    # A nonlinear readout so that every output element has its own cotangent.
    return lambda q, k, v, seg: jnp.sum(jnp.sin(attention(q, k, v, seg)) * jnp.arange(H))


def _values_and_grads(attention, *args):
    out = jax.jit(attention)(*args)
    grads = jax.jit(jax.grad(_loss(attention), argnums=(0, 1, 2)))(*args)
    return out, grads


def _assert_close(got, want, what):
    # float32, online softmax vs one softmax: differences are a few ulps of the largest value.
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * max(scale, 1.0), err_msg=what)


def _xla(q, k, v, seg):
    return model.attention(q, k, v, seg, 'xla')


def test_splash_matches_xla_attention_values_and_gradients():
    args = _inputs()
    want, want_grads = _values_and_grads(_xla, *args)
    got, got_grads = _values_and_grads(
        lambda q, k, v, seg: splash.splash_attention(q, k, v, seg, interpret=True), *args)
    _assert_close(got, want, 'output')
    for name, g, w in zip('qkv', got_grads, want_grads):
        _assert_close(g, w, f'd loss / d {name}')
    # The documents matter: without segment ids the values differ (the test can fail).
    unsegmented = jax.jit(lambda q, k, v: splash.splash_attention(q, k, v, None))(*args[:3])
    assert float(jnp.max(jnp.abs(unsegmented - want))) > 1e-2
    np.testing.assert_allclose(unsegmented, _xla(*args[:3], None), rtol=0, atol=1e-5)


def test_splash_under_a_mesh_runs_per_shard_with_the_same_values():
    args = _inputs(seed=1)
    mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2), jax.devices()[:4])
    want, want_grads = _values_and_grads(_xla, *args)
    with jax.set_mesh(mesh):
        attention = lambda q, k, v, seg: model.attention(q, k, v, seg, 'splash')
        got, got_grads = _values_and_grads(attention, *args)
        hlo = jax.jit(attention).lower(*args).as_text()
        jaxpr = str(jax.make_jaxpr(attention)(*args))
    # The kernel ran (interpreted, on CPU), per shard: not a fallback to the xla attention.
    assert 'pallas_call' in jaxpr and 'shard_map' in jaxpr
    assert 'shard_map' in hlo or 'sdy.manual_computation' in hlo
    _assert_close(got, want, 'output')
    for name, g, w in zip('qkv', got_grads, want_grads):
        _assert_close(g, w, f'd loss / d {name}')


def test_model_with_splash_attention_gives_the_xla_logits():
    cfg = model.preset('tiny', max_seq_len=T)
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2), jax.devices())
    params = model.init_params(cfg, mesh)
    tokens = jax.random.randint(jax.random.key(0), (4, T), 0, cfg.vocab_size)
    segments = jnp.asarray(np.repeat([[1] * 100 + [2] * 100 + [3] * (T - 200)], 4, axis=0))
    positions = jnp.concatenate([jnp.arange(100), jnp.arange(100), jnp.arange(T - 200)])
    positions = jnp.broadcast_to(positions, tokens.shape)
    with jax.set_mesh(mesh):
        forward = {impl: lambda p, c=cfg.replace(attention=impl): model.forward(
            p, c, tokens, positions, segments) for impl in ('xla', 'splash')}
        logits = {impl: jax.jit(f)(params) for impl, f in forward.items()}
        kernels = {impl: 'pallas_call' in str(jax.make_jaxpr(f)(params))
                   for impl, f in forward.items()}
    assert kernels == dict(xla=False, splash=True)
    np.testing.assert_allclose(logits['splash'], logits['xla'], rtol=0, atol=1e-5)


def test_sequence_length_not_a_multiple_of_128_is_refused_naming_the_fix():
    q = jnp.zeros((1, 200, N, H))
    k = jnp.zeros((1, 200, K, H))
    with pytest.raises(ValueError, match=r"multiple of 128.*got 200.*data.seq_len"):
        splash.splash_attention(q, k, k, None)
    assert splash.block_size(2048) == 512 and splash.block_size(384) == 384


def test_a_batch_the_mesh_does_not_divide_is_refused_naming_the_axes():
    q, k, v, seg = _inputs()
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2), jax.devices())
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=(
            r"attention='splash' q: dimension 2 .* mesh axes \('data', 'fsdp'\) of size 4")):
        jax.jit(lambda *a: splash.splash_attention(*a, interpret=True))(q, k, v, seg)


def test_config_accepts_splash_and_names_the_choices_for_a_typo():
    assert model.preset('tiny', attention='splash').attention == 'splash'
    with pytest.raises(ValueError, match=r"attention='splsh'.*'splash'"):
        model.preset('tiny', attention='splsh')


def _v5p_mesh():
    pytest.importorskip('libtpu', reason="libtpu is not installed (pip install -e '.[tpu]')")
    # libtpu takes a machine-wide lock file unless told otherwise: parallel test workers (or a
    # meditron-plan run) would fail with "Internal error when accessing libtpu multi-process
    # lockfile". Read when the TPU plugin loads, which is here (JAX runs on cpu in tests).
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform='tpu', topology_name='v5p:2x2x2',
                                        chip_config_name='default',
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    return sharding.make_mesh(dict(data=1, fsdp=4, tensor=2), topo.devices)


def test_model_forward_and_backward_compile_to_the_mosaic_kernel_for_tpu_v5p():
    mesh = _v5p_mesh()
    cfg = model.preset('tiny', attention='splash', compute_dtype='bfloat16', max_seq_len=T)
    abstract, _ = model.param_specs(cfg)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, model.param_shardings(cfg, mesh))
    rows = jax.ShapeDtypeStruct((8, T), jnp.int32, sharding=sharding.batch_sharding(mesh))
    loss = lambda p, tokens, seg: jnp.mean(model.forward(p, cfg, tokens, None, seg))
    with jax.set_mesh(mesh):
        hlo = jax.jit(jax.grad(loss)).lower(abstract, rows, rows).compile().as_text()
    kernels = re.findall(r'%(splash_mha_\w+?)(?:\.\d+)? = \((.*?)\) custom-call\(', hlo)
    names = sorted({name for name, _ in kernels})
    # Forward (keeping the softmax residuals for backward), dq and dkv: Mosaic, not interpreted.
    assert names == ['splash_mha_dkv_segmented_no_residuals', 'splash_mha_dq_segmented_no_residuals',
                     'splash_mha_fwd_segmented_residuals'], names
    assert 'tpu_custom_call' in hlo
    # Each chip runs the kernel on its shard: 8 / fsdp 4 = 2 rows, 8 / tensor 2 = 4 heads of 8.
    head_dim = cfg.head_dim
    fwd_outputs = dict(kernels)['splash_mha_fwd_segmented_residuals']
    assert f'bf16[2,4,{T},{head_dim}]' in fwd_outputs, fwd_outputs
