"""BERT's encoder in the shared core: its parameters, bidirectional attention (by
gradient), padding and segments, the heads and losses, the fast paths, and forward mode
against reverse mode. Parity with Hugging Face's BERT is test_bert_hf.py's job."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gptjax
from gptjax import kernels
from gptjax.config import GPTConfig
from gptjax.model import (
    IGNORE_INDEX,
    attend,
    bert_loss,
    embed,
    forward,
    init_params,
    mlm_logits,
    mlm_loss,
    nsp_logits,
    nsp_loss,
    pooled,
)

# Odd sizes, no dropout; scan and loop both covered across the tests.
BERT = GPTConfig(arch="bert", vocab_size=37, n_ctx=12, n_layer=2, n_head=3, n_embd=12,
                 norm="post", activation="gelu", layer_norm_epsilon=1e-12,
                 embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, scale_residual_init=False)
GPT = BERT.replace(arch="gpt")
# Compiled once per config: op-by-op dispatch would dominate these tests' time.
_forward = jax.jit(forward, static_argnums=2)
_bert_loss = jax.jit(bert_loss, static_argnums=2)


@functools.cache
def _perturbed(cfg, seed=0):
    """Parameters moved off the init (gains 1, biases 0), so no path is trivially simple."""

    @jax.jit
    def make(key):
        params = init_params(cfg, key)
        return jax.tree_util.tree_map(lambda x: x + 0.1 * jnp.sin(7 * x + 1), params)

    return make(jax.random.PRNGKey(seed))


def _batch(seed=0, B=3, T=9, cfg=BERT):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    types = np.zeros((B, T), np.int32)
    types[:, T // 2:] = 1
    mask = np.ones((B, T), np.int32)
    mask[1, T - 3:] = 0  # row 1: three pads
    labels = np.full((B, T), IGNORE_INDEX, np.int32)
    labels[:, 2] = tokens[:, 2]
    labels[0, 5] = tokens[0, 5]
    return {"tokens": jnp.asarray(tokens), "token_types": jnp.asarray(types),
            "attention_mask": jnp.asarray(mask), "mlm_labels": jnp.asarray(labels),
            "nsp_labels": jnp.asarray(np.array([0, 1, 1][:B], np.int32))}


def test_init_params_layout():
    cfg = BERT
    p = jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    D, V = cfg.n_embd, cfg.vocab_size
    shapes = jax.tree_util.tree_map(lambda a: a.shape, {k: v for k, v in p.items() if k != "h"})
    assert shapes == {
        "wte": (V, D), "wpe": (cfg.n_ctx, D), "wtt": (2, D),
        "ln_e": {"g": (D,), "b": (D,)},
        "pooler": {"w": (D, D), "b": (D,)},
        "mlm": {"dense": {"w": (D, D), "b": (D,)}, "ln": {"g": (D,), "b": (D,)}, "bias": (V,)},
        "nsp": {"w": (D, 2), "b": (2,)},
    }
    assert "ln_f" not in p  # post-LN: no final LayerNorm
    # the shared part is GPT's own draw: a BERT and a GPT of one size share it
    gpt = jax.jit(init_params, static_argnums=0)(GPT, jax.random.PRNGKey(0))
    for a, b in zip(jax.tree_util.tree_leaves((gpt["wte"], gpt["h"])),
                    jax.tree_util.tree_leaves((p["wte"], p["h"])), strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(jnp.std(p["wtt"])) == pytest.approx(cfg.init_std, rel=0.5)


@pytest.mark.parametrize("cfg, bidirectional", [(BERT, True), (GPT, False)],
                         ids=["bert", "gpt"])
def test_bidirectionality_by_gradient(cfg, bidirectional):
    """d h[t] / d W_p[s] (the input at position s alone): non-zero for every s with BERT;
    zero for every s > t with GPT and non-zero for s <= t."""
    params = _perturbed(cfg)
    tokens = _batch()["tokens"][:1]
    T = tokens.shape[1]

    # (T,): each position's output in a random direction (a plain sum over the width
    # would vanish: LayerNorm's output sums to a constant when its gains are equal)
    direction = jax.random.normal(jax.random.PRNGKey(5), (cfg.n_embd,))

    def out(wpe):
        return forward(dict(params, wpe=wpe), tokens, cfg)[0] @ direction

    jacobian = jax.jit(jax.jacrev(out))(params["wpe"])  # (T, n_ctx, D)
    for t in range(T):
        per_position = jnp.abs(jacobian[t]).sum(-1)[:T]
        assert bool(jnp.all(per_position[: t + 1] > 0))
        if bidirectional:
            assert bool(jnp.all(per_position[t + 1:] > 0))
        else:
            assert bool(jnp.all(per_position[t + 1:] == 0))


def test_padding_keys_are_ignored():
    """A padded row's outputs at its real tokens equal the unpadded row's, whatever the
    pads hold; attention_mask=None means all real."""
    cfg, params = BERT, _perturbed(BERT)
    b = _batch()
    real = 6
    short = _forward(params, b["tokens"][1:2, :real], cfg, token_types=b["token_types"][1:2, :real])
    for pad_id in (0, 5):
        tokens = b["tokens"][1:2].at[:, real:].set(pad_id)
        long = _forward(params, tokens, cfg, attention_mask=b["attention_mask"][1:2],
                       token_types=b["token_types"][1:2])
        np.testing.assert_allclose(long[:, :real], short, atol=1e-5)
    full = _forward(params, b["tokens"], cfg, attention_mask=jnp.ones_like(b["tokens"]))
    np.testing.assert_array_equal(full, _forward(params, b["tokens"], cfg))


def test_segments_and_embedding_layer_norm():
    """embed adds wtt[token_types] (default 0) and normalises the sum with ln_e."""
    cfg, params = BERT, _perturbed(BERT)
    b = _batch()
    x = embed(params, b["tokens"], cfg, token_types=b["token_types"])
    T = b["tokens"].shape[1]
    s = params["wte"][b["tokens"]] + params["wpe"][:T] + params["wtt"][b["token_types"]]
    mean, var = s.mean(-1, keepdims=True), s.var(-1, keepdims=True)
    want = (s - mean) / jnp.sqrt(var + cfg.layer_norm_epsilon) * params["ln_e"]["g"] + \
        params["ln_e"]["b"]
    np.testing.assert_allclose(x, want, atol=1e-5)
    np.testing.assert_array_equal(embed(params, b["tokens"], cfg),
                                  embed(params, b["tokens"], cfg,
                                        token_types=jnp.zeros_like(b["tokens"])))
    assert not np.allclose(_forward(params, b["tokens"], cfg),
                           _forward(params, b["tokens"], cfg, token_types=b["token_types"]))


def test_bad_inputs_raise():
    b = _batch()
    with pytest.raises(ValueError, match="arch='gpt' has none"):
        forward(_perturbed(GPT), b["tokens"], GPT, token_types=b["token_types"])
    params = _perturbed(BERT)
    with pytest.raises(ValueError, match=r"token_types must lie in \[0, 2\)"):
        forward(params, b["tokens"], BERT, token_types=b["token_types"] * 2)
    with pytest.raises(ValueError, match="token_types has shape"):
        forward(params, b["tokens"], BERT, token_types=b["token_types"][:, :3])
    with pytest.raises(ValueError, match="use bert_loss"):
        gptjax.lm_loss(params, b["tokens"], BERT)
    with pytest.raises(ValueError, match="mlm_labels has label 37"):
        bert_loss(params, dict(b, mlm_labels=b["mlm_labels"].at[0, 0].set(37)), BERT)
    with pytest.raises(ValueError, match="nsp_labels has label 2"):
        bert_loss(params, dict(b, nsp_labels=b["nsp_labels"].at[0].set(2)), BERT)
    with pytest.raises(ValueError, match="needs arch='bert'"):
        bert_loss(_perturbed(GPT), b, GPT)
    with pytest.raises(ValueError, match="attention_band"):
        BERT.replace(attention_band=4)


def test_heads_are_the_formulas():
    cfg, params = BERT, _perturbed(BERT)
    b = _batch()
    h = _forward(params, b["tokens"], cfg, attention_mask=b["attention_mask"],
                token_types=b["token_types"])
    m = params["mlm"]
    x = jax.nn.gelu(h @ m["dense"]["w"] + m["dense"]["b"], approximate=False)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    x = (x - mean) / jnp.sqrt(var + cfg.layer_norm_epsilon) * m["ln"]["g"] + m["ln"]["b"]
    z = mlm_logits(params, h, cfg)
    assert z.dtype == jnp.float32 and z.shape == b["tokens"].shape + (cfg.vocab_size,)
    np.testing.assert_allclose(z, x @ params["wte"].T + m["bias"], atol=1e-5)
    pool = jnp.tanh(h[:, 0] @ params["pooler"]["w"] + params["pooler"]["b"])
    np.testing.assert_allclose(pooled(params, h, cfg), pool, atol=1e-6)
    nsp = nsp_logits(params, h, cfg)
    assert nsp.dtype == jnp.float32 and nsp.shape == (3, 2)
    np.testing.assert_allclose(nsp, pool @ params["nsp"]["w"] + params["nsp"]["b"], atol=1e-6)


def test_losses_and_metrics():
    """Cross-entropy over the labelled positions only (optax's, as the reference), MLM +
    NSP total, accuracies, 0 when nothing is labelled."""
    cfg, params = BERT, _perturbed(BERT)
    b = _batch()
    loss, metrics = _bert_loss(params, b, cfg)
    h = _forward(params, b["tokens"], cfg, attention_mask=b["attention_mask"],
                token_types=b["token_types"])
    z = mlm_logits(params, h, cfg)
    labels = np.asarray(b["mlm_labels"])
    sel = labels != IGNORE_INDEX
    want = optax.softmax_cross_entropy_with_integer_labels(z[sel], labels[sel]).mean()
    np.testing.assert_allclose(metrics["mlm_loss"], want, rtol=1e-6)
    np.testing.assert_allclose(mlm_loss(params, h, b["mlm_labels"], cfg), want, rtol=1e-6)
    nsp = optax.softmax_cross_entropy_with_integer_labels(nsp_logits(params, h, cfg),
                                                          b["nsp_labels"]).mean()
    np.testing.assert_allclose(metrics["nsp_loss"], nsp, rtol=1e-6)
    np.testing.assert_allclose(nsp_loss(params, h, b["nsp_labels"], cfg), nsp, rtol=1e-6)
    np.testing.assert_allclose(loss, want + nsp, rtol=1e-6)
    hits = np.argmax(np.asarray(z)[sel], -1) == labels[sel]
    assert float(metrics["mlm_accuracy"]) == pytest.approx(hits.mean())
    nsp_hits = np.argmax(np.asarray(nsp_logits(params, h, cfg)), -1) == np.asarray(b["nsp_labels"])
    assert float(metrics["nsp_accuracy"]) == pytest.approx(nsp_hits.mean())
    # the labels at ignored positions do not matter, and none labelled gives 0
    assert float(mlm_loss(params, h, jnp.full_like(b["mlm_labels"], IGNORE_INDEX), cfg)) == 0.0
    grads = jax.grad(lambda hh: mlm_loss(params, hh, b["mlm_labels"], cfg))(h)
    unlabelled = np.asarray(grads)[~sel]
    assert np.all(unlabelled == 0) and np.any(np.asarray(grads)[sel] != 0)


def test_bert_loss_is_a_train_step_loss_fn():
    """Jitted, with dropout from the step's rng: deterministic per key, different across
    keys, and its gradient covers every parameter."""
    cfg = BERT.replace(embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1, scan_layers=False)
    params = _perturbed(cfg)
    b = _batch()
    loss_fn = jax.jit(jax.value_and_grad(
        lambda p, batch, rng: bert_loss(p, batch, cfg, train=True, rng=rng), has_aux=True))
    (l1, _), g1 = loss_fn(params, b, jax.random.PRNGKey(1))
    (l1b, _), _ = loss_fn(params, b, jax.random.PRNGKey(1))
    (l2, _), _ = loss_fn(params, b, jax.random.PRNGKey(2))
    assert float(l1) == float(l1b) and float(l1) != float(l2)
    for path, g in jax.tree_util.tree_leaves_with_path(g1):
        assert bool(jnp.all(jnp.isfinite(g))), path
        assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


def test_fast_kernels_equal_reference():
    """kernels="fast": on the CPU the blocked attention serves only causal layers, so BERT's
    attention falls back to model.attend, and LayerNorm, dense and the rest are the
    kernels; values and gradients equal the reference."""
    params, b = _perturbed(BERT), _batch()
    fast = BERT.replace(kernels="fast")

    def loss(p, cfg):
        return bert_loss(p, b, cfg)[0]

    step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    ref_l, ref_g = step(params, BERT)
    fast_l, fast_g = step(params, fast)
    np.testing.assert_allclose(fast_l, ref_l, rtol=1e-5)
    for a, c in zip(jax.tree_util.tree_leaves(fast_g), jax.tree_util.tree_leaves(ref_g),
                    strict=True):
        np.testing.assert_allclose(a, c, atol=1e-5)


@pytest.mark.parametrize("with_mask", [False, True])
def test_dot_product_kernel_bidirectional(with_mask):
    """The accelerators' path, jax.nn.dot_product_attention with causal=False (xla here),
    equals model.attend over the padding mask alone."""
    B, T, H, K = 2, 7, 3, 4
    qkv = jax.random.normal(jax.random.PRNGKey(0), (B, T, 3, H, K))
    key_mask = jnp.asarray(np.arange(T)[None, :] < np.array([[T], [4]])) if with_mask else None
    got = kernels.dot_product_attention(qkv, None, key_mask, 1 / np.sqrt(K), "xla",
                                        causal=False)
    mask = jnp.ones((1, 1, T, T), bool) if key_mask is None else key_mask[:, None, None, :]
    want = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # and self_attention routes BERT there off the CPU's blocked plan, to None on it
    assert kernels.self_attention(qkv, BERT.replace(kernels="fast"), band=None,
                                  key_mask=key_mask, dropout=False, causal=False) is None


def test_forward_mode_equals_reverse_mode():
    """jacfwd == jacrev of the MLM and NSP logits with respect to slices of the parameters
    (the segment table and the last layer's attention output bias), and jvp agrees with
    vjp on bert_loss: the same transformations compose as with GPT."""
    cfg, params, b = BERT, _perturbed(BERT), _batch(B=2, T=6)

    def heads(wtt, bias):
        c_proj = dict(params["h"]["attn"]["c_proj"],
                      b=params["h"]["attn"]["c_proj"]["b"].at[-1].set(bias))
        p = dict(params, wtt=wtt,
                 h=dict(params["h"], attn=dict(params["h"]["attn"], c_proj=c_proj)))
        h = forward(p, b["tokens"], cfg, attention_mask=b["attention_mask"],
                    token_types=b["token_types"])
        return mlm_logits(p, h, cfg), nsp_logits(p, h, cfg)

    args = (params["wtt"], params["h"]["attn"]["c_proj"]["b"][-1])
    fwd = jax.jit(jax.jacfwd(heads, argnums=(0, 1)))(*args)
    rev = jax.jit(jax.jacrev(heads, argnums=(0, 1)))(*args)
    for a, c in zip(jax.tree_util.tree_leaves(fwd), jax.tree_util.tree_leaves(rev),
                    strict=True):
        scale = float(jnp.abs(c).max())
        assert scale > 0
        np.testing.assert_allclose(a / scale, c / scale, atol=1e-5)

    def loss(p):
        return bert_loss(p, b, cfg)[0]

    tangent = jax.tree_util.tree_map(lambda x: 0.05 * jnp.cos(3 * x), params)
    _, jt = jax.jit(lambda p, t: jax.jvp(loss, (p,), (t,)))(params, tangent)
    grads = jax.jit(jax.grad(loss))(params)
    reverse = sum(jnp.vdot(g, t) for g, t in zip(jax.tree_util.tree_leaves(grads),
                                                  jax.tree_util.tree_leaves(tangent),
                                                  strict=True))
    np.testing.assert_allclose(float(jt), float(reverse), rtol=1e-4)


def test_scan_equals_loop_and_public_api():
    params, b = _perturbed(BERT), _batch()
    kwargs = dict(attention_mask=b["attention_mask"], token_types=b["token_types"])
    np.testing.assert_allclose(_forward(params, b["tokens"], BERT.replace(scan_layers=False),
                                       **kwargs),
                               _forward(params, b["tokens"], BERT, **kwargs), atol=1e-5)
    for name in ("mlm_logits", "nsp_logits", "pooled", "mlm_loss", "nsp_loss", "bert_loss"):
        assert getattr(gptjax, name) is getattr(gptjax.model, name)
    for name in ("bert-base", "bert-large", "bert-cpu-small", "bert-tiny"):
        cfg = gptjax.preset(name)
        shapes = jax.eval_shape(lambda cfg=cfg: init_params(cfg, jax.random.PRNGKey(0)))
        assert shapes["wtt"].shape == (cfg.type_vocab_size, cfg.n_embd)
