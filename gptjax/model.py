"""GPT as pure functions over a nested dict of arrays: the papers' equations in jax.numpy.

The GPT-1 paper (Radford et al. 2018), section 3.1:

    h_0 = U W_e + W_p                    embed()
    h_l = transformer_block(h_{l-1})     block(), l = 1..n
    P(u) = softmax(h_n W_e^T)            logits(), tied to W_e
    L_1 = sum_i log P(u_i | u_<i)        lm_loss()

GPT-1 puts LayerNorm after each residual add ("post"); GPT-2 before each sub-block plus
a final ln_f ("pre"); GPT-3 alternates dense and locally banded attention. The parameter
names are GPT-2's own (wte, wpe, ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
mlp.c_proj, ln_f; w = weight, b = bias, g = gain), so the Hugging Face mapping in hf.py
is short. Per-layer parameters are stored stacked with a leading L axis, for lax.scan.

Axis letters, used in shapes and einsum strings alike:
    B batch   T time (queries)   S source time (keys)   D width (n_embd)
    H heads   K head size        F MLP width            V vocabulary   L layers

Every function here is the formula itself, so jit, grad, vmap, jvp, jacfwd, linearize
and hessian all compose with it. With cfg.kernels = "fast" or "auto", four lines marked
"fast path" hand layer_norm, dense, attention and the loss to the hand-written kernels of
gptjax.kernels (kernels.plan says which run where). No Flax, no I/O, nothing global: every
function takes the config explicitly (hashable, so it is a static argument of jax.jit).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import kernels
from gptjax.config import GPTConfig
from gptjax.kernels import MASK_VALUE

Params = dict[str, Any]


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


def embed(params: Params, tokens: jax.Array, cfg: GPTConfig,
          positions: jax.Array | None = None) -> jax.Array:
    """h_0 = U W_e + W_p: token rows plus learned position rows, (B, T) -> (B, T, D).

    `positions` (B, T) gives each token's position id; by default 0..T-1. Pass it
    for left-padded inputs so the first real token sits at position 0.
    """
    if positions is None:
        positions = jnp.arange(tokens.shape[1])[None, :]
    h = params["wte"][tokens] + params["wpe"][positions]
    return h.astype(jnp.dtype(cfg.dtype))


def layer_norm(p: Params, x: jax.Array, cfg: GPTConfig) -> jax.Array:
    """(x - mean) / sqrt(var + eps) * g + b over the last axis, statistics in float32."""
    if kernels.plan(cfg).layer_norm:  # fast path: a hand-written backward
        return kernels.layer_norm(x, p["g"], p["b"], cfg.layer_norm_epsilon)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    # / sqrt, not * rsqrt: XLA's CPU backend (jax 0.10) miscompiles jit(jacrev) through
    # rsqrt of a row statistic, giving non-zero Jacobian entries between different rows.
    y = (x32 - mean) / jnp.sqrt(var + cfg.layer_norm_epsilon) * p["g"] + p["b"]
    return y.astype(x.dtype)


def dense(p: Params, x: jax.Array, cfg: GPTConfig) -> jax.Array:
    """x @ w + b in x's dtype, (..., D) -> (..., F). w is (in, out): the layout of GPT-2's
    Conv1D. The parameters stay float32 (the master copy) and are cast here."""
    if kernels.plan(cfg).dense:  # fast path: a hand-written backward
        return kernels.dense(x, p["w"], p["b"])
    return x @ p["w"].astype(x.dtype) + p["b"].astype(x.dtype)


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


# ----------------------------------------------------------------------------- attention


def causal_mask(q_pos: jax.Array, k_pos: jax.Array, band: int | None = None) -> jax.Array:
    """Which keys each query sees, positions (T,), (S,) -> bool (T, S): the keys at or
    before the query and, in GPT-3's banded layers, fewer than `band` positions back."""
    distance = q_pos[:, None] - k_pos[None, :]
    allowed = distance >= 0
    return allowed if band is None else allowed & (distance < band)


def attend(q, k, v, mask, rate: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(K) + mask) v, the mask adding MASK_VALUE where it is False.

    q (B, T, H, K), k and v (B, S, H, K), mask bool broadcastable to (B, H, T, S) ->
    (B, T, H, K). Scores and softmax in float32; dropout on the probabilities.
    """
    scores = jnp.einsum("BTHK,BSHK->BHTS", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores / math.sqrt(q.shape[-1]), MASK_VALUE)
    probs = dropout(jax.nn.softmax(scores, axis=-1), rate, rng).astype(v.dtype)
    return jnp.einsum("BHTS,BSHK->BTHK", probs, v)


def attention(p: Params, x: jax.Array, cfg: GPTConfig, *, banded: bool = False,
              key_mask: jax.Array | None = None, rngs: tuple | None = None) -> jax.Array:
    """Causal multi-head self-attention, (B, T, D) -> (B, T, D).

    key_mask (B, T) marks real (non-padding) tokens; rngs is (attention dropout key,
    residual dropout key) or None; banded layers see only the last cfg.attention_band
    positions.
    """
    B, T, D = x.shape
    qkv = dense(p["c_attn"], x, cfg).reshape(B, T, 3, cfg.n_head, cfg.head_size)
    attn_rng, resid_rng = rngs if rngs is not None else (None, None)
    rate = cfg.attn_pdrop if attn_rng is not None else 0.0
    band = cfg.attention_band if banded else None
    # fast path, where a kernel serves this call (None where none does)
    y = kernels.self_attention(qkv, cfg, band=band, key_mask=key_mask, dropout=rate > 0)
    if y is None:
        mask = causal_mask(jnp.arange(T), jnp.arange(T), band)[None, None]
        if key_mask is not None:
            mask = mask & key_mask[:, None, None, :]
        y = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask, rate, attn_rng)
    y = dense(p["c_proj"], y.reshape(B, T, D), cfg)
    return dropout(y, cfg.resid_pdrop, resid_rng)


# ----------------------------------------------------------------------------- block


def mlp(p: Params, x: jax.Array, cfg: GPTConfig, rng: jax.Array | None = None) -> jax.Array:
    """Position-wise feed-forward: c_proj(act(c_fc(x))), (B, T, D) -> (B, T, D)."""
    y = dense(p["c_proj"], activation(cfg, dense(p["c_fc"], x, cfg)), cfg)
    return dropout(y, cfg.resid_pdrop, rng)


def block(p: Params, x: jax.Array, cfg: GPTConfig, *, banded: bool = False,
          key_mask: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
    """One transformer block, (B, T, D) -> (B, T, D).

    post (GPT-1): x = ln_1(x + attn(x));      x = ln_2(x + mlp(x))
    pre  (GPT-2): x = x + attn(ln_1(x));      x = x + mlp(ln_2(x))
    """
    rngs = mlp_rng = None
    if rng is not None:  # dropout keys: attention probabilities and output, MLP output
        rngs = (jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1))
        mlp_rng = jax.random.fold_in(rng, 2)

    def attn(x):
        return attention(p["attn"], x, cfg, banded=banded, key_mask=key_mask, rngs=rngs)

    if cfg.norm == "post":
        x = layer_norm(p["ln_1"], x + attn(x), cfg)
        return layer_norm(p["ln_2"], x + mlp(p["mlp"], x, cfg, mlp_rng), cfg)
    x = x + attn(layer_norm(p["ln_1"], x, cfg))
    return x + mlp(p["mlp"], layer_norm(p["ln_2"], x, cfg), cfg, mlp_rng)


# ----------------------------------------------------------------------------- the stack


def run_layers(layers: Params, x: jax.Array, cfg: GPTConfig,
               key_mask: jax.Array | None = None, rng: jax.Array | None = None) -> jax.Array:
    """Apply the L blocks (stacked parameters), as a Python loop or as lax.scan (identical
    results). Layer l's dropout key is fold_in(rng, l + 1).

    With GPT-3's alternating pattern the scan body is a (dense, banded) pair of blocks, so
    each scanned step has a fixed structure; an odd last layer is dense.
    """

    def one(p, x, layer, banded):
        layer_rng = None if rng is None else jax.random.fold_in(rng, layer + 1)
        return block(p, x, cfg, banded=banded, key_mask=key_mask, rng=layer_rng)

    if cfg.remat:
        one = jax.checkpoint(one, static_argnums=(3,))

    L = cfg.n_layer
    take = lambda tree, i: jax.tree_util.tree_map(lambda a: a[i], tree)  # noqa: E731
    if not cfg.scan_layers:
        for layer in range(L):
            x = one(take(layers, layer), x, layer, cfg.layer_is_banded(layer))
        return x

    group = 2 if cfg.attention_band is not None else 1
    n_groups = L // group
    scanned = group * n_groups

    def body(x, xs):
        p, index = xs
        for g in range(group):
            x = one(take(p, g), x, index * group + g, g == 1)
        return x, None

    grouped = jax.tree_util.tree_map(
        lambda a: a[:scanned].reshape((n_groups, group) + a.shape[1:]), layers)
    x, _ = jax.lax.scan(body, x, (grouped, jnp.arange(n_groups)))
    if scanned < L:  # an odd last layer: dense, applied outside the scan
        x = one(take(layers, L - 1), x, L - 1, False)
    return x


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


def forward(params: Params, tokens: jax.Array, cfg: GPTConfig, train: bool = False,
            rng: jax.Array | None = None, *, positions: jax.Array | None = None,
            attention_mask: jax.Array | None = None) -> jax.Array:
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
    x = run_layers(params["h"], x, cfg, key_mask, rng)
    if cfg.norm == "pre":
        x = layer_norm(params["ln_f"], x, cfg)
    return x


# ----------------------------------------------------------------------------- logits, loss


def logits(params: Params, h: jax.Array) -> jax.Array:
    """softmax's argument h_n W_e^T with the output tied to W_e: (B, T, D) -> (B, T, V) float32."""
    wte = params["wte"].astype(h.dtype)
    return jnp.einsum("BTD,VD->BTV", h, wte, preferred_element_type=jnp.float32)


def token_nll(params: Params, h: jax.Array, targets: jax.Array) -> jax.Array:
    """-log P(target | h) per position, in float32: (B, T, D), (B, T) -> (B, T)."""
    log_probs = jax.nn.log_softmax(logits(params, h), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def mean_nll(params: Params, h: jax.Array, targets: jax.Array,
             weights: jax.Array | None = None, *, cfg: GPTConfig | None = None) -> jax.Array:
    """The (weighted) mean of token_nll(params, h, targets) in float32: the mean over the
    weights' sum (0 if it is 0), or over all positions. cfg picks the kernel (None: the
    reference); the fast one never holds the (B, T, V) logits.
    """
    w = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(
        jnp.float32)
    if cfg is not None and kernels.plan(cfg).loss:  # fast path: chunked, one pass
        total = kernels.nll_sum(h, params["wte"], targets, jax.lax.stop_gradient(w))
    else:
        total = jnp.sum(w * token_nll(params, h, targets))
    if weights is None:
        return total / targets.size
    count = w.sum()
    return jnp.where(count > 0, total / jnp.maximum(count, 1e-9), 0.0)


def lm_loss(params: Params, tokens: jax.Array, cfg: GPTConfig, *,
            weights: jax.Array | None = None, train: bool = False, rng: jax.Array | None = None,
            positions: jax.Array | None = None, attention_mask: jax.Array | None = None
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
        mask = jnp.asarray(attention_mask, jnp.float32)
        weights = mask.at[:, 1:].multiply(mask[:, :-1])

    def inputs(x):
        return None if x is None else x[:, :-1]

    h = forward(params, tokens[:, :-1], cfg, train, rng, positions=inputs(positions),
                attention_mask=inputs(attention_mask))
    return mean_nll(params, h, tokens[:, 1:], None if weights is None else weights[:, 1:],
                    cfg=cfg)
