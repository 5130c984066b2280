"""The train step and loop: accumulation, weight decay mask, exact resume, NaN policy,
checkpoint robustness, and pmap on 8 CPU devices == 1 device."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax import model as M
from gptjax.config import GPTConfig
from gptjax.train.checkpoint import Checkpointer, CheckpointError
from gptjax.train.flops import flops_per_token
from gptjax.train.loop import LoopConfig, TrainingDiverged, train
from gptjax.train.optim import OptimConfig, make_optimizer, make_schedule
from gptjax.train.step import init_state, make_train_step

# Parameters after a few steps of Adam at lr 1e-2, compared across device layouts. Adam
# moves a parameter whose gradient is near its eps (1e-8) by lr * g / (|g| + eps), so
# float reassociation in the sharded reductions can change such a step by ~1e-5 (seen
# in CI: 1.45e-5 on a bias); 1e-4 is 1% of one step, far below any real error (~lr).
PARAM_ATOL = 1e-4
CFG = GPTConfig(vocab_size=61, n_ctx=16, n_layer=2, n_head=2, n_embd=32, embd_pdrop=0.1,
                attn_pdrop=0.0, resid_pdrop=0.1)
DATA = np.random.default_rng(0).integers(0, CFG.vocab_size, 4000)
ROOT = Path(__file__).resolve().parents[1]


def batch_fn(step, batch_size=8):
    rng = np.random.default_rng([7, step])
    starts = rng.integers(0, len(DATA) - CFG.n_ctx - 1, batch_size)
    return {"tokens": np.stack([DATA[s:s + CFG.n_ctx + 1] for s in starts]).astype(np.int32)}


def loss_fn(params, batch, rng):
    return M.lm_loss(params, batch["tokens"], CFG, train=True, rng=rng), {}


def run(tmp, steps, *, resume=False, stop_after=None, loss=loss_fn, **loop):
    loop = LoopConfig(steps=steps, batch_size=8, eval_every=0, log_every=1, prefetch=1,
                      **loop)
    return train(run_dir=tmp, loop=loop, optim=OptimConfig(lr=3e-3, warmup_steps=2),
                 params=M.init_params(CFG, jax.random.PRNGKey(0)), loss_fn=loss,
                 batch_fn=batch_fn, meta={"model": CFG.to_dict()}, resume=resume,
                 stop_after=stop_after, show_progress=False)


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def restored_params(ckpt_dir, cfg=CFG, steps=3):
    """The parameter leaves of a checkpoint of `steps` steps (saved on any devices or mesh)
    restored on this process's one device."""
    opt = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=1), steps)
    target = init_state(M.init_params(cfg, jax.random.PRNGKey(0)), opt, 0)
    ckpt = Checkpointer(ckpt_dir)
    state, _, step = ckpt.restore(target)
    ckpt.close()
    assert step == steps
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(state["params"])]


def test_gradient_accumulation_equals_full_batch():
    cfg = CFG.replace(embd_pdrop=0.0, resid_pdrop=0.0)
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    # plain SGD, so the parameter change is the gradient itself (Adam's first step
    # is ~sign(g) and would magnify rounding in near-zero gradients)
    opt = optax.sgd(1.0)
    sched = optax.constant_schedule(1.0)

    def loss(p, b, rng):
        return M.lm_loss(p, b["tokens"], cfg), {}

    step = jax.jit(make_train_step(loss, opt, sched))
    tokens = batch_fn(0)["tokens"]
    full, m_full = step(init_state(params, opt, 0), {"tokens": tokens[None]})
    acc, m_acc = step(init_state(params, opt, 0), {"tokens": tokens.reshape(4, 2, -1)})
    np.testing.assert_allclose(float(m_full["loss"]), float(m_acc["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(full["params"]),
                    jax.tree_util.tree_leaves(acc["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("k", [1, 5])
def test_resume_is_bit_identical(tmp_path, k):
    steps = 6
    full = run(tmp_path / "full", steps)
    part = run(tmp_path / "part", steps, stop_after=k)
    assert part.status == "stopped" and int(part.state["step"]) == k
    resumed = run(tmp_path / "part", steps, resume=True)
    assert [h["loss"] for h in part.history + resumed.history] == \
        [h["loss"] for h in full.history]
    assert_trees_equal(resumed.state["params"], full.state["params"])
    assert_trees_equal(resumed.state["opt_state"], full.state["opt_state"])
    assert_trees_equal(resumed.state["rng"], full.state["rng"])


def test_resume_refuses_a_different_model(tmp_path):
    run(tmp_path, 2, stop_after=1)
    with pytest.raises(CheckpointError, match="model differs.*n_layer"):
        train(run_dir=tmp_path, loop=LoopConfig(steps=2, batch_size=8, eval_every=0),
              optim=OptimConfig(lr=1e-3, warmup_steps=0),
              params=M.init_params(CFG, jax.random.PRNGKey(0)), loss_fn=loss_fn,
              batch_fn=batch_fn, meta={"model": CFG.replace(n_layer=3).to_dict()},
              resume=True, show_progress=False)


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    poison = {3, 4}

    def poisoned(params, batch, rng):
        loss, aux = loss_fn(params, batch, rng)
        return jnp.where(batch["bad"][0] > 0, jnp.nan, loss), aux

    def batches(step):
        return {**batch_fn(step), "bad": np.full((8,), step in poison, np.int32)}

    loop = LoopConfig(steps=8, batch_size=8, eval_every=0, ckpt_every=2, log_every=1,
                      max_nonfinite=3)
    args = dict(run_dir=tmp_path, loop=loop, optim=OptimConfig(lr=3e-3, warmup_steps=0),
                params=M.init_params(CFG, jax.random.PRNGKey(0)), loss_fn=poisoned,
                batch_fn=batches, show_progress=False)
    result = train(**args)
    skipped = [h["step"] for h in result.history if h["nonfinite"] > 0]
    assert skipped == [4, 5] and result.history[-1]["skipped"] == 2
    assert np.isfinite(result.history[-1]["loss"])

    # parameters and optimizer state unchanged by a skipped step
    opt = make_optimizer(OptimConfig(lr=3e-3, warmup_steps=0), 8)
    step = jax.jit(make_train_step(poisoned, opt, make_schedule(OptimConfig(warmup_steps=0), 8)))
    state = init_state(M.init_params(CFG, jax.random.PRNGKey(0)), opt, 0)
    bad = {k: v[None] for k, v in batches(3).items()}
    new, metrics = step(jax.tree_util.tree_map(jnp.copy, state), bad)
    assert not bool(metrics["finite"]) and int(new["skipped"]) == 1
    assert_trees_equal(new["params"], state["params"])
    assert_trees_equal(new["opt_state"], state["opt_state"])

    poison.update(range(3, 8))
    shutil.rmtree(tmp_path)
    with pytest.raises(TrainingDiverged, match="3 consecutive steps"):
        train(**args)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    # step 4 was saved after a skipped step: its parameters are the good ones of step 3
    assert ckpt.steps() == [2, 4]
    target = init_state(M.init_params(CFG, jax.random.PRNGKey(0)), opt, 0)
    for saved in ckpt.steps():
        state, _, _ = ckpt.restore(target, step=saved)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state))
    ckpt.close()


def test_planted_and_corrupted_checkpoints_are_set_aside(tmp_path, caplog):
    """Library level (train() resuming is in test_checkpoint.py): a planted step folder,
    an unfinished save and damaged steps are moved aside, never deleted; a read-only
    Checkpointer only skips them; with nothing readable the error names every step."""
    opt = make_optimizer(OptimConfig(warmup_steps=0), 4)
    target = init_state(M.init_params(CFG, jax.random.PRNGKey(0)), opt, 0)
    ckpts = tmp_path / "checkpoints"
    ckpt = Checkpointer(ckpts, async_save=False)
    for step in (2, 4):
        ckpt.save(step, {**target, "step": np.int32(step)}, {})
    ckpt.close()
    (ckpts / "9").mkdir()  # a planted folder that looks like a step
    (ckpts / "9" / "junk").write_text("not a checkpoint")
    (ckpts / "5.orbax-checkpoint-tmp-123").mkdir()  # a save a kill interrupted

    def names():
        return sorted(re.sub(r"-\d{8}-\d{6}", "-TIME", p.name) for p in ckpts.iterdir())

    def damage(step):
        for f in (ckpts / str(step)).rglob("*"):
            if f.is_file() and f.stat().st_size > 0 and "meta" not in str(f):
                f.write_bytes(b"\0garbage")

    damage(4)
    before = names()
    reader = Checkpointer(ckpts, read_only=True)
    with caplog.at_level("WARNING"):
        _, _, step = reader.restore(target)
    reader.close()
    assert step == 2 and names() == before  # read-only: skipped, nothing moved
    assert "step 9" in caplog.text and "step 4" in caplog.text

    caplog.clear()
    ckpt = Checkpointer(ckpts)
    with caplog.at_level("WARNING"):
        state, _, step = ckpt.restore(target)
    assert step == 2 and int(state["step"]) == 2
    assert names() == ["2", "4.corrupt-TIME", "5.incomplete-TIME", "9.corrupt-TIME"]
    for moved in ("4.corrupt-", "5.incomplete-", "9.corrupt-"):
        assert len([r for r in caplog.records if moved in r.getMessage()]) == 1, moved
    # nothing readable at all: an error naming the step, never a silent fresh start
    damage(2)
    with pytest.raises(CheckpointError, match="no readable checkpoint.*step 2"):
        ckpt.restore(target)
    ckpt.close()
    assert names() == ["2.corrupt-TIME", "4.corrupt-TIME", "5.incomplete-TIME",
                       "9.corrupt-TIME"]


def test_flops_per_token_formula():
    cfg = GPTConfig(vocab_size=100, n_ctx=8, n_layer=2, n_head=2, n_embd=16)
    matmul = 2 * (4 * 16 * 16 + 2 * 16 * 64) + 100 * 16
    assert flops_per_token(cfg) == 6 * matmul + 6 * 2 * 8 * 16



def test_cpu_peak_is_measured_in_the_compute_dtype():
    """The MFU logged on CPU divides by a matmul rate measured in the model's compute dtype
    (bfloat16 products accumulate in float32), one measurement per dtype."""
    from gptjax.train.flops import device_peak_flops, measured_matmul_flops

    rates = {d: device_peak_flops(dtype=d) for d in ("float32", "bfloat16")}
    assert all(r > 0 for r in rates.values())
    for dtype, rate in rates.items():  # one measurement per dtype, reused (a new timing
        assert measured_matmul_flops(dtype) == rate  # would not repeat to the last bit)
        assert device_peak_flops(dtype=dtype) == rate

PMAP_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    import test_train as T
    from gptjax.train.loop import LoopConfig, train
    from gptjax.train.optim import OptimConfig
    from gptjax import model as M
    cfg = T.CFG.replace(embd_pdrop=0.0, resid_pdrop=0.0)
    def loss(p, b, rng):
        return M.lm_loss(p, b["tokens"], cfg), {{}}
    out = {{}}
    for name, devices, accum in (("one", 1, 1), ("eight", 8, 1), ("eight_accum", 8, 2)):
        loop = LoopConfig(steps=3, batch_size=16, devices=devices, grad_accum=accum,
                          eval_every=0, log_every=1)
        r = train(run_dir=sys.argv[1] + "/" + name, loop=loop,
                  optim=OptimConfig(lr=1e-2, warmup_steps=1), params=M.init_params(cfg,
                  jax.random.PRNGKey(0)), loss_fn=loss, batch_fn=lambda s: T.batch_fn(s, 16),
                  show_progress=False)
        np.savez(sys.argv[1] + "/" + name + ".npz",
                 *[np.asarray(x) for x in jax.tree_util.tree_leaves(r.state["params"])])
        out[name] = [h["loss"] for h in r.history]
    out["devices"] = jax.local_device_count()
    print(json.dumps(out))
""")


def test_pmap_on_eight_devices_equals_one_device(tmp_path):
    script = tmp_path / "pmap_check.py"
    script.write_text(PMAP_SCRIPT.format(tests=str(ROOT / "tests")))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    np.testing.assert_allclose(out["eight"], out["one"], atol=1e-5)
    np.testing.assert_allclose(out["eight_accum"], out["one"], atol=1e-5)
    one = np.load(tmp_path / "one.npz")
    for name in ("eight", "eight_accum"):
        other = np.load(tmp_path / f"{name}.npz")
        for key in one.files:
            np.testing.assert_allclose(other[key], one[key], atol=PARAM_ATOL)
    # a checkpoint saved on 8 devices restores on 1 (this process has one device)
    for key, leaf in zip(one.files, restored_params(tmp_path / "eight" / "checkpoints")):
        np.testing.assert_allclose(leaf, one[key], atol=PARAM_ATOL)


def test_batch_must_divide_by_devices(tmp_path):
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by grad_accum=4"):
        LoopConfig(batch_size=10, grad_accum=4)
    with pytest.raises(ValueError, match="devices=64 but only"):
        run(tmp_path / "run", 2, devices=64)
    assert not (tmp_path / "run").exists()


def test_keeps_the_last_k_and_the_best(tmp_path):
    from gptjax.train.checkpoint import best_step

    val_losses = iter([3.0, 1.0, 2.0, 2.5, 2.7])  # best at step 4 of 2, 4, 6, 8, 10

    def eval_fn(params):
        return {"val_loss": next(val_losses)}

    loop = LoopConfig(steps=10, batch_size=8, eval_every=2, keep=2, log_every=1)
    train(run_dir=tmp_path, loop=loop, optim=OptimConfig(lr=3e-3, warmup_steps=1),
          params=M.init_params(CFG, jax.random.PRNGKey(0)), loss_fn=loss_fn,
          batch_fn=batch_fn, eval_fn=eval_fn, show_progress=False)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.steps() == [4, 8, 10]
    assert best_step(ckpt) == 4
    ckpt.close()


CACHE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import jax, jax.numpy as jnp
    from gptjax.train.loop import use_compile_cache
    used = use_compile_cache(sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
    print(json.dumps({"used": used, "config": jax.config.jax_compilation_cache_dir}))
""")


@pytest.mark.parametrize("preset_env", [False, True])
def test_compile_cache_is_used_and_an_env_folder_wins(tmp_path, preset_env):
    asked, env_dir = tmp_path / "asked" / "jax", tmp_path / "from-env"
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if preset_env:
        env["JAX_COMPILATION_CACHE_DIR"] = str(env_dir)
    proc = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, str(asked)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    folder = env_dir if preset_env else asked
    assert out["used"] == out["config"] == str(folder)
    assert any(folder.iterdir())  # the compiled function was written there
    if preset_env:
        assert not asked.exists()


def test_compile_cache_off_changes_nothing():
    from gptjax.train.loop import use_compile_cache

    before = jax.config.jax_compilation_cache_dir
    assert use_compile_cache("") == before
    assert jax.config.jax_compilation_cache_dir == before
