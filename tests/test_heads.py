"""Task heads: shapes, init, pooling, order invariance, and parity with HF double-heads models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import GPTConfig
from gptjax.finetune.heads import (
    ClassificationHead,
    MultipleChoiceHead,
    SimilarityHead,
    init_head,
    make_head,
    pool_at,
)
from gptjax.finetune.transforms import Example, SpecialIds, encode_examples, make_loss_fn

jax.config.update("jax_default_matmul_precision", "highest")


def test_pool_at_picks_extract_state():
    h = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
    e = jnp.array([[0, 3, 1], [2, 2, 0]])
    out = pool_at(h, e)
    assert out.shape == (2, 3, 5)
    for b in range(2):
        for c in range(3):
            np.testing.assert_array_equal(out[b, c], h[b, c, e[b, c]])


def test_head_init_is_normal_002_with_zero_bias():
    head = ClassificationHead(3)
    p = init_head(head, "classification", 256, jax.random.key(0))
    assert p["logits"]["kernel"].shape == (256, 3)
    np.testing.assert_array_equal(p["logits"]["bias"], 0.0)
    assert abs(float(p["logits"]["kernel"].std()) - 0.02) < 0.003


def test_classification_head_shape_and_dropout():
    head = ClassificationHead(4)
    p = init_head(head, "classification", 8, jax.random.key(0))
    h = jax.random.normal(jax.random.key(1), (3, 5, 8))
    e = jnp.array([4, 2, 0])
    out = head.apply({"params": p}, h, e)
    assert out.shape == (3, 4)
    manual = pool_at(h, e) @ p["logits"]["kernel"] + p["logits"]["bias"]
    np.testing.assert_allclose(out, manual, atol=1e-6)
    dropped = head.apply({"params": p}, h, e, deterministic=False,
                         rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(dropped, out)


def test_similarity_head_is_order_invariant():
    for n_classes, shape in ((None, (2,)), (3, (2, 3))):
        head = SimilarityHead(n_classes)
        p = init_head(head, "similarity", 8, jax.random.key(0))
        h = jax.random.normal(jax.random.key(1), (2, 2, 6, 8))
        e = jnp.array([[5, 3], [1, 4]])
        out = head.apply({"params": p}, h, e)
        swapped = head.apply({"params": p}, h[:, ::-1], e[:, ::-1])
        assert out.shape == shape
        np.testing.assert_allclose(out, swapped, atol=1e-6)


def test_similarity_model_output_unchanged_when_a_and_b_swap():
    """End to end: the transformation plus the head give the same output for (A, B), (B, A)."""
    cfg = GPTConfig(vocab_size=40, n_ctx=16, n_layer=1, n_head=2, n_embd=16)
    from gptjax.finetune.transforms import make_predict_fn
    from gptjax.model import init_params

    sp = SpecialIds(36, 37, 38, 39)
    enc = lambda s: [ord(c) - 97 for c in s]  # noqa: E731
    ab = encode_examples("similarity", [Example("abc", "de")], enc, sp, 16)
    ba = encode_examples("similarity", [Example("de", "abc")], enc, sp, 16)
    head = make_head("similarity", None)
    params = {"gpt": init_params(cfg, jax.random.key(0)),
              "head": init_head(head, "similarity", 16, jax.random.key(1))}
    predict = jax.jit(make_predict_fn(cfg, head, "similarity"))
    np.testing.assert_allclose(predict(params, ab.batch([0])), predict(params, ba.batch([0])),
                               atol=1e-5)


@pytest.mark.parametrize("n_choices", [2, 4, 5])
def test_multiple_choice_head_any_number_of_choices(n_choices):
    head = MultipleChoiceHead()
    p = init_head(head, "multiple_choice", 8, jax.random.key(0))
    h = jax.random.normal(jax.random.key(1), (3, n_choices, 6, 8))
    e = jnp.full((3, n_choices), 5)
    out = head.apply({"params": p}, h, e)
    assert out.shape == (3, n_choices)
    # each choice's score depends on that choice alone
    manual = (h[:, :, 5] @ p["score"]["kernel"])[..., 0] + p["score"]["bias"][0]
    np.testing.assert_allclose(out, manual, atol=1e-5)
    mask = jnp.ones((3, n_choices), jnp.int32).at[:, -1].set(0)
    masked = head.apply({"params": p}, h, e, mask)
    assert np.all(np.asarray(jax.nn.softmax(masked))[:, -1] == 0)


def test_make_head_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_classes"):
        make_head("classification", 1)
    with pytest.raises(ValueError, match="unknown task kind"):
        make_head("ranking", 2)


# ----------------------------------------------------------------------------- HF parity


def _stack(sd, names, L, transpose=False):
    arrays = [sd[n.format(i=i)] for i in range(L) for n in [names]]
    return jnp.asarray(np.stack(arrays))


def _gptjax_params_from_torch(sd, cfg: GPTConfig, gpt2: bool):
    """A small local mapping of an HF state dict (HF's Conv1D weights are already (in, out))."""
    sd = {k: v.detach().numpy() for k, v in sd.items()}
    prefix = "transformer."
    L = cfg.n_layer

    def layer(name):
        return _stack(sd, prefix + "h.{i}." + name, L)

    params = {
        "wte": jnp.asarray(sd[prefix + ("wte.weight" if gpt2 else "tokens_embed.weight")]),
        "wpe": jnp.asarray(sd[prefix + ("wpe.weight" if gpt2 else "positions_embed.weight")]),
        "h": {
            "ln_1": {"g": layer("ln_1.weight"), "b": layer("ln_1.bias")},
            "attn": {
                "c_attn": {"w": layer("attn.c_attn.weight"), "b": layer("attn.c_attn.bias")},
                "c_proj": {"w": layer("attn.c_proj.weight"), "b": layer("attn.c_proj.bias")},
            },
            "ln_2": {"g": layer("ln_2.weight"), "b": layer("ln_2.bias")},
            "mlp": {
                "c_fc": {"w": layer("mlp.c_fc.weight"), "b": layer("mlp.c_fc.bias")},
                "c_proj": {"w": layer("mlp.c_proj.weight"), "b": layer("mlp.c_proj.bias")},
            },
        },
    }
    if gpt2:
        params["ln_f"] = {"g": jnp.asarray(sd[prefix + "ln_f.weight"]),
                          "b": jnp.asarray(sd[prefix + "ln_f.bias"])}
    head = {"score": {"kernel": jnp.asarray(sd["multiple_choice_head.summary.weight"].T),
                      "bias": jnp.asarray(sd["multiple_choice_head.summary.bias"])}}
    return {"gpt": params, "head": head}


def _hf_double_heads(gpt2: bool, V=50, T=24, D=32, L=2, H=4):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=V, n_positions=T, n_embd=D, n_layer=L, n_head=H,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                  num_labels=1, summary_type="cls_index", summary_use_proj=True,
                  summary_proj_to_labels=True, summary_activation=None)
    torch.manual_seed(0)
    if gpt2:
        hf_cfg = transformers.GPT2Config(**common, activation_function="gelu_new")
        model = transformers.GPT2DoubleHeadsModel(hf_cfg)
        cfg = GPTConfig(vocab_size=V, n_ctx=T, n_layer=L, n_head=H, n_embd=D, norm="pre",
                        activation="gelu_tanh", embd_pdrop=0, attn_pdrop=0, resid_pdrop=0)
    else:
        hf_cfg = transformers.OpenAIGPTConfig(**common, afn="gelu")
        model = transformers.OpenAIGPTDoubleHeadsModel(hf_cfg)
        cfg = GPTConfig(vocab_size=V, n_ctx=T, n_layer=L, n_head=H, n_embd=D, norm="post",
                        activation="gelu_tanh", embd_pdrop=0, attn_pdrop=0, resid_pdrop=0)
    model.eval()
    # Random (not default-init) LayerNorm and bias values, so the mapping is really tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return torch, model, cfg


@pytest.mark.parametrize("gpt2", [False, True], ids=["openai-gpt", "gpt2"])
def test_parity_with_hf_double_heads(gpt2):
    torch, model, cfg = _hf_double_heads(gpt2)
    params = _gptjax_params_from_torch(model.state_dict(), cfg, gpt2)
    sp = SpecialIds(start=46, delim=47, extract=48, pad=49)
    rng = np.random.default_rng(0)

    def text(n):
        return " ".join(str(x) for x in rng.integers(0, 46, n))

    enc = lambda s: [int(x) for x in s.split()]  # noqa: E731
    examples = [Example(text(5), choices=(text(3), text(6), text(1)), label=2),
                Example(text(9), choices=(text(2), text(4), text(7)), label=0)]
    arrays = encode_examples("multiple_choice", examples, enc, sp, cfg.n_ctx)
    batch = arrays.batch([0, 1])

    ids = torch.tensor(batch["tokens"], dtype=torch.long)
    mc_ids = torch.tensor(batch["extract"], dtype=torch.long)
    lm_labels = ids.clone()
    lm_labels[torch.tensor(batch["mask"]) == 0] = -100
    mc_labels = torch.tensor(batch["labels"], dtype=torch.long)
    with torch.no_grad():
        out = model(ids, mc_token_ids=mc_ids, labels=lm_labels, mc_labels=mc_labels)

    from gptjax.finetune.transforms import apply_head, task_hidden
    from gptjax.model import logits

    head = MultipleChoiceHead()
    h = task_hidden(params["gpt"], batch, cfg)
    mc = apply_head(head, params["head"], "multiple_choice", h, batch)
    np.testing.assert_allclose(mc, out.mc_logits.numpy(), atol=1e-4, rtol=0)
    z = logits(params["gpt"], h.reshape(-1, *h.shape[2:])).reshape(*h.shape[:3], -1)
    real = batch["mask"].astype(bool)  # LM logits agree at real tokens (HF computes all)
    np.testing.assert_allclose(np.asarray(z)[real], out.logits.numpy()[real], atol=1e-4, rtol=0)

    lam = 0.5
    loss_fn = make_loss_fn(cfg, head, "multiple_choice", lm_coef=lam, lm_normalization="token")
    loss, metrics = loss_fn(params, batch, None)
    np.testing.assert_allclose(metrics["task_loss"], out.mc_loss.item(), atol=1e-5)
    np.testing.assert_allclose(metrics["lm_loss"], out.loss.item(), atol=1e-5)
    np.testing.assert_allclose(loss, out.mc_loss.item() + lam * out.loss.item(), atol=1e-5)
