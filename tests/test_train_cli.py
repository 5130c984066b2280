"""train.py end to end: a real run, SIGTERM and SIGKILL mid-run, and every bad input."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest

from gptjax.cli.train import main
from gptjax.train.checkpoint import Checkpointer, load_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 60 kB of real English from Python's bundled documentation."""
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]))
    return path


def base_args(corpus, cache, out, steps=6):
    return ["--preset", "tiny", "--data", str(corpus), "--tokenizer", "char",
            "--n-ctx", "32", "--batch-size", "4", "--steps", str(steps),
            "--warmup-steps", "1", "--eval-every", "3", "--eval-batches", "2",
            "--samples", "1", "--sample-tokens", "8", "--cache-dir", str(cache),
            "--out-dir", str(out), "--quiet"]


def snapshot(folder: Path):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns)
                  for p in folder.rglob("*") if p.is_file())


def test_a_real_run_and_its_folder(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(base_args(corpus, tmp_path / "cache", out)) == 0
    text = capsys.readouterr().out
    assert "final validation loss" in text and "--- sample 1 ---" in text
    for name in ("config.json", "metrics.jsonl", "loss.png", "tokenizer", "checkpoints"):
        assert (out / name).exists(), name
    saved = json.loads((out / "config.json").read_text())
    assert saved["preset"] == "tiny" and saved["model"]["n_ctx"] == 32
    assert saved["data"]["tokenizer"] == "char"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(np.isfinite(r["val_bpb"]) for r in evals)
    cfg, params, tokenizer = load_run(out)
    assert cfg.vocab_size == tokenizer.vocab_size and params["wte"].shape[0] == cfg.vocab_size


def test_config_file_and_overrides(corpus, tmp_path):
    cfg_file = tmp_path / "settings.toml"
    cfg_file.write_text('preset = "tiny"\n[model]\nn_layer = 1\n[loop]\nsteps = 2\n')
    out = tmp_path / "run"
    args = base_args(corpus, tmp_path / "cache", out, steps=2)
    args = [a for a in args if a not in ("--preset", "tiny")] + ["--config", str(cfg_file)]
    args[args.index("--steps") + 1] = "2"
    args += ["--n-head", "1", "--samples", "0"]
    assert main(args) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["n_layer"] == 1 and saved["model"]["n_head"] == 1


def run_cli(args, **kwargs):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def wait_for(predicate, proc, timeout=240):
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out")


def logged_steps(run: Path):
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line]


def final_params(run: Path):
    _, params, _ = load_run(run)
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def test_sigterm_saves_at_the_step_boundary_and_resume_matches(corpus, tmp_path):
    steps = 400
    cache = tmp_path / "cache"
    ref = tmp_path / "ref"
    args = ["--eval-every", "0", "--log-every", "1", "--samples", "0"]
    assert main(base_args(corpus, cache, ref, steps=steps) + args) == 0

    run = tmp_path / "run"
    proc = run_cli(base_args(corpus, cache, run, steps=steps) + args)
    wait_for(lambda: len(logged_steps(run)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-2000:]
    ckpt = Checkpointer(run / "checkpoints")
    saved = ckpt.steps()
    ckpt.close()
    assert len(saved) == 1 and 3 <= saved[0] < steps
    assert saved[0] >= max(logged_steps(run))
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if "tmp" in p.name]
    assert leftovers == []

    assert main(base_args(corpus, cache, run, steps=steps) + args + ["--resume"]) == 0
    for a, b in zip(final_params(run), final_params(ref)):
        np.testing.assert_array_equal(a, b)


def test_sigkill_restarts_from_the_last_finished_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    args = base_args(corpus, tmp_path / "cache", run, steps=400) + [
        "--eval-every", "0", "--ckpt-every", "5", "--samples", "0"]
    proc = run_cli(args)

    def has_checkpoint():
        folder = run / "checkpoints"
        return folder.exists() and any(p.name.isdigit() for p in folder.iterdir())

    wait_for(has_checkpoint, proc)
    time.sleep(0.5)
    proc.kill()
    proc.communicate()
    finished = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert finished
    resumed = base_args(corpus, tmp_path / "cache", run, steps=finished[-1] + 5)
    resumed += ["--eval-every", "0", "--ckpt-every", "5", "--samples", "0", "--resume"]
    # the schedule depends on --steps: resuming with a new length is allowed, the
    # optimizer state and step carry on from the checkpoint
    assert main(resumed) == 0
    records = logged_steps(run)
    assert records[-1] == finished[-1] + 5


@pytest.fixture()
def trained(corpus, tmp_path):
    out = tmp_path / "run"
    assert main(base_args(corpus, tmp_path / "cache", out, steps=2) + ["--samples", "0"]) == 0
    return out


def expect_error(capsys, args, *fragments):
    assert main(args) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_existing_run_folder_is_never_reused(corpus, tmp_path, trained, capsys):
    before = snapshot(trained)
    expect_error(capsys, base_args(corpus, tmp_path / "cache", trained, steps=2),
                 "exists", "--resume", "--overwrite")
    assert snapshot(trained) == before


def test_resume_with_another_architecture_or_tokenizer(corpus, tmp_path, trained, capsys):
    before = snapshot(trained)
    args = base_args(corpus, tmp_path / "cache", trained, steps=4) + ["--resume"]
    expect_error(capsys, args + ["--n-layer", "3"], "model differs", "n_layer")
    expect_error(capsys, args + ["--tokenizer", "byte"], "differs")
    assert snapshot(trained) == before


@pytest.mark.parametrize("problem", ["missing", "empty", "short"])
def test_bad_corpora(tmp_path, capsys, problem):
    corpus = tmp_path / "corpus.txt"
    if problem == "empty":
        corpus.write_text("   \n")
    elif problem == "short":
        corpus.write_text("too short for a window")
    out = tmp_path / "run"
    message = {"missing": str(corpus), "empty": "empty", "short": "window"}[problem]
    expect_error(capsys, base_args(corpus, tmp_path / "cache", out), message)
    assert not out.exists()


def test_out_of_range_token_in_token_file(corpus, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(base_args(corpus, cache, tmp_path / "a", steps=1) + [
        "--samples", "0", "--eval-every", "0"]) == 0
    (train_bin,) = list(cache.rglob("train.bin"))
    meta = json.loads((train_bin.parent / "meta.json").read_text())
    tokens = np.memmap(train_bin, dtype=meta["dtype"], mode="r+")
    tokens[7] = 5000
    tokens.flush()
    del tokens
    expect_error(capsys, base_args(corpus, cache, tmp_path / "b"),
                 str(train_bin), "offset 7", "5000", "vocabulary of size")
    assert not (tmp_path / "b").exists()


def test_tokenizer_larger_than_the_embedding(corpus, tmp_path, capsys):
    from gptjax.data.tokenizer import build_tokenizer

    tok_dir = tmp_path / "tok"
    build_tokenizer("bpe", [corpus.read_text()], 400).save(tok_dir)
    args = base_args(corpus, tmp_path / "cache", tmp_path / "run")
    args[args.index("--tokenizer") + 1] = str(tok_dir)
    expect_error(capsys, args + ["--vocab-size", "300"], "larger than the model's embedding",
                 "vocab_size=300")


def test_bad_settings(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = base_args(corpus, tmp_path / "cache", out)
    bad_key = tmp_path / "bad.json"
    bad_key.write_text(json.dumps({"n_layers": 2}))
    expect_error(capsys, args + ["--config", str(bad_key)], str(bad_key), "n_layers")
    bad_type = tmp_path / "bad.toml"
    bad_type.write_text('n_layer = "two"\n')
    expect_error(capsys, args + ["--config", str(bad_type)], "n_layer", "must be an int")
    expect_error(capsys, args + ["--warmup-steps", "100"], "warmup_steps=100 is longer")
    expect_error(capsys, args + ["--n-embd", "30", "--n-head", "4"], "n_embd=30")
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(args + ["--n-layer", "two"])


def bad_setting(problem, tmp_path):
    """(extra arguments, a fragment of the message) for a setting that fails a check."""
    import jax

    more = jax.local_device_count() + 1
    return {
        "devices": (["--batch-size", "7", "--devices", str(more)], f"devices={more}"),
        "mesh": (["--mesh", f"data={more}"], f"mesh 'data={more}'"),
        "batch": (["--batch-size", "7", "--grad-accum", "2"], "grad_accum=2"),
        "data": (["--data", str(tmp_path / "nowhere.txt")], "nowhere.txt"),
        "tokenizer": (["--tokenizer", str(tmp_path / "no-tokenizer")], "no-tokenizer"),
        "prompt": (["--sample-prompt", "x" * 40], "sample_prompt"),
    }[problem]


@pytest.mark.parametrize("problem", ["devices", "mesh", "batch", "data", "tokenizer", "prompt"])
def test_bad_input_writes_nothing(corpus, tmp_path, capsys, problem):
    """Every check runs before anything is written: exit 2, a message naming the problem,
    and no run folder, no token cache, no compilation cache afterwards (issue 12)."""
    out, cache, compiled = tmp_path / "run", tmp_path / "cache", tmp_path / "compiled"
    extra, message = bad_setting(problem, tmp_path)
    args = base_args(corpus, cache, out) + ["--compile-cache", str(compiled)] + extra
    expect_error(capsys, args, message)
    assert not out.exists() and not cache.exists() and not compiled.exists()


def test_bad_input_from_the_command_line_writes_nothing(corpus, tmp_path):
    """The issue's example, as a user types it: train.py with two devices on one."""
    import jax

    out = tmp_path / "x"
    more = str(jax.local_device_count() + 1)
    proc = run_cli(["--preset", "char", "--batch-size", "7", "--devices", more,
                    "--out-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2 and f"devices={more}" in err, err[-2000:]
    assert not out.exists() and not (tmp_path / "cache").exists()


def help_text(capsys, args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def option_help(text: str, option: str) -> str:
    """The help of one option (its metavar first), up to the next option or group, with
    argparse's line breaks undone."""
    match = re.search(rf"^ +{re.escape(option)} (.*?)(?=\n +-|\n\n|\Z)", text,
                      re.MULTILINE | re.DOTALL)
    assert match, option
    return " ".join(match.group(1).split())


@pytest.fixture(autouse=True)
def wide_help(monkeypatch):
    """No line breaks inside words (argparse breaks "cpu-small" at its hyphen)."""
    monkeypatch.setenv("COLUMNS", "400")


def test_help_documents_every_option(capsys):
    text = help_text(capsys, ["--help"])
    for option in ("--n-layer", "--lr", "--warmup-steps", "--batch-size", "--grad-accum",
                   "--tokenizer", "--data", "--resume", "--overwrite", "--config",
                   "--attention-band", "--tensorboard", "--keep", "--kernels"):
        assert option in text
    assert "MLP hidden width" in text  # the field comments become help text
    assert "(default: None)" not in text and "(default: )" not in text
    assert "(default: 50257)" not in text  # GPTConfig's own vocab_size is not what runs
    # the cpu-small preset (the default) and its recipe, not the dataclass defaults
    assert option_help(text, "--n-embd").endswith("(default: 192)")
    assert option_help(text, "--steps").endswith("(default: 600)")
    assert option_help(text, "--out-dir").endswith("(default: runs/cpu-small)")
    assert option_help(text, "--kernels").endswith("(default: auto)")  # train.py's choice
    # enumerated settings list their choices
    for option, choices in (("--activation", "{gelu_tanh,gelu,relu}"), ("--norm", "{post,pre}"),
                            ("--dtype", "{float32,bfloat16,float16}"),
                            ("--kernels", "{reference,fast,auto}"),
                            ("--attention", "{auto,xla,cudnn}"),
                            ("--schedule", "{cosine,linear,constant}"),
                            ("--parallel", "{auto,pmap,jit,mesh}"),
                            ("--tokenizer", "{bpe,wordpiece,char,byte,PATH}")):
        assert option_help(text, option).startswith(choices), option
    assert "cpu-small, gpt1-tiny" in option_help(text, "--preset")


def test_help_shows_what_the_chosen_preset_and_files_use(capsys, tmp_path):
    text = help_text(capsys, ["--preset", "char", "--help"])
    expected = {"--n-layer": "4", "--n-embd": "128", "--n-ctx": "64", "--lr": "0.001",
                "--warmup-steps": "100", "--batch-size": "12", "--steps": "2000",
                "--b2": "0.99", "--scan-layers": "false", "--attn-pdrop": "0.0",
                "--preset": "char", "--out-dir": "runs/char"}
    for option, value in expected.items():
        assert option_help(text, option).endswith(f"(default: {value})"), option
    assert "(default: the size of the char tokenizer" in option_help(text, "--vocab-size")
    assert "(default" not in option_help(text, "--n-inner")  # None: the comment says
    # a config file and the options given come above the preset
    settings = tmp_path / "s.toml"
    settings.write_text('preset = "gpt2"\n[model]\nn_layer = 3\n')
    text = help_text(capsys, ["--config", str(settings), "--lr", "3e-4", "-h"])
    assert option_help(text, "--n-layer").endswith("(default: 3)")
    assert option_help(text, "--n-embd").endswith("(default: 768)")  # gpt2's
    assert option_help(text, "--lr").endswith("(default: 0.0003)")
    assert option_help(text, "--tokenizer").endswith("(default: bpe)")


def test_options_parse_as_before():
    from gptjax.cli.train import parse

    options, settings = parse(["--overwrite", "--out-dir", "r", "--scan-layers", "false",
                               "--no-async-checkpoint", "--n-inner", "none", "--quiet"])
    assert options.overwrite and options.quiet and not options.resume
    assert settings.model.scan_layers is False and settings.loop.async_checkpoint is False
    assert settings.model.n_inner is None and settings.out_dir == Path("r")
    with pytest.raises(SystemExit):
        parse(["--norm", "sideways"])  # not one of the choices: argparse's exit 2
