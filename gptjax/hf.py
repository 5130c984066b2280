"""Import and export of Hugging Face ``openai-gpt`` (GPT-1), ``gpt2`` and ``bert`` checkpoints.

The parameter names of gptjax are GPT-2's own, so the map is short: per layer,
``h.{i}.<name>.weight`` is ``params["h"][<name>]["w" or "g"][i]`` and
``h.{i}.<name>.bias`` is ``params["h"][<name>]["b"][i]``. GPT-2's Conv1D stores
its weight as (in, out), the layout of gptjax's ``w``, so nothing is transposed.
The families differ only in the embedding names (``wte``/``wpe`` against
``tokens_embed``/``positions_embed``) and in GPT-2's final ``ln_f``; gptjax tells
them apart by ``cfg.norm`` ("post" is openai-gpt, "pre" is gpt2).

Weights are read with ``safetensors.numpy`` (bfloat16 through ``ml_dtypes``).
torch, transformers and huggingface_hub are not needed at run time: torch only
for an opted-in pickled ``pytorch_model.bin``, huggingface_hub only to fetch a
hub id (``pip install gptjax[hf]``).

The output head is tied to the token embedding in gptjax. A checkpoint's
``lm_head.weight`` is accepted when it equals the embedding (and stands in for it
when the embedding itself is absent, as in transformers' saves of
OpenAIGPTDoubleHeadsModel); an untied head raises ``ValueError``.

BERT (``model_type`` "bert", cfg.arch="bert") has a section of its own at the end of
this file: its Linear layers store (out, in) and are transposed, and its separate
query, key and value become one fused ``c_attn``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from gptjax.config import GPTConfig

Params = dict[str, Any]
log = logging.getLogger(__name__)

PREFIX = "transformer."

# Per-layer tensors, identical in both families: HF suffix -> path in params["h"].
_LAYER_MAP = (
    ("ln_1.weight", ("ln_1", "g")),
    ("ln_1.bias", ("ln_1", "b")),
    ("attn.c_attn.weight", ("attn", "c_attn", "w")),
    ("attn.c_attn.bias", ("attn", "c_attn", "b")),
    ("attn.c_proj.weight", ("attn", "c_proj", "w")),
    ("attn.c_proj.bias", ("attn", "c_proj", "b")),
    ("ln_2.weight", ("ln_2", "g")),
    ("ln_2.bias", ("ln_2", "b")),
    ("mlp.c_fc.weight", ("mlp", "c_fc", "w")),
    ("mlp.c_fc.bias", ("mlp", "c_fc", "b")),
    ("mlp.c_proj.weight", ("mlp", "c_proj", "w")),
    ("mlp.c_proj.bias", ("mlp", "c_proj", "b")),
)

# Task heads of the LMHead / DoubleHeads / SequenceClassification classes. They
# are not part of the transformer; params_from_hf returns them apart on request.
_HEAD_KEYS = frozenset({
    "lm_head.weight",
    "multiple_choice_head.summary.weight",
    "multiple_choice_head.summary.bias",
    "score.weight",
})
# Constant buffers that older checkpoints saved (the causal mask, its fill value
# and position ids); they carry no learned values and are dropped.
_BUFFER_RE = re.compile(r"^(h\.\d+\.attn\.(bias|masked_bias)|position_ids)$")

# Defaults of transformers' GPT2Config and OpenAIGPTConfig, for keys a config.json omits.
_HF_DEFAULTS = {
    "gpt2": dict(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
        activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
        layer_norm_epsilon=1e-5, initializer_range=0.02, scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
        add_cross_attention=False, tie_word_embeddings=True,
    ),
    "openai-gpt": dict(
        vocab_size=40478, n_positions=512, n_embd=768, n_layer=12, n_head=12, afn="gelu",
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5,
        initializer_range=0.02, tie_word_embeddings=True,
    ),
}

# What each activation name means in the model class that reads it.
# modeling_openai.py: ACT_FNS = {"relu": ReLU, "silu": silu, "gelu": gelu_new, "swish": silu}.
_OPENAI_ACT = {"gelu": "gelu_tanh", "relu": "relu"}
# gpt2 goes through transformers' ACT2FN; these names are the tanh approximation
# (gelu_fast and gelu_accurate only round the constant sqrt(2/pi) differently), the
# exact erf form, or relu.
_GPT2_ACT = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "relu": "relu",
}
# The names written on export.
_GPT2_ACT_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
_OPENAI_ACT_OUT = {"gelu_tanh": "gelu", "relu": "relu"}

# The GPT-2 BPE vocabulary, whose last id is <|endoftext|> (bos and eos of gpt2).
_GPT2_VOCAB = 50257


# ----------------------------------------------------------------------------- config


def config_from_hf(hf_config: dict) -> GPTConfig:
    """A GPTConfig from a transformers ``config.json`` dict of model_type gpt2 or openai-gpt.

    Keys the dict omits take transformers' defaults for that model type. The
    result has gptjax defaults for what HF does not describe (dtype, scan_layers,
    ...); change them with ``cfg.replace``. Raises ValueError, naming the field,
    for an unknown model_type and for settings gptjax does not implement
    (silu/swish or other activations, scale_attn_weights=False,
    scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn, add_cross_attention,
    untied word embeddings).
    """
    model_type = hf_config.get("model_type")
    if model_type == "bert":
        return bert_config_from_hf(hf_config)
    if model_type not in _HF_DEFAULTS:
        raise ValueError(
            f"config.json: model_type={model_type!r} is not supported; "
            f"expected one of {sorted([*_HF_DEFAULTS, 'bert'])}"
        )
    c = dict(_HF_DEFAULTS[model_type])
    c.update({k: v for k, v in hf_config.items() if k in c})
    if "n_positions" not in hf_config and "n_ctx" in hf_config:
        c["n_positions"] = hf_config["n_ctx"]

    def unsupported(field, why):
        raise ValueError(
            f"config.json ({model_type}): {field}={c[field]!r} is not supported: {why}")

    if c["tie_word_embeddings"] is not True:
        unsupported("tie_word_embeddings", "gptjax ties the output layer to the token embedding")
    if model_type == "gpt2":
        if c["scale_attn_weights"] is not True:
            unsupported("scale_attn_weights", "gptjax always scales scores by 1/sqrt(head size)")
        if c["scale_attn_by_inverse_layer_idx"]:
            unsupported("scale_attn_by_inverse_layer_idx", "no per-layer score scaling in gptjax")
        if c["reorder_and_upcast_attn"]:
            unsupported("reorder_and_upcast_attn", "not implemented in gptjax")
        if c["add_cross_attention"]:
            unsupported("add_cross_attention", "gptjax is decoder-only")
        act_field, table, norm, n_inner = "activation_function", _GPT2_ACT, "pre", c["n_inner"]
    else:
        act_field, table, norm, n_inner = "afn", _OPENAI_ACT, "post", None
    if c[act_field] not in table:
        unsupported(act_field, f"choose one of {sorted(table)}")
    return GPTConfig(
        vocab_size=c["vocab_size"],
        n_ctx=c["n_positions"],
        n_layer=c["n_layer"],
        n_head=c["n_head"],
        n_embd=c["n_embd"],
        n_inner=n_inner,
        embd_pdrop=float(c["embd_pdrop"]),
        attn_pdrop=float(c["attn_pdrop"]),
        resid_pdrop=float(c["resid_pdrop"]),
        layer_norm_epsilon=float(c["layer_norm_epsilon"]),
        activation=table[c[act_field]],
        norm=norm,
        init_std=float(c["initializer_range"]),
    )


def config_to_hf(cfg: GPTConfig) -> dict:
    """The ``config.json`` dict of cfg: gpt2 for norm="pre", openai-gpt for norm="post".

    It names the LMHead class in ``architectures`` and is accepted by
    transformers' AutoConfig and the model classes. gpt2 gets bos/eos id 50256
    (<|endoftext|>) only when vocab_size is GPT-2's 50257, else None. Raises
    ValueError for what the HF classes cannot express: banded attention, exact
    GELU or an MLP width other than 4 * n_embd in openai-gpt, and a
    scale_residual_init that differs from the family's own (it would change how
    transformers re-initialises, not the weights, so it is refused to keep the
    round trip exact). A BERT config (arch="bert") gives model_type bert
    (bert_config_to_hf).
    """
    if cfg.arch == "bert":
        return bert_config_to_hf(cfg)
    if cfg.attention_band is not None:
        raise ValueError(
            f"GPTConfig.attention_band={cfg.attention_band}: banded attention has no "
            "Hugging Face gpt2/openai-gpt equivalent"
        )
    if cfg.parametrization == "mup" and cfg.n_embd != cfg.mup_base_width:
        raise ValueError(
            f"GPTConfig.parametrization='mup' at n_embd={cfg.n_embd} != mup_base_width="
            f"{cfg.mup_base_width}: muP's output multiplier and 1/K attention have no Hugging "
            "Face gpt2/openai-gpt equivalent (at the base width muP is the standard model)"
        )
    common = dict(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_ctx,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.resid_pdrop,
        embd_pdrop=cfg.embd_pdrop,
        attn_pdrop=cfg.attn_pdrop,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        initializer_range=cfg.init_std,
        tie_word_embeddings=True,
    )
    if cfg.norm == "pre":
        eos = _GPT2_VOCAB - 1 if cfg.vocab_size == _GPT2_VOCAB else None
        return dict(
            architectures=["GPT2LMHeadModel"],
            model_type="gpt2",
            **common,
            n_ctx=cfg.n_ctx,
            n_inner=cfg.n_inner,
            activation_function=_GPT2_ACT_OUT[cfg.activation],
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
            add_cross_attention=False,
            bos_token_id=eos,
            eos_token_id=eos,
        )
    if cfg.activation not in _OPENAI_ACT_OUT:
        raise ValueError(
            f"GPTConfig.activation={cfg.activation!r}: openai-gpt (norm='post') offers only "
            f"{sorted(_OPENAI_ACT_OUT)} (its 'gelu' is the tanh approximation)"
        )
    if cfg.mlp_width != 4 * cfg.n_embd:
        raise ValueError(
            f"GPTConfig.n_inner={cfg.n_inner}: openai-gpt's MLP width is fixed at 4 * n_embd"
        )
    return dict(
        architectures=["OpenAIGPTLMHeadModel"],
        model_type="openai-gpt",
        **common,
        afn=_OPENAI_ACT_OUT[cfg.activation],
    )


# ----------------------------------------------------------------------------- tensors


def _embedding_names(cfg: GPTConfig) -> tuple[str, str]:
    return ("wte.weight", "wpe.weight") if cfg.norm == "pre" else (
        "tokens_embed.weight", "positions_embed.weight")


def _expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """HF name (no prefix) -> shape, for every tensor of the base model."""
    D, F = cfg.n_embd, cfg.mlp_width
    wte, wpe = _embedding_names(cfg)
    shapes = {wte: (cfg.vocab_size, D), wpe: (cfg.n_ctx, D)}
    layer = {
        "ln_1.weight": (D,), "ln_1.bias": (D,),
        "attn.c_attn.weight": (D, 3 * D), "attn.c_attn.bias": (3 * D,),
        "attn.c_proj.weight": (D, D), "attn.c_proj.bias": (D,),
        "ln_2.weight": (D,), "ln_2.bias": (D,),
        "mlp.c_fc.weight": (D, F), "mlp.c_fc.bias": (F,),
        "mlp.c_proj.weight": (F, D), "mlp.c_proj.bias": (D,),
    }
    for i in range(cfg.n_layer):
        for suffix, shape in layer.items():
            shapes[f"h.{i}.{suffix}"] = shape
    if cfg.norm == "pre":
        shapes["ln_f.weight"] = (D,)
        shapes["ln_f.bias"] = (D,)
    return shapes


def _strip_prefix(tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors by base-model name, base-model name -> the key as the checkpoint spells it)."""
    out, original = {}, {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        if name in out:
            raise ValueError(f"checkpoint holds {name!r} both with and without the "
                             f"{PREFIX!r} prefix")
        out[name], original[name] = value, key
    return out, original


def params_from_hf(
    cfg: GPTConfig,
    tensors: dict[str, np.ndarray],
    *,
    dtype=np.float32,
    return_extra: bool = False,
):
    """gptjax params (stacked layout, jnp arrays of `dtype`) from an HF state dict.

    `tensors` maps HF names to arrays, with or without the ``transformer.``
    prefix (base model, LMHead, DoubleHeads and SequenceClassification
    checkpoints all work). Causal-mask buffers (``h.{i}.attn.bias``,
    ``attn.masked_bias``, ``position_ids``) are dropped; ``lm_head.weight`` must
    equal the token embedding (it replaces it when the embedding is absent).
    Raises ValueError naming the key for a missing key, an unexpected key, a
    shape mismatch (both shapes) and an untied lm_head. With return_extra=True
    returns (params, extra), extra holding the task-head tensors
    (``multiple_choice_head.summary.{weight,bias}``, ``score.weight``) as numpy
    arrays of `dtype` under their HF names. A BERT config goes to bert_params_from_hf.
    """
    if cfg.arch == "bert":
        params, initialized = bert_params_from_hf(cfg, tensors, dtype=dtype)
        return (params, {"initialized": initialized}) if return_extra else params
    named, original = _strip_prefix(tensors)
    expected = _expected_shapes(cfg)
    wte_name = _embedding_names(cfg)[0]
    if wte_name not in named and "lm_head.weight" in named:
        named[wte_name], original[wte_name] = named["lm_head.weight"], "lm_head.weight"

    unexpected = sorted(original[k] for k in named
                        if k not in expected and k not in _HEAD_KEYS and not _BUFFER_RE.match(k))
    if unexpected:
        raise ValueError(f"unexpected key(s) in checkpoint for {cfg.n_layer}-layer "
                         f"{'gpt2' if cfg.norm == 'pre' else 'openai-gpt'}: {unexpected}")
    missing = [k for k in expected if k not in named]
    if missing:
        raise ValueError(f"missing key(s) in checkpoint: {missing}")
    for key, shape in expected.items():
        got = tuple(np.shape(named[key]))
        if got != shape:
            raise ValueError(f"shape mismatch for {original[key]!r}: checkpoint has {got}, "
                             f"the config expects {shape}")
    if "lm_head.weight" in named:
        head = np.asarray(named["lm_head.weight"])
        if head.shape != expected[wte_name] or not np.array_equal(head, named[wte_name]):
            raise ValueError(
                f"'lm_head.weight' {head.shape} differs from {wte_name!r}: gptjax ties the "
                "output layer to the token embedding and cannot load an untied head"
            )

    def get(key):
        return np.asarray(named[key], dtype=dtype)

    def put(tree, path, value):
        for part in path[:-1]:
            tree = tree.setdefault(part, {})
        tree[path[-1]] = jnp.asarray(value, dtype=dtype)

    wte, wpe = _embedding_names(cfg)
    params: Params = {"wte": jnp.asarray(get(wte)), "wpe": jnp.asarray(get(wpe)), "h": {}}
    for suffix, path in _LAYER_MAP:
        put(params["h"], path, np.stack([get(f"h.{i}.{suffix}") for i in range(cfg.n_layer)]))
    if cfg.norm == "pre":
        params["ln_f"] = {"g": jnp.asarray(get("ln_f.weight")),
                          "b": jnp.asarray(get("ln_f.bias"))}
    if not return_extra:
        return params
    extra = {k: get(k) for k in sorted(named) if k in _HEAD_KEYS and k != "lm_head.weight"}
    return params, extra


def params_to_hf(cfg: GPTConfig, params: Params, *, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of params_from_hf: HF base-model names (plus `prefix`) -> float32 arrays.

    Every array is a contiguous float32 numpy copy. Raises ValueError naming the
    parameter when `params` lacks one or has a shape other than cfg implies. A BERT
    config goes to bert_params_to_hf.
    """
    if cfg.arch == "bert":
        return bert_params_to_hf(cfg, params, prefix=prefix)

    def leaf(path):
        node = params
        for part in path:
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"params lack {'.'.join(path)!r}")
            node = node[part]
        return np.ascontiguousarray(np.asarray(node, dtype=np.float32))

    wte, wpe = _embedding_names(cfg)
    out = {wte: leaf(("wte",)), wpe: leaf(("wpe",))}
    for suffix, path in _LAYER_MAP:
        stacked = leaf(("h",) + path)
        if stacked.shape[:1] != (cfg.n_layer,):
            raise ValueError(f"params h.{'.'.join(path)} has shape {stacked.shape}; "
                             f"expected a leading axis of n_layer={cfg.n_layer}")
        for i in range(cfg.n_layer):
            out[f"h.{i}.{suffix}"] = np.ascontiguousarray(stacked[i])
    if cfg.norm == "pre":
        out["ln_f.weight"] = leaf(("ln_f", "g"))
        out["ln_f.bias"] = leaf(("ln_f", "b"))
    for key, shape in _expected_shapes(cfg).items():
        if out[key].shape != shape:
            raise ValueError(f"params for {key!r} have shape {out[key].shape}, "
                             f"the config expects {shape}")
    return {prefix + k: v for k, v in out.items()}


# ----------------------------------------------------------------------------- files


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy arrays (bfloat16 via ml_dtypes)."""
    from safetensors.numpy import load_file

    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    if all(info["dtype"] != "BF16" for info in header.values()):
        return dict(load_file(file))
    import ml_dtypes  # numpy has no bfloat16; ml_dtypes comes with jax

    dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
              "F64": np.float64, "I64": np.int64, "I32": np.int32, "U8": np.uint8,
              "I8": np.int8, "BOOL": np.bool_}
    data = memoryview(file.read_bytes())[8 + n:]
    out = {}
    for name, info in header.items():
        if info["dtype"] not in dtypes:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]]).reshape(
            info["shape"])
    return out


def _read_pickle(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"loading {file} needs torch, which is not installed") from e
    state = torch.load(file, map_location="cpu", weights_only=True)
    out = {}
    for name, t in state.items():
        t = t.detach()
        if t.is_floating_point() and t.dtype != torch.float32:
            t = t.to(torch.float32)
        out[name] = t.numpy()
    return out


def _read_sharded(folder: Path, index_name: str, reader) -> dict[str, np.ndarray]:
    index = json.loads((folder / index_name).read_text())
    shards = sorted(set(index["weight_map"].values()))
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors.update(reader(folder / shard))
    missing = sorted(set(index["weight_map"]) - set(tensors))
    if missing:
        raise ValueError(f"{folder / index_name} lists tensors its shards lack: {missing}")
    return tensors


def _read_weights(folder: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    if (folder / "model.safetensors").is_file():
        return _read_safetensors(folder / "model.safetensors")
    if (folder / "model.safetensors.index.json").is_file():
        return _read_sharded(folder, "model.safetensors.index.json", _read_safetensors)
    pickles = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")
               if (folder / n).is_file()]
    if not pickles:
        raise FileNotFoundError(
            f"{folder} holds no model.safetensors, model.safetensors.index.json or "
            "pytorch_model.bin"
        )
    if not allow_pickle:
        raise ValueError(
            f"{folder} holds only a pickled checkpoint ({pickles[0]}); pickles can run code "
            "when loaded. Pass allow_pickle=True to load it anyway (with torch.load("
            "weights_only=True)), or convert it to safetensors"
        )
    if pickles[0] == "pytorch_model.bin":
        return _read_pickle(folder / "pytorch_model.bin")
    return _read_sharded(folder, "pytorch_model.bin.index.json", _read_pickle)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _download(repo_id: str, allow_pickle: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError(
            f"{repo_id!r} is not a local folder; fetching it from the Hugging Face hub needs "
            "huggingface_hub: pip install gptjax[hf]"
        ) from e
    patterns = ["config.json", "model.safetensors", "model.safetensors.index.json",
                "model-*.safetensors"]
    if allow_pickle:
        patterns += ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated, network: all end here
        raise OSError(
            f"could not download {repo_id!r} from the Hugging Face hub "
            f"(offline, or no such model?): {e}"
        ) from e


def load_pretrained(
    path: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    dtype=np.float32,
    return_extra: bool = False,
):
    """(cfg, params) from a Hugging Face gpt2 / openai-gpt checkpoint.

    `path` is a local folder holding config.json and model.safetensors (or a
    sharded model.safetensors.index.json with its shards). A folder with only
    pytorch_model.bin is refused unless allow_pickle=True, then read with
    ``torch.load(weights_only=True)``. A `path` that is no existing folder but
    looks like a hub id ("openai-community/gpt2") is fetched with
    huggingface_hub.snapshot_download. params are jnp arrays of `dtype` in the
    stacked layout; with return_extra=True the result is (cfg, params, extra),
    extra holding task-head tensors (see params_from_hf). Errors:
    FileNotFoundError (no such folder, no config.json or no weights), ValueError
    (refused pickle, unsupported config, key or shape mismatch), ImportError
    (huggingface_hub or torch missing), OSError (download failed).

    A bert folder (BertModel, BertForMaskedLM, BertForPreTraining,
    BertForSequenceClassification or BertForMultipleChoice) gives BERT params with
    every head: those the checkpoint lacks are initialised as init_params would, and
    logged (extra["initialized"] names them); a classifier is params["classifier"]
    (see bert_params_from_hf).
    """
    folder = Path(path)
    if not folder.is_dir():
        if folder.exists():
            raise NotADirectoryError(f"{folder} is not a folder")
        text = str(path)
        if not _HUB_ID.match(text) or ".." in text:
            raise FileNotFoundError(f"no such folder: {folder}")
        folder = _download(text, allow_pickle)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    cfg = config_from_hf(json.loads(config_file.read_text()))
    tensors = _read_weights(folder, allow_pickle)
    out = params_from_hf(cfg, tensors, dtype=dtype, return_extra=return_extra)
    if return_extra:
        params, extra = out
        return cfg, params, extra
    return cfg, out


def save_pretrained(
    cfg: GPTConfig, params: Params, path: str | os.PathLike, *, overwrite: bool = False
) -> None:
    """Write config.json and model.safetensors that transformers' from_pretrained loads.

    Keys are those transformers itself saves for the LMHead class: the base
    model's names with the ``transformer.`` prefix and no ``lm_head.weight``
    (tied, so rebuilt from the embedding). GPT2LMHeadModel / OpenAIGPTLMHeadModel,
    the DoubleHeads classes and the base models (GPT2Model, OpenAIGPTModel) load
    it with no missing or unexpected keys (the task heads aside).

    A BERT config writes what transformers saves for BertForPreTraining (base model
    under ``bert.``, ``cls.predictions.*`` without the tied decoder,
    ``cls.seq_relationship.*``), plus ``classifier.*`` when params hold a classifier
    (bert_params_to_hf). BertForPreTraining and BertForMaskedLM load it with nothing
    missing; BertForMaskedLM reports the pooler and NSP head as unexpected, as it does
    for transformers' own BertForPreTraining saves.

    The folder is written beside `path` under a temporary name and renamed into
    place, so `path` never holds a partial checkpoint (an existing `path` is
    moved aside first and deleted after). A non-empty `path`, or a file there,
    raises FileExistsError naming it unless overwrite=True (a file is never
    replaced).
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{target} exists and is not empty; pass overwrite=True to replace it")
    if cfg.arch == "bert":
        num_labels = np.shape(params["classifier"]["b"])[0] if "classifier" in params else None
        hf_config = bert_config_to_hf(cfg, num_labels)
        tensors = bert_params_to_hf(cfg, params, prefix=BERT_PREFIX)
    else:
        hf_config = config_to_hf(cfg)
        tensors = params_to_hf(cfg, params, prefix=PREFIX)

    from safetensors.numpy import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- BERT

# transformers' BertModel is the base model; its head classes keep it under "bert.".
BERT_PREFIX = "bert."

# Defaults of transformers' BertConfig, for keys a config.json omits. The last four are
# refused when set otherwise (position_embedding_type is gone from transformers 5 but
# older config.json files carry it).
_BERT_DEFAULTS = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
    initializer_range=0.02, layer_norm_eps=1e-12, position_embedding_type="absolute",
    is_decoder=False, add_cross_attention=False, tie_word_embeddings=True,
)

# HF name (base-model names without "bert.") -> (params path, transposed), by group.
# torch's Linear stores its weight as (out, in); gptjax's w is (in, out): transposed.
# "encoder" must be in every checkpoint; a checkpoint may lack any other group whole.
_BERT_GROUPS = {
    "encoder": (
        ("embeddings.word_embeddings.weight", ("wte",), False),
        ("embeddings.position_embeddings.weight", ("wpe",), False),
        ("embeddings.token_type_embeddings.weight", ("wtt",), False),
        ("embeddings.LayerNorm.weight", ("ln_e", "g"), False),
        ("embeddings.LayerNorm.bias", ("ln_e", "b"), False),
    ),
    "pooler": (
        ("pooler.dense.weight", ("pooler", "w"), True),
        ("pooler.dense.bias", ("pooler", "b"), False),
    ),
    "mlm": (
        ("cls.predictions.transform.dense.weight", ("mlm", "dense", "w"), True),
        ("cls.predictions.transform.dense.bias", ("mlm", "dense", "b"), False),
        ("cls.predictions.transform.LayerNorm.weight", ("mlm", "ln", "g"), False),
        ("cls.predictions.transform.LayerNorm.bias", ("mlm", "ln", "b"), False),
        ("cls.predictions.bias", ("mlm", "bias"), False),
    ),
    "nsp": (
        ("cls.seq_relationship.weight", ("nsp", "w"), True),
        ("cls.seq_relationship.bias", ("nsp", "b"), False),
    ),
    # BertForSequenceClassification (num_labels outputs) and BertForMultipleChoice (1).
    "classifier": (
        ("classifier.weight", ("classifier", "w"), True),
        ("classifier.bias", ("classifier", "b"), False),
    ),
}
# Groups of the base model (BertModel), written under BERT_PREFIX.
_BERT_BASE_GROUPS = ("encoder", "pooler")
# Per layer, encoder.layer.{i}.<suffix> -> path in params["h"] (post-LN: ln_1 follows
# attention, ln_2 the MLP). Query, key and value are concatenated into attn.c_attn.
_BERT_LAYER = (
    ("attention.output.dense.weight", ("attn", "c_proj", "w"), True),
    ("attention.output.dense.bias", ("attn", "c_proj", "b"), False),
    ("attention.output.LayerNorm.weight", ("ln_1", "g"), False),
    ("attention.output.LayerNorm.bias", ("ln_1", "b"), False),
    ("intermediate.dense.weight", ("mlp", "c_fc", "w"), True),
    ("intermediate.dense.bias", ("mlp", "c_fc", "b"), False),
    ("output.dense.weight", ("mlp", "c_proj", "w"), True),
    ("output.dense.bias", ("mlp", "c_proj", "b"), False),
    ("output.LayerNorm.weight", ("ln_2", "g"), False),
    ("output.LayerNorm.bias", ("ln_2", "b"), False),
)
_QKV = ("query", "key", "value")
# Buffers of older checkpoints (no learned values), dropped on load.
_BERT_BUFFER_RE = re.compile(r"^embeddings\.(position_ids|token_type_ids)$")


def bert_config_from_hf(hf_config: dict) -> GPTConfig:
    """A BERT GPTConfig (arch="bert", post-LN) from a transformers bert ``config.json`` dict.

    Keys it omits take BertConfig's defaults. Raises ValueError naming the field for what
    gptjax does not implement: relative position embeddings, a decoder or
    cross-attention, untied word embeddings, activations other than the GELUs and relu.
    """
    c = dict(_BERT_DEFAULTS)
    c.update({k: v for k, v in hf_config.items() if k in c})

    def unsupported(field, why):
        raise ValueError(f"config.json (bert): {field}={c[field]!r} is not supported: {why}")

    if c["position_embedding_type"] != "absolute":
        unsupported("position_embedding_type", "gptjax learns absolute positions only")
    if c["is_decoder"]:
        unsupported("is_decoder", "a causal BERT is not implemented; use a GPT config")
    if c["add_cross_attention"]:
        unsupported("add_cross_attention", "gptjax has no cross-attention")
    if c["tie_word_embeddings"] is not True:
        unsupported("tie_word_embeddings", "gptjax ties the MLM decoder to the token embedding")
    if c["hidden_act"] not in _GPT2_ACT:  # BERT reads it through ACT2FN, as gpt2 does
        unsupported("hidden_act", f"choose one of {sorted(_GPT2_ACT)}")
    D, F = c["hidden_size"], c["intermediate_size"]
    return GPTConfig(
        arch="bert",
        vocab_size=c["vocab_size"],
        n_ctx=c["max_position_embeddings"],
        n_layer=c["num_hidden_layers"],
        n_head=c["num_attention_heads"],
        n_embd=D,
        n_inner=None if F == 4 * D else F,
        embd_pdrop=float(c["hidden_dropout_prob"]),
        attn_pdrop=float(c["attention_probs_dropout_prob"]),
        resid_pdrop=float(c["hidden_dropout_prob"]),
        layer_norm_epsilon=float(c["layer_norm_eps"]),
        activation=_GPT2_ACT[c["hidden_act"]],
        norm="post",
        init_std=float(c["initializer_range"]),
        scale_residual_init=False,
        type_vocab_size=c["type_vocab_size"],
    )


def bert_config_to_hf(cfg: GPTConfig, num_labels: int | None = None) -> dict:
    """The bert ``config.json`` dict of a BERT cfg, naming BertForPreTraining; with
    num_labels, id2label / label2id for a classifier of that many outputs. Raises
    ValueError for what BertConfig cannot express: pre-LN, scaled residual init, and
    embedding and residual dropouts that differ (BERT has one hidden_dropout_prob)."""
    if cfg.norm != "post":
        raise ValueError(f"GPTConfig.norm={cfg.norm!r}: Hugging Face BERT is post-LN")
    if cfg.residual_init_scaled:
        raise ValueError("GPTConfig.scale_residual_init=True: BertConfig has no scaled "
                         "residual initialisation")
    if cfg.embd_pdrop != cfg.resid_pdrop:
        raise ValueError(f"GPTConfig.embd_pdrop={cfg.embd_pdrop} differs from resid_pdrop="
                         f"{cfg.resid_pdrop}: BERT has one hidden_dropout_prob for both")
    out = dict(
        architectures=["BertForPreTraining"],
        model_type="bert",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        intermediate_size=cfg.mlp_width,
        hidden_act=_GPT2_ACT_OUT[cfg.activation],
        hidden_dropout_prob=cfg.resid_pdrop,
        attention_probs_dropout_prob=cfg.attn_pdrop,
        max_position_embeddings=cfg.n_ctx,
        type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.layer_norm_epsilon,
        pad_token_id=0,  # [PAD] is id 0 in BERT's vocabularies and in gptjax's WordPiece
        tie_word_embeddings=True,
    )
    if num_labels is not None:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    return out


def _bert_entries(cfg: GPTConfig, num_labels: int) -> dict[str, tuple]:
    """HF name (base model unprefixed) -> (group, params path, layer or None, transposed,
    HF shape), for every tensor gptjax maps. Shapes come from init_params's, so the two
    cannot drift apart."""
    import jax

    from gptjax.model import init_params

    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    D = cfg.n_embd

    def shape_at(path, layer):
        node = shapes["h"] if layer is not None else shapes
        for part in path:
            node = node[part]
        shape = tuple(node.shape[1:] if layer is not None else node.shape)
        return shape

    entries = {}
    for group, items in _BERT_GROUPS.items():
        for name, path, transposed in items:
            if group == "classifier":
                shape = (num_labels, D) if name.endswith("weight") else (num_labels,)
            else:
                shape = shape_at(path, None)[::-1] if transposed else shape_at(path, None)
            entries[name] = (group, path, None, transposed, shape)
    for i in range(cfg.n_layer):
        base = f"encoder.layer.{i}."
        for which in _QKV:  # slices of c_attn, assembled apart
            entries[f"{base}attention.self.{which}.weight"] = ("encoder", None, i, True, (D, D))
            entries[f"{base}attention.self.{which}.bias"] = ("encoder", None, i, False, (D,))
        for suffix, path, transposed in _BERT_LAYER:
            shape = shape_at(path, i)
            entries[base + suffix] = ("encoder", path, i, transposed,
                                      shape[::-1] if transposed else shape)
    return entries


def _bert_names(tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors by unprefixed HF name, that name -> the checkpoint's own key). Drops the
    "bert." prefix and old buffers, and reads the LayerNorm gamma / beta of checkpoints
    converted from TensorFlow as weight / bias (as transformers does)."""
    named, original = {}, {}
    for key, value in tensors.items():
        name = key.removeprefix(BERT_PREFIX)
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
        name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        if _BERT_BUFFER_RE.match(name):
            continue
        if name in named:
            raise ValueError(f"checkpoint holds {name!r} twice: as {original[name]!r} and "
                             f"as {key!r}")
        named[name], original[name] = value, key
    # The MLM decoder is tied: its weight is W_e and its bias cls.predictions.bias. Either
    # may stand in for a missing twin; a copy that differs is refused.
    for tied, source in (("cls.predictions.decoder.weight", "embeddings.word_embeddings.weight"),
                         ("cls.predictions.decoder.bias", "cls.predictions.bias")):
        if tied not in named:
            continue
        value, key = named.pop(tied), original.pop(tied)
        if source not in named:
            named[source], original[source] = value, key
        elif (np.shape(value) != np.shape(named[source])
              or not np.array_equal(np.asarray(value), np.asarray(named[source]))):
            raise ValueError(f"{key!r} differs from {original[source]!r}: gptjax ties the MLM "
                             "decoder and cannot load an untied one")
    return named, original


def bert_params_from_hf(cfg: GPTConfig, tensors: dict[str, np.ndarray], *,
                        dtype=np.float32, seed: int = 0) -> tuple[Params, list[str]]:
    """(BERT params of init_params's layout, the heads that were initialised) from an HF
    bert state dict: BertModel (no prefix), BertForMaskedLM, BertForPreTraining,
    BertForSequenceClassification or BertForMultipleChoice (base model under "bert.").

    Every head gptjax's BERT has (pooler, mlm, nsp) is in the result: those the
    checkpoint lacks whole (BertModel has no mlm and nsp, BertForMaskedLM no pooler and
    nsp) are drawn as init_params(cfg, PRNGKey(seed)) draws them, logged, and named in
    the returned list. A classifier (classifier.weight (N, D), classifier.bias) becomes
    params["classifier"] = {"w": (D, N), "b": (N,)}: N = num_labels for sequence
    classification, 1 for multiple choice (a score per choice). Raises ValueError naming
    the key for an unexpected key, a head present in part, a shape mismatch and an untied
    decoder.
    """
    named, original = _bert_names(tensors)
    num_labels = int(np.shape(named["classifier.weight"])[0]) if (
        "classifier.weight" in named) else 0
    entries = _bert_entries(cfg, num_labels)
    unexpected = sorted(original[n] for n in named if n not in entries)
    if unexpected:
        raise ValueError(f"unexpected key(s) in checkpoint for a {cfg.n_layer}-layer bert: "
                         f"{unexpected}")
    initialized = []
    for group in _BERT_GROUPS:
        names = [n for n, e in entries.items() if e[0] == group]
        missing = [n for n in names if n not in named]
        if group != "encoder" and len(missing) == len(names):
            if group != "classifier":
                initialized.append(group)
        elif missing:
            raise ValueError(f"missing key(s) in checkpoint: {missing}")
    for name in named:
        got, want = tuple(np.shape(named[name])), entries[name][4]
        if got != want:
            raise ValueError(f"shape mismatch for {original[name]!r}: checkpoint has {got}, "
                             f"the config expects {want}")

    def get(name):
        value = np.asarray(named[name], dtype=dtype)
        return value.T if entries[name][3] else value

    params: Params = {}

    def put(path, value):
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(value, dtype=dtype)

    for name, (_, path, layer, _, _) in entries.items():
        if layer is None and name in named:
            put(path, get(name))
    layers = [f"encoder.layer.{i}." for i in range(cfg.n_layer)]
    for suffix, path, _ in _BERT_LAYER:
        put(("h",) + path, np.stack([get(base + suffix) for base in layers]))
    for part, axis in (("weight", 1), ("bias", 0)):  # w: (D, 3D) = [Wq^T | Wk^T | Wv^T]
        put(("h", "attn", "c_attn", "w" if part == "weight" else "b"), np.stack([
            np.concatenate([get(f"{base}attention.self.{w}.{part}") for w in _QKV], axis=axis)
            for base in layers]))
    if initialized:
        import jax

        from gptjax.model import init_bert_params

        fresh = init_bert_params(cfg, jax.random.fold_in(jax.random.PRNGKey(seed), 1))
        for group in initialized:
            params[group] = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), fresh[group])
        log.warning("bert checkpoint has no %s head(s): initialised at random (seed %d)",
                    ", ".join(initialized), seed)
    return params, initialized


def bert_params_to_hf(cfg: GPTConfig, params: Params, *, prefix: str = ""
                      ) -> dict[str, np.ndarray]:
    """The inverse of bert_params_from_hf: HF names -> contiguous float32 arrays, the base
    model's (embeddings, encoder, pooler) with `prefix` ("bert." as the head classes
    save them), the heads' (cls.*, and classifier.* when params have a classifier)
    without. The tied decoder is left out, as transformers leaves it out of its saves.
    Raises ValueError naming the parameter when params lack one or its shape is wrong."""

    def leaf(path):
        node = params
        for part in path:
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"params lack {'.'.join(path)!r}")
            node = node[part]
        return np.asarray(node, dtype=np.float32)

    num_labels = leaf(("classifier", "b")).shape[0] if "classifier" in params else 0
    entries = _bert_entries(cfg, num_labels)
    out = {}
    for name, (group, path, layer, transposed, shape) in entries.items():
        if group == "classifier" and not num_labels:
            continue
        if path is None:  # a query, key or value slice of c_attn
            which = _QKV.index(name.split(".")[-2])
            part = "w" if name.endswith("weight") else "b"
            value = leaf(("h", "attn", "c_attn", part))[layer][..., which * cfg.n_embd:
                                                              (which + 1) * cfg.n_embd]
        else:
            value = leaf(("h",) + path if layer is not None else path)
            if layer is not None:
                if value.shape[:1] != (cfg.n_layer,):
                    raise ValueError(f"params h.{'.'.join(path)} has shape {value.shape}; "
                                     f"expected a leading axis of n_layer={cfg.n_layer}")
                value = value[layer]
        if transposed:
            value = value.T
        if value.shape != shape:
            raise ValueError(f"params for {name!r} have shape {value.shape}, the config "
                             f"expects {shape}")
        out[(prefix if group in _BERT_BASE_GROUPS else "") + name] = (
            np.ascontiguousarray(value))
    return out
