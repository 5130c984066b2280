"""What model.py and the kernels share: the one mask constant and the CPU product rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Filled into masked attention scores (and padded vocabulary logits). Finite, so a row
# with every key masked (a padding query) gives a uniform row instead of NaN, as jax.nn does.
MASK_VALUE = float(np.finfo(np.float32).min)


def f32_accumulate(dtype) -> bool:
    """Whether products of this dtype ask for a float32 result: XLA's CPU backend has
    bfloat16 matmul kernels only for products that accumulate into float32."""
    return dtype != jnp.float32 and jax.default_backend() == "cpu"


def product(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum in a's dtype, accumulated in float32 where `f32_accumulate` says so."""
    if not f32_accumulate(a.dtype):
        return jnp.einsum(spec, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)
