"""The writer and the reader side by side: a GPT and a BERT of equal size, pre-trained by
train.py's job on the same data with the same compute, then fine-tuned alike.

    python benchmarks/gpt_vs_bert.py                         # cpu-small vs bert-cpu-small
    python benchmarks/gpt_vs_bert.py --steps 2000 --demo-train 1200 --epochs 3   # bigger
    python benchmarks/gpt_vs_bert.py --gpt-preset tiny --bert-preset bert-tiny --steps 20 \\
        --warmup-steps 2 --seeds 2 --demo-train 32 --demo-validation 16 --demo-test 16 \
        --epochs 1 --max-length 48   # a quick check that it all runs

What is held equal: the model's size (width, depth, heads, context and vocabulary size must
match between the two presets), the corpus (the built-in one; each model trains its own
tokenizer on it, byte-level BPE for the GPT and WordPiece for the BERT, to the same vocabulary
size), and the training compute (the same steps of the same batch of sequences of the same
context; the optimizer and schedule are each preset's recipe, which for the CPU presets
differ in the peak learning rate only, see gptjax.train.pretrain.RECIPES). Then:

  1. each model is fine-tuned on the four built-in tasks (gptjax.finetune.demo_tasks),
     `--seeds` runs each (loop seeds 0, 1, ...): the epoch is chosen on the validation split
     and its score reported on the test split, as finetune.py's Table 5 does; the GPT with
     GPT-1's layout and lambda = --gpt-lm-coef, the BERT with its own layout and no LM loss;
  2. what only one of them can do: the GPT's zero-shot multiple choice by likelihood on the
     multiple-choice task's test split (gptjax.evaluate) and a generated sample; the BERT's
     fill-mask accuracy on held-out masked tokens (its final evaluation's val_mlm_accuracy,
     over the validation text's masked tokens) and its predictions for one sentence.

Writes OUT/gpt_vs_bert.md (the tables) and OUT/gpt_vs_bert.json (every run's figures and the
settings) and prints the tables. The runs are OUT/gpt, OUT/bert (pre-training) and
OUT/finetune/MODEL/TASK/seed-S. The default was sized to finish in about 25 minutes on two
CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptjax.cli import settings as cli  # noqa: E402
from gptjax.config import PRESETS  # noqa: E402

TASKS = ("demo-classification", "demo-entailment", "demo-similarity", "demo-multiple-choice")
SIZE_FIELDS = ("n_layer", "n_embd", "n_head", "n_ctx", "vocab_size", "n_inner")
FILL_MASK_SENTENCE = "The [MASK] statement is used to leave a loop early."
GENERATION_PROMPT = "The module"


@dataclass(frozen=True)
class CompareConfig:
    """The two models, how long they pre-train, and how they are fine-tuned."""

    # Where the runs, gpt_vs_bert.md and gpt_vs_bert.json go.
    out_dir: str = "runs/gpt_vs_bert"
    # The GPT and the BERT preset; they must be of equal size (width, depth, heads,
    # context, vocabulary size).
    gpt_preset: str = "cpu-small"
    bert_preset: str = "bert-cpu-small"
    # Pre-training steps and sequences per step, the same for both (0: the presets' recipe).
    steps: int = 0
    batch_size: int = 0
    # Warm-up steps of both (None: the presets' recipe).
    warmup_steps: int | None = None
    # Use the pre-trained runs OUT/gpt and OUT/bert of an earlier call instead of training.
    reuse_pretrained: bool = False
    # Fine-tuning runs per model and task (loop seeds 0, 1, ...).
    seeds: int = 3
    # Built-in task sizes: training, validation and test examples.
    demo_train: int = 400
    demo_validation: int = 150
    demo_test: int = 150
    # Fine-tuning epochs and the length budget of a task sequence.
    epochs: int = 2
    max_length: int = 64
    # The GPT's lambda (GPT-1's auxiliary LM loss); a BERT has none.
    gpt_lm_coef: float = 0.5

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("seeds", "demo_train", "demo_validation", "demo_test", "epochs",
                     "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("gpt_preset", "bert_preset"):
            if getattr(self, name) not in PRESETS:
                raise ValueError(f"{name}={getattr(self, name)!r} is no preset; choose one "
                                 f"of {sorted(PRESETS)}")
        gpt, bert = PRESETS[self.gpt_preset], PRESETS[self.bert_preset]
        if gpt.arch != "gpt" or bert.arch != "bert":
            raise ValueError(f"gpt_preset={self.gpt_preset!r} must be a GPT and bert_preset="
                             f"{self.bert_preset!r} a BERT (arch {gpt.arch!r}, {bert.arch!r})")
        differ = [f"{f}: {getattr(gpt, f)} vs {getattr(bert, f)}" for f in SIZE_FIELDS
                  if getattr(gpt, f) != getattr(bert, f)]
        if differ:
            raise ValueError(f"{self.gpt_preset} and {self.bert_preset} differ in size "
                             f"({'; '.join(differ)}); the comparison needs equal sizes")


COMMAND = cli.Command(
    prog="python benchmarks/gpt_vs_bert.py",
    description="GPT vs BERT at equal size, data and pre-training compute: fine-tuned on "
    "the four built-in tasks, plus GPT's zero-shot multiple choice and BERT's fill-mask.",
    sections={"compare": CompareConfig},
    choices={"gpt_preset": tuple(n for n, p in PRESETS.items() if p.arch == "gpt"),
             "bert_preset": tuple(n for n, p in PRESETS.items() if p.arch == "bert")},
)


# ----------------------------------------------------------------------------- pre-training


def pretrain_args(c: CompareConfig, preset: str, out: Path) -> list[str]:
    args = ["--preset", preset, "--out-dir", str(out), "--quiet", "--samples", "0"]
    if c.steps:
        args += ["--steps", str(c.steps)]
    if c.batch_size:
        args += ["--batch-size", str(c.batch_size)]
    if c.warmup_steps is not None:
        args += ["--warmup-steps", str(c.warmup_steps)]
    return args


def check_equal_compute(gpt, bert) -> dict:
    """The two runs' steps, batch and context, which must be equal, and their optimizers
    (each preset's recipe: the learning rates may differ)."""
    same = {"steps": (gpt.loop.steps, bert.loop.steps),
            "batch_size": (gpt.loop.batch_size, bert.loop.batch_size),
            "n_ctx": (gpt.model.n_ctx, bert.model.n_ctx)}
    differ = [k for k, (a, b) in same.items() if a != b]
    if differ:
        raise ValueError(f"the two pre-training runs differ in {differ}: "
                         f"{ {k: same[k] for k in differ} }")
    return {"steps": gpt.loop.steps, "batch_size": gpt.loop.batch_size,
            "n_ctx": gpt.model.n_ctx,
            "optim": {"gpt": dataclasses.asdict(gpt.optim),
                      "bert": dataclasses.asdict(bert.optim)},
            "tokens": gpt.loop.steps * gpt.loop.batch_size * gpt.model.n_ctx}


def last_eval(run_dir: Path) -> dict:
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "val_loss" in line]
    if not evals:
        raise ValueError(f"{run_dir}: no evaluation in metrics.jsonl (an unfinished run?)")
    return evals[-1]


def pretrain(c: CompareConfig, out: Path) -> dict:
    """Pre-train both models with train.py's job (or reuse OUT/gpt, OUT/bert)."""
    from gptjax.cli.train import parse
    from gptjax.train.pretrain import run

    runs = {"gpt": (c.gpt_preset, out / "gpt"), "bert": (c.bert_preset, out / "bert")}
    parsed = {name: parse(pretrain_args(c, preset, folder))[1]
              for name, (preset, folder) in runs.items()}
    compute = check_equal_compute(parsed["gpt"], parsed["bert"])
    record = {"compute": compute}
    for name, (preset, folder) in runs.items():
        start = time.perf_counter()
        if not (c.reuse_pretrained and (folder / "metrics.jsonl").is_file()):
            print(f"pre-training {name} ({preset}) in {folder} ...", flush=True)
            result = run(parsed[name], resume=False, overwrite=True, quiet=True)
            if result.status != "done":
                raise RuntimeError(f"{folder}: pre-training stopped ({result.status})")
        record[name] = {"preset": preset, "run_dir": str(folder), "final": last_eval(folder),
                        "seconds": round(time.perf_counter() - start, 1)}
    return record


# ----------------------------------------------------------------------------- fine-tuning


def finetune(c: CompareConfig, out: Path, model: str, init: Path) -> dict:
    """{task: [table5 records]}: each built-in task, c.seeds runs."""
    from gptjax.cli.finetune import parse
    from gptjax.finetune.run import run, table5_record

    cells = {}
    for task in TASKS:
        cells[task] = []
        for seed in range(c.seeds):
            folder = out / "finetune" / model / task / f"seed-{seed}"
            args = ["--init", str(init), "--task", task, "--seed", str(seed),
                    "--demo-train", str(c.demo_train), "--demo-validation",
                    str(c.demo_validation), "--demo-test", str(c.demo_test),
                    "--epochs", str(c.epochs), "--max-length", str(c.max_length),
                    "--out-dir", str(folder), "--quiet"]
            if model == "gpt":
                args += ["--lm-coef", str(c.gpt_lm_coef)]
            start = time.perf_counter()
            result = run(parse(args)[1], overwrite=True, quiet=True)
            if result.status != "done":
                raise RuntimeError(f"{folder}: fine-tuning stopped ({result.status})")
            rec = table5_record(result, seed)
            rec["seconds"] = round(time.perf_counter() - start, 1)
            cells[task].append(rec)
            print(f"{model:4s} {task:22s} seed {seed}: epoch {rec['chosen_epoch']:g} chosen "
                  f"(validation {rec['metric']} {rec['validation']:.4f}), test "
                  f"{rec['test']:.4f} [{rec['seconds']:.0f} s]", flush=True)
    return cells


# ----------------------------------------------------------------------------- one side only


def zero_shot_multiple_choice(params, cfg, tokenizer, items, max_length: int) -> dict:
    """Pick the answer of highest log-probability after the context (gptjax.evaluate's
    scorer), summed (`accuracy`) and per token (`accuracy_mean`). Context and answers are
    cut as fine-tuning cuts them (each to its first max_segment_length tokens), so both
    ways of answering read the same text."""
    from gptjax.evaluate import score_requests
    from gptjax.finetune.transforms import max_segment_length

    limit = max_segment_length(min(cfg.n_ctx, max_length), 2)
    requests, spans = [], []
    for item in items:
        context = tokenizer.encode(item.text_a)[:limit]
        spans.append((len(requests), len(requests) + len(item.choices)))
        requests += [(context, tokenizer.encode(" " + choice)[:limit])
                     for choice in item.choices]
    scores = score_requests(params, cfg, requests)
    labels = np.array([item.label for item in items])
    by_sum = np.array([np.argmax(scores.logprob[a:b]) for a, b in spans])
    by_mean = np.array([np.argmax(scores.mean_logprob[a:b]) for a, b in spans])
    return {"n": len(items), "accuracy": float(np.mean(by_sum == labels)),
            "accuracy_mean": float(np.mean(by_mean == labels)), "segment_tokens": limit}


def gpt_only(c: CompareConfig, gpt_dir: Path) -> dict:
    """Zero-shot multiple choice by likelihood on the multiple-choice task's test split, and
    a generated sample."""
    from gptjax.cli.sample import stream_text
    from gptjax.finetune.demo_tasks import demo_task
    from gptjax.loading import load_model

    cfg, params, tokenizer = load_model(gpt_dir)
    items = demo_task("demo-multiple-choice", c.demo_train, c.demo_validation,
                      n_test=c.demo_test)["test"]
    zero_shot = zero_shot_multiple_choice(params, cfg, tokenizer, items, c.max_length)
    sample = "".join(stream_text(cfg, params, tokenizer, GENERATION_PROMPT, max_new_tokens=40,
                                 temperature=0.8, seed=0))
    return {"zero_shot_multiple_choice": zero_shot,
            "sample": {"prompt": GENERATION_PROMPT, "text": sample}}


def bert_only(bert_dir: Path, final: dict) -> dict:
    """Fill-mask accuracy on held-out masked tokens (the final evaluation's), and the top
    tokens for one sentence."""
    from gptjax.fill_mask import fill_mask
    from gptjax.loading import load_model

    cfg, params, tokenizer = load_model(bert_dir)
    predictions = fill_mask(params, cfg, tokenizer, FILL_MASK_SENTENCE, top_k=5)
    return {"fill_mask_accuracy": final["val_mlm_accuracy"],
            "masked_tokens": final.get("val_mlm_tokens"),
            "example": {"text": FILL_MASK_SENTENCE,
                        "top": [list(zip(p.tokens, p.probs, strict=True)) for p in predictions]}}


# ----------------------------------------------------------------------------- the tables


def cell(records: list[dict]) -> str:
    scores = np.array([r["test"] for r in records])
    spread = f" ± {scores.std(ddof=1):.3f}" if len(scores) > 1 else ""
    return f"{scores.mean():.3f}{spread}"


def markdown(c: CompareConfig, report: dict) -> str:
    pre = report["pretraining"]
    comp = pre["compute"]
    gpt, bert = pre["gpt"], pre["bert"]
    n = c.seeds
    lines = [
        f"GPT ({c.gpt_preset}, {report['parameters']['gpt']:,} parameters) and BERT "
        f"({c.bert_preset}, {report['parameters']['bert']:,}), each pre-trained by train.py "
        f"on the built-in corpus for {comp['steps']} steps of {comp['batch_size']} x "
        f"{comp['n_ctx']} tokens ({comp['tokens']:,} tokens; AdamW, peak lr "
        f"{comp['optim']['gpt']['lr']:g} for GPT and {comp['optim']['bert']['lr']:g} for "
        f"BERT, schedules otherwise alike), then fine-tuned on each built-in task "
        f"({c.demo_train} training examples, {c.epochs} epoch(s), sequences of at most "
        f"{c.max_length} tokens; GPT with lambda {c.gpt_lm_coef}, BERT without an LM "
        f"loss). Test score of the epoch chosen on validation: mean ± sample standard "
        f"deviation over {n} seeds.", "",
        "| task | metric | test examples | chance | GPT | BERT |",
        "|---|---|---:|---:|---:|---:|"]
    for task in TASKS:
        g, b = report["finetune"]["gpt"][task], report["finetune"]["bert"][task]
        first = g[0]
        lines.append(f"| {task} | {first['metric']} | {first['n_test']} | "
                     f"{first['test_chance']:.3f} | {cell(g)} | {cell(b)} |")
    zs = report["gpt_only"]["zero_shot_multiple_choice"]
    fm = report["bert_only"]
    lines += [
        "", "What only one of them does:", "",
        "| | GPT | BERT |", "|---|---:|---:|",
        f"| zero-shot multiple choice by likelihood, demo-multiple-choice test "
        f"({zs['n']} items, chance 0.25): accuracy by summed / mean log-probability | "
        f"{zs['accuracy']:.3f} / {zs['accuracy_mean']:.3f} | — |",
        f"| fill-mask accuracy on held-out masked tokens ({int(fm['masked_tokens'])} tokens of "
        f"the validation text) | — | {fm['fill_mask_accuracy']:.3f} |",
        f"| pre-training validation loss (nats/token: GPT the next token, BERT a masked "
        f"one) | {gpt['final']['val_loss']:.3f} | {bert['final']['val_mlm_loss']:.3f} |",
        f"| BERT's next-sentence accuracy on held-out pairs (chance 0.5) | — | "
        f"{bert['final']['val_nsp_accuracy']:.3f} |", "",
        f"GPT's sample from \"{report['gpt_only']['sample']['prompt']}\": "
        f"\"{report['gpt_only']['sample']['prompt']}"
        f"{' '.join(report['gpt_only']['sample']['text'].split())}\"", "",
        f"BERT's top tokens for \"{fm['example']['text']}\": " + "; ".join(
            ", ".join(f"{t} {p:.2f}" for t, p in top) for top in fm["example"]["top"])]
    return "\n".join(lines)


def compare(c: CompareConfig) -> dict:
    from gptjax.loading import load_model
    from gptjax.model import count_params

    out = Path(c.out_dir)
    start = time.perf_counter()
    report = {"settings": dataclasses.asdict(c)}
    report["pretraining"] = pre = pretrain(c, out)
    report["parameters"] = {}
    for name in ("gpt", "bert"):
        _, params, _ = load_model(pre[name]["run_dir"])
        report["parameters"][name] = count_params(params)
    report["finetune"] = {name: finetune(c, out, name, Path(pre[name]["run_dir"]))
                          for name in ("gpt", "bert")}
    report["gpt_only"] = gpt_only(c, Path(pre["gpt"]["run_dir"]))
    report["bert_only"] = bert_only(Path(pre["bert"]["run_dir"]), pre["bert"]["final"])
    report["seconds"] = round(time.perf_counter() - start, 1)
    table = markdown(c, report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpt_vs_bert.md").write_text(table + "\n")
    (out / "gpt_vs_bert.json").write_text(json.dumps(report, indent=1, default=float))
    report["markdown"] = table
    return report


def main(argv=None) -> int:
    def _main(argv):
        def resolve(options, command_line):
            return cli.resolve(COMMAND.sections, command_line=command_line,
                               config=options.config)

        c = COMMAND.parse(argv, resolve)[1].sections["compare"]
        report = compare(c)
        print(report["markdown"])
        print(f"\n({report['seconds'] / 60:.1f} min; {c.out_dir}/gpt_vs_bert.md and .json)")
        return 0

    return cli.main_wrapper(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
