"""The training benchmark harness: it runs for a tiny model and writes valid JSON.

A smoke test of `python -m gptjax.bench`, not a timed test: the figures are only
checked for being there and positive.
"""

import json
import math

import pytest

from gptjax import bench
from gptjax.config import PRESETS
from gptjax.train.loop import flops_per_token

TINY = ["--preset", "tiny", "--batch-size", "2", "--n-ctx", "16", "--steps", "2", "--rounds",
        "2", "--warmup", "1"]


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(TINY + ["--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["preset"] == "tiny" and result["tokens_per_step"] == 2 * 16
    jax_part = result["gptjax"]
    for key in ("trace_s", "compile_s", "pipelined_step_ms", "tokens_per_s", "mfu_causal",
                "mfu_palm", "loss"):
        assert _positive(jax_part[key]), key
    steps = jax_part["step_ms"]
    assert steps["n"] == 4 and steps["min"] <= steps["p10"] <= steps["median"] <= steps["max"]
    assert jax_part["mfu_palm"] > jax_part["mfu_causal"]
    assert _positive(result["peak_flops"]) and "pytorch" not in result
    assert "gptjax" in capsys.readouterr().out


def test_bench_compile_only(tmp_path):
    out = tmp_path / "compile.json"
    bench.main(["--preset", "tiny", "--batch-size", "2", "--n-ctx", "16", "--no-scan",
                "--compile-only", "--json", str(out)])
    result = json.loads(out.read_text())
    assert _positive(result["gptjax"]["compile_s"]) and "step_ms" not in result["gptjax"]
    assert result["model"]["scan_layers"] is False
    assert _positive(result["gptjax"]["memory"]["temp_size_mb"])


def test_bench_reference(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "ref.json"
    bench.main(TINY + ["--dropout", "0", "--reference", "--json", str(out)])
    result = json.loads(out.read_text())
    ref = result["pytorch"]
    assert ref["params"] == result["gptjax"]["params"]  # the same model, tied output
    assert ref["device"] == "cpu" and ref["compile"] is False and ref["autocast"] is None
    assert _positive(ref["step_ms"]["median"]) and _positive(result["speedup"])
    assert result["step_time_ratio"] == pytest.approx(1 / result["speedup"])
    # Both trained on one fixed batch of random tokens: the loss fell from log(vocab).
    vocab = PRESETS["tiny"].vocab_size
    for loss in (ref["loss"], result["gptjax"]["loss"]):
        assert 0 < loss < math.log(vocab)


def test_bench_config_follows_train_py():
    cfg = bench.bench_config("char")
    assert cfg.vocab_size == bench.CHAR_VOCAB and cfg.attn_pdrop == 0.0
    assert bench.bench_config("char", n_ctx=32, dropout=0.1).attn_pdrop == 0.1
    optim, steps = bench.recipe_optim("char")
    assert (optim.lr, optim.b2, optim.warmup_steps, steps) == (1e-3, 0.99, 100, 2000)
    flops = bench.step_flops(cfg, 10)
    per_token = flops_per_token(cfg)
    assert flops["causal"] == 10 * per_token
    assert flops["palm"] - flops["causal"] == 10 * 6 * cfg.n_layer * cfg.n_ctx * cfg.n_embd


def test_suite_summary_gathers_runs(tmp_path, capsys):
    """benchmarks/summarize.py, which both suite scripts end with: runs/*.json move into
    suite.json (earlier runs kept) and each becomes a table row."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "summarize.py"
    spec = importlib.util.spec_from_file_location("summarize", path)
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    runs = tmp_path / "runs"
    runs.mkdir()
    assert bench.main(TINY + ["--json", str(runs / "first.json")]) == 0
    assert summarize.main(str(tmp_path)) == 0
    assert bench.main(TINY + ["--no-scan", "--json", str(runs / "second.json")]) == 0
    capsys.readouterr()
    assert summarize.main(str(tmp_path)) == 0
    table = capsys.readouterr().out.splitlines()
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert sorted(suite) == ["first", "second"] and not list(runs.iterdir())
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["first"][5] == "scan" and rows["second"][5] == "loop"
    median = suite["second"]["gptjax"]["step_ms"]["median"]
    assert float(rows["second"][6]) == pytest.approx(median, abs=0.01)
    # A run with a reference gets its step time, precision and the speed-up.
    with_ref = dict(suite["first"], pytorch={"step_ms": {"median": 3.0}, "autocast": "bfloat16"},
                    speedup=1.25)
    (runs / "third.json").write_text(json.dumps(with_ref))
    capsys.readouterr()
    assert summarize.main(str(tmp_path)) == 0
    third = [line.split() for line in capsys.readouterr().out.splitlines()][-1]
    assert third[0] == "third" and third[-4:] == ["3.00", "ms", "bf16", "1.25x"]
