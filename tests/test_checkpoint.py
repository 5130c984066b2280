"""Checkpoints that cannot be read, and runs that were stopped, resume exactly.

Each damaged file of the newest checkpoint (one kind at a time), a save a SIGKILL
interrupted, and a SIGTERM: the resumed run ends bit-identical to an uninterrupted
one (parameters, optimizer state, RNG key and every step's loss). A folder that
cannot be read is moved aside under a name that says so, with one warning naming it;
a checkpoint of another train state is refused and left alone; loading a run prints
no warning.

The runs happen in subprocesses that share JAX's persistent compilation cache, so the
step is compiled once for all of them (in this process each train() call would compile
it again).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import test_train as TT  # noqa: E402

STEPS, CKPT_EVERY, STOP_AT = 6, 2, 4  # the damaged checkpoint is step 4, the last of 2, 4
XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
WORKER = (f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); "
          "import test_checkpoint as C; C.worker(sys.argv[1:])")


# ----------------------------------------------------------------------------- in the worker


def train_run(run_dir, *, resume=False, stop_after=None, batch_fn=None, optim=None,
              prefetch=1):
    """The tiny run every scenario trains: 6 steps, checkpoints every 2 (asynchronous)."""
    from gptjax import model as M
    from gptjax.train.loop import LoopConfig, train
    from gptjax.train.optim import OptimConfig

    loop = LoopConfig(steps=STEPS, batch_size=8, eval_every=0, ckpt_every=CKPT_EVERY,
                      log_every=1, prefetch=prefetch)
    return train(run_dir=run_dir, loop=loop, optim=optim or OptimConfig(lr=3e-3, warmup_steps=2),
                 params=M.init_params(TT.CFG, jax.random.PRNGKey(0)), loss_fn=TT.loss_fn,
                 batch_fn=batch_fn or TT.batch_fn, meta={"model": TT.CFG.to_dict()},
                 resume=resume, stop_after=stop_after, show_progress=False)


def digest(tree) -> str:
    import hashlib

    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


def summary(run_dir, result) -> dict:
    """What must equal the uninterrupted run's, and what the run folder holds."""
    state = result.state
    return {
        "status": result.status, "signal": result.signal,
        "step": int(state["step"]), "params": digest(state["params"]),
        "opt_state": digest(state["opt_state"]), "rng": digest(state["rng"]),
        "history": [[h["step"], h["loss"]] for h in result.history],
        "logged": logged_losses(run_dir),
        "folders": sorted(p.name for p in (Path(run_dir) / "checkpoints").iterdir()),
    }


def logged_losses(run_dir) -> list:
    """[step, loss] of every metrics.jsonl record, those of interrupted runs included."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() \
        else []
    return [[r["step"], r["loss"]] for r in records if "loss" in r]


class Warnings:
    """Collects the warnings logged while it is open."""

    def __enter__(self):
        import logging

        self.messages = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.messages.append(record.getMessage())
        logging.getLogger().addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger().removeHandler(self.handler)


def file_kinds(step_dir: Path) -> dict[str, list[Path]]:
    """Every file orbax wrote in a step folder, grouped by kind (the path with the
    content-hash names of data files replaced by *)."""
    kinds: dict[str, list[Path]] = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        kind = re.sub(r"[0-9a-f]{32}", "*", str(path.relative_to(step_dir)))
        kinds.setdefault(kind, []).append(path)
    return kinds


def damage(path: Path, seed: int) -> None:
    """Overwrite a file with random bytes of the same length (what a bad disk sector or
    a stray write leaves; the length alone gives nothing away)."""
    old = path.read_bytes()
    new = np.random.default_rng(seed).integers(0, 256, max(len(old), 1), np.uint8).tobytes()
    assert new != old
    path.write_bytes(new)


def resume_and_summarise(run_dir, **kwargs) -> dict:
    with Warnings() as caught:
        result = train_run(run_dir, resume=True, **kwargs)
    return {**summary(run_dir, result), "warnings": caught.messages}


def scenarios(out: Path) -> dict:
    """The uninterrupted run, then every way of stopping or damaging a run, resumed."""
    out = Path(out)
    report = {"reference": summary(out / "ref", train_run(out / "ref"))}
    base = out / "base"
    train_run(base, stop_after=STOP_AT)  # checkpoints 2 and 4, then stopped
    kinds = file_kinds(base / "checkpoints" / str(STOP_AT))
    report["kinds"] = {}
    for i, (kind, paths) in enumerate(sorted(kinds.items())):
        run = out / f"damaged{i}"
        shutil.copytree(base, run)
        for path in paths:
            damage(run / path.relative_to(base), seed=i)
        report["kinds"][kind] = resume_and_summarise(run)

    # a save stopped half-way: orbax's temporary folder of step 6 with part of the files
    run = out / "unfinished"
    shutil.copytree(base, run)
    partial = run / "checkpoints" / f"{STEPS}.orbax-checkpoint-tmp"
    shutil.copytree(run / "checkpoints" / str(STOP_AT), partial)
    for path in file_kinds(partial)["state/manifest.ocdbt"]:
        path.unlink()
    report["unfinished"] = resume_and_summarise(run)

    # SIGTERM while the batch of step index 2 is built: that step still runs, then the
    # loop saves step 3 (not one of the regular checkpoints) and stops
    def batch_then_signal(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return TT.batch_fn(step)

    run = out / "sigterm"
    stopped = train_run(run, batch_fn=batch_then_signal, prefetch=0)
    report["sigterm"] = {"stopped": summary(run, stopped), "resumed": resume_and_summarise(run)}

    # another optimizer (no clipping: no clip state) cannot resume these checkpoints
    from gptjax.train.checkpoint import CheckpointError
    from gptjax.train.optim import OptimConfig

    run = out / "other_optimizer"
    shutil.copytree(base, run)
    try:
        train_run(run, resume=True, optim=OptimConfig(lr=3e-3, warmup_steps=2, clip_norm=0))
        report["other_optimizer"] = {"error": None}
    except CheckpointError as err:
        report["other_optimizer"] = {"error": str(err)}
    report["other_optimizer"]["folders"] = sorted(p.name for p in (run / "checkpoints").iterdir())
    return report


def killed(run_dir: Path) -> None:
    """Train, and SIGKILL this process as soon as the asynchronous save of step 4 has
    started (its files are being written in the background)."""
    from gptjax.train import checkpoint

    save = checkpoint.Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == STOP_AT:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.Checkpointer.save = save_then_die
    train_run(run_dir)


def load_a_run(run_dir: Path) -> None:
    from gptjax.data.tokenizer import build_tokenizer
    from gptjax.train.checkpoint import load_run

    (run_dir / "config.json").write_text(json.dumps({"model": TT.CFG.to_dict()}))
    build_tokenizer("byte", []).save(run_dir / "tokenizer")
    sys.stderr.write("--- loading\n")
    cfg, params, _ = load_run(run_dir)
    assert cfg == TT.CFG and params["wte"].shape == (cfg.vocab_size, cfg.n_embd)


def worker(argv):
    command, folder = argv[0], Path(argv[1])
    if command == "scenarios":
        print(json.dumps(scenarios(folder)))
    elif command == "killed":
        killed(folder)
    elif command == "resume":
        print(json.dumps(resume_and_summarise(folder)))
    elif command == "load":
        load_a_run(folder)


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jit-cache")
    env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")])))

    def run(command, folder, expect_rc=0):
        proc = subprocess.run([sys.executable, "-c", WORKER, command, str(folder)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == expect_rc, proc.stderr[-4000:]
        return proc

    return run


@pytest.fixture(scope="module")
def report(launch, tmp_path_factory):
    out = tmp_path_factory.mktemp("scenarios")
    proc = launch("scenarios", out)
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "dir": str(out)}


def assert_same_run(got: dict, reference: dict):
    """Bit for bit: the final state, and the loss of every step any run logged."""
    for key in ("step", "params", "opt_state", "rng"):
        assert got[key] == reference[key], key
    losses = dict((step, loss) for step, loss in reference["history"])
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert {step for step, _ in got["logged"]} == set(losses)
    for step, loss in got["logged"]:
        assert loss == losses[step], (step, loss, losses[step])


def test_every_kind_of_damaged_file_is_set_aside_or_harmless(report):
    reference = report["reference"]
    kinds = report["kinds"]
    # every file orbax writes, by kind: the arrays (ocdbt data and indexes), their
    # metadata, our JSON metadata, orbax's step metadata and commit markers
    assert {"meta/metadata", "state/_METADATA", "state/manifest.ocdbt",
            "state/ocdbt.process_0/d/*", "_CHECKPOINT_METADATA"} <= set(kinds)
    caught = []
    for kind, got in kinds.items():
        assert got["status"] == "done", kind
        assert_same_run(got, reference)
        aside = [f for f in got["folders"] if f.startswith(f"{STOP_AT}.corrupt-")]
        if aside:  # unreadable: moved aside with one warning naming it, resumed from 2
            caught.append(kind)
            named = [w for w in got["warnings"] if aside[0] in w]
            assert len(named) == 1 and "cannot be read" in named[0], (kind, got["warnings"])
            assert got["history"][0][0] == CKPT_EVERY + 1, kind
        else:  # a file the restore does not need: step 4 restored as it was saved
            assert got["history"][0][0] == STOP_AT + 1, kind
            assert not any("cannot be read" in w for w in got["warnings"]), kind
        assert str(STOP_AT) in got["folders"] and str(STEPS) in got["folders"], kind
    # what holds the arrays and their description must be caught; the random bytes in
    # the data files keep their length, which only the checksum notices
    for kind in ("meta/metadata", "state/_METADATA", "state/array_metadatas/process_0",
                 "state/manifest.ocdbt", "state/ocdbt.process_0/d/*"):
        assert kind in caught, (kind, caught)


def test_a_save_cut_short_is_set_aside(report):
    got = report["unfinished"]
    assert_same_run(got, report["reference"])
    assert got["history"][0][0] == STOP_AT + 1
    aside = [f for f in got["folders"] if f.startswith(f"{STEPS}.incomplete-")]
    assert len(aside) == 1 and str(STEPS) in got["folders"]
    assert not any("tmp" in f for f in got["folders"])
    assert len([w for w in got["warnings"] if aside[0] in w]) == 1


def test_sigterm_then_resume_is_bit_identical(report):
    stopped, resumed = report["sigterm"]["stopped"], report["sigterm"]["resumed"]
    assert stopped["status"] == "preempted" and stopped["signal"] == signal.SIGTERM
    assert stopped["step"] == 3 and "3" in stopped["folders"]
    assert resumed["status"] == "done" and resumed["history"][0][0] == 4
    assert stopped["history"] + resumed["history"] == report["reference"]["history"]
    assert_same_run(resumed, report["reference"])


def test_a_checkpoint_of_another_train_state_is_refused_and_kept(report):
    got = report["other_optimizer"]
    assert got["error"] and "holds another train state" in got["error"]
    assert "opt_state" in got["error"]
    assert got["folders"] == ["2", "4"]  # nothing moved aside: the files are fine


def test_sigkill_during_an_asynchronous_save_then_resume(launch, report, tmp_path):
    run = tmp_path / "run"
    launch("killed", run, expect_rc=-signal.SIGKILL)
    # step 2 is complete; step 4 is orbax's temporary folder, part-written (the save's
    # files are written in the background, which the kill cut short)
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == ["2", f"{STOP_AT}.orbax-checkpoint-tmp"]
    got = json.loads(launch("resume", run).stdout.strip().splitlines()[-1])
    assert got["status"] == "done" and got["history"][0][0] == CKPT_EVERY + 1
    assert any(f.startswith(f"{STOP_AT}.incomplete-") for f in got["folders"])
    assert_same_run(got, report["reference"])  # the killed run's logged losses included


def test_loading_a_run_prints_no_warning(launch, report, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(Path(report["dir"]) / "ref", run)
    stderr = launch("load", run).stderr
    loading = stderr[stderr.index("--- loading"):]
    assert "WARNING" not in loading and "absl" not in loading, loading
