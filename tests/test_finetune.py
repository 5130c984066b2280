"""finetune.py end to end on tiny models: GLUE-layout files, every task kind, predictions,
best checkpoint, exact resume, CLI errors. Plus the built-in demo tasks' construction."""

import inspect
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from gptjax.cli.finetune import main, parse
from gptjax.config import GPTConfig
from gptjax.data.tokenizer import ByteTokenizer
from gptjax.finetune.run import (
    TaskConfig,
    format_table,
    load_params,
    make_batch_fn,
    run,
)
from gptjax.model import init_params
from gptjax.train.checkpoint import RUN_CONFIG, TOKENIZER_DIR, Checkpointer
from gptjax.train.loop import train

TINY = GPTConfig(vocab_size=261, n_ctx=48, n_layer=1, n_head=2, n_embd=32,
                 embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A train.py-style run folder: config.json, tokenizer/, checkpoints/ (a byte tokenizer)."""
    run_dir = tmp_path_factory.mktemp("pretrained")
    (run_dir / RUN_CONFIG).write_text(json.dumps({"preset": "tiny", "model": TINY.to_dict()}))
    ByteTokenizer().save(run_dir / TOKENIZER_DIR)
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    ckpt.save(1, {"params": init_params(TINY, jax.random.PRNGKey(7))}, {})
    ckpt.close()
    return run_dir


def _glue_sst2(folder, n_train=24, n_dev=10):
    folder.mkdir(parents=True, exist_ok=True)
    words = ["good", "bad", "fine", "awful", "great", "poor"]
    rng = np.random.default_rng(0)

    def rows(n):
        out = ["sentence\tlabel"]
        for _ in range(n):
            w = words[rng.integers(len(words))]
            out.append(f"a {w} film \t{int(w in ('good', 'fine', 'great'))}")
        return out

    (folder / "train.tsv").write_text("\n".join(rows(n_train)) + "\n")
    (folder / "dev.tsv").write_text("\n".join(rows(n_dev)) + "\n")
    (folder / "test.tsv").write_text("index\tsentence\n0\ta good film\n1\ta bad film\n")
    return folder


def _args(pretrained, out, *extra):
    return ["--init", str(pretrained), "--out-dir", str(out), "--quiet", "--batch-size", "8",
            "--epochs", "2", "--lr", "1e-3", "--async-checkpoint", "false", *extra]


@pytest.fixture(scope="module")
def sst2_run(tmp_path_factory, pretrained):
    """One uninterrupted SST-2 run (GLUE layout), shared by the end-to-end and resume tests."""
    base = tmp_path_factory.mktemp("sst2")
    data = _glue_sst2(base / "SST-2")
    out = base / "run"
    args = _args(pretrained, out, "--task", "sst2", "--data-dir", str(data))
    return data, out, run(parse(args)[1], quiet=True)


def test_glue_sst2_end_to_end(sst2_run):
    data, out, result = sst2_run
    assert result.status == "done"
    table = format_table(result)
    assert "task sst2 (classification)" in table and "accuracy" in table
    results = json.loads((out / "results.json").read_text())
    assert [r["step"] for r in results["epochs"]] == [3, 6]  # evaluated every epoch
    lines = (out / "predictions_validation.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 11
    assert all(line.split("\t")[1] in ("0", "1") for line in lines[1:])
    test_lines = (out / "predictions_test.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in test_lines[1:]] == ["0", "1"]
    saved = json.loads((out / RUN_CONFIG).read_text())
    assert saved["model"]["vocab_size"] == 261 and saved["task"]["task"] == "sst2"
    assert (out / "best" / "params.safetensors").is_file()
    # the run folder loads like any other (fine-tuned params = gpt + head)
    from gptjax.train.checkpoint import load_run

    cfg, params, tok = load_run(out)
    assert set(params) == {"gpt", "head"} and tok.special_tokens["<extract>"] == 258


@pytest.mark.parametrize("kind, header, rows, columns, labels", [
    pytest.param("entailment", "p,h,y", ["it rains,it is wet,yes", "it rains,it is dry,no"] * 6,
                 "premise=p,hypothesis=h,label=y", "yes,no", marks=pytest.mark.slow),
    pytest.param("similarity", "a,b,s", ["a cat,a cat,4.5", "a cat,a car,1.0"] * 6,
                 "text_a=a,text_b=b,label=s", "", marks=pytest.mark.slow),
    ("multiple_choice", "q,c0,c1,c2,y", ["one two,three,zz,qq,0", "a b,c,xx,yy,0"] * 6,
     "context=q,choices=c0|c1|c2,label=y", ""),
])
def test_generic_files_every_kind(tmp_path, pretrained, kind, header, rows, columns, labels):
    f = tmp_path / "data.csv"
    f.write_text("\n".join([header, *rows]) + "\n")
    out = tmp_path / "run"
    extra = ["--task", "generic", "--kind", kind, "--columns", columns, "--train-file", str(f),
             "--validation-file", str(f), "--epochs", "1"]
    if labels:
        extra += ["--labels", labels]
    assert main(_args(pretrained, out, *extra)) == 0
    results = json.loads((out / "results.json").read_text())
    metric = results["metrics"][0]
    assert np.isfinite(results["best"][f"val_{metric}"])


def test_batch_fn_is_pure_and_visits_each_example_once_per_epoch(pretrained, tmp_path):
    from gptjax.finetune.transforms import Example, SpecialIds, encode_examples

    ex = [Example(str(i), label=i % 2) for i in range(10)]
    arrays = encode_examples("classification", ex, lambda t: [int(c) for c in t],
                             SpecialIds(10, 11, 12, 13), 8)
    batch_fn = make_batch_fn(arrays, 5, seed=3)
    first = np.concatenate([batch_fn(s)["tokens"][:, 0, 1] for s in (0, 1)])
    assert sorted(first.tolist()) == list(range(10))
    again = make_batch_fn(arrays, 5, seed=3)
    np.testing.assert_array_equal(again(3)["tokens"], batch_fn(3)["tokens"])


@pytest.mark.skipif("stop_after" not in inspect.signature(train).parameters,
                    reason="trainer without stop_after")
def test_resume_is_exact(tmp_path, pretrained, sst2_run):
    data, _, full = sst2_run
    args_b = _args(pretrained, tmp_path / "cut", "--task", "sst2", "--data-dir", str(data))
    first = run(parse(args_b)[1], quiet=True, stop_after=4)
    assert first.status == "stopped"
    resumed = run(parse(args_b + ["--resume"])[1], resume=True,
                  quiet=True)
    a, b = full.train_result.state["params"], resumed.train_result.state["params"]
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert full.best == resumed.best
    best = load_params(tmp_path / "cut" / "best", a)
    assert jax.tree_util.tree_structure(best) == jax.tree_util.tree_structure(a)


PARALLEL = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from gptjax.cli.finetune import parse
    from gptjax.finetune.run import run
    base, pretrained, data = sys.argv[1:4]
    out = {"devices": jax.device_count()}
    for name, extra in (("one", ["--devices", "1", "--parallel", "jit"]),
                        ("pmap8", ["--devices", "8"]),
                        ("mesh", ["--mesh", "data=2,fsdp=2,tensor=2"])):
        args = ["--init", pretrained, "--out-dir", base + "/" + name, "--quiet",
                "--batch-size", "8", "--epochs", "2", "--lr", "1e-3", "--log-every", "1",
                "--async-checkpoint", "false", "--head-dropout", "0", "--task", "sst2",
                "--data-dir", data, *extra]
        r = run(parse(args)[1], quiet=True)
        state = r.train_result.state
        np.savez(base + "/" + name + ".npz",
                 *[np.asarray(x) for x in jax.tree_util.tree_leaves(state["params"])])
        out[name] = {"losses": [h["loss"] for h in r.train_result.history],
                     "best": r.best, "status": r.status, "keys": sorted(state["params"])}
    print(json.dumps(out))
""")


def test_finetuning_on_eight_devices_equals_one(tmp_path, pretrained):
    """The {"gpt", "head"} tree through the shared loop's pmap and mesh modes: the same
    losses, parameters and validation results as one device (no dropout)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import test_parallel as TP
    import test_train as TT

    data = _glue_sst2(tmp_path / "SST-2")
    script = tmp_path / "parallel.py"
    script.write_text(PARALLEL)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(pretrained),
                           str(data)], env=TP.sub_env(8), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    one = np.load(tmp_path / "one.npz")
    assert out["one"]["status"] == "done" and len(out["one"]["losses"]) == 6
    for name in ("pmap8", "mesh"):
        assert out[name]["status"] == "done" and out[name]["keys"] == ["gpt", "head"]
        np.testing.assert_allclose(out[name]["losses"], out["one"]["losses"], atol=1e-5)
        assert out[name]["best"]["step"] == out["one"]["best"]["step"]
        np.testing.assert_allclose(out[name]["best"]["val_loss"], out["one"]["best"]["val_loss"],
                                   atol=1e-5)
        other = np.load(tmp_path / f"{name}.npz")
        for key in one.files:
            np.testing.assert_allclose(other[key], one[key], atol=TT.PARAM_ATOL, err_msg=name)


def test_cli_help_and_bad_input(tmp_path, pretrained, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--lm-coef" in text and "--from-scratch" in text and "--table5" in text
    assert main(["--init", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    data = _glue_sst2(tmp_path / "SST-2")
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(_args(pretrained, out, "--task", "sst2", "--data-dir", str(data)))
    assert code == 2 and (out / "keep.txt").read_text() == "mine"
    assert "exists" in capsys.readouterr().err
    code = main(_args(pretrained, tmp_path / "r2", "--task", "rte", "--data-dir", str(data)))
    assert code == 2  # the SST-2 files do not fit RTE: a clear error, no run folder
    assert "do not fit task 'rte'" in capsys.readouterr().err
    assert main(_args(pretrained, tmp_path / "r3", "--lm-coef", "-1")) == 2
    more = str(jax.local_device_count() + 1)
    code = main(_args(pretrained, tmp_path / "r4", "--task", "sst2", "--data-dir", str(data),
                      "--devices", more))
    assert code == 2 and f"devices={more}" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("r", "r2", "r3", "r4"))


def test_help_shows_the_recipe_of_the_model(pretrained, capsys, monkeypatch):
    """--help resolves the settings first: the cpu recipe for a small --init model (its
    learning rate, batch and LM weight), the run folder named after the task, and what the
    epochs decide instead of LoopConfig's 2000 steps."""
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        main(["--init", str(pretrained), "--task", "sst2", "--help"])
    text = capsys.readouterr().out

    def help_of(option):  # the option's line and its help, up to the next option or group
        match = re.search(rf"^ +({re.escape(option)} .*?)(?=\n +-|\n\n|\Z)", text,
                          re.MULTILINE | re.DOTALL)
        return " ".join(match.group(1).split())

    assert help_of("--recipe").endswith("(default: cpu)")
    assert help_of("--lr").endswith("(default: 0.0005)")
    assert help_of("--batch-size").endswith("(default: 16)")
    assert help_of("--kernels").endswith("(default: auto)")
    assert help_of("--out-dir").endswith("(default: runs/finetune-sst2)")
    assert help_of("--steps").endswith("(default: epochs x full batches per epoch)")
    assert help_of("--lm-normalization").startswith("--lm-normalization {sequence,token}")
    with pytest.raises(SystemExit):
        main(["--init", str(pretrained), "--recipe", "gpt1", "--steps", "7", "--help"])
    text = capsys.readouterr().out
    assert help_of("--lr").endswith("(default: 6.25e-05)")
    assert help_of("--steps").endswith("(default: 7)")


def test_checkpoint_whose_tokenizer_lacks_the_special_tokens(tmp_path, capsys):
    """A run folder holding a plain tokenizer.json without <start> etc.: the loader appends
    them, finetune gives them embedding rows and says so; the source run is untouched."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    words = ["[UNK]", "a", "good", "bad", "film", "fine", "awful", "great", "poor"]
    backend = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                                    unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    run_dir = tmp_path / "plain"
    (run_dir / TOKENIZER_DIR).mkdir(parents=True)
    backend.save(str(run_dir / TOKENIZER_DIR / "tokenizer.json"))
    cfg = TINY.replace(vocab_size=len(words))
    (run_dir / RUN_CONFIG).write_text(json.dumps({"model": cfg.to_dict()}))
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    ckpt.save(1, {"params": init_params(cfg, jax.random.PRNGKey(0))}, {})
    ckpt.close()
    before = sorted(p.name for p in run_dir.rglob("*"))
    data = _glue_sst2(tmp_path / "SST-2", n_train=8, n_dev=4)
    out = tmp_path / "run"
    args = _args(run_dir, out, "--task", "sst2", "--data-dir", str(data), "--epochs", "1")
    assert main([a for a in args if a != "--quiet"]) == 0
    assert "lacked the special tokens" in capsys.readouterr().out
    saved = json.loads((out / RUN_CONFIG).read_text())
    assert saved["model"]["vocab_size"] == len(words) + 5  # <eos> comes along too
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_init_from_hugging_face_folder(tmp_path, capsys):
    """An openai-gpt folder (config.json + model.safetensors + tokenizer.json without the
    task tokens): loaded by hf.load_pretrained, the task tokens added with a message."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    from gptjax import hf

    words = ["[UNK]", "a", "good", "bad", "film", "fine", "awful", "great", "poor"]
    cfg = TINY.replace(vocab_size=len(words), norm="post")
    folder = tmp_path / "openai-gpt-tiny"
    hf.save_pretrained(cfg, init_params(cfg, jax.random.PRNGKey(1)), folder)
    backend = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                                    unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(folder / "tokenizer.json"))
    data = _glue_sst2(tmp_path / "SST-2", n_train=8, n_dev=4)
    out = tmp_path / "run"
    args = _args(folder, out, "--task", "sst2", "--data-dir", str(data), "--epochs", "1")
    assert main([a for a in args if a != "--quiet"]) == 0
    assert "lacked the special tokens ['<start>', '<delim>', '<extract>', '<pad>']" in \
        capsys.readouterr().out
    saved = json.loads((out / RUN_CONFIG).read_text())
    assert saved["model"]["vocab_size"] == len(words) + 4 and saved["model"]["norm"] == "post"


def test_task_config_validation():
    with pytest.raises(ValueError, match="lm_normalization"):
        TaskConfig(lm_normalization="batch")
    with pytest.raises(ValueError, match="epochs"):
        TaskConfig(epochs=0)


# ----------------------------------------------------------------------------- demo tasks


@pytest.fixture(scope="module")
def demo():
    from gptjax.finetune import demo_tasks

    return demo_tasks


def test_demo_tasks_are_deterministic_and_split_by_held_out_text(demo):
    docs = demo.documents()
    held = [d.text for d in docs if d.held_out]
    assert held and len(held) < len(docs) // 10
    held_text = " ".join(" ".join(held).split())
    for name in demo.DEMO_SPECS:
        a = demo.demo_task(name, 60, 40, n_test=30)
        b = demo.demo_task(name, 60, 40, n_test=30)
        assert a.splits == b.splits
        for split in ("validation", "test"):  # their text comes from held-out documents only
            for ex in a[split]:
                assert ex.text_a in held_text
        assert len(a["train"]) <= 60 and len(a["validation"]) <= 40 and len(a["test"]) <= 30
    assert demo.demo_name("multiple_choice") == "demo-multiple-choice"
    with pytest.raises(ValueError, match="unknown demo task"):
        demo.demo_name("ranking")


def test_demo_labels_are_what_the_docstring_says(demo):
    kinds = demo._docstring_kinds()
    by_first_paragraph = {}
    for text, kind in kinds.items():
        by_first_paragraph.setdefault(demo._first_paragraph(text), set()).add(kind)
    task = demo.demo_task("classification", 90, 30)
    names = task.spec.labels
    for ex in task["train"][:30]:
        assert names[ex.label] in by_first_paragraph[ex.text_a]
    mc = demo.demo_task("multiple_choice", 30, 10)
    corpus = "\n".join(d.text for d in demo.documents())
    flat = " ".join(corpus.split())
    for ex in mc["train"][:10]:
        assert f"{ex.text_a} {ex.choices[ex.label]}" in flat  # the answer follows the context
    ent = demo.demo_task("entailment", 30, 10)
    assert ent.spec.labels == ("follows", "precedes", "unrelated")
    for ex in ent["train"]:
        forward, backward = f"{ex.text_a} {ex.text_b}" in flat, f"{ex.text_b} {ex.text_a}" in flat
        # (a pair may occur both ways somewhere in the corpus: only the labelled way is checked)
        assert {0: forward, 1: backward, 2: not (forward or backward)}[ex.label]
    sim = demo.demo_task("similarity", 30, 10)
    for ex in sim["train"]:
        neighbours = f"{ex.text_a} {ex.text_b}" in flat or f"{ex.text_b} {ex.text_a}" in flat
        assert neighbours == (ex.label == 1)


def test_demo_validation_and_test_share_no_document(demo):
    """The held-out documents are dealt alternately to validation (where an epoch is
    chosen) and test (where it is reported): no document in both, none of train's, and
    every text of an example (and of its negatives) from its own split's documents."""
    docs = demo.documents()
    by_split = {s: [d for d in docs if d.split == s] for s in ("train", "validation", "test")}
    assert all(d.held_out == (d.split != "train") for d in docs)
    held = [d.split for d in docs if d.held_out]
    assert held == [("validation", "test")[i % 2] for i in range(len(held))]
    texts = {s: {d.text for d in ds} for s, ds in by_split.items()}
    assert texts["validation"].isdisjoint(texts["test"])
    assert texts["train"].isdisjoint(texts["validation"] | texts["test"])
    flat = {s: " ".join(" ".join(texts[s]).split()) for s in ("validation", "test")}
    for name in demo.DEMO_SPECS:
        task = demo.demo_task(name, 30, 40, n_test=40)
        assert task["validation"] and task["test"]
        for split in ("validation", "test"):
            for ex in task[split]:
                for text in (ex.text_a, ex.text_b, *ex.choices):
                    if text is not None:
                        assert text in flat[split], (name, split, text)


def _accuracy_of_predictions(path, spec, examples):
    """Accuracy of a predictions_SPLIT.tsv against the examples' labels, from the file."""
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    assert [uid for uid, _ in rows] == [ex.uid for ex in examples]
    return float(np.mean([spec.labels.index(value) == ex.label
                          for (_, value), ex in zip(rows, examples, strict=True)]))


def test_table5_chooses_on_validation_and_reports_test(tmp_path, pretrained, capsys,
                                                        monkeypatch):
    """--table5 end to end on a tiny model, one task, two seeds, two epochs: every run's
    epoch is the first best on validation, the number reported for it is its accuracy
    on the test split (recomputed here from predictions_test.tsv), and each cell is the
    mean and sample standard deviation of those numbers. Validation has 24 examples, half
    of each class, test 21: even a model that always says one class scores differently on
    the two, so reporting validation instead of test cannot pass."""
    import functools

    import gptjax.cli.finetune as cli_finetune
    from gptjax.finetune import run as run_module
    from gptjax.finetune.demo_tasks import demo_task

    task = "demo-similarity"
    monkeypatch.setattr(cli_finetune, "table5",
                        functools.partial(run_module.table5, tasks=(task,)))
    out = tmp_path / "t5"
    sizes = ["--demo-train", "32", "--demo-validation", "24", "--demo-test", "21"]
    args = _args(pretrained, out, "--table5", "--table5-seeds", "2", "--seed", "5",
                 "--max-length", "48", *sizes)
    assert main(args) == 0
    printed = capsys.readouterr().out
    data = demo_task(task, 32, 24, n_test=21)
    spec, test_examples = data.spec, data["test"]
    summary = json.loads((out / "table5.json").read_text())
    assert summary["seeds"] == [5, 6]
    runs = summary["runs"]
    conditions = [c[0] for c in run_module.TABLE5_CONDITIONS]
    assert [(r["condition"], r["seed"]) for r in runs] == \
        [(c, s) for c in conditions for s in (5, 6)]
    for r in runs:
        run_dir = Path(r["run_dir"])
        assert json.loads((run_dir / RUN_CONFIG).read_text())["loop"]["seed"] == r["seed"]
        results = json.loads((run_dir / "results.json").read_text())
        val = [e["val_accuracy"] for e in results["epochs"]]
        assert len(val) == 2 and r["validation_by_epoch"] == val
        chosen = int(np.argmax(val))  # the first best epoch on validation
        assert r["chosen_step"] == results["epochs"][chosen]["step"]
        assert r["validation"] == val[chosen]
        # the chosen epoch's params (best/) give the recorded validation score ...
        assert _accuracy_of_predictions(run_dir / "predictions_validation.tsv", spec,
                                        data["validation"]) == pytest.approx(r["validation"])
        # ... and the reported number is their accuracy on test, not on validation
        assert r["test"] == pytest.approx(_accuracy_of_predictions(
            run_dir / "predictions_test.tsv", spec, test_examples))
        assert r["n_test"] == len(test_examples) == 21
        share_same = np.mean([ex.label for ex in test_examples])
        assert r["test_chance"] == pytest.approx(max(share_same, 1 - share_same))
    table = (out / "table5.md").read_text()
    assert table.strip() in printed
    row = next(line for line in table.splitlines() if line.startswith(f"| {task} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == [task, "accuracy", "21"]
    for label, cell in zip(conditions, cells[4:], strict=True):
        scores = [r["test"] for r in runs if r["condition"] == label]
        assert cell == f"{np.mean(scores):.3f} ± {np.std(scores, ddof=1):.3f}"
    assert "sample standard deviation (ddof 1) over 2 seeds" in table
