"""KV-cache decoding: cache == full forward, HF greedy parity, sampling filters, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import hf
from gptjax.config import GPTConfig
from gptjax.generate import filter_logits, generate, generated_lengths, sample_logits, stream
from gptjax.model import forward, init_params, logits

jax.config.update("jax_default_matmul_precision", "highest")

SMALL = GPTConfig(vocab_size=97, n_ctx=32, n_layer=2, n_head=2, n_embd=32,
                  embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42]]
N = 8  # new tokens: one value, so that tests share compiled decoders


@pytest.fixture(scope="module")
def small_params():
    return init_params(SMALL, jax.random.PRNGKey(0))


def _full_logits(params, cfg, prompts, new):
    """Uncached logits of each prompt + its new tokens, one right-padded jitted batch
    (right padding cannot change earlier positions under causal attention)."""
    rows = [list(p) + np.asarray(n).tolist() for p, n in zip(prompts, new, strict=True)]
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = row
    return np.asarray(jax.jit(lambda p, t: logits(p, forward(p, t, cfg)))(params, tokens))


@pytest.mark.parametrize("cfg", [
    SMALL,
    SMALL.replace(n_layer=3, attention_band=3),  # layers 0, 2 dense (2 outside the scan), 1 banded
    SMALL.replace(norm="post", attention_band=4, scan_layers=False),
], ids=["pre-LN", "pre-LN-banded", "post-LN-banded"])
def test_cached_decoding_equals_full_forward(cfg):
    """Every step's logits (sampled tokens, prompts of different lengths) equal those of the
    uncached forward pass over prompt + tokens so far; the banded case runs past the band."""
    params = init_params(cfg, jax.random.PRNGKey(1))
    out, step_logits = generate(params, cfg, PROMPTS, N, rng=jax.random.PRNGKey(2),
                                temperature=1.0, return_logits=True)
    assert out.shape == (len(PROMPTS), N) and out.dtype == jnp.int32
    full = _full_logits(params, cfg, PROMPTS, out)
    for b, prompt in enumerate(PROMPTS):
        expected = full[b, len(prompt) - 1: len(prompt) - 1 + N]
        np.testing.assert_allclose(np.asarray(step_logits[b]), expected, atol=2e-5, rtol=1e-5)


def test_right_padded_array_equals_lists_and_same_seed_same_tokens(small_params):
    lengths = [len(p) for p in PROMPTS]
    array = np.full((len(PROMPTS), max(lengths)), 96, np.int32)  # junk past each length
    for b, p in enumerate(PROMPTS):
        array[b, : len(p)] = p

    def run(prompt, seed, **kwargs):
        return np.asarray(generate(small_params, SMALL, prompt, N, rng=jax.random.PRNGKey(seed),
                                   temperature=1.5, **kwargs))

    np.testing.assert_array_equal(run(array, 3, prompt_lengths=lengths), run(PROMPTS, 3))
    assert not np.array_equal(run(PROMPTS, 3), run(PROMPTS, 4))


@pytest.mark.parametrize("family", ["openai-gpt", "gpt2"])
def test_greedy_matches_hf_generate(family, hf_model_factory):
    """Greedy decoding equals transformers' generate(do_sample=False) token for token, for a
    batch of prompts of different lengths decoded together (HF: one prompt at a time)."""
    torch = pytest.importorskip("torch")
    model = hf_model_factory(family)
    cfg = hf.config_from_hf(model.config.to_dict())
    params = hf.params_from_hf(cfg, {k: v.numpy() for k, v in model.state_dict().items()})
    prompts = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46, 26, 43, 38, 32]]
    new = 12
    ours = np.asarray(generate(params, cfg, prompts, new, rng=None, temperature=0.0))
    for b, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            theirs = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        assert ours[b].tolist() == theirs[0, len(prompt):].tolist(), f"prompt {b}"


def test_stream_yields_what_generate_returns_within_top_k(small_params):
    kwargs = dict(rng=jax.random.PRNGKey(7), temperature=2.0, top_k=3, top_p=0.95)
    batch, z = generate(small_params, SMALL, PROMPTS, N, return_logits=True, **kwargs)
    top3 = np.argsort(-np.asarray(z), axis=-1)[..., :3]
    assert (np.asarray(batch)[..., None] == top3).any(-1).all()
    steps = list(stream(small_params, SMALL, PROMPTS, N, **kwargs))
    np.testing.assert_array_equal(np.stack(steps, axis=1), batch)


def test_greedy_and_stop_tokens(small_params):
    """temperature 0 is the argmax; a stop token ends its row, which then repeats it."""
    free, z = generate(small_params, SMALL, PROMPTS, N, rng=None, temperature=0.0,
                       return_logits=True)
    free = np.asarray(free)
    np.testing.assert_array_equal(free, np.argmax(np.asarray(z), axis=-1))
    stop = int(free[0, 2])  # row 0 meets it at step 2 at the latest
    out = np.asarray(generate(small_params, SMALL, PROMPTS, N, rng=None, temperature=0.0,
                              stop_tokens=[stop]))
    lengths = generated_lengths(out, [stop])
    for b in range(len(PROMPTS)):
        n = lengths[b]
        np.testing.assert_array_equal(out[b, :n], free[b, :n])  # same tokens until the stop
        if n < N:
            assert out[b, n - 1] == stop and (out[b, n:] == stop).all()
    assert lengths[0] <= 3
    assert generated_lengths(free, None).tolist() == [N] * len(PROMPTS)
    # A single token-list prompt streams ints, and streaming ends at the stop token.
    steps = list(stream(small_params, SMALL, PROMPTS[0], N, rng=None, temperature=0.0,
                        stop_tokens=[stop]))
    assert steps == out[0, : lengths[0]].tolist()


def _allowed(z, top_k, top_p):
    """The allowed set computed independently in NumPy (float64)."""
    order = np.argsort(-z, kind="stable")
    keep = order[:top_k] if top_k else order
    if top_p is not None:
        p = np.exp(z[keep] - z[keep].max())
        p /= p.sum()
        n = int(np.searchsorted(np.cumsum(p), top_p) + 1)  # smallest prefix of mass >= top_p
        keep = keep[:n]
    return set(keep.tolist())


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.6), (8, 0.5), (None, 1.0)])
def test_top_k_top_p_sample_only_allowed_tokens(top_k, top_p):
    """10,000 draws with a fixed seed: every draw is in the allowed set, and the frequencies
    match the renormalised distribution over it."""
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (50,)) * 2.0, np.float64)
    allowed = _allowed(z, top_k, top_p)
    draws = np.asarray(sample_logits(jnp.tile(jnp.asarray(z, jnp.float32), (10_000, 1)),
                                     jax.random.PRNGKey(1), top_k=top_k, top_p=top_p))
    assert set(draws.tolist()) <= allowed
    idx = np.array(sorted(allowed))
    p = np.exp(z[idx] - z[idx].max())
    p /= p.sum()
    freq = np.array([(draws == i).mean() for i in idx])
    assert np.abs(freq - p).max() < 0.02
    filtered = np.asarray(filter_logits(jnp.asarray(z, jnp.float32)[None], top_k=top_k,
                                        top_p=top_p))[0]
    assert set(np.flatnonzero(np.isfinite(filtered)).tolist()) == allowed


@pytest.mark.parametrize("prompt,kwargs,message", [
    ([], {}, "empty prompt"),
    ([[1, 2], []], {}, "empty prompt"),
    (np.zeros((1, 0), np.int32), {}, "empty prompt"),
    ([[1] * 33], {}, "decoding past the context"),
    ([[1] * 20], {"max_new_tokens": 13}, "decoding past the context"),
    ([[1, 97]], {}, "outside \\[0, 97\\)"),
    ([[-1, 2]], {}, "outside \\[0, 97\\)"),
    ([[1.5, 2.0]], {}, "integer"),
    ([[1, 2]], {"top_p": 0.0}, "top_p"),
    ([[1, 2]], {"top_p": 1.5}, "top_p"),
    ([[1, 2]], {"temperature": -0.1}, "temperature"),
    ([[1, 2]], {"temperature": float("nan")}, "temperature"),
    ([[1, 2]], {"top_k": 0}, "top_k"),
    ([[1, 2]], {"stop_tokens": [97]}, "stop_tokens"),
    (np.ones((2, 4), np.int32), {"prompt_lengths": [4, 0]}, "prompt_lengths"),
    ([[1, 2]], {"max_new_tokens": -1}, "max_new_tokens"),
    ([[1, 2]], {"rng": None}, "rng"),
])
def test_bad_input_is_a_clear_error(small_params, prompt, kwargs, message):
    kwargs = {"max_new_tokens": 4, "rng": jax.random.PRNGKey(0), **kwargs}
    new = kwargs.pop("max_new_tokens")
    with pytest.raises(ValueError, match=message):
        generate(small_params, SMALL, prompt, new, **kwargs)
    with pytest.raises(ValueError, match=message):
        stream(small_params, SMALL, prompt, new, **kwargs)


def test_prompt_exactly_filling_the_context(small_params):
    out = generate(small_params, SMALL, [[1] * (SMALL.n_ctx - N)], N, rng=None, temperature=0)
    assert out.shape == (1, N)
    assert generate(small_params, SMALL, [[1, 2]], 0, rng=None, temperature=0).shape == (1, 0)


def test_stream_text_holds_back_split_characters(monkeypatch):
    """Byte-level tokens can split a character: no piece ends in half of one, the pieces
    join to the decoded text, and decoding stops at <eos>."""
    from gptjax.cli import sample
    from gptjax.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    new = list("añ€!".encode()) + [tok.token_id("<eos>"), 65]
    monkeypatch.setattr(sample, "stream", lambda *args, **kwargs: iter(new))
    cfg = SMALL.replace(vocab_size=tok.vocab_size)
    pieces = list(sample.stream_text(cfg, None, tok, "x", max_new_tokens=8))
    assert pieces == ["a", "ñ", "€", "!"]


def test_a_bert_does_not_generate():
    bert = GPTConfig(arch="bert", vocab_size=97, n_ctx=32, n_layer=1, n_head=2, n_embd=16,
                     norm="post", activation="gelu")
    params = init_params(bert, jax.random.PRNGKey(0))
    for fn in (generate, stream):
        with pytest.raises(ValueError, match="arch='bert'.*fill_mask"):
            result = fn(params, bert, [[1, 2, 3]], 4, rng=None, temperature=0)
            next(iter(result)) if fn is stream else None
