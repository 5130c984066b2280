"""Sharded jit over a device mesh: the sharding rules, 8 CPU devices == 1 device for
data, FSDP and data x FSDP x tensor meshes, FSDP memory per device, checkpoints moving
between meshes and to 1 device, and train.py --mesh from the command line."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gptjax import model as M
from gptjax.config import GPTConfig
from gptjax.train import parallel as par
from gptjax.train.loop import LoopConfig
from gptjax.train.optim import OptimConfig, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import test_train as TT  # noqa: E402

# Every width divides by 8, so FSDP over 8 devices shards every leaf; vocab 61 does not
# (the embedding is sharded along its width instead). With dropout: JAX's random bits do
# not depend on the sharding, so a mesh draws the same masks as one device.
CFG = GPTConfig(vocab_size=61, n_ctx=16, n_layer=2, n_head=2, n_embd=32, embd_pdrop=0.1,
                attn_pdrop=0.0, resid_pdrop=0.1)
# Forced CPU devices; optimisation level 0 halves XLA's compile time, which is most of
# these tests' time on a small CPU (the results agree to float rounding either way).
PARAM_ATOL = 1e-4  # parameters across device layouts: see test_train.PARAM_ATOL
XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
             "--xla_force_host_platform_device_count=")


def sub_env(devices):
    """A subprocess with `devices` CPU devices that imports this checkout's gptjax."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, XLA_FLAGS=XLA_FLAGS + str(devices), JAX_PLATFORMS="cpu",
                PYTHONPATH=path)


def specs_by_name(tree, sizes):
    specs = par.tree_specs(tree, sizes)
    flat = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, P))[0]
    return {".".join(par.path_names(path)): spec for path, spec in flat}


# ----------------------------------------------------------------------------- rules


def test_parse_mesh():
    assert par.parse_mesh("data=2,fsdp=2,tensor=2", 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert par.parse_mesh("fsdp=8", 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert par.parse_mesh("tensor=2, fsdp=-1", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    for bad, message in (("data=3", "needs 3 devices"), ("model=2", "AXIS=SIZE"),
                         ("data=2,data=4", "twice"), ("data=-1,fsdp=-1", "only one"),
                         ("data=x", "not an integer"), ("fsdp=3,data=-1", "do not divide")):
        with pytest.raises(ValueError, match=message):
            par.parse_mesh(bad, 8)
    with pytest.raises(ValueError, match="AXIS=SIZE"):
        LoopConfig(mesh="pipeline=2")
    with pytest.raises(ValueError, match="needs parallel='mesh' or 'auto'"):
        LoopConfig(mesh="fsdp=2", parallel="pmap")


def test_sharding_rules_in_one_place():
    params = M.init_params(CFG.replace(norm="pre"), jax.random.PRNGKey(0))
    specs = specs_by_name(params, {"data": 1, "fsdp": 4, "tensor": 2})
    # tensor: c_attn / c_fc on their output axis, the c_proj weights on their input axis;
    # fsdp: the largest other dimension, never the stacked layer axis L
    assert specs["h.attn.c_attn.w"] == P(None, "fsdp", "tensor")  # (L, D, 3D)
    assert specs["h.attn.c_attn.b"] == P(None, "tensor")  # (L, 3D): only L is left
    assert specs["h.mlp.c_fc.w"] == P(None, "fsdp", "tensor")  # (L, D, F)
    assert specs["h.attn.c_proj.w"] == P(None, "tensor", "fsdp")  # (L, D, D)
    assert specs["h.mlp.c_proj.w"] == P(None, "tensor", "fsdp")  # (L, F, D)
    assert specs["h.attn.c_proj.b"] == P(None, "fsdp")  # (L, D): added after the reduce
    assert specs["h.ln_1.g"] == P(None, "fsdp")
    assert specs["wte"] == P(None, "fsdp")  # (61, 32): 61 does not divide
    assert specs["wpe"] == P(None, "fsdp")  # (16, 32): the larger one
    assert specs["ln_f.g"] == P("fsdp")
    # L is used only when nothing else divides; nothing divides: replicated
    assert par.partition_spec(("h", "x", "w"), (8, 3), {"fsdp": 8}) == P("fsdp", None)
    assert par.partition_spec(("h", "x", "w"), (6, 3), {"fsdp": 8}) == P(None, None)
    assert par.partition_spec(("count",), (), {"fsdp": 8}) == P()
    # optimizer state: Adam's moments sit under the parameters' paths, so they follow
    opt = make_optimizer(OptimConfig(warmup_steps=1), 10)
    opt_specs = specs_by_name(opt.init(params), {"data": 1, "fsdp": 4, "tensor": 2})
    moments = {k: v for k, v in opt_specs.items() if k.endswith("h.attn.c_attn.w")}
    assert moments and all(v == P(None, "fsdp", "tensor") for v in moments.values())
    with pytest.raises(ValueError, match=r"c_attn.w .* does not divide by tensor=5"):
        par.partition_spec(("h", "attn", "c_attn", "w"), (2, 32, 96), {"tensor": 5})


def test_one_process_loads_the_whole_batch():
    mesh = par.make_mesh("", jax.devices()[:1])
    assert par.batch_shard(mesh) == (0, 1)
    assert par.process_batch_shard(LoopConfig()) is None


# ----------------------------------------------------------------------------- 8 devices

MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    import test_parallel as TP
    import test_train as T
    from gptjax import model as M
    from gptjax.train import parallel as par
    from gptjax.train.checkpoint import Checkpointer
    from gptjax.train.optim import OptimConfig, make_optimizer
    from gptjax.train.loop import LoopConfig, train
    from gptjax.train.runners import make_runner
    from gptjax.train.step import init_state, make_train_step
    out_dir = sys.argv[1]
    cfg = TP.CFG
    optim = OptimConfig(lr=1e-2, warmup_steps=1)

    def loss(p, b, rng):
        return M.lm_loss(p, b["tokens"], cfg, train=True, rng=rng), {{}}

    def run(name, steps=3, resume=False, stop_after=None, **loop):
        # 2 micro-batches per step: accumulation is checked too (the same split on any mesh)
        loop = LoopConfig(steps=steps, batch_size=16, grad_accum=2, eval_every=0,
                          log_every=1, **loop)
        r = train(run_dir=out_dir + "/" + name, loop=loop, optim=optim,
                  params=M.init_params(cfg, jax.random.PRNGKey(0)), loss_fn=loss,
                  batch_fn=lambda s: T.batch_fn(s, 16), show_progress=False, resume=resume,
                  stop_after=stop_after)
        np.savez(out_dir + "/" + name + ".npz",
                 *[np.asarray(x) for x in jax.tree_util.tree_leaves(r.state["params"])])
        return [h["loss"] for h in r.history]

    out = {{"devices": jax.device_count()}}
    out["one"] = run("one", devices=1)
    for name, mesh in (("data8", "data=8"), ("fsdp8", "fsdp=8"),
                       ("d2f2t2", "data=2,fsdp=2,tensor=2")):
        out[name] = run(name, mesh=mesh)

    # fsdp=8: what one device holds of each parameter and optimizer-state leaf
    opt = make_optimizer(optim, 3)
    state = init_state(M.init_params(cfg, jax.random.PRNGKey(0)), opt, 0)

    def factory(axis):
        return make_train_step(loss, opt, lambda s: 0.0, axis_name=axis)

    p8 = make_runner(factory, LoopConfig(batch_size=16, mesh="fsdp=8"))
    placed = p8.put_state(state)
    held = {{}}
    for part in ("params", "opt_state"):
        leaves = jax.tree_util.tree_leaves(placed[part])
        held[part] = [[list(x.shape), list(x.addressable_shards[0].data.shape)]
                      for x in leaves]
    out["held"] = held

    # the fsdp=8 checkpoint restored under another mesh: shards move, values stay
    p3 = make_runner(factory, LoopConfig(batch_size=16, mesh="data=2,fsdp=2,tensor=2"))
    ckpt = Checkpointer(out_dir + "/fsdp8/checkpoints")
    restored, _, step = ckpt.restore(p3.restore_target(state))
    ckpt.close()
    w = restored["params"]["h"]["attn"]["c_attn"]["w"]
    out["restored"] = {{"step": step, "spec": str(w.sharding.spec),
                        "shard": list(w.addressable_shards[0].data.shape)}}
    np.savez(out_dir + "/restored.npz", *[np.asarray(x) for x in
                                          jax.tree_util.tree_leaves(restored["params"])])
    # training stopped on fsdp=8 goes on under another mesh
    out["chain"] = run("chain", stop_after=2, mesh="fsdp=8")
    out["chain"] += run("chain", resume=True, mesh="data=2,fsdp=2,tensor=2")
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    """One subprocess with 8 CPU devices runs every mesh (they share compiled pieces)."""
    tmp = tmp_path_factory.mktemp("mesh")
    script = tmp / "mesh_check.py"
    script.write_text(MESH_SCRIPT.format(tests=str(ROOT / "tests")))
    proc = subprocess.run([sys.executable, str(script), str(tmp)], env=sub_env(8),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, json.loads(proc.stdout.strip().splitlines()[-1])


def test_meshes_on_eight_devices_equal_one_device(eight):
    tmp, out = eight
    assert out["devices"] == 8
    one = np.load(tmp / "one.npz")
    for name in ("data8", "fsdp8", "d2f2t2"):
        np.testing.assert_allclose(out[name], out["one"], atol=1e-5, err_msg=name)
        other = np.load(tmp / f"{name}.npz")
        for key in one.files:
            np.testing.assert_allclose(other[key], one[key], atol=PARAM_ATOL, err_msg=name)


def test_fsdp_holds_an_eighth_per_device(eight):
    _, out = eight
    for part in ("params", "opt_state"):
        held = out["held"][part]
        arrays = [(full, shard) for full, shard in held if full]  # not Adam's step count
        assert len(arrays) >= 15
        for full, shard in arrays:
            assert 8 * int(np.prod(shard)) == int(np.prod(full)), (part, full, shard)
        total = sum(int(np.prod(full)) for full, _ in held)
        per_device = sum(int(np.prod(shard)) for _, shard in held)
        scalars = len(held) - len(arrays)  # step counts, replicated
        assert per_device * 8 - total == 7 * scalars  # all but the scalars: 1/8 each


def test_checkpoints_move_between_meshes_and_to_one_device(eight):
    tmp, out = eight
    fsdp8 = np.load(tmp / "fsdp8.npz")
    assert out["restored"]["step"] == 3
    assert out["restored"]["spec"] == str(P(None, "fsdp", "tensor"))
    assert out["restored"]["shard"] == [2, 16, 48]  # (L, D / fsdp, 3D / tensor)
    restored = np.load(tmp / "restored.npz")
    for key in fsdp8.files:
        np.testing.assert_array_equal(restored[key], fsdp8[key])
    # 2 steps on fsdp=8, then 1 on data x fsdp x tensor == 3 steps on one device
    np.testing.assert_allclose(out["chain"], out["one"], atol=1e-5)
    one = np.load(tmp / "one.npz")
    resumed = np.load(tmp / "chain.npz")
    for key in one.files:
        np.testing.assert_allclose(resumed[key], one[key], atol=PARAM_ATOL)
    # the mesh checkpoint restores on this test's single device
    for key, leaf in zip(one.files, TT.restored_params(tmp / "chain" / "checkpoints", CFG)):
        np.testing.assert_array_equal(leaf, resumed[key])


# ----------------------------------------------------------------------------- the CLI


def cli_args(corpus, cache, out, *extra):
    return ["--preset", "tiny", "--data", str(corpus), "--tokenizer", "char",
            "--n-ctx", "32", "--batch-size", "8", "--steps", "4", "--warmup-steps", "1",
            "--eval-every", "2", "--eval-batches", "2", "--log-every", "1",
            "--samples", "1", "--sample-tokens", "8", "--cache-dir", str(cache),
            "--out-dir", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]))
    return path


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fsdp_run(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"),
                           *cli_args(corpus, tmp / "cache", out, "--mesh", "fsdp=8")],
                          cwd=ROOT, env=sub_env(8), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.slow
def test_train_py_with_an_fsdp_mesh(fsdp_run):
    out, stdout = fsdp_run
    assert "final validation loss" in stdout and "on 8 cpu device(s)" in stdout
    records = read_metrics(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert json.loads((out / "config.json").read_text())["loop"]["mesh"] == "fsdp=8"
    assert all(np.isfinite(r.get("loss", r.get("val_loss"))) for r in records)


@pytest.mark.slow
def test_load_run_of_a_mesh_run_on_one_device(fsdp_run):
    from gptjax.train.checkpoint import load_run

    cfg, params, _ = load_run(fsdp_run[0])
    assert params["wte"].shape == (cfg.vocab_size, cfg.n_embd)
