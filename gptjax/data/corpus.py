"""Corpora -> token files -> batches, on the host, in NumPy.

The pipeline:

    texts = load_texts(source)                         # list of documents (str)
    data = prepare_tokens(texts, tokenizer, out_dir)   # train.bin, val.bin, meta.json
    data.validate(cfg.vocab_size)                      # every id fits the model
    batch = train_batch(data.train, seed=s, step=i, batch_size=B, context=T)
    for batch in eval_batches(data.val, batch_size=B, context=T): ...

Batches are int32 arrays of shape (B, T + 1): a model reads `batch[:, :-1]` and predicts
`batch[:, 1:]`. A training batch is a pure function of (seed, step), so resuming at step i
needs no iterator state and gives the same batches as an uninterrupted run.
"""

from __future__ import annotations

import ast
import bisect
import functools
import glob
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import sysconfig
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    from gptjax.data.tokenizer import Tokenizer

__all__ = [
    "builtin_corpus",
    "load_texts",
    "text_fingerprint",
    "prepare_tokens",
    "load_token_data",
    "TokenData",
    "bytes_per_token",
    "train_batch",
    "eval_batches",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the token files and meta.json; bump when either changes meaning
META_FILE = "meta.json"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"

# ----------------------------------------------------------------------------------------
# The built-in corpus: CPython's own English documentation.

_MIN_DOCSTRING_CHARS = 40  # shorter ones are mostly "Return self==value." boilerplate
# Folders whose sources are not documentation: tests, third-party packages, codec tables
# (encodings/), and pydoc_data, whose topics are already the first part of the corpus.
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages"}
_SKIP_TOP = {"encodings", "pydoc_data"}
_DEFINITIONS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_STATEMENT_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")
_CLAUSES = (ast.ExceptHandler, ast.match_case)  # not statements; their bodies hold them


def _stdlib_sources(root: Path) -> list[Path]:
    """The standard library's .py files that are not tests, in sorted path order."""
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if _SKIP_PARTS.intersection(parts) or parts[0] in _SKIP_TOP:
            continue
        if path.name.startswith("test_"):
            continue
        files.append(path)
    return files


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Cleaned docstrings of a module and its public classes and functions, in source order.

    A definition whose name starts with one underscore (not a dunder) is private: its
    docstring and those nested in it are implementation notes, and are skipped.
    """
    stack: list[ast.AST] = [tree]  # depth-first, children pushed in reverse: source order
    while stack:
        node = stack.pop()
        if isinstance(node, _DEFINITIONS):
            name = getattr(node, "name", "")
            if name.startswith("_") and not name.endswith("__"):
                continue
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                yield inspect.cleandoc(doc)
        # Definitions sit only in statement lists (bodies of modules, classes, functions,
        # if/for/while/with/try/match), never inside expressions: walk just those.
        children = []
        for field in _STATEMENT_FIELDS:
            for child in getattr(node, field, ()):
                children.extend(child.body if isinstance(child, _CLAUSES) else [child])
        stack.extend(reversed(children))


@functools.lru_cache(maxsize=1)
def _builtin_corpus() -> tuple[str, ...]:
    from pydoc_data.topics import topics  # the text behind help("if"), help("FORMATTING"), ...

    # Some texts repeat (topics "if" and "else" share one; many methods share "Return
    # str(self)."): a dict keeps the first of each, in order.
    documents = dict.fromkeys(topics[key] for key in sorted(topics))
    for path in _stdlib_sources(Path(sysconfig.get_paths()["stdlib"])):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escapes etc. in old sources
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue
        documents.update(
            (doc, None) for doc in _docstrings(tree) if len(doc) >= _MIN_DOCSTRING_CHARS
        )
    return tuple(documents)


def builtin_corpus() -> list[str]:
    """The default corpus, needing no download: CPython's English documentation.

    Documents, in this order: the `pydoc_data.topics` texts (sorted by key), then the
    docstrings of the standard library's modules and of their public classes and functions
    (sorted file paths, then source order), read by parsing the sources with `ast` (nothing
    is imported). Tests, site-packages, codec tables, files that fail to parse, docstrings
    under 40 characters and repeated texts (after the first) are left out. Each docstring is
    cleaned with `inspect.cleandoc`. About 2 MB of UTF-8 on CPython 3.11; the same list on
    every call with the same Python (computed once per process, then cached).
    """
    return list(_builtin_corpus())


# ----------------------------------------------------------------------------------------
# Reading documents.


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    """The `text_field` string of every JSON object in a .jsonl file (blank lines skipped)."""
    documents = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}, line {line_number}: bad JSON ({e.msg}); expected an object "
                    f"with a {text_field!r} field"
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}, line {line_number}: no {text_field!r} field")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}, line {line_number}: field {text_field!r} is "
                    f"{type(text).__name__}, not a string"
                )
            documents.append(text)
    return documents


def _parse_hf_spec(spec: str, hf_config: str | None) -> tuple[str, str | None]:
    """ "NAME", "NAME/CONFIG" or "ORG/NAME/CONFIG" -> (dataset name, config).

    An explicit `hf_config` means the whole spec is the name ("ORG/NAME" with
    hf_config="default" names a namespaced dataset that has no configs)."""
    if hf_config is not None:
        return spec, hf_config
    parts = spec.split("/")
    if len(parts) == 1:
        return spec, None
    if len(parts) in (2, 3):
        return "/".join(parts[:-1]), parts[-1]
    raise ValueError(f"cannot read 'hf:{spec}': expected hf:NAME[/CONFIG] or hf:ORG/NAME/CONFIG")


_HF_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _load_hf(
    spec: str, *, text_field: str, split: str, config: str | None, streaming: bool
) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"reading 'hf:{spec}' needs the Hugging Face datasets package: pip install gptjax[hf]"
        ) from None
    local = Path(spec)
    if local.is_file():  # a local data file, read by the matching packaged builder
        builder = _HF_FILE_BUILDERS.get(local.suffix)
        if builder is None:
            raise ValueError(f"hf:{spec}: unknown data file type {local.suffix!r}")
        dataset = datasets.load_dataset(
            builder, data_files=str(local), split=split, streaming=streaming
        )
    elif local.is_dir():
        dataset = datasets.load_dataset(str(local), config, split=split, streaming=streaming)
    else:
        name, config = _parse_hf_spec(spec, config)
        dataset = datasets.load_dataset(name, config, split=split, streaming=streaming)
    if not streaming:
        if text_field not in dataset.column_names:
            raise ValueError(f"hf:{spec}: no {text_field!r} field (fields: {dataset.column_names})")
        records: Iterable[Any] = dataset[text_field]
    else:
        records = (r.get(text_field) if isinstance(r, dict) else None for r in dataset)
    documents = []
    for i, text in enumerate(records):
        if not isinstance(text, str):
            raise ValueError(
                f"hf:{spec}: record {i} has no string {text_field!r} field (got {text!r:.40})"
            )
        documents.append(text)
    return documents


def load_texts(
    source: str | os.PathLike | None,
    *,
    text_field: str = "text",
    hf_split: str = "train",
    hf_config: str | None = None,
    streaming: bool = False,
) -> list[str]:
    """Documents (non-empty strings, in a fixed order) read from `source`:

      None or "builtin"   `builtin_corpus()`
      "hf:SPEC"           a Hugging Face dataset's `text_field` column, split `hf_split`.
                          SPEC is NAME, NAME/CONFIG, ORG/NAME/CONFIG (or NAME with
                          `hf_config`), or a local data file (.json/.jsonl/.parquet/.csv)
                          or folder. `streaming` iterates without caching the whole dataset
                          on disk; the documents are still all collected in memory. Needs
                          `datasets` (pip install gptjax[hf]).
      a .jsonl file       one document per line, from the `text_field` string
      any other file      one document: the whole UTF-8 file
      a folder            every *.txt and *.md file below it, one document each, by path
      a glob pattern      every matching file (recursive "**" allowed), by path; .jsonl
                          files are read as above

    Empty documents are dropped. Raises ValueError naming the source when it does not exist,
    matches no files, or holds only empty or blank text; for a bad .jsonl line, naming the
    file, the line number and the field.
    """
    if source is None or source == "builtin":
        return builtin_corpus()
    source_str = os.fspath(source)
    if source_str.startswith("hf:"):
        documents = _load_hf(
            source_str[3:],
            text_field=text_field,
            split=hf_split,
            config=hf_config,
            streaming=streaming,
        )
    else:
        path = Path(source_str)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file()
            )
            if not files:
                raise ValueError(f"{path}: no .txt or .md files in this folder")
        elif glob.has_magic(source_str):
            files = sorted(Path(p) for p in glob.glob(source_str, recursive=True))
            files = [p for p in files if p.is_file()]
            if not files:
                raise ValueError(f"{source_str}: no files match this pattern")
        else:
            raise ValueError(f"{path}: no such file or folder")
        documents = []
        for file in files:
            if file.suffix == ".jsonl":
                documents.extend(_read_jsonl(file, text_field))
            else:
                documents.append(_read_text_file(file))
    documents = [d for d in documents if d]
    if not any(d.strip() for d in documents):
        raise ValueError(f"{source_str}: the corpus is empty (no non-blank text)")
    return documents


def text_fingerprint(texts: Iterable[str]) -> str:
    """sha256 hex digest of the documents, in order (each length-prefixed, so document
    boundaries count: ["ab"] and ["a", "b"] differ)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------
# Token files.


def _split_documents(
    texts: Sequence[str], val_fraction: float
) -> tuple[list[str], list[str], bool]:
    """Split the corpus text into (train documents, val documents, cut_inside).

    The validation text is the last `val_fraction` of the characters, its start moved
    forward to the next line start (a document start counts as one) so that no line is
    cut; if that leaves nothing, the cut is made exactly. When the cut falls inside a
    document, its head ends the train list and its tail starts the val list, and
    `cut_inside` is True. This works the same for one large file and for many documents.
    """
    total = sum(len(t) for t in texts)
    val_chars = math.ceil(val_fraction * total)
    if val_chars == 0:
        return list(texts), [], False
    target = total - val_chars  # number of characters that go to train
    ends = list(itertools.accumulate(len(t) for t in texts))
    k = bisect.bisect_right(ends, target)  # the document holding character `target`
    offset = target - (ends[k] - len(texts[k]))  # 0 <= offset < len(texts[k])
    if offset == 0:
        return list(texts[:k]), list(texts[k:]), False
    text = texts[k]
    newline = text.find("\n", offset - 1)
    if newline != -1 and newline + 1 < len(text):
        cut = newline + 1  # the start of the next line inside this document
    elif k + 1 < len(texts):
        return list(texts[: k + 1]), list(texts[k + 1 :]), False  # the next document
    else:
        cut = offset  # no line start left: cut exactly
    train = [*texts[:k], text[:cut]]
    val = [text[cut:], *texts[k + 1 :]]
    return train, val, True


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2" if vocab_size < 2**16 else "<u4")  # little-endian on any host


def _write_tokens(
    documents: Sequence[str],
    path: Path,
    tokenizer: Tokenizer,
    *,
    eos: int,
    dtype: np.dtype,
    batch_size: int,
    eos_after_last: bool,
    progress: tqdm,
) -> int:
    """Tokenize `documents` into the raw file `path`, each followed by `eos` (but the last
    only if `eos_after_last`); return the number of tokens written."""
    count = 0
    eos_array = np.array([eos], dtype=dtype)
    with path.open("wb") as f:
        for first in range(0, len(documents), batch_size):
            batch = documents[first : first + batch_size]
            pieces = []
            for i, ids in enumerate(tokenizer.encode_batch(batch)):
                pieces.append(np.asarray(ids, dtype=dtype))
                if eos_after_last or first + i + 1 < len(documents):
                    pieces.append(eos_array)
            if pieces:
                chunk = np.concatenate(pieces)
                f.write(chunk.tobytes())
                count += chunk.size
            progress.update(len(batch))
        f.flush()
        os.fsync(f.fileno())
    return count


def _write_json_atomic(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def prepare_tokens(
    texts: Sequence[str],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.05,
    source_fingerprint: str | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> TokenData:
    """Tokenize `texts` into `out_dir`/train.bin and val.bin, and describe them in meta.json.

    Layout: every document's ids followed by the tokenizer's `<eos>` id, documents in
    order, as raw little-endian uint16 when vocab_size < 65536 and uint32 otherwise. The
    split is by text (see `_split_documents`): val.bin holds the last `val_fraction` of the
    characters, starting at a line start; a document cut by the split ends train.bin
    without `<eos>`. `val_fraction` is in [0, 1); 0 gives an empty val.bin.

    meta.json records the format version, dtype, vocab size, `<eos>` id, both
    fingerprints, `val_fraction`, and per split the token count and the UTF-8 byte count of
    its text (`TokenData.bits_per_byte` uses the val ones).

    If meta.json already records the same tokenizer fingerprint, `source_fingerprint`
    (default: `text_fingerprint(texts)`), val_fraction and format, and the files have the
    recorded sizes, they are reused without tokenizing. Files are written under temporary
    names and renamed, meta.json last and only after both token files are in place, so an
    interrupted run leaves no meta.json that describes incomplete files. One process should
    prepare a folder at a time (on several hosts: one per file system, the others waiting).

    Documents are tokenized `batch_size` at a time with `tokenizer.encode_batch`.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    texts = list(texts)
    out_dir = Path(out_dir)
    if source_fingerprint is None:
        source_fingerprint = text_fingerprint(texts)
    tokenizer_fingerprint = tokenizer.fingerprint()
    wanted = {
        "format_version": FORMAT_VERSION,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "source_fingerprint": source_fingerprint,
        "val_fraction": val_fraction,
    }
    if (out_dir / META_FILE).is_file():
        try:
            existing = load_token_data(out_dir)
        except ValueError as e:
            logger.info("re-tokenizing into %s: %s", out_dir, e)
        else:
            if all(existing.meta.get(k) == v for k, v in wanted.items()):
                logger.info("reusing the token files in %s", out_dir)
                return existing

    eos = tokenizer.token_id("<eos>")
    dtype = _token_dtype(tokenizer.vocab_size)
    train_docs, val_docs, cut_inside = _split_documents(texts, val_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)  # the old files are no longer described
    counts = {}
    temporary = []
    try:
        with tqdm(
            total=len(train_docs) + len(val_docs),
            desc="tokenizing",
            unit="doc",
            disable=not progress,
        ) as bar:
            for name, docs, eos_after_last in (
                (TRAIN_FILE, train_docs, not cut_inside),
                (VAL_FILE, val_docs, True),
            ):
                tmp = out_dir / f".{name}.{os.getpid()}.tmp"
                temporary.append(tmp)
                counts[name] = _write_tokens(
                    docs,
                    tmp,
                    tokenizer,
                    eos=eos,
                    dtype=dtype,
                    batch_size=batch_size,
                    eos_after_last=eos_after_last,
                    progress=bar,
                )
        for tmp, name in zip(temporary, (TRAIN_FILE, VAL_FILE), strict=True):
            os.replace(tmp, out_dir / name)
    finally:
        for tmp in temporary:
            tmp.unlink(missing_ok=True)
    meta = {
        **wanted,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": eos,
        "tokenizer_kind": tokenizer.kind,
        "documents": len(texts),
        "train_tokens": counts[TRAIN_FILE],
        "val_tokens": counts[VAL_FILE],
        "train_bytes": sum(len(d.encode("utf-8", errors="surrogatepass")) for d in train_docs),
        "val_bytes": sum(len(d.encode("utf-8", errors="surrogatepass")) for d in val_docs),
    }
    _write_json_atomic(out_dir / META_FILE, meta)
    return load_token_data(out_dir)


@dataclass(frozen=True)
class TokenData:
    """Token files opened read-only.

    train, val: 1-D read-only arrays of token ids (np.memmap over train.bin / val.bin; a
        plain empty array for an empty file), dtype uint16 or uint32 as `meta["dtype"]`.
    meta: the contents of meta.json (see `prepare_tokens`).
    path: the folder.
    """

    train: np.ndarray
    val: np.ndarray
    meta: dict
    path: Path

    def validate(self, vocab_size: int, *, chunk: int = 1 << 24) -> None:
        """Raise ValueError unless every id in both files is < `vocab_size` (the model's).

        Checked on the host because inside `jit` JAX clamps or fills out-of-range indices
        silently. The message names the file, the offset (in tokens) of the first bad id,
        its value and the vocabulary size. Reads the files `chunk` tokens at a time.
        """
        for name, tokens in ((TRAIN_FILE, self.train), (VAL_FILE, self.val)):
            for start in range(0, tokens.size, chunk):
                bad = np.flatnonzero(tokens[start : start + chunk] >= vocab_size)
                if bad.size:
                    offset = start + int(bad[0])
                    raise ValueError(
                        f"{self.path / name}: token {int(tokens[offset])} at offset {offset} "
                        f"is outside the vocabulary of size {vocab_size} "
                        f"(ids 0..{vocab_size - 1}); was this data tokenized with another "
                        f"tokenizer?"
                    )

    def bits_per_byte(self, loss_nats: float) -> float:
        """Convert a mean next-token loss on val (nats per token) to bits per UTF-8 byte of
        the val text: loss * val_tokens / (val_bytes * ln 2). The `<eos>` tokens count as
        tokens but add no bytes."""
        tokens, nbytes = self.meta["val_tokens"], self.meta["val_bytes"]
        if not nbytes:
            raise ValueError(f"{self.path}: the validation split is empty")
        return loss_nats * tokens / (nbytes * math.log(2))


def _open_tokens(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"{path}: missing")
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise ValueError(
            f"{path}: {size} bytes, but meta.json says {count} {dtype.name} tokens "
            f"({count * dtype.itemsize} bytes)"
        )
    if count == 0:  # numpy cannot map an empty file
        empty = np.zeros(0, dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def load_token_data(out_dir: str | os.PathLike) -> TokenData:
    """Open the token files that `prepare_tokens` wrote in `out_dir`.

    Raises ValueError when meta.json is missing, unreadable or of another format version,
    or when a token file is missing or its size disagrees with meta.json.
    """
    out_dir = Path(out_dir)
    meta_path = out_dir / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{out_dir}: no {META_FILE}; run prepare_tokens first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        version = meta["format_version"]
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        counts = meta["train_tokens"], meta["val_tokens"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path}: unreadable ({e})") from None
    if version != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format version {version}, this code reads {FORMAT_VERSION}")
    train = _open_tokens(out_dir / TRAIN_FILE, dtype, counts[0])
    val = _open_tokens(out_dir / VAL_FILE, dtype, counts[1])
    return TokenData(train=train, val=val, meta=meta, path=out_dir)


def bytes_per_token(texts: Iterable[str], tokenizer: Tokenizer) -> float:
    """UTF-8 bytes per token of `texts` (no `<eos>` counted): multiply a loss in nats per
    token by 1 / (this * ln 2) to get bits per byte, e.g. on a sample of documents."""
    texts = list(texts)
    nbytes = sum(len(t.encode("utf-8", errors="surrogatepass")) for t in texts)
    ntokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    if ntokens == 0:
        raise ValueError("the texts have no tokens")
    return nbytes / ntokens


# ----------------------------------------------------------------------------------------
# Batches.


def check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def shard_rows(batch_size: int, shard: tuple[int, int] | None) -> slice:
    """Rows [index * B / count, (index + 1) * B / count) of a global batch of B rows."""
    if shard is None:
        return slice(0, batch_size)
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in [0, {count})")
    if batch_size % count:
        raise ValueError(f"batch_size {batch_size} does not split into {count} equal shards")
    rows = batch_size // count
    return slice(index * rows, (index + 1) * rows)


def train_batch(
    tokens: np.ndarray,
    *,
    seed: int,
    step: int,
    batch_size: int,
    context: int,
    shard: tuple[int, int] | None = None,
) -> np.ndarray:
    """Training windows: int32 of shape (batch_size, context + 1), or
    (batch_size / count, context + 1) with `shard`.

    Row b is tokens[s_b : s_b + context + 1], the starts s_b drawn uniformly from
    [0, len(tokens) - context - 1] by `np.random.default_rng([seed, step])`, so the batch
    depends on (seed, step, batch_size, context, len(tokens)) only: never on earlier calls.

    `shard=(index, count)` returns rows [index * B / count, (index + 1) * B / count) of that
    same global batch (B must be divisible by count): on several hosts, every process draws
    the same starts and reads only its own rows.

    Raises ValueError when `tokens` is shorter than one window.
    """
    check_non_negative(seed=seed, step=step, batch_size=batch_size, context=context)
    window = context + 1
    n = len(tokens)
    if n < window:
        raise ValueError(
            f"the corpus has {n} tokens, but one training window needs context + 1 = {window}"
        )
    rng = np.random.default_rng([int(seed), int(step)])
    starts = rng.integers(0, n - window + 1, size=batch_size)[shard_rows(batch_size, shard)]
    # Row by row: each window is one contiguous read from the memmap.
    return np.stack([np.asarray(tokens[s : s + window], dtype=np.int32) for s in starts])


def eval_batches(
    tokens: np.ndarray,
    *,
    batch_size: int,
    context: int,
    max_batches: int | None = None,
    shard: tuple[int, int] | None = None,
) -> Iterator[np.ndarray]:
    """Evaluation windows over `tokens` in order: an iterator of int32 (batch_size,
    context + 1) arrays (rows of each batch split as in `train_batch` with `shard`).

    Window w is tokens[w * context : w * context + context + 1]: consecutive windows share
    one token, so every token after the first is a prediction target exactly once. Windows
    that do not fill a last batch are dropped; at most `max_batches` batches are yielded.
    Raises ValueError (here, not on first iteration) when `tokens` is shorter than one
    window or than one batch of windows.
    """
    check_non_negative(batch_size=batch_size, context=context)
    if context == 0 or batch_size == 0:
        raise ValueError("eval_batches needs context > 0 and batch_size > 0")
    window = context + 1
    n = len(tokens)
    if n < window:
        raise ValueError(
            f"the validation split has {n} tokens, but one evaluation window needs "
            f"context + 1 = {window}"
        )
    num_windows = (n - 1) // context
    num_batches = num_windows // batch_size
    if num_batches == 0:
        raise ValueError(
            f"the validation split has {n} tokens: {num_windows} windows of {window}, fewer "
            f"than one batch of {batch_size}; lower the batch size or raise val_fraction"
        )
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    rows = shard_rows(batch_size, shard)

    def batches() -> Iterator[np.ndarray]:
        for b in range(num_batches):
            first = b * batch_size * context
            starts = range(first, first + batch_size * context, context)[rows]
            yield np.stack([np.asarray(tokens[s : s + window], dtype=np.int32) for s in starts])

    return batches()
