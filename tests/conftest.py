"""Shared fixtures: tiny random Hugging Face GPT models (torch, CPU, float32) as oracles."""

from __future__ import annotations

import atexit
import shutil
import tempfile

import jax
import pytest

# Tests that run train.py's or finetune.py's job in this process would otherwise turn on
# JAX's persistent compilation cache in the jobs' default folder (~/.cache/gptjax/jax) for
# every test after them, and read back executables that other runs on the machine wrote
# there. The session gets a fresh folder of its own instead (a job keeps a folder JAX
# already has): later tests still reuse what earlier ones compiled, as on a fresh CI
# machine, and nothing foreign is read. The jobs' own cache handling is tested in
# subprocesses (test_train.py, test_multihost.py).
_CACHE = tempfile.mkdtemp(prefix="gptjax-tests-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)

# The suite has always run with this setting: tests/transformations_cases.py set it at
# import, for the whole session, before those cases moved to a process of their own.
jax.config.update("jax_default_matmul_precision", "highest")


def _build_hf_model(family: str, cls_name: str | None = None, *, seed: int = 0, **overrides):
    """A tiny transformers model of `family` ("gpt2" or "openai-gpt"), in eval mode.

    Weight matrices are N(0, 0.2) (large enough that GELU variants differ), and
    every LayerNorm gain/bias and every bias gets N(0, 0.1) noise so none is a
    trivial 1 or 0. `cls_name` defaults to the family's LMHead class;
    `overrides` go to the transformers config.
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    size = dict(vocab_size=99, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    if family == "gpt2":
        config = transformers.GPT2Config(**size, bos_token_id=None, eos_token_id=None,
                                         **overrides)
        cls_name = cls_name or "GPT2LMHeadModel"
    elif family == "openai-gpt":
        config = transformers.OpenAIGPTConfig(**size, **overrides)
        cls_name = cls_name or "OpenAIGPTLMHeadModel"
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif p.ndim == 2:  # openai-gpt's Conv1D ignores initializer_range
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="session")
def hf_model_factory():
    """The tiny-model builder: hf_model_factory(family, cls_name=None, *, seed=0, **config)."""
    return _build_hf_model
