"""BERT through train.py's job and the sample command: pre-training on the built-in corpus,
exact resume, the parallel runners, fill-mask, and the settings a BERT or a GPT refuses."""

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from pydoc_data.topics import topics

import jax
import numpy as np
import pytest

from gptjax.cli import sample as sample_cli
from gptjax.cli.train import main as train_main
from gptjax.cli.train import parse
from gptjax.config import GPTConfig
from gptjax.data.corpus import load_token_data
from gptjax.data.mlm import BertVocab, Documents
from gptjax.data.tokenizer import ByteTokenizer
from gptjax.fill_mask import encode_masked, fill_mask
from gptjax.model import forward, init_params, mlm_logits
from gptjax.train.checkpoint import RUN_CONFIG, TOKENIZER_DIR, Checkpointer, load_run
from gptjax.train.pretrain import make_mlm_eval_fn, run

ROOT = Path(__file__).resolve().parents[1]


def quiet_main(argv):
    """train.py's main with its printed output captured: (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = train_main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory):
    """bert-tiny pre-trained by train.py's job on the built-in corpus (WordPiece trained on
    it to 512 tokens): 60 steps of 16 pairs of 64 tokens, every step logged."""
    base = tmp_path_factory.mktemp("bert_builtin")
    out = base / "run"
    code, printed = quiet_main([
        "--preset", "bert-tiny", "--steps", "60", "--warmup-steps", "5", "--batch-size", "16",
        "--eval-every", "30", "--eval-batches", "4", "--log-every", "1", "--samples", "2",
        "--cache-dir", str(base / "cache"), "--out-dir", str(out), "--quiet"])
    assert code == 0
    return out, printed, base / "cache"


def records(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bert_pretrains_on_the_builtin_corpus(builtin_run):
    out, printed, cache = builtin_run
    saved = json.loads((out / RUN_CONFIG).read_text())
    assert saved["preset"] == "bert-tiny" and saved["model"]["arch"] == "bert"
    assert saved["data"]["tokenizer"] == "wordpiece" and saved["data"]["mask_rate"] == 0.15
    cfg, params, tokenizer = load_run(out)
    assert tokenizer.kind == "wordpiece" and cfg.arch == "bert"
    assert {"wtt", "ln_e", "pooler", "mlm", "nsp"} <= set(params)

    logged = records(out)
    train = [r for r in logged if "loss" in r]
    evals = [r for r in logged if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 61))
    for r in train:  # the step's metrics carry BERT's two losses and accuracies
        assert r["loss"] == pytest.approx(r["mlm_loss"] + r["nsp_loss"], abs=1e-5)
        assert 0 <= r["mlm_accuracy"] <= 1 and 0 <= r["nsp_accuracy"] <= 1
    assert [r["step"] for r in evals] == [30, 60]
    last = evals[-1]
    assert set(last) >= {"val_loss", "val_mlm_loss", "val_mlm_ppl", "val_mlm_accuracy",
                         "val_nsp_loss", "val_nsp_accuracy"}
    assert last["val_loss"] == pytest.approx(last["val_mlm_loss"] + last["val_nsp_loss"])
    assert last["val_mlm_ppl"] == pytest.approx(np.exp(last["val_mlm_loss"]))

    # The same evaluation on the initial parameters (the run's seed 0): the MLM loss on the
    # held-out masked tokens has fallen clearly below where it started (about ln 512).
    data = load_token_data(next(p for p in cache.iterdir() if (p / "meta.json").is_file()))
    val = Documents.from_stream(data.val, eos_id=data.meta["eos_id"])
    evaluate = make_mlm_eval_fn(cfg, val, BertVocab.from_tokenizer(tokenizer), 16, 4,
                                {"mask_rate": 0.15, "short_seq_prob": 0.1})
    start = evaluate(init_params(cfg, jax.random.PRNGKey(0)))
    assert start["val_mlm_loss"] > 6.0
    assert last["val_mlm_loss"] < start["val_mlm_loss"] - 0.5
    assert evaluate(params)["val_mlm_loss"] == pytest.approx(last["val_mlm_loss"], abs=1e-5)
    head = np.mean([r["mlm_loss"] for r in train[:5]])
    tail = np.mean([r["mlm_loss"] for r in train[-5:]])
    assert tail < head - 0.5

    # The end of the run: BERT's summary and fill-mask samples, not generated text.
    assert "final validation MLM loss" in printed and "accuracy on masked tokens" in printed
    assert "--- fill-mask sample 1 ---" in printed and "--- fill-mask sample 2 ---" in printed
    assert "[MASK] was" in printed and "--- sample 1 ---" not in printed


def test_fill_mask_command_lists_the_top_tokens(builtin_run, capsys):
    out, _, _ = builtin_run
    text = "the [MASK] statement ends a [MASK] loop."
    assert sample_cli.main(["--run", str(out), "--fill-mask", text, "--top-k", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == text and len(lines) == 3
    cfg, params, tokenizer = load_run(out)
    ids = encode_masked(tokenizer, text)
    mask = tokenizer.token_id("[MASK]")
    assert ids[0] == tokenizer.token_id("[CLS]") and ids[-1] == tokenizer.token_id("[SEP]")
    assert ids.count(mask) == 2 and ids[1:-1] == (
        tokenizer.encode("the ") + [mask] + tokenizer.encode(" statement ends a ") + [mask]
        + tokenizer.encode(" loop."))
    # What the command lists is the MLM head's softmax at each [MASK], highest first.
    probs = np.asarray(jax.nn.softmax(mlm_logits(params, forward(
        params, np.array([ids], np.int32), cfg), cfg), axis=-1))[0]
    for k, (line, position) in enumerate(zip(lines[1:], np.flatnonzero(np.array(ids) == mask),
                                             strict=True)):
        assert line.startswith(f"[MASK] {k + 1}: ")
        listed = [entry.rsplit(" ", 1) for entry in line.split(": ", 1)[1].split(" | ")]
        best = np.argsort(-probs[position])[:4]
        assert [tok for tok, _ in listed] == [tokenizer.backend.id_to_token(int(i)) for i in best]
        np.testing.assert_allclose([float(p) for _, p in listed], probs[position][best],
                                   atol=6e-4)
    predictions = fill_mask(params, cfg, tokenizer, text, top_k=4)
    assert [p.position for p in predictions] == list(np.flatnonzero(np.array(ids) == mask))
    assert all(list(p.probs) == sorted(p.probs, reverse=True) for p in predictions)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]))
    return path


def small_args(corpus, cache, out, steps=8, *extra):
    return ["--preset", "bert-tiny", "--data", str(corpus), "--n-ctx", "32",
            "--batch-size", "4", "--steps", str(steps), "--warmup-steps", "2",
            "--eval-every", "4", "--eval-batches", "2", "--log-every", "1", "--samples", "0",
            "--async-checkpoint", "false", "--cache-dir", str(cache), "--out-dir", str(out),
            "--quiet", *extra]


def leaves(run_dir):
    _, params, _ = load_run(run_dir)
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params)]


def test_resume_is_bit_exact(corpus, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert train_main(small_args(corpus, cache, tmp_path / "ref")) == 0
    args = small_args(corpus, cache, tmp_path / "cut")
    options, settings = parse(args)
    first = run(settings, resume=False, overwrite=False, quiet=True, stop_after=5)
    assert first.status == "stopped" and int(first.state["step"]) == 5
    assert train_main(args + ["--resume"]) == 0
    for a, b in zip(leaves(tmp_path / "cut"), leaves(tmp_path / "ref"), strict=True):
        np.testing.assert_array_equal(a, b)
    ref, cut = records(tmp_path / "ref"), records(tmp_path / "cut")
    assert [r for r in cut if "val_loss" in r] == [r for r in ref if "val_loss" in r]
    assert [r["loss"] for r in cut if "loss" in r] == [r["loss"] for r in ref if "loss" in r]

    # BERT's masking is part of what a resumed run must match, with the model and tokenizer.
    capsys.readouterr()
    assert train_main(args + ["--resume", "--steps", "10", "--mask-rate", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "objective differs" in err and "mask_rate" in err


PARALLEL = textwrap.dedent("""
    import glob, json, sys
    import jax, numpy as np
    from gptjax.cli.train import parse
    from gptjax.data.corpus import load_token_data
    from gptjax.model import bert_loss, init_params
    from gptjax.train.checkpoint import load_run
    from gptjax.train.pretrain import make_objective, run
    base, args = sys.argv[1], sys.argv[2:]
    out = {"devices": jax.device_count()}
    for name, extra in (("one", ["--devices", "1", "--parallel", "jit"]),
                        ("pmap", ["--devices", "2", "--parallel", "pmap"]),
                        ("mesh", ["--mesh", "data=2"])):
        _, settings = parse(args + ["--out-dir", base + "/" + name, *extra])
        r = run(settings, resume=False, overwrite=False, quiet=True)
        out[name] = {"loss": r.history[0]["loss"], "val": r.evals[-1]["val_mlm_loss"]}
    # The batch of step 0 and the initial parameters, on this process's first device.
    cfg, _, tokenizer = load_run(base + "/one")
    _, settings = parse(args + ["--out-dir", base + "/unused"])
    data = load_token_data(glob.glob(base + "/cache/*")[0])
    batch = make_objective(settings, tokenizer, data, None).batch_fn(0)
    params = init_params(cfg, jax.random.PRNGKey(0))
    halves = [bert_loss(params, {k: v[2 * i:2 * i + 2] for k, v in batch.items()}, cfg)[0]
              for i in range(2)]
    out["halves"] = float(np.mean(halves))
    out["whole"] = float(bert_loss(params, batch, cfg)[0])
    print(json.dumps(out))
""")


def test_pmap_and_mesh_runners(corpus, tmp_path):
    """The first step's loss (same initial parameters, no dropout): the mesh runner's is the
    one-device loss of the whole batch; pmap's is the mean of the two devices' losses, each
    a mean over its own masked tokens (BERT's own TPU code averages per-core losses the
    same way). Training then runs to the end under each, with BERT's evaluation."""
    script = tmp_path / "parallel.py"
    script.write_text(PARALLEL)
    args = small_args(corpus, tmp_path / "cache", tmp_path / "unused", 2,
                      "--embd-pdrop", "0", "--attn-pdrop", "0", "--resid-pdrop", "0")
    args = args[: args.index("--out-dir")] + args[args.index("--out-dir") + 2:]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), *args], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2
    assert out["one"]["loss"] == pytest.approx(out["whole"], abs=1e-5)
    assert out["mesh"]["loss"] == pytest.approx(out["whole"], abs=1e-5)
    assert out["pmap"]["loss"] == pytest.approx(out["halves"], abs=1e-5)
    for name in ("one", "pmap", "mesh"):
        assert np.isfinite(out[name]["val"])


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    """A GPT run folder (config, byte tokenizer, one checkpoint) for the sample command."""
    cfg = GPTConfig(vocab_size=261, n_ctx=32, n_layer=1, n_head=2, n_embd=16)
    run_dir = tmp_path_factory.mktemp("gpt_run")
    (run_dir / RUN_CONFIG).write_text(json.dumps({"preset": "tiny", "model": cfg.to_dict()}))
    ByteTokenizer().save(run_dir / TOKENIZER_DIR)
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    ckpt.save(1, {"params": init_params(cfg, jax.random.PRNGKey(0))}, {})
    ckpt.close()
    return run_dir


@pytest.mark.parametrize("args, fragments", [
    (["--fill-mask", "a [MASK] film"], ["needs a BERT run", "arch='gpt'"]),
])
def test_gpt_run_refuses_fill_mask(gpt_run, capsys, args, fragments):
    assert sample_cli.main(["--run", str(gpt_run), *args]) == 2
    err = capsys.readouterr().err
    assert all(f in err for f in fragments), err


@pytest.mark.parametrize("args, fragments", [
    (["--fill-mask", "no mask here"], ["has no [MASK]"]),
    ([], ["is a BERT", "--fill-mask"]),
    (["--prompt", "The"], ["is a BERT", "does not generate"]),
    (["--fill-mask", "a [MASK] b", "--temperature", "0.5", "--num-samples", "2"],
     ["--temperature, --num-samples", "not used by --fill-mask"]),
])
def test_sample_command_bad_input_for_bert(builtin_run, capsys, args, fragments):
    out, _, _ = builtin_run
    assert sample_cli.main(["--run", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert all(f in err for f in fragments), err


def test_fill_mask_library_errors(builtin_run, gpt_run):
    out, _, _ = builtin_run
    cfg, params, tokenizer = load_run(out)
    with pytest.raises(ValueError, match=r"has no \[MASK\]"):
        fill_mask(params, cfg, tokenizer, "nothing masked")
    with pytest.raises(ValueError, match="more than the model's context"):
        fill_mask(params, cfg, tokenizer, "word " * 80 + "[MASK]")
    gpt_cfg, gpt_params, gpt_tok = load_run(gpt_run)
    with pytest.raises(ValueError, match="needs a BERT"):
        fill_mask(gpt_params, gpt_cfg, gpt_tok, "a [MASK]")
    with pytest.raises(ValueError, match=r"byte tokenizer has no \[MASK\] token"):
        encode_masked(gpt_tok, "a [MASK]")


@pytest.mark.parametrize("extra, fragments", [
    (["--sample-temperature", "0.5"], ["sample_temperature=0.5", "GPT-only", "arch='bert'"]),
    (["--sample-tokens", "20"], ["sample_tokens=20", "GPT-only"]),
    (["--tokenizer", "bpe"], ["tokenizer='bpe'", "wordpiece"]),
    (["--tokenizer", "char"], ["tokenizer='char'", "wordpiece"]),
    (["--samples", "1", "--sample-prompt", "no mask"], ["sample_prompt", "has no [MASK]"]),
    (["--mask-rate", "1.5"], ["mask_rate=1.5"]),
])
def test_bert_refuses_gpt_only_settings(corpus, tmp_path, capsys, extra, fragments):
    out = tmp_path / "run"
    assert train_main(small_args(corpus, tmp_path / "cache", out, 2, *extra)) == 2
    err = capsys.readouterr().err
    assert all(f in err for f in fragments), err
    assert not out.exists()


@pytest.mark.parametrize("extra, fragments", [
    (["--mask-rate", "0.2"], ["mask_rate=0.2", "BERT-only", "arch='gpt'"]),
    (["--short-seq-prob", "0.5"], ["short_seq_prob=0.5", "BERT-only"]),
    (["--arch", "bert"], ["tokenizer='char'", "wordpiece"]),
])
def test_gpt_refuses_bert_only_settings(corpus, tmp_path, capsys, extra, fragments):
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--data", str(corpus), "--tokenizer", "char", "--n-ctx", "32",
            "--steps", "2", "--warmup-steps", "1", "--cache-dir", str(tmp_path / "cache"),
            "--out-dir", str(out), "--quiet", *extra]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert all(f in err for f in fragments), err
    assert not out.exists()


def test_bert_recipes_and_help(capsys):
    from gptjax.train.pretrain import RECIPES, preset_settings

    base = preset_settings("bert-base")
    # BERT's paper, appendix A.2, and its released optimizer's eps and clipping.
    assert (base["lr"], base["warmup_steps"], base["schedule"], base["weight_decay"],
            base["batch_size"], base["n_ctx"], base["eps"], base["clip_norm"]) == (
        1e-4, 10_000, "linear", 0.01, 256, 512, 1e-6, 1.0)
    small, twin = preset_settings("bert-cpu-small"), RECIPES["cpu-small"]
    assert small["tokenizer"] == "wordpiece" and small["arch"] == "bert"
    assert small["lr"] == twin["lr"] / 2  # post-LN BERT: half cpu-small's peak rate
    assert all(small[k] == v for k, v in twin.items() if k not in ("tokenizer", "lr"))
    with pytest.raises(SystemExit):
        train_main(["--preset", "bert-cpu-small", "--help"])
    text = capsys.readouterr().out
    for option in ("--mask-rate", "--short-seq-prob", "wordpiece"):
        assert option in text
