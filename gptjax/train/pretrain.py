"""Pre-training: corpus -> tokenizer -> token files -> the shared training loop.

The job behind `python train.py` (its command line is gptjax.cli.train). Every check of
settings, devices, data and tokenizer runs before the run folder is created, so that bad
input (exit 2) leaves no folder behind. Run folder layout:

    RUN_DIR/config.json     the resolved settings (preset, model, optim, loop, data)
    RUN_DIR/tokenizer/      the tokenizer, checked by fingerprint on resume
    RUN_DIR/checkpoints/    orbax checkpoints (last k and the best by validation loss)
    RUN_DIR/metrics.jsonl   one JSON record per logged step and per evaluation
    RUN_DIR/loss.png        the loss curves, written at the end
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from gptjax.config import PRESETS, GPTConfig
from gptjax.data.corpus import (
    eval_batches,
    load_texts,
    prepare_tokens,
    text_fingerprint,
    train_batch,
)
from gptjax.data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer
from gptjax.model import count_params, init_params, lm_loss
from gptjax.train import parallel as par
from gptjax.train.checkpoint import RUN_CONFIG, TOKENIZER_DIR, verify_resume
from gptjax.train.flops import flops_per_token
from gptjax.train.loop import LoopConfig, train, use_compile_cache
from gptjax.train.metrics import plot_losses
from gptjax.train.optim import OptimConfig, make_schedule
from gptjax.train.rundir import prepare_run_dir
from gptjax.train.runners import make_runner

log = logging.getLogger(__name__)

CHECK_KEYS = ("model", "tokenizer", "data")


# Tokenizers train.py builds from the corpus; any other `tokenizer` setting is a path.
TOKENIZER_KINDS = ("bpe", "char", "byte")


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    # Corpus: "builtin" (Python's own documentation), a text file, a folder, a glob,
    # a .jsonl file, or "hf:NAME[/CONFIG]" (needs the hf extra and a network).
    data: str = "builtin"
    # Field holding the text in .jsonl files and Hugging Face datasets.
    text_field: str = "text"
    # Split of a Hugging Face dataset.
    hf_split: str = "train"
    # "bpe" (byte-level BPE trained on the corpus to the model's vocab_size),
    # "char", "byte", or the path of a tokenizer folder / tokenizer.json.
    tokenizer: str = "bpe"
    # Share of the corpus (by characters, at its end) held out for validation.
    val_fraction: float = 0.05
    # Folder caching token files between runs ("" = ~/.cache/gptjax/tokens).
    cache_dir: str = ""
    # Validation batches per evaluation (0 = the whole validation split).
    eval_batches: int = 20
    # Text samples printed at the end of training.
    samples: int = 2
    # Tokens per sample.
    sample_tokens: int = 120
    # Sampling temperature (0 = greedy).
    sample_temperature: float = 0.8
    # Prompt of the samples ("" = start from <eos>).
    sample_prompt: str = ""

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must lie in [0, 1)")
        for name in ("eval_batches", "samples", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")


# Training recipes: settings a preset brings along unless overridden.
RECIPES: dict[str, dict] = {
    # GPT-1, section 4.1.
    "gpt1": dict(lr=2.5e-4, warmup_steps=2000, schedule="cosine", min_lr=0.0, weight_decay=0.01,
                 batch_size=64, steps=100_000),
    # GPT-2 sized models: GPT-1's optimizer at batch 512 x 1024 is beyond most users; a
    # common single-node setting instead.
    "gpt2": dict(lr=6e-4, warmup_steps=2000, schedule="cosine", min_lr=6e-5, b2=0.95,
                 weight_decay=0.1, batch_size=64, steps=100_000),
    # The character-level recipe of the training issue.
    "char": dict(lr=1e-3, warmup_steps=100, schedule="cosine", min_lr=1e-4, b2=0.99,
                 weight_decay=0.1, batch_size=12, steps=2000, tokenizer="char",
                 eval_every=250),
    # `python train.py` with no arguments: about four minutes on two CPU cores.
    "cpu-small": dict(lr=2e-3, warmup_steps=50, schedule="cosine", min_lr=1e-4, b2=0.99,
                      weight_decay=0.1, batch_size=16, steps=600, eval_every=100,
                      tokenizer="bpe", dtype="float32"),
}
RECIPES["gpt1-tiny"] = dict(RECIPES["cpu-small"])
RECIPES["cpu-6x384"] = dict(RECIPES["char"], steps=1000)
RECIPES["tiny"] = dict(RECIPES["cpu-small"], steps=50, eval_every=25, batch_size=8)
for _name in ("gpt2-medium", "gpt2-large", "gpt2-xl"):
    RECIPES[_name] = RECIPES["gpt2"]

@dataclass
class RunSettings:
    """Everything a pre-training run is given (gptjax.cli.train resolves it)."""

    preset: str
    model: GPTConfig
    optim: OptimConfig
    loop: LoopConfig
    data: DataConfig
    out_dir: Path

    def to_dict(self) -> dict:
        return {"preset": self.preset, "model": dataclasses.asdict(self.model),
                "optim": dataclasses.asdict(self.optim), "loop": dataclasses.asdict(self.loop),
                "data": dataclasses.asdict(self.data)}


def preset_settings(name: str) -> dict:
    """The settings a preset brings to train.py, flat: its GPTConfig fields, kernels "auto"
    (the fast paths measured faster on this backend; the library's default is
    "reference"), then its training recipe (RECIPES)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return {**dataclasses.asdict(PRESETS[name]), "kernels": "auto", **RECIPES.get(name, {})}


def _no_step(state, batch):
    return state, {}


def check_parallel(loop: LoopConfig) -> None:
    """Raise ValueError now for device, mesh and batch settings this machine cannot run.

    train() builds the same runner around the real step; built here around a step that
    does nothing, it runs the same checks and compiles nothing (jit and pmap compile at
    their first call)."""
    make_runner(lambda axis: _no_step, loop)


def check(settings: RunSettings) -> None:
    """The checks of the settings alone (before any data is read)."""
    make_schedule(settings.optim, settings.loop.steps)  # warm-up longer than training
    if settings.loop.eval_every > settings.loop.steps:
        log.info("eval_every=%d > steps=%d: evaluating at the end only",
                 settings.loop.eval_every, settings.loop.steps)
    check_parallel(settings.loop)


def _cache_dir(data: DataConfig) -> Path:
    if data.cache_dir:
        return Path(data.cache_dir)
    base = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(base) / "gptjax" / "tokens"


def make_tokenizer(settings: RunSettings, texts: list[str]) -> Tokenizer:
    """The run's tokenizer, built or loaded as configured."""
    kind = settings.data.tokenizer
    if kind in TOKENIZER_KINDS:
        return build_tokenizer(kind, texts, settings.model.vocab_size if kind == "bpe" else None)
    return load_tokenizer(kind)


def fit_vocab(settings: RunSettings, tokenizer: Tokenizer) -> RunSettings:
    """Char and byte tokenizers set the model's vocabulary; others must fit in it."""
    cfg = settings.model
    if settings.data.tokenizer in ("char", "byte"):
        if tokenizer.vocab_size != cfg.vocab_size:
            log.info("vocab_size %d -> %d to match the %s tokenizer", cfg.vocab_size,
                     tokenizer.vocab_size, settings.data.tokenizer)
            settings.model = cfg.replace(vocab_size=tokenizer.vocab_size)
    elif tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer's vocabulary ({tokenizer.vocab_size} tokens, from "
            f"{settings.data.tokenizer}) is larger than the model's embedding "
            f"(vocab_size={cfg.vocab_size})"
        )
    return settings


def make_eval_fn(cfg: GPTConfig, val: np.ndarray, batch_size: int, max_batches: int,
                 bits_per_byte):
    """val_loss (mean NLL over validation windows), val_ppl and val_bpb."""
    windows = (len(val) - 1) // cfg.n_ctx if len(val) > cfg.n_ctx else 0
    if windows == 0:
        raise ValueError(
            f"the validation split has {len(val)} tokens, fewer than one window of "
            f"n_ctx + 1 = {cfg.n_ctx + 1}; use a larger --val-fraction or corpus"
        )
    batch_size = min(batch_size, windows)
    batches = list(eval_batches(val, batch_size=batch_size, context=cfg.n_ctx,
                                max_batches=max_batches or None))
    loss_fn = jax.jit(lambda p, t: lm_loss(p, t, cfg))

    def evaluate(params):
        total = sum(float(loss_fn(params, b)) for b in batches) / len(batches)
        return {"val_loss": total, "val_ppl": math.exp(min(total, 50.0)),
                "val_bpb": bits_per_byte(total)}

    return evaluate


def sample_prompt(tokenizer: Tokenizer, data: DataConfig, cfg: GPTConfig) -> list[int]:
    """The ids the end-of-training samples start from (<eos> for an empty prompt); a
    ValueError when the prompt leaves no room for new tokens."""
    if data.sample_prompt:
        prompt = tokenizer.encode(data.sample_prompt)
    else:
        prompt = [tokenizer.token_id("<eos>")]
    if data.samples and data.sample_tokens and len(prompt) >= cfg.n_ctx:
        raise ValueError(f"sample_prompt is {len(prompt)} tokens, no room in n_ctx={cfg.n_ctx}")
    return prompt


def print_samples(cfg: GPTConfig, params, tokenizer: Tokenizer, data: DataConfig, seed: int):
    """Decode a few samples with the cached generator and print them."""
    from gptjax.generate import generate

    if data.samples == 0 or data.sample_tokens == 0:
        return []
    prompt = sample_prompt(tokenizer, data, cfg)
    new_tokens = min(data.sample_tokens, cfg.n_ctx - len(prompt))
    prompts = np.array([prompt] * data.samples, np.int32)
    out = generate(params, cfg, prompts, new_tokens, rng=jax.random.PRNGKey(seed),
                   temperature=data.sample_temperature, top_k=None)
    texts = []
    for i, row in enumerate(np.asarray(out)):
        text = tokenizer.decode([int(t) for t in row])
        texts.append(text)
        print(f"--- sample {i + 1} ---\n{data.sample_prompt}{text}\n")
    return texts


def run(settings: RunSettings, *, resume: bool, overwrite: bool, quiet: bool = False):
    """Check everything that can fail on bad input, then make the run folder, then train.

    Order: settings and devices, the corpus, the tokenizer and its fit to the model; then
    the caches shared by runs (compiled programs, token files: what is written there is
    correct whether or not this run goes on) and the data's fit to the context; only then
    the run folder.
    """
    data = settings.data
    par.initialize(settings.loop)  # multi-host: before any JAX computation
    check(settings)
    texts = load_texts(None if data.data == "builtin" else data.data, text_field=data.text_field,
                       hf_split=data.hf_split)
    source_fp = text_fingerprint(texts)
    run_tokenizer = Path(settings.out_dir) / TOKENIZER_DIR
    # Built afresh on resume too (training is deterministic): its fingerprint must
    # equal the checkpoint's, which catches a changed tokenizer setting or file.
    tokenizer = make_tokenizer(settings, texts)
    settings = fit_vocab(settings, tokenizer)
    cfg = settings.model
    sample_prompt(tokenizer, data, cfg)
    # Before anything is compiled (with several processes, the barrier below compiles).
    use_compile_cache(settings.loop.compile_cache)
    cache = _cache_dir(data) / f"{tokenizer.fingerprint()[:16]}-{source_fp[:16]}"
    with par.primary_first("token files"):  # several processes: process 0 writes them
        tokens = prepare_tokens(texts, tokenizer, cache, val_fraction=data.val_fraction,
                                source_fingerprint=source_fp, progress=not quiet)
    tokens.validate(cfg.vocab_size)
    loop = settings.loop
    train_batch(tokens.train, seed=loop.seed, step=0, batch_size=1, context=cfg.n_ctx)
    eval_fn = make_eval_fn(cfg, tokens.val, loop.batch_size, data.eval_batches,
                           tokens.bits_per_byte)

    meta = {"model": cfg.identity(), "tokenizer": tokenizer.fingerprint(),
            "data": tokens.meta.get("source_fingerprint", source_fp)}
    # Several processes: process 0 prepares and writes the folder; all read checkpoints.
    run_dir = Path(settings.out_dir)
    if par.is_primary():
        run_dir = prepare_run_dir(settings.out_dir, resume=resume, overwrite=overwrite)
    par.barrier("run folder")
    if resume:  # refuse a different model, tokenizer or corpus before writing anything
        verify_resume(run_dir, meta, CHECK_KEYS)
    if par.is_primary():
        (run_dir / RUN_CONFIG).write_text(json.dumps(settings.to_dict(), indent=2))
        if not resume or not run_tokenizer.exists():
            tokenizer.save(run_tokenizer)
    shard = par.process_batch_shard(loop)  # None with one process: the whole batch

    def batch_fn(step):
        return {"tokens": train_batch(tokens.train, seed=loop.seed, step=step,
                                      batch_size=loop.batch_size, context=cfg.n_ctx,
                                      shard=shard)}

    def loss_fn(params, batch, rng):
        return lm_loss(params, batch["tokens"], cfg, train=True, rng=rng), {}

    params = init_params(cfg, jax.random.PRNGKey(loop.seed))
    tokens_per_step = loop.batch_size * cfg.n_ctx
    print(f"gptjax: {settings.preset} model, {count_params(params):,} "
          f"parameters, {len(tokens.train):,} training tokens, {loop.steps} steps of "
          f"{tokens_per_step:,} tokens, on {jax.local_device_count()} {jax.default_backend()} "
          f"device(s); run folder {run_dir}")
    result = train(run_dir=run_dir, loop=loop, optim=settings.optim, params=params,
                   loss_fn=loss_fn, batch_fn=batch_fn, eval_fn=eval_fn, meta=meta,
                   resume=resume, check_keys=CHECK_KEYS, tokens_per_step=tokens_per_step,
                   flops_per_step=flops_per_token(cfg) * tokens_per_step,
                   compute_dtype=cfg.dtype, show_progress=not quiet)
    if not par.is_primary():
        return result
    plot_losses(run_dir)
    if result.status == "done":
        if result.evals:
            last = result.evals[-1]
            print(f"final validation loss {last['val_loss']:.4f} nats/token, perplexity "
                  f"{last['val_ppl']:.2f}, {last['val_bpb']:.3f} bits/byte")
        print_samples(cfg, result.state["params"], tokenizer, data, loop.seed)
        print(f"run saved in {run_dir} (checkpoints, metrics.jsonl, loss.png)")
    else:
        print(f"stopped by signal {result.signal} at step {int(result.state['step'])}; "
              f"checkpoint saved in {run_dir}; continue with --resume --out-dir {run_dir}")
    return result
