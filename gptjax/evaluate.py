"""Evaluation by likelihood: perplexity, bits per byte, zero- and few-shot tasks.

    python -m gptjax.cli.evaluate --run RUN_OR_HF_FOLDER --task perplexity --data text.txt
    python -m gptjax.cli.evaluate --run gpt2/ --task storycloze --data cloze_test_val.csv \\
        --train cloze_train.csv --k 5 --json results.json

Everything rests on one jitted scorer: given token rows and a mask of the tokens to score,
the sum of log P(token_t | tokens_<t) over the masked tokens, and whether each was the
model's argmax. A *request* is (context ids, continuation ids); requests are sorted by
length, padded on the right to a power-of-two length and batched (causal attention makes
right padding harmless: it comes after every scored token).

Tasks, as GPT-1/2/3 evaluate them:

  perplexity   text or token file; perplexity and bits per UTF-8 byte, in windows of n_ctx.
  lambada      last-word accuracy: the context is the passage minus its last word; right
               when every token of " word" is the model's argmax (GPT-2's LAMBADA metric).
  storycloze   ROCStories / Story Cloze CSV; pick the ending with the higher likelihood.
  race         RACE JSON; pick the option with the higher likelihood given article+question.
               A fill-in-the-blank question ("The passage is mainly about _ .") puts each
               option in the blank: the context is the article and the words before the
               blank, the scored continuation the option and the words after it
               (`gptjax.finetune.readers.race_example` says why).
  jsonl        generic multiple choice, one {"context", "choices", "label"} object a line.
  cola, sst2   GPT-1's zero-shot heuristics (section 5): CoLA by thresholding the average
               token log-probability of the sentence; SST-2 by appending " very" and
               comparing P(" positive") with P(" negative").
  wsc          Winograd schemas (WSC273 XML, DPR text, JSON lines; formats in
               `gptjax.finetune.readers`), GPT-1's heuristic for DPRD (section 5) from
               Trinh & Le 2018: put each candidate in the pronoun's place and pick the one
               under which the rest of the sentence after it is likelier ("partial"
               scoring, `accuracy_partial`), or the whole sentence is ("full" scoring,
               `accuracy_full` by the sum, `accuracy_full_mean` by the per-token mean).
               Zero-shot only; the prompt settings do not apply.

Multiple choice reports two accuracies: by the summed log-probability of each choice
(`accuracy`) and by its per-token mean (`accuracy_mean`, GPT-1's heuristic for RACE and
Story Cloze). Few-shot prompts follow GPT-3 section 2: k solved examples drawn from a
training split, each written with the template, joined by the separator, before the query.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import GPTConfig
from gptjax.finetune import readers as task_data
from gptjax.finetune.metrics import matthews
from gptjax.finetune.readers import WinogradSchema
from gptjax.finetune.transforms import Example
from gptjax.loading import start_token
from gptjax.model import Params, forward, logits

TASKS = ("perplexity", "lambada", "storycloze", "race", "jsonl", "cola", "sst2", "wsc")


# ----------------------------------------------------------------------------- the scorer


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_batch(params, tokens, weights, cfg):
    """Rows (B, T) and weights (B, T) aligned with them (weights[:, 0] unused) ->
    (sum_t weights[:, t] * log P(tokens[:, t] | tokens[:, <t]) (B,), every weighted
    token the argmax (B,) bool). The same quantity as -lm_loss * sum(weights)."""
    z = logits(params, forward(params, tokens[:, :-1], cfg), cfg)  # (B, T-1, V) float32
    targets = tokens[:, 1:]
    picked = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    logprob = picked - jax.nn.logsumexp(z, axis=-1)
    w = weights[:, 1:]
    is_argmax = picked >= z.max(axis=-1)
    return (logprob * w).sum(-1), jnp.all(is_argmax | (w == 0), axis=-1)


@dataclass(frozen=True)
class Scores:
    """Per request: summed log-probability (nats), scored token count, all tokens argmax."""

    logprob: np.ndarray
    n_tokens: np.ndarray
    greedy: np.ndarray

    @property
    def mean_logprob(self) -> np.ndarray:
        return self.logprob / np.maximum(self.n_tokens, 1)


def score_requests(
    params: Params,
    cfg: GPTConfig,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_tokens: int = 2048,
) -> Scores:
    """log P(continuation | context) for each (context ids, continuation ids) request.

    The context needs at least one token (prepend a start-of-text id such as <eos> to
    score a text from its first token). The model reads all but the last token, so a
    request may be n_ctx + 1 tokens long; a longer one keeps its last n_ctx + 1 (the
    context is cut on the left), and a continuation longer than n_ctx is a ValueError.
    Batches hold about `max_tokens` tokens (rows x padded length), which bounds the
    (rows, length, vocab) logits held at once.
    """
    rows, weights_from = [], []
    for i, (context, continuation) in enumerate(requests):
        context, continuation = list(context), list(continuation)
        if not context:
            raise ValueError(f"request {i}: empty context; prepend a start token such as <eos>")
        if len(continuation) > cfg.n_ctx:
            raise ValueError(f"request {i}: a continuation of {len(continuation)} tokens does "
                             f"not fit the context n_ctx={cfg.n_ctx} after one context token")
        row = (context + continuation)[-(cfg.n_ctx + 1):]
        rows.append(row)
        weights_from.append(len(row) - len(continuation))
    if rows:
        ids = np.concatenate([np.asarray(r, np.int64) for r in rows])
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            bad = int(ids.min() if ids.min() < 0 else ids.max())
            raise ValueError(f"token id {bad} is outside [0, {cfg.vocab_size})")

    n = len(rows)
    logprob, greedy = np.zeros(n), np.zeros(n, bool)
    n_tokens = np.array([len(r) - s for r, s in zip(rows, weights_from, strict=True)])
    order = sorted(range(n), key=lambda i: len(rows[i]))
    start = 0
    while start < n:
        length = _bucket(len(rows[order[start]]), cfg.n_ctx + 1)
        batch = max(1, max_tokens // length)  # one shape per length bucket: few compiles
        chosen = [i for i in order[start:start + batch] if len(rows[i]) <= length]
        tokens = np.zeros((batch, length), np.int32)
        weights = np.zeros((batch, length), np.float32)
        for r, i in enumerate(chosen):
            tokens[r, : len(rows[i])] = rows[i]
            weights[r, weights_from[i]: len(rows[i])] = 1.0
        lp, gr = _score_batch(params, jnp.asarray(tokens), jnp.asarray(weights), cfg=cfg)
        lp, gr = np.asarray(lp, np.float64), np.asarray(gr)
        for r, i in enumerate(chosen):
            logprob[i], greedy[i] = lp[r], gr[r]
        start += len(chosen)
    return Scores(logprob=logprob, n_tokens=n_tokens, greedy=greedy)


def _bucket(length: int, longest: int) -> int:
    """Padded row length: the next power of two >= length (at least 16), at most `longest`."""
    return min(longest, max(16, 1 << (length - 1).bit_length()))


# ----------------------------------------------------------------------------- perplexity


def perplexity(
    params: Params,
    cfg: GPTConfig,
    tokens: Sequence[int] | np.ndarray,
    *,
    stride: int | None = None,
    max_tokens: int = 2048,
) -> dict[str, float]:
    """Total and mean negative log-likelihood of tokens[1:] given what precedes each.

    The model reads windows of at most n_ctx tokens: each window scores the next `stride`
    tokens and conditions them on the up to n_ctx - stride tokens before. The default,
    stride = n_ctx, cuts the text into consecutive training-like windows (the first token
    of a window sees only itself); a smaller stride gives every token at least
    n_ctx - stride tokens of context, at n_ctx / stride times the cost. tokens[0] is never
    scored (prepend a start token to score it).
    Returns {"tokens": scored count, "nll": total nats, "nll_per_token", "perplexity"}.
    """
    tokens = np.asarray(tokens, np.int64).reshape(-1)
    stride = cfg.n_ctx if stride is None else stride
    if not 1 <= stride <= cfg.n_ctx:
        raise ValueError(f"stride={stride} must lie in [1, n_ctx={cfg.n_ctx}]")
    if tokens.size < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {tokens.size}")
    requests, scored = [], 0  # tokens[1 .. scored] are scored so far
    while scored < tokens.size - 1:
        end = min(scored + stride, tokens.size - 1)  # last token scored by this window
        begin = max(0, end - cfg.n_ctx)  # the model reads tokens[begin:end]
        requests.append((tokens[begin: scored + 1].tolist(), tokens[scored + 1: end + 1].tolist()))
        scored = end
    scores = score_requests(params, cfg, requests, max_tokens=max_tokens)
    nll = -float(scores.logprob.sum())
    count = int(scores.n_tokens.sum())
    return {"tokens": count, "nll": nll, "nll_per_token": nll / count,
            "perplexity": math.exp(nll / count)}


def evaluate_text(
    params: Params, cfg: GPTConfig, tokenizer, text: str, *, stride: int | None = None,
    max_tokens: int = 2048,
) -> dict[str, float]:
    """Perplexity per token and bits per UTF-8 byte of `text`.

    With a start token (see `gptjax.loading.start_token`) it is prepended so that every
    token of the text is scored and the bytes are the text's; without one the first token
    is context only and its bytes are not counted.
    """
    ids = tokenizer.encode(text)
    start = start_token(tokenizer, cfg)
    n_bytes = len(text.encode("utf-8"))
    if start is not None:
        ids = [start, *ids]
    elif ids:
        n_bytes -= len(tokenizer.decode(ids[:1]).encode("utf-8"))
    result = perplexity(params, cfg, ids, stride=stride, max_tokens=max_tokens)
    result["bytes"] = n_bytes
    result["bits_per_byte"] = result["nll"] / math.log(2) / n_bytes
    return result


# ----------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptFormat:
    """How a prompt is written (GPT-3 section 2: zero-, one- and few-shot).

    A solved example is `template.format(context=<its text_a>)` followed by
    `choice_template.format(choice=<its right choice>)`; the prompt is the description
    (if any), k solved examples and the query's template, joined by `separator`; each
    candidate continuation is `choice_template.format(choice=...)`.
    """

    # Number of in-context examples drawn from the training split (0 = zero-shot).
    k: int = 0
    # Text between examples, and between the last example and the query.
    separator: str = "\n\n"
    # How an item's context (its text_a) is written.
    template: str = "{context}"
    # How a choice is written after the context (the scored continuation).
    choice_template: str = " {choice}"
    # A natural-language task description put first (GPT-3's zero-shot prompt).
    description: str = ""
    # The examples for item i are drawn with np.random.default_rng((seed, i)).
    seed: int = 1234


def draw_examples(
    index: int, item: Example, train: Sequence[Example], fmt: PromptFormat
) -> list[Example]:
    """fmt.k training items for the item at `index`: a function of (seed, index) only.

    Examples whose text equals the query's are never drawn (so the training split may be
    the evaluation split itself). Raises ValueError when fewer than k remain.
    """
    if fmt.k == 0:
        return []
    pool = [j for j, t in enumerate(train) if t.text_a != item.text_a]
    if len(pool) < fmt.k:
        raise ValueError(f"k={fmt.k} in-context examples asked for, but the training split "
                         f"has only {len(pool)} other items")
    rng = np.random.default_rng((fmt.seed, index))
    return [train[pool[j]] for j in rng.choice(len(pool), size=fmt.k, replace=False)]


def build_prompt(
    index: int, item: Example, fmt: PromptFormat, train: Sequence[Example] = ()
) -> tuple[str, list[str]]:
    """(prompt text, [continuation text per choice]) for the item at `index`.

    Example: k=1, template "Q: {context}\\nA:", item "2+2?" with choices ["4", "5"] and a
    drawn example "1+1?" -> "2", separator "\\n\\n":
        ("Q: 1+1?\\nA: 2\\n\\nQ: 2+2?\\nA:", [" 4", " 5"])
    """
    def written(x: Example) -> str:
        return fmt.template.format(context=x.text_a)

    shots = [written(x) + fmt.choice_template.format(choice=x.choices[x.label])
             for x in draw_examples(index, item, train, fmt)]
    parts = ([fmt.description] if fmt.description else []) + shots + [written(item)]
    return fmt.separator.join(parts), [fmt.choice_template.format(choice=c) for c in item.choices]


def _item_requests(tokenizer, cfg, context: str, continuations: Sequence[str]):
    """Token requests for one context and its continuations (see score_requests)."""
    context_ids = tokenizer.encode(context)
    start = start_token(tokenizer, cfg)
    requests = []
    for text in continuations:
        ids = tokenizer.encode(text)
        ctx = list(context_ids)
        if not ctx:
            if start is not None:
                ctx = [start]
            elif len(ids) > 1:  # no start token: the first token is context only
                ctx, ids = ids[:1], ids[1:]
            else:
                raise ValueError("cannot score a one-token text with no context and no "
                                 "start token")
        requests.append((ctx, ids))
    return requests


def score_items(
    params: Params, cfg: GPTConfig, tokenizer, items: Sequence[Example], *,
    fmt: PromptFormat = PromptFormat(), train: Sequence[Example] = (), max_tokens: int = 2048,
) -> list[Scores]:
    """Scores of every choice of every item (one Scores per item), all batched together."""
    requests, spans = [], []
    for i, item in enumerate(items):
        context, continuations = build_prompt(i, item, fmt, train)
        reqs = _item_requests(tokenizer, cfg, context, continuations)
        spans.append((len(requests), len(requests) + len(reqs)))
        requests += reqs
    s = score_requests(params, cfg, requests, max_tokens=max_tokens)
    return [Scores(s.logprob[a:b], s.n_tokens[a:b], s.greedy[a:b]) for a, b in spans]


# ----------------------------------------------------------------------------- tasks


def evaluate_multiple_choice(
    params: Params, cfg: GPTConfig, tokenizer, items: Sequence[Example], *,
    fmt: PromptFormat = PromptFormat(), train: Sequence[Example] = (), max_tokens: int = 2048,
) -> dict[str, float]:
    """Accuracy of picking the choice of highest summed (`accuracy`) and per-token mean
    (`accuracy_mean`) log-probability given the prompt."""
    scores = score_items(params, cfg, tokenizer, items, fmt=fmt, train=train,
                         max_tokens=max_tokens)
    labels = _labels(items)
    by_sum = np.array([np.argmax(s.logprob) for s in scores])
    by_mean = np.array([np.argmax(s.mean_logprob) for s in scores])
    return {"n": len(items), "accuracy": float(np.mean(by_sum == labels)),
            "accuracy_mean": float(np.mean(by_mean == labels))}


def evaluate_lambada(
    params: Params, cfg: GPTConfig, tokenizer, items: Sequence[Example], *,
    fmt: PromptFormat = PromptFormat(), train: Sequence[Example] = (), max_tokens: int = 2048,
) -> dict[str, float]:
    """Last-word accuracy (every token of the word is the argmax given the passage before
    it) and the perplexity of the last words. Items have one choice: the word."""
    scores = score_items(params, cfg, tokenizer, items, fmt=fmt, train=train,
                         max_tokens=max_tokens)
    logprob = sum(float(s.logprob[0]) for s in scores)
    count = sum(int(s.n_tokens[0]) for s in scores)
    return {"n": len(items), "accuracy": float(np.mean([s.greedy[0] for s in scores])),
            "perplexity": math.exp(-logprob / max(count, 1))}


def evaluate_cola(
    params: Params, cfg: GPTConfig, tokenizer, items: Sequence[Example], *,
    train: Sequence[Example] = (), threshold: float | None = None, max_tokens: int = 2048,
) -> dict[str, Any]:
    """GPT-1's CoLA heuristic: acceptable (label 1) iff the average token log-probability
    of the sentence (`text_a`, scored from the start token) exceeds a threshold. The
    threshold is given, or fitted for the best Matthews correlation on `train`, or on the
    items themselves when there is no train split (`threshold_fit_on` says which; an
    "eval" fit is optimistic)."""
    as_text = PromptFormat(template="", choice_template="{choice}")

    def mean_logprobs(xs):
        texts = [Example("", choices=(x.text_a,), label=0) for x in xs]
        scores = score_items(params, cfg, tokenizer, texts, fmt=as_text, max_tokens=max_tokens)
        return np.array([float(s.mean_logprob[0]) for s in scores])

    scores, labels = mean_logprobs(items), _labels(items)
    fit_on = "given"
    if threshold is None:
        fit_on = "train" if train else "eval"
        fit_scores, fit_labels = (mean_logprobs(train), _labels(train)) if train else (
            scores, labels)
        threshold = best_threshold(fit_scores, fit_labels)
    predicted = (scores > threshold).astype(int)
    return {"n": len(items), "matthews": matthews(labels, predicted),
            "accuracy": float(np.mean(predicted == labels)), "threshold": float(threshold),
            "threshold_fit_on": fit_on}


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The cut between sorted scores (predict 1 above it) of highest Matthews correlation."""
    s = np.unique(scores)
    candidates = np.concatenate([[s[0] - 1.0], (s[:-1] + s[1:]) / 2, [s[-1] + 1.0]])
    mccs = [matthews(labels, (scores > t).astype(int)) for t in candidates]
    return float(candidates[int(np.argmax(mccs))])


def _labels(items: Sequence[Example]) -> np.ndarray:
    if any(it.label is None for it in items):
        raise ValueError("evaluation needs labelled examples; this split has none "
                         "(a test split?)")
    return np.array([int(it.label) for it in items])


# GPT-1 section 5: "For SST-2 (sentiment analysis), we append the token very to each
# example and restrict the language model's output distribution to only the words
# positive and negative and guess the token it assigns higher probability to."
SST2_CHOICES = ("negative", "positive")  # GLUE SST-2 labels: 0 negative, 1 positive


def sst2_items(examples: Sequence[Example]) -> list[Example]:
    """SST-2 sentences as two-choice items: (" negative", " positive") after the text."""
    return [Example(x.text_a, choices=SST2_CHOICES, label=x.label) for x in examples]


# ----------------------------------------------------------------------------- Winograd


# The pronouns after which a candidate takes "'s" ("his" -> "the man's"). "her" is
# also an object pronoun; it is taken as possessive, as lm-evaluation-harness's WSC273 does.
POSSESSIVE_PRONOUNS = ("my", "his", "her", "its", "our", "their")
# A candidate starting with one of these is lower-cased inside a sentence ("The trophy").
_LOWERED_INSIDE = ("A", "An", "The", "He", "She", "It", "They", "My", "His", "Her", "Its",
                   "Our", "Their")


def substitute(item: WinogradSchema, candidate: str) -> tuple[str, str]:
    """(the sentence up to the pronoun with the candidate in its place, the rest after it).

    Example: "The trophy doesn't fit in the suitcase because it is too big.", pronoun
    "it", candidate "The trophy" ->
        ("The trophy doesn't fit in the suitcase because the trophy", " is too big.")
    The candidate is written as the sentence needs it: after a possessive pronoun it takes
    "'s"; a leading article or pronoun is lower-cased inside a sentence; at the start of a
    sentence its first letter is upper-cased.
    """
    before = item.text[: item.pronoun_at]
    rest = item.text[item.pronoun_at + len(item.pronoun):]
    word = candidate.strip()
    if item.pronoun.lower() in POSSESSIVE_PRONOUNS and not word.endswith(("'s", "s'")):
        word += "'" if word.endswith("s") else "'s"  # "the demonstrators'", "the man's"
    first, space, tail = word.partition(" ")
    if not before.strip() or before.rstrip()[-1] in ".!?":
        word = word[:1].upper() + word[1:]
    elif first in _LOWERED_INSIDE:
        word = first.lower() + space + tail
    return before + word, rest


def wsc_requests(tokenizer, cfg: GPTConfig, items: Sequence[WinogradSchema]):
    """(full, partial) requests, two per item (candidate 0, then 1) in item order.

    full: the whole sentence with the candidate substituted, from the start token (see
    `_item_requests`). partial: the rest of the sentence after the substitution, given the
    sentence up to and including the candidate; the rest is the same text for both
    candidates, so only its conditioning differs.
    """
    full, partial = [], []
    for item in items:
        for candidate in item.candidates:
            head, rest = substitute(item, candidate)
            full += _item_requests(tokenizer, cfg, "", [head + rest])
            partial.append((tokenizer.encode(head), tokenizer.encode(rest)))
    return full, partial


def wsc_metrics(items: Sequence[WinogradSchema], full: Scores, partial: Scores) -> dict:
    """Accuracies from the scores of `wsc_requests`' requests: partial scoring by the mean
    log-probability of the rest (GPT-1's "average token log-probability"; the rest's tokens
    are the same for both candidates, so the sum ranks alike), full scoring by the sum
    (Trinh & Le's sentence probability) and by the per-token mean. A tie picks candidate 0."""
    labels = _labels(items)

    def accuracy(values: np.ndarray) -> float:
        return float(np.mean(values.reshape(-1, 2).argmax(-1) == labels))

    return {"n": len(items), "accuracy_partial": accuracy(partial.mean_logprob),
            "accuracy_full": accuracy(full.logprob),
            "accuracy_full_mean": accuracy(full.mean_logprob)}


def evaluate_wsc(
    params: Params, cfg: GPTConfig, tokenizer, items: Sequence[WinogradSchema], *,
    max_tokens: int = 2048,
) -> dict[str, float]:
    """Winograd schemas by substitution, partial and full scoring (see `wsc_metrics`)."""
    full, partial = wsc_requests(tokenizer, cfg, items)
    s = score_requests(params, cfg, full + partial, max_tokens=max_tokens)
    n = len(full)
    return wsc_metrics(items, Scores(s.logprob[:n], s.n_tokens[:n], s.greedy[:n]),
                       Scores(s.logprob[n:], s.n_tokens[n:], s.greedy[n:]))


# ----------------------------------------------------------------------------- readers


def read_lambada(path: str | Path) -> list[Example]:
    """LAMBADA-style passages, one a line (plain text, or JSON lines with a "text" field):
    the context is all but the last word, the one choice is the last word."""
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                line = json.loads(line)["text"].strip()
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' field "
                                 f"({err!r})") from None
        context, _, word = line.rpartition(" ")
        if not context:
            raise ValueError(f"{path}:{n}: a passage needs at least two words: {line!r}")
        items.append(Example(context, choices=(word,), label=0))
    if not items:
        raise ValueError(f"{path}: no passages")
    return items


JSONL_COLUMNS = {"context": "context", "choices": "choices", "label": "label"}


def read_task(task: str, path: str | Path) -> list[Example] | list[WinogradSchema]:
    """The examples of a task file, by the project's readers (gptjax.finetune.readers):
    storycloze CSV, race JSON (file or folder; blanks filled), GLUE cola / sst2 TSV,
    JSON-lines multiple choice with "context", "choices" (a list) and "label" (the right
    choice's index), LAMBADA passages, and Winograd schemas (WinogradSchema items)."""
    if task == "lambada":
        return read_lambada(path)
    if task == "storycloze":
        return task_data.read_story_cloze(path)
    if task == "race":
        return task_data.read_race(path, fill_blanks=True)
    if task == "wsc":
        return task_data.read_winograd(path)
    if task in ("cola", "sst2"):
        return task_data.read_glue(task, path)
    if task == "jsonl":
        spec = task_data.generic_spec("multiple_choice", name="jsonl")
        return task_data.read_generic(path, spec, JSONL_COLUMNS)
    raise ValueError(f"task {task!r} has no example reader")


def read_tokens(path: str | Path, *, split: str = "val", dtype: str = "uint16"):
    """Token ids to score and the UTF-8 bytes they stand for (None if unknown).

    `path` is a token folder written by gptjax.data.prepare_tokens (its `split`, with the
    byte count from meta.json), a .npy array, or a raw little-endian file of `dtype` ids.
    """
    path = Path(path)
    if path.is_dir():
        from gptjax.data.corpus import load_token_data

        data = load_token_data(path)
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} must be 'train' or 'val'")
        return np.asarray(getattr(data, split)), data.meta.get(f"{split}_bytes")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).reshape(-1), None
    return np.fromfile(path, dtype=np.dtype(dtype).newbyteorder("<")), None


# ----------------------------------------------------------------------------- running


def run_task(
    params: Params, cfg: GPTConfig, tokenizer, task: str, data: str | Path, *,
    train: str | Path | None = None, fmt: PromptFormat = PromptFormat(),
    limit: int | None = None, stride: int | None = None, threshold: float | None = None,
    max_tokens: int = 2048, token_dtype: str = "uint16", split: str = "val",
) -> dict[str, Any]:
    """Evaluate one task on the file `data` and return its metrics (see the module doc).

    `train` is the split k-shot examples are drawn from (and CoLA's threshold is fitted
    on); `limit` keeps the first items of `data` only (the first tokens or characters for
    perplexity).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"no such file or folder: {data}")
    if task == "perplexity":
        return _run_perplexity(params, cfg, tokenizer, data, limit=limit, stride=stride,
                               max_tokens=max_tokens, token_dtype=token_dtype, split=split)
    items = read_task(task, data)[:limit] if limit else read_task(task, data)
    if task == "wsc":
        if fmt.k or train is not None:
            raise ValueError("wsc is zero-shot (GPT-1's substitution heuristic): it takes "
                             "no --k and no --train")
        return evaluate_wsc(params, cfg, tokenizer, items, max_tokens=max_tokens)
    train_items = read_task(task, train) if train is not None else []
    if fmt.k and not train_items:
        raise ValueError(f"k={fmt.k} needs a training split to draw examples from (--train)")
    if task == "cola":
        return evaluate_cola(params, cfg, tokenizer, items, train=train_items,
                             threshold=threshold, max_tokens=max_tokens)
    if task == "sst2":  # GPT-1's heuristic: the example, then " very"
        fmt = dataclasses.replace(fmt, template=fmt.template + " very")
        items, train_items = sst2_items(items), sst2_items(train_items)
    evaluate = evaluate_lambada if task == "lambada" else evaluate_multiple_choice
    return evaluate(params, cfg, tokenizer, items, fmt=fmt, train=train_items,
                    max_tokens=max_tokens)


def _run_perplexity(params, cfg, tokenizer, data: Path, *, limit, stride, max_tokens,
                    token_dtype, split):
    if not (data.is_dir() or data.suffix in (".npy", ".bin")):
        text = data.read_text(encoding="utf-8")
        return evaluate_text(params, cfg, tokenizer, text[:limit] if limit else text,
                             stride=stride, max_tokens=max_tokens)
    ids, n_bytes = read_tokens(data, split=split, dtype=token_dtype)
    if limit:
        ids, n_bytes = ids[:limit], None
    if n_bytes is None and tokenizer is not None:  # special ids stand for no text
        special = set(tokenizer.special_tokens.values())
        n_bytes = len(tokenizer.decode([int(i) for i in ids[1:] if int(i) not in special])
                      .encode("utf-8"))
    result = perplexity(params, cfg, ids, stride=stride, max_tokens=max_tokens)
    if n_bytes:
        result["bytes"] = n_bytes
        result["bits_per_byte"] = result["nll"] / math.log(2) / n_bytes
    return result


def format_table(task: str, metrics: dict[str, Any]) -> str:
    """A two-column text table of one task's metrics."""
    rows = [(name, f"{v:.4f}" if isinstance(v, float) else str(v)) for name, v in metrics.items()]
    width = max(len(task), *(len(n) for n, _ in rows))
    lines = [f"{task:<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
