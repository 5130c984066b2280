"""BERT against Hugging Face transformers (PyTorch, float32, CPU), both ways.

A tiny random BERT of odd sizes (width 36, 3 heads, vocabulary 101, 3 layers, MLP 50)
with LayerNorms and biases moved off their init, on a batch with padding and two
segments: gptjax's hidden states, MLM and NSP logits, the MLM + NSP loss and the gradient
of every parameter equal BertForPreTraining's; the classifier heads equal
BertForSequenceClassification's and BertForMultipleChoice's; gptjax's export loads into
transformers with nothing missing and gives identical outputs. No download: every model
is built from a BertConfig here.

Measured (max abs difference, this batch; run with -s to print them): hidden states
1.2e-6, MLM logits 1.8e-7, NSP logits 1.5e-8, loss 4.8e-7 (of a loss of about 5.3, one
float32 rounding), gradients 8.9e-8. Asserted: 5e-6, 1e-6, 1e-6, 2e-6 and 5e-7.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gptjax
from gptjax import hf
from gptjax.model import bert_loss, dense, forward, mlm_logits, nsp_logits, pooled

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

HF_CONFIG = dict(vocab_size=101, hidden_size=36, num_hidden_layers=3, num_attention_heads=3,
                 intermediate_size=50, max_position_embeddings=20, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)
HIDDEN_TOL, LOGIT_TOL, LOSS_TOL, GRAD_TOL = 5e-6, 1e-6, 2e-6, 5e-7


def _bert_config(**changes):
    return transformers.BertConfig(**{**HF_CONFIG, **changes})


def _perturb(model, seed=0):
    """LayerNorm gains and every bias moved off 1 and 0, so each is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _inputs(seed=0, B=3, T=13, V=101):
    """Two segments, rows 1 and 2 right-padded with [PAD] = 0; real ids avoid 0, the
    embedding's padding_idx (whose row transformers never updates through the lookup)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, (B, T))
    types = np.zeros((B, T), np.int64)
    types[:, T // 2:] = 1
    mask = np.ones((B, T), np.int64)
    mask[1, 9:] = 0
    mask[2, 11:] = 0
    tokens[mask == 0] = 0
    types[mask == 0] = 0
    labels = np.where(rng.random((B, T)) < 0.3, tokens, -100)
    labels[mask == 0] = -100
    labels[0, 1] = tokens[0, 1]  # at least one target
    return {"tokens": tokens, "token_types": types, "attention_mask": mask,
            "mlm_labels": labels, "nsp_labels": np.array([0, 1, 1][:B])}


def _jnp(batch):
    return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


def _torch(batch):
    return dict(input_ids=torch.tensor(batch["tokens"]),
                token_type_ids=torch.tensor(batch["token_types"]),
                attention_mask=torch.tensor(batch["attention_mask"]))


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def source():
    """The HF model, gptjax's cfg and params made from it, a batch, HF's outputs and grads."""
    torch.manual_seed(0)
    model = _perturb(transformers.BertForPreTraining(_bert_config()))
    cfg = hf.config_from_hf(model.config.to_dict())
    params = hf.params_from_hf(cfg, _state(model))
    batch = _inputs()
    out = model(**_torch(batch), labels=torch.tensor(batch["mlm_labels"]),
                next_sentence_label=torch.tensor(batch["nsp_labels"]), output_hidden_states=True)
    out.loss.backward()
    grads = {name: p.grad.numpy().copy() for name, p in model.named_parameters()}
    model.zero_grad()
    return model, cfg, params, batch, out, grads


def test_config_is_bert(source):
    _, cfg, *_ = source
    assert (cfg.arch, cfg.norm, cfg.activation, cfg.layer_norm_epsilon) == (
        "bert", "post", "gelu", 1e-12)
    assert (cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.n_layer, cfg.mlp_width) == (
        36, 3, 101, 3, 50)


def test_outputs_and_loss_match_transformers(source):
    _, cfg, params, batch, out, _ = source
    b = _jnp(batch)
    h = forward(params, b["tokens"], cfg, attention_mask=b["attention_mask"],
                token_types=b["token_types"])
    errors = {
        "hidden": _max_diff(h, out.hidden_states[-1].detach()),
        "mlm": _max_diff(mlm_logits(params, h, cfg), out.prediction_logits.detach()),
        "nsp": _max_diff(nsp_logits(params, h, cfg), out.seq_relationship_logits.detach()),
        "loss": abs(float(bert_loss(params, b, cfg)[0]) - out.loss.item()),
    }
    print("max abs differences:", errors)
    assert errors["hidden"] < HIDDEN_TOL
    assert errors["mlm"] < LOGIT_TOL and errors["nsp"] < LOGIT_TOL
    assert errors["loss"] < LOSS_TOL


def test_gradients_of_every_parameter_match_transformers(source):
    """jax.grad of bert_loss == torch's backward of BertForPreTraining's loss, mapped into
    gptjax's layout by the same loader (tied decoder included: W_e's gradient sums the
    lookup's and the MLM output's)."""
    _, cfg, params, batch, _, grads = source
    want, initialized = hf.bert_params_from_hf(cfg, grads)
    assert initialized == []
    got = jax.grad(lambda p: bert_loss(p, _jnp(batch), cfg)[0])(params)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    worst = 0.0
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                            jax.tree_util.tree_leaves(want), strict=True):
        assert g.shape == w.shape
        assert float(jnp.abs(w).max()) > 0, jax.tree_util.keystr(path)
        err = _max_diff(g, w)
        worst = max(worst, err)
        assert err < GRAD_TOL, (jax.tree_util.keystr(path), err)
    print("max abs gradient difference:", worst)


def test_sequence_classification_and_multiple_choice_heads(source):
    """The classifier over the pooled [CLS]: BertForSequenceClassification's logits, and
    BertForMultipleChoice's (one sequence per choice, one score each)."""
    _, _, _, batch, _, _ = source
    torch.manual_seed(1)
    seq = _perturb(transformers.BertForSequenceClassification(_bert_config(num_labels=3)))
    cfg = hf.config_from_hf(seq.config.to_dict())
    params, extra = hf.params_from_hf(cfg, _state(seq), return_extra=True)
    assert extra == {"initialized": ["mlm", "nsp"]}
    assert params["classifier"]["w"].shape == (36, 3)
    b = _jnp(batch)
    h = forward(params, b["tokens"], cfg, attention_mask=b["attention_mask"],
                token_types=b["token_types"])
    got = dense(params["classifier"], pooled(params, h, cfg), cfg)
    want = seq(**_torch(batch)).logits.detach()
    assert _max_diff(got, want) < LOGIT_TOL

    choice = _perturb(transformers.BertForMultipleChoice(_bert_config()), seed=2)
    cfg = hf.config_from_hf(choice.config.to_dict())
    params = hf.params_from_hf(cfg, _state(choice))
    assert params["classifier"]["w"].shape == (36, 1)
    C = 3  # the batch's three rows as three choices of one question
    want = choice(**{k: v[None] for k, v in _torch(batch).items()}).logits.detach()  # (1, C)
    h = forward(params, b["tokens"], cfg, attention_mask=b["attention_mask"],
                token_types=b["token_types"])
    got = dense(params["classifier"], pooled(params, h, cfg), cfg).reshape(1, C)
    assert _max_diff(got, want) < LOGIT_TOL


def test_export_loads_into_transformers_with_identical_outputs(source, tmp_path):
    model, cfg, params, batch, out, _ = source
    hf.save_pretrained(cfg, params, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "bert" and written["architectures"] == ["BertForPreTraining"]
    keys = set(load_file(tmp_path / "out" / "model.safetensors"))
    with torch.device("meta"):
        own = set(transformers.BertForPreTraining(_bert_config()).state_dict())
    # what transformers itself saves: everything but the tied decoder
    assert keys == own - {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}

    loaded, info = transformers.BertForPreTraining.from_pretrained(
        tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    again = loaded.eval()(**_torch(batch), output_hidden_states=True)
    np.testing.assert_array_equal(again.prediction_logits.detach(),
                                  out.prediction_logits.detach())
    np.testing.assert_array_equal(again.seq_relationship_logits.detach(),
                                  out.seq_relationship_logits.detach())

    mlm, info = transformers.BertForMaskedLM.from_pretrained(
        tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # the pooler and NSP head are not BertForMaskedLM's, as with transformers' own saves
    assert info["unexpected_keys"] == {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                       "cls.seq_relationship.weight", "cls.seq_relationship.bias"}
    np.testing.assert_array_equal(mlm.eval()(**_torch(batch)).logits.detach(),
                                  out.prediction_logits.detach())

    cfg2, params2 = hf.load_pretrained(tmp_path / "out")
    assert cfg2 == cfg
    for a, c in zip(jax.tree_util.tree_leaves(params2), jax.tree_util.tree_leaves(params),
                    strict=True):
        np.testing.assert_array_equal(a, c)


def test_gptjax_params_with_a_classifier_round_trip(tmp_path):
    """gptjax-made params (a preset's layout) plus a classifier: saved, read back
    unchanged, and BertForSequenceClassification finds its classifier in the folder."""
    cfg = gptjax.preset("bert-tiny", n_layer=1, vocab_size=53, n_ctx=16)
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    params["classifier"] = {"w": jnp.ones((cfg.n_embd, 4)) * 0.5, "b": jnp.arange(4.0)}
    hf.save_pretrained(cfg, params, tmp_path / "out")
    cfg2, params2, extra = hf.load_pretrained(tmp_path / "out", return_extra=True)
    assert cfg2 == cfg and extra == {"initialized": []}
    assert jax.tree_util.tree_structure(params2) == jax.tree_util.tree_structure(params)
    for a, c in zip(jax.tree_util.tree_leaves(params2), jax.tree_util.tree_leaves(params),
                    strict=True):
        np.testing.assert_array_equal(a, c)
    seq, info = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and seq.config.num_labels == 4
    np.testing.assert_array_equal(seq.classifier.bias.detach(), np.arange(4.0))


@pytest.mark.parametrize("cls, initialized", [
    ("BertModel", ["mlm", "nsp"]),
    ("BertForMaskedLM", ["pooler", "nsp"]),
    ("BertForPreTraining", []),
])
def test_load_each_checkpoint_class(source, tmp_path, cls, initialized, caplog):
    """A folder saved by transformers from each class: the encoder equals the source's,
    the heads it holds too, and the heads it lacks are initialised and logged."""
    model, cfg, params, *_ = source
    model.save_pretrained(tmp_path / "source")
    getattr(transformers, cls).from_pretrained(tmp_path / "source").save_pretrained(
        tmp_path / cls)
    with caplog.at_level("WARNING", logger="gptjax.hf"):
        cfg2, loaded, extra = hf.load_pretrained(tmp_path / cls, return_extra=True)
    assert cfg2 == cfg and extra["initialized"] == initialized
    assert all(group in caplog.text for group in initialized)
    assert set(loaded) == set(params)
    for key in params:
        same = jax.tree_util.tree_all(jax.tree_util.tree_map(
            lambda a, b: bool(np.array_equal(a, b)), loaded[key], params[key]))
        assert same == (key not in initialized), key


def test_older_names_and_the_tied_decoder(source):
    """TensorFlow-converted names (LayerNorm gamma / beta), a stored decoder weight and
    bias equal to their ties, and old buffers all load; what cannot be loaded raises
    ValueError naming the key."""
    model, cfg, params, *_ = source
    state = _state(model)
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                     "LayerNorm.beta"): v
           for k, v in state.items()}
    old["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    old["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    old["bert.embeddings.position_ids"] = np.arange(20)[None]
    loaded = hf.params_from_hf(cfg, old)
    for a, c in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params),
                    strict=True):
        np.testing.assert_array_equal(a, c)

    untied = dict(state, **{"cls.predictions.decoder.weight":
                            state["bert.embeddings.word_embeddings.weight"] + 1})
    with pytest.raises(ValueError, match="cls.predictions.decoder.weight"):
        hf.params_from_hf(cfg, untied)
    with pytest.raises(ValueError, match="qa_outputs.weight"):
        hf.params_from_hf(cfg, dict(state, **{"qa_outputs.weight": np.zeros((2, 36))}))
    partial = {k: v for k, v in state.items() if k != "cls.seq_relationship.bias"}
    with pytest.raises(ValueError, match="missing key.*cls.seq_relationship.bias"):
        hf.params_from_hf(cfg, partial)
    no_layer = {k: v for k, v in state.items() if ".layer.2.attention.self.key." not in k}
    with pytest.raises(ValueError, match="missing key.*encoder.layer.2.attention.self.key"):
        hf.params_from_hf(cfg, no_layer)
    bad = dict(state, **{"bert.pooler.dense.weight": np.zeros((36, 35), np.float32)})
    with pytest.raises(ValueError, match=r"'bert.pooler.dense.weight'.*\(36, 35\)"):
        hf.params_from_hf(cfg, bad)


@pytest.mark.parametrize("field, value", [
    ("position_embedding_type", "relative_key"),
    ("is_decoder", True),
    ("add_cross_attention", True),
    ("tie_word_embeddings", False),
    ("hidden_act", "silu"),
])
def test_unsupported_bert_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        hf.config_from_hf({"model_type": "bert", field: value})


def test_config_round_trip_and_presets():
    assert hf.config_from_hf({"model_type": "bert"}) == gptjax.preset("bert-base")
    for name in ("bert-base", "bert-large", "bert-tiny"):
        cfg = gptjax.preset(name)
        d = hf.config_to_hf(cfg)
        assert hf.config_from_hf(d) == cfg
        assert hf.config_from_hf(transformers.AutoConfig.for_model(**d).to_dict()) == cfg
    with pytest.raises(ValueError, match="embd_pdrop"):
        hf.config_to_hf(gptjax.preset("bert-base", embd_pdrop=0.0))
    with pytest.raises(ValueError, match="post-LN"):
        hf.config_to_hf(gptjax.preset("bert-base", norm="pre"))


@pytest.mark.parametrize("name, pretraining, encoder, published", [
    ("bert-base", 110_106_428, 109_482_240, 110e6),
    ("bert-large", 336_226_108, 335_141_888, 340e6),
])
def test_parameter_counts_equal_transformers(name, pretraining, encoder, published):
    """Counted from shapes only (jax.eval_shape; transformers on the meta device): the whole
    model equals BertForPreTraining's count (the tied decoder counted once), the model
    without the MLM and NSP heads BertModel's; both are the paper's 110M / 340M to 2%."""
    cfg = gptjax.preset(name)
    shapes = jax.eval_shape(lambda: gptjax.init_params(cfg, jax.random.PRNGKey(0)))

    def count(tree):
        return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))

    hf_cfg = {k: v for k, v in hf.config_to_hf(cfg).items()
              if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        hf_pretraining = transformers.BertForPreTraining(transformers.BertConfig(**hf_cfg))
        hf_encoder = transformers.BertModel(transformers.BertConfig(**hf_cfg))
    assert count(shapes) == pretraining == sum(p.numel() for p in hf_pretraining.parameters())
    without_heads = count(shapes) - count((shapes["mlm"], shapes["nsp"]))
    assert without_heads == encoder == sum(p.numel() for p in hf_encoder.parameters())
    assert abs(encoder - published) / published < 0.02


def test_safetensors_bert_folder_without_prefix(source, tmp_path):
    """A hand-written folder: BertModel names with no prefix, config.json minimal."""
    model, cfg, params, *_ = source
    folder = tmp_path / "plain"
    folder.mkdir()
    base = {k.removeprefix("bert."): v for k, v in _state(model).items()
            if k.startswith("bert.")}
    save_file({k: np.ascontiguousarray(v) for k, v in base.items()},
              folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", **HF_CONFIG}))
    cfg2, loaded = hf.load_pretrained(folder)
    assert cfg2 == cfg
    np.testing.assert_array_equal(loaded["h"]["attn"]["c_attn"]["w"],
                                  params["h"]["attn"]["c_attn"]["w"])
    np.testing.assert_array_equal(loaded["pooler"]["w"], params["pooler"]["w"])
