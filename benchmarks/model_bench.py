"""Time the jitted forward and forward+backward of a preset on the available backend.

    python benchmarks/model_bench.py                       # gpt2 and tiny, batch 8 x 128 on CPU
    python benchmarks/model_bench.py --preset gpt2 --batch-size 16 --n-ctx 1024   # on a GPU

Prints compile time, median step time (and its spread) and tokens/s for each
configuration. On an NVIDIA GPU it runs in bfloat16 with both `cudnn` and `xla`
attention; elsewhere in float32 with `xla`. `--json FILE` writes the records.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

import gptjax


def time_fn(fn, *args, repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return compile_s, times


def bench(preset, batch_size, n_ctx, dtype, attention, repeats):
    cfg = gptjax.preset(preset).replace(dtype=dtype, attention=attention,
                                        n_ctx=n_ctx or gptjax.preset(preset).n_ctx)
    params = gptjax.init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (batch_size, cfg.n_ctx), 0,
                                cfg.vocab_size)
    forward = jax.jit(lambda p, t: gptjax.logits(p, gptjax.forward(p, t, cfg)))
    grad = jax.jit(jax.value_and_grad(lambda p, t: gptjax.lm_loss(p, t, cfg)))
    records = []
    for name, fn in (("forward", forward), ("forward+backward", grad)):
        compile_s, times = time_fn(fn, params, tokens, repeats=repeats)
        median = statistics.median(times)
        records.append({
            "preset": preset, "pass": name, "batch": batch_size, "n_ctx": cfg.n_ctx,
            "dtype": dtype, "attention": attention, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "compile_s": round(compile_s, 3),
            "median_ms": round(1000 * median, 3),
            "spread_ms": round(1000 * (max(times) - min(times)), 3),
            "tokens_per_s": round(batch_size * cfg.n_ctx / median, 1),
        })
        print(f"{preset:10s} {name:17s} {dtype:8s} {attention:5s} B{batch_size} T{cfg.n_ctx}: "
              f"compile {compile_s:6.2f} s, step {1000 * median:9.2f} ms "
              f"(spread {1000 * (max(times) - min(times)):.2f}), "
              f"{batch_size * cfg.n_ctx / median:,.0f} tokens/s")
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="repeatable (default: gpt2, tiny)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--n-ctx", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    gpu = jax.default_backend() == "gpu"
    presets = args.preset or ["gpt2", "tiny"]
    batch = args.batch_size or (16 if gpu else 8)
    n_ctx = args.n_ctx or (None if gpu else 128)
    variants = [("bfloat16", "cudnn"), ("bfloat16", "xla")] if gpu else [("float32", "xla")]
    records = []
    for preset in presets:
        for dtype, attention in variants:
            records += bench(preset, batch, n_ctx if preset != "tiny" else 64, dtype, attention,
                             args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    jnp.zeros(()).block_until_ready()
    main()
