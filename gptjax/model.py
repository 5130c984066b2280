"""GPT as pure functions over a nested dict of arrays.

The equations of the GPT-1 paper (Radford et al. 2018), section 3.1:

    h_0 = U W_e + W_p                    embed()
    h_l = transformer_block(h_{l-1})     block(), l = 1..n
    P(u) = softmax(h_n W_e^T)            logits(), tied to W_e
    L_1 = sum_i log P(u_i | u_<i)        lm_loss()

GPT-1 puts LayerNorm after each residual add ("post"); GPT-2 before each
sub-block plus a final ln_f ("pre"); GPT-3 alternates dense and locally banded
attention. The parameter names are GPT-2's own (wte, wpe, ln_1, attn.c_attn,
attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj, ln_f; w = weight, b = bias, g = gain),
so the Hugging Face mapping in hf.py is short. Per-layer parameters are stored
stacked with a leading L axis, ready for lax.scan.

Axis letters, used in shapes and einsum strings alike:
    B batch   T time (queries)   S source time (keys)   D width (n_embd)
    H heads   K head size        F MLP width            V vocabulary   L layers

No Flax, no I/O, nothing global: every function takes the config explicitly
(hashable, so it is a static argument of jax.jit).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import GPTConfig

Params = dict[str, Any]

# Filled into masked attention scores. Finite, so a row with every key masked
# (a padding query) gives a uniform row instead of NaN, as jax.nn does.
MASK_VALUE = float(np.finfo(np.float32).min)


# ----------------------------------------------------------------------------- init


def init_params(cfg: GPTConfig, key: jax.Array) -> Params:
    """Random parameters: weights N(0, init_std), biases 0, LayerNorm gains 1.

    GPT-2 (pre-LN) scales the residual projections attn.c_proj and mlp.c_proj by
    1/sqrt(2 n_layer), since each block adds two of them to the residual stream.
    """
    L, D, F, V, T = cfg.n_layer, cfg.n_embd, cfg.mlp_width, cfg.vocab_size, cfg.n_ctx
    std = cfg.init_std
    proj_std = std / math.sqrt(2 * L) if cfg.residual_init_scaled else std
    keys = iter(jax.random.split(key, 6))

    def normal(shape, scale):
        return scale * jax.random.normal(next(keys), shape, jnp.float32)

    def norm():
        return {"g": jnp.ones((L, D), jnp.float32), "b": jnp.zeros((L, D), jnp.float32)}

    layers = {
        "ln_1": norm(),
        "attn": {
            "c_attn": {"w": normal((L, D, 3 * D), std), "b": jnp.zeros((L, 3 * D))},
            "c_proj": {"w": normal((L, D, D), proj_std), "b": jnp.zeros((L, D))},
        },
        "ln_2": norm(),
        "mlp": {
            "c_fc": {"w": normal((L, D, F), std), "b": jnp.zeros((L, F))},
            "c_proj": {"w": normal((L, F, D), proj_std), "b": jnp.zeros((L, D))},
        },
    }
    params = {"wte": normal((V, D), std), "wpe": normal((T, D), std), "h": layers}
    if cfg.norm == "pre":
        params["ln_f"] = {"g": jnp.ones((D,), jnp.float32), "b": jnp.zeros((D,), jnp.float32)}
    return params


def count_params(params: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------- pieces


def _dtype(cfg: GPTConfig):
    return jnp.dtype(cfg.dtype)


def layer_norm(p: Params, x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm with its statistics in float32 whatever the compute dtype."""
    return _layer_norm(x, p["g"], p["b"], eps)


@jax.custom_vjp
def _layer_norm(x, g, b, eps):
    return _layer_norm_fwd(x, g, b, eps)[0]


def _layer_norm_fwd(x, g, b, eps):
    x32 = x.astype(jnp.float32)
    centred = x32 - x32.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)
    xhat = centred * rstd
    return (xhat * g + b).astype(x.dtype), (xhat, rstd, g)


def _layer_norm_bwd(saved, dy):
    # The textbook backward from the normalised input: two row means instead of the
    # chain JAX derives through mean, variance and rsqrt (3% less per CPU char step).
    xhat, rstd, g = saved
    dy32 = dy.astype(jnp.float32)
    batch_axes = tuple(range(dy.ndim - 1))
    dxhat = dy32 * g
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    return (dx.astype(dy.dtype), jnp.sum(dy32 * xhat, batch_axes), jnp.sum(dy32, batch_axes),
            None)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def _product(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum in a's dtype, accumulated in float32 where _f32_accumulate says so."""
    if not _f32_accumulate(a.dtype):
        return jnp.einsum(spec, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _f32_accumulate(dtype) -> bool:
    """Whether products of this dtype ask for a float32 result: XLA's CPU backend has
    bfloat16 kernels only for products that accumulate into float32 (twice the float32
    rate on AVX512-BF16)."""
    return dtype != jnp.float32 and jax.default_backend() == "cpu"


@jax.custom_vjp
def _affine(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """x @ w + b over x's last axis in x's dtype, (..., D) x (D, F) + (F,) -> (..., F);
    w and b in their own (master) dtype."""
    return _affine_fwd(x, w, b)[0]


def _affine_fwd(x, w, b):
    # With a float32 accumulator the bias is added before rounding to x's dtype.
    acc = jnp.float32 if _f32_accumulate(x.dtype) else None
    y = jnp.einsum("...D,DF->...F", x, w.astype(x.dtype), preferred_element_type=acc)
    return (y + b.astype(y.dtype)).astype(x.dtype), (x, w, b)


def _affine_bwd(saved, g):
    # The weight gradient as x^T g over all positions, one 2-D product. JAX's own rule
    # forms (g^T x)^T, and XLA's CPU backend then copies g into a transposed layout for
    # every weight, re-running the fused ops that produce g: measured 20% of a CPU step.
    # The weight and bias gradients come out in float32 (the master dtype) directly.
    x, w, b = saved
    dx = _product("...F,DF->...D", g, w.astype(g.dtype))
    g2 = g.reshape(-1, g.shape[-1])
    if _f32_accumulate(g.dtype) and x.ndim == 3 and x.shape[0] > 1:
        # XLA folds a plain transpose of x into the product, whose bfloat16 kernel then
        # refuses it (float32 fallback: twice the time). With the rows in (T, B) order in
        # both operands, x^T is a real copy in the layout the kernel takes.
        x_t = jnp.transpose(x, (2, 1, 0)).reshape(x.shape[-1], -1)
        g_tb = jnp.swapaxes(g, 0, 1).reshape(-1, g.shape[-1])
        dw = jnp.einsum("DN,NF->DF", x_t, g_tb, preferred_element_type=jnp.float32)
    else:
        dw = jnp.einsum("ND,NF->DF", x.reshape(-1, x.shape[-1]), g2,
                        preferred_element_type=jnp.float32)
    db = jnp.sum(g2.astype(jnp.float32), 0)
    return dx, dw.astype(w.dtype), db.astype(b.dtype)


_affine.defvjp(_affine_fwd, _affine_bwd)


def dense(p: Params, x: jax.Array) -> jax.Array:
    """x @ w + b in x's dtype. w is (in, out): the layout of GPT-2's Conv1D."""
    return _affine(x, p["w"], p["b"])


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def activation(cfg: GPTConfig, x: jax.Array) -> jax.Array:
    if cfg.activation == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if cfg.activation == "gelu":
        return jax.nn.gelu(x, approximate=False)
    return jax.nn.relu(x)


def embed(
    params: Params, tokens: jax.Array, cfg: GPTConfig, positions: jax.Array | None = None
) -> jax.Array:
    """h_0 = U W_e + W_p: token rows plus learned position rows, (B, T) -> (B, T, D).

    `positions` (B, T) gives each token's position id; by default 0..T-1. Pass it
    for left-padded inputs so the first real token sits at position 0.
    """
    if positions is None:
        positions = jnp.arange(tokens.shape[1])[None, :]
    h = params["wte"][tokens] + params["wpe"][positions]
    return h.astype(_dtype(cfg))


def attention_impl(cfg: GPTConfig) -> str:
    """The kernel "auto" resolves to: cudnn on NVIDIA GPUs in 16-bit, xla elsewhere."""
    if cfg.attention != "auto":
        return cfg.attention
    if jax.default_backend() == "gpu" and cfg.dtype in ("bfloat16", "float16"):
        return "cudnn"
    return "xla"


def _softmax_attention(q, k, v, mask, scale, rate, rng):
    """Attention with explicit probabilities: softmax in float32, optional dropout.

    q (B, T, H, K), k and v (B, S, H, K), mask broadcastable to (B, H, T, S).
    """
    scores = jnp.einsum("BTHK,BSHK->BHTS", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = dropout(probs, rate, rng).astype(v.dtype)
    return jnp.einsum("BHTS,BSHK->BTHK", probs, v)


# Attention's products run over Z = B H heads as 3-D batched matmuls. XLA's CPU matmul
# kernels (YNNPACK) take row-major operands only; XLA folds a transposed operand into the
# product, which then falls back to a slower kernel (in bfloat16: converted to float32
# first). So in bfloat16 on the CPU the backward pass transposes q and dO into (Z, K, T)
# copies itself and forms dK^T and dV^T: a transpose followed by a reshape that merges B
# and H cannot be folded away (they are not adjacent before it).


def _by_head(x):  # (B, T, H, K) -> (B H, T, K)
    B, T, H, K = x.shape
    return jnp.swapaxes(x, 1, 2).reshape(B * H, T, K)


def _by_head_t(x):  # (B, T, H, K) -> (B H, K, T)
    B, T, H, K = x.shape
    return jnp.transpose(x, (0, 2, 3, 1)).reshape(B * H, K, T)


def _scaled(x, scale):  # x * scale rounded once to x's dtype, whatever scale's type
    return (x.astype(jnp.float32) * scale).astype(x.dtype)


def _from_head(x, B):  # (B H, T, K) -> (B, T, H, K)
    Z, T, K = x.shape
    return jnp.swapaxes(x.reshape(B, Z // B, T, K), 1, 2)


def _from_head_t(x, B):  # (B H, K, T) -> (B, T, H, K)
    Z, K, T = x.shape
    return jnp.transpose(x.reshape(B, Z // B, K, T), (0, 3, 1, 2))


# Causal attention walks the queries in up to QUERY_BLOCKS blocks of at least
# MIN_QUERY_BLOCK rows: block [lo, hi) needs the keys before hi only, so the products skip
# the upper-right blocks that the causal mask would discard (n blocks do (n + 1) / 2n of
# the T x T work). Each block holds its rows' whole key range, so its softmax is exact,
# with no running maximum to carry. Measured on the CPU (2 cores), 4 blocks against 1:
# cpu-6x384 bfloat16 1244 -> 1076 ms per step, float32 unchanged; cpu-small (2 blocks)
# float32 340 -> 314 ms.
QUERY_BLOCKS = 4
MIN_QUERY_BLOCK = 64


def _query_blocks(T: int) -> list[tuple[int, int]]:
    n = QUERY_BLOCKS
    while n > 1 and (T % n or T // n < MIN_QUERY_BLOCK):
        n //= 2
    size = T // n
    return [(lo, lo + size) for lo in range(0, T, size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _causal_attention(qkv, scale):
    """softmax(q k^T * scale, causal) v for qkv (B, T, 3, H, K) -> (B, T, H, K), with a
    hand-written backward: dS = P * (dP - rowsum(dO * O)) needs no reduction over the
    T x T scores, where differentiating the softmax does (measured: 5% of a CPU step).
    The scale is applied to q (and to dQ), not to the T x T scores."""
    return _causal_attention_fwd(qkv, scale)[0]


def _causal_attention_fwd(qkv, scale):
    B, T = qkv.shape[:2]
    q = _by_head(_scaled(qkv[:, :, 0], scale))
    k, v = _by_head(qkv[:, :, 1]), _by_head(qkv[:, :, 2])
    outs, probs = [], []
    for lo, hi in _query_blocks(T):
        s = jnp.einsum("ZTK,ZSK->ZTS", q[:, lo:hi], k[:, :hi],
                       preferred_element_type=jnp.float32)
        causal = jnp.arange(lo, hi)[:, None] >= jnp.arange(hi)[None, :]
        p = jax.nn.softmax(jnp.where(causal, s, MASK_VALUE), axis=-1)
        outs.append(_product("ZTS,ZSK->ZTK", p.astype(v.dtype), v[:, :hi]))
        probs.append(p)
    o = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]
    return _from_head(o, B), (qkv, o, tuple(probs))


def _causal_attention_bwd(scale, saved, do):
    qkv, o, probs = saved  # o (Z, T, K); probs: per query block (Z, hi - lo, hi) float32
    B, T = qkv.shape[:2]
    f32 = jnp.float32
    k, v = _by_head(qkv[:, :, 1]), _by_head(qkv[:, :, 2])
    do_z = _by_head(do)
    delta = jnp.einsum("ZTK,ZTK->ZT", do_z.astype(f32), o.astype(f32))
    # dK^T = q^T dS and dV^T = dO^T P. In bfloat16 on the CPU these come from (Z, K, T)
    # copies (see above); in float32 XLA's CPU backend runs them with the transposes
    # folded in about as fast, and float32 copies would cost more than they save.
    transposed = _f32_accumulate(qkv.dtype)
    if transposed:
        q_t, do_t = _by_head_t(_scaled(qkv[:, :, 0], scale)), _by_head_t(do)
    else:
        q = _by_head(_scaled(qkv[:, :, 0], scale))
    dqs, dk, dv = [], 0.0, 0.0
    for (lo, hi), p in zip(_query_blocks(T), probs):
        dp = jnp.einsum("ZTK,ZSK->ZTS", do_z[:, lo:hi], v[:, :hi], preferred_element_type=f32)
        ds = (p * (dp - delta[:, lo:hi, None])).astype(qkv.dtype)  # dS / scale
        pc = p.astype(do.dtype)
        dqs.append(_product("ZTS,ZSK->ZTK", ds, k[:, :hi]))
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


_causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


def _banded_attention(q, k, v, key_mask, band, scale, rate, rng):
    """Causal attention to the last `band` positions without a T x T score matrix.

    The sequence is cut into blocks of `band` queries; each block attends to its
    own keys and the previous block's, so memory grows as T * 2 * band.
    key_mask (B, T) marks real tokens (None: all real).
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
    scores = jnp.where(mask, scores * scale, MASK_VALUE)
    probs = dropout(jax.nn.softmax(scores, axis=-1), rate, rng).astype(v.dtype)
    out = jnp.einsum("BnHTS,BnSHK->BnTHK", probs, vb)
    return out.reshape(B, n * W, H, K)[:, :T]


def attention(
    p: Params,
    x: jax.Array,
    cfg: GPTConfig,
    *,
    banded: bool = False,
    key_mask: jax.Array | None = None,
    rngs: tuple | None = None,
    cache: tuple | None = None,
    cache_index: jax.Array | None = None,
):
    """Causal multi-head self-attention, (B, T, D) -> (B, T, D).

    key_mask (B, T) marks real (non-padding) tokens. With `cache` = (k, v) of
    shape (B, S, H, K), the T new keys/values are written at cache_index and the
    queries attend over the whole cache (key_mask is then (B, S)); the updated
    cache is returned. Returns (y, new_cache_or_None).
    """
    B, T, D = x.shape
    H, K = cfg.n_head, cfg.head_size
    qkv = dense(p["c_attn"], x).reshape(B, T, 3, H, K)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scale = 1.0 / math.sqrt(K)
    attn_rng, resid_rng = rngs if rngs is not None else (None, None)
    attn_rate = cfg.attn_pdrop if attn_rng is not None else 0.0
    band = cfg.attention_band if banded else None

    if cache is not None:
        k_all = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype),
                                                    cache_index, axis=1)
        v_all = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype),
                                                    cache_index, axis=1)
        q_pos = cache_index + jnp.arange(T)[:, None]
        distance = q_pos - jnp.arange(k_all.shape[1])[None, :]  # (T, S), by cache slot
        mask = distance >= 0
        if band is not None:
            mask &= distance < band
        mask = mask[None, None]
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :]
        y = _softmax_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask, scale,
                               0.0, None)
        new_cache = (k_all, v_all)
    else:
        new_cache = None
        impl = attention_impl(cfg)
        if band is not None and band < T and impl == "xla":
            y = _banded_attention(q, k, v, key_mask, band, scale, attn_rate, attn_rng)
        elif attn_rate > 0.0:
            causal = jnp.tril(jnp.ones((T, T), bool))
            if band is not None:
                causal &= ~jnp.tril(jnp.ones((T, T), bool), -band)
            mask = causal[None, None]
            if key_mask is not None:
                mask = mask & key_mask[:, None, None, :]
            y = _softmax_attention(q, k, v, mask, scale, attn_rate, attn_rng)
        elif impl == "xla" and key_mask is None and (band is None or band >= T):
            y = _causal_attention(qkv, scale)
        else:
            kwargs = {}
            if band is not None and band < T:
                kwargs["local_window_size"] = (band - 1, 0)
            mask = None if key_mask is None else key_mask[:, None, None, :]
            if impl == "cudnn" and mask is not None:
                # cudnn takes no boolean mask; an additive bias does the same job.
                # Half the dtype's minimum: MASK_VALUE itself would round to -inf in
                # 16-bit and an all-masked (padding) row would give NaN.
                low = float(jnp.finfo(q.dtype).min) / 2
                kwargs["bias"] = jnp.where(mask, 0.0, low).astype(q.dtype)
                mask = None
            y = jax.nn.dot_product_attention(
                q, k, v, mask=mask, scale=scale, is_causal=True, implementation=impl, **kwargs
            )
    y = dense(p["c_proj"], y.reshape(B, T, D))
    return dropout(y, cfg.resid_pdrop, resid_rng), new_cache


def mlp(p: Params, x: jax.Array, cfg: GPTConfig, rng: jax.Array | None = None) -> jax.Array:
    """Position-wise feed-forward: c_proj(act(c_fc(x))), (B, T, D) -> (B, T, D)."""
    y = dense(p["c_proj"], activation(cfg, dense(p["c_fc"], x)))
    return dropout(y, cfg.resid_pdrop, rng)


def block(
    p: Params,
    x: jax.Array,
    cfg: GPTConfig,
    *,
    banded: bool = False,
    key_mask: jax.Array | None = None,
    rng: jax.Array | None = None,
    cache: tuple | None = None,
    cache_index: jax.Array | None = None,
):
    """One transformer block. Returns (x, new_cache_or_None).

    post (GPT-1): x = ln_1(x + attn(x));      x = ln_2(x + mlp(x))
    pre  (GPT-2): x = x + attn(ln_1(x));      x = x + mlp(ln_2(x))
    """
    eps = cfg.layer_norm_epsilon
    if rng is None:
        rngs, mlp_rng = None, None
    else:
        rngs = (jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1))
        mlp_rng = jax.random.fold_in(rng, 2)
    attn_kwargs = dict(banded=banded, key_mask=key_mask, rngs=rngs, cache=cache,
                       cache_index=cache_index)
    if cfg.norm == "post":
        a, cache = attention(p["attn"], x, cfg, **attn_kwargs)
        x = layer_norm(p["ln_1"], x + a, eps)
        x = layer_norm(p["ln_2"], x + mlp(p["mlp"], x, cfg, mlp_rng), eps)
    else:
        a, cache = attention(p["attn"], layer_norm(p["ln_1"], x, eps), cfg, **attn_kwargs)
        x = x + a
        x = x + mlp(p["mlp"], layer_norm(p["ln_2"], x, eps), cfg, mlp_rng)
    return x, cache


# ----------------------------------------------------------------------------- the stack


def _layer_rng(rng, layer):
    return None if rng is None else jax.random.fold_in(rng, layer + 1)


def _run_layers(layers, x, cfg, key_mask, rng, cache, cache_index):
    """Apply the L blocks, as a Python loop or as lax.scan (identical results).

    With GPT-3's alternating pattern the scan body is a (dense, banded) pair of
    blocks, so each scanned step has a fixed structure; an odd last layer is dense.
    """

    def one(p, x, layer, banded, layer_cache):
        return block(p, x, cfg, banded=banded, key_mask=key_mask, rng=_layer_rng(rng, layer),
                     cache=layer_cache, cache_index=cache_index)

    if cfg.remat:
        one = jax.checkpoint(one, static_argnums=(3,))

    L = cfg.n_layer
    take = lambda tree, i: jax.tree_util.tree_map(lambda a: a[i], tree)  # noqa: E731

    if not cfg.scan_layers:
        new_cache = []
        for layer in range(L):
            layer_cache = None if cache is None else take(cache, layer)
            x, c = one(take(layers, layer), x, layer, cfg.layer_is_banded(layer), layer_cache)
            new_cache.append(c)
        if cache is None:
            return x, None
        return x, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *new_cache)

    group = 2 if cfg.attention_band is not None else 1
    n_groups = L // group
    scanned = group * n_groups

    def grouped(tree):  # (L, ...) -> (n_groups, group, ...) over the first `scanned` layers
        return jax.tree_util.tree_map(
            lambda a: a[:scanned].reshape((n_groups, group) + a.shape[1:]), tree
        )

    def body(x, xs):
        p, index, layer_cache = xs
        caches = []
        for g in range(group):
            c_in = None if layer_cache is None else take(layer_cache, g)
            x, c = one(take(p, g), x, index * group + g, g == 1, c_in)
            caches.append(c)
        c_out = None if layer_cache is None else jax.tree_util.tree_map(
            lambda *a: jnp.stack(a), *caches)
        return x, c_out

    xs = (grouped(layers), jnp.arange(n_groups), None if cache is None else grouped(cache))
    x, new_cache = jax.lax.scan(body, x, xs)
    if new_cache is not None:
        new_cache = jax.tree_util.tree_map(
            lambda a: a.reshape((scanned,) + a.shape[2:]), new_cache)
    if scanned < L:  # an odd last layer: dense, applied outside the scan
        layer_cache = None if cache is None else take(cache, L - 1)
        x, c = one(take(layers, L - 1), x, L - 1, False, layer_cache)
        if cache is not None:
            new_cache = jax.tree_util.tree_map(
                lambda a, b: jnp.concatenate([a, b[None]]), new_cache, c)
    return x, new_cache


def check_inputs(tokens, cfg: GPTConfig, positions=None, where: str = "tokens") -> None:
    """Raise ValueError for token ids outside [0, vocab) or inputs past the context.

    Runs only on concrete arrays. Inside jax.jit the values are abstract and
    cannot be checked: there JAX clamps out-of-range gathers (an id >= vocab
    reads the last row) and nothing is raised, so validate data on the host.
    """
    if tokens.ndim != 2:
        raise ValueError(f"{where} must have shape (B, T), got {tokens.shape}")
    T = tokens.shape[1]
    if positions is None and T > cfg.n_ctx:
        raise ValueError(f"{where} has length {T}, longer than the context n_ctx={cfg.n_ctx}")
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{where} must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            where_bad = tuple(int(i) for i in np.argwhere(arr == bad)[0])
            raise ValueError(
                f"{where} has id {bad} at index {where_bad}, outside [0, {cfg.vocab_size}) "
                f"(vocab_size={cfg.vocab_size})"
            )
    if positions is not None and not isinstance(positions, jax.core.Tracer):
        pos = np.asarray(positions)
        if pos.size and (pos.min() < 0 or pos.max() >= cfg.n_ctx):
            raise ValueError(
                f"positions must lie in [0, {cfg.n_ctx}), got range [{pos.min()}, {pos.max()}]"
            )


def forward(
    params: Params,
    tokens: jax.Array,
    cfg: GPTConfig,
    train: bool = False,
    rng: jax.Array | None = None,
    *,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """Final hidden states h_n, (B, T) int32 -> (B, T, D) in the compute dtype.

    Pre-LN models include the final ln_f. Dropout is applied only when
    train=True, and then needs `rng`. attention_mask (B, T) is 1/True at real
    tokens and 0 at padding: padding keys are ignored, so the outputs at real
    tokens equal those of the unpadded sequence (give `positions` for left pads).
    """
    check_inputs(tokens, cfg, positions)
    if train and rng is None and max(cfg.embd_pdrop, cfg.attn_pdrop, cfg.resid_pdrop) > 0:
        raise ValueError("forward(train=True) with dropout needs an rng key")
    rng = rng if train else None
    key_mask = None if attention_mask is None else attention_mask.astype(bool)
    x = embed(params, tokens, cfg, positions)
    x = dropout(x, cfg.embd_pdrop, None if rng is None else jax.random.fold_in(rng, 0))
    x, _ = _run_layers(params["h"], x, cfg, key_mask, rng, None, None)
    if cfg.norm == "pre":
        x = layer_norm(params["ln_f"], x, cfg.layer_norm_epsilon)
    return x


def logits(params: Params, h: jax.Array) -> jax.Array:
    """softmax's argument h_n W_e^T with the output tied to W_e: (B, T, D) -> (B, T, V) float32."""
    wte = params["wte"].astype(h.dtype)
    return jnp.einsum("BTD,VD->BTV", h, wte, preferred_element_type=jnp.float32)


def token_nll(params: Params, h: jax.Array, targets: jax.Array) -> jax.Array:
    """-log P(target | h) per position, in float32: (B, T, D), (B, T) -> (B, T)."""
    z = logits(params, h)
    logz = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return logz - picked


# The loss below never holds the float32 logits of the whole batch: it walks the
# sequence in chunks of at most this many (token, vocabulary) logits (256 MiB), and
# forms the gradient for h and W_e in the same pass (so nothing of a chunk is kept
# for the backward pass). Inside, W_e is padded to a multiple of VOCAB_MULTIPLE rows,
# whose logits are masked, for matmul-friendly shapes (50257 -> 50304 for GPT-2).
LOSS_CHUNK_LOGITS = 2**26
VOCAB_MULTIPLE = 128


def _nll_pass(h, wte, targets, weights, grads: bool):
    """sum(weights * -log softmax(h W_e^T)[targets]) over (B, T), by sequence chunks.

    h (B, T, D), wte (V, D), targets (B, T) int, weights (B, T) float32. With grads,
    also d/dh (B, T, D) in h's dtype and d/dwte (V, D) in wte's dtype.
    """
    B, T, D = h.shape
    V = wte.shape[0]
    Vp = -(-V // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    w_e = jnp.pad(wte, ((0, Vp - V), (0, 0))).astype(h.dtype)
    n = -(-T // max(1, LOSS_CHUNK_LOGITS // (B * Vp)))  # chunks
    C = -(-T // n)  # sequence positions per chunk
    if n * C > T:  # pad the sequence with weight-0 positions
        pad = ((0, 0), (0, n * C - T))
        h, targets, weights = jnp.pad(h, pad + ((0, 0),)), jnp.pad(targets, pad), \
            jnp.pad(weights, pad)

    def chunk(h_c, t_c, w_c):
        # Rows of positions, (N, D) with N = B C: 2-D products, and the exponentials
        # formed once for both log Z and the softmax.
        x = h_c.reshape(-1, D)
        z = jnp.einsum("ND,VD->NV", x, w_e, preferred_element_type=jnp.float32)
        if Vp > V:
            z = jnp.where(jnp.arange(Vp) < V, z, MASK_VALUE)
        top = jax.lax.stop_gradient(z.max(-1, keepdims=True))
        e = jnp.exp(z - top)
        sum_e = e.sum(-1, keepdims=True)
        logz = (top + jnp.log(sum_e))[:, 0]
        t_flat, w_flat = t_c.reshape(-1), w_c.reshape(-1)
        picked = jnp.take_along_axis(z, t_flat[:, None], axis=-1)[:, 0]
        total = jnp.sum(w_flat * (logz - picked))
        if not grads:
            return total, None, None
        # d/dz of w * (logz - z[target]) = w * (softmax(z) - onehot(target))
        dz = e / sum_e - jax.nn.one_hot(t_flat, Vp, dtype=jnp.float32)
        dz = (dz * w_flat[:, None]).astype(h.dtype)
        dh = jnp.einsum("NV,VD->ND", dz, w_e, preferred_element_type=jnp.float32)
        dw = jnp.einsum("ND,NV->DV", x, dz, preferred_element_type=jnp.float32).T
        return total, dh.astype(h.dtype).reshape(h_c.shape), dw

    if n == 1:
        total, dh, dw = chunk(h, targets, weights)
    else:
        def body(carry, xs):
            total, dw = carry
            t, dh_c, dw_c = chunk(*xs)
            return (total + t, None if dw is None else dw + dw_c), dh_c

        def by_chunk(x):  # (B, n C, ...) -> (n, B, C, ...): the batch axis stays put
            return jnp.moveaxis(x.reshape((B, n, C) + x.shape[2:]), 1, 0)

        zero_dw = jnp.zeros((Vp, D), jnp.float32) if grads else None
        (total, dw), dh = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zero_dw),
                                       (by_chunk(h), by_chunk(targets), by_chunk(weights)))
        if grads:
            dh = jnp.moveaxis(dh, 0, 1).reshape(B, n * C, D)
    if not grads:
        return total
    return total, dh[:, :T], dw[:V].astype(wte.dtype)


@jax.custom_vjp
def _nll_sum(h, wte, targets, weights):
    return _nll_pass(h, wte, targets, weights, grads=False)


def _nll_sum_fwd(h, wte, targets, weights):
    total, dh, dw = _nll_pass(h, wte, targets, weights, grads=True)
    return total, (dh, dw)


def _nll_sum_bwd(saved, g):
    dh, dw = saved  # weights are constants: no gradient flows to them
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None, None


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)


def mean_nll(params: Params, h: jax.Array, targets: jax.Array,
             weights: jax.Array | None = None) -> jax.Array:
    """The (weighted) mean of token_nll(params, h, targets), in float32, without its
    (B, T, V) logits: the mean over the weights' sum (0 if it is 0), or over all positions.
    """
    w = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(
        jnp.float32)
    total = _nll_sum(h, params["wte"], targets, jax.lax.stop_gradient(w))
    if weights is None:
        return total / targets.size
    count = w.sum()
    return jnp.where(count > 0, total / jnp.maximum(count, 1e-9), 0.0)


def lm_loss_from_hidden(
    params: Params, h: jax.Array, tokens: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """Mean next-token NLL given the hidden states h (B, T, D) of all of `tokens` (B, T).

    For callers that need h anyway (the fine-tuning heads); weights as in lm_loss.
    """
    return mean_nll(params, h[:, :-1], tokens[:, 1:], None if weights is None else weights[:, 1:])


def lm_loss(
    params: Params,
    tokens: jax.Array,
    cfg: GPTConfig,
    *,
    weights: jax.Array | None = None,
    train: bool = False,
    rng: jax.Array | None = None,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """Mean negative log-likelihood of each token given those before it (nats).

    tokens (B, T): the model reads tokens[:, :-1] and predicts tokens[:, 1:], so
    T may be n_ctx + 1 (a training window). This is Hugging Face's loss with
    `labels=input_ids`. `weights` (B, T) is aligned with `tokens` like HF labels:
    weights[:, t] scales the loss of predicting token t (weights[:, 0] is
    unused); the mean is over the weights' sum. With no weights but an
    attention_mask, a target counts where the mask is 1 at it and at the token
    before it.
    """
    if weights is None and attention_mask is not None:
        # A target counts when it and the token before it are real: with left
        # padding, the first real token is not predicted from a pad.
        mask = jnp.asarray(attention_mask)
        weights = mask.at[:, 1:].multiply(mask[:, :-1])

    def inputs(x):
        return None if x is None else x[:, :-1]

    h = forward(params, tokens[:, :-1], cfg, train, rng, positions=inputs(positions),
                attention_mask=inputs(attention_mask))
    return mean_nll(params, h, tokens[:, 1:], None if weights is None else weights[:, 1:])


# ----------------------------------------------------------------------------- KV cache


def init_cache(cfg: GPTConfig, batch_size: int, length: int | None = None, dtype=None):
    """An empty KV cache: (k, v), each (L, B, S, H, K) with S = length or n_ctx."""
    S = length or cfg.n_ctx
    shape = (cfg.n_layer, batch_size, S, cfg.n_head, cfg.head_size)
    dtype = dtype or _dtype(cfg)
    return (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def forward_cached(
    params: Params,
    tokens: jax.Array,
    cfg: GPTConfig,
    cache: tuple,
    cache_index: jax.Array,
    *,
    positions: jax.Array,
    key_mask: jax.Array,
):
    """Hidden states of T new tokens written into the cache at slots cache_index...

    tokens and positions (B, T); key_mask (B, S) marks the cache slots holding
    real tokens (those about to be written included). A query at slot i attends
    to real keys at slots <= i (and > i - band in banded layers). Returns
    (h (B, T, D), new_cache). Prefill and one-token decoding are both this call.
    """
    x = embed(params, tokens, cfg, positions)
    x, cache = _run_layers(params["h"], x, cfg, key_mask.astype(bool), None, cache, cache_index)
    if cfg.norm == "pre":
        x = layer_norm(params["ln_f"], x, cfg.layer_norm_epsilon)
    return x, cache
