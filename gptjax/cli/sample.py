"""python -m gptjax.cli.sample: stream text from a trained run or a Hugging Face folder.

    python -m gptjax.cli.sample --run runs/char --prompt "The " --max-new-tokens 200 \\
        --temperature 0.8 --top-k 40 --seed 0
    python -m gptjax.cli.sample --run ./gpt2 --prompt "Hello" --top-p 0.9

The text is written to stdout as the tokens are produced (the prompt first, then the
continuation). The model-and-text core is `stream_text(cfg, params, tokenizer, prompt, ...)`,
and `load_model(path)` is the loader both CLIs share.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax

from gptjax.config import GPTConfig
from gptjax.generate import stream
from gptjax.model import Params

log = logging.getLogger(__name__)


def load_model(path: str | Path):
    """(cfg, params, tokenizer) from a folder.

    A folder whose config.json names a "model_type" is a Hugging Face gpt2 / openai-gpt
    checkpoint: `gptjax.hf.load_pretrained` and the tokenizer files beside it (tokenizer.json,
    or vocab.json + merges.txt; no special tokens are added, so every id has an embedding
    row). Anything else is a train.py / finetune.py run folder (`checkpoint.load_run`); a
    fine-tuning run's {"gpt": ..., "head": ...} params give the language model's part.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    config = folder / "config.json"
    if config.is_file() and "model_type" in json.loads(config.read_text(encoding="utf-8")):
        from gptjax.hf import load_pretrained
        from gptjax.data.tokenizer import load_tokenizer

        cfg, params = load_pretrained(folder)
        return cfg, params, load_tokenizer(folder, add_missing_specials=False)
    from gptjax.train.checkpoint import load_run

    cfg, params, tokenizer = load_run(folder)
    if "wte" not in params and "gpt" in params:
        params = params["gpt"]
    return cfg, params, tokenizer


def start_token(tokenizer, cfg: GPTConfig) -> int | None:
    """The id that starts (and ends) a document: the tokenizer's <eos> (GPT-2's
    <|endoftext|>, gptjax's document separator) when the model has a row for it, else None
    (GPT-1's vocabulary has none)."""
    eos = (getattr(tokenizer, "special_tokens", None) or {}).get("<eos>")
    return eos if eos is not None and eos < cfg.vocab_size else None


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gptjax.cli.sample",
                                description="Stream a sample from a trained or HF model.")
    p.add_argument("--run", required=True,
                   help="a train.py run folder, or a Hugging Face gpt2/openai-gpt folder")
    p.add_argument("--prompt", default="", help="text to continue (default: from <eos>)")
    p.add_argument("--prompt-file", help="read the prompt from this file instead")
    p.add_argument("--max-new-tokens", type=int,
                   help="tokens to generate (default: 200, or what the context has room for)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample from the nucleus of this mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="samples, with seeds seed, seed+1..")
    p.add_argument("--no-stop", action="store_true", help="do not stop at <eos>")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from gptjax.cli.settings import main_wrapper

    return main_wrapper(_main, argv)


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    prompt = args.prompt
    if args.prompt_file:
        prompt = Path(args.prompt_file).read_text(encoding="utf-8")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    cfg, params, tokenizer = load_model(args.run)
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = max(1, min(200, cfg.n_ctx - max(1, len(tokenizer.encode(prompt)))))
    out = sys.stdout
    for i in range(args.num_samples):
        if args.num_samples > 1:
            out.write(f"{'' if i == 0 else chr(10)}--- sample {i + 1} (seed {args.seed + i}) ---\n")
        out.write(prompt)
        out.flush()
        for piece in stream_text(cfg, params, tokenizer, prompt,
                                 max_new_tokens=max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed + i,
                                 stop_at_eos=not args.no_stop):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
