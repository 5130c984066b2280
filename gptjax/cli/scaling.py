"""`python -m gptjax.scaling`'s command line: a ladder's settings, resolved, then
`gptjax.scaling.ladder.run_ladder`.

The settings are five sections: ladder (LadderConfig: the size rule, the rungs, the
target, the task), model (GPTConfig: every field but the size, which the rule sets per
run), optim, loop and data (train.py's, shared by every run). Their precedence is
gptjax.cli.settings': the preset's model and recipe, then the ladder's own defaults
(LADDER_DEFAULTS), a config file, the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

from gptjax.cli import settings as cli
from gptjax.config import CHOICES, PRESETS, GPTConfig
from gptjax.scaling.ladder import (
    TASK_SCORES,
    Interrupted,
    LadderConfig,
    LadderSettings,
    report,
    run_ladder,
    warmup_fraction,
)
from gptjax.train.loop import LoopConfig
from gptjax.train.optim import OptimConfig
from gptjax.train.pretrain import TOKENIZER_KINDS, DataConfig, preset_settings

SECTIONS = {"ladder": LadderConfig, "model": GPTConfig, "optim": OptimConfig,
            "loop": LoopConfig, "data": DataConfig}

# Over the preset's recipe: no samples printed after each run.
LADDER_DEFAULTS = {"samples": 0}

# Set per run by the ladder; giving them is an error that names what to use instead.
PER_RUN = {"n_layer": "--aspect", "n_embd": "--sizes and --target", "n_head": "--head-size",
           "warmup_steps": "--warmup-fraction"}

DESCRIPTION = """\
Predictable scaling (GPT-4 report, section 3): train a ladder of small models with one
recipe (each run is train.py's job, in an ordinary run folder), fit L(C) = a C^b + c
to their validation losses and accuracy through a sigmoid of the loss, predict the
target's loss and accuracy with intervals BEFORE training it (written to ladder.json),
then train it and report predicted vs actual; the largest rung is also predicted from
the others. Rerunning the same command continues: finished runs are read, interrupted
ones resume.

  python -m gptjax.scaling                # the built-in demo (byte-level, Python's docs)
  python -m gptjax.scaling --target-run runs/mine   # predict an existing train.py run

Bigger ladders on GPUs and TPUs: every train.py setting passes through to each run
(--devices, --mesh, --distributed on every host, --dtype, --batch-size ...), e.g.

  python -m gptjax.scaling --preset gpt2 --data /data/text --tokenizer bpe \\
      --vocab-size 50257 --sizes 192,256,320,384,448 --aspect 64 --head-size 64 \\
      --target 1024 --tokens-per-param 20 --batch-size 64 --dtype bfloat16 \\
      --mesh fsdp=-1 --out-dir runs/ladder-gpt2

(rungs of 3 to 7 layers, a 16 x 1024 target, 41x the largest rung's compute)."""


@dataclass(frozen=True)
class LadderOptions(cli.Options):
    """What to do with the ladder folder."""

    # Delete the ladder folder first (every run is retrained).
    overwrite: bool = False
    # No progress bars.
    quiet: bool = False


class _Command(cli.Command):
    """The settings mechanism's command, its description printed as written (the usage
    examples keep their lines)."""

    def parser(self, *args, **kwargs) -> argparse.ArgumentParser:
        parser = super().parser(*args, **kwargs)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        return parser


COMMAND = _Command(
    prog="python -m gptjax.scaling",
    description=DESCRIPTION,
    sections=SECTIONS,
    options=LadderOptions,
    choices={**CHOICES, **cli.TRAINING_CHOICES, "preset": tuple(PRESETS),
             "task_score": TASK_SCORES},
    metavars={"preset": "NAME", "tokenizer": "{" + ",".join(TOKENIZER_KINDS) + ",PATH}",
              "task": "{demo-multiple-choice,none,FILE}", "target_run": "RUN_DIR"},
)


def base_layers(upper: dict) -> list[tuple[str, dict]]:
    """The preset chosen by the layers above (else cpu-small) and its recipe, then the
    ladder's defaults."""
    preset = cli.value_of(upper, LadderConfig, "preset")
    return [(f"preset {preset}", preset_settings(preset)), ("ladder", LADDER_DEFAULTS)]


def resolve(options: LadderOptions, command_line: dict) -> cli.Resolved:
    resolved = cli.resolve(SECTIONS, command_line=command_line, config=options.config,
                           base=base_layers)
    ladder = resolved.sections["ladder"]
    per_run = {k: v for k, v in PER_RUN.items() if k != "n_head" or ladder.head_size}
    given = sorted(name for name in per_run if name in resolved.explicit)
    if given:
        raise ValueError("the ladder sets " + ", ".join(f"--{n.replace('_', '-')}" for n in given)
                         + " per run; use " + ", ".join(per_run[n] for n in given))
    if ladder.tokens_per_param and "steps" in resolved.explicit:  # (None: the target's)
        raise ValueError(f"--steps sets every run's length only with --tokens-per-param 0 "
                         f"(now {ladder.tokens_per_param:g}: each run's steps follow from "
                         "its size)")
    settings = LadderSettings(**resolved.sections)
    notes = {"n_layer": "per run, max(1, round(width / aspect))",
             "n_embd": "per run, its width (--sizes, --target)",
             "warmup_steps": f"per run, {warmup_fraction(settings):.4g} x its steps"}
    if ladder.head_size:
        notes["n_head"] = "per run, width / head_size"
    if ladder.tokens_per_param:
        notes["steps"] = "per run, from tokens_per_param"
    if resolved.sections["data"].tokenizer in ("char", "byte"):
        notes["vocab_size"] = f"the {resolved.sections['data'].tokenizer} tokenizer's"
    return dataclasses.replace(resolved, notes=notes)


def parse(argv: Sequence[str] | None = None) -> tuple[LadderOptions, LadderSettings]:
    """(options, settings) of a command line (--help prints and exits)."""
    options, resolved = COMMAND.parse(argv, resolve)
    s = resolved.sections
    return options, LadderSettings(ladder=s["ladder"], model=s["model"], optim=s["optim"],
                                   loop=s["loop"], data=s["data"])


def main(argv: Sequence[str] | None = None) -> int:
    def _main(argv):
        options, settings = parse(argv)
        start = time.perf_counter()
        try:
            record = run_ladder(settings, overwrite=options.overwrite, quiet=options.quiet)
        except Interrupted as err:
            print(f"stopped: {err}; run the same command again to continue")
            return 128 + err.signal
        print(report(record))
        print(f"ladder saved in {settings.ladder.out_dir} (ladder.json, scaling.png, run "
              f"folders); {time.perf_counter() - start:.0f} s")
        return 0

    return cli.main_wrapper(_main, argv)
