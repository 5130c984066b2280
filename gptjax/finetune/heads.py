"""Task heads (Flax linen) over the transformer's final hidden states.

Each head reads the hidden state at the `<extract>` token of its sequence(s)
(transforms.py builds them), applies dropout (GPT-1: 0.1 on the classifier input)
and one linear layer with weights N(0, 0.02) and a zero bias. For a BERT the state
read is its pooled [CLS] output (transforms.task_hidden gives it as a sequence of one
position, extract 0): the heads are the same, as in BERT's figure 4. Parameters come
from `head.init` as a plain pytree that sits beside the transformer's:
`{"gpt": gpt_params, "head": head_variables["params"]}`.

    ClassificationHead   (B, T, D), extract (B,)          -> logits (B, n_classes)
    SimilarityHead       (B, 2, T, D), extract (B, 2)     -> logits (B, n_classes) or score (B,)
                         (BERT: one order, (B, 1, T, D))
    MultipleChoiceHead   (B, C, T, D), extract (B, C)     -> logits (B, C)

Hugging Face's double-heads models (OpenAIGPTDoubleHeadsModel, GPT2DoubleHeadsModel)
compute the multiple-choice logits the same way: a SequenceSummary with
summary_type "cls_index", first dropout, and a Linear(D, 1) projection; its
`summary.weight` (1, D) is the transpose of `MultipleChoiceHead`'s `score.kernel`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.model import MASK_VALUE

HEAD_INIT = nn.initializers.normal(stddev=0.02)


def pool_at(hidden: jax.Array, positions: jax.Array) -> jax.Array:
    """The hidden state at `positions` along the time axis: (..., T, D), (...) -> (..., D)."""
    idx = positions.astype(jnp.int32)[..., None, None]
    return jnp.take_along_axis(hidden, idx, axis=-2)[..., 0, :]


def _linear(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=HEAD_INIT, bias_init=nn.initializers.zeros,
                    dtype=jnp.float32, name=name)


class ClassificationHead(nn.Module):
    """Classification and entailment: linear map of the `<extract>` state to class logits."""

    n_classes: int
    dropout: float = 0.1

    @nn.compact
    def __call__(self, hidden, extract, deterministic: bool = True):
        x = pool_at(hidden, extract).astype(jnp.float32)  # (B, D)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        return _linear(self.n_classes, "logits")(x)


class SimilarityHead(nn.Module):
    """Similarity: the two orders' `<extract>` states added element-wise, then linear.

    n_classes None: one regression score per pair, shape (B,) (STS-B). The sum
    makes the output independent of which text came first. A BERT reads the pair as one
    sequence (both texts at once): one order, whose state is taken as it is.
    """

    n_classes: int | None = None
    dropout: float = 0.1

    @nn.compact
    def __call__(self, hidden, extract, deterministic: bool = True):
        if hidden.shape[1] not in (1, 2):
            raise ValueError(f"SimilarityHead expects 2 orders (BERT: 1) on axis 1, got "
                             f"{hidden.shape}")
        x = pool_at(hidden, extract).astype(jnp.float32).sum(axis=1)  # (B, D)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        if self.n_classes is None:
            return _linear(1, "score")(x)[:, 0]
        return _linear(self.n_classes, "logits")(x)


class MultipleChoiceHead(nn.Module):
    """Multiple choice: one score per answer sequence; a softmax over the answers
    (in the loss) picks one. Any number of choices C; `choices` (B, C), 1 where
    an answer exists, masks the padding answers of examples with fewer."""

    dropout: float = 0.1

    @nn.compact
    def __call__(self, hidden, extract, choices=None, deterministic: bool = True):
        x = pool_at(hidden, extract).astype(jnp.float32)  # (B, C, D)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        scores = _linear(1, "score")(x)[..., 0]  # (B, C)
        if choices is not None:
            scores = jnp.where(choices.astype(bool), scores, MASK_VALUE)
        return scores


def make_head(kind: str, n_classes: int | None = None, dropout: float = 0.1) -> nn.Module:
    """The head for a task kind; n_classes None with similarity means a regression score."""
    if kind in ("classification", "entailment"):
        if not n_classes or n_classes < 2:
            raise ValueError(f"a {kind} head needs n_classes >= 2, got {n_classes}")
        return ClassificationHead(n_classes, dropout)
    if kind == "similarity":
        return SimilarityHead(n_classes, dropout)
    if kind == "multiple_choice":
        return MultipleChoiceHead(dropout)
    raise ValueError(f"unknown task kind {kind!r}")


def init_head(head: nn.Module, kind: str, n_embd: int, key: jax.Array, n_choices: int = 2):
    """The head's parameter pytree (no batch statistics), from dummy hidden states."""
    if kind == "similarity":
        h, e = jnp.zeros((1, 2, 2, n_embd)), jnp.zeros((1, 2), jnp.int32)
    elif kind == "multiple_choice":
        h, e = jnp.zeros((1, n_choices, 2, n_embd)), jnp.zeros((1, n_choices), jnp.int32)
    else:
        h, e = jnp.zeros((1, 2, n_embd)), jnp.zeros((1,), jnp.int32)
    return head.init(key, h, e)["params"]
