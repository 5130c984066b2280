"""BERT through finetune.py: its input layout for the four task kinds, its heads over the
pooled [CLS] against Hugging Face's, a BERT run or HF bert folder as --init, no LM loss."""

import contextlib
import io
import json
from pydoc_data.topics import topics

import jax
import numpy as np
import pytest

from gptjax.cli.finetune import main
from gptjax.cli.train import main as train_main
from gptjax.config import GPTConfig
from gptjax.finetune.heads import make_head
from gptjax.finetune.transforms import (
    BertSpecialIds,
    Example,
    encode_examples,
    make_loss_fn,
    make_predict_fn,
    truncate_pair,
)
from gptjax.model import init_params
from gptjax.train.checkpoint import RUN_CONFIG

SP = BertSpecialIds(cls=2, sep=3, pad=0)


def enc(text):
    return [int(x) for x in text.split()]


def test_bert_layout_of_each_kind():
    """[CLS] A [SEP] B [SEP] with segment ids, the head's index at [CLS] (0), padding
    masked; one sequence for similarity; one per answer for multiple choice."""
    cls = encode_examples("classification", [Example("41 42", label=1)], enc, SP, 16)
    assert cls.tokens.tolist() == [[[2, 41, 42, 3]]]
    assert cls.token_types.tolist() == [[[0, 0, 0, 0]]] and cls.extract.tolist() == [[0]]

    ent = encode_examples("entailment", [Example("51 52 53", "54", label=0),
                                         Example("55", "56 57", label=2)], enc, SP, 16)
    assert ent.tokens.tolist() == [[[2, 51, 52, 53, 3, 54, 3]], [[2, 55, 3, 56, 57, 3, 0]]]
    assert ent.token_types.tolist() == [[[0, 0, 0, 0, 0, 1, 1]], [[0, 0, 0, 1, 1, 1, 0]]]
    assert ent.mask.tolist() == [[[1] * 7], [[1] * 6 + [0]]]
    assert ent.extract.tolist() == [[0], [0]] and ent.labels.tolist() == [0, 2]

    sim = encode_examples("similarity", [Example("61 62", "71", label=1)], enc, SP, 16)
    assert sim.tokens.shape == (1, 1, 6)  # one order: BERT reads both texts at once
    assert sim.tokens.tolist() == [[[2, 61, 62, 3, 71, 3]]]

    mc = encode_examples("multiple_choice", [Example("81 82", choices=("91", "92 93"),
                                                     label=1)], enc, SP, 16)
    assert mc.tokens.tolist() == [[[2, 81, 82, 3, 91, 3, 0], [2, 81, 82, 3, 92, 93, 3]]]
    assert mc.token_types.tolist() == [[[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1]]]
    assert mc.choices.tolist() == [[1, 1]] and mc.extract.tolist() == [[0, 0]]
    assert set(mc.batch([0])) == {"tokens", "mask", "positions", "extract", "choices",
                                  "labels", "token_types"}


def test_bert_truncation_cuts_the_longer_segment():
    assert truncate_pair([1, 2, 3, 4, 5], [6, 7], 4) == ([1, 2], [6, 7], True)
    assert truncate_pair([1, 2], [3, 4, 5, 6], 4) == ([1, 2], [3, 4], True)
    assert truncate_pair([1], [2], 4) == ([1], [2], False)
    # n_ctx 9: a pair keeps 9 - 3 = 6 tokens between the three special tokens
    arrays = encode_examples("entailment", [Example("1 2 3 4 5 6 7", "8 9 10", label=0)],
                             enc, SP, 9)
    assert arrays.tokens.tolist() == [[[2, 1, 2, 3, 3, 8, 9, 10, 3]]]  # 7 + 3 -> 3 + 3
    assert arrays.n_truncated == 1
    single = encode_examples("classification", [Example("1 2 3 4 5 6 7 8", label=0)], enc,
                             SP, 6)
    assert single.tokens.tolist() == [[[2, 1, 2, 3, 4, 3]]]
    with pytest.raises(ValueError, match="no room"):
        encode_examples("entailment", [Example("1", "2", label=0)], enc, SP, 4)


@pytest.mark.parametrize("kind, hf_class, n_labels", [
    ("classification", "BertForSequenceClassification", 3),
    ("multiple_choice", "BertForMultipleChoice", 1),
])
def test_heads_over_the_pooled_cls_match_hugging_face(tmp_path, kind, hf_class, n_labels):
    """The transformer (padding masked, two segments) + the head over the pooled [CLS]
    give transformers' logits, float32, from the same weights (measured max difference
    1.5e-8 classification, 7.5e-9 multiple choice; asserted 1e-6), and the task loss its
    loss."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from gptjax import hf

    config = transformers.BertConfig(vocab_size=53, hidden_size=24, num_hidden_layers=2,
                                     num_attention_heads=3, intermediate_size=40,
                                     max_position_embeddings=32, num_labels=n_labels,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = getattr(transformers, hf_class)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(tmp_path / "hf")
    cfg, params = hf.load_pretrained(tmp_path / "hf")
    classifier = params.pop("classifier")
    name = "logits" if kind == "classification" else "score"
    head = make_head(kind, n_labels if kind == "classification" else None, dropout=0.0)
    head_params = {name: {"kernel": classifier["w"], "bias": classifier["b"]}}

    sp = BertSpecialIds(cls=2, sep=3, pad=0)
    rng = np.random.default_rng(0)

    def text(n):
        return " ".join(str(x) for x in rng.integers(5, 53, n))

    if kind == "classification":
        examples = [Example(text(5), label=2), Example(text(11), label=0),
                    Example(text(2), label=1)]
    else:
        examples = [Example(text(5), choices=(text(3), text(6), text(1)), label=2),
                    Example(text(9), choices=(text(2), text(4), text(7)), label=0)]
    arrays = encode_examples(kind, examples, enc, sp, 32)
    batch = arrays.batch(np.arange(len(examples)))
    assert (batch["mask"] == 0).any() and (batch["token_types"] == 1).any() == (
        kind == "multiple_choice")
    out = make_predict_fn(cfg, head, kind)({"gpt": params, "head": head_params}, batch)

    def t(x):
        x = torch.tensor(np.asarray(x), dtype=torch.long)
        return x[:, 0] if kind == "classification" else x

    labels = torch.tensor(batch["labels"], dtype=torch.long)
    with torch.no_grad():
        ref = model(input_ids=t(batch["tokens"]), attention_mask=t(batch["mask"]),
                    token_type_ids=t(batch["token_types"]), labels=labels)
    np.testing.assert_allclose(np.asarray(out), ref.logits.numpy(), atol=1e-6, rtol=0)
    loss, metrics = make_loss_fn(cfg, head, kind, lm_coef=0.0)(
        {"gpt": params, "head": head_params}, batch)
    np.testing.assert_allclose(float(loss), ref.loss.item(), atol=1e-5)
    assert float(metrics["lm_loss"]) == 0.0


def test_a_bert_has_no_lm_loss():
    cfg = GPTConfig(arch="bert", vocab_size=40, n_ctx=16, n_layer=1, n_head=2, n_embd=8,
                    norm="post")
    with pytest.raises(ValueError, match="no auxiliary language-modelling loss"):
        make_loss_fn(cfg, make_head("classification", 2), "classification", lm_coef=0.5)


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]))
    return path


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory, corpus):
    """bert-tiny pre-trained for a few steps by train.py's job (WordPiece on the corpus)."""
    base = tmp_path_factory.mktemp("bert_pretrained")
    args = ["--preset", "bert-tiny", "--data", str(corpus), "--n-ctx", "48", "--steps", "6",
            "--warmup-steps", "2", "--batch-size", "8", "--eval-every", "0",
            "--eval-batches", "1", "--samples", "0", "--async-checkpoint", "false",
            "--cache-dir", str(base / "cache"), "--out-dir", str(base / "run"), "--quiet"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert train_main(args) == 0
    return base / "run"


def _glue_sst2(folder, n_train=48, n_dev=24):
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
    return folder


def _args(init, out, *extra):
    return ["--init", str(init), "--out-dir", str(out), "--quiet", "--batch-size", "8",
            "--async-checkpoint", "false", *extra]


def test_bert_run_fine_tunes_above_chance(tmp_path, bert_run, capsys):
    """A BERT pre-trained by train.py learns a sentiment task in BERT's format: validation
    accuracy well above the majority class's share (0.71 here)."""
    data = _glue_sst2(tmp_path / "SST-2", n_train=96)
    out = tmp_path / "run"
    assert main(_args(bert_run, out, "--task", "sst2", "--data-dir", str(data),
                      "--epochs", "3", "--lr", "2e-3", "--model-dropout", "0",
                      "--head-dropout", "0")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["lm_coef"] == 0.0 and results["chance"] < 0.75
    assert results["best"]["val_accuracy"] >= 0.95
    saved = json.loads((out / RUN_CONFIG).read_text())
    assert saved["model"]["arch"] == "bert" and saved["task"]["lm_coef"] == 0.0
    assert "task sst2 (classification)" in capsys.readouterr().out


@pytest.mark.parametrize("task, n_sequences", [
    ("demo-classification", 1), ("demo-entailment", 1), ("demo-similarity", 1),
    ("demo-multiple-choice", 4)])
def test_every_demo_kind_runs_on_a_bert(tmp_path, bert_run, capsys, task, n_sequences):
    from gptjax.cli.finetune import parse
    from gptjax.finetune.run import run

    args = _args(bert_run, tmp_path / "run", "--task", task, "--demo-train", "16",
                 "--demo-validation", "8", "--demo-test", "8", "--epochs", "1")
    result = run(parse(args)[1], quiet=False)
    assert f"tokens x {n_sequences};" in capsys.readouterr().out  # sequences per example
    assert result.status == "done" and result.spec.name == task
    assert {"validation", "test"} <= set(result.split_metrics)
    state = result.train_result.state
    assert set(state["params"]) == {"gpt", "head"} and "pooler" in state["params"]["gpt"]
    assert (tmp_path / "run" / "predictions_test.tsv").is_file()
    head = state["params"]["head"]
    kernel = head["score" if task == "demo-multiple-choice" else "logits"]["kernel"]
    assert kernel.shape == (64, 1 if task == "demo-multiple-choice" else len(result.spec.labels))


def test_lm_coef_given_for_a_bert_is_refused(tmp_path, bert_run, capsys):
    data = _glue_sst2(tmp_path / "SST-2")
    out = tmp_path / "run"
    assert main(_args(bert_run, out, "--task", "sst2", "--data-dir", str(data),
                      "--lm-coef", "0.5")) == 2
    assert "lm_coef=0.5: the model is a BERT" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["--init", str(bert_run), "--help"])
    help_text = capsys.readouterr().out
    lm = help_text[help_text.index("--lm-coef FLOAT  "):]
    assert "(default: 0.0)" in lm[:600]  # a BERT's recipe has no LM loss


def test_init_from_a_hugging_face_bert_folder(tmp_path):
    """A bert folder (config.json, model.safetensors with a sequence classifier, vocab.txt)
    as --init: the encoder is fine-tuned, the checkpoint's classifier left out."""
    from gptjax import hf

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film",
             "fine", "awful", "great", "poor"]
    cfg = GPTConfig(arch="bert", vocab_size=len(words), n_ctx=16, n_layer=1, n_head=2,
                    n_embd=16, norm="post", activation="gelu", layer_norm_epsilon=1e-12,
                    scale_residual_init=False)
    params = init_params(cfg, jax.random.PRNGKey(3))
    params["classifier"] = {"w": np.zeros((16, 2), np.float32), "b": np.zeros(2, np.float32)}
    folder = tmp_path / "bert-tiny-hf"
    hf.save_pretrained(cfg, params, folder)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    data = _glue_sst2(tmp_path / "SST-2", n_train=16, n_dev=8)
    out = tmp_path / "run"
    assert main(_args(folder, out, "--task", "sst2", "--data-dir", str(data), "--epochs",
                      "1")) == 0
    saved = json.loads((out / RUN_CONFIG).read_text())
    assert saved["model"]["arch"] == "bert" and saved["model"]["vocab_size"] == len(words)
    from gptjax.train.checkpoint import load_run

    _, trained, tokenizer = load_run(out)
    assert "classifier" not in trained["gpt"] and tokenizer.kind == "wordpiece"
    assert tokenizer.encode("a good film") == [5, 6, 8]


def test_bert_fine_tuning_resumes_exactly(tmp_path, bert_run):
    from gptjax.cli.finetune import parse
    from gptjax.finetune.run import run

    data = _glue_sst2(tmp_path / "SST-2", n_train=16, n_dev=8)

    def args(name):
        return _args(bert_run, tmp_path / name, "--task", "sst2", "--data-dir", str(data),
                     "--epochs", "2")

    full = run(parse(args("full"))[1], quiet=True)
    cut = run(parse(args("cut"))[1], quiet=True, stop_after=3)  # inside epoch 2
    assert cut.status == "stopped"
    resumed = run(parse(args("cut") + ["--resume"])[1], resume=True, quiet=True)
    a, b = full.train_result.state["params"], resumed.train_result.state["params"]
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert full.best == resumed.best
