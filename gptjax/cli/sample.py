"""python -m gptjax.cli.sample: stream text from a trained run or a Hugging Face folder, or
list a BERT's predictions for the [MASK]s of a text.

    python -m gptjax.cli.sample --run runs/char --prompt "The " --max-new-tokens 200 \\
        --temperature 0.8 --top-k 40 --seed 0
    python -m gptjax.cli.sample --run ./gpt2 --prompt "Hello" --top-p 0.9
    python -m gptjax.cli.sample --run runs/bert-cpu-small --fill-mask "The [MASK] module"

The text is written to stdout as the tokens are produced (the prompt first, then the
continuation). The model-and-text core is `stream_text(cfg, params, tokenizer, prompt, ...)`;
the model comes from `gptjax.loading.load_model`. A BERT (arch "bert") does not generate:
it answers --fill-mask (gptjax.fill_mask), one line per [MASK] with its top tokens and
their probabilities; a GPT given --fill-mask, or a BERT given none, is an error.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax

from gptjax.cli import settings as cli
from gptjax.config import GPTConfig
from gptjax.generate import stream
from gptjax.loading import CHECKPOINTS, load_model, start_token
from gptjax.model import Params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleConfig:
    """What to sample from, and how."""

    # A train.py / finetune.py run folder, or a Hugging Face gpt2 / openai-gpt folder.
    run: str
    # Which checkpoint of a run folder: the newest, or the one of lowest validation loss.
    checkpoint: str = "latest"
    # Text to continue ("" = start from <eos>).
    prompt: str = ""
    # Read the prompt from this file instead.
    prompt_file: str = ""
    # Tokens to generate (None: 200, or what the context has room for).
    max_new_tokens: int | None = None
    # Sampling temperature (0 = greedy).
    temperature: float = 1.0
    # Sample from the k most likely tokens (None: all). With fill_mask: the number of
    # tokens listed for each [MASK] (None: 5).
    top_k: int | None = None
    # Sample from the smallest set of tokens of at least this probability mass (None: all).
    top_p: float | None = None
    # Seed of the first sample; sample i uses seed + i.
    seed: int = 0
    # Samples to write.
    num_samples: int = 1
    # Stop a sample at <eos> (--no-stop: go on to max_new_tokens).
    stop: bool = True
    # BERT runs: a text with [MASK] in it; the top_k tokens predicted at each [MASK] are
    # listed instead of sampling (GPT runs: an error).
    fill_mask: str = ""

    def __post_init__(self):
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples} must be >= 1")


COMMAND = cli.Command(
    prog="python -m gptjax.cli.sample",
    description="Stream a sample from a trained run or a Hugging Face folder.",
    sections={"sample": SampleConfig},
    choices={"checkpoint": CHECKPOINTS},
)


def stream_text(
    cfg: GPTConfig,
    params: Params,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> Iterator[str]:
    """Yield the continuation of `prompt` as pieces of text, as the tokens are decoded.

    An empty prompt starts from the <eos> token (GPT-2's unconditional samples). A prompt
    too long for max_new_tokens more tokens keeps its last n_ctx - max_new_tokens tokens
    (logged). Decoding stops at <eos> when stop_at_eos. A piece is held back while the text
    ends in an incomplete UTF-8 character (byte-level BPE can split one across tokens).
    Same seed, same text. Raises ValueError for bad settings (see `generate`).
    """
    if max_new_tokens >= cfg.n_ctx:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                         f"the context n_ctx={cfg.n_ctx}")
    ids = tokenizer.encode(prompt)
    eos = start_token(tokenizer, cfg)
    if not ids:
        if eos is None:
            raise ValueError("empty prompt, and the tokenizer has no <eos> to start from")
        ids = [eos]
    room = cfg.n_ctx - max_new_tokens
    if len(ids) > room:
        log.warning("prompt of %d tokens cut to its last %d (n_ctx=%d, max_new_tokens=%d)",
                    len(ids), room, cfg.n_ctx, max_new_tokens)
        ids = ids[-room:]
    stops = [eos] if stop_at_eos and eos is not None else None
    tokens: list[int] = []
    written = ""
    for token in stream(params, cfg, ids, max_new_tokens, rng=jax.random.PRNGKey(seed),
                        temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stops):
        if stops and token in stops:
            break
        tokens.append(token)
        text = tokenizer.decode(tokens)
        if text.endswith("\ufffd"):
            continue
        yield text[len(written):]
        written = text
    text = tokenizer.decode(tokens)
    if len(text) > len(written):
        yield text[len(written):]


# The settings of text generation, which a fill-mask query does not use.
GENERATION_ONLY = ("prompt", "prompt_file", "max_new_tokens", "temperature", "top_p", "seed",
                   "num_samples", "stop")
FILL_MASK_TOP_K = 5


def check_mode(settings: SampleConfig, cfg: GPTConfig) -> None:
    """Refuse what the model cannot do: fill-mask for a GPT, generation for a BERT, and
    generation settings beside --fill-mask."""
    if settings.fill_mask and cfg.arch != "bert":
        raise ValueError(f"--fill-mask needs a BERT run; {settings.run} is arch={cfg.arch!r}, "
                         "a left-to-right language model with no masked-token head "
                         "(sample from it with --prompt)")
    if cfg.arch == "bert" and not settings.fill_mask:
        raise ValueError(f"{settings.run} is a BERT (arch='bert'): it predicts masked tokens "
                         'and does not generate text; give --fill-mask "text with [MASK]"')
    if settings.fill_mask:
        defaults = SampleConfig(run="")
        given = [f"--{n.replace('_', '-')}" for n in GENERATION_ONLY
                 if getattr(settings, n) != getattr(defaults, n)]
        if given:
            raise ValueError(f"{', '.join(given)}: generation setting(s), not used by "
                             "--fill-mask (its options are --top-k and --checkpoint)")


def print_fill_mask(settings: SampleConfig, cfg: GPTConfig, params: Params, tokenizer,
                    out=None) -> list:
    """The text, then one line per [MASK]: its top tokens with their probabilities, to
    `out` (None: sys.stdout)."""
    from gptjax.fill_mask import fill_mask, format_predictions

    out = sys.stdout if out is None else out
    top_k = FILL_MASK_TOP_K if settings.top_k is None else settings.top_k
    predictions = fill_mask(params, cfg, tokenizer, settings.fill_mask, top_k=top_k)
    out.write(settings.fill_mask + "\n" + format_predictions(predictions) + "\n")
    out.flush()
    return predictions


def parse(argv: Sequence[str] | None = None) -> SampleConfig:
    def resolve(options, command_line):
        return cli.resolve(COMMAND.sections, command_line=command_line, config=options.config)

    return COMMAND.parse(argv, resolve)[1].sections["sample"]


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main_wrapper(_main, argv)


def _main(argv) -> int:
    settings = parse(argv)
    if settings.fill_mask and "[MASK]" not in settings.fill_mask:
        raise ValueError(f"--fill-mask {settings.fill_mask!r} has no [MASK]; put [MASK] where "
                         "a token should be predicted")
    cfg, _, _ = load_model(settings.run, weights=False)
    check_mode(settings, cfg)
    cfg, params, tokenizer = load_model(settings.run, checkpoint=settings.checkpoint)
    if settings.fill_mask:
        print_fill_mask(settings, cfg, params, tokenizer)
        return 0
    prompt = settings.prompt
    if settings.prompt_file:
        prompt = Path(settings.prompt_file).read_text(encoding="utf-8")
    max_new_tokens = settings.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = max(1, min(200, cfg.n_ctx - max(1, len(tokenizer.encode(prompt)))))
    out = sys.stdout
    for i in range(settings.num_samples):
        seed = settings.seed + i
        if settings.num_samples > 1:
            out.write(f"{'' if i == 0 else chr(10)}--- sample {i + 1} (seed {seed}) ---\n")
        out.write(prompt)
        out.flush()
        for piece in stream_text(cfg, params, tokenizer, prompt, max_new_tokens=max_new_tokens,
                                 temperature=settings.temperature, top_k=settings.top_k,
                                 top_p=settings.top_p, seed=seed, stop_at_eos=settings.stop):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
