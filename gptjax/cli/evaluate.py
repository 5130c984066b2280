"""python -m gptjax.cli.evaluate: perplexity and zero- / few-shot tasks by likelihood.

    python -m gptjax.cli.evaluate --run RUN_OR_HF_FOLDER --task perplexity --data text.txt
    python -m gptjax.cli.evaluate --run gpt2/ --task storycloze --data cloze_test_val.csv \\
        --train cloze_train.csv --k 5 --json results.json
    python -m gptjax.cli.evaluate --run gpt2/ --task wsc --data WSCollection.xml --limit 273

The tasks and the scoring are gptjax.evaluate's; the model comes from
`gptjax.loading.load_model`. Prompt settings (--k, --template, --separator, ...) are the
fields of `gptjax.evaluate.PromptFormat`; backslash escapes in them (\\n, \\t) are decoded.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gptjax.cli import settings as cli
from gptjax.evaluate import TASKS, PromptFormat, format_table, run_task
from gptjax.loading import CHECKPOINTS, load_model


@dataclass(frozen=True)
class EvalConfig:
    """The model, the task and its data."""

    # A train.py / finetune.py run folder, or a Hugging Face gpt2 / openai-gpt folder.
    run: str
    # The task (see gptjax.evaluate).
    task: str
    # The evaluation file: text, a token folder / .npy / .bin, or the task's CSV, JSON, TSV
    # (wsc: WSCollection.xml, a DPR .txt or JSON lines).
    data: str
    # Which checkpoint of a run folder: the newest, or the one of lowest validation loss.
    checkpoint: str = "latest"
    # Training split to draw few-shot examples from, and to fit CoLA's threshold on.
    train: str = ""
    # Evaluate the first N items (perplexity: the first N characters or tokens; 0 = all).
    # WSC273 is the first 273 schemas of WSCollection.xml: --limit 273.
    limit: int = 0
    # Perplexity window stride (None: n_ctx, consecutive windows).
    stride: int | None = None
    # CoLA's threshold on the mean token log-probability (None: fitted).
    threshold: float | None = None
    # Split of a token folder.
    split: str = "val"
    # Dtype of the ids in a raw .bin token file.
    token_dtype: str = "uint16"
    # Tokens per scoring batch (bounds the batch x length x vocabulary logits held at once).
    max_tokens: int = 2048
    # Also write the results to this JSON file.
    json: str = ""

    def __post_init__(self):
        if self.limit < 0:
            raise ValueError(f"limit={self.limit} must be >= 0")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")


COMMAND = cli.Command(
    prog="python -m gptjax.cli.evaluate",
    description="Perplexity, bits per byte, and zero- / few-shot evaluation by likelihood.",
    sections={"eval": EvalConfig, "prompt": PromptFormat},
    choices={"task": TASKS, "checkpoint": CHECKPOINTS},
)


def _unescape(text: str) -> str:
    return codecs.decode(text, "unicode_escape")


def parse(argv: Sequence[str] | None = None) -> tuple[EvalConfig, PromptFormat]:
    def resolve(options, command_line):
        return cli.resolve(COMMAND.sections, command_line=command_line, config=options.config)

    sections = COMMAND.parse(argv, resolve)[1].sections
    fmt = sections["prompt"]
    if fmt.k < 0:
        raise ValueError(f"--k must be >= 0, got {fmt.k}")
    fmt = dataclasses.replace(fmt, **{name: _unescape(getattr(fmt, name)) for name in
                                      ("separator", "template", "choice_template",
                                       "description")})
    return sections["eval"], fmt


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main_wrapper(_main, argv)


def _main(argv) -> int:
    settings, fmt = parse(argv)
    cfg, params, tokenizer = load_model(settings.run, checkpoint=settings.checkpoint)
    metrics = run_task(params, cfg, tokenizer, settings.task, settings.data,
                       train=settings.train or None, fmt=fmt, limit=settings.limit or None,
                       stride=settings.stride, threshold=settings.threshold,
                       max_tokens=settings.max_tokens, token_dtype=settings.token_dtype,
                       split=settings.split)
    print(format_table(settings.task, metrics))
    if settings.json:
        record = {"task": settings.task, "data": settings.data, "model": settings.run,
                  "settings": dataclasses.asdict(fmt), "metrics": metrics}
        Path(settings.json).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
