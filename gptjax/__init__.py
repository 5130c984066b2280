"""gptjax: OpenAI's GPT family as pure JAX functions."""

from gptjax.config import PRESETS, GPTConfig, preset

__all__ = ["GPTConfig", "PRESETS", "preset"]
