"""gptjax: OpenAI's GPT family as pure JAX functions.

    import gptjax
    cfg = gptjax.preset("gpt2")
    params = gptjax.init_params(cfg, key)
    h = gptjax.forward(params, tokens, cfg)          # (B, T, D)
    z = gptjax.logits(params, h)                     # h @ W_e^T
    loss = gptjax.lm_loss(params, tokens, cfg)
    out = gptjax.generate(params, cfg, prompt, max_new_tokens, rng=key)
    cfg, params = gptjax.hf.load_pretrained(path)
    # BERT (cfg.arch="bert"): the same forward, bidirectional, with segments and heads
    h = gptjax.forward(params, tokens, cfg, token_types=types, attention_mask=mask)
    z = gptjax.mlm_logits(params, h, cfg)            # (B, T, V); nsp_logits: (B, 2)
    loss, metrics = gptjax.bert_loss(params, batch, cfg)   # MLM + NSP
    fit = gptjax.scaling.fit_power_law(compute, loss)   # L(C) = a C^b + c
"""

from gptjax import hf, scaling
from gptjax.config import PRESETS, GPTConfig, preset
from gptjax.generate import generate
from gptjax.model import (
    bert_loss,
    count_params,
    forward,
    init_params,
    lm_loss,
    logits,
    mlm_logits,
    mlm_loss,
    nsp_logits,
    nsp_loss,
    pooled,
)

__all__ = [
    "GPTConfig",
    "PRESETS",
    "preset",
    "init_params",
    "forward",
    "logits",
    "lm_loss",
    "count_params",
    "mlm_logits",
    "nsp_logits",
    "pooled",
    "mlm_loss",
    "nsp_loss",
    "bert_loss",
    "generate",
    "hf",
    "scaling",
]
