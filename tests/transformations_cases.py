"""Every JAX transformation composes with the public functions under the default config
(kernels="reference"): forward mode (jvp, jacfwd, linearize) agrees with reverse mode and
with central finite differences, the Hessian is symmetric and is the derivative of the
gradient, per-example gradients under vmap equal a loop, and grad-of-grad equals
jvp-of-grad."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptjax
from gptjax.config import GPTConfig

jax.config.update("jax_default_matmul_precision", "highest")

TINY = GPTConfig(vocab_size=31, n_ctx=8, n_layer=2, n_head=2, n_embd=8)
CONFIGS = {
    "gpt2": TINY,
    "gpt1": TINY.replace(norm="post", scan_layers=False),
    "gpt3-banded": TINY.replace(attention_band=3, n_layer=3, remat=True),
}


def _tree_dot(a, b):
    return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                               strict=True))


def _random_like(tree, seed):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype)
                              for k, x in zip(keys, leaves, strict=True)])


def _close(a, b, tol, name=""):
    """Equal to within tol of the largest |b|. The model computes in float32 (x64 or not);
    two compilations of the same forward pass (jit or not, scan or loop) differ by about
    2e-5 of the largest logit at these sizes, hence 1e-4 between different programs."""
    scale = float(jnp.max(jnp.abs(b))) or 1.0
    np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, rtol=0, atol=tol,
                               err_msg=name)


def _add(tree, direction, eps):
    return jax.tree_util.tree_map(lambda x, d: x + eps * d, tree, direction)


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request):
    cfg = CONFIGS[request.param]
    assert cfg.kernels == "reference"  # the default
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    # moved off the init (gains 1, biases 0) so that no derivative is trivially simple
    params = jax.tree_util.tree_map(lambda x: x + 0.1 * jnp.sin(7 * x + 1), params)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, cfg.vocab_size)
    return cfg, params, tokens


def _functions(cfg, tokens):
    """The three public functions as functions of the parameters alone."""
    return {
        "forward": lambda p: gptjax.forward(p, tokens[:, :-1], cfg),
        "logits": lambda p: gptjax.logits(p, gptjax.forward(p, tokens[:, :-1], cfg)),
        "lm_loss": lambda p: gptjax.lm_loss(p, tokens, cfg),
    }


def test_jvp_and_linearize_agree_with_vjp_and_finite_differences(setup):
    """J t by jvp, by linearize and by central differences; <c, J t> == <J^T c, t> (vjp)."""
    cfg, params, tokens = setup
    tangent = jax.tree_util.tree_map(lambda t: 0.05 * t, _random_like(params, 2))
    for name, f in _functions(cfg, tokens).items():
        out, jt = jax.jvp(f, (params,), (tangent,))
        out_lin, f_lin = jax.linearize(f, params)
        _close(out_lin, out, 1e-4, name)
        _close(f_lin(tangent), jt, 1e-4, name)
        cotangent = jax.random.normal(jax.random.PRNGKey(3), out.shape)
        (ct_params,) = jax.vjp(f, params)[1](cotangent)
        forward_mode = float(jnp.vdot(cotangent, jt))
        reverse_mode = float(_tree_dot(ct_params, tangent))
        np.testing.assert_allclose(forward_mode, reverse_mode, rtol=1e-4, err_msg=name)
        # central differences in float32 (the model computes in float32 whatever x64
        # says), extrapolated (Richardson) so a step large enough for the rounding works
        def central(eps, f=f):
            return (f(_add(params, tangent, eps)) - f(_add(params, tangent, -eps))) / (2 * eps)

        _close((4 * central(0.025) - central(0.05)) / 3, jt, 1e-2, name)


def test_jacfwd_equals_jacrev(setup):
    """Full Jacobians of logits with respect to a slice of the parameters (the last
    layer's attention projection bias and the position table), forward == reverse."""
    cfg, params, tokens = setup

    def f(bias, wpe):
        p = dict(params, wpe=wpe)
        h = dict(p["h"], attn=dict(p["h"]["attn"], c_proj={
            "w": p["h"]["attn"]["c_proj"]["w"],
            "b": p["h"]["attn"]["c_proj"]["b"].at[-1].set(bias)}))
        p["h"] = h
        return gptjax.logits(p, gptjax.forward(p, tokens[:, :-1], cfg))

    args = (params["h"]["attn"]["c_proj"]["b"][-1], params["wpe"])
    fwd = jax.jacfwd(f, argnums=(0, 1))(*args)
    rev = jax.jacrev(f, argnums=(0, 1))(*args)
    for a, b in zip(fwd, rev, strict=True):
        assert a.shape == b.shape and float(jnp.max(jnp.abs(b))) > 0
        _close(a, b, 1e-4)


def test_hessian_is_symmetric_and_the_derivative_of_the_gradient(setup):
    """jax.hessian of lm_loss with respect to a LayerNorm gain (ln_f for pre-LN, the last
    ln_2 for post-LN): symmetric, equal to central differences of jax.grad, and to
    jacrev(jacfwd) (a different order of the two modes)."""
    cfg, params, tokens = setup
    if cfg.norm == "pre":
        gain = params["ln_f"]["g"]

        def loss(g):
            return gptjax.lm_loss(dict(params, ln_f=dict(params["ln_f"], g=g)), tokens, cfg)
    else:
        gain = params["h"]["ln_2"]["g"][-1]

        def loss(g):
            ln_2 = dict(params["h"]["ln_2"], g=params["h"]["ln_2"]["g"].at[-1].set(g))
            return gptjax.lm_loss(dict(params, h=dict(params["h"], ln_2=ln_2)), tokens, cfg)

    hess = jax.hessian(loss)(gain)
    assert hess.shape == (gain.size, gain.size) and float(jnp.max(jnp.abs(hess))) > 0
    _close(hess, hess.T, 1e-5)
    _close(jax.jacrev(jax.jacfwd(loss))(gain), hess, 1e-5)
    grad = jax.grad(loss)
    eps = 1e-2
    fd = jnp.stack([(grad(gain.at[i].add(eps)) - grad(gain.at[i].add(-eps))) / (2 * eps)
                    for i in range(gain.size)], axis=1)
    _close(fd, hess, 2e-3)


def test_vmap_of_grad_equals_a_loop(setup):
    """Per-example gradients: jax.vmap(jax.grad) over the batch equals one grad per row."""
    cfg, params, tokens = setup

    def loss(p, row):
        return gptjax.lm_loss(p, row[None], cfg)

    batched = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, tokens)
    for b in range(tokens.shape[0]):
        single = jax.grad(loss)(params, tokens[b])
        for x, y in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(single),
                        strict=True):
            _close(x[b], y, 1e-5)


def test_grad_of_grad_equals_jvp_of_grad(setup):
    """d/dp |grad L(p)|^2 = 2 H grad L(p): reverse-over-reverse against forward-over-reverse."""
    cfg, params, tokens = setup

    def loss(p):
        return gptjax.lm_loss(p, tokens, cfg)

    g = jax.grad(loss)(params)
    by_grad = jax.grad(lambda p: _tree_dot(jax.grad(loss)(p), jax.grad(loss)(p)))(params)
    hvp = jax.jvp(jax.grad(loss), (params,), (g,))[1]
    leaves = jax.tree_util.tree_leaves(by_grad)
    assert max(float(jnp.max(jnp.abs(x))) for x in leaves) > 0
    for x, y in zip(leaves, jax.tree_util.tree_leaves(hvp), strict=True):
        _close(x, 2 * y, 1e-4)
