"""finetune.py's command line: a fine-tuning run's settings, resolved, then
`gptjax.finetune.run.run` (or its Table 5 ablation).

    python finetune.py                                  # the built-in multiple-choice task
    python finetune.py --task sst2 --data-dir glue/SST-2 --init runs/cpu-small --help
    python finetune.py --task demo-entailment --init runs/bert-cpu-small   # a BERT run

The settings are four sections: source (the model to start from, the recipe, the run
folder), task (TaskConfig), optim (OptimConfig) and loop (LoopConfig); their precedence is
gptjax.cli.settings'. The base layer is the recipe: "gpt1" for models 768 wide or more,
else "cpu" (for a BERT with lm_coef 0: it has no auxiliary LM loss). Unless set
explicitly, the number of steps, the evaluation interval and the warm-up follow from the
epochs and the training set's size. The model runs with kernels
"auto" (the fast paths measured faster on this backend) unless --kernels says otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gptjax.cli import settings as cli
from gptjax.config import CHOICES, PRESETS
from gptjax.finetune.run import (
    DEFAULT_INIT,
    RECIPES,
    Settings,
    SourceConfig,
    TaskConfig,
    format_table,
    model_config,
    recipe_for,
    run,
    table5,
)
from gptjax.finetune.transforms import KINDS, LM_NORMALIZATIONS
from gptjax.train.loop import LoopConfig, exit_code
from gptjax.train.optim import OptimConfig


@dataclass(frozen=True)
class FinetuneOptions(cli.RunOptions):
    """What finetune.py does with the run folder."""

    # Run GPT-1's Table 5 ablation in miniature instead: the four built-in tasks from
    # scratch and pre-trained, with and without the LM loss, each with --table5-seeds
    # seeds; the epoch is chosen on validation, the test split reported (out_dir:
    # runs/table5).
    table5: bool = False
    # Runs per (task, condition) of --table5, with loop seeds seed, seed + 1, ...
    table5_seeds: int = 3

    def __post_init__(self):
        if self.table5_seeds < 1:
            raise ValueError(f"table5_seeds={self.table5_seeds} must be >= 1")


SECTIONS = {"source": SourceConfig, "task": TaskConfig, "optim": OptimConfig,
            "loop": LoopConfig}

COMMAND = cli.Command(
    prog="finetune.py",
    description="Fine-tune a GPT on a labelled task with GPT-1's input transformations, "
    "task heads and auxiliary LM loss (a BERT: its [CLS] A [SEP] B [SEP] inputs and heads "
    "over the pooled [CLS]). With no arguments: the built-in multiple-choice task "
    f"on the model `python train.py` pre-trained ({DEFAULT_INIT}).",
    sections=SECTIONS,
    options=FinetuneOptions,
    choices={"kernels": CHOICES["kernels"], "preset": tuple(PRESETS), "recipe": tuple(RECIPES),
             "lm_normalization": LM_NORMALIZATIONS, "kind": KINDS,
             **cli.TRAINING_CHOICES},
    metavars={"preset": "NAME"},
)

# What --help says of the settings derived from the epochs (finalize_schedule).
DERIVED = {"steps": "epochs x full batches per epoch", "eval_every": "one epoch",
           "warmup_steps": "warmup_fraction x steps"}


def base_layers(upper: dict) -> list[tuple[str, dict]]:
    """The recipe, chosen by the model to start from (or given), and the run folder's name."""
    from_scratch = cli.value_of(upper, SourceConfig, "from_scratch")
    init = cli.value_of(upper, SourceConfig, "init") or ("" if from_scratch else DEFAULT_INIT)
    preset = cli.value_of(upper, SourceConfig, "preset")
    recipe = cli.value_of(upper, SourceConfig, "recipe")
    cfg = model_config(SourceConfig(init=init, preset=preset))
    if not recipe:
        recipe = recipe_for(cfg)
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    task = cli.value_of(upper, TaskConfig, "task")
    name = task.replace("/", "-").replace(":", "-")
    # warm-up 0 here: finalize_schedule derives it from warmup_fraction unless it is given
    layer = {"warmup_steps": 0, **RECIPES[recipe], "init": init, "recipe": recipe,
             "out_dir": str(Path("runs") / f"finetune-{name}")}
    if cfg.arch == "bert":  # no auxiliary LM loss (gptjax.finetune.run.bert_task_settings)
        layer["lm_coef"] = 0.0
    return [(f"recipe {recipe}", layer)]


def resolve(options: FinetuneOptions, command_line: dict) -> cli.Resolved:
    resolved = cli.resolve(SECTIONS, command_line=command_line, config=options.config,
                           resume=options.resume, saved_skip=("model",), base=base_layers)
    notes = {k: v for k, v in DERIVED.items() if k not in resolved.explicit}
    return dataclasses.replace(resolved, notes=notes)


def parse(argv: Sequence[str] | None = None) -> tuple[FinetuneOptions, Settings]:
    """(options, settings) of a finetune.py command line (--help prints and exits)."""
    options, resolved = COMMAND.parse(argv, resolve)
    s = resolved.sections
    settings = Settings(source=s["source"], task=s["task"], optim=s["optim"], loop=s["loop"],
                        explicit=resolved.explicit)
    return options, settings


def main(argv: Sequence[str] | None = None) -> int:
    def _main(argv):
        options, settings = parse(argv)
        if options.table5:
            if "out_dir" not in settings.explicit:
                source = dataclasses.replace(settings.source, out_dir="runs/table5")
                settings = dataclasses.replace(settings, source=source)
            print(table5(settings, seeds=options.table5_seeds))
            return 0
        result = run(settings, resume=options.resume, overwrite=options.overwrite,
                     quiet=options.quiet)
        if options.quiet and result.status == "done":
            print(format_table(result))
        return exit_code(result.train_result)

    return cli.main_wrapper(_main, argv)
