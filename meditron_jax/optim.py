"""AdamW with warmup + cosine decay, global-norm clipping and a weight-decay mask.

The MEDITRON recipe: betas (0.9, 0.95), eps 1e-5, weight decay 0.1 on weight matrices (never on
norm scales), clipping at 1.0, linear warmup then cosine decay to a floor. Gradient accumulation
is done inside the compiled train step (step.py), not here. make_optimizer computes
reference_optimizer's optax chain as one fused update a parameter, with the train step's
non-finite mask folded in.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def lr_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> lr_peak over warmup_steps (or warmup_fraction of the steps), then
    cosine to lr_min over decay_steps."""
    warmup = int(optim.warmup_steps)
    if optim.warmup_fraction > 0:  # for runs whose length follows from the data (train.epochs)
        warmup = int(round(float(optim.warmup_fraction) * total_steps))
    decay = int(optim.decay_steps) or max(total_steps - warmup, 1)
    if warmup < 0 or decay <= 0:
        raise ValueError(f'optim.warmup_steps={warmup} and decay_steps={decay}: expected '
                         f'warmup >= 0 and a positive decay length')
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(optim.lr_peak), warmup_steps=warmup,
        decay_steps=warmup + decay, end_value=float(optim.lr_min))


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: every weight except norm scales."""
    def decays(path, _):
        return jax.tree_util.keystr(path[-1:]) != "['scale']"
    return jax.tree_util.tree_map_with_path(decays, params)


def reference_optimizer(optim: ml_collections.ConfigDict, total_steps: int
                        ) -> optax.GradientTransformation:
    """The recipe as a plain optax chain: its state layout is the checkpoints' (opt_state), and
    make_optimizer's update computes the same numbers (tests compare the two)."""
    chain = []
    if optim.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(float(optim.clip_norm)))
    chain.append(optax.adamw(
        learning_rate=lr_schedule(optim, total_steps), b1=float(optim.b1), b2=float(optim.b2),
        eps=float(optim.eps), weight_decay=float(optim.weight_decay), mask=decay_mask))
    return optax.chain(*chain)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int
                   ) -> optax.GradientTransformationExtraArgs:
    """reference_optimizer's AdamW + clipping, its state and its arithmetic, as one elementwise
    expression a parameter: the optax chain materialised the clipped gradient, the moments and
    the update separately, and the train step's non-finite mask then copied params, mu and nu
    again (about a tenth of a small model's CPU step).

    ``update(grads, state, params, *, grad_divisor=1.0, grad_norm=None, apply=True)``: the
    gradients are ``grads / grad_divisor`` cast to each parameter's dtype (the train step's mean
    over tokens, divided inside the same pass); grad_norm is their global norm if the caller
    has it; where ``apply`` is False (a traced bool: a non-finite step) the updates are -0.0
    and the state comes back unchanged, counts included.
    """
    reference = reference_optimizer(optim, total_steps)
    schedule = lr_schedule(optim, total_steps)
    clip, wd = float(optim.clip_norm), float(optim.weight_decay)
    b1, b2, eps = float(optim.b1), float(optim.b2), float(optim.eps)

    def update(grads, state, params=None, *, grad_divisor=1.0, grad_norm=None, apply=True):
        if params is None:
            raise ValueError('make_optimizer: update needs params (weight decay)')
        adam, masked, sched = state[-1]
        if grad_norm is None:
            grad_norm = optax.global_norm(grads) / grad_divisor
        count = optax.safe_increment(adam.count)
        step_size = -schedule(sched.count)

        # One scalar factor (the mean over tokens, then clipping as optax.clip_by_global_norm
        # does), and a product, not quotients: XLA copies a cheap multiply into each fusion that
        # reads the gradient, where a divide (costed as expensive) was materialised, a pass a
        # parameter.
        factor = 1.0 / jnp.asarray(grad_divisor, jnp.float32)
        if clip > 0:
            factor = jnp.where(grad_norm < clip, factor, factor * (clip / grad_norm))

        def leaf(g, p, mu, nu, decays):
            g = (g * factor).astype(p.dtype)
            mu = jnp.where(apply, (1 - b1) * g + b1 * mu, mu)          # optax.scale_by_adam
            nu = jnp.where(apply, (1 - b2) * (g ** 2) + b2 * nu, nu)
            mu_hat = mu / (1 - b1 ** count).astype(mu.dtype)
            nu_hat = nu / (1 - b2 ** count).astype(nu.dtype)
            u = mu_hat / (jnp.sqrt(nu_hat) + eps)
            if decays:                                                   # add_decayed_weights
                u = u + wd * p
            u = jnp.array(step_size, u.dtype) * u                        # scale_by_learning_rate
            # -0.0, the exact additive identity (p + -0.0 == p, signed zeros included); and
            # not the 0.0 that XLA:GPU shared with the gradient accumulator's zeros and then
            # materialised, a parameter-sized buffer each (+1 GiB a GPU at 7B).
            return jnp.where(apply, u, jnp.array(-0.0, u.dtype)), mu, nu

        out = jax.tree.map(leaf, grads, params, adam.mu, adam.nu, decay_mask(params))
        is_out = lambda x: isinstance(x, tuple)
        pick = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=is_out)
        keep = lambda new, old: jnp.where(apply, new, old)
        adam = optax.ScaleByAdamState(count=keep(count, adam.count), mu=pick(1), nu=pick(2))
        sched = optax.ScaleByScheduleState(
            count=keep(optax.safe_increment(sched.count), sched.count))
        return pick(0), (*state[:-1], (adam, masked, sched))

    return optax.GradientTransformationExtraArgs(reference.init, update)
