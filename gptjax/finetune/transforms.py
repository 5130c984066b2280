"""GPT-1 fine-tuning: the input transformations and the task + language-model loss.

GPT-1 (Radford et al. 2018, section 3.3) adapts one pre-trained transformer to
structured inputs by turning each input into token sequences framed by three
special tokens, `<start>`, `<delim>` and `<extract>`; a linear head reads the
final hidden state at `<extract>` (heads.py). The four layouts:

    classification   <start> text <extract>
    entailment       <start> premise <delim> hypothesis <extract>
    similarity       <start> A <delim> B <extract>   and   <start> B <delim> A <extract>
    multiple choice  <start> context <delim> answer_k <extract>     one per answer k

Every kind is encoded to the same array layout, with an S axis of sequences per
example (S = 1 for classification and entailment, 2 for similarity, the
number of choices for multiple choice):

    tokens     (N, S, T) int32   the sequences, right-padded with <pad>
    mask       (N, S, T) int32   1 at real tokens (<start> .. <extract>), 0 at padding
    positions  (N, S, T) int32   position ids 0, 1, ..., T-1 (padding included)
    extract    (N, S)    int32   index of <extract> in each sequence
    choices    (N, S)    int32   1 where the sequence exists (multiple choice may have
                                 fewer answers than S), else 0; 1 for the other kinds
    labels     (N,)              class index (int32) or score (float32); -1 / NaN if unknown

Right padding with a causal model means no real token ever attends to padding,
so the transformer runs without a key mask and the states at real tokens equal
those of the unpadded sequences.

Truncation follows openai/finetune-transformer-lm (the GPT-1 release, whose
`transform_roc` cuts the story and each ending to `max_len = n_ctx // 2 - 2`
tokens before framing): with two segments (entailment, similarity, multiple
choice) each segment keeps its first n_ctx // 2 - 2 tokens, so the framed
sequence (3 special tokens) always fits; a classification text is the only
segment and keeps its first n_ctx - 2 tokens. The number of examples in which
anything was cut is reported (`TaskArrays.n_truncated`).

The loss (section 3.2): L3 = L2 + lambda * L1, with L2 the task loss and L1 the
language-modelling loss on the same transformed sequences; lambda = 0.5 by
default, 0 turns L1 off (and skips its cost). See `lm_loss_on_tasks` for the
normalisation.

BERT (Devlin et al. 2019, section 4 and figure 4) frames the same four kinds with its own
tokens and segment ids (`BertSpecialIds`, `bert_sequence`):

    classification   [CLS] text [SEP]                                segments 0 ... 0
    entailment       [CLS] premise [SEP] hypothesis [SEP]            0 ... 0  1 ... 1
    similarity       [CLS] A [SEP] B [SEP]        one order: BERT reads both sides at once
    multiple choice  [CLS] context [SEP] answer_k [SEP]              one per answer k

and its heads read the pooled [CLS] state (model.pooled) rather than a final token, so
`extract` is 0 and the arrays gain `token_types` (N, S, T). A pair is truncated as BERT's
run_classifier.py does (`truncate_pair`: the longer segment loses its last token until
the pair fits in n_ctx - 3); a single text keeps n_ctx - 2 tokens. BERT has no auxiliary
language-modelling loss (its MLM head predicts masked tokens, which fine-tuning inputs do
not have): `make_loss_fn` refuses lambda > 0 for it. Padding is masked in attention, as
it must be for an encoder whose every position sees every other.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import GPTConfig
from gptjax.model import forward, pooled, token_nll

logger = logging.getLogger(__name__)

KINDS = ("classification", "entailment", "similarity", "multiple_choice")

# The special tokens fine-tuning needs in the vocabulary: GPT-1's and BERT's.
TASK_SPECIAL_TOKENS = ("<start>", "<delim>", "<extract>", "<pad>")
BERT_TASK_SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]")


def task_special_tokens(cfg: GPTConfig) -> tuple[str, ...]:
    """The special tokens the model's input layout uses (GPT-1's or BERT's)."""
    return BERT_TASK_SPECIAL_TOKENS if cfg.arch == "bert" else TASK_SPECIAL_TOKENS

LM_NORMALIZATIONS = ("sequence", "token")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; choose one of {list(KINDS)}")
    return kind


# ----------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One labelled (or unlabelled) task input, before tokenization.

    Which fields a kind reads:
        classification   text_a
        entailment       text_a = premise, text_b = hypothesis
        similarity       text_a = A, text_b = B
        multiple_choice  text_a = context, choices = the answers
    label: a class index (int), a score (float, similarity regression), or None
    when unknown (a test split). uid: the example's id in its source, for
    prediction files.
    """

    text_a: str
    text_b: str | None = None
    choices: tuple[str, ...] = ()
    label: int | float | None = None
    uid: str = ""


@dataclass(frozen=True)
class SpecialIds:
    """Token ids of the special tokens the transformations insert."""

    start: int
    delim: int
    extract: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialIds:
        """Read the ids from a gptjax Tokenizer (its `token_id` names a missing token)."""
        return cls(*(tokenizer.token_id(name) for name in TASK_SPECIAL_TOKENS))


@dataclass(frozen=True)
class BertSpecialIds:
    """Token ids of BERT's [CLS], [SEP] and [PAD]."""

    cls: int
    sep: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> BertSpecialIds:
        return cls(*(tokenizer.token_id(name) for name in BERT_TASK_SPECIAL_TOKENS))


def special_ids(tokenizer, cfg: GPTConfig) -> SpecialIds | BertSpecialIds:
    """The ids of the layout the model reads: BERT's for arch "bert", else GPT-1's."""
    if cfg.arch == "bert":
        return BertSpecialIds.from_tokenizer(tokenizer)
    return SpecialIds.from_tokenizer(tokenizer)


# ----------------------------------------------------------------------------- layouts


def max_segment_length(n_ctx: int, n_segments: int) -> int:
    """Tokens each segment may keep so that the framed sequence fits in n_ctx.

    Two segments: n_ctx // 2 - 2, as openai/finetune-transformer-lm does (3 special
    tokens + 2 * (n_ctx // 2 - 2) <= n_ctx - 1). One segment: n_ctx - 2.

    >>> max_segment_length(512, 2), max_segment_length(512, 1)
    (254, 510)
    """
    limit = n_ctx - 2 if n_segments == 1 else n_ctx // 2 - 2
    if limit < 1:
        raise ValueError(f"n_ctx={n_ctx} leaves no room for a segment between special tokens")
    return limit


def classification_sequence(text: Sequence[int], sp: SpecialIds) -> list[int]:
    """`<start> text <extract>`.

    With sp = SpecialIds(start=1, delim=2, extract=3, pad=0) and the text
    "good film" encoded as [41, 42]:

    >>> classification_sequence([41, 42], SpecialIds(1, 2, 3, 0))
    [1, 41, 42, 3]
    """
    return [sp.start, *text, sp.extract]


def entailment_sequence(premise: Sequence[int], hypothesis: Sequence[int],
                        sp: SpecialIds) -> list[int]:
    """`<start> premise <delim> hypothesis <extract>`.

    Premise "a dog runs" = [51, 52, 53], hypothesis "an animal moves" = [54, 55, 56]:

    >>> entailment_sequence([51, 52, 53], [54, 55, 56], SpecialIds(1, 2, 3, 0))
    [1, 51, 52, 53, 2, 54, 55, 56, 3]
    """
    return [sp.start, *premise, sp.delim, *hypothesis, sp.extract]


def similarity_sequences(a: Sequence[int], b: Sequence[int],
                         sp: SpecialIds) -> tuple[list[int], list[int]]:
    """Both orders, `<start> A <delim> B <extract>` and `<start> B <delim> A <extract>`.

    Similarity has no natural order, so the model reads both and the head adds
    the two `<extract>` states. A = [61, 62], B = [71]:

    >>> similarity_sequences([61, 62], [71], SpecialIds(1, 2, 3, 0))
    ([1, 61, 62, 2, 71, 3], [1, 71, 2, 61, 62, 3])
    """
    return entailment_sequence(a, b, sp), entailment_sequence(b, a, sp)


def multiple_choice_sequences(context: Sequence[int], answers: Sequence[Sequence[int]],
                              sp: SpecialIds) -> list[list[int]]:
    """One sequence per answer: `<start> context <delim> answer_k <extract>`.

    Context [81, 82], answers [91] and [92, 93]:

    >>> multiple_choice_sequences([81, 82], [[91], [92, 93]], SpecialIds(1, 2, 3, 0))
    [[1, 81, 82, 2, 91, 3], [1, 81, 82, 2, 92, 93, 3]]
    """
    return [entailment_sequence(context, answer, sp) for answer in answers]


def bert_sequence(a: Sequence[int], b: Sequence[int] | None,
                  sp: BertSpecialIds) -> tuple[list[int], list[int]]:
    """BERT's input and its segment ids: `[CLS] A [SEP]` (segment 0), then `B [SEP]`
    (segment 1) when there is a B.

    "good film" = [41, 42], with [CLS] = 101, [SEP] = 102:

    >>> bert_sequence([41, 42], None, BertSpecialIds(101, 102, 0))
    ([101, 41, 42, 102], [0, 0, 0, 0])
    >>> bert_sequence([51, 52], [54], BertSpecialIds(101, 102, 0))
    ([101, 51, 52, 102, 54, 102], [0, 0, 0, 0, 1, 1])
    """
    ids, types = [sp.cls, *a, sp.sep], [0] * (len(a) + 2)
    if b is not None:
        ids += [*b, sp.sep]
        types += [1] * (len(b) + 1)
    return ids, types


def truncate_pair(a: Sequence[int], b: Sequence[int],
                  budget: int) -> tuple[list[int], list[int], bool]:
    """(a, b, cut): the longer of the two (a on a tie) loses its last token until
    len(a) + len(b) <= budget, as BERT's `_truncate_seq_pair` (run_classifier.py) does.

    >>> truncate_pair([1, 2, 3, 4], [5, 6], 4)
    ([1, 2], [5, 6], True)
    """
    a, b = list(a), list(b)
    cut = False
    while len(a) + len(b) > budget:
        cut = True
        if len(a) >= len(b):
            a.pop()
        else:
            b.pop()
    return a, b, cut


# ----------------------------------------------------------------------------- encoding


@dataclass
class TaskArrays:
    """A task split as fixed-shape host arrays (see the module docstring for shapes)."""

    kind: str
    tokens: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    extract: np.ndarray
    choices: np.ndarray
    labels: np.ndarray
    n_truncated: int = 0  # examples in which at least one segment was cut
    token_types: np.ndarray | None = None  # (N, S, T) BERT's segment ids; None for GPT

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        return self.tokens.shape[2]

    def batch(self, indices) -> dict[str, np.ndarray]:
        """The examples at `indices` as the dict the loss function takes."""
        idx = np.asarray(indices)
        batch = {name: getattr(self, name)[idx] for name in BATCH_KEYS}
        if self.token_types is not None:
            batch["token_types"] = self.token_types[idx]
        return batch


BATCH_KEYS = ("tokens", "mask", "positions", "extract", "choices", "labels")


def encode_examples(
    kind: str,
    examples: Sequence[Example],
    encode: Callable[[str], list[int]],
    specials: SpecialIds,
    n_ctx: int,
    *,
    pad_to: int | None = None,
    n_choices: int | None = None,
    regression: bool = False,
) -> TaskArrays:
    """Tokenize, transform, truncate and pad `examples` of one task kind.

    encode: text -> token ids (a tokenizer's `encode`; it must not add special
    tokens). specials: `SpecialIds` for GPT-1's layout, `BertSpecialIds` for BERT's
    (see the module docstring). n_ctx: the length budget (at most the model's context);
    segments are truncated as in the original code (`max_segment_length`; BERT:
    `truncate_pair`). pad_to: the
    padded length T; None pads to the longest sequence produced. n_choices: the
    S of a multiple-choice task (default: the most answers any example has).
    regression: labels are float scores (similarity as in STS-B).

    Worked example, entailment with n_ctx = 8 (each segment keeps 8 // 2 - 2 = 2
    tokens), premise [51, 52, 53] and hypothesis [54], specials (1, 2, 3, pad 0),
    pad_to = 8:
        tokens    [[1, 51, 52, 2, 54, 3, 0, 0]]   (53 cut: n_truncated = 1)
        mask      [[1, 1,  1,  1, 1,  1, 0, 0]]
        positions [[0, 1,  2,  3, 4,  5, 6, 7]]
        extract   [5]
    """
    check_kind(kind)
    if not examples:
        raise ValueError(f"no examples to encode for the {kind} task")
    cache: dict[str, list[int]] = {}

    def ids(text: str) -> list[int]:
        if text not in cache:
            cache[text] = list(encode(text))
        return cache[text]

    bert = isinstance(specials, BertSpecialIds)
    n_segments = 1 if kind == "classification" else 2
    if bert:  # BERT cuts a pair together (truncate_pair), a single text alone
        limit = n_ctx - 2 if n_segments == 1 else n_ctx - 3
        if limit < n_segments:
            raise ValueError(f"n_ctx={n_ctx} leaves no room for {n_segments} segment(s) "
                             "between [CLS] and [SEP]")
    else:
        limit = max_segment_length(n_ctx, n_segments)
    # Per example, its sequences as (ids, segment ids); GPT's have no segments (None).
    sequences: list[list[tuple[list[int], list[int] | None]]] = []
    n_truncated = 0
    for i, ex in enumerate(examples):
        cut = False

        def seg(text, what, keep=limit, i=i, ex=ex):
            nonlocal cut
            if text is None:
                raise ValueError(f"{kind} example {i} (uid {ex.uid!r}) has no {what}")
            t = ids(text)
            if keep is not None and len(t) > keep:
                cut = True
                t = t[:keep]
            return t

        if kind == "multiple_choice" and not ex.choices:
            raise ValueError(f"multiple_choice example {i} (uid {ex.uid!r}) has no choices")
        if bert:
            if kind == "classification":
                seqs = [bert_sequence(seg(ex.text_a, "text"), None, specials)]
            else:
                first = seg(ex.text_a, _FIRST[kind], None)
                seconds = ([seg(c, f"choice {k}", None) for k, c in enumerate(ex.choices)]
                           if kind == "multiple_choice" else [seg(ex.text_b, _SECOND[kind],
                                                                  None)])
                seqs = []
                for second in seconds:
                    a, b, was_cut = truncate_pair(first, second, limit)
                    cut |= was_cut
                    seqs.append(bert_sequence(a, b, specials))
        else:
            if kind == "classification":
                gpt = [classification_sequence(seg(ex.text_a, "text"), specials)]
            elif kind == "entailment":
                gpt = [entailment_sequence(seg(ex.text_a, "premise"),
                                           seg(ex.text_b, "hypothesis"), specials)]
            elif kind == "similarity":
                gpt = list(similarity_sequences(seg(ex.text_a, "text A"),
                                                seg(ex.text_b, "text B"), specials))
            else:
                context = seg(ex.text_a, "context")
                gpt = multiple_choice_sequences(
                    context, [seg(c, f"choice {k}") for k, c in enumerate(ex.choices)],
                    specials)
            seqs = [(q, None) for q in gpt]
        n_truncated += cut
        sequences.append(seqs)

    S = max(len(s) for s in sequences)
    if kind == "multiple_choice" and n_choices is not None:
        if n_choices < S:
            raise ValueError(f"an example has {S} choices, more than n_choices={n_choices}")
        S = n_choices
    longest = max(len(q) for seqs in sequences for q, _ in seqs)
    T = longest if pad_to is None else pad_to
    if T < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence ({longest})")

    N = len(examples)
    tokens = np.full((N, S, T), specials.pad, np.int32)
    mask = np.zeros((N, S, T), np.int32)
    extract = np.zeros((N, S), np.int32)
    choices = np.zeros((N, S), np.int32)
    token_types = np.zeros((N, S, T), np.int32) if bert else None
    for i, seqs in enumerate(sequences):
        for s, (q, types) in enumerate(seqs):
            tokens[i, s, : len(q)] = q
            mask[i, s, : len(q)] = 1
            # GPT-1's head reads the last token (<extract>); BERT's the pooled [CLS].
            extract[i, s] = 0 if bert else len(q) - 1
            choices[i, s] = 1
            if bert:
                token_types[i, s, : len(q)] = types
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (N, S, T)).copy()
    labels = _label_array(kind, examples, regression, S)
    if n_truncated:
        logger.info("%s: truncated %d of %d examples (to %d tokens %s)", kind, n_truncated, N,
                    limit, "per pair" if bert and n_segments == 2 else "per segment")
    return TaskArrays(kind, tokens, mask, positions, extract, choices, labels, n_truncated,
                      token_types)


# What the first and second segment of a pair are called, for error messages.
_FIRST = {"entailment": "premise", "similarity": "text A", "multiple_choice": "context"}
_SECOND = {"entailment": "hypothesis", "similarity": "text B"}


def _label_array(kind, examples, regression, n_choices) -> np.ndarray:
    if regression:
        if kind != "similarity":
            raise ValueError(f"regression labels are for similarity tasks, not {kind}")
        return np.array([np.nan if e.label is None else float(e.label) for e in examples],
                        np.float32)
    out = np.full((len(examples),), -1, np.int32)
    for i, e in enumerate(examples):
        if e.label is None:
            continue
        if isinstance(e.label, float) and not float(e.label).is_integer():
            raise ValueError(f"example {i} (uid {e.uid!r}) has a non-integer class label "
                             f"{e.label!r}; use regression=True for scores")
        out[i] = int(e.label)
        if out[i] < 0 or (kind == "multiple_choice" and out[i] >= len(e.choices)):
            raise ValueError(f"example {i} (uid {e.uid!r}) has label {e.label!r}, "
                             f"outside its {len(e.choices) or 'class'} choices")
    return out


# ----------------------------------------------------------------------------- vocabulary


def grow_vocab(cfg: GPTConfig, params: dict, new_ids: Sequence[int], key: jax.Array,
               std: float | None = None) -> tuple[GPTConfig, dict]:
    """Give the embedding W_e rows for `new_ids`, initialised N(0, std) (default cfg.init_std).

    W_e grows to max(vocab_size, max(new_ids) + 1) rows; rows of the new ids that
    already existed (a vocabulary padded past the tokenizer's) are re-drawn too,
    so every special token starts from the same initialisation. The output
    softmax is tied to W_e, so it covers the new tokens with no other change.
    A BERT's MLM output bias grows with it (zeros for the new ids).
    Returns the new config (vocab_size updated) and params (other leaves shared).
    """
    new_ids = sorted(set(int(i) for i in new_ids))
    if not new_ids:
        return cfg, params
    if new_ids[0] < 0:
        raise ValueError(f"negative token id {new_ids[0]}")
    std = cfg.init_std if std is None else std
    wte = params["wte"]
    V, D = wte.shape
    V_new = max(V, new_ids[-1] + 1)
    rows = std * jax.random.normal(key, (len(new_ids), D), jnp.float32)
    grown = jnp.concatenate([wte, jnp.zeros((V_new - V, D), wte.dtype)], axis=0)
    grown = grown.at[jnp.asarray(new_ids)].set(rows.astype(wte.dtype))
    params = {**params, "wte": grown}
    if "mlm" in params:
        bias = params["mlm"]["bias"]
        params["mlm"] = {**params["mlm"], "bias": jnp.concatenate(
            [bias, jnp.zeros((V_new - V,), bias.dtype)])}
    return cfg.replace(vocab_size=V_new), params


def add_task_tokens(tokenizer, cfg: GPTConfig, params: dict, key: jax.Array):
    """Make sure tokenizer and model have `<start>`, `<delim>`, `<extract>`, `<pad>`
    (a BERT: [CLS], [SEP], [PAD]; `task_special_tokens`).

    Missing names are appended to the tokenizer (`add_special_tokens`) and their
    embedding rows drawn N(0, 0.02) (`grow_vocab`); a message names them. Special
    tokens the tokenizer has but the model has no row for (a loader that appended
    them to a pre-trained vocabulary) get new rows the same way. Returns
    (tokenizer, cfg, params, added_names). Any other id past the model's
    vocabulary is an error: it would have no embedding row.
    """
    have = tokenizer.special_tokens
    missing = [n for n in task_special_tokens(cfg) if n not in have]
    if missing:
        tokenizer = tokenizer.add_special_tokens(missing)
    specials = tokenizer.special_tokens
    rowless = [n for n, i in specials.items() if i >= cfg.vocab_size]
    rowless_ids = {specials[n] for n in rowless}
    others = [i for i in range(cfg.vocab_size, tokenizer.vocab_size) if i not in rowless_ids]
    if others:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's "
                         f"vocab_size is {cfg.vocab_size} (id {others[0]} is no special token)")
    added = list(dict.fromkeys(missing + rowless))
    if not added:
        return tokenizer, cfg, params, []
    new_ids = [specials[n] for n in added]
    cfg, params = grow_vocab(cfg, params, new_ids, key)
    logger.warning("the model lacked the special tokens %s: added as ids %s with new "
                   "embedding rows N(0, %g); vocab_size is now %d", added, new_ids,
                   cfg.init_std, cfg.vocab_size)
    return tokenizer, cfg, params, added


# ----------------------------------------------------------------------------- the model


def task_hidden(gpt_params: dict, batch: dict, cfg: GPTConfig, rng: jax.Array | None = None):
    """The states the heads read, for every sequence: a GPT's final hidden states, tokens
    (B, S, T) -> (B, S, T, D); a BERT's pooled [CLS] state (model.pooled), (B, S, 1, D),
    with padding masked and the segment ids of batch["token_types"].

    rng None: evaluation (no dropout); a key: training with the config's dropout.
    """
    tokens = batch["tokens"]
    B, S, T = tokens.shape

    def flat(x):
        return x.reshape(B * S, T)

    positions = flat(batch["positions"]) if "positions" in batch else None
    if cfg.arch == "bert":
        h = forward(gpt_params, flat(tokens), cfg, train=rng is not None, rng=rng,
                    positions=positions, attention_mask=flat(batch["mask"]),
                    token_types=flat(batch["token_types"]))
        return pooled(gpt_params, h, cfg).reshape(B, S, 1, h.shape[-1])
    h = forward(gpt_params, flat(tokens), cfg, train=rng is not None, rng=rng,
                positions=positions)
    return h.reshape(B, S, T, h.shape[-1])


def apply_head(head, head_params, kind: str, h: jax.Array, batch: dict,
               rng: jax.Array | None = None) -> jax.Array:
    """The head's outputs: (B, classes) logits, (B,) scores, or (B, C) choice logits."""
    kwargs = {"deterministic": rng is None}
    rngs = {} if rng is None else {"dropout": rng}
    variables = {"params": head_params}
    if kind in ("classification", "entailment"):
        return head.apply(variables, h[:, 0], batch["extract"][:, 0], rngs=rngs, **kwargs)
    if kind == "similarity":
        return head.apply(variables, h, batch["extract"], rngs=rngs, **kwargs)
    return head.apply(variables, h, batch["extract"], batch["choices"], rngs=rngs, **kwargs)


def task_loss(kind: str, outputs: jax.Array, labels: jax.Array, regression: bool = False):
    """L2: mean cross-entropy over the examples (classes or choices), or mean squared error
    of a regression score. Examples with an unknown label (-1 / NaN) are left out."""
    if regression:
        known = ~jnp.isnan(labels)
        err = jnp.where(known, outputs.astype(jnp.float32) - jnp.nan_to_num(labels), 0.0)
        return (err**2).sum() / jnp.maximum(known.sum(), 1)
    known = labels >= 0
    z = outputs.astype(jnp.float32)
    picked = jnp.take_along_axis(z, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    nll = jax.nn.logsumexp(z, axis=-1) - picked
    return jnp.where(known, nll, 0.0).sum() / jnp.maximum(known.sum(), 1)


def lm_loss_on_tasks(gpt_params: dict, h: jax.Array, batch: dict,
                     normalization: str = "sequence", *,
                     cfg: GPTConfig | None = None) -> jax.Array:
    """L1 on the transformed sequences: next-token NLL over real tokens only.

    Position t predicts token t + 1 and counts when token t + 1 is real
    (mask[t + 1] = 1): the targets are every real token after `<start>`, up to
    and including `<extract>`; `<start>` itself is never predicted (nothing
    precedes it), and padding never is. Missing choices count for nothing.

    normalization:
      "sequence"  the mean NLL of each sequence, averaged over the sequences of
                  the batch (all S of each example). This is openai/finetune-
                  transformer-lm's `lm_losses = sum(nll * M[:, 1:], 1) /
                  sum(M[:, 1:], 1)` followed by `reduce_mean`; the default.
      "token"     total NLL / number of predicted tokens in the batch: Hugging
                  Face's `lm_loss` (CrossEntropyLoss mean over the labels that
                  are not -100) when `labels` are the input ids with -100 at
                  padding. Longer sequences then weigh more.
    The two agree when every sequence has the same number of real tokens.
    cfg: the model's config, for muP's output multiplier (None: standard).
    """
    if normalization not in LM_NORMALIZATIONS:
        raise ValueError(f"lm normalization {normalization!r} is not one of {LM_NORMALIZATIONS}")
    tokens = batch["tokens"]
    B, S, T = tokens.shape
    flat_h = h.reshape(B * S, T, h.shape[-1])
    flat_t = tokens.reshape(B * S, T)
    nll = token_nll(gpt_params, flat_h[:, :-1], flat_t[:, 1:], cfg)  # (B*S, T-1)
    w = batch["mask"].reshape(B * S, T)[:, 1:].astype(jnp.float32)
    if "choices" in batch:
        w = w * batch["choices"].reshape(B * S, 1).astype(jnp.float32)
    if normalization == "token":
        return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)
    count = w.sum(-1)
    per_seq = (nll * w).sum(-1) / jnp.maximum(count, 1.0)
    present = (count > 0).astype(jnp.float32)
    return (per_seq * present).sum() / jnp.maximum(present.sum(), 1.0)


def predictions(outputs, regression: bool = False):
    """What the head's outputs predict: the class or choice index (the argmax over the last
    axis) or, for regression, the score itself. NumPy or JAX arrays alike."""
    return outputs if regression else outputs.argmax(-1)


def make_loss_fn(cfg: GPTConfig, head, kind: str, *, lm_coef: float = 0.5,
                 lm_normalization: str = "sequence", regression: bool = False):
    """loss_fn(params, batch, rng) -> (L3, metrics) over params {"gpt": ..., "head": ...}.

    L3 = L2 + lm_coef * L1. rng None means evaluation: no dropout. Metrics:
    task_loss, lm_loss (0 when lm_coef is 0: it is then not computed), and
    accuracy over the labelled examples (classes and choices only). A BERT has no L1:
    lm_coef must be 0 for it.
    """
    check_kind(kind)
    if lm_coef < 0 or not math.isfinite(lm_coef):
        raise ValueError(f"lm_coef must be a finite number >= 0, got {lm_coef}")
    if cfg.arch == "bert" and lm_coef:
        raise ValueError(f"lm_coef={lm_coef}: a BERT has no auxiliary language-modelling "
                         "loss (it reads both sides of every token; its MLM head needs "
                         "masked inputs); use lm_coef=0")

    def loss_fn(params, batch, rng=None):
        gpt_rng = head_rng = None
        if rng is not None:
            gpt_rng, head_rng = jax.random.split(rng)
        h = task_hidden(params["gpt"], batch, cfg, gpt_rng)
        out = apply_head(head, params["head"], kind, h, batch, head_rng)
        l2 = task_loss(kind, out, batch["labels"], regression)
        metrics = {"task_loss": l2}
        if lm_coef > 0:
            l1 = lm_loss_on_tasks(params["gpt"], h, batch, lm_normalization, cfg=cfg)
            loss = l2 + lm_coef * l1
            metrics["lm_loss"] = l1
        else:
            loss = l2
            metrics["lm_loss"] = jnp.zeros((), jnp.float32)
        if not regression:
            known = batch["labels"] >= 0
            hit = (jnp.argmax(out, -1) == batch["labels"]) & known
            metrics["accuracy"] = hit.sum() / jnp.maximum(known.sum(), 1)
        return loss, metrics

    return loss_fn


def make_predict_fn(cfg: GPTConfig, head, kind: str) -> Callable[[Any, dict], jax.Array]:
    """predict(params, batch) -> head outputs without dropout (jit it)."""
    check_kind(kind)

    def predict(params, batch):
        h = task_hidden(params["gpt"], batch, cfg, None)
        return apply_head(head, params["head"], kind, h, batch, None)

    return predict

