"""attention_xla.causal_attention (hand-written backward, head-major layout) against
jax.nn.dot_product_attention and its autodiff gradients, with GQA and packed documents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meditron_jax import attention_xla


def reference(q, k, v, segment_ids):
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                        implementation='xla')


@pytest.mark.parametrize('min_block,blocks', [(128, 1), (8, 3), (6, 4)])
@pytest.mark.parametrize('heads,kv_heads', [(4, 4), (4, 2), (6, 1)], ids=['mha', 'gqa', 'mqa'])
def test_values_and_gradients_match_jax_attention(heads, kv_heads, min_block, blocks,
                                                  monkeypatch):
    """Whole, and with the queries in blocks (each against the keys up to its end only)."""
    b, t, h = 2, 24, 8
    monkeypatch.setattr(attention_xla, 'MIN_BLOCK', min_block)
    assert attention_xla._num_blocks(t) == blocks
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, heads, h))
    k = jax.random.normal(keys[1], (b, t, kv_heads, h))
    v = jax.random.normal(keys[2], (b, t, kv_heads, h))
    dout = jax.random.normal(keys[3], (b, t, heads, h))
    # Row 0: two documents (the second starts at 10); row 1: one.
    segment_ids = jnp.array([[1] * 10 + [2] * (t - 10), [1] * t], jnp.int32)

    def value_and_grads(fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids), q, k, v)
        return (out, *vjp(dout))

    ours = jax.jit(lambda: value_and_grads(attention_xla.causal_attention))()
    theirs = jax.jit(lambda: value_and_grads(reference))()
    for name, a, r in zip(('out', 'dq', 'dk', 'dv'), ours, theirs):
        assert a.shape == r.shape, name
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=2e-5, err_msg=name)
