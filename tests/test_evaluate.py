"""Likelihood evaluation: scoring == lm_loss, perplexity windows, bits per byte, few-shot
prompts; every task's metric worked out by hand under a model of known likelihoods; the
Winograd substitution; and both CLIs end to end on run and HF folders."""

from __future__ import annotations

import json
import math
import re

import jax
import numpy as np
import pytest

from gptjax import evaluate as E
from gptjax import hf, loading
from gptjax.cli import evaluate as cli_evaluate
from gptjax.cli import sample
from gptjax.config import GPTConfig
from gptjax.data.tokenizer import ByteTokenizer
from gptjax.finetune.readers import WinogradSchema
from gptjax.finetune.transforms import Example
from gptjax.model import forward, init_params, lm_loss, logits
from gptjax.train.checkpoint import CHECKPOINT_DIR, RUN_CONFIG, TOKENIZER_DIR, Checkpointer

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


# ----------------------------------------------------------------------------- known likelihoods
# A real GPT whose next-token distribution is a fixed table P, whatever the prefix: ln_f's
# gain is 0 and its bias e_0, so h_n = e_0 at every position, and the tied logits
# h_n W_e^T are W_e's column 0, set to log P. Every score below is then a sum of table
# entries over the scored bytes, worked out by hand in bits: " " and "x" cost 2 bits
# (p = 1/4, tied for the argmax), "a" 3 (1/8), "b" 4 (1/16), and every other id R bits
# ((5/16) / 257 each).

LN2 = math.log(2)
R = math.log2(16 * 257 / 5)  # the bits of any other byte, about 9.68
P = np.full(261, 5 / 16 / 257)
P[[ord(" "), ord("x")]], P[ord("a")], P[ord("b")] = 1 / 4, 1 / 8, 1 / 16


def nats(bits):
    return bits * LN2


def table_bits(text: str) -> float:
    """-log2 P(text) under the table: the oracle for texts too long to add up by hand."""
    return float(sum(-np.log2(P[b]) for b in text.encode("utf-8")))


def close(value):
    return pytest.approx(value, rel=1e-6, abs=1e-6)


@pytest.fixture(scope="module")
def known(params):
    p = dict(params)
    p["ln_f"] = {"g": np.zeros(CFG.n_embd, np.float32),
                 "b": np.eye(1, CFG.n_embd, dtype=np.float32)[0]}
    p["wte"] = np.asarray(params["wte"]).copy()
    p["wte"][:, 0] = np.log(P)
    return p


def test_the_known_model_predicts_the_table(known):
    """log P(v | any prefix) = log P[v] for every id v, after contexts of any length."""
    requests = [(list(range(n)), [v]) for n in (1, 5, 20) for v in range(261)]
    scores = E.score_requests(known, CFG, requests)
    np.testing.assert_allclose(scores.logprob, np.tile(np.log(P), 3), rtol=1e-6, atol=1e-6)
    assert table_bits(" xab") == 2 + 2 + 3 + 4 and table_bits("q") == close(R)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_perplexity_and_bits_per_byte_by_hand(known, tmp_path):
    # "xx ab" after the start token: 2 + 2 + 2 + 3 + 4 = 13 bits over 5 tokens and 5 bytes.
    result = E.evaluate_text(known, CFG, TOK, "xx ab")
    assert (result["tokens"], result["bytes"]) == (5, 5)
    assert result["nll"] == close(nats(13))
    assert result["nll_per_token"] == close(nats(13 / 5))
    assert result["perplexity"] == close(2 ** (13 / 5))
    assert result["bits_per_byte"] == close(13 / 5)
    # 80 bytes "xaxa...": 40 * (2 + 3) = 200 bits, whatever the windows (n_ctx = 32).
    for stride in (None, 7, 1):
        long = E.evaluate_text(known, CFG, TOK, "xa" * 40, stride=stride)
        assert long["tokens"] == 80 and long["nll"] == close(nats(200))
        assert long["bits_per_byte"] == close(2.5)
    # A token file has no start token: "x" is context only; a, b, q cost 3 + 4 + R bits
    # and stand for 3 bytes.
    np.save(tmp_path / "ids.npy", np.array([ord(c) for c in "xabq"], np.uint16))
    ids = E.run_task(known, CFG, TOK, "perplexity", tmp_path / "ids.npy")
    assert (ids["tokens"], ids["bytes"]) == (3, 3)
    assert ids["nll"] == close(nats(7 + R))
    assert ids["bits_per_byte"] == close((7 + R) / 3)
    text = E.run_task(known, CFG, TOK, "perplexity", write(tmp_path / "t.txt", "xx ab"))
    assert text == result


def test_lambada_by_hand(known, tmp_path):
    """The last word is right when each of its tokens is the argmax: " x" and " xx" are
    (" " and "x" tie for the top), " ab" is not. Accuracy 2/3; the last words cost
    4 + 9 + 6 = 19 bits over 2 + 3 + 3 = 8 tokens."""
    path = write(tmp_path / "lambada.txt", "ab ab x\nx x ab\n{\"text\": \"a b xx\"}\n")
    items = E.read_task("lambada", path)
    assert items[1] == Example("x x", choices=("ab",), label=0)
    scores = E.score_items(known, CFG, TOK, items)
    assert [bool(s.greedy[0]) for s in scores] == [True, False, True]
    assert [s.logprob[0] for s in scores] == [close(nats(-4)), close(nats(-9)),
                                              close(nats(-6))]
    result = E.run_task(known, CFG, TOK, "lambada", path)
    assert result["n"] == 3 and result["accuracy"] == close(2 / 3)
    assert result["perplexity"] == close(2 ** (19 / 8))


CLOZE_HEADER = ("InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
                "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding\n")


def test_story_cloze_by_hand(known, tmp_path):
    """Endings (bits, tokens; ending 1 is right in each story):
        s1  " b" 6, 2       " xxxx" 10, 5    sum picks 1 (right), mean 2 (3 > 2 bits/token)
        s2  " ax" 7, 3      " q" 2 + R, 2    both pick 1 (right)
        s3  " q" 2 + R, 2   " xa" 7, 3       both pick 2 (wrong)
    accuracy 2/3, accuracy_mean 1/3."""
    path = write(tmp_path / "cloze.csv", CLOZE_HEADER
                 + "s1,Tom ran.,He fell.,It hurt.,He cried.,b,xxxx,1\n"
                 + "s2,Ann sang.,She won.,It was fun.,They cheered.,ax,q,1\n"
                 + "s3,A b.,C d.,E f.,G h.,q,xa,1\n")
    scores = E.score_items(known, CFG, TOK, E.read_task("storycloze", path))
    expected = [(6, 10), (7, 2 + R), (2 + R, 7)]
    for s, bits in zip(scores, expected, strict=True):
        assert s.logprob.tolist() == [close(nats(-b)) for b in bits]
    result = E.run_task(known, CFG, TOK, "storycloze", path)
    assert result == {"n": 3, "accuracy": close(2 / 3), "accuracy_mean": close(1 / 3)}


def test_race_fills_blanks_by_hand(known, tmp_path):
    """Question 2 has a blank: each option goes in it and the words after it ("q") are
    scored too. Continuations (bits, tokens):
        q1, q3 "Which?"   " b" 6, 2   " xxxx" 10, 5   " q" 2 + R, 2   " ax" 7, 3
        q2 "Pick _ q"     " x q" 6 + R, 4   " xxb q" 12 + R, 6   " ab q" 11 + R, 5
                          " b q" 8 + R, 4
    Sum picks A, A, A; per-token mean picks B (2 bits), B ((12 + R) / 6 = 3.61 against
    (6 + R) / 4 = 3.92), B. Answers A, B, B: accuracy 1/3, accuracy_mean 2/3. Appending
    the option after "Pick _ q" would score " x" 2 bits/token, the best mean, and give
    accuracy_mean 1/3."""
    doc = {"article": "x x.", "id": "r1",
           "questions": ["Which?", "Pick _ q", "Which one?"],
           "options": [["b", "xxxx", "q", "ax"], ["x", "xxb", "ab", "b"],
                       ["b", "xxxx", "q", "ax"]],
           "answers": ["A", "B", "B"]}
    path = write(tmp_path / "race.json", json.dumps(doc))
    items = E.read_task("race", path)
    assert items[0] == Example("x x. Which?", choices=("b", "xxxx", "q", "ax"), label=0,
                               uid="r1-0")
    assert items[1] == Example("x x. Pick", choices=("x q", "xxb q", "ab q", "b q"), label=1,
                               uid="r1-1")
    scores = E.score_items(known, CFG, TOK, items)
    assert scores[0].logprob.tolist() == [close(nats(-b)) for b in (6, 10, 2 + R, 7)]
    assert scores[1].logprob.tolist() == [close(nats(-b)) for b in (6 + R, 12 + R, 11 + R,
                                                                     8 + R)]
    assert scores[1].n_tokens.tolist() == [4, 6, 5, 4]
    result = E.run_task(known, CFG, TOK, "race", path)
    assert result == {"n": 3, "accuracy": close(1 / 3), "accuracy_mean": close(2 / 3)}


def test_cola_by_hand(known, tmp_path):
    """Mean bits per token of each sentence after the start token, and its label:
        "xx" 2 (1)   "xxa" 7/3 (1)   "x b" 8/3 (0)   "ab" 7/2 (1)   "bq" (4 + R)/2 (0)
    A given threshold of -3 bits: predicted 1 1 1 0 0, TP 2 FP 1 FN 1 TN 1, Matthews
    (2 - 1) / sqrt(3 * 3 * 2 * 2) = 1/6, accuracy 3/5. Fitted on train ("x" 2 (1), "xx" 2
    (1), "ab" 3.5 (0), "bb" 4 (0)): the cut midway between 2 and 3.5, -2.75 bits, gives the
    same predictions. Fitted on the items themselves: the cut between 7/3 and 8/3, -2.5
    bits, predicts 1 1 0 0 0, Matthews (2 * 2 - 0) / sqrt(2 * 3 * 2 * 3) = 2/3,
    accuracy 4/5."""
    rows = [("1", "xx"), ("1", "xxa"), ("0", "x b"), ("1", "ab"), ("0", "bq")]
    path = write(tmp_path / "cola.tsv", "".join(f"gj04\t{y}\t\t{t}\n" for y, t in rows))
    train = write(tmp_path / "train.tsv", "".join(
        f"gj04\t{y}\t\t{t}\n" for y, t in [("1", "x"), ("1", "xx"), ("0", "ab"), ("0", "bb")]))
    given = E.run_task(known, CFG, TOK, "cola", path, threshold=nats(-3))
    assert given == {"n": 5, "matthews": close(1 / 6), "accuracy": close(3 / 5),
                     "threshold": close(nats(-3)), "threshold_fit_on": "given"}
    fitted = E.run_task(known, CFG, TOK, "cola", path, train=train)
    assert fitted == {"n": 5, "matthews": close(1 / 6), "accuracy": close(3 / 5),
                      "threshold": close(nats(-2.75)), "threshold_fit_on": "train"}
    on_eval = E.run_task(known, CFG, TOK, "cola", path)
    assert on_eval == {"n": 5, "matthews": close(2 / 3), "accuracy": close(4 / 5),
                       "threshold": close(nats(-2.5)), "threshold_fit_on": "eval"}


def test_sst2_by_hand(known, tmp_path):
    """GPT-1's " very" + {" negative", " positive"}: " negative" costs 2 + 3 + 7R bits
    (its "a" is cheap), " positive" 2 + 8R, so the model always says negative: right on
    the two negative sentences of three."""
    path = write(tmp_path / "sst2.tsv", "sentence\tlabel\na fine film\t1\na dull mess\t0\n"
                                        "xx\t0\n")
    items = E.sst2_items(E.read_task("sst2", path))
    fmt = E.PromptFormat(template="{context} very")
    assert E.build_prompt(0, items[0], fmt) == ("a fine film very", [" negative", " positive"])
    scores = E.score_items(known, CFG, TOK, items, fmt=fmt)
    assert scores[0].logprob.tolist() == [close(nats(-(5 + 7 * R))), close(nats(-(2 + 8 * R)))]
    result = E.run_task(known, CFG, TOK, "sst2", path)
    assert result == {"n": 3, "accuracy": close(2 / 3), "accuracy_mean": close(2 / 3)}


JSONL_ITEMS = [{"context": "Item 0:", "choices": ["x", "b", "ab"], "label": 0},
               {"context": "Item 1:", "choices": ["b", "xxxx"], "label": 1},
               {"context": "Item 2:", "choices": ["q", "a"], "label": 1}]


def _jsonl(folder):
    return write(folder / "mc.jsonl", "\n".join(json.dumps(x) for x in JSONL_ITEMS) + "\n")


def test_jsonl_multiple_choice_by_hand(known, tmp_path):
    """Choices (bits / tokens): item 0 " x" 4/2, " b" 6/2, " ab" 9/3: both pick 0 (right);
    item 1 " b" 6/2, " xxxx" 10/5: sum picks 0 (wrong), mean 1 (right); item 2 " q"
    (2 + R)/2, " a" 5/2: both pick 1 (right). accuracy 2/3, accuracy_mean 1. The context
    and k solved examples before it change nothing for this model."""
    path = _jsonl(tmp_path)
    expected = {"n": 3, "accuracy": close(2 / 3), "accuracy_mean": close(1.0)}
    assert E.run_task(known, CFG, TOK, "jsonl", path) == expected
    few = E.run_task(known, CFG, TOK, "jsonl", path, train=path, fmt=E.PromptFormat(k=2))
    assert few == expected
    with pytest.raises(ValueError, match="--train"):
        E.run_task(known, CFG, TOK, "jsonl", path, fmt=E.PromptFormat(k=2))


# ----------------------------------------------------------------------------- Winograd


def _schema(text, pronoun, candidates, label=0):
    at = re.search(rf"(?<!\w){re.escape(pronoun)}(?!\w)", text).start()
    return WinogradSchema(text, pronoun, at, candidates, label)


def test_substitution_writes_the_candidate_as_the_sentence_needs():
    trophy = _schema("The trophy doesn't fit in the suitcase because it is too big.", "it",
                     ("The trophy", "the suitcase"))
    assert E.substitute(trophy, "The trophy") == (
        "The trophy doesn't fit in the suitcase because the trophy", " is too big.")
    bob = _schema("Bob paid for Charlie's college education, but now Charlie acts as though "
                  "it never happened. He is very hurt.", "He", ("Bob", "Charlie"))
    assert E.substitute(bob, "bob") == (bob.text[: bob.pronoun_at] + "Bob", " is very hurt.")
    owner = _schema("The man lifted the boy onto his shoulders.", "his", ("The man", "the boy"))
    assert E.substitute(owner, "The man") == ("The man lifted the boy onto the man's",
                                              " shoulders.")
    assert E.substitute(owner, "the boys")[0].endswith(" onto the boys'")
    blank = _schema("Sarah was a much better surgeon than Maria so _ always got the harder "
                    "cases.", "_", ("Sarah", "Maria"))
    assert E.substitute(blank, "Maria") == (
        "Sarah was a much better surgeon than Maria so Maria", " always got the harder cases.")


def test_wsc_partial_scoring_picks_the_likelier_rest():
    """A scorer with known likelihoods that understands the schemas: the rest of the
    sentence costs 1 nat a byte after the candidate it fits ("trophy ... big",
    "suitcase ... small"), 2 otherwise; a full sentence costs 2 nats a byte. Partial
    scoring gets all three right. Full scoring by the sum prefers the shorter sentence,
    "the trophy" (items 1 and 3 right: 2/3); by the mean every sentence ties at 2 nats a
    byte and candidate 0 is taken (item 1 right: 1/3)."""
    big = "The trophy doesn't fit in the suitcase because it is too big."
    small = "The trophy doesn't fit in the suitcase because it is too small."
    flipped = "The suitcase is smaller than the trophy because it is too big."
    items = [_schema(big, "it", ("The trophy", "the suitcase"), 0),
             _schema(small, "it", ("The trophy", "the suitcase"), 1),
             _schema(flipped, "it", ("The suitcase", "the trophy"), 1)]
    full, partial = E.wsc_requests(TOK, CFG, items)
    assert [(TOK.decode(c), TOK.decode(x)) for c, x in partial[:2]] == [
        ("The trophy doesn't fit in the suitcase because the trophy", " is too big."),
        ("The trophy doesn't fit in the suitcase because the suitcase", " is too big.")]
    assert [(c, TOK.decode(x)) for c, x in full[:2]] == [
        ([260], "The trophy doesn't fit in the suitcase because the trophy is too big."),
        ([260], "The trophy doesn't fit in the suitcase because the suitcase is too big.")]
    fits = {("trophy", " is too big."), ("suitcase", " is too small.")}

    def known_scores(requests):
        logprob, n = [], []
        for context, continuation in requests:
            last = TOK.decode(context).split(" ")[-1]
            per_byte = 1.0 if (last, TOK.decode(continuation)) in fits else 2.0
            logprob.append(-per_byte * len(continuation))
            n.append(len(continuation))
        return E.Scores(np.array(logprob), np.array(n), np.zeros(len(n), bool))

    metrics = E.wsc_metrics(items, known_scores(full), known_scores(partial))
    assert metrics == {"n": 3, "accuracy_partial": 1.0, "accuracy_full": close(2 / 3),
                       "accuracy_full_mean": close(1 / 3)}


WSC_XML = """<?xml version="1.0" encoding="UTF-8"?>
<collection>
<schema>
<text>
<txt1>Xa in bb
      as</txt1>
<pron>it</pron>
<txt2>is big.</txt2>
</text>
<quote><quote1></quote1><pron>it</pron><quote2>is big.</quote2></quote>
<answers>
<answer>The xa</answer>
<answer>The bb</answer>
</answers>
<correctAnswer>A</correctAnswer>
<source>(test)</source>
</schema>
<schema>
<text><txt1>Xa in bb as</txt1><pron>it</pron><txt2>is small.</txt2></text>
<answers><answer>b</answer><answer>xxxx</answer></answers>
<correctAnswer> B. </correctAnswer>
</schema>
</collection>
"""


def test_wsc_by_hand(known, tmp_path):
    """Full scoring with the known model: the sentences differ only in the candidate.
    Schema 1: "the xa" (3R + 7 bits) beats "the bb" (3R + 10) by sum and by mean (same
    length): right (A). Schema 2: "b" (4 bits, 1 token) beats "xxxx" (8 bits, 4 tokens)
    by the sum (wrong), but the sentence with "xxxx" has the lower mean (right, B).
    Partial scoring scores the same rest for both candidates: the model cannot tell."""
    path = write(tmp_path / "WSCollection.xml", WSC_XML)
    items = E.read_task("wsc", path)
    sentences = ["Xa in bb as the xa is big.", "Xa in bb as the bb is big.",
                 "Xa in bb as b is small.", "Xa in bb as xxxx is small."]
    full, partial = E.wsc_requests(TOK, CFG, items)
    assert [TOK.decode(x) for _, x in full] == sentences
    s = E.score_requests(known, CFG, full + partial)
    assert s.logprob[:4].tolist() == [close(nats(-table_bits(x))) for x in sentences]
    assert table_bits(sentences[1]) - table_bits(sentences[0]) == close(3)
    assert table_bits(sentences[3]) - table_bits(sentences[2]) == close(4)
    assert s.logprob[4:].tolist() == [close(nats(-table_bits(rest))) for rest in
                                      (" is big.", " is big.", " is small.", " is small.")]
    result = E.run_task(known, CFG, TOK, "wsc", path)
    assert result["n"] == 2
    assert (result["accuracy_full"], result["accuracy_full_mean"]) == (0.5, 1.0)
    with pytest.raises(ValueError, match="zero-shot"):
        E.run_task(known, CFG, TOK, "wsc", path, fmt=E.PromptFormat(k=1), train=path)


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
    jsonl = _jsonl(tmp_path)
    expected = "".join(sample.stream_text(CFG, params, TOK, "ab", max_new_tokens=6,
                                          temperature=0.7, top_k=50, seed=3))
    for folder in (_run_folder(tmp_path, params), _hf_folder(tmp_path, params)):
        code = sample.main(["--run", str(folder), "--prompt", "ab", "--max-new-tokens", "6",
                            "--temperature", "0.7", "--top-k", "50", "--seed", "3"])
        assert code == 0
        assert capsys.readouterr().out == "ab" + expected + "\n"
        out_json = tmp_path / f"{folder.name}.json"
        code = cli_evaluate.main(["--run", str(folder), "--task", "jsonl",
                                  "--data", str(jsonl), "--train", str(jsonl),
                                  "--k", "1", "--separator", "\\n", "--json", str(out_json)])
        assert code == 0
        table = capsys.readouterr().out
        assert "accuracy_mean" in table
        record = json.loads(out_json.read_text())
        assert record["settings"]["separator"] == "\n" and record["metrics"]["n"] == 3
    wsc = write(tmp_path / "WSCollection.xml", WSC_XML)
    assert cli_evaluate.main(["--run", str(folder), "--task", "wsc", "--data", str(wsc)]) == 0
    assert "accuracy_partial" in capsys.readouterr().out
    assert cli_evaluate.main(["--run", str(folder), "--task", "wsc", "--data", str(wsc),
                              "--k", "1"]) == 2
    assert "zero-shot" in capsys.readouterr().err
    assert sample.main(["--run", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert sample.main(["--run", str(folder), "--top-p", "1.5"]) == 2
    assert cli_evaluate.main(["--run", str(folder), "--task", "race",
                              "--data", str(jsonl)]) == 2
    assert "error:" in capsys.readouterr().err


def test_one_loader_for_run_and_hf_folders(params, tmp_path):
    """gptjax.loading reads a run folder (latest or best checkpoint, a fine-tuning run's
    transformer), an HF folder, or only their config and tokenizer; anything else is an
    error naming the folder."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_CONFIG).write_text(json.dumps({"model": CFG.to_dict()}))
    TOK.save(run_dir / TOKENIZER_DIR)
    other = jax.tree_util.tree_map(lambda x: x + 1.0, params)
    ckpt = Checkpointer(run_dir / CHECKPOINT_DIR, async_save=False)
    ckpt.save(1, {"params": params}, {}, {"val_loss": 1.0})
    ckpt.save(2, {"params": other}, {}, {"val_loss": 9.0})
    ckpt.close()

    def wte(p):
        return np.asarray(p["wte"])

    assert loading.folder_kind(run_dir) == "run"
    cfg, latest, tok = loading.load_model(run_dir)
    assert cfg == CFG and tok.fingerprint() == TOK.fingerprint()
    np.testing.assert_array_equal(wte(latest), wte(other))
    _, best, _ = loading.load_model(run_dir, checkpoint="best")  # the lower val_loss
    np.testing.assert_array_equal(wte(best), wte(params))
    cfg_only, none, tok_only = loading.load_model(run_dir, weights=False)
    assert cfg_only == CFG and none is None and tok_only.fingerprint() == TOK.fingerprint()

    finetuned = tmp_path / "finetuned"
    finetuned.mkdir()
    (finetuned / RUN_CONFIG).write_text(json.dumps({"model": CFG.to_dict()}))
    TOK.save(finetuned / TOKENIZER_DIR)
    ckpt = Checkpointer(finetuned / CHECKPOINT_DIR, async_save=False)
    ckpt.save(1, {"params": {"gpt": params, "head": {"w": np.zeros(3, np.float32)}}}, {})
    ckpt.close()
    np.testing.assert_array_equal(wte(loading.load_model(finetuned)[1]), wte(params))

    folder = _hf_folder(tmp_path, params)
    assert loading.folder_kind(folder) == "hf"
    hf_cfg, hf_params, hf_tok = loading.load_model(folder)
    assert hf_cfg.n_layer == CFG.n_layer and hf_tok.vocab_size == TOK.vocab_size
    np.testing.assert_allclose(wte(hf_params), wte(params), rtol=0, atol=0)
    assert loading.load_config(folder) == hf_cfg
    assert loading.start_token(hf_tok, hf_cfg) == 260  # <eos>, inside the vocabulary
    assert loading.start_token(hf_tok, hf_cfg.replace(vocab_size=260)) is None

    with pytest.raises(FileNotFoundError, match="no such folder"):
        loading.load_model(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        loading.load_model(empty)
    (empty / "config.json").write_text(json.dumps({"n_layer": 2}))
    with pytest.raises(ValueError, match="neither"):
        loading.load_model(empty)
    with pytest.raises(ValueError, match="checkpoint='first'"):
        loading.load_model(run_dir, checkpoint="first")


def test_evaluate_settings_from_a_config_file(tmp_path, capsys):
    settings = tmp_path / "eval.toml"
    settings.write_text('run = "r"\ntask = "lambada"\ndata = "d.txt"\n[prompt]\nk = 2\n'
                        'separator = "\\\\n---\\\\n"\n')
    config, fmt = cli_evaluate.parse(["--config", str(settings), "--limit", "5"])
    assert (config.run, config.task, config.limit, fmt.k) == ("r", "lambada", 5, 2)
    assert fmt.separator == "\n---\n"  # escapes decoded
    with pytest.raises(ValueError, match="--task"):
        cli_evaluate.parse(["--run", "r", "--data", "d.txt"])
    with pytest.raises(SystemExit) as exit_info:
        cli_evaluate.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "{perplexity,lambada,storycloze,race,jsonl,cola,sst2,wsc}" in text
    assert "(default: ' {choice}')" in " ".join(text.split())
