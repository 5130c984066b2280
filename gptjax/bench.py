"""Training speed: time train.py's real step, optionally beside a PyTorch reference.

    python -m gptjax.bench --preset char --batch-size 12 --reference
    python -m gptjax.bench --preset cpu-6x384 --batch-size 8 --reference --json out.json
    python -m gptjax.bench --preset gpt2 --batch-size 16 --n-ctx 1024 --dtype bfloat16 \\
        --dropout 0 --reference --json gpt2.json                          # on a GPU

What is timed (gptjax): the step train.py runs, built the same way: `make_train_step`
over pretrain's loss (`lm_loss(..., train=True)`), `make_optimizer` / `make_schedule`
of the preset's recipe, wrapped by the trainer's `Parallel` (jit with the state
donated), lowered and compiled ahead of time, then called on a fixed batch of
(B, n_ctx + 1) random token ids. Reported: trace and compile seconds, the median
and spread of the step time (each step waited for), the mean step time of an
unsynchronised run of steps (as the training loop runs them), tokens/s, MFU, memory.

The reference (`--reference`, needs torch and transformers): Hugging Face
`GPT2LMHeadModel` of the same shape (GPT2Config from the gptjax config, same dropout),
next-token cross-entropy over the same (B, n_ctx) inputs, `clip_grad_norm_` and
AdamW with decay on weight matrices only, as in gptjax's optimizer. On CPU: eager,
float32, `torch.set_num_threads` = the cores JAX uses, in this process, timed in
rounds alternating with gptjax so both see the same machine load. On a GPU:
bf16 autocast, `torch.compile`, SDPA attention (flash), fused AdamW, TF32 on, in a
subprocess run before JAX starts (the two frameworks keep separate CUDA
libraries and memory pools).

MFU = model FLOPs per step / step time / device peak. Two FLOP counts are given:

    causal (trainer.flops_per_token):  6 N + 6 L T D     per token
    PaLM / nanoGPT convention:         6 N + 12 L T D    per token

N counts the matmul weights (4 D^2 + 2 D F per layer, plus the tied V x D output);
the causal form counts the attention score and value products over the half of
the T x T square the mask keeps, the PaLM form over the whole square. The peak is
the data-sheet dense bf16 figure for known accelerators (H100: 989 TFLOP/s), and on
CPU the best rate of a jitted 1024^3 float32 matmul, measured here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np

from gptjax.config import PRESETS, GPTConfig
from gptjax.model import count_params, init_params, lm_loss
from gptjax.train.optim import OptimConfig, make_optimizer, make_schedule
from gptjax.train.loop import (
    LoopConfig,
    Parallel,
    flops_per_token,
    init_state,
    make_train_step,
)

# The character vocabulary of the built-in corpus (Python's documentation) with the
# reserved special tokens: what train.py's char recipe gives the model.
CHAR_VOCAB = 115
# Presets whose recipe uses the char tokenizer (the model's vocabulary is the tokenizer's).
_CHAR_PRESETS = ("char", "cpu-6x384")


# ----------------------------------------------------------------------------- settings


def bench_config(
    preset: str,
    *,
    n_ctx: int | None = None,
    vocab_size: int | None = None,
    dtype: str | None = None,
    attention: str | None = None,
    scan_layers: bool | None = None,
    remat: bool | None = None,
    dropout: float | None = None,
) -> GPTConfig:
    """The model train.py builds for this preset (the preset, then its recipe's model
    fields), with the benchmark's overrides (None keeps that value)."""
    from gptjax.train.pretrain import RECIPES

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    cfg = PRESETS[preset].replace(
        **{k: v for k, v in RECIPES.get(preset, {}).items() if k in fields})
    if vocab_size is None and preset in _CHAR_PRESETS:
        vocab_size = CHAR_VOCAB
    changes = dict(n_ctx=n_ctx, vocab_size=vocab_size, dtype=dtype, attention=attention,
                   scan_layers=scan_layers, remat=remat)
    if dropout is not None:
        changes.update(embd_pdrop=dropout, attn_pdrop=dropout, resid_pdrop=dropout)
    return cfg.replace(**{k: v for k, v in changes.items() if v is not None})


def recipe_optim(preset: str) -> tuple[OptimConfig, int]:
    """The optimizer settings and step count train.py's recipe gives this preset."""
    from gptjax.train.pretrain import RECIPES

    recipe = RECIPES.get(preset, {})
    fields = {f.name for f in dataclasses.fields(OptimConfig)}
    optim = OptimConfig(**{k: v for k, v in recipe.items() if k in fields})
    return optim, int(recipe.get("steps", max(optim.warmup_steps * 2, 1000)))


def step_flops(cfg: GPTConfig, tokens: int) -> dict[str, float]:
    causal = flops_per_token(cfg)
    palm = causal + 6.0 * cfg.n_layer * cfg.n_ctx * cfg.n_embd
    return {"causal": causal * tokens, "palm": palm * tokens}


def peak_flops(dtype: str = "float32") -> tuple[float, str]:
    """(FLOP/s, where the figure comes from) for the first local device: the data sheet's
    dense bf16 peak, or (CPU) the best rate of a jitted 1024^3 matmul in `dtype` (16-bit
    operands with float32 accumulation, the model's own products), as train.py uses."""
    from gptjax.train.loop import MATMUL_PEAK_N, datasheet_peak_flops, measured_matmul_flops

    peak = datasheet_peak_flops()
    if peak:
        return peak, f"data sheet, dense bf16, {jax.local_devices()[0].device_kind}"
    n = MATMUL_PEAK_N
    return measured_matmul_flops(dtype), f"measured: jitted {n}^3 {dtype} matmul, best of 5"


def _summary(times_s: Sequence[float]) -> dict[str, float]:
    ms = sorted(1e3 * t for t in times_s)
    q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) >= 2 else [ms[0]] * 9
    return {"median": statistics.median(ms), "p10": q[0], "p90": q[-1], "min": ms[0],
            "max": ms[-1], "n": len(ms)}


# ----------------------------------------------------------------------------- runners


class Runner:
    """A compiled training step: `run(n)` returns n per-step times (each step waited for)
    and `run_pipelined(n)` the mean time of n steps dispatched back to back."""

    name = ""
    info: dict

    def step(self) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        raise NotImplementedError

    def run(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.step()
            self.sync()
            times.append(time.perf_counter() - start)
        return times

    def run_pipelined(self, n: int) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(n):
            self.step()
        self.sync()
        return (time.perf_counter() - start) / n

    def memory(self) -> dict:
        return {}


class JaxRunner(Runner):
    """train.py's step: the trainer's Parallel over make_train_step, jit with donation."""

    name = "gptjax"

    def __init__(self, cfg: GPTConfig, batch_size: int, optim: OptimConfig, total_steps: int,
                 seed: int = 0, compiler_options: dict | None = None, name: str = "gptjax"):
        self.cfg, self.name = cfg, name
        optimizer = make_optimizer(optim, total_steps)
        schedule = make_schedule(optim, total_steps)

        def loss_fn(params, batch, rng):  # pretrain.run's loss
            return lm_loss(params, batch["tokens"], cfg, train=True, rng=rng), {}

        loop = LoopConfig(steps=total_steps, batch_size=batch_size, parallel="jit", devices=1,
                          eval_every=0, prefetch=0)
        self.parallel = Parallel(
            lambda axis: make_train_step(loss_fn, optimizer, schedule, axis_name=axis), loop)
        params = init_params(cfg, jax.random.PRNGKey(seed))
        self.n_params = count_params(params)
        self.state = self.parallel.put_state(init_state(params, optimizer, seed))
        del params
        tokens = np.random.default_rng(seed).integers(
            0, cfg.vocab_size, (batch_size, cfg.n_ctx + 1), dtype=np.int32)
        self.batch = self.parallel.put_batch({"tokens": tokens})
        start = time.perf_counter()
        lowered = self.parallel.step.lower(self.state, self.batch)
        traced = time.perf_counter()
        self.compiled = lowered.compile(compiler_options)
        done = time.perf_counter()
        self.info = {"trace_s": traced - start, "compile_s": done - traced,
                     "params": self.n_params}
        self.metrics = None

    def step(self):
        self.state, self.metrics = self.compiled(self.state, self.batch)

    def sync(self):
        jax.block_until_ready((self.state, self.metrics))

    def loss(self) -> float:
        return float(self.metrics["loss"])

    def memory(self) -> dict:
        out = {}
        analysis = self.compiled.memory_analysis()
        if analysis is not None:
            for field in ("argument_size_in_bytes", "output_size_in_bytes",
                          "alias_size_in_bytes", "temp_size_in_bytes",
                          "generated_code_size_in_bytes"):
                value = getattr(analysis, field, None)
                if value is not None:
                    out[field.replace("_in_bytes", "_mb")] = value / 2**20
        stats = jax.local_devices()[0].memory_stats()
        if stats:
            for field in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit"):
                if field in stats:
                    out[field.replace("_bytes", "") + "_mb"] = stats[field] / 2**20
        return out


def torch_gpt2(cfg: GPTConfig, *, attn_implementation: str = "sdpa"):
    """A Hugging Face GPT2LMHeadModel shaped like `cfg` (random weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if cfg.norm != "pre" or cfg.attention_band is not None:
        raise ValueError("the PyTorch reference is GPT-2 (pre-LN, dense attention)")
    activation = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[cfg.activation]
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.mlp_width,
        activation_function=activation, resid_pdrop=cfg.resid_pdrop,
        embd_pdrop=cfg.embd_pdrop, attn_pdrop=cfg.attn_pdrop,
        layer_norm_epsilon=cfg.layer_norm_epsilon, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, attn_implementation=attn_implementation,
    )
    return GPT2LMHeadModel(hf_cfg)


class TorchRunner(Runner):
    """The PyTorch reference step: forward, cross-entropy, backward, clip, AdamW."""

    name = "pytorch"

    def __init__(self, cfg: GPTConfig, batch_size: int, optim: OptimConfig, *,
                 device: str = "cpu", compile: bool = False, bf16: bool = False,
                 threads: int | None = None, seed: int = 0):
        import torch
        import torch.nn.functional as F

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.device = device
        model = torch_gpt2(cfg).to(device)
        model.train()
        decay, no_decay = [], []
        for p in model.parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        kwargs = {"fused": True} if device == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.b1, optim.b2),
                                           eps=optim.eps, **kwargs)
        self.model = model
        forward = torch.compile(model) if compile else model
        tokens = np.random.default_rng(seed).integers(
            0, cfg.vocab_size, (batch_size, cfg.n_ctx + 1), dtype=np.int64)
        x = torch.from_numpy(tokens[:, :-1]).to(device)
        y = torch.from_numpy(tokens[:, 1:]).to(device)
        autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16
                    else contextlib.nullcontext())
        clip = optim.clip_norm
        params = list(model.parameters())

        def step():
            self.optimizer.zero_grad(set_to_none=True)
            with autocast:
                logits = forward(input_ids=x).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            self.optimizer.step()
            self._loss = loss

        self._step = step
        start = time.perf_counter()
        step()  # the first step compiles (torch.compile) and allocates the optimizer state
        self.sync()
        self.info = {"first_step_s": time.perf_counter() - start,
                     "params": sum(p.numel() for p in params),
                     "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "device": device, "compile": compile,
                     "autocast": "bfloat16" if bf16 else None,
                     "attention": model.config._attn_implementation,
                     "optimizer": "AdamW " + ("fused" if device == "cuda" else "foreach")}
        if device == "cuda":
            self.info["device_name"] = torch.cuda.get_device_name()

    def step(self):
        self._step()

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def loss(self) -> float:
        return float(self._loss.detach())

    def memory(self) -> dict:
        if self.device != "cuda":
            return {}
        return {"peak_mb": self.torch.cuda.max_memory_allocated() / 2**20,
                "reserved_mb": self.torch.cuda.max_memory_reserved() / 2**20}


# ----------------------------------------------------------------------------- measurement


def measure(runners: Sequence[Runner], *, rounds: int, steps: int, warmup: int) -> dict:
    """Time the runners in alternating rounds (A B, B A, A B, ...), so that a change of
    machine load falls on both. The first step of each round is dropped (thread pools
    of the other framework may still be spinning down)."""
    for runner in runners:
        runner.run(warmup)
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    pipelined: dict[str, list[float]] = {r.name: [] for r in runners}
    for round_ in range(rounds):
        order = runners if round_ % 2 == 0 else list(reversed(runners))
        for runner in order:
            runner.run(1)
            times[runner.name] += runner.run(steps)
            pipelined[runner.name].append(runner.run_pipelined(steps))
    return {r.name: {"step_ms": _summary(times[r.name]),
                     "pipelined_step_ms": 1e3 * statistics.median(pipelined[r.name])}
            for r in runners}


def _figures(step_ms: float, tokens: int, flops: dict, peak: float) -> dict:
    seconds = step_ms / 1e3
    return {"tokens_per_s": tokens / seconds,
            "mfu_causal": flops["causal"] / seconds / peak,
            "mfu_palm": flops["palm"] / seconds / peak}


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _torch_cuda() -> bool:
    """Whether the reference would run on a GPU (asked of torch: JAX's GPU backend must not
    start before the reference has run, or it would hold most of the GPU's memory)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def reference_in_subprocess(args: argparse.Namespace, *, device: str, dtype: str | None) -> dict:
    """Run the reference alone in a fresh process (JAX kept off the GPU there) and read
    its JSON."""
    import tempfile

    settings = {"--preset": args.preset, "--batch-size": args.batch_size,
                "--n-ctx": args.n_ctx, "--vocab-size": args.vocab_size, "--dtype": dtype,
                "--dropout": args.dropout, "--steps": args.steps, "--rounds": args.rounds,
                "--warmup": args.warmup, "--threads": args.threads, "--ref-device": device}
    cmd = [sys.executable, "-m", "gptjax.bench", "--reference-only"]
    for flag, value in settings.items():
        if value is not None:
            cmd += [flag, str(value)]
    for flag, value in (("compile", args.ref_compile), ("bf16", args.ref_bf16)):
        if value is not None:
            cmd.append(f"--ref-{flag}" if value else f"--no-ref-{flag}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "reference.json")
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        subprocess.run(cmd + ["--json", out], check=True, env=env)
        with open(out) as f:
            return json.load(f)["pytorch"]


def _reference_kwargs(args, cfg: GPTConfig, device: str, threads: int) -> dict:
    return dict(device=device, threads=threads,
                compile=device == "cuda" if args.ref_compile is None else args.ref_compile,
                bf16=cfg.dtype != "float32" if args.ref_bf16 is None else args.ref_bf16)


def _model(args, dtype: str | None) -> GPTConfig:
    return bench_config(args.preset, n_ctx=args.n_ctx, vocab_size=args.vocab_size,
                        dtype=dtype, attention=args.attention, scan_layers=args.scan,
                        remat=args.remat, dropout=args.dropout)


def run_benchmark(args: argparse.Namespace) -> dict:
    """Everything `python -m gptjax.bench` measures, as one JSON-ready dict."""
    threads = args.threads or _threads()
    optim, total_steps = recipe_optim(args.preset)
    if args.reference_only:  # the child of reference_in_subprocess: torch alone
        cfg = _model(args, args.dtype)
        runner = TorchRunner(cfg, args.batch_size, optim,
                             **_reference_kwargs(args, cfg, args.ref_device, threads))
        timed = measure([runner], rounds=args.rounds, steps=args.steps, warmup=args.warmup)
        return {"pytorch": {**runner.info, **timed["pytorch"], "memory": runner.memory(),
                            "loss": runner.loss()}}

    load_start = _load()
    reference = None
    ref_on_gpu = args.reference and _torch_cuda()
    if args.reference and (ref_on_gpu or args.ref_process):
        ref_dtype = args.dtype or ("bfloat16" if ref_on_gpu else None)
        reference = reference_in_subprocess(args, device="cuda" if ref_on_gpu else "cpu",
                                            dtype=ref_dtype)

    backend = jax.default_backend()
    dtype = args.dtype
    if dtype is None and backend in ("gpu", "tpu"):
        dtype = "bfloat16"  # DESIGN: bfloat16 compute on accelerators, float32 on CPU
    cfg = _model(args, dtype)
    tokens = args.batch_size * cfg.n_ctx
    flops = step_flops(cfg, tokens)
    peak, peak_source = peak_flops(cfg.dtype)
    result = {
        "preset": args.preset, "batch_size": args.batch_size, "n_ctx": cfg.n_ctx,
        "tokens_per_step": tokens, "model": cfg.to_dict(), "flops_per_step": flops,
        "peak_flops": peak, "peak_source": peak_source,
        "host": {"machine": platform.machine(), "processor": platform.processor(),
                 "cores": threads, "load_avg_start": load_start},
        "backend": backend, "device_kind": jax.local_devices()[0].device_kind,
        "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    jax_runner = JaxRunner(cfg, args.batch_size, optim, total_steps)
    result["gptjax"] = dict(jax_runner.info)
    runners: list[Runner] = [jax_runner]
    if args.reference and reference is None:
        runners.append(TorchRunner(cfg, args.batch_size, optim,
                                   **_reference_kwargs(args, cfg, "cpu", threads)))
    if args.compile_only:
        runners = []
        result["gptjax"]["memory"] = jax_runner.memory()
    measured = measure(runners, rounds=args.rounds, steps=args.steps, warmup=args.warmup)
    for runner in runners:
        entry = result.setdefault(runner.name, {})
        entry.update(runner.info)
        entry.update(measured[runner.name])
        entry["memory"] = runner.memory()
        entry["loss"] = runner.loss()
    if reference is not None:
        result["pytorch"] = reference
    for name in ("gptjax", "pytorch"):
        if "step_ms" in result.get(name, {}):
            result[name].update(_figures(result[name]["step_ms"]["median"], tokens, flops,
                                         peak))
    if "step_ms" in result.get("pytorch", {}) and "step_ms" in result["gptjax"]:
        jax_ms = result["gptjax"]["step_ms"]["median"]
        ref_ms = result["pytorch"]["step_ms"]["median"]
        result["step_time_ratio"] = jax_ms / ref_ms
        result["speedup"] = ref_ms / jax_ms
        result["pipelined_speedup"] = (result["pytorch"]["pipelined_step_ms"]
                                       / result["gptjax"]["pipelined_step_ms"])
    result["host"]["load_avg_end"] = _load()
    result["host"]["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gptjax.bench",
        description="Time train.py's training step (and a PyTorch reference with "
        "--reference). See the module docstring for what is measured.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="char", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--n-ctx", type=int, default=None, help="context (default: the preset's)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"default: the preset's; {CHAR_VOCAB} (the built-in corpus' char "
                   f"vocabulary) for {', '.join(_CHAR_PRESETS)}")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: bfloat16 on a GPU or TPU, else the preset's)")
    p.add_argument("--attention", default=None, choices=["auto", "xla", "cudnn"])
    p.add_argument("--scan", default=None, action=argparse.BooleanOptionalAction,
                   help="scan_layers (default: the preset's)")
    p.add_argument("--remat", default=None, action=argparse.BooleanOptionalAction)
    p.add_argument("--dropout", type=float, default=None,
                   help="set all three dropout rates (default: the preset's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    p.add_argument("--reference", action="store_true",
                   help="also time the PyTorch reference (needs torch + transformers)")
    p.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ref-device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--ref-process", action="store_true",
                   help="run the reference in a separate process, before gptjax (always so on "
                   "a GPU); on CPU the default runs both in one process, in alternating rounds")
    p.add_argument("--ref-compile", default=None, action=argparse.BooleanOptionalAction,
                   help="torch.compile the reference (default: on GPU only)")
    p.add_argument("--ref-bf16", default=None, action=argparse.BooleanOptionalAction,
                   help="bf16 autocast in the reference (default: when --dtype is 16-bit)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads on CPU (default: the cores this process may use, "
                   "which is what XLA's CPU thread pool uses)")
    p.add_argument("--compile-only", action="store_true",
                   help="only trace and compile the gptjax step")
    p.add_argument("--cache-dir", default=None,
                   help="JAX persistent compilation cache folder (compile_s then shows a "
                   "cache hit on the second run)")
    p.add_argument("--json", default=None, help="write the results here")
    return p


def _report(result: dict) -> str:
    lines = [f"{result['preset']}: batch {result['batch_size']} x {result['n_ctx']}, "
             f"{result['model']['dtype']}, {result['backend']} "
             f"({result['device_kind']}, {result['host']['cores']} threads), load "
             f"{result['host']['load_avg_start']}"]
    if "peak_flops" in result:
        lines.append(f"  peak {result['peak_flops'] / 1e12:.3f} TFLOP/s "
                     f"({result['peak_source']})")
    for name in ("gptjax", "pytorch"):
        r = result.get(name)
        if not r:
            continue
        parts = [f"  {name:8s}"]
        if "compile_s" in r:
            parts.append(f"trace {r['trace_s']:.2f}s compile {r['compile_s']:.2f}s")
        if "first_step_s" in r:
            parts.append(f"first step {r['first_step_s']:.2f}s")
        if "step_ms" in r:
            s = r["step_ms"]
            parts.append(f"step {s['median']:.2f} ms (p10 {s['p10']:.2f}, p90 "
                         f"{s['p90']:.2f}, n {s['n']}), pipelined "
                         f"{r['pipelined_step_ms']:.2f} ms")
        if "tokens_per_s" in r:
            parts.append(f"{r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu_causal']:.1f}% "
                         f"causal / {100 * r['mfu_palm']:.1f}% PaLM")
        mem = r.get("memory", {})
        if "peak_bytes_in_use_mb" in mem or "peak_mb" in mem:
            parts.append(f"peak mem {mem.get('peak_bytes_in_use_mb', mem.get('peak_mb')):.0f}"
                         " MiB")
        lines.append(", ".join(parts))
    if "speedup" in result:
        lines.append(f"  gptjax / pytorch step time {result['step_time_ratio']:.3f} "
                     f"(speed-up {result['speedup']:.2f}x, pipelined "
                     f"{result['pipelined_speedup']:.2f}x)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    result = run_benchmark(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if not args.reference_only:
        print(_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
