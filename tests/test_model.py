"""Invariants of the functional core: shapes, causality, tied logits, loop == scan, dropout."""


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


@pytest.fixture(params=["post", "pre"])
def cfg(request):
    return SMALL.replace(norm=request.param)


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
        x, _ = M._run_layers(params["h"], x0, cfg, None, None, None, None)
        return x[0, t].sum()

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


@pytest.mark.parametrize("chunk_logits", [M.LOSS_CHUNK_LOGITS, 4 * 128 * 3])
def test_loss_gradient_by_chunks_equals_autodiff(monkeypatch, chunk_logits):
    """mean_nll's one-pass gradient (vocabulary 61 padded to 128 inside; with a small
    chunk budget: 3 positions per chunk over 10, so the last chunk is padded) against
    JAX's derivative of log-softmax over the unpadded logits, with per-token weights."""
    monkeypatch.setattr(M, "LOSS_CHUNK_LOGITS", chunk_logits)
    B, T, D, V = 4, 10, 16, 61
    k = jax.random.split(jax.random.PRNGKey(3), 4)
    h = jax.random.normal(k[0], (B, T, D))
    params = {"wte": jax.random.normal(k[1], (V, D))}
    targets = jax.random.randint(k[2], (B, T), 0, V)
    weights = jax.random.uniform(k[3], (B, T)) * (jnp.arange(T) % 4 != 0)

    def plain(params, h):
        z = jnp.einsum("BTD,VD->BTV", h, params["wte"])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(z), targets[..., None], -1)[..., 0]
        return jnp.sum(weights * nll) / jnp.sum(weights)

    def ours(params, h):
        return M.mean_nll(params, h, targets, weights)

    (a, ga), (b, gb) = (jax.value_and_grad(f, argnums=(0, 1))(params, h) for f in (ours, plain))
    np.testing.assert_allclose(a, b, rtol=1e-5)
    np.testing.assert_allclose(ga[0]["wte"], gb[0]["wte"], atol=1e-6)
    np.testing.assert_allclose(ga[1], gb[1], atol=1e-6)


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


def test_banded_attention_paths_agree():
    """The blocked banded kernel equals the explicit-mask kernel (dropout path at rate 0)."""
    cfg = SMALL.replace(attention_band=5, attn_pdrop=0.0)
    p = jax.tree_util.tree_map(lambda x: x[1], gptjax.init_params(cfg, jax.random.PRNGKey(0))["h"])
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 19, cfg.n_embd))
    blocked, _ = M.attention(p["attn"], x, cfg, banded=True)
    q, k, v = jnp.split(M.dense(p["attn"]["c_attn"], x), 3, axis=-1)
    shape = (2, 19, cfg.n_head, cfg.head_size)
    i, j = np.arange(19)[:, None], np.arange(19)[None, :]
    mask = jnp.asarray((i >= j) & (i - j < 5))[None, None]
    ref = M._softmax_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), mask,
                               1 / np.sqrt(cfg.head_size), 0.0, None)
    ref = M.dense(p["attn"]["c_proj"], ref.reshape(2, 19, cfg.n_embd))
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_norm_gradient_equals_autodiff_of_the_formula(dtype):
    """layer_norm's hand-written backward against JAX's derivative of the plain formula."""
    def plain(p, x, eps):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + eps) * p["g"] + p["b"]).astype(x.dtype)

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = (3 * jax.random.normal(k[0], (3, 5, 16)) + 1).astype(dtype)
    p = {"g": jax.random.normal(k[1], (16,)), "b": jax.random.normal(k[2], (16,))}
    w = jax.random.normal(k[3], (3, 5, 16))

    def grads(fn):
        loss = lambda p, x: jnp.sum(w * jnp.tanh(fn(p, x, 1e-5).astype(jnp.float32)))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1))(p, x)

    ours, ref = grads(M.layer_norm), grads(plain)
    np.testing.assert_allclose(ours[0]["g"], ref[0]["g"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[0]["b"], ref[0]["b"], rtol=1e-5, atol=1e-5)
    assert ours[1].dtype == x.dtype
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(ours[1], np.float32), np.asarray(ref[1], np.float32),
                               rtol=tol, atol=tol)


def _grads_close(ours, ref, dtype):
    tol = 1e-5 if dtype == "float32" else 2e-2
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32)))) or 1.0
        np.testing.assert_allclose(np.asarray(a, np.float32) / scale,
                                   np.asarray(b, np.float32) / scale, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_gradient_equals_autodiff_of_the_formula(dtype):
    """dense's hand-written backward (in bfloat16 on the CPU: the weight gradient from
    rows re-ordered (T, B)) against JAX's derivative of x @ w + b in float32."""
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (3, 5, 16)).astype(dtype)
    p = {"w": jax.random.normal(k[1], (16, 24)), "b": jax.random.normal(k[2], (24,))}
    r = jax.random.normal(k[3], (3, 5, 24))

    def plain(p, x):
        x32 = x.astype(jnp.float32)
        return x32 @ p["w"].astype(x.dtype).astype(jnp.float32) + p["b"]

    def grads(fn):
        loss = lambda p, x: jnp.sum(r * jnp.tanh(fn(p, x).astype(jnp.float32)))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1))(p, x)

    ours, ref = grads(M.dense), grads(plain)
    assert M.dense(p, x).dtype == x.dtype and ours[1].dtype == x.dtype
    assert ours[0]["w"].dtype == ours[0]["b"].dtype == jnp.float32
    _grads_close(ours, ref, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("T", [7, 12, 16])  # 1, 2 and 4 query blocks of >= 4 rows
def test_causal_attention_gradient_equals_autodiff_of_the_formula(monkeypatch, dtype, T):
    """The causal kernel's forward and hand-written backward (by query blocks; in bfloat16
    on the CPU dK and dV from transposed copies) against JAX's derivative of softmax
    attention over the whole T x T."""
    monkeypatch.setattr(M, "MIN_QUERY_BLOCK", 4)
    assert len(M._query_blocks(T)) == {7: 1, 12: 2, 16: 4}[T]
    B, H, K = 3, 2, 8
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    qkv = jax.random.normal(k[0], (B, T, 3, H, K)).astype(dtype)
    r = jax.random.normal(k[1], (B, T, H, K))
    scale = 1 / np.sqrt(K)

    def plain(qkv, scale):
        q, kk, v = (qkv[:, :, i].astype(jnp.float32) for i in range(3))
        s = jnp.einsum("BTHK,BSHK->BHTS", q, kk) * scale
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
        return jnp.einsum("BHTS,BSHK->BTHK", jax.nn.softmax(s, -1), v)

    def loss(fn):
        return lambda qkv: jnp.sum(r * jnp.tanh(fn(qkv, scale).astype(jnp.float32)))

    _grads_close(M._causal_attention(qkv, scale), plain(qkv, scale), dtype)
    ours = jax.grad(loss(M._causal_attention))(qkv)
    assert ours.dtype == qkv.dtype
    _grads_close(ours, jax.grad(loss(plain))(qkv), dtype)


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


def test_token_ids_out_of_range_raise(cfg):
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    bad = np.zeros((2, 5), np.int32)
    bad[1, 3] = cfg.vocab_size
    with pytest.raises(ValueError, match=rf"id {cfg.vocab_size} at index \(1, 3\).*vocab_size"):
        gptjax.forward(params, jnp.asarray(bad), cfg)
    bad[1, 3] = -1
    with pytest.raises(ValueError, match="id -1"):
        gptjax.lm_loss(params, jnp.asarray(bad), cfg)


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
    assert list(inspect.signature(gptjax.logits).parameters) == ["params", "h"]
    assert list(inspect.signature(gptjax.lm_loss).parameters)[:3] == ["params", "tokens", "cfg"]
    gen = inspect.signature(gptjax.generate).parameters
    assert list(gen)[:4] == ["params", "cfg", "prompt", "max_new_tokens"]
    for name in ("rng", "temperature", "top_k", "top_p"):
        assert gen[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert callable(gptjax.hf.load_pretrained) and callable(gptjax.hf.save_pretrained)
    assert gptjax.GPTConfig is GPTConfig and gptjax.preset("gpt2").n_layer == 12
