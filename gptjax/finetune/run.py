"""Fine-tuning (GPT-1, section 3.2): task data -> input transformations -> the shared loop.

The job behind `python finetune.py` (its command line is gptjax.cli.finetune). A run:

 1. the model, by `gptjax.loading`: a train.py run folder (`--init runs/cpu-small`), a
    Hugging Face openai-gpt / gpt2 / bert folder (`--init path/to/hf`), or random weights
    of the same shape (`--from-scratch`, the paper's "no pre-training" ablation);
 2. the special tokens `<start>`, `<delim>`, `<extract>`, `<pad>` (a BERT: [CLS], [SEP],
    [PAD]) added to the tokenizer and embedding when missing (rows N(0, 0.02), with a
    message);
 3. the task's examples (a built-in demo task, an upstream dataset folder, a
    generic CSV/JSONL file, or a Hugging Face name) turned into fixed-shape
    arrays by transforms.encode_examples;
 4. params {"gpt": ..., "head": ...} trained by gptjax.train.loop.train on
    L3 = L2 + lm_coef * L1, evaluated at the end of every epoch;

A BERT (arch "bert", from `train.py --preset bert-...` or an HF bert folder) runs through
the same steps with BERT's input layout (`[CLS] A [SEP] B [SEP]`, segment ids, the heads
over the pooled [CLS]; see gptjax.finetune.transforms) and no L1: its lm_coef is 0, and a
lm_coef other than 0 given explicitly (command line, config file) is refused.
 5. the best epoch's params (by the task's first metric) kept in RUN/best/,
    predictions of the validation (and test) split written by them, and a
    metrics table printed.

Every check of the settings, the devices, the task data and the model runs before the run
folder is created, so that bad input (exit 2) leaves no folder behind.

Run folder layout:

    RUN_DIR/config.json          resolved settings ("model" is the grown GPTConfig)
    RUN_DIR/tokenizer/           the tokenizer, special tokens included
    RUN_DIR/checkpoints/         orbax train states (exact resume with --resume)
    RUN_DIR/best/                params.safetensors + metrics.json of the best epoch
    RUN_DIR/metrics.jsonl        training and per-epoch validation records
    RUN_DIR/predictions_SPLIT.tsv  "index<TAB>prediction", GLUE's submission layout
    RUN_DIR/results.json         per-epoch metrics, the best, chance, and the best's
                                 metrics on every labelled split (split_metrics)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import KERNELS, PRESETS, GPTConfig
from gptjax.finetune.heads import init_head, make_head
from gptjax.finetune.metrics import compute
from gptjax.finetune.readers import (
    SPECS,
    TaskData,
    TaskSpec,
    generic_spec,
    get_spec,
    load_hf_task,
    load_task,
    parse_columns,
    read_generic,
    submission_rows,
    tokenizable_texts,
)
from gptjax.finetune.transforms import (
    LM_NORMALIZATIONS,
    SpecialIds,
    TaskArrays,
    add_task_tokens,
    encode_examples,
    make_loss_fn,
    make_predict_fn,
    predictions,
    special_ids,
)
from gptjax.loading import load_config, load_model
from gptjax.model import init_params
from gptjax.train.checkpoint import RUN_CONFIG, TOKENIZER_DIR
from gptjax.train.loop import LoopConfig, train, use_compile_cache
from gptjax.train.optim import OptimConfig, make_schedule
from gptjax.train.pretrain import check_parallel
from gptjax.train.rundir import prepare_run_dir

log = logging.getLogger(__name__)

BEST_DIR = "best"
DEFAULT_INIT = "runs/cpu-small"  # where `python train.py` puts its run


@dataclass(frozen=True)
class TaskConfig:
    """What to fine-tune on and how the task loss is made."""

    # The task: a built-in demo task or kind ("multiple_choice", "demo-entailment", ...),
    # a dataset name (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, snli, scitail,
    # storycloze, rocstories, race), "generic" (CSV/JSONL files with --columns), or
    # "hf:NAME" (a Hugging Face dataset such as hf:glue/sst2; needs the hf extra).
    task: str = "multiple_choice"
    # Folder holding the dataset in its upstream layout (GLUE task folder, RACE/, ...).
    data_dir: str = ""
    # Files, instead of data_dir (one-file formats and generic tasks).
    train_file: str = ""
    validation_file: str = ""
    test_file: str = ""
    # Generic files: the task kind, the column mapping (field=column,...) and the labels.
    kind: str = ""
    columns: str = ""
    labels: str = ""
    # Name of the validation split (MNLI: validation_matched or validation_mismatched).
    validation_split: str = "validation"
    # Use at most this many training / validation examples (0: all).
    max_train: int = 0
    max_validation: int = 0
    # Passes over the training set; fixes loop.steps unless --steps is given.
    epochs: int = 3
    # Linear warm-up over this share of the steps (GPT-1: 0.002), unless --warmup-steps.
    warmup_fraction: float = 0.002
    # Length budget of a transformed sequence (0: the model's n_ctx).
    max_length: int = 0
    # lambda of L3 = L2 + lambda * L1 (0: no auxiliary language-modelling loss). GPT only:
    # a BERT has no L1 (its default is 0; another value given explicitly is an error).
    lm_coef: float = 0.5
    # L1's mean: "sequence" (per sequence, then over sequences: the GPT-1 code) or
    # "token" (over all real tokens of the batch: Hugging Face's lm_loss).
    lm_normalization: str = "sequence"
    # Dropout on the head's input (GPT-1: 0.1).
    head_dropout: float = 0.1
    # If set, the transformer's three dropout rates during fine-tuning (GPT-1: 0.1).
    model_dropout: float | None = None
    # Examples per evaluation batch.
    eval_batch_size: int = 64
    # Built-in demo tasks: training / validation / test examples (0: the defaults).
    demo_train: int = 0
    demo_validation: int = 0
    demo_test: int = 0

    def __post_init__(self):
        if self.lm_normalization not in LM_NORMALIZATIONS:
            raise ValueError(f"lm_normalization={self.lm_normalization!r} is not one of "
                             f"{list(LM_NORMALIZATIONS)}")
        if not (self.lm_coef >= 0 and math.isfinite(self.lm_coef)):
            raise ValueError(f"lm_coef={self.lm_coef} must be a finite number >= 0")
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction={self.warmup_fraction} must lie in [0, 1)")
        if self.model_dropout is not None and not 0 <= self.model_dropout < 1:
            raise ValueError(f"model_dropout={self.model_dropout} must lie in [0, 1)")
        for name in ("max_train", "max_validation", "max_length", "demo_train",
                     "demo_validation", "demo_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size={self.eval_batch_size} must be >= 1")


# Fine-tuning recipes. "gpt1" is the paper's (section 4.1): lr 6.25e-5, batch 32, 3
# epochs, warm-up over 0.2% then linear decay, clipping at 1, weight decay 0.01,
# lambda 0.5. "cpu" is for the small models of a 2-core CPU pre-trained for minutes:
# their few hundred fine-tuning steps need a larger learning rate.
RECIPES: dict[str, dict] = {
    "gpt1": dict(lr=6.25e-5, schedule="linear", min_lr=0.0, weight_decay=0.01, clip_norm=1.0,
                 batch_size=32, epochs=3, warmup_fraction=0.002, lm_coef=0.5),
    "cpu": dict(lr=5e-4, schedule="linear", min_lr=0.0, weight_decay=0.01, clip_norm=1.0,
                b2=0.99, batch_size=16, epochs=3, warmup_fraction=0.1, lm_coef=0.5,
                log_every=5, max_length=96),
}


def recipe_for(cfg: GPTConfig) -> str:
    """GPT-1's recipe for GPT-1-sized and larger models, the CPU one below."""
    return "gpt1" if cfg.n_embd >= 768 else "cpu"


@dataclass(frozen=True)
class SourceConfig:
    """The model to start from, the recipe of defaults, and where the run goes."""

    # A train.py / finetune.py run folder (GPT or BERT) or a Hugging Face openai-gpt / gpt2
    # / bert folder ("" = runs/cpu-small, where `python train.py` puts its run; none with
    # from_scratch).
    init: str = ""
    # Random weights of the same shape, the architecture and tokenizer from init if given,
    # else from preset: GPT-1's no-pre-training ablation.
    from_scratch: bool = False
    # The model of from_scratch without init (a BPE tokenizer trained on the built-in
    # corpus; WordPiece for a BERT preset).
    preset: str = "cpu-small"
    # Fine-tuning defaults: "gpt1" (the paper's) or "cpu" ("" = gpt1 for models 768 wide
    # or more, else cpu).
    recipe: str = ""
    # Which implementation runs the model (GPTConfig.kernels): "auto" = the fast paths
    # measured faster on this backend.
    kernels: str = "auto"
    # Run folder ("" = runs/finetune-TASK).
    out_dir: str = ""

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.recipe and self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {sorted(RECIPES)}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels={self.kernels!r} is not one of {list(KERNELS)}")


@dataclass
class Settings:
    """Everything a fine-tuning run is given (gptjax.cli.finetune resolves it)."""

    source: SourceConfig
    task: TaskConfig
    optim: OptimConfig
    loop: LoopConfig
    # Settings given explicitly (saved run, config file, command line), which the
    # epoch-derived defaults (steps, eval_every, warmup_steps) must not replace.
    explicit: frozenset = frozenset()

    @property
    def out_dir(self) -> Path:
        return Path(self.source.out_dir)

    def to_dict(self, cfg: GPTConfig | None = None) -> dict:
        source = dataclasses.asdict(self.source)
        source.pop("out_dir")  # a run folder may move
        out = {"task": dataclasses.asdict(self.task), "optim": dataclasses.asdict(self.optim),
               "loop": dataclasses.asdict(self.loop), **source}
        if cfg is not None:
            out["model"] = dataclasses.asdict(cfg)
        return out


# ----------------------------------------------------------------------------- the model


def check_init(init: str) -> Path:
    """The --init folder; FileNotFoundError, saying what to do, when it is missing."""
    path = Path(init)
    if not path.exists():
        raise FileNotFoundError(
            f"--init {path} does not exist; pre-train one with `python train.py` "
            "(it writes runs/cpu-small), give a Hugging Face folder, or pass --from-scratch")
    return path


def model_config(source: SourceConfig) -> GPTConfig:
    """The config of the model to fine-tune, without loading weights (for the recipe)."""
    if source.init:
        return load_config(check_init(source.init))
    return PRESETS[source.preset]


def load_init(source: SourceConfig, seed: int):
    """(cfg, params, tokenizer) to fine-tune: pre-trained, or fresh of the same shape.

    source.init: a train.py / finetune.py run folder or a Hugging Face folder (see
    gptjax.loading). With from_scratch the architecture and tokenizer come from init if
    given, else from the preset with a BPE tokenizer (a BERT: WordPiece) trained on the
    built-in corpus.
    """
    key = jax.random.PRNGKey(seed)
    if source.init:
        cfg, params, tokenizer = load_model(check_init(source.init),
                                            weights=not source.from_scratch)
        if source.from_scratch:
            params = init_params(cfg, key)
        return cfg, params, tokenizer
    if not source.from_scratch:
        raise ValueError("no model to fine-tune: give --init (a train.py run folder or a "
                         "Hugging Face folder) or --from-scratch")
    from gptjax.data.corpus import builtin_corpus
    from gptjax.data.tokenizer import build_tokenizer

    cfg = PRESETS[source.preset]
    kind = "wordpiece" if cfg.arch == "bert" else "bpe"
    tokenizer = build_tokenizer(kind, builtin_corpus(), cfg.vocab_size)
    return cfg, init_params(cfg, key), tokenizer


# ----------------------------------------------------------------------------- the data


def load_task_data(tc: TaskConfig) -> TaskData:
    """The task's train / validation (/ test) examples as configured."""
    from gptjax.finetune.demo_tasks import DEMO_SPECS, KIND_TO_DEMO, demo_task

    name = tc.task
    if name in DEMO_SPECS or name.replace("-", "_") in KIND_TO_DEMO:
        return demo_task(name, tc.demo_train or None, tc.demo_validation or None,
                         n_test=tc.demo_test or None)
    splits = ["train", tc.validation_split]
    if name.startswith("hf:"):
        return load_hf_task(name[3:], splits)
    files = {s: f for s, f in (("train", tc.train_file), (tc.validation_split,
                                                          tc.validation_file),
                               ("test", tc.test_file)) if f}
    if name == "generic":
        if not tc.kind:
            raise ValueError("--task generic needs --kind (classification, entailment, "
                             "similarity or multiple_choice)")
        labels = [s.strip() for s in tc.labels.split(",")] if tc.labels else None
        spec = generic_spec(tc.kind, labels)
        columns = parse_columns(tc.columns)
        missing = [s for s in splits if s not in files]
        if missing:
            raise ValueError(f"--task generic needs files for {missing} "
                             "(--train-file, --validation-file)")
        return TaskData(spec, {s: read_generic(f, spec, columns) for s, f in files.items()})
    spec = get_spec(name)
    if tc.test_file or (tc.data_dir and _has_test(spec, tc.data_dir)):
        splits.append("test")
    if files and not tc.data_dir:
        return load_task(spec.name if name not in SPECS else name, files, list(files))
    if not tc.data_dir:
        raise ValueError(f"task {name!r} needs --data-dir (its folder in the upstream layout) "
                         "or --train-file / --validation-file")
    data = load_task(name, tc.data_dir, splits)
    for split, path in files.items():  # explicit files replace the folder's
        data.splits[split] = load_task(name, {split: path}, [split])[split]
    return data


def _has_test(spec: TaskSpec, folder) -> bool:
    from gptjax.finetune.readers import glue_file

    try:
        return glue_file(spec.name, folder, "test").is_file()
    except (ValueError, FileNotFoundError):
        return False


def encode_splits(data: TaskData, tokenizer, n_ctx: int, tc: TaskConfig,
                  cfg: GPTConfig | None = None):
    """{split: TaskArrays} with every text encoded once (encode_batch over unique texts), in
    the input layout of `cfg`'s architecture (None: GPT-1's)."""
    examples = {s: list(ex) for s, ex in data.splits.items()}
    if tc.max_train:
        examples["train"] = examples["train"][: tc.max_train]
    if tc.max_validation and tc.validation_split in examples:
        examples[tc.validation_split] = examples[tc.validation_split][: tc.max_validation]
    texts = sorted({t for ex in examples.values() for t in tokenizable_texts(ex)})
    table = dict(zip(texts, tokenizer.encode_batch(texts), strict=True))
    specials = special_ids(tokenizer, cfg) if cfg is not None else SpecialIds.from_tokenizer(
        tokenizer)
    n_choices = data.spec.n_choices
    if data.spec.kind == "multiple_choice":
        n_choices = max(len(e.choices) for ex in examples.values() for e in ex)
    out = {}
    for split, ex in examples.items():
        out[split] = encode_examples(data.spec.kind, ex, table.__getitem__, specials, n_ctx,
                                     n_choices=n_choices, regression=data.spec.regression)
        if out[split].n_truncated:
            log.warning("%s: %d of %d examples truncated to fit %d tokens", split,
                        out[split].n_truncated, len(ex), n_ctx)
    return out, examples


def arrays_fingerprint(arrays: TaskArrays) -> str:
    h = hashlib.sha256()
    for name in ("tokens", "mask", "extract", "choices", "labels"):
        h.update(np.ascontiguousarray(getattr(arrays, name)).tobytes())
    if arrays.token_types is not None:
        h.update(np.ascontiguousarray(arrays.token_types).tobytes())
    return h.hexdigest()


def make_batch_fn(arrays: TaskArrays, batch_size: int, seed: int):
    """batch_fn(step): epoch e = step // steps_per_epoch visits a permutation of the
    training set drawn from (seed, e); a pure function of the step."""
    n = len(arrays)
    per_epoch = steps_per_epoch(n, batch_size)

    @functools.lru_cache(maxsize=2)
    def order(epoch):
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        return np.resize(perm, per_epoch * batch_size)  # wraps when n < batch_size

    def batch_fn(step):
        epoch, k = divmod(step, per_epoch)
        return arrays.batch(order(epoch)[k * batch_size: (k + 1) * batch_size])

    return batch_fn


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    """Full batches per pass (the remainder, different each epoch, waits for the next)."""
    return max(1, n_examples // batch_size)


# ----------------------------------------------------------------------------- evaluation


def batched_outputs(predict, params, arrays: TaskArrays, batch_size: int) -> np.ndarray:
    """The head's outputs over a whole split, in fixed-size batches (the last one padded)."""
    n = len(arrays)
    batch_size = min(batch_size, n)
    outs = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        idx = np.where(idx < n, idx, 0)
        outs.append(np.asarray(predict(params, arrays.batch(idx))))
    return np.concatenate(outs)[:n]


def outputs_to_metrics(spec: TaskSpec, outputs: np.ndarray, labels: np.ndarray):
    """(predictions, {"val_loss": L2, metric: value}) for labelled examples."""
    preds = predictions(outputs, spec.regression)
    if spec.regression:
        preds = preds.astype(np.float64)
        known = ~np.isnan(labels)
        loss = float(np.mean((preds[known] - labels[known]) ** 2)) if known.any() else math.nan
    else:
        known = labels >= 0
        z = outputs[known].astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        loss = float(-logp[np.arange(len(z)), labels[known]].mean()) if known.any() else math.nan
    values = {"val_loss": loss}
    if known.any():
        values.update(compute(spec.metrics, labels[known], preds[known]))
    return preds, values


def save_params(params, folder: Path, metrics: dict) -> None:
    """params.safetensors ('/'-joined pytree paths) + metrics.json, written atomically."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat["/".join(str(getattr(p, "key", p)) for p in path)] = np.asarray(leaf)
    tmp = folder / f".params.tmp{os.getpid()}"
    save_file(flat, str(tmp))
    os.replace(tmp, folder / "params.safetensors")
    tmp = folder / f".metrics.tmp{os.getpid()}"
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, folder / "metrics.json")


def load_params(folder: Path, like):
    """The params saved by save_params, in the structure of `like`."""
    from safetensors.numpy import load_file

    flat = load_file(str(Path(folder) / "params.safetensors"))
    leaves = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(like)[0]:
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if name not in flat or flat[name].shape != tuple(leaf.shape):
            raise ValueError(f"{folder}: parameter {name} missing or of the wrong shape")
        leaves.append(jnp.asarray(flat[name]))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)


def finalize_schedule(settings: Settings, n_train: int) -> Settings:
    """steps = epochs x steps per epoch, evaluation every epoch, warm-up from the fraction
    (each unless given explicitly)."""
    explicit = settings.explicit
    loop, optim, task = settings.loop, settings.optim, settings.task
    per_epoch = steps_per_epoch(n_train, loop.batch_size)
    changes = {}
    if "steps" not in explicit:
        changes["steps"] = task.epochs * per_epoch
    if "eval_every" not in explicit:
        changes["eval_every"] = per_epoch
    loop = dataclasses.replace(loop, **changes) if changes else loop
    if "warmup_steps" not in explicit:
        optim = dataclasses.replace(optim, warmup_steps=int(round(task.warmup_fraction
                                                                 * loop.steps)))
    return dataclasses.replace(settings, loop=loop, optim=optim)


# ----------------------------------------------------------------------------- the run


@dataclass
class FinetuneResult:
    status: str
    signal: int | None
    run_dir: Path
    spec: TaskSpec
    epochs: list  # per-evaluation records (step, epoch, val_loss, metrics)
    best: dict  # the best evaluation record
    chance: float | None
    n_train: int
    n_validation: int
    train_result: object = None
    # The best epoch's params (chosen on validation) on each labelled split other than
    # train: {split: {"loss", metrics..., "chance", "n"}}; a test split is evaluated only
    # here, once, after the choice.
    split_metrics: dict = dataclasses.field(default_factory=dict)


def run(settings: Settings, *, resume: bool = False, overwrite: bool = False,
        quiet: bool = False, stop_after: int | None = None) -> FinetuneResult:
    """Check everything that can fail on bad input, then make the run folder, then train.

    Order: the task data, the devices, the model and its tokenizer, the encoded examples
    and the schedule; only then the run folder.
    """
    tc = settings.task
    run_dir = Path(settings.out_dir)
    seed = settings.loop.seed
    data = load_task_data(tc)
    check_parallel(settings.loop)
    use_compile_cache(settings.loop.compile_cache)  # before anything is compiled
    if resume:  # the grown model and tokenizer saved by the run (weights: its checkpoint)
        cfg, gpt_params, tokenizer = load_model(run_dir, weights=False)
    else:
        cfg, gpt_params, tokenizer = load_init(settings.source, seed)
        tokenizer, cfg, gpt_params, added = add_task_tokens(
            tokenizer, cfg, gpt_params, jax.random.fold_in(jax.random.PRNGKey(seed), 1))
        if added:
            print(f"note: the model lacked the special tokens {added}; added to the tokenizer "
                  f"and given new embedding rows N(0, {cfg.init_std}) (vocab_size now "
                  f"{cfg.vocab_size})")
        if tc.model_dropout is not None:
            p = tc.model_dropout
            cfg = cfg.replace(embd_pdrop=p, attn_pdrop=p, resid_pdrop=p)
    cfg = cfg.replace(kernels=settings.source.kernels)
    tc = bert_task_settings(cfg, tc, settings.explicit)
    settings = dataclasses.replace(settings, task=tc)  # saved in config.json as run

    spec = data.spec
    val_split = tc.validation_split if tc.validation_split in data.splits else "validation"
    n_ctx = min(cfg.n_ctx, tc.max_length or cfg.n_ctx)
    arrays, examples = encode_splits(data, tokenizer, n_ctx, tc, cfg)
    train_arrays, val_arrays = arrays["train"], arrays[val_split]
    settings = finalize_schedule(settings, len(train_arrays))
    loop = settings.loop
    make_schedule(settings.optim, loop.steps)  # an explicit warm-up longer than training

    head = make_head(spec.kind, spec.n_classes, tc.head_dropout)
    head_params = init_head(head, spec.kind, cfg.n_embd,
                            jax.random.fold_in(jax.random.PRNGKey(seed), 2),
                            n_choices=train_arrays.tokens.shape[1])
    if gpt_params is None:  # resume: the structure only; values come from the checkpoint
        gpt_params = init_params(cfg, jax.random.PRNGKey(seed))
    params = {"gpt": gpt_params, "head": head_params}

    loss_fn = make_loss_fn(cfg, head, spec.kind, lm_coef=tc.lm_coef,
                           lm_normalization=tc.lm_normalization, regression=spec.regression)
    predict = jax.jit(make_predict_fn(cfg, head, spec.kind))
    batch_fn = make_batch_fn(train_arrays, loop.batch_size, seed)
    per_epoch = steps_per_epoch(len(train_arrays), loop.batch_size)
    best_dir = run_dir / BEST_DIR
    main_metric = spec.metrics[0]
    state = {"best": None}
    if resume and (best_dir / "metrics.json").is_file():
        state["best"] = json.loads((best_dir / "metrics.json").read_text())

    def eval_fn(p):
        outputs = batched_outputs(predict, p, val_arrays, tc.eval_batch_size)
        _, values = outputs_to_metrics(spec, outputs, val_arrays.labels)
        values = {("val_" + k if not k.startswith("val_") else k): v for k, v in values.items()}
        score = _score(values, main_metric)
        best = state["best"]
        if best is None or score > best["score"]:
            state["best"] = {"score": score, **values}
            save_params(p, best_dir, state["best"])
        return values

    chance = _chance(spec, examples[val_split])
    source = settings.source
    run_dir = prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    (run_dir / RUN_CONFIG).write_text(json.dumps(settings.to_dict(cfg), indent=2))
    if not resume:
        tokenizer.save(run_dir / TOKENIZER_DIR)
    meta = {"model": cfg.identity(), "tokenizer": tokenizer.fingerprint(),
            "data": arrays_fingerprint(train_arrays)}
    if not quiet:
        print(f"gptjax finetune: task {spec.name} ({spec.kind}), {len(train_arrays)} train / "
              f"{len(val_arrays)} {val_split} examples, sequences of {train_arrays.length} "
              f"tokens x {train_arrays.tokens.shape[1]}; {loop.steps} steps of "
              f"{loop.batch_size} ({per_epoch} per epoch); "
              f"{'BERT, no LM loss' if cfg.arch == 'bert' else f'lambda = {tc.lm_coef}'}; "
              f"{'from scratch' if source.from_scratch else 'init ' + source.init}; "
              f"run folder {run_dir}")
    kwargs = {"stop_after": stop_after} if stop_after is not None else {}
    result = train(run_dir=run_dir, loop=loop, optim=settings.optim, params=params,
                   loss_fn=loss_fn, batch_fn=batch_fn, eval_fn=eval_fn, meta=meta,
                   resume=resume, show_progress=not quiet, model=cfg, **kwargs)

    epochs = _eval_records(run_dir, per_epoch)
    best = max(epochs, key=lambda r: _score(r, main_metric)) if epochs else {}
    out = FinetuneResult(result.status, result.signal, run_dir, spec, epochs, best, chance,
                         len(train_arrays), len(val_arrays), result)
    if result.status != "done":
        if not quiet:
            print(f"stopped at step {int(result.state['step'])}; continue with --resume "
                  f"--out-dir {run_dir}")
        return out
    best_params = load_params(best_dir, jax.tree_util.tree_map(jnp.asarray,
                                                               result.state["params"]))
    for split, arr in arrays.items():
        if split == "train":
            continue
        outputs = batched_outputs(predict, best_params, arr, tc.eval_batch_size)
        preds, values = outputs_to_metrics(spec, outputs, arr.labels)
        if len(values) > 1:  # labelled: the metrics besides the loss
            out.split_metrics[split] = {"loss": values.pop("val_loss"), **values,
                                        "chance": _chance(spec, examples[split]),
                                        "n": len(arr)}
        rows = submission_rows(spec, examples[split], preds)
        lines = ["index\tprediction"] + [f"{uid}\t{value}" for uid, value in rows]
        (run_dir / f"predictions_{split}.tsv").write_text("\n".join(lines) + "\n")
    (run_dir / "results.json").write_text(json.dumps(
        {"task": spec.name, "kind": spec.kind, "metrics": list(spec.metrics),
         "chance": chance, "epochs": epochs, "best": best,
         "split_metrics": out.split_metrics, "n_train": len(train_arrays),
         "n_validation": len(val_arrays), "lm_coef": tc.lm_coef,
         "from_scratch": source.from_scratch, "init": source.init}, indent=1))
    if not quiet:
        print(format_table(out))
    return out


def bert_task_settings(cfg: GPTConfig, tc: TaskConfig, explicit: frozenset) -> TaskConfig:
    """A BERT has no auxiliary LM loss: lm_coef becomes 0, unless a value other than 0 was
    given explicitly, which is refused (a ValueError) rather than silently dropped. GPT
    settings are returned unchanged."""
    if cfg.arch != "bert" or tc.lm_coef == 0:
        return tc
    if "lm_coef" in explicit:
        raise ValueError(f"lm_coef={tc.lm_coef}: the model is a BERT, which has no auxiliary "
                         "language-modelling loss (GPT-1's L1 predicts each next token; a "
                         "BERT reads both sides of every token); leave lm_coef out or give 0")
    return dataclasses.replace(tc, lm_coef=0.0)


def _score(values: dict, metric: str) -> float:
    """Higher is better: the task's first metric (NaN counts as the worst), else -val_loss."""
    score = values.get(f"val_{metric}", -values["val_loss"])
    return -math.inf if score is None or math.isnan(score) else float(score)


def _chance(spec: TaskSpec, examples) -> float | None:
    if spec.regression or any(e.label is None for e in examples):
        return None
    from gptjax.finetune.demo_tasks import chance_accuracy

    return chance_accuracy(spec, examples)


def _eval_records(run_dir: Path, per_epoch: int) -> list[dict]:
    """The validation records of metrics.jsonl (the last one per step, after resumes)."""
    by_step = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            by_step[rec["step"]] = {"epoch": rec["step"] / per_epoch, **rec}
    return [by_step[s] for s in sorted(by_step)]


def format_table(result: FinetuneResult) -> str:
    """The per-epoch validation metrics as a text table, best row marked."""
    spec = result.spec
    names = ["val_loss"] + [f"val_{m}" for m in spec.metrics]
    header = ["epoch", "step"] + [n[4:] for n in names]
    rows = []
    for rec in result.epochs:
        mark = " *" if rec is result.best or rec == result.best else ""
        rows.append([f"{rec['epoch']:g}", str(rec["step"])] +
                    [f"{rec.get(n, float('nan')):.4f}" for n in names] + [mark])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [f"task {spec.name} ({spec.kind}): {result.n_train} train / {result.n_validation} "
             f"validation examples" + (f"; chance {result.chance:.4f}"
                                       if result.chance is not None else "")]
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        lines.append("  ".join(c.rjust(w) for c, w in zip(r[:-1], widths, strict=True)) + r[-1])
    lines.append(f"* best ({spec.metrics[0]}); its params in {result.run_dir / BEST_DIR}, "
                 f"predictions in {result.run_dir}/predictions_*.tsv")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Table 5


TABLE5_TASKS = ("demo-classification", "demo-entailment", "demo-similarity",
                "demo-multiple-choice")
TABLE5_CONDITIONS = (("from scratch", True, 0.5), ("pre-trained, lambda 0.5", False, 0.5),
                     ("pre-trained, lambda 0", False, 0.0))
TABLE5_SEEDS = 3


def table5_record(result: FinetuneResult, seed: int) -> dict:
    """One run of the table: the epoch chosen on validation and its score on test.

    The choice is the run's own (its best/ params: the first epoch with the highest
    validation score of the task's first metric); the test score is that epoch's params on
    the test split, which the run evaluates once, after training.
    """
    metric = result.spec.metrics[0]
    test = result.split_metrics.get("test")
    if test is None or metric not in test:
        raise ValueError(f"{result.run_dir}: task {result.spec.name} has no labelled test "
                         "split; Table 5 reports on test and chooses on validation")
    return {"seed": seed, "run_dir": str(result.run_dir), "metric": metric,
            "chosen_epoch": result.best["epoch"], "chosen_step": result.best["step"],
            "validation": result.best[f"val_{metric}"], "test": test[metric],
            "test_chance": test["chance"], "n_test": test["n"],
            "validation_by_epoch": [r.get(f"val_{metric}") for r in result.epochs]}


def table5_markdown(cells: dict, tasks, conditions, seeds) -> str:
    """The table: per task and condition, mean and sample standard deviation over seeds of
    the test score at the epoch chosen on validation. cells[(task, label)] = records."""
    labels = [c[0] for c in conditions]
    lines = [f"Test-split score of the epoch chosen on the validation split: mean ± sample "
             f"standard deviation (ddof 1) over {len(seeds)} seeds (loop seeds "
             f"{', '.join(map(str, seeds))}); chance on the test split.", "",
             "| task | metric | test examples | chance | " + " | ".join(labels) + " |",
             "|---|---|---:|---:|" + "---:|" * len(labels)]
    for task in tasks:
        first = cells[(task, labels[0])][0]
        row = [task, first["metric"], str(first["n_test"]), f"{first['test_chance']:.3f}"]
        for label in labels:
            scores = np.array([r["test"] for r in cells[(task, label)]])
            spread = f" ± {scores.std(ddof=1):.3f}" if len(scores) > 1 else ""
            row.append(f"{scores.mean():.3f}{spread}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def table5(settings: Settings, *, seeds: int = TABLE5_SEEDS, quiet: bool = True,
           tasks=TABLE5_TASKS, conditions=TABLE5_CONDITIONS) -> str:
    """GPT-1's Table 5 in miniature: each built-in task from scratch and pre-trained, with
    and without the auxiliary LM loss, each `seeds` times. Returns a Markdown table.

    Run k of a (task, condition) has loop seed settings.loop.seed + k, which sets the
    from-scratch weights, the head's initial weights, the batch order and the dropout; the
    examples are the same for every run. Each run chooses its epoch on the validation
    split and is scored on the test split (held-out documents disjoint from validation's,
    see gptjax.finetune.demo_tasks), so no reported number was used to choose anything.
    Writes OUT/table5.md and OUT/table5.json (every run's choice, its validation score
    per epoch and its test score); each run's folder is OUT/TASK/CONDITION/seed-S.
    """
    from gptjax.finetune.demo_tasks import demo_name

    if seeds < 1:
        raise ValueError(f"seeds={seeds} must be >= 1")
    tasks = [demo_name(t) for t in tasks]  # the built-in tasks have a test split
    base = Path(settings.out_dir)
    seed_values = [settings.loop.seed + k for k in range(seeds)]
    cells = {}
    for task in tasks:
        for label, scratch, lam in conditions:
            slug = label.replace(" ", "-").replace(",", "")
            cells[(task, label)] = []
            for seed in seed_values:
                tc = dataclasses.replace(settings.task, task=task, lm_coef=lam)
                source = dataclasses.replace(settings.source, from_scratch=scratch,
                                             out_dir=str(base / task / slug / f"seed-{seed}"))
                loop = dataclasses.replace(settings.loop, seed=seed)
                s = dataclasses.replace(settings, task=tc, source=source, loop=loop)
                r = run(s, overwrite=True, quiet=quiet)
                if r.status != "done":
                    raise RuntimeError(f"{r.run_dir}: stopped by signal {r.signal}; Table 5 "
                                       "is incomplete (run it again to redo every run)")
                rec = table5_record(r, seed)
                cells[(task, label)].append(rec)
                print(f"{task:22s} {label:24s} seed {seed}: epoch {rec['chosen_epoch']:g} "
                      f"chosen on validation ({rec['metric']} {rec['validation']:.4f}), "
                      f"test {rec['test']:.4f}", flush=True)
    table = table5_markdown(cells, tasks, conditions, seed_values)
    base.mkdir(parents=True, exist_ok=True)
    (base / "table5.md").write_text(table + "\n")
    (base / "table5.json").write_text(json.dumps(
        {"seeds": seed_values, "spread": "sample standard deviation (ddof 1)",
         "runs": [{"task": t, "condition": c, **rec} for (t, c), recs in cells.items()
                  for rec in recs]}, indent=1))
    return table
