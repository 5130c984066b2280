"""The training benchmark harness: it runs for a tiny model and writes valid JSON.

A smoke test of `python -m gptjax.cli.bench`, not a timed test: the figures are only
checked for being there and positive.
"""

import json
import math

import numpy as np
import pytest

from gptjax import bench
from gptjax.cli import bench as cli_bench
from gptjax.config import PRESETS
from gptjax.train.flops import flops_per_token

TINY = ["--preset", "tiny", "--batch-size", "2", "--n-ctx", "16", "--steps", "2", "--rounds",
        "2", "--warmup", "1"]


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli_bench.main(TINY + ["--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["preset"] == "tiny" and result["tokens_per_step"] == 2 * 16
    assert result["model"]["kernels"] == "auto"  # train.py's default
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
    cli_bench.main(["--preset", "tiny", "--batch-size", "2", "--n-ctx", "16", "--no-scan",
                    "--kernels", "reference", "--compile-only", "--json", str(out)])
    result = json.loads(out.read_text())
    assert _positive(result["gptjax"]["compile_s"]) and "step_ms" not in result["gptjax"]
    assert result["model"]["scan_layers"] is False and result["model"]["kernels"] == "reference"
    assert _positive(result["gptjax"]["memory"]["temp_size_mb"])


def _reference_checks(result):
    """What holds of every run with a reference: the fastest variant is the one named, its
    figures are the entry's, the ratio is taken against it, and every variant trained the
    same model on the same batch (the losses agree)."""
    ref = result["pytorch"]
    variants = ref["variants"]
    best = min(variants, key=lambda name: variants[name]["step_ms"]["median"])
    assert ref["best"] == best and ref["step_ms"] == variants[best]["step_ms"]
    assert ref["params"] == result["gptjax"]["params"]  # the same model, tied output
    assert result["step_time_ratio"] == pytest.approx(
        result["gptjax"]["step_ms"]["median"] / variants[best]["step_ms"]["median"])
    assert result["speedup"] == pytest.approx(1 / result["step_time_ratio"])
    fastest_pipelined = min(v["pipelined_step_ms"] for v in variants.values())
    assert result["pipelined_speedup"] == pytest.approx(
        fastest_pipelined / result["gptjax"]["pipelined_step_ms"])
    losses = [v["loss"] for v in variants.values()]
    assert max(losses) - min(losses) < 1e-3 * max(losses), losses
    for name, variant in variants.items():
        assert _positive(variant["step_ms"]["median"]) and _positive(variant["first_step_s"])
        assert variant["compile"] == name.startswith("compile+")
        assert variant["optimizer"] == "AdamW " + name.split("+")[1]


def test_bench_reference(tmp_path, capsys):
    """Every variant of the reference: eager and torch.compile, AdamW foreach and fused.
    torch.compile needs a working inductor (a C++ compiler on a CPU): where it has none,
    the run must say so, with the reason, and time the eager variants."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "ref.json"
    assert cli_bench.main(TINY + ["--dropout", "0", "--reference", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    ref = result["pytorch"]
    assert ref["device"] == "cpu" and ref["dtype"] == "float32" and ref["autocast"] is None
    eager = {"eager+foreach", "eager+fused"}
    if ref["adamw_fused"] != "available":  # torch without a fused CPU AdamW
        assert ref["adamw_fused"].startswith("unavailable (")
        assert f"AdamW fused: {ref['adamw_fused']}" in printed
        eager = {"eager+foreach"}
    if ref["torch_compile"] == "available":
        compiled = {name.replace("eager", "compile") for name in eager}
        assert set(ref["variants"]) == eager | compiled
    else:
        assert ref["torch_compile"].startswith("unavailable (") and len(ref["torch_compile"]) > 15
        assert f"torch.compile: {ref['torch_compile']}" in printed
        assert set(ref["variants"]) == eager
    _reference_checks(result)
    assert f"gptjax / best pytorch ({ref['best']})" in printed
    for name in ref["variants"]:
        assert f"  pytorch {name}" in printed
    # Both trained on one fixed batch of random tokens: the loss fell from log(vocab).
    vocab = PRESETS["tiny"].vocab_size
    for loss in (ref["loss"], result["gptjax"]["loss"]):
        assert 0 < loss < math.log(vocab)


def _break_torch_compile(monkeypatch):
    """torch.compile as it fails without a C++ compiler: lazily, at the first call."""
    import torch

    def compile(fn, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")
        return call

    monkeypatch.setattr(torch, "compile", compile)


def test_bench_reference_without_torch_compile(tmp_path, capsys, monkeypatch):
    """A torch.compile that fails: reported in the JSON and the output, with the reason, and
    the ratio taken against the best eager variant."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    _break_torch_compile(monkeypatch)
    out = tmp_path / "ref.json"
    assert cli_bench.main(TINY + ["--dropout", "0", "--reference", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    ref = json.loads(out.read_text())["pytorch"]
    reason = "unavailable (RuntimeError: InvalidCxxCompiler: No working C++ compiler found)"
    assert ref["torch_compile"] == reason
    assert "  torch.compile: " + reason in printed.splitlines()
    assert set(ref["variants"]) == {"eager+foreach", "eager+fused"}
    assert ref["adamw_fused"] == "available"  # torch 2.13 has a fused AdamW for CPU
    _reference_checks(json.loads(out.read_text()))


def test_reference_falls_back_to_eager(monkeypatch):
    """Compiled only, but torch.compile fails: the eager variant with the AdamW asked for
    is timed instead, and the reason kept."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    _break_torch_compile(monkeypatch)
    cfg = bench.bench_config("tiny", n_ctx=8, dropout=0.0)
    optim, _ = bench.recipe_optim("tiny")
    for adamw, expected in (("fused", ["eager+fused"]), ("all", ["eager+foreach"])):
        runners, status = bench.reference_runners(cfg, 2, optim, device="cpu", threads=1,
                                                   compile=True, adamw=adamw)
        assert [r.name for r in runners] == expected
        assert status["torch_compile"].startswith("unavailable (RuntimeError: InvalidCxx")
    runners, status = bench.reference_runners(cfg, 2, optim, device="cpu", threads=1,
                                              compile=False, adamw="foreach")
    assert [r.name for r in runners] == ["eager+foreach"]
    assert status == {"torch_compile": "not requested", "adamw_fused": "not requested"}


def test_bench_reference_in_a_subprocess(tmp_path):
    """--ref-process: the reference alone in a child process (as always on a GPU), its
    settings passed as BenchConfig's fields; one variant chosen by the settings."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "ref.json"
    assert cli_bench.main(TINY + ["--dropout", "0", "--reference", "--ref-process",
                                  "--threads", "1", "--no-ref-compile", "--ref-adamw",
                                  "fused", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    ref = result["pytorch"]
    assert ref["threads"] == 1 and list(ref["variants"]) == ["eager+fused"]
    assert ref["torch_compile"] == "not requested" and ref["best"] == "eager+fused"
    assert ref["step_ms"]["n"] == 4
    _reference_checks(result)


def test_bench_bf16_against_bf16_reference(tmp_path, capsys):
    """A bfloat16 gptjax is set against the reference under bf16 autocast only; there is
    no setting for a float32 reference beside it."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "bf16.json"
    assert cli_bench.main(TINY + ["--dropout", "0", "--dtype", "bfloat16", "--reference",
                                  "--no-ref-compile", "--ref-adamw", "foreach", "--json",
                                  str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"]["dtype"] == "bfloat16"
    assert result["pytorch"]["dtype"] == "bfloat16"
    assert result["pytorch"]["autocast"] == "bfloat16"
    assert _positive(result["speedup"])
    assert "bfloat16 autocast" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error:  # argparse: unrecognized arguments
        cli_bench.parse(TINY + ["--reference", "--ref-bf16", "false"])
    assert error.value.code == 2


def test_no_ratio_across_precisions_or_devices():
    assert bench.not_comparable("float32", "cpu", {"dtype": "float32", "device": "cpu"}) == ""
    assert "precision" in bench.not_comparable("bfloat16", "cpu",
                                               {"dtype": "float32", "device": "cpu"})
    assert "gptjax runs on cpu, the reference on cuda" == bench.not_comparable(
        "bfloat16", "cpu", {"dtype": "bfloat16", "device": "cuda"})


def test_bench_settings():
    settings = cli_bench.parse(["--preset", "char", "--no-scan", "--dtype", "none"])
    assert settings.scan is False and settings.dtype is None and settings.kernels == "auto"
    with pytest.raises(ValueError, match="batch_size=0"):
        cli_bench.parse(["--batch-size", "0"])
    assert cli_bench.main(["--batch-size", "0"]) == 2
    assert cli_bench.parse(["--ref-adamw", "fused"]).ref_adamw == "fused"
    with pytest.raises(SystemExit) as error:  # argparse: invalid choice
        cli_bench.parse(["--ref-adamw", "adam"])
    assert error.value.code == 2
    with pytest.raises(ValueError, match="ref_adamw='adam'"):
        bench.BenchConfig(ref_adamw="adam")


def test_bench_config_follows_train_py():
    cfg = bench.bench_config("char")
    assert cfg.vocab_size == bench.CHAR_VOCAB and cfg.attn_pdrop == 0.0
    assert cfg.kernels == "auto" and cfg.scan_layers is False  # as train.py runs it
    assert bench.bench_config("char", kernels="reference").kernels == "reference"
    assert bench.bench_config("char", n_ctx=32, dropout=0.1).attn_pdrop == 0.1
    optim, steps = bench.recipe_optim("char")
    assert (optim.lr, optim.b2, optim.warmup_steps, steps) == (1e-3, 0.99, 100, 2000)
    flops = bench.step_flops(cfg, 10)
    per_token = flops_per_token(cfg)
    assert flops["causal"] == 10 * per_token
    assert flops["palm"] - flops["causal"] == 10 * 6 * cfg.n_layer * cfg.n_ctx * cfg.n_embd


def _load_script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_suite_summary_gathers_runs(tmp_path, capsys):
    """benchmarks/summarize.py, which both suite scripts end with: runs/*.json move into
    suite.json (earlier runs kept) and each becomes a table row."""
    summarize = _load_script("summarize")
    runs = tmp_path / "runs"
    runs.mkdir()
    assert cli_bench.main(TINY + ["--json", str(runs / "first.json")]) == 0
    assert summarize.main(str(tmp_path)) == 0
    assert cli_bench.main(TINY + ["--no-scan", "--json", str(runs / "second.json")]) == 0
    capsys.readouterr()
    assert summarize.main(str(tmp_path)) == 0
    table = capsys.readouterr().out.splitlines()
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert sorted(suite) == ["first", "second"] and not list(runs.iterdir())
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["first"][5] == "scan" and rows["second"][5] == "loop"
    median = suite["second"]["gptjax"]["step_ms"]["median"]
    assert float(rows["second"][6]) == pytest.approx(median, abs=0.01)
    # A run with a reference: its fastest variant's step time, precision and name, and
    # the speed-up over it.
    with_ref = dict(suite["first"], speedup=1.25, pytorch={
        "step_ms": {"median": 3.0}, "autocast": None, "best": "compile+fused"})
    (runs / "third.json").write_text(json.dumps(with_ref))
    # An older run that set a bfloat16 gptjax against a float32 reference (and named no
    # variant): no speed-up is printed for it.
    mixed = dict(suite["first"], speedup=2.14, pytorch={
        "step_ms": {"median": 3.0}, "autocast": None, "compile": False,
        "optimizer": "AdamW foreach"})
    mixed["model"] = dict(mixed["model"], dtype="bfloat16")
    (runs / "fourth.json").write_text(json.dumps(mixed))
    capsys.readouterr()
    assert summarize.main(str(tmp_path)) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert rows["third"][-5:] == ["3.00", "ms", "fp32", "compile+fused", "1.25x"]
    assert rows["fourth"][-5:] == ["3.00", "ms", "fp32", "eager+foreach", "-"]
    assert rows["fourth"][4] == "bfloat16"


def test_decode_bench_asserts_same_tokens(capsys, monkeypatch):
    """benchmarks/decode_bench.py exits 0 only when gptjax and HF decode the same tokens,
    and otherwise names the row and position where they part."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    decode_bench = _load_script("decode_bench")
    argv = ["--preset", "tiny", "--batch", "3", "--prompt-len", "5", "--new-tokens", "6",
            "--repeats", "1", "--torch-threads", "1"]
    assert decode_bench.main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-1].split()[0] == "3" and table[-1].endswith("  same")

    bench_hf = decode_bench.bench_hf

    def changed(model, prompt, new_tokens, repeats, gpu):  # row 1 parts at new token 4
        seconds, tokens = bench_hf(model, prompt, new_tokens, repeats, gpu)
        tokens = tokens.copy()
        tokens[1, 4:] = (tokens[1, 4:] + 1) % model.config.vocab_size
        return seconds, tokens

    monkeypatch.setattr(decode_bench, "bench_hf", changed)
    assert decode_bench.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1].endswith("1 of 3 rows differ")
    error = captured.err.splitlines()
    assert error[0] == "gptjax and HF greedy tokens differ:" and len(error) == 2
    assert error[1].startswith("  batch 3, row 1, new token 4: gptjax ")
    assert decode_bench.token_differences(
        np.array([[1, 2, 3], [4, 5, 6]]), np.array([[1, 2, 3], [4, 0, 0]])) == [(1, 1)]
