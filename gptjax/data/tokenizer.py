"""Tokenizers behind one interface: byte-level BPE, WordPiece, GPT-2, GPT-1 and BERT
vocabularies, chars, bytes.

Every tokenizer maps text to a list of integer ids and back, and knows the ids of the
reserved special tokens that the GPT-1 input transformations and the data pipeline use
(`SPECIAL_TOKENS`):

    <start> <delim> <extract>   fine-tuning input transformations (GPT-1 paper, section 3.3)
    <pad>                       padding of task batches
    <eos>                       document separator in the pre-training token stream

and, when it has them, of BERT's (`BERT_SPECIAL_TOKENS`): [PAD] [UNK] [CLS] [SEP] [MASK].
In a BERT vocabulary `<pad>` names [PAD] and `<eos>` names [SEP] (BERT's own separator), so
the GPT data pipeline runs on it unchanged and the vocabulary keeps its pre-trained size.

Ordinary text never encodes to a special id (but [UNK], for what a WordPiece vocabulary
cannot spell), even when it contains the literal string "<eos>" or "[MASK]": special tokens
enter a sequence only as ids, inserted by the caller.

Kinds:

    "bpe"         byte-level BPE trained here with HF `tokenizers` (`train_bpe`)
    "gpt2"        GPT-2's vocab.json + merges.txt (byte-level BPE)
    "openai-gpt"  GPT-1's vocab.json + merges.txt (BPE with "</w>", lower-cased text)
    "wordpiece"   BERT's scheme: trained here (`train_wordpiece`) or read from BERT's
                  released vocab.txt (`from_bert_vocab`)
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
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

__all__ = [
    "SPECIAL_TOKENS",
    "BERT_SPECIAL_TOKENS",
    "Tokenizer",
    "HFTokenizer",
    "CharTokenizer",
    "ByteTokenizer",
    "train_bpe",
    "train_wordpiece",
    "from_bert_vocab",
    "from_tokenizer_json",
    "from_gpt2_files",
    "from_openai_gpt_files",
    "build_tokenizer",
    "load_tokenizer",
]

logger = logging.getLogger(__name__)

SPECIAL_TOKENS: tuple[str, ...] = ("<start>", "<delim>", "<extract>", "<pad>", "<eos>")

# BERT's special tokens, in the order of their ids in a WordPiece vocabulary trained here
# (0..4; [PAD] = 0 as in BERT's released vocabularies).
BERT_SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# Reserved names served by a token the vocabulary already has, rather than by a new one the
# pre-trained model has never seen: GPT-2's end-of-text token ends its documents; BERT's
# [SEP] ends each segment and [PAD] pads.
_ALIASES = {"<eos>": ("<|endoftext|>", "[SEP]"), "<pad>": ("[PAD]",)}

_META_FILE = "gptjax_tokenizer.json"  # our own record: kind, and the whole vocab for char/byte
_HF_FILE = "tokenizer.json"
_FORMAT_VERSION = 1


def _check_special_names(
    names: Iterable[str], allowed: Sequence[str] = SPECIAL_TOKENS
) -> list[str]:
    """Return `names` as a list without duplicates, rejecting names not in `allowed`."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(
            f"unknown special tokens {unknown}; the reserved ones are {tuple(allowed)}"
        )
    return names


class Tokenizer(abc.ABC):
    """The interface every tokenizer implements.

    Contract:
      - `encode(text)` returns ids in [0, vocab_size); it never returns special ids, but
        for BERT's [UNK], which stands for text the vocabulary cannot spell.
      - `decode(encode(s)) == s` for ordinary text with the "bpe", "gpt2", "char" and
        "byte" kinds ("openai-gpt" lower-cases and re-spaces text, as GPT-1 did).
      - `decode` writes a special id as its name, e.g. "<eos>".
      - `special_tokens` maps each reserved name the tokenizer has to its id (an id may
        have two names: in a BERT vocabulary "<eos>" and "[SEP]" are one token).
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

    The special ids are the vocabulary entries named like the reserved tokens (GPT's and
    BERT's); in addition, when the vocabulary has no entry of that name, `<eos>` names
    GPT-2's "<|endoftext|>" or BERT's "[SEP]", and `<pad>` names "[PAD]".
    Encoding runs without the backend's post-processor (no template tokens are added) and
    with `encode_special_tokens` on, so text that spells a special token encodes as text.
    `add_special_tokens` accepts both GPT's and BERT's reserved names.
    """

    def __init__(self, backend: tokenizers.Tokenizer, kind: str = "hf"):
        """Wrap `backend`, which this object then owns: do not change it afterwards."""
        self._backend = backend
        self._backend.encode_special_tokens = True
        self.kind = kind
        vocab = backend.get_vocab(with_added_tokens=True)
        # The embedding needs a row for the largest id, even if the vocabulary has holes.
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        added = {t.content for t in backend.get_added_tokens_decoder().values()}

        def lookup(name: str) -> int | None:
            # BERT's names count only as registered added tokens: a byte-level BPE trained
            # on text that spells "[SEP]" may have learnt it as an ordinary token.
            if name in BERT_SPECIAL_TOKENS and name not in added:
                return None
            return vocab.get(name)

        names = SPECIAL_TOKENS + BERT_SPECIAL_TOKENS
        specials = {name: lookup(name) for name in names if lookup(name) is not None}
        for name, aliases in _ALIASES.items():
            found = [i for alias in aliases if (i := lookup(alias)) is not None]
            if name not in specials and found:
                specials[name] = found[0]
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
        names = _check_special_names(names, SPECIAL_TOKENS + BERT_SPECIAL_TOKENS)
        missing = [n for n in names if n not in self._special_tokens]
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


def _is_bert_vocabulary(tok: Tokenizer) -> bool:
    return all(name in tok.special_tokens for name in BERT_SPECIAL_TOKENS)


def _with_specials(tok: HFTokenizer, add_missing_specials: bool) -> HFTokenizer:
    """`tok` with the reserved tokens it lacks appended, if asked. A BERT vocabulary is
    complete as it is: its [SEP] and [PAD] serve as `<eos>` and `<pad>`, and BERT's input
    format needs none of GPT-1's task tokens, so its size stays that of the pre-trained
    embedding (call `add_special_tokens` for GPT-1's format)."""
    if not add_missing_specials or _is_bert_vocabulary(tok):
        return tok
    return tok.add_special_tokens(SPECIAL_TOKENS)


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
# WordPiece: BERT's tokenizer, trained here or read from BERT's vocab.txt.


def _bert_backend(
    vocab: dict[str, int], *, lowercase: bool, strip_accents: bool | None, chinese_chars: bool
) -> tokenizers.Tokenizer:
    """BERT's pipeline around a WordPiece vocabulary, as transformers' BertTokenizer builds it:
    BertNormalizer (control characters dropped, CJK characters spaced apart, lower-casing,
    and accents stripped when `strip_accents`, or when it is None and `lowercase`),
    BertPreTokenizer (splits at whitespace and punctuation), WordPiece with "##"
    continuations (a word that cannot be split, or is over 100 characters, is one [UNK]),
    the WordPiece decoder, and the `[CLS] A [SEP] B [SEP]` template as post-processor (for
    users of the saved tokenizer.json; `HFTokenizer.encode` does not apply it)."""
    backend = tokenizers.Tokenizer(
        models.WordPiece(
            vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100
        )
    )
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=chinese_chars,
        strip_accents=strip_accents,
        lowercase=lowercase,
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    # Already in the vocabulary: registering them keeps their ids and marks them special.
    backend.add_special_tokens(
        [tokenizers.AddedToken(n, special=True, normalized=False) for n in BERT_SPECIAL_TOKENS]
    )
    return backend


def train_wordpiece(
    texts: Iterable[str],
    vocab_size: int,
    *,
    lowercase: bool = True,
    limit_alphabet: int = 1000,
    show_progress: bool = False,
) -> HFTokenizer:
    """Train a WordPiece tokenizer (BERT's scheme) on `texts`; kind "wordpiece".

    The pipeline is BERT's uncased one (`lowercase=False`: cased, accents kept). The
    alphabet is the `limit_alphabet` most frequent characters of the normalised words (ties
    by code point); a word with any other character encodes as [UNK]. Ids: the five
    `BERT_SPECIAL_TOKENS` at 0..4 ([PAD] [UNK] [CLS] [SEP] [MASK]), then the "##" form of
    every alphabet character seen inside a word (sorted), the alphabet (sorted), then the
    learnt subwords. `vocab_size` counts them all; it must cover the specials, the alphabet
    and its "##" forms (the error says how many that is for these texts); the result has
    fewer ids only if the texts run out of pairs to merge.

    Training is deterministic: the same texts in the same order give the same tokenizer
    (and fingerprint) in every process, which a resumed run relies on.
    """
    texts = list(texts)
    if limit_alphabet < 1:
        raise ValueError(f"limit_alphabet must be at least 1, got {limit_alphabet}")
    normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: dict[str, int] = {}
    inside: set[str] = set()  # characters seen after a word's first
    for text in texts:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            for c in word:
                counts[c] = counts.get(c, 0) + 1
            inside.update(word[1:])
    if not counts:
        raise ValueError("cannot train WordPiece: the texts have no characters")
    alphabet = sorted(sorted(counts, key=lambda c: (-counts[c], c))[:limit_alphabet])
    continuations = ["##" + c for c in sorted(inside.intersection(alphabet))]
    needed = len(BERT_SPECIAL_TOKENS) + len(alphabet) + len(continuations)
    if vocab_size < needed:
        raise ValueError(
            f"WordPiece needs vocab_size >= {needed} for these texts "
            f"({len(BERT_SPECIAL_TOKENS)} special tokens, {len(alphabet)} characters and "
            f"{len(continuations)} '##' continuations), got {vocab_size}; raise vocab_size "
            f"or lower limit_alphabet"
        )
    # tokenizers' trainer numbers the "##" symbols as it meets them in a hash map, whose
    # order changes from process to process, and breaks ties between equally frequent
    # merges by those numbers, so the learnt vocabulary itself would change from run to run
    # (huggingface/tokenizers issue #1794). Handing them over as special tokens fixes their
    # ids; the tokenizer is then rebuilt with only BERT's five as special tokens.
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=[*BERT_SPECIAL_TOKENS, *continuations],
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        continuing_subword_prefix="##",
        show_progress=show_progress,
    )
    trained = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trained.normalizer = normalizer
    trained.pre_tokenizer = pre_tokenizer
    trained.train_from_iterator(texts, trainer, length=len(texts))
    vocab = trained.get_vocab(with_added_tokens=False)
    assert [vocab[n] for n in BERT_SPECIAL_TOKENS] == list(range(len(BERT_SPECIAL_TOKENS)))
    backend = _bert_backend(vocab, lowercase=lowercase, strip_accents=None, chinese_chars=True)
    return HFTokenizer(backend, "wordpiece")


def _read_bert_vocab(path: Path) -> dict[str, int]:
    """token -> id from BERT's vocab.txt: one token per line, the id being the line's index.

    Lines end at "\n", "\r\n" or "\r", as Python's text mode (and so transformers) reads
    them; a final newline ends the last line."""
    if not path.is_file():
        raise ValueError(f"no vocab.txt at {path}")
    try:
        with path.open(encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 vocab.txt ({e})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: empty vocab.txt (expected one token per line)")
    vocab: dict[str, int] = {}
    for index, token in enumerate(lines):
        if not token:
            raise ValueError(f"{path}, line {index + 1}: empty token")
        if token in vocab:
            raise ValueError(
                f"{path}, line {index + 1}: token {token!r} repeats line {vocab[token] + 1}"
            )
        vocab[token] = index
    missing = [n for n in BERT_SPECIAL_TOKENS if n not in vocab]
    if missing:
        raise ValueError(
            f"{path}: not a BERT vocabulary, it lacks the special tokens {missing} "
            f"(it needs all of {BERT_SPECIAL_TOKENS})"
        )
    return vocab


def from_bert_vocab(
    vocab_txt: str | os.PathLike,
    *,
    lowercase: bool = True,
    strip_accents: bool | None = None,
    chinese_chars: bool = True,
) -> HFTokenizer:
    """BERT's tokenizer from its released vocab.txt; kind "wordpiece".

    vocab.txt holds one token per line (UTF-8), the id of a token being its line's index; it
    must have [PAD] [UNK] [CLS] [SEP] [MASK] and no token twice. The options are
    transformers' BertTokenizer's (`do_lower_case`, `strip_accents`,
    `tokenize_chinese_chars`), with its defaults (BERT's uncased models), and the ids are
    the ones it gives. Nothing is appended: the vocabulary keeps the size of the model's
    embedding, with [SEP] as `<eos>` and [PAD] as `<pad>`.
    """
    vocab = _read_bert_vocab(Path(vocab_txt))
    backend = _bert_backend(
        vocab, lowercase=lowercase, strip_accents=strip_accents, chinese_chars=chinese_chars
    )
    return HFTokenizer(backend, "wordpiece")


_BERT_CONFIG_FILE = "tokenizer_config.json"  # transformers' record of the tokenizer options
_BERT_OPTIONS = {  # transformers' name -> ours, and whether null is allowed
    "do_lower_case": ("lowercase", False),
    "strip_accents": ("strip_accents", True),
    "tokenize_chinese_chars": ("chinese_chars", False),
}


def _bert_folder_options(folder: Path) -> dict:
    """`from_bert_vocab` options from the folder's tokenizer_config.json, if it has one."""
    path = folder / _BERT_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    options = {}
    for key, (name, nullable) in _BERT_OPTIONS.items():
        if key in config:
            value = config[key]
            if not (isinstance(value, bool) or (nullable and value is None)):
                allowed = "true, false or null" if nullable else "true or false"
                raise ValueError(f"{path}: {key} is {value!r}; expected {allowed}")
            options[name] = value
    return options


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
    """Build a new tokenizer of `kind` ("bpe", "wordpiece", "char" or "byte") from `texts`.

    `vocab_size` is required for "bpe" and "wordpiece" (see `train_bpe`, `train_wordpiece`)
    and must be None for "char" (the texts fix the vocabulary) and "byte" (always 261);
    `texts` is not read for "byte".
    """
    if kind in ("bpe", "wordpiece"):
        if vocab_size is None:
            raise ValueError(f"a {kind!r} tokenizer needs vocab_size")
        return train_bpe(texts, vocab_size) if kind == "bpe" else train_wordpiece(texts, vocab_size)
    if kind in ("char", "byte") and vocab_size is not None:
        raise ValueError(f"a {kind!r} tokenizer's vocabulary is fixed; pass vocab_size=None")
    if kind == "char":
        return CharTokenizer.from_texts(texts)
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(
        f"unknown tokenizer kind {kind!r}; choose 'bpe', 'wordpiece', 'char' or 'byte'"
    )


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
        else "gpt2";
      - BERT's vocab.txt, or a folder that has one (kind "wordpiece"): in a folder, the
        options of a transformers tokenizer_config.json beside it are honoured
        (do_lower_case, strip_accents, tokenize_chinese_chars); a bare file gets BERT's
        uncased defaults.

    For the foreign formats, `add_missing_specials` appends the reserved special tokens the
    vocabulary lacks (see `from_gpt2_files`), except to a BERT vocabulary, which is complete
    (see `_with_specials`); a tokenizer saved by `save` keeps what it had.
    """
    path = Path(path)
    if path.is_file():
        if path.name == _META_FILE:
            return _load_meta(path)
        if path.suffix == ".txt":
            return from_bert_vocab(path)
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
    if (path / "vocab.txt").is_file():
        return from_bert_vocab(path / "vocab.txt", **_bert_folder_options(path))
    raise ValueError(
        f"no tokenizer in {path}: expected {_META_FILE}, {_HF_FILE}, vocab.json + merges.txt, "
        f"or vocab.txt"
    )
