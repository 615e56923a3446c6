"""The fused, chunked head + cross-entropy (loss.py) against the plain formula on whole logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax import loss as L


def plain(x, w, t, weights):
    return L.cross_entropy(jnp.einsum('btd,dv->btv', x, w), t, weights)


@pytest.fixture
def inputs():
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (3, 12, 16))
    w = jax.random.normal(keys[1], (16, 40))
    t = jax.random.randint(keys[2], (3, 12), 0, 40)
    weights = (jax.random.uniform(keys[3], (3, 12)) > 0.3).astype(jnp.float32)
    return x, w, t, weights


def test_chunk_length_divides_and_bounds_the_logits(monkeypatch):
    assert L.chunk_length(4096, 32128) == 128       # 7B rows: 2^22 // 32128 = 130 -> 128
    assert L.chunk_length(256, 8192) == 256
    assert L.chunk_length(7, 10 ** 9) == 1
    monkeypatch.setattr(L, 'CHUNK_LOGITS_PER_ROW', 40 * 5)
    assert L.chunk_length(12, 40) == 4              # the largest divisor of 12 up to 5


@pytest.mark.parametrize('chunk_logits,unrolled', [(40 * 4, 4), (40 * 4, 0), (40 * 12, 4)],
                         ids=['3 chunks', '3 chunks scanned', 'whole'])
def test_loss_and_gradients_match_the_plain_formula(inputs, monkeypatch, chunk_logits, unrolled):
    """Chunks as a Python loop (up to UNROLLED_CHUNKS of them) and as a scan."""
    monkeypatch.setattr(L, 'CHUNK_LOGITS_PER_ROW', chunk_logits)
    monkeypatch.setattr(L, 'UNROLLED_CHUNKS', unrolled)
    x, w, t, weights = inputs
    fused = lambda x, w: L.head_cross_entropy(x, w, t, weights)
    (total, count), (ref_total, ref_count) = jax.jit(fused)(x, w), plain(x, w, t, weights)
    np.testing.assert_allclose(total, ref_total, rtol=1e-6)
    assert float(count) == float(ref_count) == float(weights.sum()) < weights.size
    # A cotangent other than 1 (the loss is divided by the token count): the backward scales.
    scaled = lambda f: (lambda x, w: 0.37 * f(x, w)[0])
    got = jax.jit(jax.grad(scaled(fused), (0, 1)))(x, w)
    want = jax.grad(scaled(lambda x, w: plain(x, w, t, weights)), (0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(got[0][weights == 0]).max()) == 0.0   # unweighted tokens: no gradient


def test_bfloat16_compute_keeps_float32_gradients_close(inputs):
    x, w, t, weights = inputs
    got = jax.grad(lambda x, w: L.head_cross_entropy(x, w, t, weights, jnp.bfloat16)[0],
                   (0, 1))(x, w)
    want = jax.grad(lambda x, w: plain(x, w, t, weights)[0], (0, 1))(x, w)
    assert [g.dtype for g in got] == [jnp.float32, jnp.float32]
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=0.05 * float(jnp.abs(r).max()))
