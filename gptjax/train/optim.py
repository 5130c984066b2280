"""Optimizers and learning-rate schedules (optax).

GPT-1 pre-training: Adam, max lr 2.5e-4 reached by a linear warm-up over 2,000
steps, then cosine annealing to 0, with decoupled weight decay 0.01 on "all
non bias or gain weights". GPT-1 fine-tuning: lr 6.25e-5, warm-up over 0.2% of
training, then linear decay to 0. Both are settings of `OptimConfig`.

The learning rate follows the train loop's step, not a count kept in the optimizer
state: `make_optimizer`'s last stage takes the step as an optax extra argument
(`update(grads, state, params, step=s)`, which gptjax.train.step passes). A step
skipped for a non-finite loss leaves the optimizer state as it was, so an optimizer
count would fall behind the loop; with the step passed in, the rate applied at step s
is always `make_schedule(...)(s)`, the `lr` the loop logs.

Under muP (`model.parametrization == "mup"`, gptjax.mup) the hidden weight matrices take
lr / m and everything else lr: one more stage, between the decayed weights and the rate,
so that the decoupled weight decay follows each parameter's rate too.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from gptjax import mup
from gptjax.config import GPTConfig

# Leaf names that are weight matrices (decayed). Everything else, biases "b"/"bias"
# and LayerNorm gains "g"/"scale", is not. "kernel" is Flax's name (task heads).
DECAYED_NAMES = ("w", "wte", "wpe", "kernel")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warm-up, a decay schedule and global-norm clipping."""

    # Peak learning rate, reached at the end of the warm-up.
    lr: float = 2.5e-4
    # Linear warm-up over this many optimizer steps: step s < warmup_steps gets
    # lr * (s + 1) / warmup_steps, so the first step already moves the parameters.
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
    """step -> learning rate: a linear warm-up, lr * (s + 1) / warmup_steps at step s
    (lr at step warmup_steps - 1), then the decay from lr at step warmup_steps to min_lr
    at total_steps.

    GPT-1's rate is "increased linearly from zero over the first 2000 updates"; starting
    the count at one rather than zero makes the first update a real one (at zero, step 0
    would change nothing but Adam's moments). E.g. lr=1, warmup_steps=4, constant:
    steps 0, 1, 2, 3, 4 get 0.25, 0.5, 0.75, 1.0, 1.0.
    """
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
    warmup_steps, peak = cfg.warmup_steps, cfg.lr

    def warmup(step):
        return peak * jnp.minimum(step + 1, warmup_steps) / warmup_steps

    return optax.join_schedules([warmup, decay], [warmup_steps])


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


def scale_by_schedule_at_step(schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
    """updates * -schedule(step), with `step` the caller's (an optax extra argument).

    optax.scale_by_learning_rate does the same with a count in its state, which does not
    advance when the train step keeps the old optimizer state after a non-finite loss;
    this stage keeps no state and uses the step it is given.
    """

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, step=None, **extra_args):
        del params, extra_args
        if step is None:
            raise TypeError(
                "this optimizer's learning rate follows the train step: call "
                "update(grads, state, params, step=step) (gptjax.train.step does)")
        rate = schedule(step)
        return jax.tree_util.tree_map(lambda u: jnp.array(-rate, dtype=u.dtype) * u,
                                      updates), state

    return optax.GradientTransformationExtraArgs(init, update)


def mup_lr_scaling(model: GPTConfig) -> optax.GradientTransformationExtraArgs:
    """muP's per-parameter learning rates for Adam: updates of the hidden matrices
    (gptjax.mup.lr_labels) times 1/m, the others unchanged."""
    return optax.transforms.partition(
        {"hidden": optax.scale(mup.hidden_lr_scale(model)), "other": optax.identity()},
        mup.lr_labels)


def make_optimizer(cfg: OptimConfig, total_steps: int, *,
                   model: GPTConfig | None = None) -> optax.GradientTransformationExtraArgs:
    """clip_by_global_norm -> AdamW (mask = weight matrices) at make_schedule(step).

    The AdamW stages are optax.adamw's own (scale_by_adam, add_decayed_weights,
    then the rate), with the rate taken at the step passed to `update(..., step=s)`.
    `model`: the config of the model trained; under muP its hidden matrices get lr / m
    (mup_lr_scaling). None, or the standard parametrization: one rate for all.
    """
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts += [
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, weight_decay_mask),
    ]
    if mup.is_mup(model):
        parts.append(mup_lr_scaling(model))
    parts.append(scale_by_schedule_at_step(schedule))
    return optax.chain(*parts)
