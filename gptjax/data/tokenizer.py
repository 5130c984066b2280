"""Tokenizers behind one interface: byte-level BPE, GPT-2 and GPT-1 vocabularies, chars, bytes.

Every tokenizer maps text to a list of integer ids and back, and knows the ids of the
reserved special tokens that the GPT-1 input transformations and the data pipeline use
(`SPECIAL_TOKENS`):

    <start> <delim> <extract>   fine-tuning input transformations (GPT-1 paper, section 3.3)
    <pad>                       padding of task batches
    <eos>                       document separator in the pre-training token stream

Ordinary text never encodes to a special id, even when it contains the literal string
"<eos>": special tokens enter a sequence only as ids, inserted by the caller.

Kinds:

    "bpe"         byte-level BPE trained here with HF `tokenizers` (`train_bpe`)
    "gpt2"        GPT-2's vocab.json + merges.txt (byte-level BPE)
    "openai-gpt"  GPT-1's vocab.json + merges.txt (BPE with "</w>", lower-cased text)
    "hf"          any other HF tokenizer.json
    "char"        one id per character seen in the training texts
    "byte"        one id per UTF-8 byte

A tokenizer is saved to a folder (`Tokenizer.save`) and read back by `load_tokenizer`;
`Tokenizer.fingerprint` hashes the saved content, so a resumed run can check that it
tokenizes exactly as the run that wrote the data and the checkpoint.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

__all__ = [
    "SPECIAL_TOKENS",
    "Tokenizer",
    "HFTokenizer",
    "CharTokenizer",
    "ByteTokenizer",
    "train_bpe",
    "from_tokenizer_json",
    "from_gpt2_files",
    "from_openai_gpt_files",
    "build_tokenizer",
    "load_tokenizer",
]

logger = logging.getLogger(__name__)

SPECIAL_TOKENS: tuple[str, ...] = ("<start>", "<delim>", "<extract>", "<pad>", "<eos>")

# GPT-2's vocabulary already ends with its end-of-text token; `<eos>` names it rather than
# adding a second token the pre-trained model has never seen.
_EOS_ALIASES = ("<|endoftext|>",)

_META_FILE = "gptjax_tokenizer.json"  # our own record: kind, and the whole vocab for char/byte
_HF_FILE = "tokenizer.json"
_FORMAT_VERSION = 1


def _check_special_names(names: Iterable[str]) -> list[str]:
    """Return `names` as a list without duplicates, rejecting names that are not reserved."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in SPECIAL_TOKENS]
    if unknown:
        raise ValueError(
            f"unknown special tokens {unknown}; the reserved ones are {SPECIAL_TOKENS}"
        )
    return names


class Tokenizer(abc.ABC):
    """The interface every tokenizer implements.

    Contract:
      - `encode(text)` returns ids in [0, vocab_size); it never returns special ids.
      - `decode(encode(s)) == s` for ordinary text with the "bpe", "gpt2", "char" and
        "byte" kinds ("openai-gpt" lower-cases and re-spaces text, as GPT-1 did).
      - `decode` writes a special id as its name, e.g. "<eos>".
      - `special_tokens` maps each reserved name the tokenizer has to its id.
      - Tokenizers are immutable: `add_special_tokens` returns a new one.
    """

    kind: str

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (an embedding table needs this many rows)."""

    @property
    @abc.abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Reserved special token name -> id, for the reserved tokens this tokenizer has."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`[encode(t) for t in texts]`, possibly faster (HF backends use several threads)."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (a list or a 1-D integer array)."""

    @abc.abstractmethod
    def add_special_tokens(self, names: Iterable[str]) -> Tokenizer:
        """A tokenizer with every name in `names` that this one lacks appended, in order, at
        the end of the vocabulary (ids vocab_size, vocab_size + 1, ...); `self` if none is
        missing. The names must be reserved ones (`SPECIAL_TOKENS`). The added names and ids
        are logged; compare `special_tokens` before and after to get them, and grow the
        embedding table to the new `vocab_size`."""

    @abc.abstractmethod
    def _files(self) -> dict[str, bytes]:
        """File name -> content, as `save` writes them."""

    @abc.abstractmethod
    def _content(self) -> bytes:
        """The canonical serialisation that defines the tokenizer (hashed by `fingerprint`)."""

    def token_id(self, name: str) -> int:
        """Id of the special token `name`; a ValueError naming it if this tokenizer lacks it."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise ValueError(
                f"{self.kind} tokenizer has no special token {name!r} (it has "
                f"{sorted(self.special_tokens)}); add it with add_special_tokens([{name!r}])"
            ) from None

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the tokenizer into `directory` (created if needed); return the folder.

        Folder layout: "gptjax_tokenizer.json" always (kind, format version, and for the char
        and byte kinds the whole vocabulary), plus "tokenizer.json" for HF-backed kinds.
        Each file is written to a temporary name and renamed, so a crash leaves no half file.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, content in self._files().items():
            tmp = directory / f".{name}.tmp{os.getpid()}"
            tmp.write_bytes(content)
            os.replace(tmp, directory / name)
        return directory

    def fingerprint(self) -> str:
        """sha256 hex digest of the tokenizer's canonical serialisation.

        Identical vocabularies, merges and normalisation give identical fingerprints,
        whichever way the tokenizer was built or loaded (from our folder, the bare
        tokenizer.json, or rebuilt from the same files). The `kind` label is not hashed.
        """
        return hashlib.sha256(self._content()).hexdigest()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind!r} vocab_size={self.vocab_size}>"


def _meta_json(record: dict) -> bytes:
    """Our own JSON files: ASCII, sorted keys, so the same record always gives the same bytes."""
    return (json.dumps(record, ensure_ascii=True, sort_keys=True, indent=1) + "\n").encode("ascii")


# ----------------------------------------------------------------------------------------
# HF `tokenizers`-backed tokenizers: trained BPE, GPT-2, GPT-1, any tokenizer.json.


class HFTokenizer(Tokenizer):
    """A tokenizer backed by a Hugging Face `tokenizers.Tokenizer`.

    The special ids are the vocabulary entries named like the reserved tokens; in addition
    `<eos>` names GPT-2's "<|endoftext|>" when the vocabulary has no "<eos>" entry.
    Encoding runs without the backend's post-processor (no template tokens are added) and
    with `encode_special_tokens` on, so text that spells a special token encodes as text.
    """

    def __init__(self, backend: tokenizers.Tokenizer, kind: str = "hf"):
        """Wrap `backend`, which this object then owns: do not change it afterwards."""
        self._backend = backend
        self._backend.encode_special_tokens = True
        self.kind = kind
        vocab = backend.get_vocab(with_added_tokens=True)
        # The embedding needs a row for the largest id, even if the vocabulary has holes.
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        specials = {name: vocab[name] for name in SPECIAL_TOKENS if name in vocab}
        if "<eos>" not in specials:
            for alias in _EOS_ALIASES:
                if alias in vocab:
                    specials["<eos>"] = vocab[alias]
                    break
        self._special_tokens = specials
        self._serialised: bytes | None = None

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped HF tokenizer (read-only use)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        # encode_batch_fast (tokenizers >= 0.20) skips computing offsets we do not use.
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def add_special_tokens(self, names: Iterable[str]) -> Tokenizer:
        missing = [n for n in _check_special_names(names) if n not in self._special_tokens]
        if not missing:
            return self
        backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
        first = self._vocab_size
        if backend.get_vocab_size(with_added_tokens=True) != first:
            # HF numbers new added tokens from its own count, which only equals ours when
            # the ids are contiguous.
            raise ValueError(
                f"cannot append special tokens: the vocabulary's ids are not contiguous "
                f"(largest id {first - 1}, {backend.get_vocab_size()} entries)"
            )
        backend.add_special_tokens(
            [tokenizers.AddedToken(n, special=True, normalized=False) for n in missing]
        )
        added = HFTokenizer(backend, self.kind)
        ids = [added.special_tokens[n] for n in missing]
        assert ids == list(range(first, first + len(missing))), (missing, ids, first)
        logger.info("added special tokens %s", dict(zip(missing, ids, strict=True)))
        return added

    def _content(self) -> bytes:
        if self._serialised is None:
            self._serialised = self._backend.to_str(pretty=True).encode("utf-8")
        return self._serialised

    def _files(self) -> dict[str, bytes]:
        meta = {"format_version": _FORMAT_VERSION, "kind": self.kind, "file": _HF_FILE}
        return {_HF_FILE: self._content(), _META_FILE: _meta_json(meta)}


def _with_specials(tok: HFTokenizer, add_missing_specials: bool) -> HFTokenizer:
    return tok.add_special_tokens(SPECIAL_TOKENS) if add_missing_specials else tok


def train_bpe(texts: Iterable[str], vocab_size: int, *, show_progress: bool = False) -> HFTokenizer:
    """Train a byte-level BPE tokenizer (GPT-2's scheme) on `texts`; kind "bpe".

    `vocab_size` counts everything: the five special tokens (ids 0..4, in `SPECIAL_TOKENS`
    order), the 256 byte symbols, and the merges. It must be at least 261; the result has
    fewer ids only if the texts run out of pairs to merge. Training is deterministic: the
    same texts in the same order give the same tokenizer (and fingerprint).
    """
    min_size = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_size:
        raise ValueError(
            f"byte-level BPE needs vocab_size >= {min_size} (256 bytes + "
            f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
        )
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    length = len(texts) if isinstance(texts, Sequence) else None
    backend.train_from_iterator(texts, trainer, length=length)
    return HFTokenizer(backend, "bpe")


def from_tokenizer_json(
    path: str | os.PathLike, *, add_missing_specials: bool = True, kind: str = "hf"
) -> HFTokenizer:
    """Load an HF tokenizer.json. With `add_missing_specials` (the default) the reserved
    special tokens it lacks are appended at the end of its vocabulary."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no tokenizer.json at {path}")
    tok = HFTokenizer(tokenizers.Tokenizer.from_file(str(path)), kind)
    return _with_specials(tok, add_missing_specials)


def _read_vocab_merges(vocab_json: str | os.PathLike, merges_txt: str | os.PathLike):
    for p in (vocab_json, merges_txt):
        if not Path(p).is_file():
            raise ValueError(f"no such file: {p}")
    return models.BPE.read_file(str(vocab_json), str(merges_txt))


def from_gpt2_files(
    vocab_json: str | os.PathLike,
    merges_txt: str | os.PathLike,
    *,
    add_missing_specials: bool = True,
) -> HFTokenizer:
    """GPT-2's tokenizer from its vocab.json and merges.txt; kind "gpt2".

    Byte-level BPE exactly as released (50,257 ids for GPT-2, with "<|endoftext|>" serving
    as `<eos>`). With `add_missing_specials` (the default) the other reserved tokens are
    appended after it (ids 50257..50260); pass False to keep the pre-trained vocabulary
    and add them later with `add_special_tokens`.
    """
    vocab, merges = _read_vocab_merges(vocab_json, merges_txt)
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return _with_specials(HFTokenizer(backend, "gpt2"), add_missing_specials)


def from_openai_gpt_files(
    vocab_json: str | os.PathLike,
    merges_txt: str | os.PathLike,
    *,
    add_missing_specials: bool = True,
) -> HFTokenizer:
    """GPT-1's (openai-gpt) tokenizer from its vocab.json and merges.txt; kind "openai-gpt".

    BPE over words with the "</w>" end-of-word suffix, on lower-cased text split as BERT's
    BasicTokenizer splits it (whitespace and punctuation). This is what transformers'
    OpenAIGPTTokenizer does: the original used ftfy and spaCy instead, which we do not
    reproduce. The normaliser is BERT's with lower-casing, which also strips accents and
    control characters, matching transformers. Unknown symbols map to "<unk>" when the
    vocabulary has it. Decoding joins words with single spaces, so it does not round-trip.
    """
    vocab, merges = _read_vocab_merges(vocab_json, merges_txt)
    unk = "<unk>" if "<unk>" in vocab else None
    backend = tokenizers.Tokenizer(
        models.BPE(vocab, merges, end_of_word_suffix="</w>", unk_token=unk)
    )
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.BPEDecoder(suffix="</w>")
    return _with_specials(HFTokenizer(backend, "openai-gpt"), add_missing_specials)


# ----------------------------------------------------------------------------------------
# Character and byte tokenizers.


class CharTokenizer(Tokenizer):
    """One id per character: ids 0..len(chars)-1 are `chars` in order, then the five special
    tokens in `SPECIAL_TOKENS` order. Encoding a character outside the vocabulary raises."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("chars must be distinct single characters")
        self._chars = chars
        n = len(chars)
        self._special_tokens = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._tokens = chars + list(SPECIAL_TOKENS)  # id -> text
        # Vectorised lookup: code points sorted, and the id of each.
        codepoints = np.array([ord(c) for c in chars], dtype=np.int64)
        self._order = np.argsort(codepoints, kind="stable")
        self._sorted_codepoints = codepoints[self._order]

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        """The characters seen in `texts`, sorted by code point, as the vocabulary."""
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls(sorted(seen))

    @property
    def chars(self) -> list[str]:
        """The character vocabulary (ids 0..len-1)."""
        return list(self._chars)

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    def encode(self, text: str) -> list[int]:
        # One 32-bit unit per character, so array positions are string positions.
        codepoints = np.frombuffer(
            text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32
        ).astype(np.int64)
        if self._sorted_codepoints.size == 0:
            if codepoints.size:
                raise ValueError(f"character {text[0]!r} at position 0 is not in the vocabulary")
            return []
        pos = np.searchsorted(self._sorted_codepoints, codepoints)
        pos = np.minimum(pos, self._sorted_codepoints.size - 1)
        known = self._sorted_codepoints[pos] == codepoints
        if not known.all():
            i = int(np.argmin(known))
            raise ValueError(
                f"character {text[i]!r} (U+{ord(text[i]):04X}) at position {i} is not in the "
                f"character vocabulary ({len(self._chars)} characters)"
            )
        return self._order[pos].tolist()

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._tokens):
                raise ValueError(f"id {i} is outside the vocabulary [0, {len(self._tokens)})")
            out.append(self._tokens[i])
        return "".join(out)

    def add_special_tokens(self, names: Iterable[str]) -> Tokenizer:
        _check_special_names(names)
        return self  # every reserved token is always present

    def _content(self) -> bytes:
        return _meta_json(
            {
                "format_version": _FORMAT_VERSION,
                "kind": self.kind,
                "chars": self._chars,
                "special_tokens": list(SPECIAL_TOKENS),
            }
        )

    def _files(self) -> dict[str, bytes]:
        return {_META_FILE: self._content()}


class ByteTokenizer(Tokenizer):
    """One id per UTF-8 byte (0..255), then the five special tokens (256..260).

    Decoding a byte sequence that is not valid UTF-8 (a generated sample cut mid-character)
    writes U+FFFD for the bad bytes instead of raising.
    """

    kind = "byte"

    def __init__(self):
        self._special_tokens = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKENS)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        run = bytearray()  # consecutive byte ids, decoded together
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            if not 256 <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside the vocabulary [0, {self.vocab_size})")
            out.append(run.decode("utf-8", errors="replace"))
            run.clear()
            out.append(SPECIAL_TOKENS[i - 256])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def add_special_tokens(self, names: Iterable[str]) -> Tokenizer:
        _check_special_names(names)
        return self

    def _content(self) -> bytes:
        return _meta_json(
            {
                "format_version": _FORMAT_VERSION,
                "kind": self.kind,
                "special_tokens": list(SPECIAL_TOKENS),
            }
        )

    def _files(self) -> dict[str, bytes]:
        return {_META_FILE: self._content()}


# ----------------------------------------------------------------------------------------
# Construction by name, and loading.


def build_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None = None) -> Tokenizer:
    """Build a new tokenizer of `kind` ("bpe", "char" or "byte") from `texts`.

    `vocab_size` is required for "bpe" (see `train_bpe`) and must be None for "char" (the
    texts fix the vocabulary) and "byte" (always 261); `texts` is not read for "byte".
    """
    if kind == "bpe":
        if vocab_size is None:
            raise ValueError("a 'bpe' tokenizer needs vocab_size")
        return train_bpe(texts, vocab_size)
    if kind in ("char", "byte") and vocab_size is not None:
        raise ValueError(f"a {kind!r} tokenizer's vocabulary is fixed; pass vocab_size=None")
    if kind == "char":
        return CharTokenizer.from_texts(texts)
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose 'bpe', 'char' or 'byte'")


def _merges_have_end_of_word(merges_txt: Path) -> bool:
    with merges_txt.open(encoding="utf-8") as f:
        return any("</w>" in line for line in f)


def _load_meta(path: Path) -> Tokenizer:
    """Read a folder written by `Tokenizer.save`, through its gptjax_tokenizer.json."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        kind = meta["kind"]
        version = meta["format_version"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a gptjax tokenizer file ({e})") from None
    if version != _FORMAT_VERSION:
        raise ValueError(f"{path}: format version {version}, this code reads {_FORMAT_VERSION}")
    if kind in ("char", "byte") and meta.get("special_tokens") != list(SPECIAL_TOKENS):
        raise ValueError(f"{path}: special tokens are not {SPECIAL_TOKENS}")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "byte":
        return ByteTokenizer()
    # HF-backed: the tokenizer itself sits beside this file; load it exactly as saved.
    return from_tokenizer_json(
        path.parent / meta.get("file", _HF_FILE), add_missing_specials=False, kind=kind
    )


def load_tokenizer(path: str | os.PathLike, *, add_missing_specials: bool = True) -> Tokenizer:
    """Load a tokenizer from `path`, which is one of:

      - a folder written by `Tokenizer.save` (has gptjax_tokenizer.json): the same
        tokenizer, kind included;
      - an HF tokenizer.json file, or a folder that has one (kind "hf");
      - a folder with vocab.json + merges.txt: "openai-gpt" if any merge contains "</w>",
        else "gpt2".

    For the foreign formats, `add_missing_specials` appends the reserved special tokens the
    vocabulary lacks (see `from_gpt2_files`); a tokenizer saved by `save` keeps what it had.
    """
    path = Path(path)
    if path.is_file():
        if path.name == _META_FILE:
            return _load_meta(path)
        return from_tokenizer_json(path, add_missing_specials=add_missing_specials)
    if not path.is_dir():
        raise ValueError(f"no tokenizer at {path}: no such file or folder")
    if (path / _META_FILE).is_file():
        return _load_meta(path / _META_FILE)
    if (path / _HF_FILE).is_file():
        return from_tokenizer_json(path / _HF_FILE, add_missing_specials=add_missing_specials)
    vocab, merges = path / "vocab.json", path / "merges.txt"
    if vocab.is_file() and merges.is_file():
        build = from_openai_gpt_files if _merges_have_end_of_word(merges) else from_gpt2_files
        return build(vocab, merges, add_missing_specials=add_missing_specials)
    raise ValueError(
        f"no tokenizer in {path}: expected {_META_FILE}, {_HF_FILE}, or vocab.json + merges.txt"
    )
