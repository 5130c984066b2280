"""Pre-training: corpus -> tokenizer -> token files -> the shared training loop.

The job behind `python train.py` (its command line is gptjax.cli.train). Every check of
settings, devices, data and tokenizer runs before the run folder is created, so that bad
input (exit 2) leaves no folder behind. Run folder layout:

    RUN_DIR/config.json     the resolved settings (preset, model, optim, loop, data)
    RUN_DIR/tokenizer/      the tokenizer, checked by fingerprint on resume
    RUN_DIR/checkpoints/    orbax checkpoints (last k and the best by validation loss)
    RUN_DIR/metrics.jsonl   one JSON record per logged step and per evaluation
    RUN_DIR/loss.png        the loss curves, written at the end

What is trained for is the model's: a GPT (arch "gpt") learns the next token of windows of
the token stream (GPT-1's L_1); a BERT (arch "bert") learns BERT's masked tokens and next
sentence from pairs cut from the same stream (gptjax.data.mlm). The job branches on the
architecture in one place, `make_objective`: the batches, the loss, the evaluation and the
samples printed at the end; everything else (checks, token files, checkpoints, resume,
parallelism, logging) is the same for both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from gptjax.data.mlm import BertVocab, Documents, mlm_eval_batches, mlm_train_batch
from gptjax.data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer
from gptjax.model import bert_loss, count_params, init_params, lm_loss
from gptjax.train import parallel as par
from gptjax.train.checkpoint import RUN_CONFIG, TOKENIZER_DIR, verify_resume
from gptjax.train.flops import flops_per_token
from gptjax.train.loop import LoopConfig, train, use_compile_cache
from gptjax.train.metrics import plot_losses
from gptjax.train.optim import OptimConfig, make_schedule
from gptjax.train.rundir import prepare_run_dir
from gptjax.train.runners import make_runner

log = logging.getLogger(__name__)

# What a resumed run must match ("objective": BERT's masking settings; GPT runs have none).
CHECK_KEYS = ("model", "tokenizer", "data", "objective")


# Tokenizers train.py builds from the corpus; any other `tokenizer` setting is a path.
TOKENIZER_KINDS = ("bpe", "wordpiece", "char", "byte")
# Those with BERT's special tokens ([CLS], [SEP], [MASK], [PAD]).
BERT_TOKENIZER_KINDS = ("wordpiece",)


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
    # "bpe" (byte-level BPE trained on the corpus to the model's vocab_size), "wordpiece"
    # (BERT's scheme, trained likewise; BERT needs its special tokens), "char", "byte", or
    # the path of a tokenizer folder / tokenizer.json / BERT vocab.txt.
    tokenizer: str = "bpe"
    # Share of the corpus (by characters, at its end) held out for validation.
    val_fraction: float = 0.05
    # Folder caching token files between runs ("" = ~/.cache/gptjax/tokens).
    cache_dir: str = ""
    # Validation batches per evaluation (0 = the whole validation split).
    eval_batches: int = 20
    # BERT only: share of a pair's text tokens that are prediction targets; of them 80%
    # become [MASK], 10% a random token, 10% stay (BERT, section 3.1: 15%).
    mask_rate: float = 0.15
    # BERT only: share of pairs cut shorter than the context (BERT's short_seq_prob).
    short_seq_prob: float = 0.1
    # Samples printed at the end of training: GPT's generated texts; BERT's fill-mask
    # predictions (held-out text with a token masked, or sample_prompt).
    samples: int = 2
    # GPT only: tokens per sample.
    sample_tokens: int = 120
    # GPT only: sampling temperature (0 = greedy).
    sample_temperature: float = 0.8
    # GPT: the prompt of the samples ("" = start from <eos>). BERT: a text with [MASK] in
    # it, whose predictions are printed ("" = held-out text).
    sample_prompt: str = ""

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must lie in [0, 1)")
        for name in ("eval_batches", "samples", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 < self.mask_rate < 1:
            raise ValueError(f"mask_rate={self.mask_rate} must lie in (0, 1)")
        if not 0 <= self.short_seq_prob <= 1:
            raise ValueError(f"short_seq_prob={self.short_seq_prob} must lie in [0, 1]")


# The settings that only one architecture uses (check_objective refuses the others).
GPT_ONLY_DATA = ("sample_tokens", "sample_temperature")
BERT_ONLY_DATA = ("mask_rate", "short_seq_prob")


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
# BERT (Devlin et al. 2019, appendix A.2): Adam lr 1e-4, b1 0.9, b2 0.999, L2 weight decay
# 0.01, warm-up over the first 10,000 steps then linear decay, 1,000,000 steps of 256
# sequences of 512 tokens (the paper spends 90% of them at 128 tokens; here every step has
# the preset's n_ctx). eps 1e-6 and clipping at global norm 1 are the released code's
# (google-research/bert, optimization.py). WordPiece trained on the corpus.
RECIPES["bert-base"] = dict(lr=1e-4, warmup_steps=10_000, schedule="linear", min_lr=0.0,
                            b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, clip_norm=1.0,
                            batch_size=256, steps=1_000_000, tokenizer="wordpiece")
RECIPES["bert-large"] = RECIPES["bert-base"]
# The CPU presets take their GPT twins' recipes (steps, batch, schedule, so that
# benchmarks/gpt_vs_bert.py compares the two at equal size, data and compute) with half the
# peak learning rate: at cpu-small's 2e-3 the post-LN BERT stays on the plateau of
# predicting frequent tokens whatever the context (its validation MLM loss flat from step
# 200 to 600, NSP at chance), at 1e-3 it goes on to use the context.
RECIPES["bert-cpu-small"] = dict(RECIPES["cpu-small"], lr=1e-3, tokenizer="wordpiece")
RECIPES["bert-tiny"] = dict(RECIPES["tiny"], lr=1e-3, tokenizer="wordpiece")

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


def check_objective(settings: RunSettings) -> None:
    """Refuse settings the model's architecture does not use, rather than ignore them:
    GPT's sampling settings for a BERT, BERT's masking settings for a GPT, and, for a BERT,
    a tokenizer kind without BERT's special tokens or a sample prompt without [MASK]."""
    cfg, data, defaults = settings.model, settings.data, DataConfig()
    other, unused = ("GPT", GPT_ONLY_DATA) if cfg.arch == "bert" else ("BERT", BERT_ONLY_DATA)
    changed = [f"{n}={getattr(data, n)!r}" for n in unused
               if getattr(data, n) != getattr(defaults, n)]
    if changed:
        why = ("a BERT prints fill-mask predictions, not generated text" if cfg.arch == "bert"
               else "a GPT is trained on every next token, nothing is masked")
        raise ValueError(f"{', '.join(changed)}: {other}-only setting(s), but arch="
                         f"{cfg.arch!r} ({why})")
    if cfg.arch != "bert":
        return
    if data.tokenizer in TOKENIZER_KINDS and data.tokenizer not in BERT_TOKENIZER_KINDS:
        raise ValueError(f"tokenizer={data.tokenizer!r} has no [CLS], [SEP] or [MASK]; "
                         f"arch='bert' needs tokenizer='wordpiece' (or the path of a BERT "
                         f"vocab.txt / WordPiece tokenizer folder)")
    if data.sample_prompt and "[MASK]" not in data.sample_prompt:
        raise ValueError(f"sample_prompt={data.sample_prompt!r} has no [MASK]: a BERT's "
                         "samples are its predictions at the [MASK]s of the prompt")


def check(settings: RunSettings) -> None:
    """The checks of the settings alone (before any data is read)."""
    check_objective(settings)
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
        trained = kind in ("bpe", "wordpiece")  # to the model's vocab_size
        return build_tokenizer(kind, texts, settings.model.vocab_size if trained else None)
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


# ----------------------------------------------------------------------------- objectives


@dataclass
class Objective:
    """What the job trains the model for: the one place it branches on cfg.arch.

    batch_fn(step) -> the global batch (or this process's shard) of that step, a pure
    function of (seed, step); loss_fn(params, batch, rng) -> (loss, metrics), the train
    step's LossFn; eval_fn(params) -> validation metrics with "val_loss" (what chooses the
    best checkpoint); summary(last eval) -> the final line printed; samples(params) ->
    the texts printed at the end; meta: what a resumed run must also match;
    flops_per_token: for the MFU logged.
    """

    batch_fn: Callable[[int], dict]
    loss_fn: Callable
    eval_fn: Callable[[Any], dict]
    summary: Callable[[dict], str]
    samples: Callable[[Any], list]
    meta: dict
    flops_per_token: float


def make_objective(settings: RunSettings, tokenizer: Tokenizer, tokens,
                   shard: tuple[int, int] | None) -> Objective:
    """GPT's language modelling or BERT's MLM + NSP over the run's token files. Raises
    ValueError now (before the run folder exists) when the data cannot give a batch."""
    if settings.model.arch == "bert":
        return _mlm_objective(settings, tokenizer, tokens, shard)
    return _lm_objective(settings, tokenizer, tokens, shard)


def _lm_objective(settings: RunSettings, tokenizer: Tokenizer, tokens, shard) -> Objective:
    """GPT-1's L_1: the next token of windows of n_ctx + 1 tokens of the stream."""
    cfg, loop, data = settings.model, settings.loop, settings.data
    train_batch(tokens.train, seed=loop.seed, step=0, batch_size=1, context=cfg.n_ctx)
    eval_fn = make_eval_fn(cfg, tokens.val, loop.batch_size, data.eval_batches,
                           tokens.bits_per_byte)

    def batch_fn(step):
        return {"tokens": train_batch(tokens.train, seed=loop.seed, step=step,
                                      batch_size=loop.batch_size, context=cfg.n_ctx,
                                      shard=shard)}

    def loss_fn(params, batch, rng):
        return lm_loss(params, batch["tokens"], cfg, train=True, rng=rng), {}

    def summary(last):
        return (f"final validation loss {last['val_loss']:.4f} nats/token, perplexity "
                f"{last['val_ppl']:.2f}, {last['val_bpb']:.3f} bits/byte")

    def samples(params):
        return print_samples(cfg, params, tokenizer, data, loop.seed)

    return Objective(batch_fn, loss_fn, eval_fn, summary, samples, {}, flops_per_token(cfg))


def _mlm_objective(settings: RunSettings, tokenizer: Tokenizer, tokens, shard) -> Objective:
    """BERT's MLM + NSP over sentence pairs cut from the stream (gptjax.data.mlm)."""
    cfg, loop, data = settings.model, settings.loop, settings.data
    vocab = BertVocab.from_tokenizer(tokenizer)
    eos = tokens.meta["eos_id"]
    train_docs = Documents.from_stream(tokens.train, eos_id=eos)
    val_docs = Documents.from_stream(tokens.val, eos_id=eos)
    rates = {"mask_rate": data.mask_rate, "short_seq_prob": data.short_seq_prob}
    mlm_train_batch(train_docs, vocab, seed=loop.seed, step=0, batch_size=1,
                    context=cfg.n_ctx, **rates)
    eval_fn = make_mlm_eval_fn(cfg, val_docs, vocab, loop.batch_size, data.eval_batches,
                               rates)

    def batch_fn(step):
        return mlm_train_batch(train_docs, vocab, seed=loop.seed, step=step,
                               batch_size=loop.batch_size, context=cfg.n_ctx, shard=shard,
                               **rates)

    def loss_fn(params, batch, rng):
        return bert_loss(params, batch, cfg, train=True, rng=rng)

    def summary(last):
        return (f"final validation MLM loss {last['val_mlm_loss']:.4f} nats/token "
                f"(perplexity {last['val_mlm_ppl']:.2f}), accuracy on masked tokens "
                f"{last['val_mlm_accuracy']:.4f}; NSP loss {last['val_nsp_loss']:.4f}, "
                f"accuracy {last['val_nsp_accuracy']:.4f}")

    def samples(params):
        return print_fill_mask_samples(cfg, params, tokenizer, data, val_docs, vocab,
                                       loop.seed)

    # Attention over every key, not half of them (flops_per_token counts causal
    # attention's half square), plus the MLM head's D x D transform.
    L, T, D = cfg.n_layer, cfg.n_ctx, cfg.n_embd
    flops = flops_per_token(cfg) + 6.0 * L * T * D + 6.0 * D * D
    meta = {"objective": {"name": "mlm+nsp", **rates}}
    return Objective(batch_fn, loss_fn, eval_fn, summary, samples, meta, flops)


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


def make_mlm_eval_fn(cfg: GPTConfig, val_docs: Documents, vocab: BertVocab, batch_size: int,
                     max_batches: int, rates: dict):
    """BERT's validation metrics over fixed masked pairs of the validation stream (the same
    pairs and masks at every evaluation and in every run: `mlm_eval_batches`' seed 0):

    val_mlm_loss      mean cross-entropy over every masked token of every batch
    val_mlm_accuracy  share of the masked tokens whose argmax is the original token
    val_mlm_ppl       exp(val_mlm_loss)
    val_nsp_loss, val_nsp_accuracy   over the pairs (IsNext / NotNext)
    val_loss          val_mlm_loss + val_nsp_loss, the training loss's form
    val_mlm_tokens    how many masked tokens the MLM figures are over

    Batch means are weighted by the batch's masked-token count, so the figures are those of
    the pooled tokens whatever the batching."""
    if val_docs.num_tokens == 0:
        raise ValueError("the validation split is empty; use a larger --val-fraction or corpus")
    batches = list(mlm_eval_batches(val_docs, vocab, batch_size=batch_size, context=cfg.n_ctx,
                                    num_batches=max_batches or None, **rates))
    counts = [int((b["mlm_labels"] >= 0).sum()) for b in batches]
    loss_fn = jax.jit(lambda p, b: bert_loss(p, b, cfg)[1])

    def evaluate(params):
        sums = dict.fromkeys(("mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"), 0.0)
        for batch, count in zip(batches, counts, strict=True):
            m = {k: float(v) for k, v in loss_fn(params, batch).items()}
            sums["mlm_loss"] += m["mlm_loss"] * count
            sums["mlm_accuracy"] += m["mlm_accuracy"] * count
            sums["nsp_loss"] += m["nsp_loss"]
            sums["nsp_accuracy"] += m["nsp_accuracy"]
        masked = max(sum(counts), 1)
        mlm, nsp = sums["mlm_loss"] / masked, sums["nsp_loss"] / len(batches)
        return {"val_loss": mlm + nsp, "val_mlm_loss": mlm,
                "val_mlm_ppl": math.exp(min(mlm, 50.0)),
                "val_mlm_accuracy": sums["mlm_accuracy"] / masked,
                "val_nsp_loss": nsp, "val_nsp_accuracy": sums["nsp_accuracy"] / len(batches),
                "val_mlm_tokens": sum(counts)}

    return evaluate


def sample_prompt(tokenizer: Tokenizer, data: DataConfig, cfg: GPTConfig) -> list[int]:
    """The ids the end-of-training samples start from (<eos> for an empty prompt); a
    ValueError when the prompt leaves no room for new tokens. For a BERT, the prompt's
    fill-mask input ([CLS] ... [SEP]), which must fit in the context."""
    if cfg.arch == "bert":
        if not (data.samples and data.sample_prompt):
            return []
        from gptjax.fill_mask import encode_masked

        ids = encode_masked(tokenizer, data.sample_prompt)
        if len(ids) > cfg.n_ctx:
            raise ValueError(f"sample_prompt is {len(ids)} tokens with [CLS] and [SEP], "
                             f"more than n_ctx={cfg.n_ctx}")
        return ids
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


# Held-out tokens shown around a masked one in BERT's end-of-training samples.
FILL_MASK_WINDOW = 24


def heldout_masked(docs: Documents, vocab: BertVocab, n: int, seed: int,
                   window: int) -> list[tuple[list[int], int, int]]:
    """n pieces of held-out text with one ordinary token masked: (input ids `[CLS] ...
    [SEP]` with the [MASK], its position, the original id), drawn from (seed, n)."""
    rng = np.random.default_rng([seed, n])
    long_enough = np.flatnonzero(docs.lengths >= 2)
    out = []
    for _ in range(n):
        if len(long_enough) == 0:
            break
        doc = int(long_enough[rng.integers(len(long_enough))])
        length = min(int(docs.lengths[doc]), window)
        start = int(docs.starts[doc]) + int(rng.integers(docs.lengths[doc] - length + 1))
        text = [int(t) for t in docs.tokens[start:start + length]]
        ordinary = [i for i, t in enumerate(text) if t not in vocab.special]
        if not ordinary:
            continue
        where = ordinary[int(rng.integers(len(ordinary)))]
        truth = text[where]
        text[where] = vocab.mask
        out.append(([vocab.cls, *text, vocab.sep], where + 1, truth))
    return out


def print_fill_mask_samples(cfg: GPTConfig, params, tokenizer: Tokenizer, data: DataConfig,
                            val_docs: Documents, vocab: BertVocab, seed: int, top_k: int = 5):
    """BERT's samples: the top tokens at [MASK] in sample_prompt, or at one masked token in
    each of `data.samples` pieces of held-out text (with the token that was there)."""
    from gptjax.fill_mask import fill_mask, format_predictions, predict_masked, token_text

    if data.samples == 0:
        return []
    if data.sample_prompt:
        text = format_predictions(fill_mask(params, cfg, tokenizer, data.sample_prompt, top_k))
        print(f"--- fill-mask ---\n{data.sample_prompt}\n{text}\n")
        return [text]
    window = min(FILL_MASK_WINDOW, cfg.n_ctx - 2)
    texts = []
    for i, (ids, _, truth) in enumerate(heldout_masked(val_docs, vocab, data.samples, seed,
                                                       window)):
        _, top, probs = predict_masked(params, cfg, ids, vocab.mask, top_k)
        guesses = " | ".join(f"{token_text(tokenizer, t)} {p:.3f}"
                             for t, p in zip(top[0], probs[0], strict=True))
        text = (f"{tokenizer.decode(ids[1:-1])}\n[MASK] was {token_text(tokenizer, truth)!r}; "
                f"predicted: {guesses}")
        texts.append(text)
        print(f"--- fill-mask sample {i + 1} ---\n{text}\n")
    return texts


def run(settings: RunSettings, *, resume: bool, overwrite: bool, quiet: bool = False,
        stop_after: int | None = None):
    """Check everything that can fail on bad input, then make the run folder, then train.

    stop_after=k stops after step k as a preemption would (gptjax.train.loop.train), for
    tests of exact resume.

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
    shard = par.process_batch_shard(loop)  # None with one process: the whole batch
    objective = make_objective(settings, tokenizer, tokens, shard)

    meta = {"model": cfg.identity(), "tokenizer": tokenizer.fingerprint(),
            "data": tokens.meta.get("source_fingerprint", source_fp), **objective.meta}
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
    params = init_params(cfg, jax.random.PRNGKey(loop.seed))
    tokens_per_step = loop.batch_size * cfg.n_ctx
    print(f"gptjax: {settings.preset} model, {count_params(params):,} "
          f"parameters, {len(tokens.train):,} training tokens, {loop.steps} steps of "
          f"{tokens_per_step:,} tokens, on {jax.local_device_count()} {jax.default_backend()} "
          f"device(s); run folder {run_dir}")
    result = train(run_dir=run_dir, loop=loop, optim=settings.optim, params=params,
                   loss_fn=objective.loss_fn, batch_fn=objective.batch_fn,
                   eval_fn=objective.eval_fn, meta=meta, resume=resume,
                   check_keys=CHECK_KEYS, tokens_per_step=tokens_per_step,
                   flops_per_step=objective.flops_per_token * tokens_per_step,
                   compute_dtype=cfg.dtype, show_progress=not quiet, model=cfg,
                   stop_after=stop_after)
    if not par.is_primary():
        return result
    plot_losses(run_dir)
    if result.status == "done":
        if result.evals:
            print(objective.summary(result.evals[-1]))
        objective.samples(result.state["params"])
        print(f"run saved in {run_dir} (checkpoints, metrics.jsonl, loss.png)")
    else:
        why = f"by signal {result.signal}" if result.signal is not None else "as asked"
        print(f"stopped {why} at step {int(result.state['step'])}; "
              f"checkpoint saved in {run_dir}; continue with --resume --out-dir {run_dir}")
    return result
