"""The one model loader: (cfg, params, tokenizer) from a run folder or a Hugging Face folder.

Used by sampling, evaluation and fine-tuning alike. A folder is one of:

  a run folder   written by train.py or finetune.py (a GPT or a BERT): config.json with a
                 "model" entry, tokenizer/, checkpoints/ (`gptjax.train.checkpoint.load_run`);
                 the newest readable checkpoint ("latest") or the one of lowest validation
                 loss ("best"). A fine-tuning run's {"gpt": ..., "head": ...} params give
                 the transformer's part.
  an HF folder   a transformers gpt2 / openai-gpt / bert checkpoint: config.json with a
                 "model_type", safetensors weights (`gptjax.hf.load_pretrained`) and the
                 tokenizer files beside them (tokenizer.json, vocab.json + merges.txt, or
                 BERT's vocab.txt), read without adding special tokens, so that every id
                 has an embedding row. A BertForSequenceClassification / MultipleChoice
                 classifier is left out: it is a task head, not part of the model (the
                 fine-tuning heads are gptjax.finetune.heads').

Anything else is an error naming the folder and what it lacks.
"""

from __future__ import annotations

import json
from pathlib import Path

from gptjax.config import GPTConfig
from gptjax.data.tokenizer import Tokenizer, load_tokenizer
from gptjax.train.checkpoint import RUN_CONFIG, TOKENIZER_DIR

CHECKPOINTS = ("latest", "best")
# Task heads an HF checkpoint may hold beside the model (gptjax.hf: BERT's classifier).
TASK_HEADS = ("classifier",)


def folder_kind(path: str | Path) -> str:
    """"run" (train.py / finetune.py) or "hf" (transformers); FileNotFoundError when there
    is no such folder, ValueError when its config.json is neither."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    config = folder / RUN_CONFIG
    if not config.is_file():
        raise ValueError(f"{folder} holds no model: no {RUN_CONFIG} (expected a train.py / "
                         "finetune.py run folder or a Hugging Face gpt2 / openai-gpt folder)")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config}: not valid JSON ({err})") from None
    if isinstance(data, dict) and "model" in data:
        return "run"
    if isinstance(data, dict) and "model_type" in data:
        return "hf"
    raise ValueError(f"{config} has neither a 'model' entry (a gptjax run) nor a "
                     "'model_type' (a Hugging Face checkpoint)")


def load_config(path: str | Path) -> GPTConfig:
    """The model's config, without reading any weights."""
    folder = Path(path)
    data = json.loads((folder / RUN_CONFIG).read_text(encoding="utf-8"))
    if folder_kind(folder) == "run":
        return GPTConfig.from_dict(data["model"], where=str(folder / RUN_CONFIG))
    from gptjax.hf import config_from_hf

    return config_from_hf(data)


def load_model(path: str | Path, *, checkpoint: str = "latest", weights: bool = True):
    """(cfg, params, tokenizer) of the model in `path` (see the module docstring).

    checkpoint: "latest" or "best", for run folders (an HF folder holds one set of
    weights). weights=False reads the config and the tokenizer only (params is None).
    """
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint={checkpoint!r} must be one of {list(CHECKPOINTS)}")
    folder = Path(path)
    kind = folder_kind(folder)
    if not weights:
        tokenizer_path = folder / TOKENIZER_DIR if kind == "run" else folder
        return load_config(folder), None, _tokenizer(tokenizer_path, kind)
    if kind == "hf":
        from gptjax.hf import load_pretrained

        cfg, params = load_pretrained(folder)
        params = {k: v for k, v in params.items() if k not in TASK_HEADS}
        return cfg, params, _tokenizer(folder, kind)
    from gptjax.train.checkpoint import load_run

    cfg, params, tokenizer = load_run(folder, which=checkpoint)
    if "wte" not in params and "gpt" in params:  # a fine-tuning run: the transformer
        params = params["gpt"]
    return cfg, params, tokenizer


def _tokenizer(path: Path, kind: str) -> Tokenizer:
    # An HF vocabulary is taken as it is: appended special tokens would have no row.
    return load_tokenizer(path, add_missing_specials=kind == "run")


def start_token(tokenizer, cfg: GPTConfig) -> int | None:
    """The id that starts (and ends) a document: the tokenizer's <eos> (GPT-2's
    <|endoftext|>, gptjax's document separator) when the model has a row for it, else None
    (GPT-1's vocabulary has none)."""
    eos = (getattr(tokenizer, "special_tokens", None) or {}).get("<eos>")
    return eos if eos is not None and eos < cfg.vocab_size else None
