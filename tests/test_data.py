"""Data pipeline: corpora, token files, batches."""

import ast
import importlib.util
import inspect
import json
import math
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from gptjax.data import corpus as data
from gptjax.data.corpus import (
    builtin_corpus,
    eval_batches,
    load_texts,
    load_token_data,
    prepare_tokens,
    text_fingerprint,
    train_batch,
)
from gptjax.data.tokenizer import ByteTokenizer, CharTokenizer

HAS_DATASETS = importlib.util.find_spec("datasets") is not None

# ----------------------------------------------------------------------------------------
# The built-in corpus.


def test_builtin_corpus_is_python_documentation():
    from pydoc_data.topics import topics

    corpus = builtin_corpus()
    assert corpus == builtin_corpus()  # deterministic (and cached)
    corpus.append("mutating my copy")
    assert builtin_corpus()[-1] != "mutating my copy"  # callers get their own list
    corpus.pop()
    assert 1_000_000 < sum(len(d.encode()) for d in corpus) < 3_000_000
    topic_texts = list(dict.fromkeys(topics[k] for k in sorted(topics)))  # one repeats
    assert corpus[: len(topic_texts)] == topic_texts
    assert inspect.cleandoc(json.dumps.__doc__) in corpus
    assert all(len(d) >= 40 for d in corpus[len(topic_texts) :])
    assert len(set(corpus)) == len(corpus)


def test_builtin_corpus_skips_tests():
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = data._stdlib_sources(root)
    assert root / "json" / "__init__.py" in sources
    for path in sources:
        parts = path.relative_to(root).parts
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), path
        assert not path.name.startswith("test_"), path
    regrtest_support = root / "test" / "support" / "__init__.py"
    if regrtest_support.is_file():
        doc = ast.get_docstring(ast.parse(regrtest_support.read_bytes()))
        assert doc not in builtin_corpus()


def test_docstrings_in_source_order_public_only():
    source = '''
"""Module docstring, long enough to be kept by the corpus filter."""
class A:
    """Class A docstring."""
    def method(self):
        """Method docstring."""
    def _private(self):
        """Private docstring."""
        def inner():
            """Inner of private."""
if True:
    def f():
        """Function in an if."""
try:
    pass
except ImportError:
    def g():
        """Function in a handler."""
'''
    docs = list(data._docstrings(ast.parse(source)))
    assert docs == [
        "Module docstring, long enough to be kept by the corpus filter.",
        "Class A docstring.",
        "Method docstring.",
        "Function in an if.",
        "Function in a handler.",
    ]


# ----------------------------------------------------------------------------------------
# Reading documents.


def test_load_texts_file_folder_glob(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.md").write_text("first", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "skip.py").write_text("not read", encoding="utf-8")
    assert load_texts(tmp_path / "b.txt") == ["second"]
    assert load_texts(tmp_path) == ["first", "second", "third\n"]
    assert load_texts(str(tmp_path / "**" / "*.txt")) == ["second", "third\n"]
    assert load_texts(None) == builtin_corpus()
    assert load_texts("builtin") == builtin_corpus()


def test_load_texts_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_texts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="no files match"):
        load_texts(str(tmp_path / "*.txt"))
    with pytest.raises(ValueError, match="no .txt or .md"):
        load_texts(tmp_path)
    (tmp_path / "blank.txt").write_text(" \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_texts(tmp_path)


def test_load_texts_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n', encoding="utf-8")
    assert load_texts(path) == ["one", "two"]
    path.write_text('{"body": "one"}\n', encoding="utf-8")
    assert load_texts(path, text_field="body") == ["one"]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', '{"text": "ok"', ""], r"docs.jsonl, line 2: bad JSON.*'text'"),
        (['{"text": "ok"}', "", '{"title": "x"}'], r"docs.jsonl, line 3: no 'text' field"),
        (['{"text": 5}'], r"docs.jsonl, line 1: field 'text' is int"),
        (["[1, 2]"], r"docs.jsonl, line 1: no 'text' field"),
    ],
)
def test_load_texts_jsonl_errors(tmp_path, lines, message):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_texts(path)


@pytest.mark.skipif(not HAS_DATASETS, reason="datasets is not installed")
def test_load_texts_hf_local_file(tmp_path):
    path = tmp_path / "local.jsonl"
    path.write_text('{"text": "alpha"}\n{"text": "beta"}\n', encoding="utf-8")
    assert load_texts(f"hf:{path}") == ["alpha", "beta"]
    assert load_texts(f"hf:{path}", streaming=True) == ["alpha", "beta"]
    with pytest.raises(ValueError, match="'body'"):
        load_texts(f"hf:{path}", text_field="body")


def test_load_texts_hf_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"pip install gptjax\[hf\]"):
        load_texts("hf:wikitext/wikitext-2-raw-v1")


def test_hf_spec_parsing():
    assert data._parse_hf_spec("wikitext", None) == ("wikitext", None)
    assert data._parse_hf_spec("wikitext/raw", None) == ("wikitext", "raw")
    assert data._parse_hf_spec("org/name/raw", None) == ("org/name", "raw")
    assert data._parse_hf_spec("org/name", "default") == ("org/name", "default")


def test_text_fingerprint():
    assert text_fingerprint(["ab", "c"]) == text_fingerprint(["ab", "c"])
    assert text_fingerprint(["ab", "c"]) != text_fingerprint(["a", "bc"])
    assert text_fingerprint(["ab", "c"]) != text_fingerprint(["c", "ab"])
    assert len(text_fingerprint([])) == 64


# ----------------------------------------------------------------------------------------
# Token files.

DOCS = [
    "First document.\nIt has two lines.\n",
    "Second document, one line.",
    "Third document:\nline two\nline three\nline four\n",
    "Fourth, with unicode: café ☃.\n",
]


class CountingTokenizer:
    """Wraps a tokenizer and counts encode_batch calls."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode_batch(self, texts):
        self.calls += 1
        return self.inner.encode_batch(texts)


def _strip_eos(tokens, eos):
    return [int(t) for t in tokens if t != eos]


@pytest.mark.parametrize("val_fraction", [0.0, 0.05, 0.3, 0.6])
def test_prepare_tokens_layout_and_split(tmp_path, val_fraction):
    tok = ByteTokenizer()
    eos = tok.token_id("<eos>")
    got = prepare_tokens(DOCS, tok, tmp_path, val_fraction=val_fraction, progress=False)
    assert got.train.dtype == np.uint16 and got.meta["dtype"] == "uint16"
    assert not got.train.flags.writeable
    # Together the splits are the corpus with <eos> after each document.
    stream = np.concatenate([got.train, got.val])
    expected = []
    for doc in DOCS:
        expected += tok.encode(doc) + [eos]
    assert stream.tolist() == expected
    val_text = tok.decode(_strip_eos(got.val, eos))
    assert got.meta["val_bytes"] == len(val_text.encode())
    assert got.meta["val_tokens"] == got.val.size
    assert got.meta["train_tokens"] == got.train.size
    if val_fraction:
        # The split is at the first line start after the exact point (exactly at it when
        # no line starts after it).
        exact = math.ceil(val_fraction * sum(len(d) for d in DOCS))
        longest_line = max(len(line) for d in DOCS for line in d.splitlines(keepends=True))
        assert exact - longest_line < len(val_text) <= exact
        train_text = tok.decode(_strip_eos(got.train, eos))
        at_line_start = train_text.endswith("\n") or got.train[-1] == eos
        assert at_line_start or len(val_text) == exact
    else:
        assert got.val.size == 0


def test_split_one_document_at_a_line():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val, cut_inside = data._split_documents([text], 0.1)
    assert cut_inside and train[0] + val[0] == text
    assert train[0].endswith("\n") and len(val[0]) in range(len(text) // 10 - 7, len(text) // 10)
    # No line break left: an exact cut.
    train, val, cut_inside = data._split_documents(["x" * 100], 0.25)
    assert (train, val, cut_inside) == (["x" * 75], ["x" * 25], True)


def test_prepare_tokens_train_ends_without_eos_when_split_cuts_a_document(tmp_path):
    tok = ByteTokenizer()
    text = "".join(f"line {i}\n" for i in range(100))
    got = prepare_tokens([text], tok, tmp_path, val_fraction=0.1, progress=False)
    eos = tok.token_id("<eos>")
    assert eos not in got.train.tolist()
    assert got.val.tolist().count(eos) == 1 and got.val[-1] == eos
    assert tok.decode(got.train) + tok.decode(got.val[:-1]) == text


def test_prepare_tokens_reuses_files(tmp_path):
    tok = CountingTokenizer(CharTokenizer.from_texts(DOCS))
    first = prepare_tokens(DOCS, tok, tmp_path, progress=False)
    calls = tok.calls
    assert calls > 0
    mtime = (tmp_path / "train.bin").stat().st_mtime_ns
    again = prepare_tokens(DOCS, tok, tmp_path, progress=False)
    assert tok.calls == calls  # nothing tokenized
    assert (tmp_path / "train.bin").stat().st_mtime_ns == mtime
    assert again.meta == first.meta
    np.testing.assert_array_equal(again.train, first.train)
    # Any change of source, fraction or tokenizer re-tokenizes.
    prepare_tokens(DOCS, tok, tmp_path, source_fingerprint="other", progress=False)
    assert tok.calls > calls
    calls = tok.calls
    prepare_tokens(DOCS, tok, tmp_path, source_fingerprint="other", val_fraction=0.2,
                   progress=False)  # fmt: skip
    assert tok.calls > calls
    byte = prepare_tokens(DOCS, ByteTokenizer(), tmp_path, progress=False)
    assert byte.meta["tokenizer_fingerprint"] == ByteTokenizer().fingerprint()
    assert byte.meta["source_fingerprint"] == text_fingerprint(DOCS)


def test_prepare_tokens_truncated_file_is_rebuilt(tmp_path):
    tok = CountingTokenizer(ByteTokenizer())
    prepare_tokens(DOCS, tok, tmp_path, progress=False)
    calls = tok.calls
    (tmp_path / "train.bin").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match=r"train.bin: 2 bytes"):
        load_token_data(tmp_path)
    got = prepare_tokens(DOCS, tok, tmp_path, progress=False)
    assert tok.calls > calls
    assert got.meta["train_tokens"] == got.train.size


def test_prepare_tokens_interrupted_leaves_nothing_valid(tmp_path):
    prepare_tokens(DOCS, ByteTokenizer(), tmp_path, progress=False)

    class Failing(CountingTokenizer):
        def encode_batch(self, texts):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_tokens(DOCS, Failing(CharTokenizer.from_texts(DOCS)), tmp_path, progress=False)
    assert not (tmp_path / "meta.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "val.bin"]
    with pytest.raises(ValueError, match="no meta.json"):
        load_token_data(tmp_path)


class BigVocab:
    """A stand-in tokenizer with a vocabulary too large for uint16."""

    kind = "big"
    vocab_size = 70_000

    def fingerprint(self):
        return "big"

    def token_id(self, name):
        assert name == "<eos>"
        return 69_999

    def encode_batch(self, texts):
        return [[65_536 + len(t), 1] for t in texts]


def test_prepare_tokens_uint32_for_large_vocabularies(tmp_path):
    got = prepare_tokens(["ab", "abc"], BigVocab(), tmp_path, val_fraction=0.0, progress=False)
    assert got.train.dtype == np.uint32 and got.meta["dtype"] == "uint32"
    assert got.train.tolist() == [65_538, 1, 69_999, 65_539, 1, 69_999]
    assert (tmp_path / "train.bin").stat().st_size == 6 * 4
    got.validate(70_000)


def test_validate_names_file_offset_value_vocab(tmp_path):
    got = prepare_tokens(["hello"], ByteTokenizer(), tmp_path, val_fraction=0.0, progress=False)
    got.validate(261)
    with pytest.raises(ValueError) as info:
        got.validate(105)  # "h" = 104 fits, "e" = 101 fits, "l" = 108 does not
    message = str(info.value)
    assert str(tmp_path / "train.bin") in message
    assert "offset 2" in message and "108" in message and "105" in message
    # Chunking does not change the answer.
    with pytest.raises(ValueError, match="offset 2"):
        got.validate(105, chunk=2)


def test_bits_per_byte(tmp_path):
    tok = ByteTokenizer()
    got = prepare_tokens(DOCS, tok, tmp_path, val_fraction=0.5, progress=False)
    # Bytes: one token per byte plus <eos> tokens.
    expected = math.log(256) * got.meta["val_tokens"] / (got.meta["val_bytes"] * math.log(2))
    assert got.bits_per_byte(math.log(256)) == pytest.approx(expected)
    assert data.bytes_per_token(DOCS, tok) == 1.0
    assert data.bytes_per_token(["café"], CharTokenizer.from_texts(["café"])) == 5 / 4


# ----------------------------------------------------------------------------------------
# Batches.


def test_train_batch_shapes_and_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    batch = train_batch(tokens, seed=0, step=0, batch_size=8, context=16)
    assert batch.shape == (8, 17) and batch.dtype == np.int32
    # Each row is a contiguous window of the corpus.
    np.testing.assert_array_equal(batch - batch[:, :1], np.tile(np.arange(17), (8, 1)))
    assert batch.min() >= 0 and batch.max() <= 999


def test_train_batch_is_a_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    kw = dict(batch_size=4, context=8)
    a = train_batch(tokens, seed=1, step=5, **kw)
    for step in range(5):
        train_batch(tokens, seed=1, step=step, **kw)  # earlier calls change nothing
    np.testing.assert_array_equal(train_batch(tokens, seed=1, step=5, **kw), a)
    assert not np.array_equal(train_batch(tokens, seed=1, step=6, **kw), a)
    assert not np.array_equal(train_batch(tokens, seed=2, step=5, **kw), a)


def test_train_batch_uses_every_start():
    tokens = np.arange(10, dtype=np.uint16)
    batch = train_batch(tokens, seed=0, step=0, batch_size=200, context=7)
    assert set(batch[:, 0].tolist()) == {0, 1, 2}  # starts 0 .. len - context - 1


def test_train_batch_shards_concatenate_to_global_batch():
    tokens = np.arange(5000, dtype=np.uint32)
    kw = dict(seed=3, step=11, batch_size=12, context=5)
    full = train_batch(tokens, **kw)
    shards = [train_batch(tokens, shard=(i, 4), **kw) for i in range(4)]
    assert all(s.shape == (3, 6) for s in shards)
    np.testing.assert_array_equal(np.concatenate(shards), full)
    with pytest.raises(ValueError, match="equal shards"):
        train_batch(tokens, shard=(0, 5), **kw)
    with pytest.raises(ValueError, match="shard index"):
        train_batch(tokens, shard=(4, 4), **kw)


def test_train_batch_short_corpus():
    with pytest.raises(ValueError, match=r"has 16 tokens.*context \+ 1 = 17"):
        train_batch(np.arange(16), seed=0, step=0, batch_size=2, context=16)
    train_batch(np.arange(17), seed=0, step=0, batch_size=2, context=16)  # exactly one fits


def test_train_batch_from_token_files(tmp_path):
    got = prepare_tokens(DOCS * 20, ByteTokenizer(), tmp_path, progress=False)
    batch = train_batch(got.train, seed=0, step=0, batch_size=4, context=32)
    assert batch.shape == (4, 33) and type(batch) is np.ndarray


def test_eval_batches_cover_val_in_order():
    tokens = np.arange(100, dtype=np.uint16)
    batches = list(eval_batches(tokens, batch_size=3, context=10))
    # (100 - 1) // 10 = 9 windows -> 3 full batches; window w starts at 10 w.
    assert len(batches) == 3 and all(b.shape == (3, 11) and b.dtype == np.int32 for b in batches)
    rows = np.concatenate(batches)
    np.testing.assert_array_equal(rows[:, 0], np.arange(0, 90, 10))
    np.testing.assert_array_equal(rows[:, 1:].ravel(), np.arange(1, 91))  # each target once
    assert len(list(eval_batches(tokens, batch_size=3, context=10, max_batches=2))) == 2
    halves = [list(eval_batches(tokens, batch_size=4, context=10, shard=(i, 2))) for i in (0, 1)]
    full = list(eval_batches(tokens, batch_size=4, context=10))
    for b, (h0, h1) in enumerate(zip(*halves, strict=True)):
        np.testing.assert_array_equal(np.concatenate([h0, h1]), full[b])


def test_eval_batches_errors_are_eager():
    with pytest.raises(ValueError, match=r"has 10 tokens.*context \+ 1 = 11"):
        eval_batches(np.arange(10), batch_size=1, context=10)
    with pytest.raises(ValueError, match="fewer than one batch of 4"):
        eval_batches(np.arange(35), batch_size=4, context=10)
