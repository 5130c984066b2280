"""GPTConfig validation and the presets' parameter counts (by jax.eval_shape, no memory)."""

import dataclasses

import jax
import numpy as np
import pytest

import gptjax
from gptjax.config import GPT1_BPE_VOCAB, PRESETS, GPTConfig, preset


def n_params(cfg):
    shapes = jax.eval_shape(lambda k: gptjax.init_params(cfg, k), jax.random.PRNGKey(0))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize("name, expected", [
    ("gpt2", 124_439_808),
    ("gpt2-medium", 354_823_168),
    ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200),
])
def test_gpt2_parameter_counts_match_hf(name, expected):
    # The counts of HF's GPT2Model (tied output, attention bias buffers excluded).
    assert n_params(preset(name)) == expected


def test_gpt1_parameter_count():
    cfg = preset("gpt1")
    assert cfg.norm == "post" and cfg.n_ctx == 512
    assert cfg.vocab_size > GPT1_BPE_VOCAB  # room for the special tokens
    count = n_params(cfg.replace(vocab_size=GPT1_BPE_VOCAB))
    assert round(count / 1e6, 1) == 116.5
    assert "ln_f" not in jax.eval_shape(lambda: gptjax.init_params(cfg, jax.random.PRNGKey(0)))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_is_hashable(name):
    cfg = preset(name)
    hash(cfg)
    assert cfg.n_embd % cfg.n_head == 0
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


def test_preset_overrides_and_unknown():
    assert preset("gpt2", n_layer=2).n_layer == 2
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        preset("gpt5")


@pytest.mark.parametrize("field, value, message", [
    ("n_embd", 100, "n_embd=100 is not divisible by n_head=12"),
    ("n_layer", 0, "n_layer=0 must be a positive int"),
    ("vocab_size", -3, "vocab_size=-3"),
    ("n_head", 2.5, "n_head=2.5"),
    ("activation", "swish", "activation='swish' is not one of"),
    ("norm", "middle", "norm='middle'"),
    ("dtype", "float8", "dtype='float8'"),
    ("attention", "flash", "attention='flash'"),
    ("attn_pdrop", 1.5, "attn_pdrop=1.5"),
    ("layer_norm_epsilon", 0.0, "layer_norm_epsilon"),
    ("attention_band", 0, "attention_band=0"),
    ("scan_layers", "yes", "scan_layers='yes'"),
])
def test_invalid_config_raises_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GPTConfig(**{field: value})


def test_from_dict_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ValueError, match=r"unknown GPTConfig field\(s\) \['n_layers'\]"):
        GPTConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="'n_layer'='3' must be an int"):
        GPTConfig.from_dict({"n_layer": "3"})
    assert GPTConfig.from_dict({"embd_pdrop": 0}).embd_pdrop == 0.0


def test_derived_fields():
    cfg = GPTConfig(n_embd=64, n_head=4)
    assert cfg.mlp_width == 256 and cfg.head_size == 16
    assert GPTConfig(norm="pre").residual_init_scaled
    assert not GPTConfig(norm="post").residual_init_scaled
    banded = GPTConfig(attention_band=8)
    assert [banded.layer_is_banded(i) for i in range(4)] == [False, True, False, True]
    assert dataclasses.replace(cfg, n_inner=100).mlp_width == 100


def test_identity_leaves_out_only_how_the_model_is_computed():
    """A resumed run must match the model's identity; kernels, attention, scan and remat
    may change (same parameters, same results to rounding)."""
    from gptjax.config import IMPLEMENTATION_FIELDS

    cfg = preset("cpu-small")
    other = cfg.replace(kernels="fast", attention="xla", scan_layers=True, remat=True)
    assert other.identity() == cfg.identity()
    assert set(cfg.to_dict()) - set(cfg.identity()) == set(IMPLEMENTATION_FIELDS)
    assert cfg.replace(n_layer=5).identity() != cfg.identity()
