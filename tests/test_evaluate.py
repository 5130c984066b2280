"""Likelihood evaluation: scoring == lm_loss, perplexity windows, bits per byte, few-shot
prompts, the task files, and both CLIs end to end on run and HF folders."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from gptjax import evaluate as E
from gptjax import hf
from gptjax.cli import sample
from gptjax.train.checkpoint import CHECKPOINT_DIR, RUN_CONFIG, TOKENIZER_DIR, Checkpointer
from gptjax.config import GPTConfig
from gptjax.model import forward, init_params, lm_loss, logits
from gptjax.finetune.transforms import Example
from gptjax.data.tokenizer import ByteTokenizer

jax.config.update("jax_default_matmul_precision", "highest")

# Byte-level: 256 bytes + 5 special tokens, <eos> = 260 is the start token.
CFG = GPTConfig(vocab_size=261, n_ctx=32, n_layer=2, n_head=2, n_embd=32,
                embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def params():
    # Larger weights than the default init, so that the model has opinions.
    p = init_params(CFG.replace(init_std=0.3), jax.random.PRNGKey(0))
    return p


def _random_requests(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 261, rng.integers(1, 12)).tolist(),
             rng.integers(0, 261, rng.integers(1, 8)).tolist()) for _ in range(n)]


def test_scores_equal_lm_loss_and_argmax(params):
    """Each request's summed log-probability is -lm_loss * count on the same tokens, and
    `greedy` says whether every continuation token is the argmax; batching changes nothing."""
    requests = _random_requests(9) + [([7], [7, 7])]
    scores = E.score_requests(params, CFG, requests)
    L = max(len(c) + len(x) for c, x in requests)
    tokens = np.zeros((len(requests), L), np.int32)
    weights = np.zeros((len(requests), L), np.float32)
    for i, (c, x) in enumerate(requests):
        tokens[i, : len(c) + len(x)] = c + x
        weights[i, len(c): len(c) + len(x)] = 1
    loss = jax.jit(lm_loss, static_argnames="cfg")
    z = np.asarray(jax.jit(lambda p, t: logits(p, forward(p, t, CFG)))(params, tokens))
    for i, (c, x) in enumerate(requests):
        only_i = np.zeros_like(weights)
        only_i[i] = weights[i]
        expected = -float(loss(params, tokens, cfg=CFG, weights=only_i)) * len(x)
        assert scores.logprob[i] == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert scores.n_tokens[i] == len(x)
        argmax = z[i, len(c) - 1: len(c) + len(x) - 1].argmax(-1)
        assert scores.greedy[i] == (argmax.tolist() == x)
    small = E.score_requests(params, CFG, requests, max_tokens=16)  # one row per batch
    np.testing.assert_allclose(small.logprob, scores.logprob, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(small.greedy, scores.greedy)


def test_long_requests_keep_their_last_n_ctx_tokens(params):
    context, continuation = list(range(40)), [5, 6, 7]
    cut = CFG.n_ctx + 1 - len(continuation)  # the model reads n_ctx, predicts the last
    a, b = E.score_requests(params, CFG, [(context, continuation),
                                          (context[-cut:], continuation)]).logprob
    assert a == pytest.approx(b, abs=1e-5)
    with pytest.raises(ValueError, match="continuation"):
        E.score_requests(params, CFG, [([1], [2] * (CFG.n_ctx + 1))])
    with pytest.raises(ValueError, match="empty context"):
        E.score_requests(params, CFG, [([], [2])])
    with pytest.raises(ValueError, match="outside"):
        E.score_requests(params, CFG, [([1], [261])])


def test_perplexity_windows(params):
    """Within one window it is lm_loss; with stride 1 every token t is conditioned on the
    n_ctx tokens before it (checked against a direct forward pass per window)."""
    tokens = np.random.default_rng(1).integers(0, 261, 70)
    window = tokens[None, : CFG.n_ctx + 1]
    short = E.perplexity(params, CFG, window[0])
    loss = float(jax.jit(lm_loss, static_argnames="cfg")(params, window, cfg=CFG))
    assert short["tokens"] == CFG.n_ctx
    assert short["nll_per_token"] == pytest.approx(loss, rel=1e-5)
    assert short["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)

    windows = np.zeros((len(tokens) - 1, CFG.n_ctx + 1), np.int32)
    last = np.zeros(len(tokens) - 1, int)  # index of the target within its window
    for t in range(1, len(tokens)):
        w = tokens[max(0, t - CFG.n_ctx): t + 1]
        windows[t - 1, : len(w)] = w
        last[t - 1] = len(w) - 1
    z = jax.jit(lambda p, t: jax.nn.log_softmax(logits(p, forward(p, t, CFG))))(
        params, windows[:, :-1])
    z = np.asarray(z)
    direct = -sum(z[i, last[i] - 1, windows[i, last[i]]] for i in range(len(last)))
    stride1 = E.perplexity(params, CFG, tokens, stride=1)
    assert stride1["tokens"] == len(tokens) - 1
    assert stride1["nll"] == pytest.approx(direct, rel=1e-5)
    default = E.perplexity(params, CFG, tokens)
    assert default["tokens"] == len(tokens) - 1
    for stride in (0, CFG.n_ctx + 1):
        with pytest.raises(ValueError, match="stride"):
            E.perplexity(params, CFG, tokens, stride=stride)


def test_bits_per_byte(params):
    """With a start token every byte of the text is scored: bits/byte = nats/token / ln 2."""
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé too."
    result = E.evaluate_text(params, CFG, TOK, text)
    n_bytes = len(text.encode("utf-8"))
    assert result["tokens"] == result["bytes"] == n_bytes
    assert result["bits_per_byte"] == pytest.approx(result["nll_per_token"] / math.log(2))
    direct = E.perplexity(params, CFG, [260] + list(text.encode("utf-8")))
    assert result["nll"] == pytest.approx(direct["nll"])


ITEMS = [Example(f"question {i}", choices=(f"a{i}", f"b{i}", f"c{i}"), label=i % 3)
         for i in range(6)]


def test_few_shot_prompt_is_deterministic():
    fmt = E.PromptFormat(k=1, template="Q: {context}\nA:", separator="\n\n")
    item = Example("2+2?", choices=("4", "5"), label=0)
    train = [Example("1+1?", choices=("2", "3"), label=0)]
    assert E.build_prompt(0, item, fmt, train) == ("Q: 1+1?\nA: 2\n\nQ: 2+2?\nA:", [" 4", " 5"])

    fmt = E.PromptFormat(k=3, seed=7, description="Answer the questions.")
    prompts = [E.build_prompt(i, item, fmt, ITEMS) for i, item in enumerate(ITEMS)]
    assert prompts == [E.build_prompt(i, item, fmt, ITEMS) for i, item in enumerate(ITEMS)]
    # A function of (seed, index) only: item 4 alone gets the same prompt.
    assert E.build_prompt(4, ITEMS[4], fmt, ITEMS) == prompts[4]
    for i, (text, choices) in enumerate(prompts):
        parts = text.split("\n\n")
        assert parts[0] == "Answer the questions." and len(parts) == 5
        assert parts[-1] == f"question {i}"
        assert f"question {i} " not in text  # never its own example
        assert choices == [f" a{i}", f" b{i}", f" c{i}"]
        for shot in parts[1:4]:
            j = int(shot.split()[1])
            assert shot == f"question {j} {ITEMS[j].choices[ITEMS[j].label]}"
    other = [E.build_prompt(i, item, E.PromptFormat(k=3, seed=8), ITEMS)
             for i, item in enumerate(ITEMS)]
    assert [p[0] for p in other] != [p[0].split("\n\n", 1)[1] for p in prompts]
    with pytest.raises(ValueError, match="only 5 other"):
        E.build_prompt(0, ITEMS[0], E.PromptFormat(k=6), ITEMS)


def test_multiple_choice_picks_the_likeliest(params):
    fmt = E.PromptFormat(k=2)
    scores = E.score_items(params, CFG, TOK, ITEMS, fmt=fmt, train=ITEMS)
    for i, s in enumerate(scores):  # each choice is its own request
        context, choices = E.build_prompt(i, ITEMS[i], fmt, ITEMS)
        direct = E.score_requests(params, CFG, [(TOK.encode(context), TOK.encode(c))
                                                for c in choices])
        np.testing.assert_allclose(s.logprob, direct.logprob, rtol=1e-5)
        np.testing.assert_array_equal(s.n_tokens, [3, 3, 3])
    result = E.evaluate_multiple_choice(params, CFG, TOK, ITEMS, fmt=fmt, train=ITEMS)
    labels = np.array([x.label for x in ITEMS])
    assert result["accuracy"] == pytest.approx(
        np.mean([np.argmax(s.logprob) for s in scores] == labels))
    assert result["accuracy_mean"] == pytest.approx(
        np.mean([np.argmax(s.mean_logprob) for s in scores] == labels))


def test_best_threshold_maximises_matthews():
    scores = np.array([-3.0, -2.5, -1.0, -0.5, -2.0])
    labels = np.array([0, 0, 1, 1, 1])
    t = E.best_threshold(scores, labels)
    assert -2.5 < t < -2.0
    assert E.best_threshold(np.array([1.0, 2.0]), np.array([1, 0])) in (0.0, 1.5, 3.0)


def _write_task_files(folder):
    files = {}
    files["storycloze"] = folder / "cloze.csv"
    files["storycloze"].write_text(
        "InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
        "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n"
        "s1,Tom ran.,He fell.,It hurt.,He cried.,He laughed.,He went home.,2\n"
        "s2,Ann sang.,She won.,It was fun.,They cheered.,She bowed.,She slept.,1\n")
    files["race"] = folder / "race.txt"
    files["race"].write_text(json.dumps({
        "article": "The cat sat on the mat.", "id": "r1",
        "questions": ["Where did the cat sit?", "Who sat?"],
        "options": [["mat", "hat", "bat", "car"], ["cat", "dog", "cow", "pig"]],
        "answers": ["A", "A"]}))
    files["jsonl"] = folder / "mc.jsonl"
    files["jsonl"].write_text("\n".join(json.dumps(
        {"context": f"Item {i}:", "choices": ["yes", "no"], "label": i % 2}) for i in range(4)))
    files["lambada"] = folder / "lambada.txt"
    files["lambada"].write_text("the dog ran to the dog\nshe said hello and then hello\n")
    files["cola"] = folder / "cola.tsv"
    files["cola"].write_text("gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tCat the sat.\n"
                             "gj04\t1\t\tA dog ran.\ngj04\t0\t*\tRan dog a.\n")
    files["sst2"] = folder / "sst2.tsv"
    files["sst2"].write_text("sentence\tlabel\na fine film\t1\na dull mess\t0\n")
    files["perplexity"] = folder / "text.txt"
    files["perplexity"].write_text("Some plain text to score, " * 4)
    return files


def test_every_task_runs_on_its_file_format(params, tmp_path):
    files = _write_task_files(tmp_path)
    counts = {"storycloze": 2, "race": 2, "jsonl": 4, "lambada": 2, "cola": 4, "sst2": 2}
    for task, path in files.items():
        result = E.run_task(params, CFG, TOK, task, path)
        if task == "perplexity":
            assert result["tokens"] == len(path.read_bytes()) and result["bits_per_byte"] > 0
            continue
        assert result["n"] == counts[task]
        assert 0.0 <= result["accuracy"] <= 1.0
    assert E.read_task("lambada", files["lambada"])[1] == Example(
        "she said hello and then", choices=("hello",), label=0)
    cola = E.run_task(params, CFG, TOK, "cola", files["cola"], train=files["cola"])
    assert cola["threshold_fit_on"] == "train" and -1.0 <= cola["matthews"] <= 1.0
    # SST-2 is GPT-1's " very" + {" negative", " positive"} comparison.
    sst2 = E.sst2_items(E.read_task("sst2", files["sst2"]))
    fmt = E.PromptFormat(template="{context} very")
    assert E.build_prompt(0, sst2[0], fmt) == ("a fine film very", [" negative", " positive"])
    few = E.run_task(params, CFG, TOK, "jsonl", files["jsonl"], train=files["jsonl"],
                     fmt=E.PromptFormat(k=2))
    assert few["n"] == 4
    with pytest.raises(ValueError, match="--train"):
        E.run_task(params, CFG, TOK, "jsonl", files["jsonl"], fmt=E.PromptFormat(k=2))


def test_token_files(params, tmp_path):
    ids = np.array([260] + list(b"token file text, token file text"), np.uint16)
    np.save(tmp_path / "ids.npy", ids)
    ids.tofile(tmp_path / "ids.bin")
    a = E.run_task(params, CFG, TOK, "perplexity", tmp_path / "ids.npy")
    b = E.run_task(params, CFG, TOK, "perplexity", tmp_path / "ids.bin")
    assert a == b and a["tokens"] == len(ids) - 1 == a["bytes"]


def _hf_folder(tmp_path, params):
    folder = tmp_path / "hf"
    hf.save_pretrained(CFG, params, folder)
    TOK.save(folder)
    return folder


def _run_folder(tmp_path, params):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_CONFIG).write_text(json.dumps({"model": CFG.to_dict()}))
    TOK.save(run_dir / TOKENIZER_DIR)
    ckpt = Checkpointer(run_dir / CHECKPOINT_DIR, async_save=False)
    ckpt.save(1, {"params": params}, {})
    ckpt.close()
    return run_dir


def test_clis_end_to_end_on_run_and_hf_folders(params, tmp_path, capsys):
    """Both CLIs load a train.py run folder and an HF folder to the same model; the sampler
    prints the prompt and then exactly stream_text's pieces; evaluate prints a table and
    writes JSON; bad input exits 2 with a one-line error."""
    files = _write_task_files(tmp_path)
    expected = "".join(sample.stream_text(CFG, params, TOK, "ab", max_new_tokens=6,
                                          temperature=0.7, top_k=50, seed=3))
    for folder in (_run_folder(tmp_path, params), _hf_folder(tmp_path, params)):
        code = sample.main(["--run", str(folder), "--prompt", "ab", "--max-new-tokens", "6",
                            "--temperature", "0.7", "--top-k", "50", "--seed", "3"])
        assert code == 0
        assert capsys.readouterr().out == "ab" + expected + "\n"
        out_json = tmp_path / f"{folder.name}.json"
        code = E.main(["--run", str(folder), "--task", "jsonl", "--data", str(files["jsonl"]),
                       "--train", str(files["jsonl"]), "--k", "1", "--separator", "\\n",
                       "--json", str(out_json)])
        assert code == 0
        table = capsys.readouterr().out
        assert "accuracy_mean" in table
        record = json.loads(out_json.read_text())
        assert record["settings"]["separator"] == "\n" and record["metrics"]["n"] == 4
    assert sample.main(["--run", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert sample.main(["--run", str(folder), "--top-p", "1.5"]) == 2
    assert E.main(["--run", str(folder), "--task", "race", "--data", str(files["jsonl"])]) == 2
    assert "error:" in capsys.readouterr().err
