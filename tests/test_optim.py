"""The optimizer and its schedule: the weight-decay mask, warm-up then decay, a first
step that moves the parameters, and a learning rate that follows the loop's step after
skipped (non-finite) steps."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax import model as M
from gptjax.train.optim import OptimConfig, make_optimizer, make_schedule, weight_decay_mask
from gptjax.train.step import init_state, make_train_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import CFG, batch_fn  # noqa: E402

NO_DROPOUT = CFG.replace(embd_pdrop=0.0, resid_pdrop=0.0)


def lm_loss(params, batch, rng):
    return M.lm_loss(params, batch["tokens"], NO_DROPOUT), {}


def test_weight_decay_mask_is_explicit():
    params = M.init_params(CFG.replace(norm="pre"), jax.random.PRNGKey(0))
    mask = weight_decay_mask({"gpt": params, "head": {"kernel": 1.0, "bias": 0.0}})
    flat = {jax.tree_util.keystr(p): v for p, v in
            jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed == sorted([
        "['gpt']['h']['attn']['c_attn']['w']", "['gpt']['h']['attn']['c_proj']['w']",
        "['gpt']['h']['mlp']['c_fc']['w']", "['gpt']['h']['mlp']['c_proj']['w']",
        "['gpt']['wpe']", "['gpt']['wte']", "['head']['kernel']",
    ])
    assert not flat["['gpt']['ln_f']['g']"] and not flat["['gpt']['h']['attn']['c_attn']['b']"]


def test_weight_decay_touches_only_matrices():
    params = M.init_params(CFG, jax.random.PRNGKey(0))
    opt = make_optimizer(OptimConfig(lr=0.1, warmup_steps=0, schedule="constant",
                                     weight_decay=0.5, clip_norm=0), 10)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params, step=0)
    assert float(jnp.abs(updates["h"]["ln_1"]["g"]).max()) == 0.0
    assert float(jnp.abs(updates["h"]["mlp"]["c_fc"]["b"]).max()) == 0.0
    np.testing.assert_allclose(updates["wte"], -0.1 * 0.5 * params["wte"], rtol=1e-6)


def test_schedule_warmup_then_cosine_to_min():
    sched = make_schedule(OptimConfig(lr=1.0, warmup_steps=10, min_lr=0.1), 110)
    # warm-up: lr * (s + 1) / 10, the peak at step 9; the cosine from the peak at step 10
    assert float(sched(0)) == pytest.approx(0.1) and float(sched(4)) == pytest.approx(0.5)
    assert float(sched(9)) == 1.0 and float(sched(10)) == 1.0
    assert abs(float(sched(60)) - 0.55) < 1e-3 and abs(float(sched(110)) - 0.1) < 1e-6
    lin = make_schedule(OptimConfig(lr=1.0, warmup_steps=2, schedule="linear"), 12)
    assert abs(float(lin(7)) - 0.5) < 1e-6
    steps = make_schedule(OptimConfig(lr=1.0, warmup_steps=4, schedule="constant"), 10)
    assert [float(steps(s)) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="warmup_steps=20 is longer than training"):
        make_schedule(OptimConfig(warmup_steps=20), 10)


def test_the_first_step_of_warmup_moves_the_parameters():
    optim = OptimConfig(lr=1e-3, warmup_steps=100)
    opt, sched = make_optimizer(optim, 1000), make_schedule(optim, 1000)
    params = M.init_params(NO_DROPOUT, jax.random.PRNGKey(0))
    state = init_state(params, opt, 0)
    new, metrics = jax.jit(make_train_step(lm_loss, opt, sched))(
        state, {k: v[None] for k, v in batch_fn(0).items()})
    assert float(metrics["lr"]) == pytest.approx(1e-5)  # lr / warmup_steps
    # Adam's first step moves every weight with a gradient by about lr / warmup_steps
    moved = np.abs(np.asarray(new["params"]["wte"]) - np.asarray(params["wte"]))
    assert moved.max() == pytest.approx(1e-5, rel=0.05)


def test_skipped_steps_do_not_delay_the_schedule():
    """Three steps skipped for a NaN, then a good one: the rate applied at that step is
    schedule(3), the one logged, not schedule(0) (which a count of applied updates
    would give). The result equals one AdamW update at a constant rate schedule(3)."""
    optim = OptimConfig(lr=1e-2, warmup_steps=2, schedule="linear")
    steps = 10
    opt, sched = make_optimizer(optim, steps), make_schedule(optim, steps)

    def poisoned(params, batch, rng):
        loss, aux = lm_loss(params, batch, rng)
        return jnp.where(batch["bad"][0] > 0, jnp.nan, loss), aux

    def batch(step, bad):
        return {"tokens": batch_fn(step)["tokens"][None], "bad": np.full((1, 8), bad, np.int32)}

    params = M.init_params(NO_DROPOUT, jax.random.PRNGKey(0))
    step_fn = jax.jit(make_train_step(poisoned, opt, sched))
    state = init_state(params, opt, 0)
    for s in range(3):
        state, metrics = step_fn(state, batch(s, True))
        assert not bool(metrics["finite"])
    state, metrics = step_fn(state, batch(3, False))
    assert int(state["skipped"]) == 3 and bool(metrics["finite"])
    assert float(metrics["lr"]) == float(sched(3)) != float(sched(0))

    # optax's AdamW at the constant rate schedule(3), from the untouched optimizer state
    reference = optax.chain(optax.clip_by_global_norm(optim.clip_norm),
                            optax.adamw(float(sched(3)), b1=optim.b1, b2=optim.b2,
                                        eps=optim.eps, weight_decay=optim.weight_decay,
                                        mask=weight_decay_mask))
    expected, _ = jax.jit(make_train_step(poisoned, reference, sched))(
        init_state(params, reference, 0), batch(3, False))
    for got, want, old in zip(jax.tree_util.tree_leaves(state["params"]),
                              jax.tree_util.tree_leaves(expected["params"]),
                              jax.tree_util.tree_leaves(params)):
        # the update is about the rate (Adam's first step is ~sign(g)); at schedule(0)
        # it would be 43% smaller
        np.testing.assert_allclose(np.asarray(got) - np.asarray(old),
                                   np.asarray(want) - np.asarray(old), rtol=1e-5, atol=1e-8)


def test_the_optimizer_needs_the_step():
    opt = make_optimizer(OptimConfig(warmup_steps=0), 10)
    params = {"w": jnp.ones(3)}
    with pytest.raises(TypeError, match="step=step"):
        opt.update(params, opt.init(params), params)
