"""Optimizers and learning-rate schedules (optax).

GPT-1 pre-training: Adam, max lr 2.5e-4 reached by a linear warm-up over 2,000
steps, then cosine annealing to 0, with decoupled weight decay 0.01 on "all
non bias or gain weights". GPT-1 fine-tuning: lr 6.25e-5, warm-up over 0.2% of
training, then linear decay to 0. Both are settings of `OptimConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import optax

# Leaf names that are weight matrices (decayed). Everything else, biases "b"/"bias"
# and LayerNorm gains "g"/"scale", is not. "kernel" is Flax's name (task heads).
DECAYED_NAMES = ("w", "wte", "wpe", "kernel")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warm-up, a decay schedule and global-norm clipping."""

    # Peak learning rate, reached at the end of the warm-up.
    lr: float = 2.5e-4
    # Linear warm-up from 0, in optimizer steps.
    warmup_steps: int = 2000
    # Shape of the decay after warm-up: "cosine", "linear" or "constant".
    schedule: str = "cosine"
    # Learning rate at the last step (GPT-1 decays to 0).
    min_lr: float = 0.0
    # Adam moments.
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # Decoupled weight decay on weight matrices only (see weight_decay_mask).
    weight_decay: float = 0.01
    # Clip gradients to this global norm; 0 turns clipping off.
    clip_norm: float = 1.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not one of {list(SCHEDULES)}")
        for name in ("lr", "min_lr", "weight_decay", "clip_norm", "eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"b1={self.b1}, b2={self.b2} must lie in [0, 1)")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up to cfg.lr over warmup_steps, then decay to min_lr at total_steps."""
    if cfg.warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps={cfg.warmup_steps} is longer than training ({total_steps} steps)"
        )
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.schedule == "cosine":
        alpha = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=alpha)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, cfg.min_lr, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def weight_decay_mask(params):
    """True at weight matrices (decayed), False at biases and LayerNorm gains.

    Decided by the leaf's own name, not its rank: per-layer parameters are stacked,
    so a stacked bias is 2-D and rank cannot tell it from a matrix.
    """

    def is_weight(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        return name in DECAYED_NAMES

    return jax.tree_util.tree_map_with_path(is_weight, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule, mask = weight matrices)."""
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=weight_decay_mask)
    )
    return optax.chain(*parts)
