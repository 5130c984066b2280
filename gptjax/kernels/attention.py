"""Fast causal self-attention: blocked kernels for the CPU, jax.nn.dot_product_attention
for accelerators. Each computes model.attend's softmax(q k^T / sqrt(K) + mask) v over
the causal (and banded, and key-padding) mask that model.attention builds.

- `causal_attention`: query blocks that skip the keys the causal mask would discard,
  with a hand-written backward pass. Replaces model.attend in dense layers without a
  padding mask. Measured faster on: CPU (2 cores, XLA), float32 and bfloat16.
- `banded_attention`: GPT-3's local band in blocks of `band` queries against 2 * band
  keys, so memory grows as T * band, not T * T. Replaces model.attend in banded layers.
  Measured faster on: CPU (2 cores, XLA); it is also what keeps long banded contexts
  within memory.
- `dot_product_attention`: jax.nn.dot_product_attention with `implementation(cfg)`.
  Replaces model.attend on GPUs (cudnn in 16-bit, measured on an H100: see DESIGN.md)
  and wherever "fast" asks for it off the CPU.

Axis letters as in model.py; Z = B H, the heads as one batch axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gptjax.kernels.common import MASK_VALUE, f32_accumulate, product


def implementation(cfg) -> str:
    """jax.nn.dot_product_attention's implementation for cfg.attention: "auto" is cudnn on
    NVIDIA GPUs in 16-bit (cudnn takes no float32), xla elsewhere."""
    if cfg.attention != "auto":
        return cfg.attention
    if jax.default_backend() == "gpu" and cfg.dtype in ("bfloat16", "float16"):
        return "cudnn"
    return "xla"


def dot_product_attention(qkv, band, key_mask, scale, implementation, causal=True):
    """qkv (B, T, 3, H, K) -> (B, T, H, K) by jax.nn.dot_product_attention, causal (or,
    causal=False, bidirectional: BERT), with GPT-3's band as a local window and key_mask
    (B, T) (or None) marking real keys."""
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    kwargs = {}
    if band is not None:
        kwargs["local_window_size"] = (band - 1, 0)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if implementation == "cudnn" and mask is not None:
        # cudnn takes no boolean mask; an additive bias does the same job. Half the
        # dtype's minimum: MASK_VALUE itself would round to -inf in 16-bit and an
        # all-masked (padding) row would give NaN.
        # cudnn wants the bias at full (T, S) size: a (B, 1, 1, S) one is refused.
        low = float(jnp.finfo(q.dtype).min) / 2
        T, S = q.shape[1], k.shape[1]
        bias = jnp.where(mask, 0.0, low).astype(q.dtype)
        kwargs["bias"] = jnp.broadcast_to(bias, (bias.shape[0], 1, T, S))
        mask = None
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal,
                                        implementation=implementation, **kwargs)


# ----------------------------------------------------------------------------- blocked causal

# The products run over Z = B H heads as 3-D batched matmuls. XLA's CPU matmul kernels take
# row-major operands only; XLA folds a transposed operand into the product, which then falls
# back to a slower kernel (in bfloat16: converted to float32 first). So in bfloat16 on the
# CPU the backward pass transposes q and dO into (Z, K, T) copies itself and forms dK^T and
# dV^T: a transpose followed by a reshape that merges B and H cannot be folded away.

# Causal attention walks the queries in up to QUERY_BLOCKS blocks of at least
# MIN_QUERY_BLOCK rows: block [lo, hi) needs the keys before hi only, so the products skip
# the upper-right blocks that the causal mask would discard (n blocks do (n + 1) / 2n of
# the T x T work). Each block holds its rows' whole key range, so its softmax is exact,
# with no running maximum to carry. Measured on the CPU against one block: faster in
# bfloat16 (cpu-6x384, 4 blocks) and in float32 (cpu-small, 2 blocks), the same in float32
# at cpu-6x384.
QUERY_BLOCKS = 4
MIN_QUERY_BLOCK = 64


def query_blocks(T: int) -> list[tuple[int, int]]:
    """The [lo, hi) query rows of each block: T split into 4, 2 or 1 equal blocks."""
    n = QUERY_BLOCKS
    while n > 1 and (T % n or T // n < MIN_QUERY_BLOCK):
        n //= 2
    size = T // n
    return [(lo, lo + size) for lo in range(0, T, size)]


def _by_head(x):  # (B, T, H, K) -> (B H, T, K)
    B, T, H, K = x.shape
    return jnp.swapaxes(x, 1, 2).reshape(B * H, T, K)


def _by_head_t(x):  # (B, T, H, K) -> (B H, K, T)
    B, T, H, K = x.shape
    return jnp.transpose(x, (0, 2, 3, 1)).reshape(B * H, K, T)


def _from_head(x, B):  # (B H, T, K) -> (B, T, H, K)
    Z, T, K = x.shape
    return jnp.swapaxes(x.reshape(B, Z // B, T, K), 1, 2)


def _from_head_t(x, B):  # (B H, K, T) -> (B, T, H, K)
    Z, K, T = x.shape
    return jnp.transpose(x.reshape(B, Z // B, K, T), (0, 3, 1, 2))


def _scaled(x, scale):  # x * scale rounded once to x's dtype, whatever scale's type
    return (x.astype(jnp.float32) * scale).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def causal_attention(qkv: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale, causal) v for qkv (B, T, 3, H, K) -> (B, T, H, K).

    The backward pass is written out: dS = P * (dP - rowsum(dO * O)) needs no reduction
    over the T x T scores, where differentiating the softmax does. The scale is applied
    to q (and to dQ), not to the T x T scores. Reverse mode only (a custom VJP).
    """
    return _causal_forward(qkv, scale)[0]


def _causal_forward(qkv, scale):
    B, T = qkv.shape[:2]
    q = _by_head(_scaled(qkv[:, :, 0], scale))
    k, v = _by_head(qkv[:, :, 1]), _by_head(qkv[:, :, 2])
    outs, probs = [], []
    for lo, hi in query_blocks(T):
        s = jnp.einsum("ZTK,ZSK->ZTS", q[:, lo:hi], k[:, :hi],
                       preferred_element_type=jnp.float32)
        causal = jnp.arange(lo, hi)[:, None] >= jnp.arange(hi)[None, :]
        p = jax.nn.softmax(jnp.where(causal, s, MASK_VALUE), axis=-1)
        outs.append(product("ZTS,ZSK->ZTK", p.astype(v.dtype), v[:, :hi]))
        probs.append(p)
    o = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    return _from_head(o, B), (qkv, o, tuple(probs))


def _causal_backward(scale, saved, do):
    qkv, o, probs = saved  # o (Z, T, K); probs: per query block (Z, hi - lo, hi) float32
    B, T = qkv.shape[:2]
    f32 = jnp.float32
    k, v = _by_head(qkv[:, :, 1]), _by_head(qkv[:, :, 2])
    do_z = _by_head(do)
    delta = jnp.einsum("ZTK,ZTK->ZT", do_z.astype(f32), o.astype(f32))
    # dK^T = q^T dS and dV^T = dO^T P. In bfloat16 on the CPU these come from (Z, K, T)
    # copies (see above); in float32 XLA's CPU backend runs them with the transposes
    # folded in about as fast, and float32 copies would cost more than they save.
    transposed = f32_accumulate(qkv.dtype)
    if transposed:
        q_t, do_t = _by_head_t(_scaled(qkv[:, :, 0], scale)), _by_head_t(do)
    else:
        q = _by_head(_scaled(qkv[:, :, 0], scale))
    dqs, dk, dv = [], 0.0, 0.0
    for (lo, hi), p in zip(query_blocks(T), probs, strict=True):
        dp = jnp.einsum("ZTK,ZSK->ZTS", do_z[:, lo:hi], v[:, :hi], preferred_element_type=f32)
        ds = (p * (dp - delta[:, lo:hi, None])).astype(qkv.dtype)  # dS / scale
        pc = p.astype(do.dtype)
        dqs.append(product("ZTS,ZSK->ZTK", ds, k[:, :hi]))
        if transposed:  # (Z, K, hi) partial sums over this block's queries
            pad = ((0, 0), (0, 0), (0, T - hi))
            dk_b = jnp.einsum("ZKT,ZTS->ZKS", q_t[:, :, lo:hi], ds, preferred_element_type=f32)
            dv_b = jnp.einsum("ZKT,ZTS->ZKS", do_t[:, :, lo:hi], pc, preferred_element_type=f32)
        else:  # (Z, hi, K)
            pad = ((0, 0), (0, T - hi), (0, 0))
            dk_b = jnp.einsum("ZTS,ZTK->ZSK", ds, q[:, lo:hi], preferred_element_type=f32)
            dv_b = jnp.einsum("ZTS,ZTK->ZSK", pc, do_z[:, lo:hi], preferred_element_type=f32)
        dk, dv = dk + jnp.pad(dk_b, pad), dv + jnp.pad(dv_b, pad)
    dq = _scaled(jnp.concatenate(dqs, axis=1) if len(dqs) > 1 else dqs[0], scale)
    back = _from_head_t if transposed else _from_head
    dk, dv = back(dk.astype(qkv.dtype), B), back(dv.astype(qkv.dtype), B)
    return (jnp.stack([_from_head(dq, B), dk, dv], axis=2),)


causal_attention.defvjp(_causal_forward, _causal_backward)


# ----------------------------------------------------------------------------- banded


def banded_attention(q, k, v, key_mask, band: int, scale: float) -> jax.Array:
    """Causal attention to the last `band` positions without a T x T score matrix.

    q, k, v (B, T, H, K) -> (B, T, H, K); key_mask (B, T) marks real tokens (None: all
    real). The sequence is cut into blocks of `band` queries; each block attends to its
    own keys and the previous block's, so memory grows as T * 2 * band. Plain jax.numpy:
    every transformation composes with it.
    """
    B, T, H, K = q.shape
    W = band
    n = -(-T // W)
    pad = n * W - T

    def blocks(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((B, n, W) + x.shape[2:])

    def with_previous(x):  # (B, n, W, ...) -> (B, n, 2W, ...): previous block, then own
        prev = jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))[:, :-1]
        return jnp.concatenate([prev, x], axis=2)

    qb, kb, vb = blocks(q), with_previous(blocks(k)), with_previous(blocks(v))
    if key_mask is None:
        key_mask = jnp.ones((B, T), bool)
    mb = with_previous(blocks(key_mask))  # (B, n, 2W)
    i = jnp.arange(W)[:, None]  # query offset within its block
    j = jnp.arange(2 * W)[None, :] - W  # key offset relative to the block start
    distance = i - j  # query position minus key position
    first_block = jnp.arange(n)[:, None, None] == 0
    allowed = (distance >= 0) & (distance < W) & ~(first_block & (j < 0))  # (n, W, 2W)
    mask = allowed[None, :, None] & mb[:, :, None, None, :]  # (B, n, 1, W, 2W)
    scores = jnp.einsum("BnTHK,BnSHK->BnHTS", qb, kb, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.where(mask, scores * scale, MASK_VALUE), axis=-1)
    out = jnp.einsum("BnHTS,BnSHK->BnTHK", probs.astype(v.dtype), vb)
    return out.reshape(B, n * W, H, K)[:, :T]
