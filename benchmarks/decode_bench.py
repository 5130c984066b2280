"""Decoding speed: gptjax.generate against Hugging Face GPT2LMHeadModel.generate.

    python benchmarks/decode_bench.py                       # gpt2 preset, batch 1 and 16
    python benchmarks/decode_bench.py --prompt-len 128 --new-tokens 128 --batch 1 --batch 16

Both run greedy decoding of `--new-tokens` tokens after a `--prompt-len` token prompt of
random ids, with the same random weights (gptjax's `init_params`, copied into the torch
model), in the same process, and tokens/s counts new tokens (prefill included in the time).
Both must decode the same tokens: where they differ, the first differing position of each
row is printed (with gptjax's logits of the two tokens there, to tell a near-tie from a
wrong model) and the command exits with status 1 once every batch size has run.

CPU: torch eager with `torch.set_num_threads(os.cpu_count())` (`--torch-threads`), float32 on
both sides.
GPU: gptjax in bfloat16; HF in bfloat16 with a static KV cache and `torch.compile`
(its fastest documented configuration); bandwidth utilisation is estimated as the bytes a
decode step must read (bf16 weights + the KV cache filled so far) per step time, over the
device's peak bandwidth (`--peak-gbs`, default the H100 SXM's 3350 GB/s).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

import gptjax
from gptjax.generate import generate

_PEAK_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def to_torch_state(params, cfg):
    """gptjax params -> a GPT2LMHeadModel state_dict (lm_head tied to wte)."""
    import torch

    from gptjax.hf import params_to_hf

    named = params_to_hf(cfg, params, prefix="transformer.")
    sd = {k: torch.tensor(v) for k, v in named.items()}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def time_call(fn, repeats):
    fn()  # warm-up: compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_gptjax(params, cfg, prompt, new_tokens, repeats):
    run = lambda: generate(params, cfg, prompt, new_tokens, rng=None,  # noqa: E731
                           temperature=0.0).block_until_ready()
    seconds = time_call(run, repeats)
    return seconds, np.asarray(run())


def bench_hf(model, prompt, new_tokens, repeats, gpu):
    import torch

    ids = torch.from_numpy(prompt.astype(np.int64))
    if gpu:
        ids = ids.cuda()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0, attention_mask=torch.ones_like(ids))
    if gpu:
        kwargs["cache_implementation"] = "static"

    def run():
        with torch.inference_mode():
            out = model.generate(ids, **kwargs)
        if gpu:
            torch.cuda.synchronize()
        return out

    seconds = time_call(run, repeats)
    return seconds, run()[:, prompt.shape[1]:].cpu().numpy()


def token_differences(jax_out, hf_out) -> list[tuple[int, int]]:
    """(row, position) of the first differing new token of each row where the greedy outputs
    of gptjax and HF differ (positions count from the first new token)."""
    if jax_out.shape != hf_out.shape:
        raise ValueError(f"gptjax decoded {jax_out.shape} tokens, HF {hf_out.shape}")
    return [(int(row), int(np.argmax(jax_out[row] != hf_out[row])))
            for row in np.flatnonzero((jax_out != hf_out).any(axis=1))]


def describe_difference(params, cfg, prompt, jax_out, hf_out, row, position) -> str:
    """One line for a differing token, with gptjax's logits of both choices after the
    prefix the two share (a gap near zero is a near-tie that rounding can flip)."""
    prefix = np.concatenate([prompt[row], jax_out[row, :position]])[None].astype(np.int32)
    logits = np.asarray(gptjax.logits(params, gptjax.forward(params, prefix, cfg))[0, -1],
                        dtype=np.float32)
    ours, theirs = int(jax_out[row, position]), int(hf_out[row, position])
    return (f"row {row}, new token {position}: gptjax {ours} (logit {logits[ours]:.6g}), "
            f"HF {theirs} (logit {logits[theirs]:.6g}), gap {logits[ours] - logits[theirs]:.3g}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (1 and 16)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true", help="time gptjax only")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                        help="torch CPU threads (default: the core count; on a machine "
                             "shared with other jobs, 1 can be much faster)")
    parser.add_argument("--peak-gbs", type=float, default=None,
                        help="peak memory bandwidth in GB/s for the utilisation estimate")
    args = parser.parse_args(argv)
    batches = args.batch or [1, 16]

    gpu = jax.default_backend() == "gpu"
    cfg = gptjax.preset(args.preset, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
                        dtype="bfloat16" if gpu else "float32")
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"preset {args.preset} ({gptjax.count_params(params) / 1e6:.1f}M params, {cfg.dtype}), "
          f"prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy")

    model = None
    if not args.no_hf:
        import torch
        import transformers

        if gpu:
            torch.set_float32_matmul_precision("high")
        else:
            torch.set_num_threads(args.torch_threads)
        hf_cfg = transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd,
            n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            # No end-of-text token: with one, min_new_tokens would forbid it in HF's
            # greedy choice but not in gptjax's, and the two could differ on that alone.
            bos_token_id=None, eos_token_id=None)
        model = transformers.GPT2LMHeadModel(hf_cfg).eval()
        model.load_state_dict(to_torch_state(params, cfg))
        if gpu:
            model = model.to("cuda", torch.bfloat16)
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        print(f"torch {torch.__version__} ({'cuda, static cache, compile' if gpu else 'eager'}, "
              f"{torch.get_num_threads()} threads), transformers {transformers.__version__}")

    rng = np.random.default_rng(0)
    print(f"{'batch':>5} {'gptjax tok/s':>13} {'HF tok/s':>10} {'ratio':>7}  tokens")
    differing = []
    for B in batches:
        prompt = rng.integers(0, cfg.vocab_size, (B, args.prompt_len)).astype(np.int32)
        jax_s, jax_out = bench_gptjax(params, cfg, prompt, args.new_tokens, args.repeats)
        jax_tps = B * args.new_tokens / jax_s
        line = f"{B:>5} {jax_tps:>13.1f}"
        if model is not None:
            hf_s, hf_out = bench_hf(model, prompt, args.new_tokens, args.repeats, gpu)
            hf_tps = B * args.new_tokens / hf_s
            rows = token_differences(jax_out, hf_out)
            line += f" {hf_tps:>10.1f} {jax_tps / hf_tps:>6.2f}x  "
            line += f"{len(rows)} of {B} rows differ" if rows else "same"
            differing += [f"batch {B}, " + describe_difference(params, cfg, prompt, jax_out,
                                                               hf_out, row, position)
                          for row, position in rows]
        print(line, flush=True)
        if gpu:
            kind = jax.devices()[0].device_kind
            peak = args.peak_gbs or next((v for k, v in _PEAK_GBS.items() if k in kind), None)
            weight_bytes = 2 * gptjax.count_params(params)  # bf16
            mean_len = args.prompt_len + args.new_tokens / 2
            cache_bytes = 2 * 2 * cfg.n_layer * B * mean_len * cfg.n_embd  # k and v, bf16
            step_s = jax_s / args.new_tokens
            gbs = (weight_bytes + cache_bytes) / step_s / 1e9
            util = f", {gbs / peak:.0%} of {peak:.0f} GB/s" if peak else ""
            print(f"      gptjax reads ~{(weight_bytes + cache_bytes) / 1e6:.0f} MB per step in "
                  f"{step_s * 1e3:.2f} ms: {gbs:.0f} GB/s{util}")
    if differing:
        print("gptjax and HF greedy tokens differ:", *differing, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
