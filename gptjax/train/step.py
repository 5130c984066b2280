"""The train state and the one pure train step `(state, batch) -> (state, metrics)`.

The step is written once, with an optional named batch axis: `jax.pmap` runs it
data-parallel over the local devices (gradients and metrics averaged with
`lax.pmean` over the axis), `jax.jit` runs it on one device or sharded over a
mesh (gptjax.train.runners). The dropout key of step s is `fold_in(rng, s)`, so
the step needs nothing but the state and the batch of that step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

# loss_fn(params, micro_batch, rng) -> (scalar loss, dict of auxiliary metrics)
LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def init_state(params, optimizer: optax.GradientTransformation, seed: int) -> dict:
    """The whole train state as one pytree (a dict, so checkpoints read back plainly)."""
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": optimizer.init(params),
        "rng": jax.random.PRNGKey(seed),
        "nonfinite": jnp.zeros((), jnp.int32),  # consecutive non-finite steps
        "skipped": jnp.zeros((), jnp.int32),  # total skipped steps
    }


def mean_gradient(loss_fn: LossFn, params, batch: dict, rng):
    """(loss, aux, grads) averaged over the leading micro-batch axis of `batch`.

    The mean of the micro-batches' gradients equals the full batch's gradient of a mean
    loss; micro-batch i draws its dropout from fold_in(rng, i) (one micro-batch: rng).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    n_micro = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if n_micro == 1:
        micro = jax.tree_util.tree_map(lambda x: x[0], batch)
        (loss, aux), grads = grad_fn(params, micro, rng)
        return loss, aux, grads

    def accumulate(carry, xs):
        i, micro = xs
        (loss, aux), grads = grad_fn(params, micro, jax.random.fold_in(rng, i))
        return jax.tree_util.tree_map(jnp.add, carry, (loss, aux, grads)), None

    first = jax.eval_shape(grad_fn, params, jax.tree_util.tree_map(lambda x: x[0], batch), rng)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   (first[0][0], first[0][1], first[1]))
    total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(n_micro), batch))
    return jax.tree_util.tree_map(lambda x: x / n_micro, total)


def make_train_step(loss_fn: LossFn, optimizer, schedule, *, axis_name: str | None = None):
    """The pure step `(state, batch) -> (state, metrics)`.

    `batch` leaves have a leading micro-batch axis (grad_accum, b, ...); the
    gradient is the mean over micro-batches (`mean_gradient`). Under pmap
    (axis_name set) gradients and metrics are averaged over devices. A step whose
    loss or gradient norm is not finite leaves the parameters and optimizer state
    unchanged and is counted.

    The optimizer gets the loop's step as `step=` (optax extra arguments;
    transformations that take none ignore it), so a learning-rate schedule of
    gptjax.train.optim follows the loop's step even after skipped updates: the
    rate applied at step s is `schedule(s)`, the `lr` the step reports.
    """
    optimizer = optax.with_extra_args_support(optimizer)

    def step(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        loss, aux, grads = mean_gradient(loss_fn, state["params"], batch, rng)
        if axis_name is not None:
            loss, aux, grads = jax.lax.pmean((loss, aux, grads), axis_name)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = optimizer.update(grads, state["opt_state"], state["params"],
                                            step=state["step"])
        new_params = optax.apply_updates(state["params"], updates)

        def keep_if_finite(new, old):
            return jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = {
            "step": state["step"] + 1,
            "params": keep_if_finite(new_params, state["params"]),
            "opt_state": keep_if_finite(new_opt, state["opt_state"]),
            "rng": state["rng"],
            "nonfinite": jnp.where(finite, 0, state["nonfinite"] + 1),
            "skipped": state["skipped"] + (~finite).astype(jnp.int32),
        }
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "finite": finite, "nonfinite": new_state["nonfinite"],
                   "skipped": new_state["skipped"], **aux}
        return new_state, metrics

    return step
