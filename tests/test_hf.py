"""gptjax.hf: config mapping, checkpoint files both ways, and the errors it promises.

Numerical parity of the mapped weights is test_parity.py's job; here a loaded
checkpoint must give exactly the params that params_from_hf makes from the
in-memory torch state dict, and a saved one must make transformers reproduce
the source model's outputs.
"""

from __future__ import annotations

import json
import re
import sys

import jax
import numpy as np
import pytest

import gptjax
from gptjax import hf
from gptjax.model import activation

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

CLASSES = {  # family -> (LMHead, DoubleHeads, SequenceClassification, base model)
    "gpt2": ("GPT2LMHeadModel", "GPT2DoubleHeadsModel", "GPT2ForSequenceClassification",
             "GPT2Model"),
    "openai-gpt": ("OpenAIGPTLMHeadModel", "OpenAIGPTDoubleHeadsModel",
                   "OpenAIGPTForSequenceClassification", "OpenAIGPTModel"),
}
HEAD_KEYS = {"multiple_choice_head.summary.weight", "multiple_choice_head.summary.bias",
             "score.weight"}
TOKENS = np.random.default_rng(0).integers(0, 99, (2, 10)).astype(np.int32)


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _expected(model):
    """(cfg, params) made from the in-memory torch model, the reference for file loads."""
    cfg = hf.config_from_hf(model.config.to_dict())
    return cfg, hf.params_from_hf(cfg, _state(model))


def _assert_same_params(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _random_params(cfg, seed=0):
    """Random params without compiling anything (gptjax.init_params would)."""
    rng = np.random.default_rng(seed)
    tensors = {k: rng.standard_normal(shape).astype(np.float32)
               for k, shape in hf._expected_shapes(cfg).items()}
    return hf.params_from_hf(cfg, tensors)


def _run(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.as_tensor(tokens).long())


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", sorted(hf._GPT2_ACT))
def test_gpt2_activation_names_mean_what_transformers_applies(name):
    cfg = hf.config_from_hf({"model_type": "gpt2", "activation_function": name})
    assert cfg.norm == "pre" and cfg.n_inner is None
    x = np.linspace(-6, 6, 241, dtype=np.float32)
    ref = transformers.activations.ACT2FN[name](torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(activation(cfg, x)), ref, atol=1e-6)
    if cfg.activation != "relu":  # the other GELU is visibly different at this tolerance
        other = cfg.replace(activation="gelu" if cfg.activation == "gelu_tanh" else "gelu_tanh")
        assert np.abs(np.asarray(activation(other, x)) - ref).max() > 1e-4


@pytest.mark.parametrize("name", sorted(hf._OPENAI_ACT))
def test_openai_activation_names_mean_what_transformers_applies(name):
    from transformers.models.openai import modeling_openai

    cfg = hf.config_from_hf({"model_type": "openai-gpt", "afn": name})
    assert cfg.norm == "post"
    x = np.linspace(-6, 6, 241, dtype=np.float32)
    ref = modeling_openai.ACT_FNS[name](torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(np.asarray(activation(cfg, x)), ref, atol=1e-6)
    if name == "gelu":  # openai-gpt's "gelu" is the tanh form, not the exact one
        exact = np.asarray(activation(cfg.replace(activation="gelu"), x))
        assert np.abs(exact - ref).max() > 1e-4


def test_activation_mapping_table():
    act = lambda d: hf.config_from_hf(d).activation  # noqa: E731
    assert act({"model_type": "openai-gpt", "afn": "gelu"}) == "gelu_tanh"
    assert act({"model_type": "gpt2", "activation_function": "gelu_new"}) == "gelu_tanh"
    assert act({"model_type": "gpt2", "activation_function": "gelu_pytorch_tanh"}) == "gelu_tanh"
    assert act({"model_type": "gpt2", "activation_function": "gelu"}) == "gelu"
    assert act({"model_type": "gpt2", "activation_function": "relu"}) == "relu"
    assert act({"model_type": "openai-gpt", "afn": "relu"}) == "relu"


def test_config_fields_and_defaults():
    cfg = hf.config_from_hf({
        "model_type": "gpt2", "vocab_size": 99, "n_positions": 32, "n_embd": 48, "n_layer": 3,
        "n_head": 6, "n_inner": 100, "resid_pdrop": 0, "embd_pdrop": 0.2, "attn_pdrop": 0.3,
        "layer_norm_epsilon": 1e-6, "initializer_range": 0.05, "summary_type": "cls_index",
    })
    assert (cfg.vocab_size, cfg.n_ctx, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_inner) == (
        99, 32, 48, 3, 6, 100)
    assert (cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop) == (0.0, 0.2, 0.3)
    assert (cfg.layer_norm_epsilon, cfg.init_std) == (1e-6, 0.05)
    assert hf.config_from_hf({"model_type": "gpt2"}) == gptjax.preset("gpt2")
    gpt1 = hf.config_from_hf({"model_type": "openai-gpt"})
    assert (gpt1.vocab_size, gpt1.n_ctx, gpt1.norm, gpt1.activation) == (
        40478, 512, "post", "gelu_tanh")


@pytest.mark.parametrize("model_type, field, value", [
    ("gpt2", "activation_function", "silu"),
    ("gpt2", "activation_function", "swish"),
    ("gpt2", "activation_function", "quick_gelu"),
    ("openai-gpt", "afn", "silu"),
    ("openai-gpt", "afn", "swish"),
    ("gpt2", "scale_attn_by_inverse_layer_idx", True),
    ("gpt2", "reorder_and_upcast_attn", True),
    ("gpt2", "add_cross_attention", True),
    ("gpt2", "scale_attn_weights", False),
    ("gpt2", "tie_word_embeddings", False),
    ("openai-gpt", "tie_word_embeddings", False),
])
def test_unsupported_config_names_the_field(model_type, field, value):
    with pytest.raises(ValueError, match=field):
        hf.config_from_hf({"model_type": model_type, field: value})


def test_unknown_model_type():
    with pytest.raises(ValueError, match="model_type='llama'"):
        hf.config_from_hf({"model_type": "llama"})


@pytest.mark.parametrize("cfg", [
    gptjax.GPTConfig(vocab_size=99, n_ctx=32, n_layer=2, n_head=4, n_embd=32, n_inner=40,
                     activation="gelu", resid_pdrop=0.0, layer_norm_epsilon=1e-6),
    gptjax.GPTConfig(vocab_size=99, n_ctx=32, n_layer=2, n_head=4, n_embd=32, norm="post",
                     activation="relu", init_std=0.03),
    gptjax.preset("gpt1"),
    gptjax.preset("gpt2-medium"),
], ids=["gpt2-gelu", "openai-relu", "gpt1", "gpt2-medium"])
def test_config_round_trip_through_transformers(cfg):
    d = hf.config_to_hf(cfg)
    assert hf.config_from_hf(d) == cfg
    hf_cfg = transformers.AutoConfig.for_model(**d)
    assert hf.config_from_hf(hf_cfg.to_dict()) == cfg


def test_config_to_hf_refuses_what_hf_cannot_express():
    base = gptjax.GPTConfig(vocab_size=99, n_ctx=32, n_layer=2, n_head=4, n_embd=32)
    with pytest.raises(ValueError, match="attention_band"):
        hf.config_to_hf(base.replace(attention_band=8))
    with pytest.raises(ValueError, match="activation"):
        hf.config_to_hf(base.replace(norm="post", activation="gelu"))
    with pytest.raises(ValueError, match="n_inner"):
        hf.config_to_hf(base.replace(norm="post", n_inner=64))


# ----------------------------------------------------------------------------- save


@pytest.mark.parametrize("family", list(CLASSES))
def test_save_pretrained_loads_in_transformers(tmp_path, hf_model_factory, family):
    lm_cls, double_cls, _, base_cls = CLASSES[family]
    source = hf_model_factory(family)
    cfg, params = _expected(source)
    hf.save_pretrained(cfg, params, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == [lm_cls] and written["model_type"] == family
    assert hf.config_from_hf(written) == cfg
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").model_type == family

    expected = _run(source).logits.numpy()
    for cls in (lm_cls, double_cls, "AutoModelForCausalLM"):
        model, info = getattr(transformers, cls).from_pretrained(
            tmp_path / "out", output_loading_info=True)
        assert not info["unexpected_keys"] and set(info["missing_keys"]) <= HEAD_KEYS, info
        np.testing.assert_allclose(_run(model.eval()).logits.numpy().reshape(expected.shape),
                                   expected, atol=1e-6, err_msg=cls)
    base, info = getattr(transformers, base_cls).from_pretrained(
        tmp_path / "out", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    np.testing.assert_allclose(_run(base.eval()).last_hidden_state.numpy(),
                               _run(source.transformer).last_hidden_state.numpy(), atol=1e-6)

    # And back: the saved folder loads to the params it was written from.
    cfg2, params2 = hf.load_pretrained(tmp_path / "out")
    assert cfg2 == cfg
    _assert_same_params(params2, params)


def test_save_refuses_to_overwrite(tmp_path):
    cfg = gptjax.GPTConfig(vocab_size=99, n_ctx=32, n_layer=1, n_head=4, n_embd=32)
    params = _random_params(cfg)
    target = tmp_path / "ckpt"
    target.mkdir()
    hf.save_pretrained(cfg, params, target)  # an empty folder may be filled
    with pytest.raises(FileExistsError, match=re.escape(str(target))):
        hf.save_pretrained(cfg, params, target)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="file"):
        hf.save_pretrained(cfg, params, tmp_path / "file")
    other = _random_params(cfg, seed=1)
    hf.save_pretrained(cfg, other, target, overwrite=True)
    _assert_same_params(hf.load_pretrained(target)[1], other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "file"]


def test_params_to_hf_inverts_params_from_hf():
    cfg = gptjax.GPTConfig(vocab_size=99, n_ctx=32, n_layer=3, n_head=4, n_embd=32,
                           norm="post")
    params = _random_params(cfg)
    tensors = hf.params_to_hf(cfg, params)
    assert "tokens_embed.weight" in tensors and "h.2.mlp.c_proj.bias" in tensors
    _assert_same_params(hf.params_from_hf(cfg, tensors), params)
    bad = dict(params, wpe=params["wpe"][:-1])
    with pytest.raises(ValueError, match="positions_embed.weight"):
        hf.params_to_hf(cfg, bad)


# ----------------------------------------------------------------------------- load


@pytest.mark.parametrize("family", list(CLASSES))
@pytest.mark.parametrize("kind", ["lm", "double", "seqcls", "base"])
def test_load_folders_written_by_transformers(tmp_path, hf_model_factory, family, kind):
    cls = CLASSES[family][["lm", "double", "seqcls", "base"].index(kind)]
    model = hf_model_factory(family, cls)
    model.save_pretrained(tmp_path)
    cfg, params, extra = hf.load_pretrained(tmp_path, return_extra=True)
    want_cfg, want = _expected(model)
    assert cfg == want_cfg
    _assert_same_params(params, want)
    heads = {k: v for k, v in _state(model).items() if k in HEAD_KEYS}
    assert sorted(extra) == sorted(heads)
    for key, value in heads.items():
        np.testing.assert_array_equal(extra[key], value)


@pytest.mark.parametrize("family", list(CLASSES))
def test_loaded_logits_match_transformers(tmp_path, hf_model_factory, family):
    model = hf_model_factory(family, seed=3)
    model.save_pretrained(tmp_path)
    cfg, params = hf.load_pretrained(tmp_path)
    z = gptjax.logits(params, jax.jit(gptjax.forward, static_argnums=2)(params, TOKENS, cfg))
    np.testing.assert_allclose(np.asarray(z), _run(model).logits.numpy(), atol=1e-4)


def test_sharded_safetensors(tmp_path, hf_model_factory):
    model = hf_model_factory("gpt2")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    cfg, params = hf.load_pretrained(tmp_path)
    _assert_same_params(params, _expected(model)[1])


def test_bfloat16_checkpoint(tmp_path, hf_model_factory):
    model = hf_model_factory("openai-gpt").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    cfg, params = hf.load_pretrained(tmp_path)
    model = model.float()  # bfloat16 -> float32 is exact
    _assert_same_params(params, _expected(model)[1])
    _, half = hf.load_pretrained(tmp_path, dtype=np.float16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(half)} == {np.dtype(np.float16)}


def test_pickle_needs_opt_in(tmp_path, hf_model_factory):
    model = hf_model_factory("gpt2")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        hf.load_pretrained(tmp_path)
    cfg, params = hf.load_pretrained(tmp_path, allow_pickle=True)
    _assert_same_params(params, _expected(model)[1])


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory, hf_model_factory):
    """A folder transformers wrote for a tiny GPT2LMHeadModel, and that model."""
    model = hf_model_factory("gpt2")
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    return folder, model


def _doctored(tmp_path, saved, edit):
    """A copy of the saved folder whose tensors went through edit(dict)."""
    folder, _ = saved
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    tensors = dict(load_file(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


def test_missing_key_is_named(tmp_path, saved_gpt2):
    folder = _doctored(tmp_path, saved_gpt2, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ValueError, match=r"missing.*h\.1\.mlp\.c_fc\.bias"):
        hf.load_pretrained(folder)


def test_unexpected_key_is_named(tmp_path, saved_gpt2):
    def edit(t):
        t["transformer.h.2.ln_1.weight"] = t["transformer.h.1.ln_1.weight"]

    with pytest.raises(ValueError, match=r"unexpected.*'transformer\.h\.2\.ln_1\.weight'"):
        hf.load_pretrained(_doctored(tmp_path, saved_gpt2, edit))


def test_shape_mismatch_names_key_and_shapes(tmp_path, saved_gpt2):
    def edit(t):
        t["transformer.wpe.weight"] = t["transformer.wpe.weight"][:31].copy()

    with pytest.raises(ValueError, match=r"'transformer\.wpe\.weight'.*\(31, 32\).*\(32, 32\)"):
        hf.load_pretrained(_doctored(tmp_path, saved_gpt2, edit))


def test_untied_lm_head_is_refused(tmp_path, saved_gpt2):
    def edit(t):
        t["lm_head.weight"] = t["transformer.wte.weight"] + 1.0

    with pytest.raises(ValueError, match="lm_head.weight"):
        hf.load_pretrained(_doctored(tmp_path, saved_gpt2, edit))


def test_old_checkpoint_layout(tmp_path, saved_gpt2):
    """No prefix, mask buffers, a tied lm_head copy: the layout of the hub's gpt2 files."""
    def edit(t):
        for key in list(t):
            t[key.removeprefix("transformer.")] = t.pop(key)
        for i in range(2):
            t[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
            t[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
        t["lm_head.weight"] = t["wte.weight"].copy()

    cfg, params = hf.load_pretrained(_doctored(tmp_path, saved_gpt2, edit))
    _assert_same_params(params, _expected(saved_gpt2[1])[1])


def test_no_weights_no_config_no_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        hf.load_pretrained(tmp_path / "missing" / "deeper")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load_pretrained(tmp_path / "empty")


# ----------------------------------------------------------------------------- hub


def test_hub_id_is_downloaded(monkeypatch, saved_gpt2):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(saved_gpt2[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    cfg, params = hf.load_pretrained("someone/tiny-gpt2")
    assert [c[0] for c in calls] == ["someone/tiny-gpt2"]
    assert "model.safetensors" in calls[0][1]["allow_patterns"]
    assert not any("bin" in p for p in calls[0][1]["allow_patterns"])
    _assert_same_params(params, _expected(saved_gpt2[1])[1])


def test_hub_download_failure_names_the_id(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="openai-community/gpt2"):
        hf.load_pretrained("openai-community/gpt2")


def test_hub_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install gptjax\[hf\]"):
        hf.load_pretrained("openai-community/gpt2")
