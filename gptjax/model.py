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

BERT (Devlin et al. 2019; cfg.arch="bert") is the same functions: post-LN blocks whose
attention sees the tokens on both sides, segment embeddings wtt and a LayerNorm ln_e in
embed(), and its heads at the end of this file (mlm_logits, tied to W_e like logits();
pooled and nsp_logits; mlm_loss, nsp_loss, bert_loss).

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

from gptjax import kernels, mup
from gptjax.config import GPTConfig
from gptjax.kernels import MASK_VALUE

Params = dict[str, Any]


# ----------------------------------------------------------------------------- init


def init_params(cfg: GPTConfig, key: jax.Array) -> Params:
    """Random parameters: weights N(0, init_std), biases 0, LayerNorm gains 1.

    GPT-2 (pre-LN) scales the residual projections attn.c_proj and mlp.c_proj by
    1/sqrt(2 n_layer), since each block adds two of them to the residual stream. Under
    muP the hidden matrices' std is divided by sqrt(m) (gptjax.mup).
    """
    L, D, F, V, T = cfg.n_layer, cfg.n_embd, cfg.mlp_width, cfg.vocab_size, cfg.n_ctx
    std = cfg.init_std
    hidden_std = std * mup.hidden_init_scale(cfg)  # muP: init_std / sqrt(m); else init_std
    proj_std = hidden_std / math.sqrt(2 * L) if cfg.residual_init_scaled else hidden_std
    keys = iter(jax.random.split(key, 6))

    def normal(shape, scale):
        return scale * jax.random.normal(next(keys), shape, jnp.float32)

    def norm():
        return {"g": jnp.ones((L, D), jnp.float32), "b": jnp.zeros((L, D), jnp.float32)}

    layers = {
        "ln_1": norm(),
        "attn": {
            "c_attn": {"w": normal((L, D, 3 * D), hidden_std), "b": jnp.zeros((L, 3 * D))},
            "c_proj": {"w": normal((L, D, D), proj_std), "b": jnp.zeros((L, D))},
        },
        "ln_2": norm(),
        "mlp": {
            "c_fc": {"w": normal((L, D, F), hidden_std), "b": jnp.zeros((L, F))},
            "c_proj": {"w": normal((L, F, D), proj_std), "b": jnp.zeros((L, D))},
        },
    }
    params = {"wte": normal((V, D), std), "wpe": normal((T, D), std), "h": layers}
    if cfg.norm == "pre":
        params["ln_f"] = {"g": jnp.ones((D,), jnp.float32), "b": jnp.zeros((D,), jnp.float32)}
    if cfg.arch == "bert":
        params.update(init_bert_params(cfg, jax.random.fold_in(key, 1)))
    return params


def init_bert_params(cfg: GPTConfig, key: jax.Array) -> Params:
    """BERT's parameters beside the shared stack (Devlin et al. 2019; the names of the
    Hugging Face classes in brackets): segment embeddings wtt (token_type_embeddings), the
    embedding LayerNorm ln_e, the pooler over [CLS], the MLM head (a dense + LayerNorm
    transform and an output bias; its weight is W_e, tied) and the NSP classifier
    (seq_relationship). Weights N(0, init_std), biases 0, gains 1, as BertPreTrainedModel.
    """
    D, V = cfg.n_embd, cfg.vocab_size
    keys = iter(jax.random.split(key, 4))

    def normal(shape):
        return cfg.init_std * jax.random.normal(next(keys), shape, jnp.float32)

    def linear(n_in, n_out):
        return {"w": normal((n_in, n_out)), "b": jnp.zeros((n_out,), jnp.float32)}

    def norm():
        return {"g": jnp.ones((D,), jnp.float32), "b": jnp.zeros((D,), jnp.float32)}

    return {
        "wtt": normal((cfg.type_vocab_size, D)),
        "ln_e": norm(),
        "pooler": linear(D, D),
        "mlm": {"dense": linear(D, D), "ln": norm(), "bias": jnp.zeros((V,), jnp.float32)},
        "nsp": linear(D, 2),
    }


def count_params(params: Params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------- pieces


def embed(params: Params, tokens: jax.Array, cfg: GPTConfig,
          positions: jax.Array | None = None, token_types: jax.Array | None = None
          ) -> jax.Array:
    """h_0 = U W_e + W_p: token rows plus learned position rows, (B, T) -> (B, T, D).

    `positions` (B, T) gives each token's position id; by default 0..T-1. Pass it
    for left-padded inputs so the first real token sits at position 0. BERT adds the
    segment rows wtt[token_types] (0 for sentence A, 1 for B; default all 0) and
    normalises the sum with ln_e.
    """
    if positions is None:
        positions = jnp.arange(tokens.shape[1])[None, :]
    h = params["wte"][tokens] + params["wpe"][positions]
    if cfg.arch == "bert":
        types = jnp.zeros_like(tokens) if token_types is None else token_types
        h = layer_norm(params["ln_e"], h + params["wtt"][types], cfg)
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
    """Multi-head self-attention, (B, T, D) -> (B, T, D): causal for GPT, bidirectional
    for BERT.

    key_mask (B, T) marks real (non-padding) tokens; rngs is (attention dropout key,
    residual dropout key) or None; banded layers see only the last cfg.attention_band
    positions.
    """
    B, T, D = x.shape
    qkv = dense(p["c_attn"], x, cfg).reshape(B, T, 3, cfg.n_head, cfg.head_size)
    qkv = mup.scale_queries(qkv, cfg)  # muP's 1/K attention; nothing under standard
    attn_rng, resid_rng = rngs if rngs is not None else (None, None)
    rate = cfg.attn_pdrop if attn_rng is not None else 0.0
    band = cfg.attention_band if banded else None
    # fast path, where a kernel serves this call (None where none does)
    causal = cfg.arch == "gpt"
    y = kernels.self_attention(qkv, cfg, band=band, key_mask=key_mask, dropout=rate > 0,
                               causal=causal)
    if y is None:
        if causal:
            mask = causal_mask(jnp.arange(T), jnp.arange(T), band)[None, None]
        else:  # BERT's encoder: every query sees every (real) key
            mask = jnp.ones((1, 1, T, T), bool)
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


def check_token_types(token_types, tokens, cfg: GPTConfig) -> None:
    """Raise ValueError for segment ids given to a GPT, of another shape than tokens, or
    outside [0, type_vocab_size) (checked on concrete arrays only, as check_inputs)."""
    if token_types is None:
        return
    if cfg.arch != "bert":
        raise ValueError(f"token_types are BERT's segment ids; arch={cfg.arch!r} has none")
    if tuple(token_types.shape) != tuple(tokens.shape):
        raise ValueError(f"token_types has shape {tuple(token_types.shape)}, tokens "
                         f"{tuple(tokens.shape)}: they must be equal")
    if isinstance(token_types, jax.core.Tracer):
        return
    arr = np.asarray(token_types)
    if arr.size and (arr.min() < 0 or arr.max() >= cfg.type_vocab_size):
        raise ValueError(f"token_types must lie in [0, {cfg.type_vocab_size}) "
                         f"(type_vocab_size), got range [{arr.min()}, {arr.max()}]")


def forward(params: Params, tokens: jax.Array, cfg: GPTConfig, train: bool = False,
            rng: jax.Array | None = None, *, positions: jax.Array | None = None,
            attention_mask: jax.Array | None = None, token_types: jax.Array | None = None
            ) -> jax.Array:
    """Final hidden states h_n, (B, T) int32 -> (B, T, D) in the compute dtype.

    Pre-LN models include the final ln_f. Dropout is applied only when
    train=True, and then needs `rng`. attention_mask (B, T) is 1/True at real
    tokens and 0 at padding: padding keys are ignored, so the outputs at real
    tokens equal those of the unpadded sequence (give `positions` for left pads).
    For BERT (cfg.arch="bert") every position attends to every real token, before
    and after it; token_types (B, T) are its segment ids (default 0). GPT has no
    segments: token_types raises ValueError there rather than being ignored.
    """
    check_inputs(tokens, cfg, positions)
    check_token_types(token_types, tokens, cfg)
    if train and rng is None and max(cfg.embd_pdrop, cfg.attn_pdrop, cfg.resid_pdrop) > 0:
        raise ValueError("forward(train=True) with dropout needs an rng key")
    rng = rng if train else None
    key_mask = None if attention_mask is None else attention_mask.astype(bool)
    x = embed(params, tokens, cfg, positions, token_types)
    x = dropout(x, cfg.embd_pdrop, None if rng is None else jax.random.fold_in(rng, 0))
    x = run_layers(params["h"], x, cfg, key_mask, rng)
    if cfg.norm == "pre":
        x = layer_norm(params["ln_f"], x, cfg)
    return x


# ----------------------------------------------------------------------------- logits, loss


def logits(params: Params, h: jax.Array, cfg: GPTConfig | None = None) -> jax.Array:
    """softmax's argument h_n W_e^T with the output tied to W_e: (B, T, D) -> (B, T, V) float32.

    Under muP it is h_n W_e^T / m, muP's output multiplier: pass the model's cfg wherever
    it may be muP (None means the standard parametrization).
    """
    h = mup.scale_readout(h, cfg)
    wte = params["wte"].astype(h.dtype)
    return jnp.einsum("BTD,VD->BTV", h, wte, preferred_element_type=jnp.float32)


def token_nll(params: Params, h: jax.Array, targets: jax.Array,
              cfg: GPTConfig | None = None) -> jax.Array:
    """-log P(target | h) per position, in float32: (B, T, D), (B, T) -> (B, T). cfg as
    for logits."""
    log_probs = jax.nn.log_softmax(logits(params, h, cfg), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def mean_nll(params: Params, h: jax.Array, targets: jax.Array,
             weights: jax.Array | None = None, *, cfg: GPTConfig | None = None) -> jax.Array:
    """The (weighted) mean of token_nll(params, h, targets) in float32: the mean over the
    weights' sum (0 if it is 0), or over all positions. cfg picks the kernel (None: the
    reference); the fast one never holds the (B, T, V) logits. cfg also gives muP's
    output multiplier (as for logits).
    """
    w = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(
        jnp.float32)
    if cfg is not None and kernels.plan(cfg).loss:  # fast path: chunked, one pass
        total = kernels.nll_sum(mup.scale_readout(h, cfg), params["wte"], targets,
                                jax.lax.stop_gradient(w))
    else:
        total = jnp.sum(w * token_nll(params, h, targets, cfg))
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
    if cfg.arch != "gpt":
        raise ValueError(f"lm_loss is the left-to-right language model's loss; arch="
                         f"{cfg.arch!r} sees both sides of each token (use bert_loss)")
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


# ----------------------------------------------------------------------------- BERT's heads

# The label of positions that are no prediction target (PyTorch's and HF's ignore_index).
IGNORE_INDEX = -100


def mlm_logits(params: Params, h: jax.Array, cfg: GPTConfig) -> jax.Array:
    """The masked-token head: LayerNorm(act(h W + b)) W_e^T + bias, (B, T, D) -> (B, T, V)
    in float32. The output weight is the token embedding W_e, as in GPT's logits."""
    p = params["mlm"]
    x = layer_norm(p["ln"], activation(cfg, dense(p["dense"], h, cfg)), cfg)
    wte = params["wte"].astype(x.dtype)
    z = jnp.einsum("BTD,VD->BTV", x, wte, preferred_element_type=jnp.float32)
    return z + p["bias"]


def pooled(params: Params, h: jax.Array, cfg: GPTConfig) -> jax.Array:
    """BERT's pooler: tanh(h[:, 0] W + b) over the first token ([CLS]), (B, T, D) -> (B, D)."""
    return jnp.tanh(dense(params["pooler"], h[:, 0], cfg))


def nsp_logits(params: Params, h: jax.Array, cfg: GPTConfig) -> jax.Array:
    """Next-sentence logits from the pooled [CLS], (B, T, D) -> (B, 2) float32:
    class 0 IsNext, 1 NotNext."""
    return dense(params["nsp"], pooled(params, h, cfg), cfg).astype(jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean -log softmax(logits)[label], accuracy of the argmax) over the labels that are
    not IGNORE_INDEX, both float32 and 0 where every label is ignored. logits (..., C),
    labels (...) int."""
    valid = labels != IGNORE_INDEX
    safe = jnp.where(valid, labels, 0)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    hits = jnp.argmax(logits, axis=-1) == safe
    count = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    return (jnp.where(valid, nll, 0.0).sum() / count,
            jnp.where(valid, hits, False).sum().astype(jnp.float32) / count)


def mlm_loss(params: Params, h: jax.Array, labels: jax.Array, cfg: GPTConfig) -> jax.Array:
    """Mean cross-entropy of mlm_logits at the positions whose label is not IGNORE_INDEX
    (0 if there are none), float32: (B, T, D), (B, T) -> ()."""
    return cross_entropy(mlm_logits(params, h, cfg), labels)[0]


def nsp_loss(params: Params, h: jax.Array, nsp_labels: jax.Array, cfg: GPTConfig
             ) -> jax.Array:
    """Mean cross-entropy of nsp_logits against nsp_labels (B,) (0 IsNext, 1 NotNext)."""
    return cross_entropy(nsp_logits(params, h, cfg), nsp_labels)[0]


def check_labels(labels, n_classes: int, where: str) -> None:
    """Raise ValueError for a concrete label outside [0, n_classes) and not IGNORE_INDEX:
    inside jit a wrong id would be read as a clamped one, silently."""
    if isinstance(labels, jax.core.Tracer):
        return
    arr = np.asarray(labels)
    bad = arr[(arr != IGNORE_INDEX) & ((arr < 0) | (arr >= n_classes))]
    if bad.size:
        raise ValueError(f"{where} has label {int(bad[0])}, outside [0, {n_classes}) and not "
                         f"the ignore index {IGNORE_INDEX}")


def bert_loss(params: Params, batch: dict, cfg: GPTConfig, *, train: bool = False,
              rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """BERT's pre-training loss, MLM + NSP (the total of HF's BertForPreTraining), and its
    metrics {mlm_loss, nsp_loss, mlm_accuracy (on the masked positions), nsp_accuracy}.

    batch is gptjax.data.mlm's dict: tokens, token_types, attention_mask (B, T),
    mlm_labels (B, T) (IGNORE_INDEX where nothing is predicted), nsp_labels (B,). As a
    train-step LossFn: lambda p, b, rng: bert_loss(p, b, cfg, train=True, rng=rng).
    """
    if cfg.arch != "bert":
        raise ValueError(f"bert_loss needs arch='bert', got {cfg.arch!r}")
    check_labels(batch["mlm_labels"], cfg.vocab_size, "mlm_labels")
    check_labels(batch["nsp_labels"], 2, "nsp_labels")
    h = forward(params, batch["tokens"], cfg, train, rng,
                attention_mask=batch["attention_mask"], token_types=batch["token_types"])
    mlm, mlm_accuracy = cross_entropy(mlm_logits(params, h, cfg), batch["mlm_labels"])
    nsp, nsp_accuracy = cross_entropy(nsp_logits(params, h, cfg), batch["nsp_labels"])
    metrics = {"mlm_loss": mlm, "nsp_loss": nsp, "mlm_accuracy": mlm_accuracy,
               "nsp_accuracy": nsp_accuracy}
    return mlm + nsp, metrics
