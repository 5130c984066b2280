"""train.py's command line: a pre-training run's settings, resolved, then
`gptjax.train.pretrain.run`.

    python train.py                        # the cpu-small preset on the built-in corpus
    python train.py --preset char --help   # every setting, with the values char would use
    python train.py --preset bert-cpu-small  # a BERT of cpu-small's size: MLM + NSP

The settings are five sections: run (preset, run folder), model (GPTConfig), optim
(OptimConfig), loop (LoopConfig) and data (DataConfig); their precedence is
gptjax.cli.settings'. train.py runs the model with kernels "auto" (the fast paths
measured faster on this backend) unless --kernels says otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gptjax.cli import settings as cli
from gptjax.config import CHOICES, PRESETS, GPTConfig
from gptjax.train.loop import LoopConfig, exit_code
from gptjax.train.optim import OptimConfig
from gptjax.train.pretrain import (
    TOKENIZER_KINDS,
    DataConfig,
    RunSettings,
    preset_settings,
    run,
)

DEFAULT_PRESET = "cpu-small"


@dataclass(frozen=True)
class RunConfig:
    """Which model to pre-train, with which recipe, and where the run goes."""

    # Model preset, with its training recipe (gptjax.config.PRESETS,
    # gptjax.train.pretrain.RECIPES).
    preset: str = DEFAULT_PRESET
    # Run folder ("" = runs/PRESET).
    out_dir: str = ""


SECTIONS = {"run": RunConfig, "model": GPTConfig, "optim": OptimConfig, "loop": LoopConfig,
            "data": DataConfig}

COMMAND = cli.Command(
    prog="train.py",
    description="Pre-train a GPT on text (a bert-* preset or --arch bert: a BERT, by masked "
    "tokens and next-sentence prediction). With no arguments: a small GPT on Python's own "
    "documentation (no download), about four minutes on two CPU cores.",
    sections=SECTIONS,
    options=cli.RunOptions,
    choices={**CHOICES, **cli.TRAINING_CHOICES, "preset": tuple(PRESETS)},
    metavars={"preset": "NAME", "tokenizer": "{" + ",".join(TOKENIZER_KINDS) + ",PATH}"},
)


def base_layers(upper: dict) -> list[tuple[str, dict]]:
    """The preset chosen by the layers above (else cpu-small), its recipe, its run folder."""
    preset = cli.value_of(upper, RunConfig, "preset")
    layer = {**preset_settings(preset), "out_dir": str(Path("runs") / preset)}
    return [(f"preset {preset}", layer)]


def resolve(options: cli.RunOptions, command_line: dict) -> cli.Resolved:
    resolved = cli.resolve(SECTIONS, command_line=command_line, config=options.config,
                           resume=options.resume, base=base_layers)
    tokenizer = resolved.sections["data"].tokenizer
    notes = {}
    if tokenizer in ("char", "byte"):  # pretrain.fit_vocab
        notes["vocab_size"] = f"the size of the {tokenizer} tokenizer built from the corpus"
    return dataclasses.replace(resolved, notes=notes)


def parse(argv: Sequence[str] | None = None) -> tuple[cli.RunOptions, RunSettings]:
    """(options, settings) of a train.py command line (--help prints and exits)."""
    options, resolved = COMMAND.parse(argv, resolve)
    s = resolved.sections
    settings = RunSettings(preset=s["run"].preset, out_dir=Path(s["run"].out_dir),
                           model=s["model"], optim=s["optim"], loop=s["loop"], data=s["data"])
    return options, settings


def main(argv: Sequence[str] | None = None) -> int:
    def _main(argv):
        options, settings = parse(argv)
        result = run(settings, resume=options.resume, overwrite=options.overwrite,
                     quiet=options.quiet)
        return exit_code(result)

    return cli.main_wrapper(_main, argv)
