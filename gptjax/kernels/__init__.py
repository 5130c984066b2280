"""Fast paths beside the model, chosen by GPTConfig.kernels through `plan`.

Each kernel computes what one reference function of gptjax/model.py computes, and
tests/test_kernels.py holds it equal to that function in value and gradient:

    kernel                          replaces in model.py               file
    layer_norm (custom VJP)         layer_norm                         norm.py
    dense (custom VJP)              dense                              linear.py
    causal_attention (custom VJP)   attend, dense layers               attention.py
    banded_attention                attend, GPT-3's banded layers      attention.py
    dot_product_attention           attend (jax.nn.dot_product_att.)   attention.py
    nll_sum (custom VJP)            mean_nll's sum of token_nll        loss.py

The custom VJPs serve reverse mode only: jax.jvp, jacfwd, linearize and hessian raise on
them. That is why the library's default is kernels="reference", which composes with
every transformation; train.py, finetune.py and the benchmark ask for "auto".
model.py imports this package, never the other way round.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from gptjax.kernels import attention
from gptjax.kernels.attention import banded_attention, causal_attention, dot_product_attention
from gptjax.kernels.common import MASK_VALUE
from gptjax.kernels.linear import dense
from gptjax.kernels.loss import nll_sum
from gptjax.kernels.norm import layer_norm

__all__ = [
    "MASK_VALUE",
    "Plan",
    "banded_attention",
    "causal_attention",
    "dense",
    "dot_product_attention",
    "layer_norm",
    "nll_sum",
    "plan",
    "self_attention",
]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which fast paths run; False / None means model.py's reference formula."""

    layer_norm: bool = False
    dense: bool = False
    loss: bool = False
    # "blocked": causal_attention and banded_attention (the CPU kernels);
    # "dot_product": jax.nn.dot_product_attention with cfg.attention's implementation;
    # None: model.attend.
    attention: str | None = None


REFERENCE = Plan()
_GPU_BACKENDS = ("gpu", "cuda", "rocm")


def plan(cfg, backend: str | None = None) -> Plan:
    """The fast paths that cfg.kernels selects on `backend` (default: JAX's default backend).

    "reference": none; model.py's formulas only.
    "fast": every kernel. Attention is "blocked" on the CPU and "dot_product" elsewhere.
    "auto": on each backend only what was measured faster there, the reference elsewhere:
        cpu             every kernel, as "fast" (measured on 2 cores, XLA: the char,
                        cpu-small and cpu-6x384 training steps);
        gpu             attention through jax.nn.dot_product_attention (cudnn in 16-bit),
                        the chunked loss and the LayerNorm backward; not the dense
                        backward, which was no faster there (benchmarks/kernel_ablation.py
                        on an H200, GPT-2 124M in bfloat16; the README's Speed section);
        tpu and others  the reference: nothing has been measured there yet.
    """
    backend = backend or jax.default_backend()
    if cfg.kernels == "reference":
        return REFERENCE
    if cfg.kernels == "fast" or backend == "cpu":
        attention_kind = "blocked" if backend == "cpu" else "dot_product"
        return Plan(layer_norm=True, dense=True, loss=True, attention=attention_kind)
    if backend in _GPU_BACKENDS:
        return Plan(layer_norm=True, loss=True, attention="dot_product")
    return REFERENCE


def self_attention(qkv: jax.Array, cfg, *, band: int | None, key_mask: jax.Array | None,
                   dropout: bool, causal: bool = True) -> jax.Array | None:
    """The fast attention for one call of model.attention, or None where none serves it
    (model.attention then runs the reference, model.attend).

    qkv (B, T, 3, H, K) -> (B, T, H, K); band: GPT-3's local band of a banded layer (None
    for a dense one); key_mask (B, T): real tokens (None: all real); causal=False is
    BERT's bidirectional attention. None is returned when the plan has no fast attention,
    when attention dropout is active (no kernel here drops probabilities), for the blocked
    causal kernel with a padding mask, and for bidirectional attention on the blocked
    (CPU) plan: its kernels skip the keys after each query, which BERT needs.
    """
    kind = plan(cfg).attention
    if kind is None or dropout:
        return None
    T, K = qkv.shape[1], qkv.shape[-1]
    if band is not None and band >= T:  # the band covers every key: plain causal
        band = None
    scale = 1.0 / math.sqrt(K)
    if kind == "dot_product":
        return dot_product_attention(qkv, band, key_mask, scale, attention.implementation(cfg),
                                     causal=causal)
    if not causal:
        return None
    if band is not None:
        return banded_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], key_mask, band,
                                scale)
    if key_mask is None:
        return causal_attention(qkv, scale)
    return None
