"""Which fast path earns its place on this backend: the benchmark's training step timed
once per kernel plan, in one process, each plan compiled afresh.

    python benchmarks/kernel_ablation.py [--json FILE] -- BENCH_ARGS...
    python benchmarks/kernel_ablation.py -- --preset gpt2 --n-ctx 1024 --dropout 0 \\
        --batch-size 16 --rounds 2 --steps 10                               # on a GPU

BENCH_ARGS are `python -m gptjax.cli.bench`'s (without --reference). Each plan is a
`gptjax.kernels.Plan`, set for the run by replacing `gptjax.kernels.plan`, which is where
model.py asks; `attention` is "dot_product" off the CPU and "blocked" on it. The table
gives each plan's median step time, tokens/s, MFU (causal formula), the compiled step's
temporary memory, and its step time as a ratio to the first plan's (attention alone, what
"auto" chose on a GPU before this measurement).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax

import gptjax.kernels as kernels
from gptjax.bench import run_benchmark
from gptjax.cli import bench as bench_cli

# Each plan by the kernels it adds to the fast attention.
PLANS = (
    (),
    ("loss",),
    ("layer_norm",),
    ("dense",),
    ("loss", "layer_norm"),
    ("loss", "layer_norm", "dense"),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="", help="write every run's result here")
    args, rest = parser.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    settings = bench_cli.parse(rest)
    if settings.reference:
        parser.error("--reference: time the reference with python -m gptjax.cli.bench")
    attention = "blocked" if jax.default_backend() == "cpu" else "dot_product"
    results = {}
    original = kernels.plan
    try:
        for extra in PLANS:
            name = "+".join(("attention",) + extra)
            fixed = kernels.Plan(attention=attention, **{k: True for k in extra})
            kernels.plan = lambda cfg, backend=None, fixed=fixed: fixed
            # "fast" so that nothing in the run reads kernels "auto" as another plan.
            r = run_benchmark(dataclasses.replace(settings, kernels="fast"))
            r["plan"] = dataclasses.asdict(fixed)
            results[name] = r
            print(f"{name:40s} {r['gptjax']['step_ms']['median']:8.2f} ms", flush=True)
    finally:
        kernels.plan = original
    first = None
    header = ("plan", "step ms", "tok/s", "MFU", "temp GiB", "ratio")
    print("\n{:40s} {:>8s} {:>9s} {:>6s} {:>9s} {:>6s}".format(*header))
    for name, r in results.items():
        j = r["gptjax"]
        ms = j["step_ms"]["median"]
        first = first or ms
        temp = j.get("memory", {}).get("temp_size_mb", float("nan")) / 1024
        print(f"{name:40s} {ms:8.2f} {j['tokens_per_s']:9,.0f} {j['mfu_causal']:6.1%} "
              f"{temp:9.2f} {ms / first:6.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
