"""AdamW with warmup + cosine decay, global-norm clipping and a weight-decay mask.

The MEDITRON recipe: betas (0.9, 0.95), eps 1e-5, weight decay 0.1 on weight matrices (never on
norm scales), clipping at 1.0, linear warmup then cosine decay to a floor. Gradient accumulation
is done inside the compiled train step (train.py), not here.
"""

from __future__ import annotations

from typing import Any

import jax
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


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int
                   ) -> optax.GradientTransformation:
    chain = []
    if optim.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(float(optim.clip_norm)))
    chain.append(optax.adamw(
        learning_rate=lr_schedule(optim, total_steps), b1=float(optim.b1), b2=float(optim.b2),
        eps=float(optim.eps), weight_decay=float(optim.weight_decay), mask=decay_mask))
    return optax.chain(*chain)
