"""GPT-1 input transformations, truncation, padding, vocabulary growth and the L3 loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import GPTConfig
from gptjax.finetune.heads import init_head, make_head
from gptjax.finetune.transforms import (
    Example,
    SpecialIds,
    add_task_tokens,
    classification_sequence,
    encode_examples,
    entailment_sequence,
    grow_vocab,
    lm_loss_on_tasks,
    make_loss_fn,
    max_segment_length,
    multiple_choice_sequences,
    similarity_sequences,
    task_hidden,
)
from gptjax.model import init_params, token_nll

jax.config.update("jax_default_matmul_precision", "highest")

SP = SpecialIds(start=1, delim=2, extract=3, pad=0)
WORDS = {w: i + 10 for i, w in enumerate("a b c d e f g h i j k l m n o p".split())}


def enc(text):
    return [WORDS[w] for w in text.split()]


def test_layouts_token_by_token():
    assert classification_sequence(enc("a b c"), SP) == [1, 10, 11, 12, 3]
    assert entailment_sequence(enc("a b"), enc("c"), SP) == [1, 10, 11, 2, 12, 3]
    assert similarity_sequences(enc("a"), enc("b c"), SP) == (
        [1, 10, 2, 11, 12, 3], [1, 11, 12, 2, 10, 3])
    assert multiple_choice_sequences(enc("a b"), [enc("c"), enc("d e")], SP) == [
        [1, 10, 11, 2, 12, 3], [1, 10, 11, 2, 13, 14, 3]]


def test_max_segment_length_follows_original_code():
    assert max_segment_length(512, 2) == 254  # finetune-transformer-lm: n_ctx // 2 - 2
    assert max_segment_length(512, 1) == 510
    assert max_segment_length(9, 2) == 2
    with pytest.raises(ValueError):
        max_segment_length(4, 2)


def test_encode_classification_pads_masks_and_extracts():
    a = encode_examples("classification", [Example("a b c", label=1), Example("d", label=0)],
                        enc, SP, n_ctx=16, pad_to=6)
    np.testing.assert_array_equal(a.tokens[:, 0], [[1, 10, 11, 12, 3, 0], [1, 13, 3, 0, 0, 0]])
    np.testing.assert_array_equal(a.mask[:, 0], [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(a.positions[:, 0], [[0, 1, 2, 3, 4, 5]] * 2)
    np.testing.assert_array_equal(a.extract, [[4], [2]])
    np.testing.assert_array_equal(a.labels, [1, 0])
    np.testing.assert_array_equal(a.choices, [[1], [1]])
    assert a.n_truncated == 0
    assert a.tokens.dtype == np.int32


def test_encode_entailment_truncates_each_segment_and_counts():
    # n_ctx 8: each segment keeps 8 // 2 - 2 = 2 tokens
    a = encode_examples("entailment", [Example("a b c", "d", label=0),
                                       Example("a", "b", label=1),
                                       Example("a", "b c d e", label=2)], enc, SP, n_ctx=8)
    assert a.n_truncated == 2
    np.testing.assert_array_equal(a.tokens[0, 0], [1, 10, 11, 2, 13, 3])
    np.testing.assert_array_equal(a.tokens[1, 0], [1, 10, 2, 11, 3, 0])
    np.testing.assert_array_equal(a.tokens[2, 0], [1, 10, 2, 11, 12, 3])
    assert a.length == 6  # padded to the longest sequence
    np.testing.assert_array_equal(a.extract[:, 0], [5, 4, 5])


def test_classification_single_segment_keeps_n_ctx_minus_2():
    a = encode_examples("classification", [Example("a b c d e f g")], enc, SP, n_ctx=6)
    np.testing.assert_array_equal(a.tokens[0, 0], [1, 10, 11, 12, 13, 3])
    assert a.n_truncated == 1
    np.testing.assert_array_equal(a.labels, [-1])  # no label: -1


def test_encode_similarity_both_orders():
    a = encode_examples("similarity", [Example("a b", "c", label=0.75)], enc, SP, n_ctx=16,
                        regression=True)
    np.testing.assert_array_equal(a.tokens[0], [[1, 10, 11, 2, 12, 3], [1, 12, 2, 10, 11, 3]])
    assert a.labels.dtype == np.float32 and a.labels[0] == 0.75


@pytest.mark.parametrize("n", [2, 4, 5])
def test_encode_multiple_choice(n):
    answers = tuple("c d e f g".split()[:n])
    a = encode_examples("multiple_choice", [Example("a b", choices=answers, label=n - 1)],
                        enc, SP, n_ctx=16)
    assert a.tokens.shape == (1, n, 6)
    for k, w in enumerate(answers):
        np.testing.assert_array_equal(a.tokens[0, k], [1, 10, 11, 2, WORDS[w], 3])
    np.testing.assert_array_equal(a.extract[0], [5] * n)
    assert a.labels[0] == n - 1


def test_multiple_choice_with_fewer_answers_is_padded_and_masked():
    a = encode_examples("multiple_choice", [Example("a", choices=("b", "c"), label=1),
                                            Example("a", choices=("b", "c", "d"), label=2)],
                        enc, SP, n_ctx=16, n_choices=4)
    assert a.tokens.shape == (2, 4, 5)
    np.testing.assert_array_equal(a.choices, [[1, 1, 0, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(a.tokens[0, 2], [0] * 5)
    np.testing.assert_array_equal(a.mask[0, 2], [0] * 5)


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="no examples"):
        encode_examples("classification", [], enc, SP, 8)
    with pytest.raises(ValueError, match="unknown task kind"):
        encode_examples("ranking", [Example("a")], enc, SP, 8)
    with pytest.raises(ValueError, match="no hypothesis"):
        encode_examples("entailment", [Example("a")], enc, SP, 8)
    with pytest.raises(ValueError, match="outside"):
        encode_examples("multiple_choice", [Example("a", choices=("b",), label=3)], enc, SP, 8)
    with pytest.raises(ValueError, match="pad_to"):
        encode_examples("classification", [Example("a b c")], enc, SP, 16, pad_to=3)
    with pytest.raises(ValueError, match="n_choices"):
        encode_examples("multiple_choice", [Example("a", choices=("b", "c"))], enc, SP, 8,
                        n_choices=1)


# ----------------------------------------------------------------------------- vocabulary


def test_grow_vocab_adds_normal_rows_and_keeps_the_rest():
    cfg = GPTConfig(vocab_size=20, n_ctx=8, n_layer=1, n_head=1, n_embd=512)
    params = init_params(cfg, jax.random.key(0))
    cfg2, p2 = grow_vocab(cfg, params, [20, 21, 22], jax.random.key(1))
    assert cfg2.vocab_size == 23 and p2["wte"].shape == (23, 512)
    np.testing.assert_array_equal(p2["wte"][:20], params["wte"])
    assert abs(float(p2["wte"][20:].std()) - 0.02) < 0.002
    assert p2["h"] is params["h"]


class FakeTokenizer:
    """The slice of gptjax.tokenizer.Tokenizer that add_task_tokens uses."""

    def __init__(self, vocab_size, special_tokens):
        self.vocab_size, self.special_tokens = vocab_size, dict(special_tokens)

    def add_special_tokens(self, names):
        specials, v = dict(self.special_tokens), self.vocab_size
        for n in names:
            if n not in specials:
                specials[n], v = v, v + 1
        return FakeTokenizer(v, specials)

    def token_id(self, name):
        return self.special_tokens[name]


def test_add_task_tokens_grows_tokenizer_and_model(caplog):
    cfg = GPTConfig(vocab_size=30, n_ctx=8, n_layer=1, n_head=1, n_embd=8)
    params = init_params(cfg, jax.random.key(0))
    tok = FakeTokenizer(30, {"<eos>": 29})
    tok2, cfg2, p2, added = add_task_tokens(tok, cfg, params, jax.random.key(1))
    assert added == ["<start>", "<delim>", "<extract>", "<pad>"]
    assert tok2.special_tokens["<start>"] == 30 and cfg2.vocab_size == 34
    assert p2["wte"].shape == (34, 8)
    assert "lacked" in caplog.text and "<start>" in caplog.text
    assert SpecialIds.from_tokenizer(tok2) == SpecialIds(30, 31, 32, 33)
    # nothing missing: unchanged
    same = add_task_tokens(tok2, cfg2, p2, jax.random.key(2))
    assert same[0] is tok2 and same[2] is p2 and same[3] == []
    with pytest.raises(ValueError, match="no special token"):
        add_task_tokens(FakeTokenizer(40, {}), cfg, params, jax.random.key(1))
    # a loader already appended the specials to the vocabulary: the model gets their rows
    appended = FakeTokenizer(34, {"<start>": 30, "<delim>": 31, "<extract>": 32, "<pad>": 33})
    tok3, cfg3, p3, added3 = add_task_tokens(appended, cfg, params, jax.random.key(1))
    assert tok3 is appended and added3 == ["<start>", "<delim>", "<extract>", "<pad>"]
    assert cfg3.vocab_size == 34 and p3["wte"].shape == (34, 8)


# ----------------------------------------------------------------------------- the loss

CFG = GPTConfig(vocab_size=30, n_ctx=16, n_layer=1, n_head=2, n_embd=16,
                embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def _mc_batch():
    examples = [Example("a b c", choices=("d", "e f g h"), label=1),
                Example("a", choices=("b c", "d"), label=0)]
    return encode_examples("multiple_choice", examples, enc, SP, 16).batch([0, 1])


def _params(kind="multiple_choice"):
    head = make_head(kind, 2 if kind != "multiple_choice" else None)
    return head, {"gpt": init_params(CFG, jax.random.key(0)),
                  "head": init_head(head, kind, CFG.n_embd, jax.random.key(1))}


def test_lm_loss_matches_original_per_sequence_mean_and_hf_token_mean():
    head, params = _params()
    batch = _mc_batch()
    h = task_hidden(params["gpt"], batch, CFG)
    tok = batch["tokens"].reshape(4, -1)
    M = batch["mask"].reshape(4, -1).astype(np.float64)
    nll = np.asarray(token_nll(params["gpt"], h.reshape(4, tok.shape[1], -1)[:, :-1],
                               jnp.asarray(tok[:, 1:])), np.float64)
    # finetune-transformer-lm: sum(nll * M[:, 1:], 1) / sum(M[:, 1:], 1), then the mean
    original = ((nll * M[:, 1:]).sum(1) / M[:, 1:].sum(1)).mean()
    hf = (nll * M[:, 1:]).sum() / M[:, 1:].sum()
    assert abs(original - hf) > 1e-4  # the batch has sequences of different lengths
    np.testing.assert_allclose(lm_loss_on_tasks(params["gpt"], h, batch, "sequence"), original,
                               rtol=1e-5)
    np.testing.assert_allclose(lm_loss_on_tasks(params["gpt"], h, batch, "token"), hf, rtol=1e-5)


def test_lm_loss_ignores_padding_and_never_predicts_start():
    head, params = _params()
    batch = _mc_batch()
    h = task_hidden(params["gpt"], batch, CFG)
    base = lm_loss_on_tasks(params["gpt"], h, batch)
    changed = dict(batch)
    changed["tokens"] = np.where(batch["mask"] == 1, batch["tokens"], 7)  # other pad id
    changed["tokens"][:, :, 0] = 5  # a different first token: not a target
    h2 = task_hidden(params["gpt"], changed, CFG)
    # the targets are unchanged; only the inputs at position 0 changed, so compare targets
    w = batch["mask"][:, :, 1:]
    assert np.array_equal(np.where(w, changed["tokens"][:, :, 1:], 0),
                          np.where(w, batch["tokens"][:, :, 1:], 0))
    padded_only = dict(batch)
    padded_only["tokens"] = np.where(batch["mask"] == 1, batch["tokens"], 7)
    h3 = task_hidden(params["gpt"], padded_only, CFG)
    np.testing.assert_allclose(lm_loss_on_tasks(params["gpt"], h3, padded_only), base, rtol=1e-6)
    assert np.isfinite(float(lm_loss_on_tasks(params["gpt"], h2, changed)))


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_l3_is_l2_plus_lambda_l1_and_zero_lambda_disables():
    """L3 against an independent computation: each sequence cut to its real tokens and run
    through the model alone; L1 = the mean over sequences of each one's mean next-token
    NLL, L2 = the cross-entropy of the softmax over the answers' scores w . h_extract + b,
    both in float64 NumPy."""
    from gptjax.model import forward, logits

    head, params = _params()
    batch = _mc_batch()
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["mask"])
    kernel = np.asarray(params["head"]["score"]["kernel"], np.float64)[:, 0]
    bias = float(params["head"]["score"]["bias"][0])
    nlls, l2 = [], []
    for b in range(tokens.shape[0]):
        scores = []
        for c in range(tokens.shape[1]):
            n = int(mask[b, c].sum())
            row = jnp.asarray(tokens[b, c, :n][None])
            h = forward(params["gpt"], row, CFG)
            logp = _log_softmax(np.asarray(logits(params["gpt"], h), np.float64)[0])
            nlls.append(-np.mean(logp[np.arange(n - 1), tokens[b, c, 1:n]]))
            scores.append(np.asarray(h, np.float64)[0, int(batch["extract"][b, c])] @ kernel
                          + bias)
        l2.append(-_log_softmax(np.array(scores))[int(batch["labels"][b])])
    l1, l2 = np.mean(nlls), np.mean(l2)

    l3, m = make_loss_fn(CFG, head, "multiple_choice", lm_coef=0.5)(params, batch, None)
    np.testing.assert_allclose(float(m["lm_loss"]), l1, rtol=1e-5)
    np.testing.assert_allclose(float(m["task_loss"]), l2, rtol=1e-5)
    np.testing.assert_allclose(float(l3), l2 + 0.5 * l1, rtol=1e-5)
    l3_0, m0 = make_loss_fn(CFG, head, "multiple_choice", lm_coef=0.0)(params, batch, None)
    np.testing.assert_allclose(float(l3_0), l2, rtol=1e-5)
    assert float(m0["lm_loss"]) == 0.0
    with pytest.raises(ValueError, match="lm_coef"):
        make_loss_fn(CFG, head, "multiple_choice", lm_coef=-1.0)


def test_task_loss_values_and_grad_reaches_both_parts():
    head, params = _params("classification")
    a = encode_examples("classification", [Example("a b", label=1), Example("c", label=0)],
                        enc, SP, 16)
    batch = a.batch([0, 1])
    loss_fn = make_loss_fn(CFG, head, "classification", lm_coef=0.5)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, m), grads = grad_fn(params, batch, jax.random.key(3))
    assert np.isfinite(float(loss)) and 0.0 <= float(m["accuracy"]) <= 1.0
    assert float(jnp.abs(grads["head"]["logits"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["gpt"]["wte"]).sum()) > 0


def test_regression_loss_is_mse():
    from gptjax.finetune.transforms import task_loss

    out = jnp.array([0.5, 2.0, 1.0])
    labels = jnp.array([1.0, 2.0, np.nan])
    np.testing.assert_allclose(task_loss("similarity", out, labels, regression=True), 0.125)
    logits = jnp.log(jnp.array([[0.25, 0.75], [0.5, 0.5]]))
    np.testing.assert_allclose(task_loss("classification", logits, jnp.array([1, -1])),
                               -np.log(0.75), rtol=1e-6)
