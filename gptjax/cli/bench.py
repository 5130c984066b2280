"""python -m gptjax.cli.bench: time train.py's training step, optionally beside PyTorch.

    python -m gptjax.cli.bench --preset char --batch-size 12 --reference
    python -m gptjax.cli.bench --preset gpt2 --batch-size 16 --n-ctx 1024 --dropout 0 \\
        --reference --json gpt2.json                                      # on a GPU
    python -m gptjax.cli.bench --preset char --reference --no-ref-compile --ref-adamw fused

The settings are `gptjax.bench.BenchConfig`'s fields; what is measured is described in
gptjax.bench.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from gptjax.bench import REF_ADAMW, BenchConfig, report, run_benchmark
from gptjax.cli import settings as cli
from gptjax.config import CHOICES, PRESETS

COMMAND = cli.Command(
    prog="python -m gptjax.cli.bench",
    description="Time train.py's training step (and a PyTorch reference with --reference). "
    "See gptjax/bench.py for what is measured.",
    sections={"bench": BenchConfig},
    choices={**CHOICES, "preset": tuple(PRESETS), "ref_adamw": REF_ADAMW},
    metavars={"preset": "NAME"},
)


def parse(argv: Sequence[str] | None = None) -> BenchConfig:
    def resolve(options, command_line):
        return cli.resolve(COMMAND.sections, command_line=command_line, config=options.config)

    return COMMAND.parse(argv, resolve)[1].sections["bench"]


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main_wrapper(_main, argv)


def _main(argv) -> int:
    settings = parse(argv)
    if settings.cache_dir:
        import jax

        jax.config.update("jax_compilation_cache_dir", settings.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    result = run_benchmark(settings)
    if settings.json:
        with open(settings.json, "w") as f:
            json.dump(result, f, indent=2)
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
