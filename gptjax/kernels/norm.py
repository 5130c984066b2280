"""LayerNorm with a hand-written backward pass.

Replaces: model.layer_norm (the formula, differentiated by JAX).
Measured faster on: CPU (2 cores, XLA), the char and cpu-small training steps. The
backward pass is the textbook one from the normalised input (two row means), where JAX's
derivative of the formula chains through the mean, the variance and rsqrt.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, g: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    """(x - mean) / sqrt(var + eps) * g + b over x's last axis, statistics in float32,
    the result in x's dtype. Reverse mode only (a custom VJP)."""
    return _forward(x, g, b, eps)[0]


def _forward(x, g, b, eps):
    x32 = x.astype(jnp.float32)
    centred = x32 - x32.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)
    xhat = centred * rstd
    return (xhat * g + b).astype(x.dtype), (xhat, rstd, g)


def _backward(eps, saved, dy):
    del eps
    xhat, rstd, g = saved
    dy32 = dy.astype(jnp.float32)
    batch_axes = tuple(range(dy.ndim - 1))
    dxhat = dy32 * g
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return (dx.astype(dy.dtype), jnp.sum(dy32 * xhat, batch_axes).astype(g.dtype),
            jnp.sum(dy32, batch_axes).astype(g.dtype))


layer_norm.defvjp(_forward, _backward)
