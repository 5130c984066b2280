"""Training speed: time train.py's real step, optionally beside a PyTorch reference.

    python -m gptjax.cli.bench --preset char --batch-size 12 --reference
    python -m gptjax.cli.bench --preset cpu-6x384 --batch-size 8 --reference --json out.json
    python -m gptjax.cli.bench --preset gpt2 --batch-size 16 --n-ctx 1024 --dtype bfloat16 \\
        --dropout 0 --reference --json gpt2.json                          # on a GPU

The settings are `BenchConfig`'s fields; the command line is gptjax.cli.bench.

What is timed (gptjax): the step train.py runs, built the same way: `make_train_step`
over pretrain's loss (`lm_loss(..., train=True)`) with the model train.py builds for the
preset (kernels "auto" unless --kernels says otherwise), `make_optimizer` /
`make_schedule` of the preset's recipe, run by the trainer's one-device runner
(`make_runner`: jit with the state donated), lowered and compiled ahead of time, then
called on a fixed batch of (B, n_ctx + 1) random token ids. Reported: trace and compile
seconds, the median and spread of the step time (each step waited for), the mean step
time of an unsynchronised run of steps (as the training loop runs them), tokens/s, MFU,
memory.

The reference (`--reference`, needs torch and transformers): Hugging Face
`GPT2LMHeadModel` of the same shape (GPT2Config from the gptjax config, same dropout),
next-token cross-entropy over the same (B, n_ctx) inputs, `clip_grad_norm_` and
AdamW with decay on weight matrices only, as in gptjax's optimizer, in the same precision
as gptjax: float32 against float32, and bf16 (fp16) autocast against a bfloat16 (float16)
gptjax model, never one against the other. PyTorch at its best: every variant torch offers
here is timed, eager and `torch.compile` (of the forward pass and the loss; where it
fails, for example inductor without a C++ compiler on a CPU, the reason is reported as
"torch.compile: unavailable (...)" and the eager variants stand), each with AdamW
`foreach` and `fused`; the ratios are taken against the fastest variant, whose name the
results record. On CPU: `torch.set_num_threads` = the cores JAX uses, in this process,
timed in rounds alternating with gptjax so all see the same machine load. On a GPU:
SDPA attention (flash), TF32 on, in a subprocess run before JAX starts (the two frameworks
keep separate CUDA libraries and memory pools).

MFU = model FLOPs per step / step time / device peak. Two FLOP counts are given:

    causal (train.flops.flops_per_token):  6 N + 6 L T D     per token
    PaLM / nanoGPT convention:             6 N + 12 L T D    per token

N counts the matmul weights (4 D^2 + 2 D F per layer, plus the tied V x D output);
the causal form counts the attention score and value products over the half of
the T x T square the mask keeps, the PaLM form over the whole square. The peak is
the data-sheet dense bf16 figure for known accelerators (H100: 989 TFLOP/s), and on
CPU the best rate of a jitted 1024^3 float32 matmul, measured here.
"""

from __future__ import annotations

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
from dataclasses import dataclass

import jax
import numpy as np

from gptjax.config import PRESETS, GPTConfig
from gptjax.model import count_params, init_params, lm_loss
from gptjax.train.flops import flops_per_token
from gptjax.train.loop import LoopConfig
from gptjax.train.optim import OptimConfig, make_optimizer, make_schedule
from gptjax.train.runners import make_runner
from gptjax.train.step import init_state, make_train_step

# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class BenchConfig:
    """What to time, and how."""

    # Model preset; train.py's recipe for it gives the optimizer.
    preset: str = "char"
    # Sequences per step.
    batch_size: int = 12
    # Context (None: the preset's).
    n_ctx: int | None = None
    # Vocabulary (None: the preset's; 115, the built-in corpus' characters, for the
    # presets whose recipe uses the char tokenizer).
    vocab_size: int | None = None
    # Compute dtype (None: bfloat16 on a GPU or TPU, else the preset's).
    dtype: str | None = None
    # Which implementation runs the model (GPTConfig.kernels); "auto" as train.py.
    kernels: str = "auto"
    # Implementation of jax.nn.dot_product_attention (None: the preset's).
    attention: str | None = None
    # Scan over the layers (None: the preset's scan_layers).
    scan: bool | None = None
    # Rematerialise each block in the backward pass (None: the preset's).
    remat: bool | None = None
    # All three dropout rates (None: the preset's).
    dropout: float | None = None
    # Timed steps per round.
    steps: int = 20
    # Rounds, alternating between gptjax and the reference.
    rounds: int = 5
    # Untimed steps after compiling.
    warmup: int = 3
    # Also time the PyTorch reference (needs torch and transformers).
    reference: bool = False
    # Run the reference in a separate process before gptjax (always so on a GPU); on a
    # CPU both run in this process by default, in alternating rounds.
    ref_process: bool = False
    # torch.compile the reference: None times it both eager and compiled (compiled where
    # torch.compile works here), true compiled only, false eager only. The reference's
    # precision is not a setting: it is always gptjax's (autocast for 16-bit dtypes).
    ref_compile: bool | None = None
    # The reference's AdamW implementation: "all" times each torch has for the device
    # (foreach, fused); "foreach" or "fused" only that one.
    ref_adamw: str = "all"
    # Torch threads on a CPU (None: the cores this process may use, as XLA's CPU pool).
    threads: int | None = None
    # Only trace and compile the gptjax step.
    compile_only: bool = False
    # JAX's persistent compilation cache folder ("" = none; a second run then shows a
    # cache hit in compile_s).
    cache_dir: str = ""
    # Write the results to this JSON file ("" = print only).
    json: str = ""

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        for name in ("batch_size", "steps", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup} must be >= 0")
        if self.ref_adamw not in REF_ADAMW:
            raise ValueError(f"ref_adamw={self.ref_adamw!r}; choose one of {REF_ADAMW}")


# The reference's AdamW implementations (torch.optim.AdamW's foreach= and fused=).
ADAMW_IMPLS = ("foreach", "fused")
REF_ADAMW = ("all", *ADAMW_IMPLS)


# The character vocabulary of the built-in corpus (Python's documentation) with the
# reserved special tokens: what train.py's char recipe gives the model.
CHAR_VOCAB = 115
# Presets whose recipe uses the char tokenizer (the model's vocabulary is the tokenizer's).
CHAR_PRESETS = ("char", "cpu-6x384")


def bench_config(
    preset: str,
    *,
    n_ctx: int | None = None,
    vocab_size: int | None = None,
    dtype: str | None = None,
    kernels: str = "auto",
    attention: str | None = None,
    scan_layers: bool | None = None,
    remat: bool | None = None,
    dropout: float | None = None,
) -> GPTConfig:
    """The model train.py builds for this preset (`pretrain.preset_settings`: the preset,
    then its recipe's model fields), with the benchmark's overrides (None keeps that
    value)."""
    from gptjax.train.pretrain import preset_settings

    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    cfg = GPTConfig(**{k: v for k, v in preset_settings(preset).items() if k in fields})
    if vocab_size is None and preset in CHAR_PRESETS:
        vocab_size = CHAR_VOCAB
    changes = dict(n_ctx=n_ctx, vocab_size=vocab_size, dtype=dtype, kernels=kernels,
                   attention=attention, scan_layers=scan_layers, remat=remat)
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
    from gptjax.train.flops import MATMUL_PEAK_N, datasheet_peak_flops, measured_matmul_flops

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
    """train.py's step: the trainer's jit runner over make_train_step, with donation."""

    name = "gptjax"

    def __init__(self, cfg: GPTConfig, batch_size: int, optim: OptimConfig, total_steps: int,
                 seed: int = 0, compiler_options: dict | None = None, name: str = "gptjax"):
        self.cfg, self.name = cfg, name
        optimizer = make_optimizer(optim, total_steps, model=cfg)
        schedule = make_schedule(optim, total_steps)

        def loss_fn(params, batch, rng):  # pretrain.run's loss
            return lm_loss(params, batch["tokens"], cfg, train=True, rng=rng), {}

        loop = LoopConfig(steps=total_steps, batch_size=batch_size, parallel="jit", devices=1,
                          eval_every=0, prefetch=0)
        self.parallel = make_runner(
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
    """The PyTorch reference step: forward, cross-entropy, backward, clip, AdamW.

    One variant: `compile` wraps the forward pass and the loss in `torch.compile` (the
    backward is compiled with it, by AOTAutograd); `adamw` is "foreach" or "fused";
    `autocast` is None (float32) or the 16-bit dtype gptjax computes in. The first step
    runs here (it compiles and allocates the optimizer state), so a variant torch cannot
    run fails here."""

    def __init__(self, cfg: GPTConfig, batch_size: int, optim: OptimConfig, *,
                 device: str = "cpu", compile: bool = False, adamw: str = "foreach",
                 autocast: str | None = None, threads: int | None = None, seed: int = 0):
        import torch
        import torch.nn.functional as F

        if adamw not in ADAMW_IMPLS:
            raise ValueError(f"adamw={adamw!r}; choose one of {ADAMW_IMPLS}")
        self.torch = torch
        self.name = variant_name(compile, adamw)
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
        self.optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.b1, optim.b2),
                                           eps=optim.eps, **{adamw: True})
        self.model = model
        tokens = np.random.default_rng(seed).integers(
            0, cfg.vocab_size, (batch_size, cfg.n_ctx + 1), dtype=np.int64)
        x = torch.from_numpy(tokens[:, :-1]).to(device)
        y = torch.from_numpy(tokens[:, 1:]).to(device)
        mixed = (torch.autocast(device_type=device, dtype=getattr(torch, autocast))
                 if autocast else contextlib.nullcontext())

        def forward_loss(x, y):
            with mixed:
                logits = model(input_ids=x).logits
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

        forward = torch.compile(forward_loss) if compile else forward_loss
        clip = optim.clip_norm
        params = list(model.parameters())

        def step():
            self.optimizer.zero_grad(set_to_none=True)
            loss = forward(x, y)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            self.optimizer.step()
            self._loss = loss

        self._step = step
        start = time.perf_counter()
        step()  # the first step compiles (torch.compile) and allocates the optimizer state
        self.sync()
        self.info = {"first_step_s": time.perf_counter() - start, "compile": compile,
                     "optimizer": f"AdamW {adamw}"}
        # What every variant shares (the reference's entry carries it once).
        self.shared = {"params": sum(p.numel() for p in params), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "device": device,
                       "dtype": cfg.dtype, "autocast": autocast,
                       "attention": model.config._attn_implementation}
        if device == "cuda":
            self.shared["device_name"] = torch.cuda.get_device_name()

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


def variant_name(compile: bool, adamw: str) -> str:
    """A reference variant's key in the results: "eager+foreach", "compile+fused", ..."""
    return f"{'compile' if compile else 'eager'}+{adamw}"


def _reason(error: BaseException) -> str:
    """An exception as one short line for the results ("Type: first line")."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")
    return text if len(text) <= 300 else text[:297] + "..."


def reference_runners(cfg: GPTConfig, batch_size: int, optim: OptimConfig, *,
                      device: str, threads: int | None, compile: bool | None = None,
                      adamw: str = "all") -> tuple[list[TorchRunner], dict]:
    """Every requested variant of the reference that runs here, and what could not run:
    ({...}["torch_compile"], ["adamw_fused"]: "available", "not requested" or
    "unavailable (<reason>)"; a variant failing for another reason under "failed"). If
    nothing asked for runs (compiled only without a working torch.compile, fused only
    without a fused AdamW), the eager variant is timed instead, with the AdamW asked for
    where it runs, else foreach; the reasons say why."""
    autocast = None if cfg.dtype == "float32" else cfg.dtype
    kinds = [False, True] if compile is None else [compile]
    impls = list(ADAMW_IMPLS) if adamw == "all" else [adamw]
    status = {"torch_compile": "available" if True in kinds else "not requested",
              "adamw_fused": "available" if "fused" in impls else "not requested"}
    runners: list[TorchRunner] = []

    def add(compiled: bool, impl: str) -> None:
        runners.append(TorchRunner(cfg, batch_size, optim, device=device, compile=compiled,
                                   adamw=impl, autocast=autocast, threads=threads))

    for compiled in kinds:
        for impl in impls:
            if (compiled and status["torch_compile"] != "available") or (
                    impl == "fused" and status["adamw_fused"] != "available"):
                continue
            try:
                add(compiled, impl)
            except Exception as error:  # report why this variant cannot run; time the rest
                if not compiled and impl == "foreach":
                    raise  # the baseline torch always has: its failure is a bug
                reason = f"unavailable ({_reason(error)})"
                if compiled and not any(r.info["compile"] for r in runners):
                    status["torch_compile"] = reason
                elif impl == "fused" and not any(r.info["optimizer"] == "AdamW fused"
                                                 for r in runners):
                    status["adamw_fused"] = reason
                else:
                    status.setdefault("failed", {})[variant_name(compiled, impl)] = reason
    if not runners and impls == ["fused"] and status["adamw_fused"] == "available":
        try:
            add(False, "fused")
        except Exception as error:  # fused AdamW cannot run either: foreach below
            status["adamw_fused"] = f"unavailable ({_reason(error)})"
    if not runners:
        add(False, "foreach")
    return runners, status


def reference_results(runners: Sequence[TorchRunner], measured: dict, status: dict) -> dict:
    """The reference's entry in the results: what the variants share, each variant's
    figures under "variants", and the fastest variant (by median step time) named in
    "best" with its figures also at the top level."""
    variants = {}
    for runner in runners:
        variants[runner.name] = {**runner.info, **measured[runner.name],
                                 "memory": runner.memory(), "loss": runner.loss()}
    best = min(variants, key=lambda name: variants[name]["step_ms"]["median"])
    best_pipelined = min(variants, key=lambda name: variants[name]["pipelined_step_ms"])
    return {**runners[0].shared, **status, **variants[best], "best": best,
            "best_pipelined": best_pipelined, "variants": variants}


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


def not_comparable(dtype: str, backend: str, reference: dict) -> str:
    """Why gptjax's figures cannot be set against the reference's ("" if they can): a
    ratio needs the same precision and the same kind of device."""
    if reference["dtype"] != dtype:
        return (f"gptjax computes in {dtype}, the reference in {reference['dtype']}: "
                "speed is compared only at the same precision")
    if (reference["device"] == "cuda") != (backend == "gpu"):
        return f"gptjax runs on {backend}, the reference on {reference['device']}"
    return ""


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


# The child process of reference_in_subprocess: BenchConfig's fields and the device in one
# JSON file (argv[1]), the reference's results written to another (argv[2]).
_CHILD = (
    "import json, sys\n"
    "from gptjax.bench import BenchConfig, measure_reference\n"
    "given = json.load(open(sys.argv[1]))\n"
    "device = given.pop('device')\n"
    "json.dump(measure_reference(BenchConfig(**given), device), open(sys.argv[2], 'w'))\n"
)


def reference_in_subprocess(settings: BenchConfig, *, device: str) -> dict:
    """`measure_reference` alone in a fresh process (JAX kept off the GPU there)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        given, out = os.path.join(tmp, "settings.json"), os.path.join(tmp, "reference.json")
        with open(given, "w") as f:
            json.dump({**dataclasses.asdict(settings), "device": device}, f)
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        subprocess.run([sys.executable, "-c", _CHILD, given, out], check=True, env=env)
        with open(out) as f:
            return json.load(f)


def measure_reference(settings: BenchConfig, device: str) -> dict:
    """The PyTorch reference's figures (every variant, the best named), timed alone (JAX
    is not used)."""
    cfg = _model(settings, settings.dtype)
    optim, _ = recipe_optim(settings.preset)
    runners, status = reference_runners(cfg, settings.batch_size, optim,
                                        **_reference_kwargs(settings, device))
    timed = measure(runners, rounds=settings.rounds, steps=settings.steps,
                    warmup=settings.warmup)
    return reference_results(runners, timed, status)


def _reference_kwargs(settings: BenchConfig, device: str) -> dict:
    return dict(device=device, threads=settings.threads or _threads(),
                compile=settings.ref_compile, adamw=settings.ref_adamw)


def _model(settings: BenchConfig, dtype: str | None) -> GPTConfig:
    return bench_config(settings.preset, n_ctx=settings.n_ctx, vocab_size=settings.vocab_size,
                        dtype=dtype, kernels=settings.kernels, attention=settings.attention,
                        scan_layers=settings.scan, remat=settings.remat,
                        dropout=settings.dropout)


def run_benchmark(settings: BenchConfig) -> dict:
    """Everything `python -m gptjax.cli.bench` measures, as one JSON-ready dict."""
    optim, total_steps = recipe_optim(settings.preset)
    load_start = _load()
    reference = None
    ref_on_gpu = settings.reference and _torch_cuda()
    if settings.reference and (ref_on_gpu or settings.ref_process):
        ref_dtype = settings.dtype or ("bfloat16" if ref_on_gpu else None)
        reference = reference_in_subprocess(dataclasses.replace(settings, dtype=ref_dtype),
                                            device="cuda" if ref_on_gpu else "cpu")

    backend = jax.default_backend()
    dtype = settings.dtype
    if dtype is None and backend in ("gpu", "tpu"):
        dtype = "bfloat16"  # DESIGN: bfloat16 compute on accelerators, float32 on CPU
    cfg = _model(settings, dtype)
    tokens = settings.batch_size * cfg.n_ctx
    flops = step_flops(cfg, tokens)
    peak, peak_source = peak_flops(cfg.dtype)
    result = {
        "preset": settings.preset, "batch_size": settings.batch_size, "n_ctx": cfg.n_ctx,
        "tokens_per_step": tokens, "model": cfg.to_dict(), "flops_per_step": flops,
        "peak_flops": peak, "peak_source": peak_source,
        "host": {"machine": platform.machine(), "processor": platform.processor(),
                 "cores": settings.threads or _threads(), "load_avg_start": load_start},
        "backend": backend, "device_kind": jax.local_devices()[0].device_kind,
        "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    jax_runner = JaxRunner(cfg, settings.batch_size, optim, total_steps)
    result["gptjax"] = dict(jax_runner.info)
    runners: list[Runner] = [jax_runner]
    ref_runners, ref_status = [], {}
    if settings.compile_only:
        runners = []
        result["gptjax"]["memory"] = jax_runner.memory()
    elif settings.reference and reference is None:
        ref_runners, ref_status = reference_runners(cfg, settings.batch_size, optim,
                                                    **_reference_kwargs(settings, "cpu"))
        runners += ref_runners
    measured = measure(runners, rounds=settings.rounds, steps=settings.steps,
                       warmup=settings.warmup)
    if runners:
        result["gptjax"].update(measured["gptjax"], memory=jax_runner.memory(),
                                loss=jax_runner.loss())
    if ref_runners:
        reference = reference_results(ref_runners, measured, ref_status)
    if reference is not None:
        result["pytorch"] = reference
        for entry in (reference, *reference["variants"].values()):
            entry.update(_figures(entry["step_ms"]["median"], tokens, flops, peak))
    if "step_ms" in result["gptjax"]:
        result["gptjax"].update(_figures(result["gptjax"]["step_ms"]["median"], tokens, flops,
                                         peak))
    if reference is not None and "step_ms" in result["gptjax"]:
        mismatch = not_comparable(cfg.dtype, backend, reference)
        if mismatch:
            result["no_ratio"] = mismatch
        else:
            ours = result["gptjax"]
            best_pipelined = reference["variants"][reference["best_pipelined"]]
            result["step_time_ratio"] = ours["step_ms"]["median"] / reference["step_ms"]["median"]
            result["speedup"] = 1 / result["step_time_ratio"]
            result["pipelined_speedup"] = (best_pipelined["pipelined_step_ms"]
                                           / ours["pipelined_step_ms"])
    result["host"]["load_avg_end"] = _load()
    result["host"]["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ----------------------------------------------------------------------------- report


def report(result: dict) -> str:
    """The results as a few lines of text: gptjax, each reference variant (the fastest
    marked), what could not run and why, and the ratio against the fastest."""
    lines = [f"{result['preset']}: batch {result['batch_size']} x {result['n_ctx']}, "
             f"{result['model']['dtype']}, {result['backend']} "
             f"({result['device_kind']}, {result['host']['cores']} threads), load "
             f"{result['host']['load_avg_start']}"]
    if "peak_flops" in result:
        lines.append(f"  peak {result['peak_flops'] / 1e12:.3f} TFLOP/s "
                     f"({result['peak_source']})")
    if "gptjax" in result:
        lines.append(_report_line("gptjax", result["gptjax"]))
    ref = result.get("pytorch")
    if ref:
        precision = f"{ref['autocast']} autocast" if ref.get("autocast") else ref["dtype"]
        lines.append(f"  pytorch: torch {ref['torch']}, {ref['device']}, {precision}, "
                     f"{ref['threads']} threads, {ref['attention']} attention")
        for name, variant in ref["variants"].items():
            mark = " [best]" if name == ref["best"] else ""
            lines.append(_report_line(f"pytorch {name}{mark}", variant))
        for key, what in (("torch_compile", "torch.compile"), ("adamw_fused", "AdamW fused")):
            if ref.get(key, "").startswith("unavailable"):
                lines.append(f"  {what}: {ref[key]}")
        for name, why in ref.get("failed", {}).items():
            lines.append(f"  pytorch {name}: {why}")
    if "speedup" in result:
        lines.append(f"  gptjax / best pytorch ({ref['best']}) step time "
                     f"{result['step_time_ratio']:.3f} (speed-up {result['speedup']:.2f}x, "
                     f"pipelined {result['pipelined_speedup']:.2f}x against "
                     f"{ref['best_pipelined']})")
    if "no_ratio" in result:
        lines.append(f"  no ratio: {result['no_ratio']}")
    return "\n".join(lines)


def _report_line(name: str, r: dict) -> str:
    parts = []
    if "compile_s" in r:
        parts.append(f"trace {r['trace_s']:.2f}s compile {r['compile_s']:.2f}s")
    if "first_step_s" in r:
        parts.append(f"first step {r['first_step_s']:.2f}s")
    if "step_ms" in r:
        s = r["step_ms"]
        parts.append(f"step {s['median']:.2f} ms (p10 {s['p10']:.2f}, p90 {s['p90']:.2f}, "
                     f"n {s['n']}), pipelined {r['pipelined_step_ms']:.2f} ms")
    if "tokens_per_s" in r:
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu_causal']:.1f}% "
                     f"causal / {100 * r['mfu_palm']:.1f}% PaLM")
    mem = r.get("memory", {})
    if "peak_bytes_in_use_mb" in mem or "peak_mb" in mem:
        parts.append(f"peak mem {mem.get('peak_bytes_in_use_mb', mem.get('peak_mb')):.0f} MiB")
    return f"  {name}: " + ", ".join(parts)
