"""gptjax: OpenAI's GPT family as pure JAX functions.

    import gptjax
    cfg = gptjax.preset("gpt2")
    params = gptjax.init_params(cfg, key)
    h = gptjax.forward(params, tokens, cfg)          # (B, T, D)
    z = gptjax.logits(params, h)                     # h @ W_e^T
    loss = gptjax.lm_loss(params, tokens, cfg)
    out = gptjax.generate(params, cfg, prompt, max_new_tokens, rng=key)
    cfg, params = gptjax.hf.load_pretrained(path)
    fit = gptjax.scaling.fit_power_law(compute, loss)   # L(C) = a C^b + c
"""

from gptjax import hf, scaling
from gptjax.config import PRESETS, GPTConfig, preset
from gptjax.generate import generate
from gptjax.model import count_params, forward, init_params, lm_loss, logits

__all__ = [
    "GPTConfig",
    "PRESETS",
    "preset",
    "init_params",
    "forward",
    "logits",
    "lm_loss",
    "count_params",
    "generate",
    "hf",
    "scaling",
]
