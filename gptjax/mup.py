"""muP, the maximal-update parametrization, for GPT trained with Adam: the rules in one place.

Yang et al. 2021, "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot
Hyperparameter Transfer" (Tables 3 and 8). A model of width D = n_embd is parametrized
relative to a base model of width D0 = mup_base_width: the same config at n_embd = D0
(same depth, heads and vocabulary), so with the width multiplier m = D / D0:

    parameter                             init std            Adam lr   applied in
    hidden matrices: attn.c_attn,         init_std / sqrt(m)  lr / m    model.init_params,
      attn.c_proj, mlp.c_fc, mlp.c_proj   (GPT-2's residual             train.optim
                                          1/sqrt(2L) on top)
    wte, wpe, biases, LayerNorm           unchanged           lr
    readout (tied to wte)                 logits = h W_e^T / m          model.logits, mean_nll
    attention scores                      q.k sqrt(K0) / K              model.attention

K is the head size and K0 = D0 / n_head the base model's. muP scales scores by 1/K
rather than 1/sqrt(K), because after training q and k are correlated and q.k grows like
K; the constant sqrt(K0) keeps the base model's scores exactly q.k / sqrt(K0). So at
m = 1 muP is the standard parametrization, bit for bit, and a learning rate, init_std and
schedule tuned at the base width carry over to wider models. Decoupled weight decay
(AdamW's lr * wd * w) follows each parameter's learning rate. The MLP width is taken to
grow with D (4 D by default), so c_proj's fan-in grows by the same m.

Under the standard parametrization every function here is the identity (m counts as 1).
"""

from __future__ import annotations

import math

import jax

from gptjax.config import GPTConfig

# The hidden weight matrices, as (sub-block, layer) under the stacked layers "h": their
# fan-in grows with the width. wte and wpe map from the vocabulary and the positions,
# whose sizes do not grow with the width.
HIDDEN_MATRICES = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))


def is_mup(cfg: GPTConfig | None) -> bool:
    return cfg is not None and cfg.parametrization == "mup"


def width_multiplier(cfg: GPTConfig | None) -> float:
    """m = n_embd / mup_base_width under muP; 1 under the standard parametrization."""
    if not is_mup(cfg):
        return 1.0
    return cfg.n_embd / cfg.mup_base_width


def hidden_init_scale(cfg: GPTConfig) -> float:
    """The factor on init_std for the hidden matrices: 1/sqrt(m) (variance ~ 1/fan-in)."""
    return 1.0 / math.sqrt(width_multiplier(cfg))


def hidden_lr_scale(cfg: GPTConfig) -> float:
    """The factor on Adam's learning rate for the hidden matrices: 1/m."""
    return 1.0 / width_multiplier(cfg)


def scale_queries(qkv: jax.Array, cfg: GPTConfig) -> jax.Array:
    """qkv (B, T, 3, H, K) with q multiplied by sqrt(K0 / K), so that softmax's usual
    q.k / sqrt(K) (model.attend and every attention kernel) becomes muP's q.k sqrt(K0) / K.

    With the heads fixed, K0 / K = 1/m. Scaling q rather than the scores leaves the
    attention kernels as they are. Unchanged under the standard parametrization and at
    m = 1.
    """
    if not is_mup(cfg) or cfg.n_embd == cfg.mup_base_width:
        return qkv
    base_head_size = cfg.mup_base_width // cfg.n_head
    factor = math.sqrt(base_head_size / cfg.head_size)
    return qkv.at[:, :, 0].multiply(factor)


def scale_readout(h: jax.Array, cfg: GPTConfig | None) -> jax.Array:
    """h / m: the hidden states the tied readout multiplies by W_e^T, so logits = h W_e^T / m
    (muP's output multiplier). h is returned as it is under the standard
    parametrization (or cfg None) and at m = 1."""
    m = width_multiplier(cfg)
    if m == 1.0:
        return h
    return h * (1.0 / m)


def is_hidden_matrix(path) -> bool:
    """Whether a parameter's tree path (jax.tree_util key entries) ends at a hidden weight
    matrix: .../h/attn/c_attn/w and the like. Matches wherever the GPT parameters sit,
    e.g. under "gpt" beside a fine-tuning head."""
    keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
    return len(keys) >= 4 and keys[-1] == "w" and keys[-4] == "h" and keys[-3:-1] in \
        HIDDEN_MATRICES


def lr_labels(params) -> dict:
    """"hidden" at the hidden matrices, "other" elsewhere: the labels of the optimizer
    stage that gives the hidden matrices lr / m (gptjax.train.optim)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "hidden" if is_hidden_matrix(path) else "other", params)
