"""Autoregressive decoding with a KV cache: greedy, temperature, top-k and nucleus sampling.

    tokens = generate(params, cfg, prompt, max_new_tokens, rng=key, temperature=0.8, top_p=0.9)

One call is a prefill of the whole prompt (T0 tokens at once) and then one token at a time
from a fixed-size cache of T0 + max_new_tokens slots, the loop compiled as a single
`jax.lax.while_loop`. Both run `_cached_block` (model.block with a KV cache, built from the
model's pieces: this is the library's only cached forward pass) layer by layer over weights
sliced out of the stacked parameters once per call (see `_decode_layout`: a step that slices
them itself is an order of magnitude slower on a CPU). The jitted
program depends only on the shapes and on the static settings (cfg, max_new_tokens, top_k,
greedy or not, top-p on or off); temperature, top_p, the seed and the stop tokens are
traced values, so changing them does not recompile.

Prompts of different lengths are LEFT-padded inside, so that every row's last prompt token
sits at the same cache slot and all rows decode in lock step: row b with p_b padding slots
has position id `slot - p_b` (GPT's learned positions start at 0 at its first real token)
and its padding slots are masked out as keys. The prompt length is rounded up to a multiple
of `PROMPT_BUCKET` when the context allows, so prompts of similar length share one compiled
program; padding is masked, so the result does not depend on it.

Decoding never goes past the context: prompt length + max_new_tokens > n_ctx is a
ValueError (GPT's learned position table has n_ctx rows; there is no sliding window).

`stream` yields the same tokens one step at a time (for the sampler CLI): same seed, same
tokens as `generate`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import mup
from gptjax.config import GPTConfig
from gptjax.model import Params, attend, causal_mask, dense, embed, layer_norm, logits, mlp

# Prompt lengths are rounded up to a multiple of this (when n_ctx allows) to share compiles.
PROMPT_BUCKET = 16


# ----------------------------------------------------------------------------- sampling


def filter_logits(
    z: jax.Array, *, top_k: int | None = None, top_p: float | jax.Array | None = None
) -> jax.Array:
    """Set the logits of tokens outside the top-k / nucleus sets to -inf: (..., V) -> (..., V).

    top_k keeps the k largest logits (ties with the k-th value are kept too). top_p keeps the
    smallest set of most likely tokens whose probability mass reaches top_p, computed on the
    distribution left after top-k (the order Hugging Face applies them in); the most likely
    token is always kept. Apply the temperature before calling this: it changes the nucleus.
    """
    neg_inf = jnp.array(-jnp.inf, z.dtype)
    if top_k is not None and top_k < z.shape[-1]:
        kth = jax.lax.top_k(z, top_k)[0][..., -1:]
        z = jnp.where(z >= kth, z, neg_inf)
    if top_p is not None:
        descending = -jnp.sort(-z, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: 0 < top_p
        threshold = jnp.take_along_axis(descending, n_keep - 1, axis=-1)
        z = jnp.where(z >= threshold, z, neg_inf)
    return z


def _sample(z, key, temperature, top_p, *, top_k, greedy, use_top_p):
    """One token per row from float32 logits z (B, V); the static flags pick the program."""
    if greedy:
        return jnp.argmax(z, axis=-1).astype(jnp.int32)
    z = filter_logits(z / temperature, top_k=top_k, top_p=top_p if use_top_p else None)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


_sample_jit = jax.jit(_sample, static_argnames=("top_k", "greedy", "use_top_p"))


def sample_logits(
    z: jax.Array,
    key: jax.Array | None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Draw one token per row from logits z (B, V) -> int32 (B,).

    temperature 0 is greedy (argmax; `key` may be None). Otherwise the logits are divided
    by the temperature, filtered by `filter_logits`, and sampled. The settings are checked
    like `generate`'s.
    """
    _check_sampling(temperature, top_k, top_p)
    greedy, use_top_p = temperature == 0, top_p is not None and top_p < 1.0
    return _sample_jit(jnp.asarray(z, jnp.float32), key, jnp.float32(temperature or 1.0),
                       jnp.float32(top_p or 1.0), top_k=_clip_top_k(top_k, z.shape[-1]),
                       greedy=greedy, use_top_p=use_top_p)


# ----------------------------------------------------------------------------- the decoder


@functools.partial(jax.jit, static_argnames=("cfg",))
def _decode_layout(params: Params, cfg: GPTConfig) -> dict:
    """The parameters rearranged for decoding: one dict per layer, matrices in the compute dtype.

    model.forward reads the layers from stacked (L, ...) arrays; inside a compiled decoding
    step XLA then copies each layer's weights out of the stack at every step (on a CPU an
    order of magnitude slower per token). Slicing the layers once per call, before the
    loop, removes that copy. The weight matrices (and the output
    embedding) are cast to the compute dtype here once instead of at every use, which
    `model.dense` and `model.logits` would do with the same result; LayerNorm parameters,
    biases and the input embeddings are left as they are, so the numbers are those of
    `model.forward`. Holds one copy of the weights while a decode runs.
    """
    dtype = jnp.dtype(cfg.dtype)

    def cast(path, a):
        return a.astype(dtype) if path[-1].key == "w" else a

    stacked = jax.tree_util.tree_map_with_path(cast, params["h"])
    return {
        "embed": {"wte": params["wte"], "wpe": params["wpe"]},
        "layers": [jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
                   for i in range(cfg.n_layer)],
        "ln_f": params.get("ln_f"),
        "unembed": {"wte": params["wte"].astype(dtype)},
    }


def _cached_block(p, x, cfg, banded, key_mask, cache, index):
    """model.block over T new tokens with a KV cache: their keys and values are written at
    slots index..index + T - 1 of cache = (k, v), each (B, S, H, K), and the queries attend
    to the real (key_mask (B, S)) slots at or before their own, within the band of a banded
    layer. Returns (x (B, T, D), the updated cache)."""

    def self_attention(x):
        B, T, D = x.shape
        qkv = dense(p["attn"]["c_attn"], x, cfg).reshape(B, T, 3, cfg.n_head, cfg.head_size)
        qkv = mup.scale_queries(qkv, cfg)  # as model.attention
        k, v = (jax.lax.dynamic_update_slice_in_dim(c, qkv[:, :, i].astype(c.dtype), index,
                                                    axis=1) for i, c in zip((1, 2), cache))
        band = cfg.attention_band if banded else None
        mask = causal_mask(index + jnp.arange(T), jnp.arange(k.shape[1]), band)[None, None]
        y = attend(qkv[:, :, 0], k.astype(x.dtype), v.astype(x.dtype),
                   mask & key_mask[:, None, None, :])
        return dense(p["attn"]["c_proj"], y.reshape(B, T, D), cfg), (k, v)

    if cfg.norm == "post":
        a, cache = self_attention(x)
        x = layer_norm(p["ln_1"], x + a, cfg)
        return layer_norm(p["ln_2"], x + mlp(p["mlp"], x, cfg), cfg), cache
    a, cache = self_attention(layer_norm(p["ln_1"], x, cfg))
    x = x + a
    return x + mlp(p["mlp"], layer_norm(p["ln_2"], x, cfg), cfg), cache


def _forward_cached(layout, tokens, cfg, caches, cache_index, positions, key_mask):
    """model.forward through `_cached_block` over the decode layout, one (k, v) cache per
    layer; returns the float32 logits (B, V) of the last position and the updated caches."""
    x = embed(layout["embed"], tokens, cfg, positions)
    new_caches = []
    for i, (p, cache) in enumerate(zip(layout["layers"], caches, strict=True)):
        x, cache = _cached_block(p, x, cfg, cfg.layer_is_banded(i), key_mask, cache,
                                 cache_index)
        new_caches.append(cache)
    if cfg.norm == "pre":
        x = layer_norm(layout["ln_f"], x, cfg)
    return logits(layout["unembed"], x[:, -1:], cfg)[:, 0], new_caches


def _prefill(layout, tokens, pad_counts, cfg, cache_length):
    """Run the (left-padded) prompt through the model into fresh caches.

    Returns (float32 logits of the last prompt slot (B, V), caches, key_mask (B, S)). The
    key mask is fixed for the whole decode: every slot from a row's first real token on
    holds a real token once written, and causality hides the slots not yet written.
    """
    B, T0 = tokens.shape
    slots = jnp.arange(cache_length)
    key_mask = slots[None, :] >= pad_counts[:, None]
    positions = jnp.maximum(slots[None, :T0] - pad_counts[:, None], 0)
    empty = jnp.zeros((B, cache_length, cfg.n_head, cfg.head_size), jnp.dtype(cfg.dtype))
    caches = [(empty, empty)] * cfg.n_layer
    z, caches = _forward_cached(layout, tokens, cfg, caches, jnp.int32(0), positions, key_mask)
    return z, caches, key_mask


def _step(layout, caches, token, slot, pad_counts, key_mask, cfg):
    """Feed token (B,) at cache slot `slot`; returns (float32 logits (B, V) of the next, caches)."""
    positions = (slot - pad_counts)[:, None]
    return _forward_cached(layout, token[:, None], cfg, caches, slot, positions, key_mask)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "max_new_tokens", "top_k", "greedy", "use_top_p", "return_logits"),
)
def _generate_jit(layout, tokens, pad_counts, rng, temperature, top_p, stop_tokens, *, cfg,
                  max_new_tokens, top_k, greedy, use_top_p, return_logits):
    B, T0 = tokens.shape
    N = max_new_tokens
    sample = functools.partial(_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                               greedy=greedy, use_top_p=use_top_p)
    has_stop = stop_tokens.shape[0] > 0

    def emit(state, i, z):
        """Sample step i's token from z and record it; rows already stopped repeat their stop."""
        out, zs, done, fill = state
        token = sample(z, jax.random.fold_in(rng, i))
        token = jnp.where(done, fill, token)
        out = out.at[:, i].set(token)
        if return_logits:
            zs = zs.at[:, i].set(z)
        if has_stop:
            stopped = jnp.any(token[:, None] == stop_tokens[None, :], axis=-1)
            fill = jnp.where(stopped & ~done, token, fill)
            done = done | stopped
        return (out, zs, done, fill), token

    z, cache, key_mask = _prefill(layout, tokens, pad_counts, cfg, T0 + N)
    zs = jnp.zeros((B, N, cfg.vocab_size) if return_logits else (0,), jnp.float32)
    state = (jnp.zeros((B, N), jnp.int32), zs, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32))
    state, token = emit(state, 0, z)

    def cond(carry):
        i, _, _, state = carry
        return (i < N) & ~jnp.all(state[2])

    def body(carry):
        i, cache, token, state = carry
        z, cache = _step(layout, cache, token, T0 + i - 1, pad_counts, key_mask, cfg)
        state, token = emit(state, i, z)
        return i + 1, cache, token, state

    i, _, _, state = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, token, state))
    out, zs, _, fill = state
    # Stopping early leaves the tail unwritten; every row has stopped, so it is `fill`.
    out = jnp.where(jnp.arange(N)[None, :] >= i, fill[:, None], out)
    return out, zs


def generate(
    params: Params,
    cfg: GPTConfig,
    prompt: Any,
    max_new_tokens: int,
    *,
    rng: jax.Array | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    prompt_lengths: Any = None,
    return_logits: bool = False,
):
    """Continue each prompt by `max_new_tokens` tokens: returns int32 (B, max_new_tokens).

    prompt: int (B, T0) array, right-padded when `prompt_lengths` (B,) gives each row's
    real length (the ids past it are ignored); or a list of B token lists of any lengths;
    or one token list (B = 1). rng: a PRNG key (may be None when temperature is 0).
    temperature: 0 is greedy decoding; otherwise logits are divided by it. top_k, top_p:
    sample only from the k most likely tokens / the nucleus of mass top_p (see
    `filter_logits`). Step i draws with `jax.random.fold_in(rng, i)`, so the same key gives
    the same tokens.

    stop_tokens: ids that end a row. The stop token is part of the output; every position
    after a row's first stop token holds that same stop token, and decoding ends early once
    every row has stopped. `generated_lengths` gives each row's length up to and including
    its stop token.

    return_logits: also return the float32 logits (B, max_new_tokens, V) that each token
    was drawn from (before temperature and filtering; zeros after decoding ended early).

    Raises ValueError for an empty prompt, ids outside [0, vocab_size), a prompt plus
    max_new_tokens longer than the context n_ctx, temperature < 0, top_k < 1, or top_p
    outside (0, 1].

    Example: prompt [[5, 6, 7], [8]] and max_new_tokens 4 decode both rows together; row 1
    sees only [8] (its three padding slots are masked), at positions 0, 1, ...
    """
    tokens, pad_counts, stops, traced, static = _prepare(
        "generate", cfg, prompt, prompt_lengths, max_new_tokens, rng, temperature, top_k, top_p,
        stop_tokens)
    B = tokens.shape[0]
    if max_new_tokens == 0:
        empty = jnp.zeros((B, 0), jnp.int32)
        return (empty, jnp.zeros((B, 0, cfg.vocab_size), jnp.float32)) if return_logits else empty
    out, zs = _generate_jit(_decode_layout(params, cfg), tokens, pad_counts, *traced, stops,
                            cfg=cfg, max_new_tokens=max_new_tokens, return_logits=return_logits,
                            **static)
    return (out, zs) if return_logits else out


def generated_lengths(tokens: Any, stop_tokens: Sequence[int] | None) -> np.ndarray:
    """Per row of `generate`'s output: tokens up to and including the first stop token.

    (B, N) -> int (B,); a row without a stop token has length N.
    """
    tokens = np.asarray(tokens)
    if not stop_tokens:
        return np.full(tokens.shape[0], tokens.shape[1], np.int64)
    is_stop = np.isin(tokens, np.asarray(list(stop_tokens)))
    first = np.where(is_stop.any(axis=1), is_stop.argmax(axis=1) + 1, tokens.shape[1])
    return first.astype(np.int64)


# ----------------------------------------------------------------------------- streaming


@functools.partial(jax.jit, static_argnames=("cfg", "cache_length", "top_k", "greedy",
                                              "use_top_p"))
def _stream_prefill(layout, tokens, pad_counts, rng, temperature, top_p, *, cfg, cache_length,
                    top_k, greedy, use_top_p):
    z, cache, key_mask = _prefill(layout, tokens, pad_counts, cfg, cache_length)
    token = _sample(z, jax.random.fold_in(rng, 0), temperature, top_p, top_k=top_k,
                    greedy=greedy, use_top_p=use_top_p)
    return token, cache, key_mask


@functools.partial(jax.jit, static_argnames=("cfg", "top_k", "greedy", "use_top_p"),
                   donate_argnames=("cache",))
def _stream_step(layout, cache, token, slot, step, pad_counts, key_mask, rng, temperature,
                 top_p, *, cfg, top_k, greedy, use_top_p):
    z, cache = _step(layout, cache, token, slot, pad_counts, key_mask, cfg)
    token = _sample(z, jax.random.fold_in(rng, step), temperature, top_p, top_k=top_k,
                    greedy=greedy, use_top_p=use_top_p)
    return token, cache


def stream(
    params: Params,
    cfg: GPTConfig,
    prompt: Any,
    max_new_tokens: int,
    *,
    rng: jax.Array | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    prompt_lengths: Any = None,
) -> Iterator[Any]:
    """Yield the new tokens one decoding step at a time, as `generate` would produce them.

    Arguments and checks are `generate`'s (they are checked before the first token is
    asked for). For a single token-list prompt each item is an int; otherwise an int32
    array (B,) per step. Stops after max_new_tokens steps, or once every row has emitted a
    stop token (that step is yielded; rows that stopped earlier repeat their stop token).
    """
    prepared = _prepare("stream", cfg, prompt, prompt_lengths, max_new_tokens, rng,
                        temperature, top_k, top_p, stop_tokens)
    return _stream(params, cfg, max_new_tokens, _is_token_list(prompt), *prepared)


def _stream(params, cfg, max_new_tokens, single, tokens, pad_counts, stops, traced, static):
    if max_new_tokens == 0:
        return
    layout = _decode_layout(params, cfg)
    B, T0 = tokens.shape
    token, cache, key_mask = _stream_prefill(layout, tokens, pad_counts, *traced, cfg=cfg,
                                             cache_length=T0 + max_new_tokens, **static)
    stops = np.asarray(stops)
    done = np.zeros(B, bool)
    fill = np.zeros(B, np.int32)
    for i in range(max_new_tokens):
        if i > 0:  # feed the previous step's token (a stopped row's repeated stop token)
            token, cache = _stream_step(layout, cache, jnp.asarray(token), jnp.int32(T0 + i - 1),
                                        jnp.int32(i), pad_counts, key_mask, *traced, cfg=cfg,
                                        **static)
        token = np.where(done, fill, np.asarray(token)).astype(np.int32)
        yield int(token[0]) if single else token
        stopped = np.isin(token, stops)
        fill = np.where(stopped & ~done, token, fill)
        done |= stopped
        if done.all():
            return


# ----------------------------------------------------------------------------- input checks


def _prepare(who, cfg, prompt, prompt_lengths, max_new_tokens, rng, temperature, top_k, top_p,
             stop_tokens):
    """Check everything and lay the prompt out: (left-padded tokens (B, T0), pad counts (B,),
    stop ids, the traced settings (rng, temperature, top_p), the static ones)."""
    if cfg.arch != "gpt":
        raise ValueError(f"{who}() continues text left to right; arch={cfg.arch!r} reads "
                         "both sides of each token and does not generate (gptjax.fill_mask "
                         "predicts its masked tokens)")
    tokens, lengths = _prompt_array(prompt, prompt_lengths)
    _check_sampling(temperature, top_k, top_p)
    stops = _stop_array(stop_tokens, cfg)
    if rng is None and temperature != 0:
        raise ValueError(f"{who}() needs an rng key unless temperature=0 (greedy)")
    tokens, pad_counts = _left_pad(tokens, lengths, cfg, max_new_tokens)
    traced = (rng if rng is not None else jax.random.PRNGKey(0),
              jnp.float32(temperature or 1.0), jnp.float32(top_p or 1.0))
    static = dict(top_k=_clip_top_k(top_k, cfg.vocab_size), greedy=temperature == 0,
                  use_top_p=top_p is not None and top_p < 1.0)
    return jnp.asarray(tokens), jnp.asarray(pad_counts), jnp.asarray(stops), traced, static


def _is_token_list(prompt) -> bool:
    if isinstance(prompt, (list, tuple)):
        return len(prompt) > 0 and all(isinstance(t, (int, np.integer)) for t in prompt)
    return isinstance(prompt, (np.ndarray, jax.Array)) and prompt.ndim == 1


def _prompt_array(prompt, prompt_lengths) -> tuple[np.ndarray, np.ndarray]:
    """Any accepted prompt form -> (right-padded int array (B, T0), lengths (B,)), checked."""
    if _is_token_list(prompt):
        prompt = [list(np.asarray(prompt).tolist())]
    if isinstance(prompt, (list, tuple)):
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths goes with a (B, T0) array prompt, not with lists")
        rows = [np.asarray(row) for row in prompt]
        if not rows:
            raise ValueError("empty prompt: no rows")
        for b, row in enumerate(rows):
            if row.ndim != 1 or row.size == 0:
                raise ValueError(f"empty prompt: row {b} has no tokens (give at least one, "
                                 "e.g. the <eos> / <|endoftext|> id for unconditional samples)")
            if not np.issubdtype(row.dtype, np.integer):
                raise ValueError(f"prompt row {b} must hold integer ids, got dtype {row.dtype}")
        lengths = np.array([row.size for row in rows], np.int32)
        tokens = np.zeros((len(rows), lengths.max()), np.int64)
        for b, row in enumerate(rows):
            tokens[b, : row.size] = row
        return tokens, lengths
    tokens = np.asarray(prompt)
    if tokens.ndim != 2:
        raise ValueError(f"prompt must be (B, T0) ids or lists of ids, got shape {tokens.shape}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"empty prompt: shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"prompt must hold integer ids, got dtype {tokens.dtype}")
    if prompt_lengths is None:
        lengths = np.full(tokens.shape[0], tokens.shape[1], np.int32)
    else:
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (tokens.shape[0],) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"prompt_lengths must be {tokens.shape[0]} ints, got {lengths!r}")
        if lengths.min() < 1 or lengths.max() > tokens.shape[1]:
            raise ValueError(f"prompt_lengths must lie in [1, {tokens.shape[1]}] (an empty "
                             f"prompt cannot be continued), got {lengths.tolist()}")
    # Only the real tokens are checked: ids past a row's length are ignored padding.
    real = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return np.where(real, tokens, 0), lengths.astype(np.int32)


def _left_pad(tokens, lengths, cfg: GPTConfig, max_new_tokens) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (B, T) -> left-padded (B, T0) int32 with T0 bucketed, and pad counts (B,)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    longest = int(lengths.max())
    if longest + max_new_tokens > cfg.n_ctx:
        raise ValueError(
            f"decoding past the context: a prompt of {longest} tokens plus max_new_tokens="
            f"{max_new_tokens} is {longest + max_new_tokens} positions, more than n_ctx="
            f"{cfg.n_ctx}; shorten the prompt (keep its last {cfg.n_ctx - max_new_tokens} "
            "tokens) or ask for fewer tokens"
        )
    _check_ids(tokens, lengths, cfg)
    bucketed = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
    T0 = max(longest, min(bucketed, cfg.n_ctx - max_new_tokens))
    B = tokens.shape[0]
    out = np.zeros((B, T0), np.int32)
    for b in range(B):
        out[b, T0 - lengths[b]:] = tokens[b, : lengths[b]]
    return out, (T0 - lengths).astype(np.int32)


def _check_ids(tokens, lengths, cfg: GPTConfig) -> None:
    """Ids are checked on the host: inside jit an id >= vocab_size would be clamped silently."""
    bad = (tokens < 0) | (tokens >= cfg.vocab_size)
    bad &= np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    if bad.any():
        b, t = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"prompt has id {int(tokens[b, t])} at row {b}, index {t}, outside "
                         f"[0, {cfg.vocab_size}) (vocab_size={cfg.vocab_size})")


def _check_sampling(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), "
                         f"got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")


def _clip_top_k(top_k, vocab_size):
    return None if top_k is None or top_k >= vocab_size else int(top_k)


def _stop_array(stop_tokens, cfg: GPTConfig) -> np.ndarray:
    stops = np.asarray(list(stop_tokens) if stop_tokens is not None else [], np.int64)
    if stops.ndim != 1:
        raise ValueError(f"stop_tokens must be a flat list of ids, got {stop_tokens!r}")
    if stops.size and (stops.min() < 0 or stops.max() >= cfg.vocab_size):
        raise ValueError(f"stop_tokens {stops.tolist()} must lie in [0, {cfg.vocab_size})")
    return stops.astype(np.int32)
