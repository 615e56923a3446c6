"""train_step and the optimizer, without the data pipeline: accumulation, schedule, weight-decay
mask, non-finite handling, and the same losses on 8 devices as on one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from meditron_jax import model, optim, sharding, train


def tiny_config(**mesh):
    c = base.get_config()
    c.model = base.model_config('tiny')
    c.mesh.update({**dict(data=1, fsdp=1, tensor=1), **mesh})
    c.data.seq_len, c.data.global_batch_size = 32, 8
    c.optim.update(lr_peak=1e-2, lr_min=1e-3, warmup_steps=2)
    return c


def random_batch(seed=0, batch=8, length=33, vocab=256):
    rng = np.random.default_rng(seed)
    segments = np.ones((batch, length), np.int32)
    segments[:, length // 2:] = 2          # two documents a row
    segments[0, -5:] = 0                   # some padding
    positions = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)])
    return dict(tokens=rng.integers(0, vocab, (batch, length)).astype(np.int32),
                segment_ids=segments,
                positions=np.tile(positions.astype(np.int32), (batch, 1)),
                loss_mask=np.ones((batch, length), np.int32))


def run_steps(config, batches, devices, grad_norms=None):
    """Losses of consecutive train steps on a mesh over `devices` (and their gradient norms
    appended to ``grad_norms`` when given)."""
    cfg = train.model_config(config)
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    optimizer = optim.make_optimizer(config.optim, 10)
    _, shardings = train.abstract_state(cfg, optimizer, mesh)
    state = train.fresh_state(model.init_params(cfg, mesh), optimizer, shardings)
    step_fn, _ = train.compile_steps(config, cfg, optimizer, optim.lr_schedule(config.optim, 10),
                                     shardings, mesh)
    losses = []
    with jax.set_mesh(mesh):
        for b in batches:
            gb = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in b.items()}
            state, m = step_fn(state, gb)
            losses.append(float(m['loss']))
            if grad_norms is not None:
                grad_norms.append(float(m['grad_norm']))
    return losses, jax.device_get(state)


def accumulation_configs(k, **mesh):
    """One big batch vs k micro-batches, with no warmup so that the first step already moves
    the parameters (warmup makes the step-0 learning rate exactly 0)."""
    one, acc = tiny_config(), tiny_config(**mesh)
    for c in (one, acc):
        c.optim.warmup_steps = 0
    acc.optim.grad_accum_steps = k
    return one, acc


def test_grad_accumulation_equals_one_big_batch():
    batches = [random_batch()] * 3        # one batch again and again: its loss must fall
    one, four = accumulation_configs(4)
    norms1, norms4 = [], []
    loss1, state1 = run_steps(one, batches, jax.devices()[:1], norms1)
    loss4, state4 = run_steps(four, batches, jax.devices()[:1], norms4)
    # The accumulated gradient itself (its norm, before clipping and Adam could hide a wrong
    # scale), then the parameters after three applied updates.
    np.testing.assert_allclose(norms1, norms4, rtol=1e-5)
    np.testing.assert_allclose(loss1, loss4, rtol=1e-5)
    assert loss1[-1] < loss1[0]
    # Adam's first updates divide near-zero gradients by their own magnitude, so a float32
    # summation-order difference (micro-batches vs one batch) moves such an entry by a few 1e-6
    # (params ~0.1; 5.5e-6 on the o kernel and 2.3e-6 on the embedding at 1a0528d, where
    # atol=2e-6 already failed); a missed or repeated micro-batch moves entries by the learning
    # rate (1e-2 a step, 500x this bound).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5),
                 state1.params, state4.params)


def test_eight_device_mesh_gives_single_device_losses():
    batches = [random_batch(seed=s) for s in range(3)]
    single, _ = run_steps(tiny_config(), batches, jax.devices()[:1])
    sharded, state = run_steps(tiny_config(data=2, fsdp=2, tensor=2), batches, jax.devices())
    np.testing.assert_allclose(single, sharded, rtol=2e-5)
    assert single[-1] < single[0]


def test_lr_schedule_warmup_cosine_floor():
    c = base.get_config()
    c.optim.update(lr_peak=3e-4, lr_min=3e-5, warmup_steps=100, decay_steps=0)
    schedule = optim.lr_schedule(c.optim, total_steps=1100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(50)) == pytest.approx(1.5e-4)
    assert float(schedule(100)) == pytest.approx(3e-4)
    assert float(schedule(600)) == pytest.approx((3e-4 + 3e-5) / 2, rel=1e-5)  # cosine midpoint
    assert float(schedule(1100)) == pytest.approx(3e-5)
    assert float(schedule(5000)) == pytest.approx(3e-5)


def test_weight_decay_skips_norm_scales():
    cfg = model.preset('tiny')
    abstract, _ = model.param_specs(cfg)
    mask = optim.decay_mask(abstract)
    assert mask['final_norm']['scale'] is False
    assert mask['layers']['attn_norm']['scale'] is False
    assert mask['layers']['attn']['q']['kernel'] is True
    assert mask['embed']['embedding'] is True
    # One step with zero gradients: only weight decay moves the parameters.
    c = base.get_config()
    c.optim.update(lr_peak=1.0, warmup_steps=0, weight_decay=0.1)
    tx = optim.make_optimizer(c.optim, 10)
    params = jax.tree.map(lambda a: jnp.full(a.shape, 2.0), abstract)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates['final_norm']['scale'], 0.0)
    np.testing.assert_allclose(updates['layers']['mlp']['up']['kernel'], -0.2, rtol=1e-6)


@pytest.mark.parametrize('clip_norm', [0.5, 1e3, 0.0], ids=['clipped', 'unclipped', 'no-clip'])
def test_fused_optimizer_matches_the_optax_chain(clip_norm):
    """make_optimizer's fused update gives reference_optimizer's (optax) updates and state over
    several steps, and a step with apply=False changes nothing."""
    cfg = model.preset('tiny')
    abstract, _ = model.param_specs(cfg)
    c = base.get_config()
    c.optim.update(lr_peak=1e-2, warmup_steps=2, weight_decay=0.1, clip_norm=clip_norm)
    fused, reference = optim.make_optimizer(c.optim, 10), optim.reference_optimizer(c.optim, 10)
    keys = iter(jax.random.split(jax.random.key(0), 100))
    params = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape), abstract)
    state_f = state_r = reference.init(params)
    update_f = jax.jit(fused.update)
    for _ in range(4):
        grads = jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape), abstract)
        # The step hands over token-summed gradients and the count to divide by.
        summed = jax.tree.map(lambda g: g * 3.0, grads)
        u_f, state_f = update_f(summed, state_f, params, grad_divisor=jnp.float32(3.0),
                                grad_norm=optax.global_norm(grads), apply=jnp.bool_(True))
        u_r, state_r = reference.update(grads, state_r, params)
        close = functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-7)
        jax.tree.map(close, u_f, u_r)
        jax.tree.map(close, state_f, state_r)
        assert jax.tree.structure(state_f) == jax.tree.structure(state_r)
        params = optax.apply_updates(params, u_r)
    nan_grads = jax.tree.map(lambda a: jnp.full(a.shape, jnp.nan), abstract)
    u, state_skip = update_f(nan_grads, state_f, params, grad_norm=jnp.float32(jnp.nan),
                             apply=jnp.bool_(False))
    jax.tree.map(lambda a: np.testing.assert_array_equal(a, 0.0), u)
    jax.tree.map(np.testing.assert_array_equal, state_skip, state_f)


def test_nonfinite_update_is_not_applied_and_first_step_recorded():
    config = tiny_config()
    cfg = train.model_config(config)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
    optimizer = optim.make_optimizer(config.optim, 10)
    _, shardings = train.abstract_state(cfg, optimizer, mesh)
    params = model.init_params(cfg, mesh)
    params['layers']['mlp']['up']['kernel'] = params['layers']['mlp']['up']['kernel'].at[0, 0, 0] \
        .set(jnp.inf)
    state = train.fresh_state(params, optimizer, shardings)
    before = jax.device_get(state.params)
    step_fn, _ = train.compile_steps(config, cfg, optimizer, optim.lr_schedule(config.optim, 10),
                                     shardings, mesh)
    gb = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in random_batch().items()}
    state, m = step_fn(state, gb)
    state, m = step_fn(state, gb)
    assert int(m['first_nonfinite']) == 1 and int(m['skipped']) == 2
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state.params))


def test_grad_accumulation_on_a_sharded_mesh_equals_one_big_batch():
    batches = [random_batch(seed=s) for s in (3, 4)]
    one, two = accumulation_configs(2, data=2, fsdp=2, tensor=2)
    norms1, norms2 = [], []
    loss1, state1 = run_steps(one, batches, jax.devices()[:1], norms1)
    loss2, state2 = run_steps(two, batches, jax.devices(), norms2)
    np.testing.assert_allclose(norms1, norms2, rtol=2e-5)
    np.testing.assert_allclose(loss1, loss2, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=5e-6, rtol=1e-4),
                 state1.params, state2.params)
