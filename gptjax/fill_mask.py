"""Fill-mask: what a BERT predicts at each [MASK] of a text (the use of an encoder's MLM head).

    from gptjax.fill_mask import fill_mask
    for m in fill_mask(params, cfg, tokenizer, "The [MASK] module provides ...", top_k=5):
        print(m.position, list(zip(m.tokens, m.probs)))

The text is split on the literal "[MASK]"; each piece is tokenized on its own (ordinary
text never encodes to a special id, see gptjax.data.tokenizer) and the pieces are joined
with the [MASK] id and framed as BERT's single-segment input, `[CLS] text [SEP]`, segment
0. The MLM head's softmax at each [MASK] gives the top_k tokens and their probabilities.
A GPT has no such head: asking one is an error, as is a text without [MASK].
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import GPTConfig
from gptjax.model import Params, forward, mlm_logits

MASK = "[MASK]"


@dataclass(frozen=True)
class MaskPrediction:
    """The top tokens at one [MASK]: position in the model's input ([CLS] is 0), their
    ids, their text (vocabulary entries, "##" marks a word's continuation) and their
    probabilities (highest first)."""

    position: int
    ids: tuple[int, ...]
    tokens: tuple[str, ...]
    probs: tuple[float, ...]


def check_bert(cfg: GPTConfig, what: str = "fill-mask") -> None:
    if cfg.arch != "bert":
        raise ValueError(f"{what} needs a BERT (arch='bert'): this model is arch="
                         f"{cfg.arch!r}, a left-to-right language model with no masked-token "
                         "head; sample text from it instead")


def special_id(tokenizer, name: str) -> int:
    """The id of BERT's special token `name`; a ValueError naming it when the tokenizer
    has none."""
    specials = tokenizer.special_tokens
    if name not in specials:
        raise ValueError(f"the {tokenizer.kind} tokenizer has no {name} token; fill-mask "
                         "needs BERT's [CLS], [SEP] and [MASK] (a WordPiece vocabulary)")
    return specials[name]


def token_text(tokenizer, token_id: int) -> str:
    """A token's vocabulary entry ("##ing" for a continuation), else its decoded text."""
    backend = getattr(tokenizer, "backend", None)
    text = backend.id_to_token(int(token_id)) if backend is not None else None
    return text if text is not None else tokenizer.decode([int(token_id)])


def encode_masked(tokenizer, text: str) -> list[int]:
    """`[CLS] piece_0 [MASK] piece_1 ... [SEP]` for `text` split on "[MASK]".

    With [CLS] = 2, [SEP] = 3, [MASK] = 4, "the" -> [11] and " module" -> [12]:
    encode_masked(tok, "the [MASK] module") == [2, 11, 4, 12, 3].
    """
    pieces = text.split(MASK)
    if len(pieces) < 2:
        raise ValueError(f"the fill-mask text has no {MASK}: {text!r}; put {MASK} where a "
                         "token should be predicted")
    mask = special_id(tokenizer, MASK)
    ids = [special_id(tokenizer, "[CLS]")]
    for i, piece in enumerate(pieces):
        if i:
            ids.append(mask)
        if piece.strip():
            ids.extend(tokenizer.encode(piece))
    return ids + [special_id(tokenizer, "[SEP]")]


@functools.partial(jax.jit, static_argnames=("cfg", "top_k"))
def _top_tokens(params, tokens, cfg: GPTConfig, top_k: int):
    h = forward(params, tokens, cfg)
    probs = jax.nn.softmax(mlm_logits(params, h, cfg), axis=-1)
    return jax.lax.top_k(probs, top_k)  # (values, ids), each (B, T, k)


def predict_masked(params: Params, cfg: GPTConfig, ids: Sequence[int], mask_id: int,
                   top_k: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions (M,), top ids (M, k), probabilities (M, k)) at the M positions of `ids`
    (one input, [CLS] ... [SEP], at most n_ctx tokens) that hold `mask_id`."""
    check_bert(cfg)
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 1 or len(ids) > cfg.n_ctx:
        raise ValueError(f"the fill-mask input is {len(ids)} tokens, more than the model's "
                         f"context n_ctx={cfg.n_ctx}")
    if not 1 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k={top_k} must lie in [1, vocab_size={cfg.vocab_size}]")
    positions = np.flatnonzero(ids == mask_id)
    if positions.size == 0:
        raise ValueError("the fill-mask input holds no [MASK] id")
    probs, top = _top_tokens(params, jnp.asarray(ids[None]), cfg, top_k)
    return positions, np.asarray(top[0])[positions], np.asarray(probs[0])[positions]


def fill_mask(params: Params, cfg: GPTConfig, tokenizer, text: str,
              top_k: int = 5) -> list[MaskPrediction]:
    """The top_k tokens at each [MASK] of `text`, in order (see the module docstring)."""
    check_bert(cfg)
    ids = encode_masked(tokenizer, text)
    positions, top, probs = predict_masked(params, cfg, ids, special_id(tokenizer, MASK),
                                           top_k)
    return [MaskPrediction(int(p), tuple(int(i) for i in t),
                           tuple(token_text(tokenizer, i) for i in t),
                           tuple(float(x) for x in q))
            for p, t, q in zip(positions, top, probs, strict=True)]


def format_predictions(predictions: Sequence[MaskPrediction]) -> str:
    """One line per [MASK]: `[MASK] 1: os 0.231 | sys 0.102 | ...`."""
    return "\n".join(
        f"[MASK] {k + 1}: " + " | ".join(f"{t} {p:.3f}" for t, p in zip(m.tokens, m.probs,
                                                                        strict=True))
        for k, m in enumerate(predictions))
