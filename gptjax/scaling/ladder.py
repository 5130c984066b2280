"""A model ladder: small runs of one family, a fit, and the big run predicted before it trains.

The GPT-4 report (section 3) predicted its final loss from runs of the same recipe with
1,000x to 10,000x less compute; OLMo's ladders (Bhagia et al. 2024) predict a task's
accuracy the same way, in two steps (compute -> loss -> accuracy). Here:

1. Rungs. One rule turns a size knob, the width, into a model: n_layer =
   max(1, round(width / aspect)), n_head = width / head_size (or a fixed n_head), every
   other field from the base model (a preset). Each run trains `tokens_per_param` x N
   tokens (N = the matmul parameters of the FLOPs formula, `matmul_params`; by default
   the target's ratio), or a fixed step count, with one recipe: the same optimizer,
   batch, data and tokenizer (built once, in the ladder folder), warm-up as a fraction
   of the run. The default ladder's target is `python train.py`'s default run
   (cpu-small, 600 steps), the rungs its shape (48 wide per layer, 4 heads) at widths
   32 to 72. Every run is train.py's own job
   (`gptjax.train.pretrain.run`) into an ordinary run folder, so whatever train.py runs
   on (one device, pmap, a mesh, several hosts) a ladder runs on.
2. Compute per run = `training_flops(cfg, tokens trained)`, the MFU's formula.
3. Measures, by one protocol for every run, from its final checkpoint: the mean
   next-token loss on the whole validation split (`gptjax.evaluate.perplexity`, windows
   of n_ctx) and the zero-shot accuracy on a multiple-choice task scored by likelihood
   (`gptjax.evaluate.evaluate_multiple_choice`; by default the built-in demo task's
   held-out validation and test items).
4. Fits and the prediction. L(C) = a C^b + c through the rungs (`fit_power_law`; the
   pure power law a C^b, c = 0, is fitted and reported beside it, or the other way
   round with irreducible=False), accuracy through a sigmoid of that loss
   (`CapabilityFit`); the target's loss and
   accuracy are predicted, with intervals where one new run should land, and written to
   ladder.json BEFORE the target trains; then the target trains (or an existing run
   folder is read) and predicted vs actual is reported. The target must use at least
   30x the compute of the largest rung (the issue's bound; the report's was 1,000x).
   Held-out check: the largest rung is predicted from the others the same way.

Restartable: a run that finished and was measured has a record (RECORD, written
atomically) in its folder and is read, not retrained; a run with checkpoints short of
its final step resumes (`run(resume=True)`); a folder without any checkpoint starts
over. A record made with other settings (model, recipe, tokenizer) is refused.

Ladder folder:

    OUT/tokenizer/        the one tokenizer every run uses
    OUT/tokens/           the corpus tokenized by it (the validation split is scored)
    OUT/task.jsonl        the multiple-choice items scored (chosen once)
    OUT/rungs/wWIDTH/     one run folder per rung (+ RECORD)
    OUT/target/           the target's run folder (unless --target-run)
    OUT/ladder.json       every rung, the fits, the prediction, the result
    OUT/scaling.png       the plot (gptjax.scaling.plot)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from gptjax.config import PRESETS, GPTConfig
from gptjax.data.corpus import load_texts, prepare_tokens, text_fingerprint
from gptjax.data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer
from gptjax.evaluate import evaluate_multiple_choice, perplexity, read_task
from gptjax.finetune.transforms import Example
from gptjax.loading import load_model
from gptjax.model import count_params, init_params
from gptjax.scaling.fits import (
    CapabilityFit,
    PowerLawFit,
    fit_power_law,
    fit_sigmoid,
    matmul_params,
    training_flops,
)
from gptjax.train import parallel as par
from gptjax.train.checkpoint import CHECKPOINT_DIR, RUN_CONFIG, TOKENIZER_DIR, Checkpointer
from gptjax.train.loop import LoopConfig
from gptjax.train.optim import OptimConfig
from gptjax.train.pretrain import TOKENIZER_KINDS, DataConfig, RunSettings, run

log = logging.getLogger(__name__)

# The bound: rungs use at most 1/30 of the target's compute.
MIN_COMPUTE_RATIO = 30.0
# Points a fit needs: a C^b + c has 3 parameters, the sigmoid (chance fixed) 3; one more
# so that the residuals mean something (gptjax.scaling.fits).
MIN_FIT_POINTS = 4
RECORD = "ladder_record.json"  # in a run folder: the run finished and was measured
LADDER_JSON = "ladder.json"
PLOT = "scaling.png"
TASK_FILE = "task.jsonl"
DEMO_TASK = "demo-multiple-choice"
TASK_SCORES = ("mean", "sum")


class Interrupted(Exception):
    """A run stopped on a signal (its checkpoint is saved); rerunning continues it."""

    def __init__(self, run_dir: Path, signal: int):
        super().__init__(f"{run_dir} stopped by signal {signal}")
        self.run_dir, self.signal = run_dir, signal


@dataclass(frozen=True)
class LadderConfig:
    """The ladder: the size rule, the rungs, the target, the capability task."""

    # Rung widths (n_embd), comma-separated: the size knob. Each gives n_layer and n_head
    # by --aspect and --head-size; every other model field is the base model's.
    sizes: str = "32,40,48,56,64,72"
    # The target's width, by the same rule; predicted, then trained (0: no target).
    target: int = 192
    # A finished run folder (train.py's) to take as the target instead of training one;
    # it must use the ladder's tokenizer, corpus, validation split and n_ctx.
    target_run: str = ""
    # Width per layer: n_layer = max(1, round(width / aspect)), the fixed aspect ratio.
    aspect: int = 48
    # Width per attention head: n_head = width / head_size (widths must divide by it).
    # 0: every run keeps the base model's n_head (widths must divide by that).
    head_size: int = 0
    # Training tokens per parameter (N = the matmul weights of the FLOPs formula); a run
    # trains ceil(tokens_per_param * N / (batch_size * n_ctx)) steps. none: the target's
    # (--steps steps of the target, the rungs in proportion); 0: every run trains --steps.
    tokens_per_param: float | None = None
    # Fit the irreducible loss c of L(C) = a C^b + c (the GPT-4 report's form); false:
    # c = 0, Kaplan et al.'s pure power law. The other form is fitted and reported too.
    irreducible: bool = True
    # Learning-rate warm-up of each run, as a fraction of its steps (none: the preset
    # recipe's, its warmup_steps / steps).
    warmup_fraction: float | None = None
    # Base model (every field but the size) and training recipe: a preset.
    preset: str = "cpu-small"
    # Capability: "demo-multiple-choice" (the built-in task's held-out items), a JSON lines
    # file of {"context", "choices", "label"} objects, or "none".
    task: str = DEMO_TASK
    # Choice scoring: "mean" log-probability per token (GPT-1's for Story Cloze) or "sum".
    task_score: str = "mean"
    # Ladder folder: tokenizer, token files, run folders, ladder.json, scaling.png.
    out_dir: str = "runs/scaling"
    # Bootstrap refits of each fit.
    n_bootstrap: int = 1000
    # Confidence of the reported intervals.
    confidence: float = 0.9

    def __post_init__(self):
        for name in ("aspect", "n_bootstrap"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.head_size < 0:
            raise ValueError(f"head_size={self.head_size} must be >= 1, or 0 for a fixed "
                             "number of heads (--n-head)")
        if self.target < 0:
            raise ValueError(f"target={self.target} must be a width >= 1, or 0 for none")
        if self.tokens_per_param is not None and self.tokens_per_param < 0:
            raise ValueError(f"tokens_per_param={self.tokens_per_param} must be >= 0 "
                             "(0: a fixed step count)")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction <= 1:
            raise ValueError(f"warmup_fraction={self.warmup_fraction} must lie in [0, 1]")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence={self.confidence} must lie in (0, 1)")
        if self.task_score not in TASK_SCORES:
            raise ValueError(f"task_score={self.task_score!r} must be one of {TASK_SCORES}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        self.widths()  # the sizes must parse

    def widths(self) -> list[int]:
        """The rung widths, ascending."""
        try:
            widths = [int(part) for part in self.sizes.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"sizes={self.sizes!r} must be comma-separated widths, "
                             "e.g. 32,48,64") from None
        if not widths:
            raise ValueError("sizes is empty: give the rung widths, e.g. 32,48,64")
        if len(set(widths)) != len(widths):
            raise ValueError(f"sizes={self.sizes!r} repeats a width")
        return sorted(widths)


@dataclass(frozen=True)
class LadderSettings:
    """A ladder and the settings every run shares (the model's non-size fields, the
    optimizer, the loop, the data): what `python -m gptjax.scaling` resolves."""

    ladder: LadderConfig
    model: GPTConfig
    optim: OptimConfig
    loop: LoopConfig
    data: DataConfig


@dataclass(frozen=True)
class Run:
    """One run of the ladder: a rung or the target."""

    name: str
    settings: RunSettings
    tokens: int  # trained: steps x batch_size x n_ctx
    compute: float  # training_flops(cfg, tokens)

    @property
    def cfg(self) -> GPTConfig:
        return self.settings.model

    @property
    def run_dir(self) -> Path:
        return Path(self.settings.out_dir)

    @property
    def steps(self) -> int:
        return self.settings.loop.steps


# ----------------------------------------------------------------------------- the rule


def shape(width: int, aspect: int, head_size: int, n_head: int) -> tuple[int, int]:
    """(n_layer, n_head) of a width: n_layer = max(1, round(width / aspect)) (halves
    round up); n_head = width / head_size, or the given n_head when head_size is 0.
    E.g. aspect 32, head size 8: 48 -> (2, 6); head size 0, n_head 4: 48 -> (2, 4)."""
    if width < 1:
        raise ValueError(f"width {width} must be >= 1")
    if head_size and width % head_size:
        raise ValueError(f"width {width} is not a multiple of head_size={head_size}")
    if not head_size and width % n_head:
        raise ValueError(f"width {width} is not a multiple of n_head={n_head} (the heads "
                         "of every run with head_size 0)")
    return max(1, math.floor(width / aspect + 0.5)), width // head_size if head_size else n_head


def model_for(width: int, ladder: LadderConfig, base: GPTConfig) -> GPTConfig:
    """The run of this width: the base model (parametrization included) at the rule's shape.
    muP (gptjax.mup) is relative to the same model at mup_base_width with the same heads,
    so under muP every run keeps the base model's n_head (head_size 0)."""
    if base.parametrization == "mup" and ladder.head_size:
        raise ValueError(f"head_size={ladder.head_size} with parametrization='mup': muP's "
                         "base model has each run's heads; use --head-size 0 (a fixed n_head)")
    n_layer, n_head = shape(width, ladder.aspect, ladder.head_size, base.n_head)
    return base.replace(n_layer=n_layer, n_embd=width, n_head=n_head)


def run_steps(cfg: GPTConfig, tokens_per_param: float, loop: LoopConfig) -> int:
    """Steps of a run: ceil(tokens_per_param * N / tokens per step), or loop.steps when
    tokens_per_param is 0."""
    if tokens_per_param == 0:
        return loop.steps
    per_step = loop.batch_size * cfg.n_ctx
    # (less a hair, so that a ratio computed from a step count gives that count back)
    return max(1, math.ceil(tokens_per_param * matmul_params(cfg) / per_step - 1e-9))


def tokens_per_param(settings: LadderSettings, target: GPTConfig | Run | None) -> float:
    """The ladder's ratio, else the target's: a target trained loop.steps steps (a model),
    or the tokens an existing target run trained."""
    ratio = settings.ladder.tokens_per_param
    if ratio is not None:
        return ratio
    if isinstance(target, Run):
        return target.tokens / matmul_params(target.cfg)
    if target is None:
        raise ValueError("tokens_per_param none takes the target's ratio, and there is no "
                         "target: give --tokens-per-param")
    loop = settings.loop
    return loop.steps * loop.batch_size * target.n_ctx / matmul_params(target)


def warmup_fraction(settings: LadderSettings) -> float:
    """The ladder's warm-up fraction, else the recipe's (warmup_steps / steps)."""
    if settings.ladder.warmup_fraction is not None:
        return settings.ladder.warmup_fraction
    return min(1.0, settings.optim.warmup_steps / settings.loop.steps)


def make_run(name: str, cfg: GPTConfig, steps: int, settings: LadderSettings,
             run_dir: Path, tokenizer_dir: Path) -> Run:
    """The RunSettings of one run: the shared recipe, this run's model, steps, warm-up."""
    warmup = round(warmup_fraction(settings) * steps)
    run_settings = RunSettings(
        preset=settings.ladder.preset, model=cfg,
        optim=dataclasses.replace(settings.optim, warmup_steps=warmup),
        loop=dataclasses.replace(settings.loop, steps=steps),
        data=dataclasses.replace(settings.data, tokenizer=str(tokenizer_dir.resolve())),
        out_dir=run_dir)
    tokens = steps * settings.loop.batch_size * cfg.n_ctx
    return Run(name, run_settings, tokens, training_flops(cfg, tokens))


def plan(settings: LadderSettings, vocab_size: int,
         target_run: Run | None = None) -> tuple[list[Run], Run | None, float]:
    """(the rungs, the target, tokens per parameter), nothing run. The target is
    `target_run` when given (plan_target_run), else the rule's at --target, else None.
    Raises ValueError for a bad rule."""
    ladder = settings.ladder
    out = Path(ladder.out_dir)
    base = settings.model.replace(vocab_size=vocab_size)
    tokenizer_dir = out / TOKENIZER_DIR
    target_cfg = model_for(ladder.target, ladder, base) if ladder.target else None
    ratio = tokens_per_param(settings, target_run or target_cfg)
    rungs = []
    for width in ladder.widths():
        cfg = model_for(width, ladder, base)
        rungs.append(make_run(f"w{width}", cfg, run_steps(cfg, ratio, settings.loop),
                              settings, out / "rungs" / f"w{width}", tokenizer_dir))
    target = target_run
    if target is None and target_cfg is not None:
        target = make_run(f"w{ladder.target}", target_cfg,
                          run_steps(target_cfg, ratio, settings.loop), settings,
                          out / "target", tokenizer_dir)
    return rungs, target, ratio


def check_compute_ratio(rungs: list[Run], target_name: str, target_compute: float) -> float:
    """target compute / the largest rung's; ValueError below MIN_COMPUTE_RATIO."""
    largest = max(rungs, key=lambda r: r.compute)
    ratio = target_compute / largest.compute
    if ratio < MIN_COMPUTE_RATIO:
        raise ValueError(
            f"the target {target_name} uses {target_compute:.3g} FLOPs, only {ratio:.1f}x "
            f"the largest rung {largest.name} ({largest.compute:.3g} FLOPs); a prediction "
            f"needs rungs of at most 1/{MIN_COMPUTE_RATIO:g} of the target's compute: "
            "drop the largest rungs from --sizes or make --target larger")
    return ratio


# ----------------------------------------------------------------------------- files


def write_json_atomic(path: Path, record: dict) -> None:
    """Write under a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def recipe(settings: RunSettings) -> dict:
    """What makes two runs the same run: model, optimizer, steps, batch, seed, data."""
    loop, data = settings.loop, settings.data
    return {"model": dataclasses.asdict(settings.model),
            "optim": dataclasses.asdict(settings.optim),
            "steps": loop.steps, "batch_size": loop.batch_size, "seed": loop.seed,
            "data": data.data, "val_fraction": data.val_fraction}


def _differences(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


def check_same_recipe(run: Run, saved: dict) -> None:
    """Refuse a run folder made with other settings (its config.json, or its record)."""
    wanted = recipe(run.settings)
    saved = dict(saved)
    # the tokenizer path may differ (a moved ladder); its fingerprint is checked on resume
    differ = _differences(saved, wanted)
    if differ:
        raise ValueError(f"{run.run_dir} was made with other settings ({'; '.join(differ[:4])}"
                         f"{'; ...' if len(differ) > 4 else ''}); use another --out-dir, or "
                         "delete that folder to retrain it")


def _saved_recipe(run_dir: Path) -> dict:
    data = json.loads((run_dir / RUN_CONFIG).read_text())
    model = GPTConfig.from_dict(data["model"], where=str(run_dir / RUN_CONFIG))
    return recipe(RunSettings(
        preset=data.get("preset", ""), model=model, optim=OptimConfig(**data["optim"]),
        loop=LoopConfig(**data["loop"]), data=DataConfig(**data["data"]), out_dir=run_dir))


def checkpoint_steps(run_dir: Path) -> list[int]:
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    ckpt = Checkpointer(folder, read_only=True)
    try:
        return ckpt.steps()
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------- measures


@dataclass(frozen=True)
class Measures:
    """What every run is measured on: the validation tokens and the task's items."""

    val_tokens: np.ndarray
    items: list[Example]
    chance: float | None
    score: str  # "mean" or "sum"
    max_tokens: int  # tokens per scoring batch

    def measure(self, run_dir: Path) -> dict:
        cfg, params, tokenizer = load_model(run_dir)
        out = {"val_loss": perplexity(params, cfg, self.val_tokens,
                                      max_tokens=self.max_tokens)["nll_per_token"]}
        if self.items:
            mc = evaluate_multiple_choice(params, cfg, tokenizer, self.items,
                                          max_tokens=self.max_tokens)
            out["accuracy_sum"], out["accuracy_mean"] = mc["accuracy"], mc["accuracy_mean"]
            out["accuracy"] = out[f"accuracy_{self.score}"]
        return out


def _example_json(e: Example) -> dict:
    return {"context": e.text_a, "choices": list(e.choices), "label": e.label, "uid": e.uid}


def task_items(ladder: LadderConfig, data: DataConfig, out: Path) -> list[Example]:
    """The multiple-choice items, chosen once and kept in OUT/task.jsonl."""
    if ladder.task == "none":
        return []
    saved = out / TASK_FILE
    if ladder.task == DEMO_TASK:
        if not saved.is_file():
            from gptjax.finetune.demo_tasks import VAL_FRACTION, demo_task

            if data.data != "builtin" or data.val_fraction != VAL_FRACTION:
                log.warning("the demo task's held-out items come from the built-in corpus's "
                            "last %g; this ladder trains on --data %s with --val-fraction "
                            "%g, so they may overlap its training text", VAL_FRACTION,
                            data.data, data.val_fraction)
            task = demo_task(DEMO_TASK, n_train=1)
            items = task["validation"] + task["test"]  # held-out documents only
            if par.is_primary():
                saved.write_text("".join(json.dumps(_example_json(e)) + "\n" for e in items))
            par.barrier("task items")
        path = saved
    else:
        path = Path(ladder.task)
        if not path.is_file():
            raise FileNotFoundError(f"task={ladder.task!r}: no such file (give "
                                    f"{DEMO_TASK}, a JSON lines file, or none)")
    items = read_task("jsonl", path)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _longest_choice(n_ctx: int) -> int:
    return n_ctx - n_ctx // 8  # leaves an eighth of the context, at least, for the context


def fitting_items(items: list[Example], tokenizer: Tokenizer,
                  n_ctx: int) -> tuple[list[Example], int]:
    """(the items whose every choice, as scored (" choice"), fits in n_ctx with room for
    some context, the number dropped). The scorer cuts contexts on the left but refuses
    a choice longer than n_ctx; the rule depends on the tokenizer and n_ctx only, never
    on a model, so every run is scored on the same items."""
    longest = _longest_choice(n_ctx)
    kept = [e for e in items
            if max(len(tokenizer.encode(" " + c)) for c in e.choices) <= longest]
    if items and not kept:
        raise ValueError(f"no task item fits n_ctx={n_ctx}: every one has a choice longer "
                         f"than {longest} tokens")
    return kept, len(items) - len(kept)


def shared_tokenizer(settings: LadderSettings, texts: list[str], out: Path) -> Tokenizer:
    """The ladder's one tokenizer, built on the first call and read afterwards."""
    folder = out / TOKENIZER_DIR
    kind = settings.data.tokenizer
    if (folder).is_dir():
        tokenizer = load_tokenizer(folder)
        if kind in TOKENIZER_KINDS and tokenizer.kind != kind:
            raise ValueError(f"{folder} holds a {tokenizer.kind!r} tokenizer but --tokenizer "
                             f"is {kind!r}; use another --out-dir")
        return tokenizer
    if kind in TOKENIZER_KINDS:
        size = settings.model.vocab_size if kind == "bpe" else None
        tokenizer = build_tokenizer(kind, texts, size)
    else:
        tokenizer = load_tokenizer(kind)
    if par.is_primary():
        tokenizer.save(folder)
    par.barrier("ladder tokenizer")
    return tokenizer


# ----------------------------------------------------------------------------- runs


def _record(run: Run, measures: dict, seconds: float | None) -> dict:
    cfg = run.cfg
    return {"name": run.name, "run_dir": str(run.run_dir), "n_layer": cfg.n_layer,
            "n_embd": cfg.n_embd, "n_head": cfg.n_head,
            "params": count_params_of(cfg), "matmul_params": matmul_params(cfg),
            "steps": run.steps, "tokens": run.tokens, "compute": run.compute,
            **measures, "train_seconds": seconds, "recipe": recipe(run.settings)}


def count_params_of(cfg: GPTConfig) -> int:
    """All parameters (count_params), from shapes only: nothing is allocated."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return count_params(shapes)


def train_or_read(run: Run, measures: Measures, *, quiet: bool) -> dict:
    """The run's record: read when it finished and was measured, else trained (fresh,
    resumed, or started over) and measured."""
    record_path = run.run_dir / RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        check_same_recipe(run, record.get("recipe", {}))
        print(f"{run.name}: finished earlier, read from {record_path}")
        return record
    steps = checkpoint_steps(run.run_dir)
    seconds = None
    if steps and (run.run_dir / RUN_CONFIG).is_file():
        check_same_recipe(run, _saved_recipe(run.run_dir))
    if steps and steps[-1] >= run.steps:
        print(f"{run.name}: trained earlier (step {steps[-1]}), measuring it")
    else:
        resume = bool(steps)
        print(f"{run.name}: {run.cfg.n_layer} layers x {run.cfg.n_embd} wide, "
              f"{run.cfg.n_head} heads, {run.steps} steps, {run.tokens:,} tokens, "
              f"{run.compute:.3g} FLOPs" + (f", resuming at step {steps[-1]}" if resume else ""),
              flush=True)
        start = time.perf_counter()
        result = run_training(run.settings, resume=resume, overwrite=not resume, quiet=quiet)
        seconds = time.perf_counter() - start
        if result.status != "done":
            raise Interrupted(run.run_dir, result.signal or 0)
    record = _record(run, measures.measure(run.run_dir), seconds)
    if par.is_primary():
        write_json_atomic(record_path, record)
    return record


def run_training(settings: RunSettings, *, resume: bool, overwrite: bool, quiet: bool):
    """train.py's job (a seam the tests count calls through)."""
    return run(settings, resume=resume, overwrite=overwrite, quiet=quiet)


def plan_target_run(path: Path, settings: LadderSettings, tokenizer: Tokenizer) -> Run:
    """An existing, finished run folder as the target, checked before anything trains:
    ValueError when it does not share the ladder's tokenizer, corpus, validation split
    and context, or has not finished."""
    if not (path / RUN_CONFIG).is_file():
        raise FileNotFoundError(f"target_run={str(path)!r} is not a run folder (no "
                                f"{RUN_CONFIG})")
    data = json.loads((path / RUN_CONFIG).read_text())
    cfg = GPTConfig.from_dict(data["model"], where=str(path / RUN_CONFIG))
    loop = LoopConfig(**data["loop"])
    run_data = DataConfig(**data["data"])
    problems = []
    if load_tokenizer(path / TOKENIZER_DIR).fingerprint() != tokenizer.fingerprint():
        problems.append("its tokenizer differs from the ladder's (losses per token would "
                        "not compare)")
    if run_data.data != settings.data.data or run_data.val_fraction != settings.data.val_fraction:
        problems.append(f"it trained on data={run_data.data!r} with val_fraction="
                        f"{run_data.val_fraction}, the ladder on {settings.data.data!r} with "
                        f"{settings.data.val_fraction}")
    if cfg.n_ctx != settings.model.n_ctx:
        problems.append(f"its n_ctx is {cfg.n_ctx}, the ladder's {settings.model.n_ctx}")
    steps = checkpoint_steps(path)
    if not steps or steps[-1] < loop.steps:
        problems.append(f"it has not finished (checkpoint at step "
                        f"{steps[-1] if steps else 'none'} of {loop.steps}); finish it with "
                        f"train.py --resume --out-dir {path}")
    if problems:
        raise ValueError(f"target_run {path}: " + "; ".join(problems))
    tokens = loop.steps * loop.batch_size * cfg.n_ctx
    run_settings = RunSettings(preset=data.get("preset", ""), model=cfg,
                               optim=OptimConfig(**data["optim"]), loop=loop, data=run_data,
                               out_dir=path)
    return Run(path.name, run_settings, tokens, training_flops(cfg, tokens))


def finished(run: Run) -> bool:
    """Whether the run's training is over (measured or not)."""
    steps = checkpoint_steps(run.run_dir)
    return (run.run_dir / RECORD).is_file() or bool(steps and steps[-1] >= run.steps)


# ----------------------------------------------------------------------------- fits


@dataclass(frozen=True)
class LadderFits:
    """The fits of a ladder's rungs: the loss in the chosen form, the same in the other
    form (with c, or c = 0), and accuracy through the chosen loss fit (or None)."""

    loss: PowerLawFit
    other: PowerLawFit
    capability: CapabilityFit | None

    def predict(self, compute: float) -> dict:
        """Point predictions and the intervals where one new run should land."""
        out = {"compute": compute, "form": self.loss.to_dict()["form"],
               "loss": self.loss.predict(compute),
               "loss_interval": list(self.loss.interval(compute, new_run=True)),
               "confidence": self.loss.confidence}
        if self.capability is not None:
            out["accuracy"] = self.capability.predict(compute)
            # a run's scatter added to the curve may step outside [0, 1]; accuracy cannot
            out["accuracy_interval"] = [
                min(max(v, 0.0), 1.0)
                for v in self.capability.interval(compute, new_run=True)]
        out["other"] = {"form": self.other.to_dict()["form"],
                        "loss": self.other.predict(compute),
                        "loss_interval": list(self.other.interval(compute, new_run=True))}
        return out


def fit_ladder(records: list[dict], *, irreducible: bool, chance: float | None,
               n_bootstrap: int, seed: int, confidence: float) -> tuple[LadderFits | None, str]:
    """(the fits, or None with too few rungs; a note on what could not be fitted)."""
    compute = [r["compute"] for r in records]
    loss = [r["val_loss"] for r in records]
    if len(records) < MIN_FIT_POINTS:
        return None, (f"{len(records)} rungs: fitting a C^b + c needs at least "
                      f"{MIN_FIT_POINTS}")
    kwargs = dict(n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)
    loss_fit = fit_power_law(compute, loss, irreducible=irreducible, **kwargs)
    other = fit_power_law(compute, loss, irreducible=not irreducible, **kwargs)
    if "accuracy" not in records[0]:
        return LadderFits(loss_fit, other, None), "no capability task"
    try:
        sigmoid = fit_sigmoid(loss, [r["accuracy"] for r in records], chance=chance, **kwargs)
    except (ValueError, RuntimeError) as err:
        return LadderFits(loss_fit, other, None), f"accuracy not fitted: {err}"
    return LadderFits(loss_fit, other, CapabilityFit(loss_fit, sigmoid)), ""


def compare(prediction: dict, actual: dict) -> dict:
    """Errors (actual - predicted) and whether the actual lies inside each interval, for
    the loss, the accuracy and the other form's loss ("other_loss_...")."""
    out = {}
    for prefix, p in (("", prediction), ("other_", prediction.get("other") or {})):
        for key in ("loss", "accuracy"):
            measured = actual.get("val_loss" if key == "loss" else "accuracy")
            if key in p and measured is not None:
                lo, hi = p[f"{key}_interval"]
                out[f"{prefix}{key}_error"] = measured - p[key]
                out[f"{prefix}{key}_inside"] = bool(lo <= measured <= hi)
    return out


# ----------------------------------------------------------------------------- the ladder


def run_ladder(settings: LadderSettings, *, overwrite: bool = False, quiet: bool = False,
               plot: bool = True) -> dict:
    """Train (or read) the rungs, fit, predict the target, train (or read) it, compare.

    Returns the ladder.json record. Bad settings raise ValueError before anything is
    trained; a run stopped by a signal raises Interrupted (rerun to continue)."""
    ladder = settings.ladder
    par.initialize(settings.loop)  # several hosts: before any JAX computation
    out = Path(ladder.out_dir)
    if overwrite and out.exists() and par.is_primary():
        shutil.rmtree(out)
    if ladder.target_run and not Path(ladder.target_run).is_dir():
        raise FileNotFoundError(f"target_run={ladder.target_run!r}: no such folder")
    if not (ladder.target or ladder.target_run):
        log.info("no target: training and fitting the rungs only")
    data = settings.data
    texts = load_texts(None if data.data == "builtin" else data.data,
                       text_field=data.text_field, hf_split=data.hf_split)
    if par.is_primary():
        out.mkdir(parents=True, exist_ok=True)
    par.barrier("ladder folder")
    tokenizer = shared_tokenizer(settings, texts, out)
    target_run = (plan_target_run(Path(ladder.target_run), settings, tokenizer)
                  if ladder.target_run else None)
    rungs, target, ratio_of_tokens = plan(settings, tokenizer.vocab_size, target_run)
    if target is not None:
        ratio = check_compute_ratio(rungs, target.name, target.compute)
    with par.primary_first("ladder token files"):
        tokens = prepare_tokens(texts, tokenizer, out / "tokens", val_fraction=data.val_fraction,
                                source_fingerprint=text_fingerprint(texts), progress=not quiet)
    if len(tokens.val) < 2:
        raise ValueError(f"the validation split has {len(tokens.val)} tokens; use a larger "
                         "--val-fraction or corpus")
    items, dropped = fitting_items(task_items(ladder, data, out), tokenizer,
                                   settings.model.n_ctx)
    if dropped:
        log.info("%d of %d task items dropped: a choice longer than %d tokens leaves too "
                 "little context in n_ctx=%d", dropped, dropped + len(items),
                 _longest_choice(settings.model.n_ctx), settings.model.n_ctx)
    chance = float(np.mean([1.0 / len(e.choices) for e in items])) if items else None
    measures = Measures(val_tokens=np.asarray(tokens.val, np.int64), items=items,
                        chance=chance, score=ladder.task_score,
                        max_tokens=settings.loop.batch_size * (settings.model.n_ctx + 1))
    del texts

    previous_path = out / LADDER_JSON
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() else {}
    record = {"ladder": dataclasses.asdict(ladder), "tokens_per_param": ratio_of_tokens,
              "tokenizer": {"path": str(out / TOKENIZER_DIR), "kind": tokenizer.kind,
                            "vocab_size": tokenizer.vocab_size,
                            "fingerprint": tokenizer.fingerprint()},
              "task": {"name": ladder.task, "items": len(items), "dropped": dropped,
                       "chance": chance, "score": ladder.task_score},
              "rungs": [], "fits": None, "held_out": None, "prediction": None,
              "target": None, "result": None, "notes": []}

    def save():
        if par.is_primary():
            write_json_atomic(out / LADDER_JSON, record)

    for rung in rungs:
        record["rungs"].append(train_or_read(rung, measures, quiet=quiet))
        save()
    records = record["rungs"]
    fit_args = dict(irreducible=ladder.irreducible, chance=chance,
                    n_bootstrap=ladder.n_bootstrap, seed=settings.loop.seed,
                    confidence=ladder.confidence)
    fits, note = fit_ladder(records, **fit_args)
    if note:
        record["notes"].append(note)
    if fits is not None:
        record["fits"] = {"loss": fits.loss.to_dict(), "other": fits.other.to_dict(),
                          "accuracy": (fits.capability.accuracy_fit.to_dict()
                                       if fits.capability else None)}
    held_fits, held_note = fit_ladder(records[:-1], **fit_args)
    if held_fits is not None:
        held = held_fits.predict(records[-1]["compute"])
        record["held_out"] = {"rung": records[-1]["name"], **held,
                              **compare(held, records[-1])}
    elif len(records) > 1:
        record["notes"].append(f"no held-out check: without the largest rung, {held_note}")

    if target is not None and fits is not None:
        prediction = {"target": target.name, "compute_ratio": ratio,
                      **fits.predict(target.compute),
                      "made_before_the_target_trained": not finished(target)}
        earlier = previous.get("prediction") or {}
        if all(earlier.get(k) == prediction[k] for k in ("target", "compute", "loss")):
            # the same prediction, made by an earlier call: keep when it was made
            prediction["made_before_the_target_trained"] = earlier.get(
                "made_before_the_target_trained", False)
        record["prediction"] = prediction
    save()  # the prediction is on disk before the target trains
    if target is not None:
        if ladder.target_run:
            print(f"target: measuring {target.run_dir}")
            target_record = _record(target, measures.measure(target.run_dir), None)
        else:
            target_record = train_or_read(target, measures, quiet=quiet)
        record["target"] = target_record
        if record["prediction"] is not None:
            record["result"] = compare(record["prediction"], target_record)
    save()
    if plot and par.is_primary():
        from gptjax.scaling.plot import plot_ladder

        plot_ladder(record, fits, out / PLOT)
    return record


# ----------------------------------------------------------------------------- report


def report(record: dict) -> str:
    """The rungs table, the fits and predicted vs actual, as text."""
    lines = [f"{'run':>8} {'layers':>6} {'width':>5} {'heads':>5} {'params':>9} "
             f"{'tokens':>10} {'FLOPs':>9} {'val loss':>8} {'accuracy':>8}"]
    for r in record["rungs"] + ([record["target"]] if record.get("target") else []):
        acc = f"{r['accuracy']:.3f}" if "accuracy" in r else "-"
        lines.append(f"{r['name']:>8} {r['n_layer']:>6} {r['n_embd']:>5} {r['n_head']:>5} "
                     f"{r['params']:>9,} {r['tokens']:>10,} {r['compute']:>9.3g} "
                     f"{r['val_loss']:>8.4f} {acc:>8}")
    fits = record.get("fits")
    for title, f in (("fit", (fits or {}).get("loss")), ("other form", (fits or {}).get("other"))):
        if f:
            c = (f" + {f['c']:.4f}, c in [{f['c_interval'][0]:.3f}, {f['c_interval'][1]:.3f}]"
                 if f["form"].endswith("+ c") else "")
            lines.append(f"{title}: L(C) = {f['a']:.4g} C^{f['b']:.4f}{c}  (b in "
                         f"[{f['b_interval'][0]:.3f}, {f['b_interval'][1]:.3f}])")
    for title, key, actual in (("held out", "held_out", None), ("target", "prediction",
                                                                 record.get("target"))):
        p = record.get(key)
        if not p:
            continue
        if key == "held_out":
            actual = next(r for r in record["rungs"] if r["name"] == p["rung"])
            name = p["rung"]
        else:
            name = p["target"]
        pct = round(100 * p["confidence"])
        lines.append(f"{title} {name} ({p['compute']:.3g} FLOPs"
                     + (f", {p['compute_ratio']:.0f}x the largest rung" if "compute_ratio" in p
                        else "") + "):")
        rows = [("loss", "val_loss", p, p.get("form", "")),
                ("accuracy", "accuracy", p, "via the loss"),
                ("loss", "val_loss", p.get("other") or {}, (p.get("other") or {}).get("form"))]
        for kind, measured_key, q, how in rows:
            if kind not in q:
                continue
            lo, hi = q[f"{kind}_interval"]
            text = (f"  {kind:<8} predicted {q[kind]:.4f} ({pct}% interval "
                    f"[{lo:.4f}, {hi:.4f}]; {how})")
            if actual is not None and measured_key in actual:
                value = actual[measured_key]
                inside = "inside" if lo <= value <= hi else "OUTSIDE"
                text += (f": actual {value:.4f}, error {value - q[kind]:+.4f}, {inside} the "
                         "interval")
            lines.append(text)
    lines += [f"note: {n}" for n in record.get("notes", [])]
    return "\n".join(lines)
