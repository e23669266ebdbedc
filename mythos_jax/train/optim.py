"""The optimizer: AdamW, warmup + cosine, global-norm clipping, weight decay on matrices only."""

from __future__ import annotations

import jax
import optax

from mythos_jax.train.config import OptimConfig

# Parameters never decayed whatever their rank: the injection's (LTI and Parcae stability
# parameters, the free form's A, and the input matrices B of Parcae and the free form).
NO_DECAY_PATH_PARTS = ("injection",)


def learning_rate(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, cosine down to
    ``lr * min_lr_ratio`` at ``total_steps``."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params):
    """True for the parameters weight decay applies to: arrays of rank >= 2 outside the
    injection (norm weights, biases, A/dt vectors and every other 1-D parameter are left out)."""
    def decays(path, leaf) -> bool:
        names = {str(getattr(key, "key", getattr(key, "name", key))) for key in path}
        return leaf.ndim >= 2 and not names.intersection(NO_DECAY_PATH_PARTS)

    return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) then AdamW(b1, b2, eps, weight_decay on ``decay_mask``)."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(learning_rate(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                             eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
