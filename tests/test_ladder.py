"""The model ladder (gptjax.scaling.ladder) and its command line (python -m gptjax.scaling).

One tiny ladder (four rungs and a target of a few steps each, byte tokens, context 16,
a small JSON-lines corpus and task) is trained once per module; the tests read it, rerun
it (nothing retrained), interrupt a rung (it resumes) and feed the command bad input
(exit 2, nothing trained).
"""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from gptjax.cli import scaling as cli
from gptjax.cli import train as train_cli
from gptjax.config import PRESETS
from gptjax.data.tokenizer import ByteTokenizer
from gptjax.finetune.transforms import Example
from gptjax.scaling import fits, ladder
from gptjax.train.loop import LoopConfig
from gptjax.train.optim import OptimConfig
from gptjax.train.pretrain import DataConfig

# Rungs 8, 16 (1 layer), 24, 32 (2 layers), target 64 (4 layers) at aspect 16, 4 heads;
# 0.01 tokens per parameter: 1, 2, 4 and 6 steps, the target 34, 36x the largest rung.
SIZES, TARGET = [8, 16, 24, 32], 64


def _write_corpus(folder: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    words = "the a cat dog sat on mat ran to house big small red blue and then it was".split()
    corpus = folder / "corpus.jsonl"
    with corpus.open("w") as f:
        for _ in range(300):
            sentences = (" ".join(rng.choice(words, size=rng.integers(4, 9))) for _ in range(4))
            f.write(json.dumps({"text": ". ".join(sentences) + "."}) + "\n")
    task = folder / "task.jsonl"
    with task.open("w") as f:
        for i in range(8):
            choices = [" mat", " house", " dog", " qq"]
            f.write(json.dumps({"context": "the cat sat on the", "choices": choices,
                                "label": i % 2}) + "\n")
    return corpus, task


def _argv(folder: Path, corpus: Path, task_file: Path, **changes) -> list[str]:
    settings = {"out-dir": folder / "ladder", "preset": "tiny",
                "sizes": ",".join(map(str, SIZES)), "target": TARGET, "aspect": 16,
                "n-head": 4, "tokens-per-param": 0.01, "n-ctx": 16, "batch-size": 4,
                "eval-every": 0, "ckpt-every": 2, "keep": 10, "data": corpus,
                "val-fraction": 0.1, "cache-dir": folder / "cache", "task": task_file,
                "n-bootstrap": 20, "compile-cache": "", "async-checkpoint": "false",
                "log-every": 1, "warmup-fraction": 0.1, "tokenizer": "byte"}
    settings.update(changes)
    argv = ["--quiet"]
    for key, value in settings.items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    return argv


class Trainings:
    """Counts the calls of train.py's job, and checks that the prediction is on disk
    before the target trains."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = ladder.run_training

        def counted(settings, *, resume, overwrite, quiet):
            run_dir = Path(settings.out_dir)
            if run_dir.name == "target":
                record = json.loads((run_dir.parent / ladder.LADDER_JSON).read_text())
                self.prediction_before_target = record["prediction"]
            self.calls.append((run_dir.name, resume))
            return real(settings, resume=resume, overwrite=overwrite, quiet=quiet)

        monkeypatch.setattr(ladder, "run_training", counted)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny ladder: (folder, argv, the calls of train.py's job, ladder.json)."""
    folder = tmp_path_factory.mktemp("ladder")
    corpus, task = _write_corpus(folder)
    argv = _argv(folder, corpus, task)
    with pytest.MonkeyPatch.context() as monkeypatch:
        trainings = Trainings(monkeypatch)
        assert cli.main(argv) == 0
    record = json.loads((folder / "ladder" / ladder.LADDER_JSON).read_text())
    return folder, argv, trainings, record


def test_a_ladder_trains_every_rung_and_the_target_into_run_folders(trained):
    folder, _, trainings, record = trained
    out = folder / "ladder"
    assert trainings.calls == [(f"w{w}", False) for w in SIZES] + [("target", False)]
    assert [r["name"] for r in record["rungs"]] == [f"w{w}" for w in SIZES]
    for r, width in zip(record["rungs"], SIZES):
        run_dir = out / "rungs" / f"w{width}"
        assert Path(r["run_dir"]) == run_dir
        for name in ("config.json", "metrics.jsonl", "checkpoints", "tokenizer", ladder.RECORD):
            assert (run_dir / name).exists(), (run_dir, name)
        saved = json.loads((run_dir / "config.json").read_text())
        # every rung uses the ladder's one tokenizer, its model from the rule
        assert saved["data"]["tokenizer"] == str((out / "tokenizer").resolve())
        layers, heads = ladder.shape(width, 16, 0, 4)
        assert (saved["model"]["n_layer"], saved["model"]["n_embd"],
                saved["model"]["n_head"]) == (r["n_layer"], width, heads) == (layers, width, 4)
        assert saved["model"]["vocab_size"] == ByteTokenizer().vocab_size
        cfg = PRESETS["tiny"].replace(**{k: saved["model"][k] for k in (
            "n_layer", "n_embd", "n_head", "n_ctx", "vocab_size")})
        steps = math.ceil(0.01 * fits.matmul_params(cfg) / (4 * 16))
        assert r["steps"] == steps == saved["loop"]["steps"]
        assert r["tokens"] == steps * 4 * 16
        # compute is the MFU's formula on the tokens trained
        assert r["compute"] == pytest.approx(fits.training_flops(cfg, r["tokens"]), rel=1e-12)
        assert saved["optim"]["warmup_steps"] == round(0.1 * steps)
        assert np.isfinite(r["val_loss"]) and 0 <= r["accuracy"] <= 1
    assert [r["n_layer"] for r in record["rungs"]] == [1, 1, 2, 2]
    assert record["target"]["n_layer"] == 4 and (out / "target" / ladder.RECORD).is_file()
    assert record["task"]["items"] == 8 and record["task"]["chance"] == 0.25


def test_the_prediction_is_written_before_the_target_trains(trained):
    _, _, trainings, record = trained
    before = trainings.prediction_before_target
    assert before["made_before_the_target_trained"] is True
    prediction = record["prediction"]
    assert prediction == before
    assert prediction["compute"] == record["target"]["compute"]
    assert prediction["compute_ratio"] >= ladder.MIN_COMPUTE_RATIO
    lo, hi = prediction["loss_interval"]
    assert lo <= prediction["loss"] <= hi
    lo, hi = prediction["accuracy_interval"]
    assert 0 <= lo <= hi <= 1
    result = record["result"]
    assert result["loss_error"] == pytest.approx(record["target"]["val_loss"]
                                                 - prediction["loss"])
    assert result["loss_inside"] == (prediction["loss_interval"][0]
                                     <= record["target"]["val_loss"]
                                     <= prediction["loss_interval"][1])
    fit = record["fits"]["loss"]
    assert fit["compute"] == [r["compute"] for r in record["rungs"]]
    # four rungs: no held-out check (three points cannot fit three parameters and test)
    assert record["held_out"] is None and any("held-out" in n for n in record["notes"])


def test_the_plot_is_written(trained):
    folder, *_ = trained
    png = folder / "ladder" / ladder.PLOT
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_reads_finished_runs_without_training(trained, monkeypatch, capsys):
    folder, argv, _, record = trained
    records = sorted((folder / "ladder").rglob(ladder.RECORD))
    mtimes = [p.stat().st_mtime_ns for p in records]
    trainings = Trainings(monkeypatch)
    assert cli.main(argv) == 0
    assert trainings.calls == []
    assert [p.stat().st_mtime_ns for p in records] == mtimes
    again = json.loads((folder / "ladder" / ladder.LADDER_JSON).read_text())
    assert again["rungs"] == record["rungs"] and again["target"] == record["target"]
    # the same prediction keeps when it was made
    assert again["prediction"] == record["prediction"]
    out = capsys.readouterr().out
    assert "w32: finished earlier" in out and "predicted" in out and "actual" in out


def test_an_interrupted_rung_resumes_from_its_checkpoint(trained, monkeypatch):
    """A rung stopped before its last step (its record and last checkpoint gone, as a
    killed run leaves it) continues from the checkpoint before; nothing else trains."""
    folder, argv, _, _ = trained
    rung = folder / "ladder" / "rungs" / "w32"
    steps = sorted(int(p.name) for p in (rung / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 6 and 4 in steps
    (rung / ladder.RECORD).unlink()
    shutil.rmtree(rung / "checkpoints" / "6")
    logged = (rung / "metrics.jsonl").read_text().splitlines()
    trainings = Trainings(monkeypatch)
    assert cli.main(argv) == 0
    assert trainings.calls == [("w32", True)]
    new = [json.loads(line) for line in (rung / "metrics.jsonl").read_text().splitlines()
           [len(logged):]]
    assert new and min(r["step"] for r in new if "loss" in r) > 4  # resumed after step 4
    assert (rung / ladder.RECORD).is_file()
    assert ladder.checkpoint_steps(rung)[-1] == 6


def test_a_run_made_with_other_settings_is_refused(trained, capsys):
    folder, argv, _, _ = trained
    assert cli.main(argv + ["--lr", "0.001"]) == 2
    assert "was made with other settings" in capsys.readouterr().err


@pytest.mark.parametrize("changes, message", [
    ({"target": 48}, r"only \d+\.\dx the largest rung w32 .* at most 1/30"),
    ({"sizes": "8,abc"}, "must be comma-separated widths"),
    ({"sizes": "8,8,16"}, "repeats a width"),
    ({"sizes": "8,18"}, "width 18 is not a multiple of n_head=4"),
    ({"head-size": 8, "n-head": None, "sizes": "8,12"}, "width 12 is not a multiple of "
                                                        "head_size=8"),
    ({"aspect": 0}, "aspect=0 must be >= 1"),
    ({"tokens-per-param": -1}, "tokens_per_param=-1.0 must be >= 0"),
    ({"warmup-fraction": 2}, "warmup_fraction=2.0 must lie in"),
    ({"n-layer": 3}, "the ladder sets --n-layer per run; use --aspect"),
    ({"warmup-steps": 3}, "use --warmup-fraction"),
    ({"steps": 5}, "--steps sets every run's length only with --tokens-per-param 0"),
    ({"target-run": "/nonexistent/run"}, "no such folder"),
    ({"task": "/nonexistent/task.jsonl"}, "no such file"),
    ({"preset": "gpt5"}, "invalid choice"),
])
def test_bad_input_exits_2_before_anything_trains(tmp_path, monkeypatch, capsys, changes,
                                                  message):
    corpus, task = _write_corpus(tmp_path)
    trainings = Trainings(monkeypatch)
    try:
        status = cli.main(_argv(tmp_path, corpus, task, **changes))
    except SystemExit as exit:  # argparse's own errors (a bad choice)
        status = exit.code
    assert status == 2
    assert trainings.calls == []
    assert not (tmp_path / "ladder" / "rungs").exists()
    assert re.search(message, capsys.readouterr().err)


def test_a_target_run_is_checked_against_the_ladder(trained, tmp_path, capsys):
    """--target-run reads a finished run; one with another context is refused."""
    folder, argv, _, _ = trained
    other = tmp_path / "other"
    shutil.copytree(folder / "ladder" / "target", other)
    config = json.loads((other / "config.json").read_text())
    config["model"]["n_ctx"] = 32
    (other / "config.json").write_text(json.dumps(config))
    assert cli.main(argv + ["--target-run", str(other)]) == 2
    assert "its n_ctx is 32, the ladder's 16" in capsys.readouterr().err


def test_help_shows_how_to_run_bigger_ladders(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    assert "--mesh fsdp=-1" in text and "--tokens-per-param" in text
    assert "(default: per run, max(1, round(width / aspect)))" in " ".join(text.split())


# ----------------------------------------------------------------------------- no training


def test_the_rule():
    assert [ladder.shape(w, 32, 8, 0) for w in (8, 24, 48, 72, 80, 128)] == [
        (1, 1), (1, 3), (2, 6), (2, 9), (3, 10), (4, 16)]  # halves round up
    assert ladder.shape(48, 32, 0, 4) == (2, 4)
    cfg = PRESETS["cpu-small"].replace(vocab_size=261, n_ctx=256)
    lad = ladder.LadderConfig(tokens_per_param=5.0)
    model = ladder.model_for(128, lad, cfg)
    assert (model.n_layer, model.n_embd, model.n_head) == (3, 128, 4)  # aspect 48
    n = fits.matmul_params(model)
    assert ladder.run_steps(model, 5.0, LoopConfig(batch_size=16)) == math.ceil(5 * n / 4096)
    assert ladder.run_steps(model, 0, LoopConfig(steps=77)) == 77
    # the ratio of a target trained loop.steps steps gives that target loop.steps back
    loop = LoopConfig(steps=600, batch_size=16)
    settings = ladder.LadderSettings(ladder.LadderConfig(), cfg, OptimConfig(), loop,
                                     DataConfig())
    ratio = ladder.tokens_per_param(settings, model)
    assert ratio == 600 * 16 * 256 / n and ladder.run_steps(model, ratio, loop) == 600
    with pytest.raises(ValueError, match="there is no target"):
        ladder.tokens_per_param(settings, None)


def test_the_default_demo_predicts_the_default_train_py_run():
    """The default ladder's target is `python train.py`'s run (the same model, recipe and
    600 steps), and its largest rung uses at most 1/30 of that compute."""
    _, settings = cli.parse([])
    _, run = train_cli.parse([])
    rungs, target, ratio = ladder.plan(settings, run.model.vocab_size)
    assert target.cfg == run.model
    assert target.settings.optim == run.optim
    assert (target.steps, target.settings.loop.batch_size) == (run.loop.steps,
                                                               run.loop.batch_size) == (600, 16)
    assert ladder.check_compute_ratio(rungs, target.name, target.compute) >= 30
    assert [r.cfg.n_embd for r in rungs] == settings.ladder.widths()
    for r in rungs:  # the same tokens per parameter as the target (up to a step)
        assert r.tokens / fits.matmul_params(r.cfg) == pytest.approx(ratio, rel=0.05)


def test_fit_ladder_held_out_and_compare():
    """On synthetic rungs from a known law: the held-out rung is predicted from the
    others, the target inside its interval, the comparison signed actual - predicted;
    both forms are fitted."""
    compute = np.geomspace(1e9, 1e11, 6)
    loss = 12.0 * (compute / 1e9) ** -0.3 + 1.5
    rng = np.random.default_rng(0)
    records = [{"compute": c, "val_loss": v * (1 + 0.003 * rng.standard_normal())}
               for c, v in zip(compute, loss)]
    args = dict(chance=None, n_bootstrap=200, seed=0, confidence=0.9)
    result, note = ladder.fit_ladder(records, irreducible=True, **args)
    assert result.capability is None and note == "no capability task"
    assert result.loss.irreducible and not result.other.irreducible
    target = 30 * compute[-1]
    prediction = result.predict(target)
    true = 12.0 * (target / 1e9) ** -0.3 + 1.5
    assert prediction["loss"] == pytest.approx(true, abs=0.05)
    assert prediction["loss_interval"][0] <= true <= prediction["loss_interval"][1]
    assert prediction["other"]["form"] == "L(C) = a * C**b"
    assert prediction["other"]["loss"] == result.other.predict(target)
    compared = ladder.compare(prediction, {"val_loss": true + 0.01})
    assert compared["loss_error"] == pytest.approx(true + 0.01 - prediction["loss"])
    assert compared["other_loss_error"] == pytest.approx(true + 0.01
                                                         - prediction["other"]["loss"])
    held, _ = ladder.fit_ladder(records[:-1], irreducible=True, **args)
    assert held.loss.predict(compute[-1]) == pytest.approx(loss[-1], rel=0.02)
    swapped, _ = ladder.fit_ladder(records, irreducible=False, **args)
    assert swapped.loss.c == 0 and swapped.other.c == result.loss.c
    assert ladder.fit_ladder(records[:3], irreducible=True, **args)[0] is None


def test_items_that_do_not_fit_the_context_are_dropped():
    items = [Example("context", choices=(" short", "x" * 10)),
             Example("context", choices=(" short", "x" * 20))]
    kept, dropped = ladder.fitting_items(items, ByteTokenizer(), 16)  # up to 14 tokens
    assert kept == items[:1] and dropped == 1
    with pytest.raises(ValueError, match="no task item fits n_ctx=8"):
        ladder.fitting_items(items, ByteTokenizer(), 8)
