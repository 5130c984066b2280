"""Every fast kernel equals its reference twin in model.py, in value and gradient, in float32
and bfloat16; the whole model with kernels="fast" equals kernels="reference"; and
kernels.plan resolves "reference" / "fast" / "auto" per backend as documented."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptjax
from gptjax import kernels
from gptjax import model as M
from gptjax.config import GPTConfig
from gptjax.kernels import Plan

jax.config.update("jax_default_matmul_precision", "highest")

REF = GPTConfig(vocab_size=61, n_ctx=32, n_layer=2, n_head=2, n_embd=16,
                embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
DTYPES = ["float32", "bfloat16"]
# Relative to the largest reference value: float32 agrees to rounding; in bfloat16 the
# two round at different points (the kernels accumulate products in float32).
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def _close(ours, ref, dtype, tol=None):
    tol = tol or TOL[dtype]
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32)))) or 1.0
        np.testing.assert_allclose(np.asarray(a, np.float32) / scale,
                                   np.asarray(b, np.float32) / scale, rtol=tol, atol=tol)


def _value_and_grads(fn, args, r):
    """fn(*args) and the gradient of sum(r * tanh(fn(*args))) with respect to every arg
    (tanh and the random r make every output element matter differently)."""
    def loss(*args):
        return jnp.sum(r * jnp.tanh(fn(*args).astype(jnp.float32)))

    return fn(*args), jax.grad(loss, argnums=tuple(range(len(args))))(*args)


# ----------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_kernel_equals_reference(dtype):
    cfg = REF.replace(dtype=dtype)
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = (3 * jax.random.normal(k[0], (3, 5, 16)) + 1).astype(dtype)
    p = {"g": jax.random.normal(k[1], (16,)), "b": jax.random.normal(k[2], (16,))}
    r = jax.random.normal(k[3], (3, 5, 16))
    ours = _value_and_grads(lambda p, x: kernels.layer_norm(x, p["g"], p["b"], 1e-5), (p, x), r)
    ref = _value_and_grads(lambda p, x: M.layer_norm(p, x, cfg), (p, x), r)
    assert ours[0].dtype == ours[1][1].dtype == x.dtype
    _close(ours, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3])  # 3: in bfloat16 on the CPU, dW from (T, B) rows
def test_dense_kernel_equals_reference(dtype, batch):
    cfg = REF.replace(dtype=dtype)
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (batch, 5, 16)).astype(dtype)
    p = {"w": jax.random.normal(k[1], (16, 24)), "b": jax.random.normal(k[2], (24,))}
    r = jax.random.normal(k[3], (batch, 5, 24))
    ours = _value_and_grads(lambda p, x: kernels.dense(x, p["w"], p["b"]), (p, x), r)
    ref = _value_and_grads(lambda p, x: M.dense(p, x, cfg), (p, x), r)
    assert ours[0].dtype == ours[1][1].dtype == x.dtype
    assert ours[1][0]["w"].dtype == ours[1][0]["b"].dtype == jnp.float32
    _close(ours, ref, dtype)


def _qkv(dtype, B, T, H=2, K=8, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    return (jax.random.normal(k[0], (B, T, 3, H, K)).astype(dtype),
            jax.random.normal(k[1], (B, T, H, K)))


def _reference_attention(qkv, band=None, key_mask=None):
    T = qkv.shape[1]
    mask = M.causal_mask(jnp.arange(T), jnp.arange(T), band)[None, None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    return M.attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [7, 12, 16])  # 1, 2 and 4 query blocks of >= 4 rows
def test_causal_attention_kernel_equals_reference(monkeypatch, dtype, T):
    """The blocked kernel's forward and hand-written backward (in bfloat16 on the CPU, dK
    and dV from transposed copies) against model.attend over the whole T x T."""
    monkeypatch.setattr(kernels.attention, "MIN_QUERY_BLOCK", 4)
    assert len(kernels.attention.query_blocks(T)) == {7: 1, 12: 2, 16: 4}[T]
    qkv, r = _qkv(dtype, 3, T)
    scale = 1 / math.sqrt(qkv.shape[-1])
    ours = _value_and_grads(lambda qkv: kernels.causal_attention(qkv, scale), (qkv,), r)
    ref = _value_and_grads(_reference_attention, (qkv,), r)
    _close(ours, ref, dtype)


def _left_padding(B, T, pads=(0, 7)):
    return jnp.asarray(np.arange(T)[None, :] >= np.array(pads)[:, None])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padded", [False, True], ids=["no-pad", "left-pad"])
def test_banded_attention_kernel_equals_reference(dtype, padded):
    """Blocks of band queries against 2 * band keys (T = 23 is no multiple of the band 5)
    against model.attend with an explicit band (and key) mask. Padding queries see no
    real key; their rows are unspecified and left out of the comparison."""
    B, T, band = 2, 23, 5
    qkv, r = _qkv(dtype, B, T)
    key_mask = _left_padding(B, T) if padded else None
    real = jnp.ones((B, T), bool) if key_mask is None else key_mask
    r = r * real[:, :, None, None]
    scale = 1 / math.sqrt(qkv.shape[-1])

    def ours_fn(qkv):
        return kernels.banded_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], key_mask,
                                        band, scale)

    def ref_fn(qkv):
        return _reference_attention(qkv, band, key_mask)

    ours, ref = _value_and_grads(ours_fn, (qkv,), r), _value_and_grads(ref_fn, (qkv,), r)
    _close((ours[0][real], ours[1]), (ref[0][real], ref[1]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("band", [None, 5])
def test_dot_product_attention_equals_reference(dtype, band):
    """jax.nn.dot_product_attention (the xla implementation here; cudnn on an NVIDIA GPU)
    with the band as a local window and a padding mask, against model.attend."""
    B, T = 2, 19
    qkv, r = _qkv(dtype, B, T)
    key_mask = _left_padding(B, T, (0, 4))
    r = r * key_mask[:, :, None, None]
    scale = 1 / math.sqrt(qkv.shape[-1])
    ours = _value_and_grads(
        lambda qkv: kernels.dot_product_attention(qkv, band, key_mask, scale, "xla"), (qkv,), r)
    ref = _value_and_grads(lambda qkv: _reference_attention(qkv, band, key_mask), (qkv,), r)
    _close((ours[0][key_mask], ours[1]), (ref[0][key_mask], ref[1]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_logits", [kernels.loss.LOSS_CHUNK_LOGITS, 4 * 128 * 3],
                         ids=["one-chunk", "four-chunks"])
def test_chunked_loss_equals_reference(monkeypatch, dtype, chunk_logits):
    """The one-pass loss (vocabulary 61 padded to 128 inside; with a small chunk budget 3
    positions per chunk over 10, so the last chunk is padded) against the weighted sum of
    model.token_nll (logits, then log-softmax), gradients for h and W_e."""
    monkeypatch.setattr(kernels.loss, "LOSS_CHUNK_LOGITS", chunk_logits)
    B, T, D, V = 4, 10, 16, 61
    k = jax.random.split(jax.random.PRNGKey(3), 4)
    h = jax.random.normal(k[0], (B, T, D)).astype(dtype)
    wte = jax.random.normal(k[1], (V, D))
    targets = jax.random.randint(k[2], (B, T), 0, V)
    weights = jax.random.uniform(k[3], (B, T)) * (jnp.arange(T) % 4 != 0)

    def ours(wte, h):
        return kernels.nll_sum(h, wte, targets, weights)

    def ref(wte, h):
        return jnp.sum(weights * M.token_nll({"wte": wte}, h, targets))

    (a, ga), (b, gb) = (jax.value_and_grad(f, argnums=(0, 1))(wte, h) for f in (ours, ref))
    _close((a, ga), (b, gb), dtype)


# ----------------------------------------------------------------------------- the model


PRE, POST = dict(norm="pre"), dict(norm="post", scan_layers=False)
BANDED = dict(norm="pre", attention_band=5, n_layer=3, remat=True)


@pytest.mark.parametrize("variant, dtype, padded", [
    (PRE, "float32", False), (PRE, "bfloat16", False),
    (POST, "float32", True), (POST, "bfloat16", False),
    (BANDED, "float32", True), (BANDED, "bfloat16", True),
], ids=["pre-f32", "pre-bf16", "post-unrolled-f32-pad", "post-unrolled-bf16",
        "pre-banded-remat-f32-pad", "pre-banded-remat-bf16-pad"])
def test_model_fast_equals_reference(monkeypatch, variant, dtype, padded):
    """forward and the gradient of lm_loss with every fast kernel equal model.py's formulas
    (T = 16 in 4 query blocks; with padding the dense layers fall back to the reference
    attention and the banded layers keep their kernel)."""
    monkeypatch.setattr(kernels.attention, "MIN_QUERY_BLOCK", 4)
    ref_cfg = REF.replace(dtype=dtype, **variant)
    fast_cfg = ref_cfg.replace(kernels="fast")
    params = gptjax.init_params(ref_cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 17), 0, REF.vocab_size)
    mask = jnp.asarray(np.arange(17)[None, :] < np.array([17, 17, 11])[:, None]) if padded \
        else None

    def run(cfg):
        h = jax.jit(gptjax.forward, static_argnums=2)(params, tokens[:, :-1], cfg,
                                                       attention_mask=None if mask is None
                                                       else mask[:, :-1])
        loss, grads = jax.jit(jax.value_and_grad(gptjax.lm_loss), static_argnums=2)(
            params, tokens, cfg, attention_mask=mask)
        return h, loss, grads

    h_fast, loss_fast, g_fast = run(fast_cfg)
    h_ref, loss_ref, g_ref = run(ref_cfg)
    real = np.ones((3, 16), bool) if mask is None else np.asarray(mask[:, :-1])
    tol = {"float32": 2e-5, "bfloat16": 3e-2}[dtype]
    _close(h_fast[real], h_ref[real], dtype, tol)
    _close(loss_fast, loss_ref, dtype, tol)
    for path, a in jax.tree_util.tree_leaves_with_path(g_fast):
        b = g_ref
        for key in path:
            b = b[key.key]
        assert a.dtype == b.dtype == jnp.float32, jax.tree_util.keystr(path)
        _close(a, b, dtype, tol)


# ----------------------------------------------------------------------------- the plan


ALL_CPU = Plan(layer_norm=True, dense=True, loss=True, attention="blocked")
ALL_ELSEWHERE = Plan(layer_norm=True, dense=True, loss=True, attention="dot_product")


@pytest.mark.parametrize("backend, kernels_setting, expected", [
    ("cpu", "reference", Plan()),
    ("cpu", "fast", ALL_CPU),
    ("cpu", "auto", ALL_CPU),
    ("gpu", "reference", Plan()),
    ("gpu", "fast", ALL_ELSEWHERE),
    ("gpu", "auto", Plan(layer_norm=True, loss=True, attention="dot_product")),
    ("tpu", "reference", Plan()),
    ("tpu", "fast", ALL_ELSEWHERE),
    ("tpu", "auto", Plan()),
])
def test_plan_resolves_per_backend(backend, kernels_setting, expected):
    assert kernels.plan(REF.replace(kernels=kernels_setting), backend) == expected


def test_plan_default_is_the_reference_and_follows_the_running_backend():
    assert REF.kernels == "reference" and kernels.plan(REF) == Plan()
    auto = REF.replace(kernels="auto")
    assert kernels.plan(auto) == kernels.plan(auto, jax.default_backend())


def test_self_attention_serves_or_falls_back_to_the_reference():
    """Where no kernel serves a call, None: model.attention then runs model.attend."""
    qkv, _ = _qkv("float32", 2, 12)
    fast = REF.replace(kernels="fast")
    pad = _left_padding(2, 12, (0, 3))
    serve = {}
    for name, cfg, kwargs in [
        ("reference", REF, {}),
        ("dropout", fast, dict(dropout=True)),
        ("causal", fast, {}),
        ("causal+pad", fast, dict(key_mask=pad)),
        ("band", fast, dict(band=5)),
        ("band+pad", fast, dict(band=5, key_mask=pad)),
        ("band>=T", fast, dict(band=12)),
    ]:
        args = dict(band=None, key_mask=None, dropout=False) | kwargs
        serve[name] = kernels.self_attention(qkv, cfg, **args) is not None
    if jax.default_backend() == "cpu":  # the blocked kernels
        assert serve == {"reference": False, "dropout": False, "causal": True,
                         "causal+pad": False, "band": True, "band+pad": True, "band>=T": True}
    # a band covering every key is plain causal attention
    np.testing.assert_allclose(
        np.asarray(kernels.self_attention(qkv, fast, band=12, key_mask=None, dropout=False)),
        np.asarray(kernels.self_attention(qkv, fast, band=None, key_mask=None, dropout=False)))
