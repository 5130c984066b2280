"""BERT's pre-training batches: sentence pairs with masked tokens, from a GPT token stream.

BERT (Devlin et al. 2018, section 3.1 and appendix A.1) trains on pairs

    [CLS] A [SEP] B [SEP] [PAD] ...        token_types 0 ... 0 1 ... 1 0 ...

where B follows A in the text half of the time (IsNext) and is taken from elsewhere the
other half (NotNext), and 15% of the text tokens are prediction targets: 80% of them
replaced by [MASK], 10% by a random token, 10% left as they are.

The pairs are cut from the same token files GPT training reads (`corpus.prepare_tokens`: a
1-D stream, documents separated by the tokenizer's `<eos>` id, which a BERT vocabulary
serves with [SEP]). The stream has no sentence boundaries, so A and B are spans of tokens
cut at random points, not runs of whole sentences as in BERT's own data.

    docs = Documents.from_stream(data.train, eos_id=data.meta["eos_id"])
    vocab = BertVocab.from_tokenizer(tokenizer)
    batch = mlm_train_batch(docs, vocab, seed=s, step=i, batch_size=B, context=T)
    for batch in mlm_eval_batches(val_docs, vocab, batch_size=B, context=T): ...

A batch is a dict of int32 NumPy arrays with fixed shapes:

    tokens          (B, T)  the input ids, with the masking applied
    token_types     (B, T)  0 for [CLS] A [SEP] (and padding), 1 for B [SEP]
    attention_mask  (B, T)  1 on real tokens, 0 on padding
    mlm_labels      (B, T)  the original id at each prediction target, -100 elsewhere (the
                            ignore index of PyTorch's and Hugging Face's losses)
    nsp_labels      (B,)    0 IsNext, 1 NotNext (Hugging Face's next_sentence_label)

A training batch is a pure function of (seed, step), as `corpus.train_batch` is, so a
resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gptjax.data.corpus import check_non_negative, shard_rows

if TYPE_CHECKING:
    from gptjax.data.tokenizer import Tokenizer

__all__ = [
    "IGNORE_INDEX",
    "BertVocab",
    "Documents",
    "mlm_train_batch",
    "mlm_eval_batches",
]

IGNORE_INDEX = -100  # mlm_labels at positions that are not prediction targets
_PAIR_SPECIALS = 3  # [CLS], [SEP], [SEP]
_EVAL_STREAM = 1  # separates eval draws from training draws with the same (seed, step)


@dataclass(frozen=True)
class BertVocab:
    """The ids a BERT batch is built with.

    vocab_size: ids are in [0, vocab_size); random replacements are drawn from it.
    pad, cls, sep, mask: the ids of [PAD], [CLS], [SEP], [MASK].
    special: every special id of the tokenizer (those four included): never drawn as a
        random replacement, never a prediction target.
    """

    vocab_size: int
    pad: int
    cls: int
    sep: int
    mask: int
    special: tuple[int, ...] = ()

    def __post_init__(self):
        named = {"pad": self.pad, "cls": self.cls, "sep": self.sep, "mask": self.mask}
        for name, i in named.items():
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"BertVocab.{name} = {i} is outside [0, {self.vocab_size})")
        if len(set(named.values())) != len(named):
            raise ValueError(f"BertVocab: [PAD], [CLS], [SEP] and [MASK] share ids: {named}")
        bad = [i for i in self.special if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"BertVocab.special has ids outside [0, {self.vocab_size}): {bad}")
        special = tuple(sorted(set(self.special) | set(named.values())))
        if len(special) >= self.vocab_size:
            raise ValueError("BertVocab: every id is special; nothing to draw random tokens from")
        object.__setattr__(self, "special", special)

    @property
    def num_ordinary(self) -> int:
        """How many ids are not special (the ids a random replacement is drawn from)."""
        return self.vocab_size - len(self.special)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> BertVocab:
        """The ids of `tokenizer`'s BERT special tokens; a ValueError naming any it lacks."""
        missing = [
            n for n in ("[PAD]", "[CLS]", "[SEP]", "[MASK]") if n not in tokenizer.special_tokens
        ]
        if missing:
            raise ValueError(
                f"{tokenizer.kind} tokenizer lacks BERT's special tokens {missing}: use a "
                f"WordPiece tokenizer, or add them with add_special_tokens({missing})"
            )
        return cls(
            vocab_size=tokenizer.vocab_size,
            pad=tokenizer.token_id("[PAD]"),
            cls=tokenizer.token_id("[CLS]"),
            sep=tokenizer.token_id("[SEP]"),
            mask=tokenizer.token_id("[MASK]"),
            special=tuple(tokenizer.special_tokens.values()),
        )


@dataclass(frozen=True, eq=False)
class Documents:
    """A 1-D token stream and where its documents are.

    tokens: the stream (a memmap is read only where a batch needs it).
    starts, lengths: int64 (N,), the first token and the length of each non-empty document,
        in stream order; separators belong to no document.
    """

    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    @classmethod
    def from_stream(
        cls, tokens: np.ndarray, eos_id: int | None = None, *, chunk: int = 1 << 24
    ) -> Documents:
        """Cut `tokens` at every `eos_id` (None: the stream is one document); empty
        documents (separators in a row) are dropped. Reads `chunk` tokens at a time."""
        if np.ndim(tokens) != 1:
            raise ValueError(f"the token stream must be 1-D, got shape {np.shape(tokens)}")
        n = len(tokens)
        if eos_id is None:
            ends = np.zeros(0, np.int64)
        else:
            ends = np.concatenate(
                [np.flatnonzero(tokens[i : i + chunk] == eos_id) + i for i in range(0, n, chunk)]
                or [np.zeros(0, np.int64)]
            ).astype(np.int64)
        starts = np.concatenate([[0], ends + 1]).astype(np.int64)
        lengths = np.concatenate([ends, [n]]).astype(np.int64) - starts
        keep = lengths > 0
        return cls(tokens=tokens, starts=starts[keep], lengths=lengths[keep])

    @property
    def num_tokens(self) -> int:
        """Tokens in documents (separators not counted)."""
        return int(self.lengths.sum())


def _check_settings(
    context: int,
    *,
    mask_rate: float,
    mask_token_fraction: float,
    random_token_fraction: float,
    short_seq_prob: float,
) -> None:
    if context < _PAIR_SPECIALS + 2:
        raise ValueError(
            f"context {context} is too small for a sentence pair: [CLS] A [SEP] B [SEP] "
            f"needs at least 5 positions (one token each in A and B)"
        )
    if not 0 < mask_rate < 1:
        raise ValueError(f"mask_rate must be in (0, 1), got {mask_rate}")
    for name, value in (
        ("mask_token_fraction", mask_token_fraction),
        ("random_token_fraction", random_token_fraction),
        ("short_seq_prob", short_seq_prob),
    ):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if mask_token_fraction + random_token_fraction > 1:
        raise ValueError(
            f"mask_token_fraction + random_token_fraction = "
            f"{mask_token_fraction + random_token_fraction} is over 1"
        )


def _check_stream(docs: Documents, context: int, where: str) -> None:
    """Raise unless pairs of every length up to context - 3 can be cut from `docs`."""
    if not (docs.lengths >= 2).any():
        raise ValueError(
            f"{where}: no document has 2 tokens, the least a pair (A, B) needs "
            f"({len(docs.lengths)} documents, {docs.num_tokens} tokens)"
        )
    need = 3 * (context - _PAIR_SPECIALS)
    if len(docs.lengths) == 1 and docs.num_tokens < need:
        raise ValueError(
            f"{where}: a stream of one document needs at least 3 * (context - 3) = {need} "
            f"tokens, so that a NotNext segment can be drawn away from its pair; it has "
            f"{docs.num_tokens}"
        )


def _below(u: np.ndarray, k: np.ndarray) -> np.ndarray:
    """floor(u * k) for uniform u in [0, 1): uniform integers in [0, k) (0 where k = 0)."""
    return np.minimum((u * k).astype(np.int64), np.maximum(k - 1, 0))


def _pick_weighted(u: np.ndarray, cumulative: np.ndarray) -> np.ndarray:
    """Index i with probability proportional to cumulative[i + 1] - cumulative[i]."""
    r = _below(u, np.full(u.shape, cumulative[-1]))
    return np.searchsorted(cumulative, r, side="right") - 1


def _draw_pairs(
    docs: Documents, rng: np.random.Generator, batch_size: int, context: int, short_seq_prob: float
) -> dict[str, np.ndarray]:
    """Where each row's A and B are in the stream, and its NSP label; all (B,) int64.

    Row b fills `length` = context - 3 text tokens (with probability `short_seq_prob` a
    length drawn uniformly from [2, context - 3], as BERT does so that short inputs are seen
    in training). A document of at least 2 tokens is drawn with probability proportional to
    its length, and in it a span of min(length, document) tokens, uniformly; A is its first
    1..span-1 tokens (uniformly). IsNext: B is the rest of the span, so A B is contiguous
    text. NotNext: B is length - |A| tokens (or a whole shorter document) from another
    document drawn by length, uniformly placed in it; in a stream of one document, from a
    place that overlaps neither A nor A's true continuation.
    """
    b = batch_size
    max_len = context - _PAIR_SPECIALS
    # Every draw is made for every row, in this order, so the batch's rows (and any shard
    # of them) are the same whatever the rows turn out to need.
    short = rng.random(b) < short_seq_prob
    short_len = 2 + _below(rng.random(b), np.full(b, max_len - 1))
    u_doc, u_start, u_split, u_other, u_other_start = rng.random((5, b))
    not_next = rng.random(b) < 0.5

    length = np.where(short, short_len, max_len)
    pairable = np.flatnonzero(docs.lengths >= 2)
    weights = np.concatenate([[0], np.cumsum(docs.lengths[pairable])])
    doc = pairable[_pick_weighted(u_doc, weights)]
    doc_len = docs.lengths[doc]
    span = np.minimum(length, doc_len)
    a_start = docs.starts[doc] + _below(u_start, doc_len - span + 1)
    a_len = 1 + _below(u_split, span - 1)

    b_start = a_start + a_len  # IsNext
    b_len = span - a_len
    want = length - a_len  # NotNext: fill the row
    if len(docs.lengths) > 1:
        # Another document, by length: draw among the others' tokens, skipping `doc`'s.
        cumulative = np.concatenate([[0], np.cumsum(docs.lengths)])
        r = _below(u_other, docs.num_tokens - doc_len)
        r = np.where(r >= cumulative[doc], r + doc_len, r)
        other = np.searchsorted(cumulative, r, side="right") - 1
        other_len = np.minimum(want, docs.lengths[other])
        room = docs.lengths[other] - other_len + 1
        other_start = docs.starts[other] + _below(u_other_start, room)
    else:
        # One document: B's start q keeps [q, q + want) clear of [a_start, a_start + a_len
        # + want), A and the true continuation of its length; `_check_stream` guarantees room.
        n = docs.num_tokens
        forbidden_end = a_start + a_len + want
        left = np.maximum(a_start - want + 1, 0)  # starts 0 .. a_start - want
        right = np.maximum(n - want - forbidden_end + 1, 0)  # forbidden_end .. n - want
        r = _below(u_other, left + right)
        other_start = np.where(r < left, r, forbidden_end + r - left)
        other_len = want
    b_start = np.where(not_next, other_start, b_start)
    b_len = np.where(not_next, other_len, b_len)
    return {
        "a_start": a_start,
        "a_len": a_len,
        "b_start": b_start,
        "b_len": b_len,
        "nsp_labels": not_next.astype(np.int64),
    }


def _assemble(
    docs: Documents, vocab: BertVocab, pairs: dict[str, np.ndarray], rows: slice, context: int
) -> dict[str, np.ndarray]:
    """The unmasked rows `[CLS] A [SEP] B [SEP] [PAD]...`, their segments and attention."""
    a_start, a_len = pairs["a_start"][rows], pairs["a_len"][rows]
    b_start, b_len = pairs["b_start"][rows], pairs["b_len"][rows]
    n = len(a_start)
    tokens = np.full((n, context), vocab.pad, np.int32)
    token_types = np.zeros((n, context), np.int32)
    for i in range(n):  # two contiguous reads per row from the (memory-mapped) stream
        la, lb = int(a_len[i]), int(b_len[i])
        a = np.asarray(docs.tokens[a_start[i] : a_start[i] + la], dtype=np.int32)
        b = np.asarray(docs.tokens[b_start[i] : b_start[i] + lb], dtype=np.int32)
        tokens[i, : la + lb + 3] = np.concatenate([[vocab.cls], a, [vocab.sep], b, [vocab.sep]])
        token_types[i, la + 2 : la + lb + 3] = 1
    position = np.arange(context)
    real = position < (a_len + b_len + _PAIR_SPECIALS)[:, None]
    text = ((position >= 1) & (position <= a_len[:, None])) | (
        (position >= (a_len + 2)[:, None]) & (position < (a_len + 2 + b_len)[:, None])
    )
    return {"tokens": tokens, "token_types": token_types, "attention_mask": real, "text": text}


def _non_special(vocab: BertVocab, k: np.ndarray) -> np.ndarray:
    """The k-th non-special id, for k in [0, vocab.num_ordinary): k plus the number of
    special ids at or below the answer, found by a search over the sorted specials."""
    special = np.asarray(vocab.special, np.int64)
    shifted = special - np.arange(len(special))  # specials below the i-th, subtracted
    return (k + np.searchsorted(shifted, k, side="right")).astype(np.int32)


def _mask(
    tokens: np.ndarray,
    text: np.ndarray,
    vocab: BertVocab,
    draws: np.ndarray,
    mask_rate: float,
    mask_token_fraction: float,
    random_token_fraction: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, mlm_labels) of (N, T) `tokens` whose text positions are `text`.

    Candidates are the text positions holding a non-special id (so neither [CLS], [SEP] nor
    [PAD], and not [UNK], as in Hugging Face's collator). Targets: round(mask_rate * n) of a
    row's n candidates, at least one, chosen uniformly without replacement, as BERT's
    create_pretraining_data.py does (an exact count rather than a coin per token). Each
    target becomes [MASK] with probability `mask_token_fraction`, else a uniformly drawn
    non-special id with probability `random_token_fraction`, else stays as it is.
    `draws` (3, N, T) uniform in [0, 1) decide the choice, the action and the random id.
    """
    keys, action, pick = draws
    candidate = text & ~np.isin(tokens, vocab.special)
    count = candidate.sum(axis=1)
    wanted = np.where(count > 0, np.maximum(1, np.rint(mask_rate * count)), 0).astype(np.int64)
    # A row's candidates in a uniformly random order, the others after them: the first
    # `wanted` of that order are the targets.
    keys = np.where(candidate, keys, 2.0)
    order = np.argsort(keys, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(tokens.shape[1])[None, :], axis=1)
    target = rank < wanted[:, None]

    random_ids = _non_special(vocab, _below(pick, np.full(pick.shape, vocab.num_ordinary)))
    to_mask = target & (action < mask_token_fraction)
    to_random = target & ~to_mask & (action < mask_token_fraction + random_token_fraction)
    inputs = np.where(to_mask, vocab.mask, np.where(to_random, random_ids, tokens))
    labels = np.where(target, tokens, IGNORE_INDEX)
    return inputs.astype(np.int32), labels.astype(np.int32)


def _batch(
    docs: Documents,
    vocab: BertVocab,
    entropy: list[int],
    *,
    batch_size: int,
    context: int,
    shard: tuple[int, int] | None,
    where: str,
    **rates: float,
) -> dict[str, np.ndarray]:
    """The batch whose every choice `np.random.default_rng(entropy)` draws (arguments checked
    first, `where` naming the caller in the errors)."""
    check_non_negative(batch_size=batch_size, context=context)
    _check_settings(context, **rates)
    _check_stream(docs, context, where)
    rows = shard_rows(batch_size, shard)
    rng = np.random.default_rng(entropy)
    pairs = _draw_pairs(docs, rng, batch_size, context, rates["short_seq_prob"])
    draws = rng.random((3, batch_size, context))[:, rows]  # every shard draws the same
    rows_out = _assemble(docs, vocab, pairs, rows, context)
    tokens, labels = _mask(
        rows_out["tokens"],
        rows_out["text"],
        vocab,
        draws,
        rates["mask_rate"],
        rates["mask_token_fraction"],
        rates["random_token_fraction"],
    )
    return {
        "tokens": tokens,
        "token_types": rows_out["token_types"],
        "attention_mask": rows_out["attention_mask"].astype(np.int32),
        "mlm_labels": labels,
        "nsp_labels": pairs["nsp_labels"][rows].astype(np.int32),
    }


def mlm_train_batch(
    docs: Documents,
    vocab: BertVocab,
    *,
    seed: int,
    step: int,
    batch_size: int,
    context: int,
    mask_rate: float = 0.15,
    mask_token_fraction: float = 0.8,
    random_token_fraction: float = 0.1,
    short_seq_prob: float = 0.1,
    shard: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """A BERT pre-training batch (see the module docstring for its arrays), of
    `batch_size` rows of `context` tokens, or rows [index * B / count, (index + 1) * B /
    count) of it with `shard=(index, count)` (on several hosts each reads only its own).

    Pairs are cut as `_draw_pairs` describes and masked as `_mask` does, every choice drawn
    from `np.random.default_rng([seed, step])`: the batch depends on (seed, step), the
    arguments and the stream only, never on earlier calls.

    Raises ValueError when the context cannot hold a pair (under 5), a rate is out of range
    (mask_rate must be in (0, 1)), or the stream cannot give pairs (no document of 2
    tokens; a single document under 3 * (context - 3) tokens).
    """
    check_non_negative(seed=seed, step=step)
    return _batch(
        docs,
        vocab,
        [int(seed), int(step)],
        batch_size=batch_size,
        context=context,
        shard=shard,
        where="mlm_train_batch",
        mask_rate=mask_rate,
        mask_token_fraction=mask_token_fraction,
        random_token_fraction=random_token_fraction,
        short_seq_prob=short_seq_prob,
    )


def mlm_eval_batches(
    docs: Documents,
    vocab: BertVocab,
    *,
    batch_size: int,
    context: int,
    num_batches: int | None = None,
    seed: int = 0,
    mask_rate: float = 0.15,
    mask_token_fraction: float = 0.8,
    random_token_fraction: float = 0.1,
    short_seq_prob: float = 0.1,
    shard: tuple[int, int] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Evaluation batches over `docs` (the validation stream): batch i is built as
    `mlm_train_batch` builds one, from `np.random.default_rng([seed, 1, i])`, so the same
    arguments give the same batches in every run and at every evaluation.

    `num_batches` defaults to the number of batches the stream's tokens fill once
    (num_tokens // (batch_size * (context - 3))), at least one. Raises ValueError here, not
    on first iteration, for the errors `mlm_train_batch` raises.
    """
    rates = dict(
        mask_rate=mask_rate,
        mask_token_fraction=mask_token_fraction,
        random_token_fraction=random_token_fraction,
        short_seq_prob=short_seq_prob,
    )
    check_non_negative(batch_size=batch_size, context=context, seed=seed)
    if batch_size == 0:
        raise ValueError("mlm_eval_batches needs batch_size > 0")
    _check_settings(context, **rates)
    _check_stream(docs, context, "mlm_eval_batches")
    shard_rows(batch_size, shard)
    if num_batches is None:
        num_batches = max(1, docs.num_tokens // (batch_size * (context - _PAIR_SPECIALS)))
    check_non_negative(num_batches=num_batches)

    def batches() -> Iterator[dict[str, np.ndarray]]:
        for i in range(num_batches):
            entropy = [int(seed), _EVAL_STREAM, i]
            yield _batch(
                docs,
                vocab,
                entropy,
                batch_size=batch_size,
                context=context,
                shard=shard,
                where="mlm_eval_batches",
                **rates,
            )

    return batches()
