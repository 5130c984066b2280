"""GPTConfig, the one description of a model, and the named presets.

The config is a frozen dataclass: hashable, so it is passed to jitted functions
as a static argument; variants are made with ``dataclasses.replace``. Every
field is checked at construction and a bad value raises ``ValueError`` naming
the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ACTIVATIONS = ("gelu_tanh", "gelu", "relu")
NORMS = ("post", "pre")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
KERNELS = ("reference", "fast", "auto")
ARCHS = ("gpt", "bert")
PARAMETRIZATIONS = ("standard", "mup")


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of a transformer: a GPT decoder (GPT-1, GPT-2, GPT-3) or, as the
    contrast to it, a BERT encoder (arch="bert")."""

    # "gpt": decoder-only, causal attention, output tied to W_e (the language model).
    # "bert": encoder-only, bidirectional attention over the non-padding tokens, segment
    # (token-type) embeddings and an embedding LayerNorm, a pooler, MLM and NSP heads.
    arch: str = "gpt"

    # Size of the token embedding W_e (rows) and of the tied output softmax.
    vocab_size: int = 50257
    # Context length: number of learned positions W_p; the longest input.
    n_ctx: int = 1024
    # Number of transformer blocks.
    n_layer: int = 12
    # Attention heads per block; n_embd must divide by it.
    n_head: int = 12
    # Model width D (residual stream, embeddings).
    n_embd: int = 768
    # MLP hidden width; None means 4 * n_embd, as in all three papers.
    n_inner: int | None = None
    # Dropout on the summed token + position embeddings.
    embd_pdrop: float = 0.1
    # Dropout on the attention probabilities.
    attn_pdrop: float = 0.1
    # Dropout on each sub-block's output before the residual add.
    resid_pdrop: float = 0.1
    # LayerNorm epsilon (1e-5 in the released GPT-1 and GPT-2 checkpoints).
    layer_norm_epsilon: float = 1e-5
    # MLP non-linearity: "gelu_tanh" is the tanh approximation GPT-1 and GPT-2
    # were trained with (HF: "gelu" in openai-gpt, "gelu_new" in gpt2);
    # "gelu" is the exact erf form; "relu" for experiments.
    activation: str = "gelu_tanh"
    # "post": LayerNorm after each residual add (GPT-1).
    # "pre": LayerNorm before each sub-block plus a final ln_f (GPT-2, GPT-3).
    norm: str = "pre"
    # Compute dtype of activations and matmuls; parameters stay float32.
    dtype: str = "float32"
    # Which implementation runs the model's pieces: "reference" is model.py's plain
    # formulas (every JAX transformation composes with them); "fast" swaps in each fast
    # path of gptjax.kernels; "auto" takes, per backend, the fast paths measured faster
    # there and the reference elsewhere (the rule: gptjax.kernels.plan).
    kernels: str = "reference"
    # Implementation of jax.nn.dot_product_attention where a fast attention path uses it:
    # "auto" picks cudnn on NVIDIA GPUs in 16-bit, else xla.
    attention: str = "auto"
    # Run the layer stack as lax.scan over stacked layers (one compiled block,
    # fast compiles for deep models) instead of an unrolled Python loop.
    scan_layers: bool = True
    # Rematerialise each block in the backward pass (saves activation memory).
    remat: bool = False
    # GPT-3's locally banded attention: when set, odd layers (1, 3, ...) attend
    # only to the previous `attention_band` positions (themselves included);
    # even layers stay dense. None means every layer is dense.
    attention_band: int | None = None
    # Std of the N(0, std) initialisation of all weight matrices.
    init_std: float = 0.02
    # GPT-2's init: residual projections (attn.c_proj, mlp.c_proj) scaled by
    # 1/sqrt(2 * n_layer). None means: on for pre-LN, off for post-LN.
    scale_residual_init: bool | None = None
    # BERT only: number of segment (token-type) embeddings (sentence A and sentence B).
    type_vocab_size: int = 2
    # "standard": today's parametrization (N(0, init_std) weights, one learning rate,
    # attention scaled by 1/sqrt(head size)). "mup": the maximal-update parametrization
    # (Yang et al. 2021, muTransfer) relative to a model of width mup_base_width, so
    # that hyper-parameters tuned at the base width transfer to wider models
    # (gptjax.mup gives the rules).
    parametrization: str = "standard"
    # muP's base width D0: muP is relative to this config at n_embd = D0 (the same heads,
    # so D0 must divide by n_head). At n_embd == D0 muP equals the standard
    # parametrization exactly (attention's 1/K scaling is taken relative to D0's head size).
    mup_base_width: int = 128

    def __post_init__(self):
        for name in ("vocab_size", "n_ctx", "n_layer", "n_head", "n_embd"):
            _check_positive_int(name, getattr(self, name))
        if self.n_inner is not None:
            _check_positive_int("n_inner", self.n_inner)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}"
            )
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"GPTConfig.{name}={value!r} must be a float in [0, 1)")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or self.layer_norm_epsilon <= 0:
            raise ValueError(
                f"GPTConfig.layer_norm_epsilon={self.layer_norm_epsilon!r} must be > 0"
            )
        if not isinstance(self.init_std, (int, float)) or self.init_std <= 0:
            raise ValueError(f"GPTConfig.init_std={self.init_std!r} must be > 0")
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("attention", self.attention, ATTENTION_IMPLS)
        _check_choice("kernels", self.kernels, KERNELS)
        _check_choice("arch", self.arch, ARCHS)
        _check_choice("parametrization", self.parametrization, PARAMETRIZATIONS)
        _check_positive_int("type_vocab_size", self.type_vocab_size)
        _check_positive_int("mup_base_width", self.mup_base_width)
        if self.arch == "bert" and self.parametrization != "standard":
            raise ValueError(f"GPTConfig.parametrization={self.parametrization!r}: muP is "
                             "implemented for arch='gpt' only")
        if self.parametrization == "mup" and self.mup_base_width % self.n_head:
            raise ValueError(
                f"GPTConfig.mup_base_width={self.mup_base_width} must be a multiple of "
                f"n_head={self.n_head}: muP's base model (n_embd = mup_base_width, the same "
                "heads) needs a whole head size")
        if self.arch == "bert" and self.attention_band is not None:
            raise ValueError(f"GPTConfig.attention_band={self.attention_band}: banded "
                             "attention is GPT-3's; arch='bert' attends to every token")
        for name in ("scan_layers", "remat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)!r} must be a bool")
        if self.attention_band is not None:
            _check_positive_int("attention_band", self.attention_band)
        if self.scale_residual_init is not None and not isinstance(self.scale_residual_init, bool):
            raise ValueError(
                f"GPTConfig.scale_residual_init={self.scale_residual_init!r} must be a bool or None"
            )

    @property
    def mlp_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def residual_init_scaled(self) -> bool:
        if self.scale_residual_init is None:
            return self.norm == "pre"
        return self.scale_residual_init

    def layer_is_banded(self, layer: int) -> bool:
        """GPT-3 alternates dense and banded layers; here odd layers are banded."""
        return self.attention_band is not None and layer % 2 == 1

    def identity(self) -> dict:
        """The fields that define the model, all but IMPLEMENTATION_FIELDS: what a
        resumed run must match (it may change how the model is computed)."""
        return {k: v for k, v in self.to_dict().items() if k not in IMPLEMENTATION_FIELDS}

    def replace(self, **changes) -> GPTConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, *, where: str = "config") -> GPTConfig:
        """Build a config from plain data, rejecting unknown keys and wrong types."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"{where}: unknown GPTConfig field(s) {unknown}")
        checked = {}
        for key, value in data.items():
            checked[key] = coerce_setting(key, value, fields[key].type, where)
        return cls(**checked)


def setting_type(annotation) -> tuple[type | None, bool]:
    """(int, float, str or bool, whether None is allowed) of a settings field's annotation.

    The annotation is a type (``int | None``) or, under ``from __future__ import
    annotations``, its text ("int | None"). Any other type gives (None, optional). The one
    reader of annotations: config files (`coerce_setting`) and the command line
    (gptjax.cli.settings) both use it.
    """
    import types
    import typing

    if isinstance(annotation, str):
        names = [part.strip() for part in annotation.split("|")]
    else:
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        members = typing.get_args(annotation) if union else (annotation,)
        names = ["None" if m is type(None) else getattr(m, "__name__", str(m))
                 for m in members]
    optional = "None" in names
    rest = [name for name in names if name != "None"]
    scalars = {"int": int, "float": float, "str": str, "bool": bool}
    kind = scalars.get(rest[0]) if len(rest) == 1 else None
    return kind, optional


def coerce_setting(key: str, value, annotation, where: str):
    """`value` (from JSON, TOML or YAML) checked against the field's annotation: a
    ValueError naming `where` and the key when it does not fit; ints may stand for floats
    (and become floats); None only where the annotation allows it."""
    kind, optional = setting_type(annotation)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: field {key!r} may not be null")
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"{where}: field {key!r}={value!r} must be a bool")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}: field {key!r}={value!r} must be an int")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: field {key!r}={value!r} must be a number")
        return float(value)
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r}={value!r} must be a string")
    return value


# Settings that choose how the model is computed, not what it computes: the same
# parameters give the same results (to rounding) whatever their values, so a run may
# resume with others (e.g. --kernels reference to compose jax.jvp with a trained model).
IMPLEMENTATION_FIELDS = ("kernels", "attention", "scan_layers", "remat")


# The enumerated settings and their choices (validation and the command line's help).
CHOICES = {
    "activation": ACTIVATIONS,
    "norm": NORMS,
    "dtype": DTYPES,
    "kernels": KERNELS,
    "attention": ATTENTION_IMPLS,
    "arch": ARCHS,
    "parametrization": PARAMETRIZATIONS,
}


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"GPTConfig.{name}={value!r} must be a positive int")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"GPTConfig.{name}={value!r} is not one of {list(choices)}")


# GPT-1 (Radford et al. 2018): 40,478 BPE tokens (40,000 merges) plus room for
# the five special tokens gptjax reserves: <start>, <delim>, <extract>, <pad>, <eos>.
GPT1_BPE_VOCAB = 40478
GPT1_SPECIAL_TOKENS = 5

_GPT2 = dict(vocab_size=50257, n_ctx=1024, norm="pre", activation="gelu_tanh")

PRESETS: dict[str, GPTConfig] = {
    "gpt1": GPTConfig(
        vocab_size=GPT1_BPE_VOCAB + GPT1_SPECIAL_TOKENS,
        n_ctx=512,
        n_layer=12,
        n_head=12,
        n_embd=768,
        norm="post",
        activation="gelu_tanh",
    ),
    "gpt2": GPTConfig(**_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(**_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(**_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(**_GPT2, n_layer=48, n_head=25, n_embd=1600),
    # Small models for a 2-core CPU. "char" is the character-level recipe of
    # the training issue (4 x 128, context 64, no dropout). Their layers are
    # unrolled: XLA's CPU backend runs a scanned layer stack markedly slower (the
    # README's Speed section gives the figures), and at 4-6 layers compiling takes
    # seconds either way.
    "char": GPTConfig(
        vocab_size=256, n_ctx=64, n_layer=4, n_head=4, n_embd=128,
        embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, scan_layers=False,
    ),
    # The default of `python train.py`: byte-level BPE on the built-in corpus.
    "cpu-small": GPTConfig(
        vocab_size=4096, n_ctx=128, n_layer=4, n_head=4, n_embd=192,
        embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, scan_layers=False,
    ),
    # A GPT-1 shaped (post-LN) model at CPU size.
    "gpt1-tiny": GPTConfig(
        vocab_size=4096, n_ctx=128, n_layer=4, n_head=4, n_embd=192, norm="post",
        scan_layers=False,
    ),
    "cpu-6x384": GPTConfig(
        vocab_size=256, n_ctx=256, n_layer=6, n_head=6, n_embd=384,
        embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, scan_layers=False,
    ),
    "tiny": GPTConfig(vocab_size=512, n_ctx=64, n_layer=2, n_head=2, n_embd=64),
}

# GPT-3 (Brown et al. 2020, Table 2.1): n_layer, d_model, n_heads, d_head, context 2048,
# dense and locally banded attention alternating. The paper's 13B row says
# d_model 5140 with 40 heads of 128; 40 x 128 = 5120, the width used here. Its XL
# row says 24 heads of 128 at d_model 2048; 2048 / 128 = 16 heads are used here.
# The paper gives no band width; 256 follows the Sparse Transformer's local stride.
_GPT3_ROWS = {
    "gpt3-small": (12, 768, 12),
    "gpt3-medium": (24, 1024, 16),
    "gpt3-large": (24, 1536, 16),
    "gpt3-xl": (24, 2048, 16),
    "gpt3-2.7b": (32, 2560, 32),
    "gpt3-6.7b": (32, 4096, 32),
    "gpt3-13b": (40, 5120, 40),
    "gpt3-175b": (96, 12288, 96),
}
for _name, (_layers, _width, _heads) in _GPT3_ROWS.items():
    PRESETS[_name] = GPTConfig(
        vocab_size=50257, n_ctx=2048, n_layer=_layers, n_head=_heads, n_embd=_width,
        norm="pre", attention_band=256,
    )


def preset(name: str, **overrides) -> GPTConfig:
    """A named configuration, optionally with fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# BERT (Devlin et al. 2019): post-LN encoder blocks, exact GELU, LayerNorm epsilon 1e-12,
# 512 positions, 30,522 WordPiece tokens, two segments. BERT-base has 110M parameters and
# BERT-large 340M (the paper's counts). bert-cpu-small has cpu-small's width, depth and
# context, so that GPT and BERT are compared at equal size.
_BERT = dict(
    arch="bert", vocab_size=30522, n_ctx=512, norm="post", activation="gelu",
    layer_norm_epsilon=1e-12, scale_residual_init=False,
)
PRESETS["bert-base"] = GPTConfig(**_BERT, n_layer=12, n_head=12, n_embd=768)
PRESETS["bert-large"] = GPTConfig(**_BERT, n_layer=24, n_head=16, n_embd=1024)
PRESETS["bert-cpu-small"] = GPTConfig(
    **{**_BERT, "vocab_size": 4096, "n_ctx": 128}, n_layer=4, n_head=4, n_embd=192,
    embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, scan_layers=False,
)
PRESETS["bert-tiny"] = GPTConfig(
    **{**_BERT, "vocab_size": 512, "n_ctx": 64}, n_layer=2, n_head=2, n_embd=64,
)
