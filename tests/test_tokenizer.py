"""Tokenizers: round trips, special tokens, save/load/fingerprint, parity with transformers."""

import json

import pytest

from gptjax.data.tokenizer import (
    SPECIAL_TOKENS,
    ByteTokenizer,
    CharTokenizer,
    build_tokenizer,
    from_gpt2_files,
    from_openai_gpt_files,
    load_tokenizer,
    train_bpe,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n" * 3,
    "Return the number of items in a container. Raise TypeError if it has none.",
    "Unicode: café, naïve, 東京, emoji 🙂, and a snowman ☃.",
    "def f(x):\n    return x * 2  # doubled\n\n\tTabs and  double  spaces.",
] * 10

SAMPLES = [
    "",
    "Hello world",
    "  leading and trailing spaces  ",
    "line one\nline two\r\nline three\n\n",
    "café 東京 🙂 ☃",
    "The lazy dog returns the container.",
]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def char():
    return CharTokenizer.from_texts(CORPUS + SAMPLES)


def test_bpe_round_trip_and_specials(bpe):
    assert bpe.kind == "bpe"
    assert bpe.vocab_size <= 400
    assert bpe.special_tokens == {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    for s in SAMPLES:
        ids = bpe.encode(s)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == s
    # Merges were learnt: common text takes fewer tokens than bytes.
    assert len(bpe.encode(CORPUS[0])) < len(CORPUS[0].encode()) / 2


def test_bpe_is_deterministic(bpe):
    again = train_bpe(CORPUS, vocab_size=400)
    assert again.fingerprint() == bpe.fingerprint()
    assert again.encode(CORPUS[2]) == bpe.encode(CORPUS[2])
    assert train_bpe(CORPUS, vocab_size=300).fingerprint() != bpe.fingerprint()


def test_bpe_vocab_size_too_small():
    with pytest.raises(ValueError, match="261"):
        train_bpe(CORPUS, vocab_size=260)


def test_encode_batch_matches_encode(bpe, char):
    for tok in (bpe, char, ByteTokenizer()):
        assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]


@pytest.mark.parametrize("kind", ["bpe", "char", "byte"])
def test_special_names_in_text_encode_as_text(kind, bpe, char):
    tok = {"bpe": bpe, "char": char, "byte": ByteTokenizer()}[kind]
    text = "end <eos> of <start>"
    if kind == "char":
        tok = CharTokenizer.from_texts([text])
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text
    # Special ids decode to their names.
    eos = tok.token_id("<eos>")
    assert tok.decode(tok.encode("a") + [eos]) == "a<eos>"


def test_char_tokenizer(char):
    assert char.kind == "char"
    assert char.chars == sorted(char.chars)
    n = len(char.chars)
    assert char.vocab_size == n + 5
    assert char.special_tokens == {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    for s in SAMPLES:
        assert char.decode(char.encode(s)) == s
    assert char.encode("ab") == [char.chars.index("a"), char.chars.index("b")]


def test_char_unknown_character_error():
    tok = CharTokenizer.from_texts(["abc"])
    with pytest.raises(ValueError, match=r"'z'.*position 3"):
        tok.encode("abcz")
    with pytest.raises(ValueError, match="position 0"):
        CharTokenizer.from_texts([]).encode("q")


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.vocab_size == 261
    assert tok.special_tokens == {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([0xC3]) == "\ufffd"  # a cut character decodes, it does not raise
    with pytest.raises(ValueError, match="261"):
        tok.decode([261])


@pytest.mark.parametrize("kind", ["bpe", "char", "byte"])
def test_save_load_fingerprint(kind, tmp_path):
    tok = build_tokenizer(kind, CORPUS + SAMPLES, vocab_size=300 if kind == "bpe" else None)
    folder = tok.save(tmp_path / "tok")
    loaded = load_tokenizer(folder)
    assert loaded.kind == kind
    assert type(loaded) is type(tok)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.fingerprint() == tok.fingerprint()
    assert len(tok.fingerprint()) == 64
    for s in SAMPLES[1:]:
        assert loaded.encode(s) == tok.encode(s)
    # Saving again writes the same bytes.
    again = loaded.save(tmp_path / "again")
    for f in folder.iterdir():
        assert (again / f.name).read_bytes() == f.read_bytes()


def test_fingerprints_tell_tokenizers_apart(bpe, char):
    prints = {bpe.fingerprint(), char.fingerprint(), ByteTokenizer().fingerprint()}
    prints.add(CharTokenizer.from_texts(["xyz"]).fingerprint())
    assert len(prints) == 4


def test_bare_tokenizer_json_has_same_fingerprint(bpe, tmp_path):
    bpe.save(tmp_path)
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.kind == "hf"  # the label lives in our own file, which was not read
    assert loaded.fingerprint() == bpe.fingerprint()


def test_build_tokenizer_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer("bpe", CORPUS)
    with pytest.raises(ValueError, match="fixed"):
        build_tokenizer("char", CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        build_tokenizer("wordpiece", CORPUS)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="merges.txt"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------
# GPT-2 and GPT-1 vocabularies, checked against transformers on tiny files.


def _gpt2_byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (its `bytes_to_unicode` table):
    printable Latin-1 bytes stand for themselves, the rest map to 256, 257, ..."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


GPT2_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o w", "Ġ l", "Ġl ow", "Ġlow er"]


@pytest.fixture
def gpt2_dir(tmp_path):
    vocab = {s: i for i, s in enumerate(_gpt2_byte_symbols())}
    for m in GPT2_MERGES:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "\n".join(GPT2_MERGES) + "\n"
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    return folder


PARITY_TEXTS = [
    "the lower tower in the town",
    "The Lower  THE\nlow\tlower!",
    "Café naïve, 東京 — l'hiver? 42 + 7",
    "  spaces   everywhere  ",
]


def test_gpt2_files_match_transformers(gpt2_dir):
    from transformers import GPT2Tokenizer

    reference = GPT2Tokenizer.from_pretrained(str(gpt2_dir))
    tok = from_gpt2_files(gpt2_dir / "vocab.json", gpt2_dir / "merges.txt")
    assert tok.kind == "gpt2"
    for text in PARITY_TEXTS:
        ids = tok.encode(text)
        assert ids == reference(text)["input_ids"]
        assert tok.decode(ids) == reference.decode(ids) == text
    # <eos> is GPT-2's own end-of-text token; the other four are appended after it.
    eot = 256 + len(GPT2_MERGES)
    assert tok.token_id("<eos>") == eot
    others = [n for n in SPECIAL_TOKENS if n != "<eos>"]
    assert [tok.token_id(n) for n in others] == [eot + 1 + i for i in range(4)]
    assert tok.vocab_size == eot + 5


def test_gpt2_add_special_tokens_later(gpt2_dir):
    plain = from_gpt2_files(
        gpt2_dir / "vocab.json", gpt2_dir / "merges.txt", add_missing_specials=False
    )
    n = plain.vocab_size
    assert set(plain.special_tokens) == {"<eos>"}
    with pytest.raises(ValueError, match="<start>"):
        plain.token_id("<start>")
    grown = plain.add_special_tokens(["<start>", "<delim>", "<extract>", "<eos>"])
    assert grown.vocab_size == n + 3
    assert [grown.token_id(t) for t in ("<start>", "<delim>", "<extract>")] == [n, n + 1, n + 2]
    assert grown.token_id("<eos>") == plain.token_id("<eos>")
    assert grown.encode(PARITY_TEXTS[0]) == plain.encode(PARITY_TEXTS[0])
    assert plain.vocab_size == n  # the original is unchanged
    assert grown.add_special_tokens(["<start>"]) is grown
    with pytest.raises(ValueError, match="unknown special tokens"):
        grown.add_special_tokens(["<mask>"])


def test_load_gpt2_folder_and_round_trip(gpt2_dir, tmp_path):
    tok = load_tokenizer(gpt2_dir)
    assert tok.kind == "gpt2"
    saved = load_tokenizer(tok.save(tmp_path / "saved"))
    assert saved.kind == "gpt2"
    assert saved.fingerprint() == tok.fingerprint()
    assert saved.special_tokens == tok.special_tokens


def _openai_gpt_files(folder):
    """A tiny GPT-1-style vocabulary: symbols with and without "</w>", a few merges."""
    symbols = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = ["t h", "th e</w>", "h e</w>", "l o", "lo w</w>", "e r</w>", "i n", "in g</w>"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<unk>"] = len(vocab)
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab


def test_openai_gpt_files_match_transformers(tmp_path):
    from transformers import OpenAIGPTTokenizer

    folder = tmp_path / "openai-gpt"
    vocab = _openai_gpt_files(folder)
    reference = OpenAIGPTTokenizer.from_pretrained(str(folder))
    tok = from_openai_gpt_files(folder / "vocab.json", folder / "merges.txt")
    assert tok.kind == "openai-gpt"
    texts = PARITY_TEXTS + ["The LOWER, the low-going thing; Thé singer!"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == reference(text)["input_ids"], text
        assert tok.decode(ids) == reference.decode(ids)
    assert tok.decode(tok.encode("The lower, the going")) == "the lower , the going"
    # No special token in GPT-1's vocabulary: all five are appended.
    assert [tok.token_id(n) for n in SPECIAL_TOKENS] == [len(vocab) + i for i in range(5)]
    assert load_tokenizer(folder).kind == "openai-gpt"
