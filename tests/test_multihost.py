"""Two processes x 4 CPU devices under jax.distributed (gloo collectives on localhost):
the same losses and parameters as one process; each process loads half of each batch;
a killed process ends the job with an error within the heartbeat timeout, and resuming
is exact; SIGTERM / SIGINT on one process stops both at the same step with a checkpoint;
train.py across two processes."""

import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from gptjax import model as M
from gptjax.train.loop import LoopConfig, train
from gptjax.train.optim import OptimConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_parallel as TP  # noqa: E402
import test_train as TT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
MESH = "data=2,fsdp=2,tensor=2"  # process 0 holds data index 0, process 1 index 1
HEARTBEAT = 10  # seconds before a silent process counts as dead

WORKER = textwrap.dedent("""
    import json, os, signal, sys, time
    run_dir, pid, port, mesh = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    opts = json.loads(sys.argv[5])
    from gptjax.train import parallel as par
    from gptjax.train.loop import LoopConfig, exit_code, train
    loop = LoopConfig(steps={steps}, batch_size=16, eval_every=0, log_every=1,
                      ckpt_every=opts.get("ckpt_every", 0), mesh=mesh,
                      coordinator_address="localhost:" + port, num_processes=2,
                      process_id=pid, heartbeat_timeout={heartbeat}, init_timeout=120)
    par.initialize(loop)  # before anything touches JAX
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    import test_parallel as TP, test_train as TT
    from gptjax import model as M
    from gptjax.train.optim import OptimConfig
    cfg = TP.CFG
    index, count = par.process_batch_shard(loop)
    rows = []

    def batch_fn(step):
        if pid == 1 and step == opts.get("hang_at"):
            open(os.path.join(run_dir, "hanging"), "w").close()
            time.sleep(3600)  # until killed
        if pid == 1 and step == opts.get("signal_at"):
            os.kill(os.getpid(), getattr(signal, opts["signal"]))
        if opts.get("signal_at") is not None and step >= opts["signal_at"]:
            # Batches are prepared ahead, so the signal comes steps before the end; slow
            # the rest so that JAX's preemption service agrees on a step before the last
            # one (without this, tiny fast steps could all finish first).
            time.sleep(1.0)
        full = TT.batch_fn(step, 16)["tokens"]
        n = 16 // count
        rows.append(n)
        return {{"tokens": full[index * n:(index + 1) * n]}}  # only this process's rows

    def loss(p, b, rng):
        return M.lm_loss(p, b["tokens"], cfg, train=True, rng=rng), {{}}

    r = train(run_dir=run_dir, loop=loop, optim=OptimConfig(lr=1e-2, warmup_steps=1),
              params=M.init_params(cfg, jax.random.PRNGKey(0)), loss_fn=loss,
              batch_fn=batch_fn, show_progress=False, resume=opts.get("resume", False),
              meta={{"tokenizer": "bpe-" + str(pid if opts.get("differ") else 0)}})
    np.savez(os.path.join(run_dir, f"final{{pid}}.npz"),
             *[np.asarray(x) for x in jax.tree_util.tree_leaves(r.state["params"])])
    print(json.dumps({{"losses": [h["loss"] for h in r.history], "rows": sorted(set(rows)),
                      "status": r.status, "step": int(r.state["step"]),
                      "devices": jax.device_count(), "local": jax.local_device_count(),
                      "process": jax.process_index(), "shard": [index, count]}}))
    sys.exit(exit_code(r))
""")


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return str(s.getsockname()[1])


CACHE = {}


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """The launches of this module share compiled programs (JAX's persistent cache)."""
    CACHE["dir"] = str(tmp_path_factory.mktemp("jit-cache"))
    yield
    CACHE.clear()


def env(devices=4):
    """4 CPU devices per process."""
    extra = {}
    if "dir" in CACHE:
        extra = {"JAX_COMPILATION_CACHE_DIR": CACHE["dir"],
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return dict(TP.sub_env(devices), **extra)


def launch(tmp, run_dir, port=None, **opts):
    script = tmp / "worker.py"
    if not script.exists():
        script.write_text(WORKER.format(steps=STEPS, heartbeat=HEARTBEAT,
                                        tests=str(ROOT / "tests")))
    port = port or free_port()
    run_dir.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([sys.executable, str(script), str(run_dir), str(pid), port, MESH,
                              json.dumps(opts)], env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for pid in (0, 1)]


def finish(procs, timeout=400):
    """(returncode, stdout, stderr) of each; kills all of them if any overruns."""
    out = []
    deadline = time.time() + timeout
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=max(1, deadline - time.time()))
            out.append((proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return out


def report(results):
    for rc, stdout, _ in results:
        if rc == 0:
            return json.loads(stdout.strip().splitlines()[-1])
    raise AssertionError(results[0][2][-3000:])


def params(path):
    data = np.load(path)
    return [data[k] for k in data.files]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same training in this process, on one device."""
    tmp = tmp_path_factory.mktemp("single")

    def loss(p, b, rng):
        return M.lm_loss(p, b["tokens"], TP.CFG, train=True, rng=rng), {}

    r = train(run_dir=tmp, loop=LoopConfig(steps=STEPS, batch_size=16, eval_every=0,
                                           log_every=1, devices=1, parallel="jit"),
              optim=OptimConfig(lr=1e-2, warmup_steps=1),
              params=M.init_params(TP.CFG, jax.random.PRNGKey(0)), loss_fn=loss,
              batch_fn=lambda s: TT.batch_fn(s, 16), show_progress=False)
    return [h["loss"] for h in r.history], jax.tree_util.tree_leaves(r.state["params"])


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """An uninterrupted run on two processes."""
    tmp = tmp_path_factory.mktemp("two")
    results = finish(launch(tmp, tmp / "run"))
    assert [rc for rc, _, _ in results] == [0, 0], results[0][2][-3000:]
    outs = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in results]
    return tmp / "run", outs


def test_two_processes_equal_one(single, two):
    run, outs = two
    for pid, out in enumerate(outs):
        assert out["process"] == pid and out["devices"] == 8 and out["local"] == 4
        assert out["shard"] == [pid, 2] and out["rows"] == [8]  # half of each batch of 16
        np.testing.assert_allclose(out["losses"], single[0], atol=1e-5)
    for a, b, c in zip(params(run / "final0.npz"), params(run / "final1.npz"), single[1]):
        np.testing.assert_array_equal(a, b)  # every process gathers the same parameters
        np.testing.assert_allclose(a, np.asarray(c), atol=TT.PARAM_ATOL)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # process 0 only
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [str(STEPS)]


def test_a_killed_process_ends_the_job_and_resume_is_exact(two, tmp_path):
    run = tmp_path / "run"
    procs = launch(tmp_path, run, ckpt_every=2, hang_at=4)
    # process 1 hangs in its batch function at step 4, after the checkpoint of step 4
    start = time.time()
    while not ((run / "hanging").exists() and (run / "checkpoints" / "4").is_dir()):
        assert time.time() - start < 300, "no checkpoint of step 4"
        assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
        time.sleep(0.2)
    time.sleep(1)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    (rc0, _, err0), (rc1, _, _) = finish(procs, timeout=HEARTBEAT + 120)
    waited = time.time() - killed
    assert rc1 == -signal.SIGKILL
    # process 0 was blocked in a collective of step 5; JAX's coordination service notices
    # the missing heartbeats and ends it (SIGABRT) with this message, rather than a hang
    assert rc0 != 0 and waited < HEARTBEAT + 60, (rc0, waited)
    assert "stopped sending heartbeats" in err0 or "another task died" in err0, err0[-3000:]
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]

    out = report(finish(launch(tmp_path, run, ckpt_every=2, resume=True)))
    assert out["status"] == "done" and out["step"] == STEPS
    two_run, two_outs = two
    assert out["losses"] == two_outs[0]["losses"][4:]
    for a, b in zip(params(run / "final0.npz"), params(two_run / "final0.npz")):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_every_process_at_the_same_step(two, tmp_path, sig):
    run = tmp_path / "run"
    # process 1 gets the signal while preparing step 3's batch (built once step 0 has
    # taken its batch: batches are built two ahead, and earlier the loop's handlers are
    # not yet in place); JAX's preemption service tells process 0, and both save the same
    # step and exit with 143 (SIGINT is relayed as a SIGTERM so that the job agrees on
    # the step)
    results = finish(launch(tmp_path, run, signal_at=3, signal=sig))
    assert [rc for rc, _, _ in results] == [143, 143], results[1][2][-3000:]
    outs = [json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in results]
    assert outs[0]["status"] == outs[1]["status"] == "preempted"
    assert outs[0]["step"] == outs[1]["step"] < STEPS, results[1][2][-3000:]
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [outs[0]["step"]]
    out = report(finish(launch(tmp_path, run, resume=True)))
    two_run, _ = two
    for a, b in zip(params(run / "final0.npz"), params(two_run / "final0.npz")):
        np.testing.assert_array_equal(a, b)
    assert out["step"] == STEPS


def test_processes_that_disagree_on_the_run_stop(tmp_path):
    results = finish(launch(tmp_path, tmp_path / "run", differ=True))
    for rc, _, err in results:
        assert rc == 1 and "differs between processes" in err, err[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists() or \
        not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.slow
def test_train_py_on_two_processes(tmp_path):
    corpus = tmp_path / "docs.txt"
    from pydoc_data.topics import topics

    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]))
    one = tmp_path / "one"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"),
                           *TP.cli_args(corpus, tmp_path / "cache1", one, "--mesh", MESH)],
                          cwd=ROOT, env=env(8), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run, port = tmp_path / "run", free_port()
    args = TP.cli_args(corpus, tmp_path / "cache2", run, "--mesh", MESH,
                       "--coordinator-address", f"localhost:{port}", "--num-processes", "2",
                       "--heartbeat-timeout", str(HEARTBEAT))
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args,
                               "--process-id", str(pid)], cwd=ROOT, env=env(4),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in (0, 1)]
    results = finish(procs, timeout=600)
    assert [rc for rc, _, _ in results] == [0, 0], results[0][2][-3000:]
    assert "final validation loss" in results[0][1]
    assert "final validation loss" not in results[1][1]  # process 1 prints nothing more
    for name in ("config.json", "tokenizer", "loss.png", "checkpoints"):
        assert (run / name).exists(), name
    a, b = TP.read_metrics(one), TP.read_metrics(run)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "val_loss"):
            if key in x:
                np.testing.assert_allclose(y[key], x[key], atol=1e-5)
