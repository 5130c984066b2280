"""Invariants of the functional core: shapes, causality, tied logits, loop == scan, dropout
(each with the reference formulas and with the fast kernels)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptjax
from gptjax import model as M
from gptjax.config import GPTConfig, preset

jax.config.update("jax_default_matmul_precision", "highest")

SMALL = GPTConfig(vocab_size=97, n_ctx=24, n_layer=3, n_head=4, n_embd=32)


def tokens_for(cfg, B=2, T=16, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, cfg.vocab_size)


@pytest.fixture(params=[("post", "reference"), ("pre", "reference"), ("post", "fast"),
                        ("pre", "fast")], ids=lambda p: "-".join(p))
def cfg(request):
    """GPT-1 and GPT-2 blocks, each with model.py's formulas and with the fast kernels."""
    norm, kernels = request.param
    return SMALL.replace(norm=norm, kernels=kernels)


# For what no kernel changes: GPT-1 and GPT-2 blocks with the reference formulas only.
reference_only = pytest.mark.parametrize(
    "cfg", [SMALL.replace(norm="post"), SMALL.replace(norm="pre")], ids=["post", "pre"])


@reference_only
def test_shapes_and_finite(cfg):
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    toks = tokens_for(cfg)
    h = gptjax.forward(params, toks, cfg)
    assert h.shape == (2, 16, cfg.n_embd)
    z = gptjax.logits(params, h)
    assert z.shape == (2, 16, cfg.vocab_size) and z.dtype == jnp.float32
    assert np.isfinite(np.asarray(z)).all()
    loss = gptjax.lm_loss(params, toks, cfg)
    assert loss.shape == () and abs(float(loss) - np.log(cfg.vocab_size)) < 0.5
    assert ("ln_f" in params) == (cfg.norm == "pre")


def test_causality_by_gradient(cfg):
    """d h[:, t] / d embedding[:, s] is zero for every s > t."""
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    toks = tokens_for(cfg, B=1, T=10)
    t = 4

    def out_at_t(x0):
        return M.run_layers(params["h"], x0, cfg)[0, t].sum()

    x0 = M.embed(params, toks, cfg)
    g = jax.grad(out_at_t)(x0)
    per_pos = np.abs(np.asarray(g[0])).sum(-1)
    assert (per_pos[t + 1:] == 0).all()
    assert (per_pos[: t + 1] > 0).all()


def test_changing_future_tokens_does_not_change_past(cfg):
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    toks = tokens_for(cfg, B=1, T=12)
    other = toks.at[0, 8:].set((toks[0, 8:] + 1) % cfg.vocab_size)
    a, b = gptjax.forward(params, toks, cfg), gptjax.forward(params, other, cfg)
    np.testing.assert_array_equal(np.asarray(a[0, :8]), np.asarray(b[0, :8]))
    assert not np.allclose(np.asarray(a[0, 8:]), np.asarray(b[0, 8:]))


@reference_only
def test_logits_are_tied_to_wte(cfg):
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    h = gptjax.forward(params, tokens_for(cfg), cfg)
    expected = np.asarray(h) @ np.asarray(params["wte"]).T
    np.testing.assert_allclose(np.asarray(gptjax.logits(params, h)), expected, atol=1e-5)


@pytest.mark.parametrize("band", [None, 4])
def test_loop_equals_scan(cfg, band):
    c = cfg.replace(attention_band=band)
    params = gptjax.init_params(c, jax.random.PRNGKey(0))
    toks = tokens_for(c)
    a = gptjax.forward(params, toks, c.replace(scan_layers=True))
    b = gptjax.forward(params, toks, c.replace(scan_layers=False))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # also with dropout on: the same per-layer keys either way
    rng = jax.random.PRNGKey(3)
    a = gptjax.forward(params, toks, c.replace(scan_layers=True), train=True, rng=rng)
    b = gptjax.forward(params, toks, c.replace(scan_layers=False), train=True, rng=rng)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_remat_gives_same_gradients(cfg):
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    toks = tokens_for(cfg)
    g1 = jax.grad(gptjax.lm_loss)(params, toks, cfg)
    g2 = jax.grad(gptjax.lm_loss)(params, toks, cfg.replace(remat=True))
    for x, y in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


@reference_only
def test_dropout_off_deterministic_on_rng_dependent(cfg):
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    toks = tokens_for(cfg)
    a = gptjax.forward(params, toks, cfg)
    b = gptjax.forward(params, toks, cfg, train=False, rng=jax.random.PRNGKey(5))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = gptjax.forward(params, toks, cfg, train=True, rng=jax.random.PRNGKey(1))
    d = gptjax.forward(params, toks, cfg, train=True, rng=jax.random.PRNGKey(1))
    e = gptjax.forward(params, toks, cfg, train=True, rng=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(np.asarray(c), np.asarray(d))
    assert not np.allclose(np.asarray(c), np.asarray(e))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    with pytest.raises(ValueError, match="needs an rng"):
        gptjax.forward(params, toks, cfg, train=True)


def test_jit_grad_vmap_apply_directly(cfg):
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    toks = tokens_for(cfg, B=4)
    loss = jax.jit(gptjax.lm_loss, static_argnums=2)(params, toks, cfg)
    np.testing.assert_allclose(float(loss), float(gptjax.lm_loss(params, toks, cfg)), rtol=1e-6)
    grads = jax.jit(jax.grad(gptjax.lm_loss), static_argnums=2)(params, toks, cfg)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    per_example = jax.vmap(lambda t: gptjax.lm_loss(params, t[None], cfg))(toks)
    np.testing.assert_allclose(float(per_example.mean()), float(loss), rtol=1e-5)


def test_lm_loss_matches_manual_and_weights(cfg):
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    toks = tokens_for(cfg)
    z = np.asarray(gptjax.logits(params, gptjax.forward(params, toks, cfg)), np.float64)
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(
        -1, keepdims=True)
    t = np.asarray(toks)
    nll = -np.take_along_axis(logp[:, :-1], t[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(float(gptjax.lm_loss(params, toks, cfg)), nll.mean(), rtol=1e-5)
    w = np.zeros(t.shape, np.float32)
    w[:, 5:9] = 1
    got = float(gptjax.lm_loss(params, toks, cfg, weights=jnp.asarray(w)))
    np.testing.assert_allclose(got, nll[:, 4:8].mean(), rtol=1e-5)
    # a window of n_ctx + 1 tokens is accepted: the model reads the first n_ctx
    full = tokens_for(cfg, T=cfg.n_ctx + 1)
    assert np.isfinite(float(gptjax.lm_loss(params, full, cfg)))


def test_padding_mask_right_and_left(cfg):
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    toks = tokens_for(cfg, B=1, T=7)
    ref = np.asarray(gptjax.forward(params, toks, cfg))
    pad = 3
    right = jnp.concatenate([toks, jnp.zeros((1, pad), toks.dtype)], 1)
    mask = jnp.concatenate([jnp.ones((1, 7)), jnp.zeros((1, pad))], 1)
    h = gptjax.forward(params, right, cfg, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(h[:, :7]), ref, atol=1e-5)
    left = jnp.concatenate([jnp.zeros((1, pad), toks.dtype), toks], 1)
    mask = jnp.concatenate([jnp.zeros((1, pad)), jnp.ones((1, 7))], 1)
    positions = jnp.maximum(jnp.arange(7 + pad) - pad, 0)[None]
    h = gptjax.forward(params, left, cfg, positions=positions, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(h[:, pad:]), ref, atol=1e-5)


def test_banded_layers_equal_dense_when_band_covers_context(cfg):
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    toks = tokens_for(cfg)
    dense = gptjax.forward(params, toks, cfg)
    wide = gptjax.forward(params, toks, cfg.replace(attention_band=cfg.n_ctx))
    np.testing.assert_allclose(np.asarray(wide), np.asarray(dense), atol=1e-6)
    narrow = gptjax.forward(params, toks, cfg.replace(attention_band=2))
    assert not np.allclose(np.asarray(narrow), np.asarray(dense))


def test_init_statistics():
    cfg = preset("gpt2").replace(n_layer=2, vocab_size=1000)
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    assert abs(float(params["wte"].std()) - 0.02) < 1e-3
    fc = float(params["h"]["mlp"]["c_fc"]["w"].std())
    proj = float(params["h"]["mlp"]["c_proj"]["w"].std())
    assert abs(fc - 0.02) < 1e-3
    assert abs(proj - 0.02 / np.sqrt(2 * cfg.n_layer)) < 1e-3
    post = gptjax.init_params(cfg.replace(norm="post"), jax.random.PRNGKey(0))
    assert abs(float(post["h"]["mlp"]["c_proj"]["w"].std()) - 0.02) < 1e-3
    assert float(params["h"]["ln_1"]["g"].min()) == 1.0
    assert float(jnp.abs(params["h"]["attn"]["c_attn"]["b"]).max()) == 0.0


def test_bfloat16_compute_keeps_float32_params():
    cfg = SMALL.replace(dtype="bfloat16")
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    h = gptjax.forward(params, tokens_for(cfg), cfg)
    assert h.dtype == jnp.bfloat16
    loss = gptjax.lm_loss(params, tokens_for(cfg), cfg)
    assert loss.dtype == jnp.float32
    ref = gptjax.lm_loss(params, tokens_for(cfg), SMALL)
    assert abs(float(loss) - float(ref)) < 0.05


# ----------------------------------------------------------------------------- bad input


@reference_only
def test_token_ids_out_of_range_raise(cfg):
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    bad = np.zeros((2, 5), np.int32)
    bad[1, 3] = cfg.vocab_size
    with pytest.raises(ValueError, match=rf"id {cfg.vocab_size} at index \(1, 3\).*vocab_size"):
        gptjax.forward(params, jnp.asarray(bad), cfg)
    bad[1, 3] = -1
    with pytest.raises(ValueError, match="id -1"):
        gptjax.lm_loss(params, jnp.asarray(bad), cfg)


@reference_only
def test_too_long_input_raises(cfg):
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=f"longer than the context n_ctx={cfg.n_ctx}"):
        gptjax.forward(params, jnp.zeros((1, cfg.n_ctx + 1), jnp.int32), cfg)
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        gptjax.forward(params, jnp.zeros((5,), jnp.int32), cfg)
    with pytest.raises(ValueError, match="positions must lie"):
        gptjax.forward(params, jnp.zeros((1, 3), jnp.int32), cfg,
                       positions=jnp.full((1, 3), cfg.n_ctx))
    with pytest.raises(ValueError, match="integers"):
        gptjax.forward(params, jnp.zeros((1, 3), jnp.float32), cfg)


@reference_only
def test_inside_jit_no_check_is_possible_and_documented(cfg):
    """Under jit the ids are abstract: no error, JAX clamps the gather (documented)."""
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    bad = jnp.full((1, 4), cfg.vocab_size + 5, jnp.int32)
    out = jax.jit(gptjax.forward, static_argnums=2)(params, bad, cfg)
    assert out.shape == (1, 4, cfg.n_embd)
    assert "clamps" in gptjax.model.check_inputs.__doc__


def test_public_api_contract():
    """The names and signatures DESIGN.md promises to users."""
    import inspect

    assert list(inspect.signature(gptjax.forward).parameters)[:5] == [
        "params", "tokens", "cfg", "train", "rng"]
    # logits(params, h) as promised; the optional cfg gives muP's output multiplier
    assert list(inspect.signature(gptjax.logits).parameters) == ["params", "h", "cfg"]
    assert inspect.signature(gptjax.logits).parameters["cfg"].default is None
    assert list(inspect.signature(gptjax.lm_loss).parameters)[:3] == ["params", "tokens", "cfg"]
    gen = inspect.signature(gptjax.generate).parameters
    assert list(gen)[:4] == ["params", "cfg", "prompt", "max_new_tokens"]
    for name in ("rng", "temperature", "top_k", "top_p"):
        assert gen[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert callable(gptjax.hf.load_pretrained) and callable(gptjax.hf.save_pretrained)
    assert gptjax.GPTConfig is GPTConfig and gptjax.preset("gpt2").n_layer == 12
