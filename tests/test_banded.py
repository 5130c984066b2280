"""GPT-3's alternating dense / locally banded attention: the presets, the band by gradient,
band >= context == dense, and memory that grows as T * band rather than T * T."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import kernels
from gptjax import model as M
from gptjax.config import GPTConfig, preset

jax.config.update("jax_default_matmul_precision", "highest")

# Brown et al. 2020, Table 2.1: n_params, n_layers, d_model, n_heads, d_head (context 2048).
# gptjax deviates twice, as config.py says: 13B is 5120 wide (40 x 128, the paper prints
# 5140) and XL has 16 heads of 128 (the paper prints 24 heads of 128 at d_model 2048).
GPT3_TABLE = {
    "gpt3-small": (125e6, 12, 768, 12, 64),
    "gpt3-medium": (350e6, 24, 1024, 16, 64),
    "gpt3-large": (760e6, 24, 1536, 16, 96),
    "gpt3-xl": (1.3e9, 24, 2048, 16, 128),
    "gpt3-2.7b": (2.7e9, 32, 2560, 32, 80),
    "gpt3-6.7b": (6.7e9, 32, 4096, 32, 128),
    "gpt3-13b": (13e9, 40, 5120, 40, 128),
    "gpt3-175b": (175e9, 96, 12288, 96, 128),
}


@pytest.mark.parametrize("name", list(GPT3_TABLE))
def test_gpt3_presets_match_table_2_1(name):
    n_params, n_layer, d_model, n_head, d_head = GPT3_TABLE[name]
    cfg = preset(name)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size) == (n_layer, d_model, n_head,
                                                                     d_head)
    assert cfg.n_ctx == 2048 and cfg.norm == "pre" and cfg.attention_band is not None
    assert [cfg.layer_is_banded(i) for i in range(4)] == [False, True, False, True]
    shapes = jax.eval_shape(lambda key: M.init_params(cfg, key), jax.random.PRNGKey(0))
    count = M.count_params(shapes)
    assert abs(count / n_params - 1) < 0.02, f"{name}: {count:,} parameters"


CFG = GPTConfig(vocab_size=64, n_ctx=64, n_layer=2, n_head=2, n_embd=16, attention_band=5,
                embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def _attn_params(cfg):
    return jax.tree_util.tree_map(lambda a: a[1], M.init_params(cfg, jax.random.PRNGKey(0))["h"])[
        "attn"]


def _dependence(f, x):
    """|d f(x)[0, t] / d x[0, s]| summed over features: a (T, T) matrix."""
    T = x.shape[1]

    def row(t):
        return jnp.abs(jax.grad(lambda x: f(x)[0, t].sum())(x)[0]).sum(-1)

    return np.asarray(jax.jit(jax.vmap(row))(jnp.arange(T)))


@pytest.mark.parametrize("kernels_setting", ["reference", "fast"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "dropout"])
def test_output_ignores_tokens_outside_the_band(train, kernels_setting):
    """y[t] depends on x[s] exactly for t - band < s <= t (T = 23 is no multiple of 5), with
    the formula's explicit band mask and with the blocked kernel."""
    cfg = CFG.replace(kernels=kernels_setting, attn_pdrop=0.1 if train else 0.0)
    p = _attn_params(cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 23, cfg.n_embd))
    rngs = (jax.random.PRNGKey(2), jax.random.PRNGKey(3)) if train else None
    dep = _dependence(lambda x: M.attention(p, x, cfg, banded=True, rngs=rngs), x)
    t, s = np.arange(23)[:, None], np.arange(23)[None, :]
    outside = (s > t) | (s <= t - cfg.attention_band)
    assert dep[outside].max() == 0.0
    if not train:  # with dropout a kept-zero probability may cut a link
        assert dep[~outside].min() > 0.0


@pytest.mark.parametrize("kernels_setting", ["reference", "fast"])
def test_banded_with_padding_equals_explicit_band_mask(kernels_setting):
    """Banded attention with a key mask (left padding), by model.attention (the blocked
    kernel with "fast"), equals softmax over an explicit band & causal & key mask written
    out here, and a band >= T is dense attention."""
    cfg = CFG.replace(kernels=kernels_setting)
    p = _attn_params(cfg)
    B, T = 2, 21
    x = jax.random.normal(jax.random.PRNGKey(4), (B, T, cfg.n_embd))
    key_mask = jnp.asarray(np.arange(T)[None, :] >= np.array([[0], [7]]))
    got = M.attention(p, x, cfg, banded=True, key_mask=key_mask)

    q, k, v = (a.reshape(B, T, cfg.n_head, cfg.head_size)
               for a in jnp.split(x @ p["c_attn"]["w"] + p["c_attn"]["b"], 3, axis=-1))
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = jnp.asarray((s <= t) & (s > t - cfg.attention_band))[None, None]
    mask = mask & key_mask[:, None, None, :]
    scores = jnp.einsum("BTHK,BSHK->BHTS", q, k) / np.sqrt(cfg.head_size)
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
    ref = jnp.einsum("BHTS,BSHK->BTHK", probs, v).reshape(B, T, cfg.n_embd)
    ref = ref @ p["c_proj"]["w"] + p["c_proj"]["b"]
    real = np.asarray(key_mask)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=1e-5)

    dense = M.attention(p, x, cfg, banded=False, key_mask=key_mask)
    for band in (T, 3 * T):
        wide = M.attention(p, x, cfg.replace(attention_band=band), banded=True,
                           key_mask=key_mask)
        np.testing.assert_allclose(np.asarray(wide)[real], np.asarray(dense)[real], atol=1e-6)


def _avals(jaxpr):
    """Every intermediate value's abstract shape, sub-jaxprs (scan, pjit, custom_vjp) included."""
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                if hasattr(sub, "eqns"):
                    yield from _avals(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from _avals(sub.jaxpr)


def test_banded_attention_does_not_materialise_t_by_t():
    """With the fast kernels (the reference formula builds the T x T mask), at T=1024,
    band=64 the largest array of the banded layer, forward and backward, is H * T * 2 *
    band scores (blocks of band queries against 2 * band keys), 1/8 of the H * T * T that
    dense attention computes (in query blocks of H * T/4 * T). Compiled scratch memory
    stays under one float32 H x T x T score array; dense attention's holds at least the
    causal part of one (5/8 of it with 4 query blocks)."""
    T, band = 1024, 64
    cfg = CFG.replace(n_ctx=T, attention_band=band, kernels="fast")
    p = _attn_params(cfg)
    x = jnp.zeros((1, T, cfg.n_embd))
    largest, scratch = {}, {}
    for banded in (True, False):
        def fwd(x, banded=banded):
            return M.attention(p, x, cfg, banded=banded)

        def grad(x, fwd=fwd):
            return jax.grad(lambda x: fwd(x).sum())(x)

        for name, fn in (("fwd", fwd), ("grad", grad)):
            avals = _avals(jax.make_jaxpr(fn)(x).jaxpr)
            largest[banded, name] = max(int(np.prod(a.shape)) for a in avals
                                        if hasattr(a, "shape"))
            memory = jax.jit(fn).lower(x).compile().memory_analysis()
            scratch[banded, name] = getattr(memory, "temp_size_in_bytes", None)
    for name in ("fwd", "grad"):
        assert largest[True, name] <= cfg.n_head * T * 2 * band
        # the contrast: dense attention holds a query block's scores against every key
        n = len(kernels.attention.query_blocks(T))
        assert largest[False, name] >= cfg.n_head * T * T // n
        if scratch[True, name] is not None:
            tt_bytes = cfg.n_head * T * T * 4
            assert scratch[True, name] < tt_bytes
            assert scratch[False, name] >= tt_bytes * (n + 1) / (2 * n)


@pytest.mark.parametrize("kernels_setting", ["reference", "fast"])
def test_banded_model_trains(kernels_setting):
    """Banded layers in the training path (lm_loss, sequence longer than the band): every
    parameter gets a finite, non-zero gradient (dropout with the band: see above)."""
    cfg = CFG.replace(n_ctx=32, attention_band=4, kernels=kernels_setting)
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 17), 0, cfg.vocab_size)
    grads = jax.jit(jax.grad(M.lm_loss), static_argnames=("cfg",))(params, tokens, cfg=cfg)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        assert np.isfinite(g).all() and np.abs(g).max() > 0, jax.tree_util.keystr(path)
