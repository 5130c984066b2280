"""muP (gptjax.mup): equal to the standard parametrization at the base width, the init and
learning-rate scales of each parameter, one output multiplier on every path that makes LM
logits, 1/K attention, the coordinate check across widths, its bad inputs, and the
learning-rate transfer sweep (gptjax.scaling.mup_transfer)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model as M
from gptjax import mup
from gptjax.config import GPTConfig
from gptjax.evaluate import score_requests
from gptjax.finetune.heads import init_head, make_head
from gptjax.finetune.transforms import (
    Example,
    SpecialIds,
    encode_examples,
    lm_loss_on_tasks,
    make_loss_fn,
    task_hidden,
)
from gptjax.generate import generate
from gptjax.scaling.ladder import LadderConfig, model_for
from gptjax.scaling.mup_transfer import (
    TransferConfig,
    best_rates,
    fitted_optimum,
    format_table,
    run_sweep,
)
from gptjax.train.optim import OptimConfig, make_optimizer

jax.config.update("jax_default_matmul_precision", "highest")

NO_DROPOUT = dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
# Width 64 against a base of 16: m = 4, head size 16 against the base's 4.
WIDE = GPTConfig(vocab_size=50, n_ctx=16, n_layer=2, n_head=4, n_embd=64, **NO_DROPOUT,
                 parametrization="mup", mup_base_width=16)
TOKENS = jax.random.randint(jax.random.PRNGKey(7), (3, 12), 0, 50)


def plain_adam(lr, steps=10, weight_decay=0.0):
    return OptimConfig(lr=lr, warmup_steps=0, schedule="constant", weight_decay=weight_decay,
                       clip_norm=0.0)


def by_path(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------- m = 1


def test_at_the_base_width_mup_is_the_standard_parametrization():
    """Same init, same logits, same optimizer step, bit for bit, at n_embd = mup_base_width."""
    standard = WIDE.replace(parametrization="standard")
    base = standard.replace(parametrization="mup", mup_base_width=standard.n_embd)

    def run(cfg):  # parameters, hidden states, logits, loss and one AdamW step's updates
        params = M.init_params(cfg, jax.random.PRNGKey(0))
        h = M.forward(params, TOKENS, cfg)
        opt = make_optimizer(plain_adam(1e-2, weight_decay=0.1), 10, model=cfg)
        loss, grads = jax.value_and_grad(M.lm_loss)(params, TOKENS, cfg)
        updates = opt.update(grads, opt.init(params), params, step=0)[0]
        return params, h, M.logits(params, h, cfg), loss, updates

    run = jax.jit(run, static_argnums=0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, run(standard), run(base))


# ----------------------------------------------------------------------------- init and lr


def test_init_scales_hidden_matrices_by_one_over_sqrt_m():
    cfg = WIDE.replace(n_embd=256, n_layer=2)  # m = 16: hidden std 0.02 / 4
    params = by_path(M.init_params(cfg, jax.random.PRNGKey(1)))
    residual = 1 / np.sqrt(2 * cfg.n_layer)  # GPT-2's, on top
    expected = {
        "['h']['attn']['c_attn']['w']": 0.005, "['h']['mlp']['c_fc']['w']": 0.005,
        "['h']['attn']['c_proj']['w']": 0.005 * residual,
        "['h']['mlp']['c_proj']['w']": 0.005 * residual,
        "['wte']": 0.02, "['wpe']": 0.02,  # embeddings: unchanged
    }
    for name, std in expected.items():
        assert float(jnp.std(params[name])) == pytest.approx(std, rel=0.05), name
    assert float(jnp.abs(params["['h']['ln_1']['g']"] - 1).max()) == 0.0
    assert float(jnp.abs(params["['h']['attn']['c_attn']['b']"]).max()) == 0.0


def test_adam_learning_rate_is_lr_over_m_on_hidden_matrices_only():
    """The same gradients through the standard and the muP optimizer: muP's updates are the
    standard ones times 1/m on the four hidden matrices and equal elsewhere; the decoupled
    weight decay follows the scaled rate; nested (fine-tuning) trees are labelled too."""
    params = {"gpt": M.init_params(WIDE, jax.random.PRNGKey(2)),
              "head": {"kernel": jnp.ones((64, 2)), "bias": jnp.zeros((2,))}}
    grads = jax.tree_util.tree_map(
        lambda p: jax.random.normal(jax.random.PRNGKey(3), p.shape), params)
    m = mup.width_multiplier(WIDE)
    assert m == 4.0
    for wd in (0.0, 0.1):
        ups = {}
        for cfg in (WIDE, WIDE.replace(parametrization="standard")):
            opt = make_optimizer(plain_adam(1e-3, weight_decay=wd), 10, model=cfg)
            ups[cfg.parametrization] = by_path(opt.update(grads, opt.init(params), params,
                                                          step=0)[0])
        hidden = [k for k in ups["mup"] if k.startswith("['gpt']['h']") and k.endswith("['w']")]
        assert len(hidden) == 4
        for name, update in ups["mup"].items():
            scale = 1 / m if name in hidden else 1.0
            np.testing.assert_allclose(update, scale * ups["standard"][name], rtol=1e-6,
                                       atol=1e-12, err_msg=name)
        # Adam's first step moves each entry by about the rate: lr / m on hidden matrices
        c_fc = ups["mup"]["['gpt']['h']['mlp']['c_fc']['w']"]
        assert float(jnp.median(jnp.abs(c_fc))) == pytest.approx(1e-3 / m, rel=0.05)


# ----------------------------------------------------------------------------- one readout


def reference_logits(params, h, cfg):
    """muP's readout written out: h W_e^T / m, in float64."""
    h64, wte = np.asarray(h, np.float64), np.asarray(params["wte"], np.float64)
    return h64 @ wte.T / (cfg.n_embd / cfg.mup_base_width)


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_every_path_applies_the_output_multiplier():
    """model.logits, token_nll, mean_nll (reference and chunked kernel), lm_loss (reference
    and fast kernels), the evaluator, the cached decoder and fine-tuning's auxiliary LM loss
    all give h W_e^T / m."""
    cfg = WIDE
    params = M.init_params(cfg, jax.random.PRNGKey(4))
    x, targets = TOKENS[:, :-1], TOKENS[:, 1:]
    forward = jax.jit(M.forward, static_argnums=2)
    h = forward(params, x, cfg)
    z = reference_logits(params, h, cfg)
    nll = -np.take_along_axis(log_softmax(z), np.asarray(targets)[..., None], -1)[..., 0]
    # the multiplier matters: the standard readout differs by the factor m
    np.testing.assert_allclose(M.logits(params, h), 4 * z, rtol=1e-4, atol=1e-5)

    np.testing.assert_allclose(M.logits(params, h, cfg), z, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(M.token_nll(params, h, targets, cfg), nll, rtol=1e-5)
    for kernels in ("reference", "fast"):
        c = cfg.replace(kernels=kernels)
        mean_nll = jax.jit(M.mean_nll, static_argnames="cfg")
        np.testing.assert_allclose(mean_nll(params, h, targets, cfg=c), nll.mean(), rtol=1e-5)
        np.testing.assert_allclose(jax.jit(M.lm_loss, static_argnums=2)(params, TOKENS, c),
                                   nll.mean(), rtol=1e-5)

    # evaluate: log P(continuation | context) of row 0's last 5 tokens
    row = np.asarray(TOKENS[0]).tolist()
    scores = score_requests(params, cfg, [(row[:-5], row[-5:])])
    np.testing.assert_allclose(scores.logprob[0], -nll[0, -5:].sum(), rtol=1e-5)

    # generate: each step's logits equal the full forward pass's over prompt + tokens so far
    prompt = np.asarray(TOKENS[:2, :4])
    out, step_logits = generate(params, cfg, prompt, 6, rng=jax.random.PRNGKey(5),
                                return_logits=True)
    full = np.concatenate([prompt, np.asarray(out)], axis=1)
    expected = reference_logits(params, forward(params, jnp.asarray(full), cfg), cfg)
    np.testing.assert_allclose(step_logits, expected[:, 3:9], rtol=1e-4, atol=1e-5)

    # fine-tuning's L1 on task sequences, direct and through make_loss_fn
    sp = SpecialIds(start=1, delim=2, extract=3, pad=0)
    batch = encode_examples("classification", [Example("5 6 7 8", label=1),
                                                Example("9 10", label=0)],
                            lambda text: [int(t) for t in text.split()], sp, 16).batch([0, 1])
    th = task_hidden(params, batch, cfg)
    tokens = np.asarray(batch["tokens"]).reshape(2, -1)
    mask = np.asarray(batch["mask"]).reshape(2, -1)[:, 1:].astype(np.float64)
    zt = reference_logits(params, np.asarray(th).reshape(2, tokens.shape[1], -1)[:, :-1], cfg)
    task_nll = -np.take_along_axis(log_softmax(zt), tokens[:, 1:, None], -1)[..., 0]
    expected_l1 = (task_nll * mask).sum() / mask.sum()
    np.testing.assert_allclose(lm_loss_on_tasks(params, th, batch, "token", cfg=cfg),
                               expected_l1, rtol=1e-5)
    head = make_head("classification", 2)
    full_params = {"gpt": params, "head": init_head(head, "classification", 64,
                                                    jax.random.PRNGKey(6))}
    loss_fn = make_loss_fn(cfg, head, "classification", lm_normalization="token")
    np.testing.assert_allclose(loss_fn(full_params, batch)[1]["lm_loss"], expected_l1,
                               rtol=1e-5)


def test_attention_scores_are_scaled_by_sqrt_base_head_size_over_head_size():
    """softmax(q.k sqrt(K0) / K): muP's 1/K scaling, equal to 1/sqrt(K) at the base width;
    the fast attention kernel gets the same scaled queries."""
    qkv = jax.random.normal(jax.random.PRNGKey(8), (2, 6, 3, 4, 16))  # K = 16, K0 = 4
    q, k, v = (np.asarray(a, np.float64) for a in
               (qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]))
    scores = np.einsum("bthk,bshk->bhts", q, k) * np.sqrt(4) / 16
    scores = np.where(np.tril(np.ones((6, 6), bool)), scores, -np.inf)
    probs = np.exp(log_softmax(scores))
    expected = np.einsum("bhts,bshk->bthk", probs, v)
    scaled = mup.scale_queries(qkv, WIDE)
    mask = M.causal_mask(jnp.arange(6), jnp.arange(6))[None, None]
    got = M.attend(scaled[:, :, 0], scaled[:, :, 1], scaled[:, :, 2], mask)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    params = M.init_params(WIDE, jax.random.PRNGKey(9))
    np.testing.assert_allclose(M.forward(params, TOKENS, WIDE.replace(kernels="fast")),
                               M.forward(params, TOKENS, WIDE), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- coordinate check


def coordinate_changes(cfg: GPTConfig, seed: int, lr: float, steps: int = 4) -> np.ndarray:
    """mean |x_t - x_0| after `steps` Adam steps on one fixed batch, for x = the embedding
    output, each block's output and the logits (Yang et al.'s coordinate check)."""
    tokens = jax.random.randint(jax.random.PRNGKey(100 + seed), (4, cfg.n_ctx + 1), 0,
                                cfg.vocab_size)
    opt = make_optimizer(plain_adam(lr), steps, model=cfg)

    def activations(params):
        x = M.embed(params, tokens[:, :-1], cfg)
        out = [x]
        for layer in range(cfg.n_layer):
            x = M.block(jax.tree_util.tree_map(lambda a, i=layer: a[i], params["h"]), x, cfg)
            out.append(x)
        return out + [M.logits(params, M.layer_norm(params["ln_f"], x, cfg), cfg)]

    @jax.jit
    def changes(params):
        def step(i, carry):
            p, state = carry
            grads = jax.grad(M.lm_loss)(p, tokens, cfg)
            updates, state = opt.update(grads, state, p, step=i)
            return jax.tree_util.tree_map(jnp.add, p, updates), state

        before = activations(params)
        trained, _ = jax.lax.fori_loop(0, steps, step, (params, opt.init(params)))
        return jnp.stack([jnp.abs(b - a).mean() for a, b in zip(before, activations(trained))])

    return np.asarray(changes(M.init_params(cfg, jax.random.PRNGKey(seed))))


def test_coordinate_check_flat_under_mup_growing_under_standard():
    """Widths 64 to 512 (base 64), 4 Adam steps at lr 1e-2: under muP the change of the
    block outputs and the logits stays within a factor 3 from the narrowest to the widest
    model (measured over seeds 0-3: 0.53 to 1.0); under the standard parametrization the
    blocks' change grows by more than 10x (measured 44x to 82x) and the logits' by more
    than 3x (measured 4.5x to 5.6x). The embedding's change is flat under both."""
    widths = (64, 128, 256, 512)
    ratios = {}
    for parametrization in ("standard", "mup"):
        rows = [coordinate_changes(GPTConfig(
            vocab_size=64, n_ctx=16, n_layer=2, n_head=4, n_embd=width, **NO_DROPOUT,
            scan_layers=False, parametrization=parametrization, mup_base_width=64), seed=0,
            lr=1e-2) for width in widths]
        ratios[parametrization] = rows[-1] / rows[0]  # [embedding, block 1, block 2, logits]
    mup_ratio, standard_ratio = ratios["mup"], ratios["standard"]
    assert np.all((mup_ratio > 1 / 3) & (mup_ratio < 3)), mup_ratio
    assert np.all(standard_ratio[1:3] > 10) and standard_ratio[3] > 3, standard_ratio
    assert 1 / 1.5 < standard_ratio[0] < 1.5


# ----------------------------------------------------------------------------- bad input


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="mup_base_width=30 must be a multiple of n_head=4"):
        WIDE.replace(mup_base_width=30)
    with pytest.raises(ValueError, match="mup_base_width=0 must be a positive int"):
        WIDE.replace(mup_base_width=0)
    with pytest.raises(ValueError, match="parametrization='mup'.*arch='gpt' only"):
        GPTConfig(arch="bert", parametrization="mup", n_embd=64, n_head=4)
    with pytest.raises(ValueError, match="parametrization='fancy' is not one of"):
        WIDE.replace(parametrization="fancy")
    # the standard parametrization ignores the base width
    assert GPTConfig(n_head=12, mup_base_width=128).parametrization == "standard"


def test_ladder_rungs_carry_mup_and_keep_the_heads():
    base = WIDE.replace(n_embd=32, mup_base_width=32)
    rung = model_for(64, LadderConfig(aspect=32), base)
    assert (rung.parametrization, rung.mup_base_width, rung.n_head) == ("mup", 32, 4)
    assert mup.width_multiplier(rung) == 2.0
    with pytest.raises(ValueError, match="head_size=8 with parametrization='mup'"):
        model_for(64, LadderConfig(aspect=32, head_size=8), base)


def test_hugging_face_export_refuses_mup_off_the_base_width():
    from gptjax.hf import config_to_hf

    with pytest.raises(ValueError, match="parametrization='mup' at n_embd=64"):
        config_to_hf(WIDE)
    assert config_to_hf(WIDE.replace(mup_base_width=64))["n_embd"] == 64


# ----------------------------------------------------------------------------- the transfer sweep


def json_load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_fitted_optimum_finds_the_vertex_between_grid_points():
    grid = [2.0 ** e for e in (-11, -10, -9, -8, -7)]
    points = [(lr, (np.log2(lr) + 9.3) ** 2 + 2.0) for lr in grid]
    assert np.log2(fitted_optimum(points)) == pytest.approx(-9.3)
    assert fitted_optimum([(lr, -np.log2(lr)) for lr in grid]) is None  # best at the edge


def test_best_rates_and_table_skip_diverged_runs():
    runs = [{"parametrization": p, "width": w, "lr": lr, "val_loss": loss}
            for p in ("standard", "mup") for w in (32, 64)
            for lr, loss in ((0.25, 3.0), (0.5, 2.5 if w == 32 or p == "mup" else 2.9),
                             (1.0, 2.7 if p == "mup" or w == 32 else 2.6), (2.0, None))]
    best = best_rates(runs)
    assert best["standard"]["32"]["lr"] == 0.5 and best["standard"]["64"]["lr"] == 1.0
    assert best["mup"]["32"]["lr"] == best["mup"]["64"]["lr"] == 0.5
    assert best["standard"]["64"]["fitted_lr"] is None  # its best finite point is the last
    table = format_table({"runs": runs, "best": best})
    assert "diverged" in table and "2.5000*" in table
    assert "standard: best grid rate moves" in table and "mup: best grid rate stays" in table


def test_transfer_settings_are_checked():
    with pytest.raises(ValueError, match="widths: 66 is not a multiple of n_head=4"):
        TransferConfig(widths="64,66")
    with pytest.raises(ValueError, match="give at least two learning rates"):
        TransferConfig(log2_lrs="-9")
    with pytest.raises(ValueError, match="log2_lrs='-9,x' must be comma-separated numbers"):
        TransferConfig(log2_lrs="-9,x")
    assert TransferConfig().lr_list()[0] == 2.0 ** -11 and TransferConfig().base_width == 64


def test_transfer_sweep_end_to_end(tmp_path):
    """Two widths x two rates x both parametrizations on the built-in corpus: every run is
    recorded, JSON and PNG are written, and at the base width muP's runs are the standard
    ones exactly."""
    settings = TransferConfig(widths="16,8", log2_lrs="-8,-5", n_layer=1, n_head=2, n_ctx=8,
                              steps=3, batch_size=2, eval_batches=1, out_dir=str(tmp_path))
    record = run_sweep(settings, quiet=True)
    assert len(record["runs"]) == 8 and all(r["val_loss"] for r in record["runs"])
    loss = {(r["parametrization"], r["width"], r["lr"]): r["val_loss"] for r in record["runs"]}
    for lr in settings.lr_list():
        assert loss["mup", 8, lr] == loss["standard", 8, lr]
        assert loss["mup", 16, lr] != loss["standard", 16, lr]
    assert (tmp_path / "mup_transfer.png").stat().st_size > 0
    assert json_load(tmp_path / "mup_transfer.json")["best"].keys() == {"standard", "mup"}
