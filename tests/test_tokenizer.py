"""Tokenizers: round trips, special tokens, save/load/fingerprint, parity with transformers."""

import json
import subprocess
import sys

import pytest

from gptjax.data.tokenizer import (
    BERT_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
    ByteTokenizer,
    CharTokenizer,
    build_tokenizer,
    from_bert_vocab,
    from_gpt2_files,
    from_openai_gpt_files,
    load_tokenizer,
    train_bpe,
    train_wordpiece,
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


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "char", "byte"])
def test_save_load_fingerprint(kind, tmp_path):
    vocab_size = 300 if kind in ("bpe", "wordpiece") else None
    tok = build_tokenizer(kind, CORPUS + SAMPLES, vocab_size=vocab_size)
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
    with pytest.raises(ValueError, match="'wordpiece' tokenizer needs vocab_size"):
        build_tokenizer("wordpiece", CORPUS)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        build_tokenizer("sentencepiece", CORPUS)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="merges.txt, or vocab.txt"):
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


# ----------------------------------------------------------------------------------------
# WordPiece (BERT): a vocab.txt checked against transformers, training, files.

# BERT's layout: [PAD] first, [unused*] slots, then the other specials, then the tokens, so
# that the special ids are not simply 0..4.
BERT_VOCAB = [
    "[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    *".,!?'()-;:", *"abcdefghijklmnopqrstuvwxyz", *"0123456789", "東", "京",
    *("##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"),
    "the", "quick", "brown", "fox", "jump", "##ed", "##ing", "over", "lazy", "dog",
    "cafe", "naive", "resume", "return", "##er", "##est", "low", "un", "##able", "hello",
    "world", "yes", "no", "Hello", "The", "Café", "Ü", "##ber",
]  # fmt: skip

BERT_TEXTS = [
    "The quick brown fox jumped over the lazy dog.",
    "Café, naïve résumé; ÜBER-cool (yes)!",  # accents stripped when lower-casing
    "Hello World? THE LOWEST unable returns",  # casing
    "zebra xylophone qwerty",  # out-of-vocabulary words split into pieces
    "emoji 🙂 and ☃ snowman, 東京 tower",  # symbols not in the vocabulary: [UNK]
    "a\u200bb\tc\x00d  e\u00a0f",  # control, zero-width and odd spaces
    "x" * 101 + " short",  # a word over 100 characters is one [UNK]
    "",
]


@pytest.fixture
def bert_dir(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    return folder


@pytest.mark.parametrize("lowercase", [True, False])
def test_bert_vocab_matches_transformers(bert_dir, lowercase):
    from transformers import BertTokenizerFast

    # transformers 5 ignores BertTokenizerFast(vocab_file=...); from_pretrained reads a
    # folder's vocab.txt as it reads a released checkpoint's.
    reference = BertTokenizerFast.from_pretrained(str(bert_dir), do_lower_case=lowercase)
    assert len(reference) == len(BERT_VOCAB)
    tok = from_bert_vocab(bert_dir / "vocab.txt", lowercase=lowercase)
    assert tok.kind == "wordpiece"
    unk = BERT_VOCAB.index("[UNK]")
    for text in BERT_TEXTS:
        ids = tok.encode(text)
        assert ids == reference(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids) == reference.decode(ids)
    # The texts exercise what they claim to: pieces, unknowns, the special id positions.
    assert unk in tok.encode(BERT_TEXTS[4]) and tok.encode(BERT_TEXTS[6])[0] == unk
    assert any(BERT_VOCAB[i].startswith("##") for i in tok.encode(BERT_TEXTS[3]))
    if lowercase:
        assert tok.encode("Café") == tok.encode("cafe") == [BERT_VOCAB.index("cafe")]
    else:
        assert tok.encode("Café") == [BERT_VOCAB.index("Café")]
    assert tok.vocab_size == len(BERT_VOCAB)  # nothing appended
    assert {n: tok.token_id(n) for n in BERT_SPECIAL_TOKENS} == {
        n: BERT_VOCAB.index(n) for n in BERT_SPECIAL_TOKENS
    }
    assert tok.token_id("<eos>") == tok.token_id("[SEP]")
    assert tok.token_id("<pad>") == tok.token_id("[PAD]")
    # Text spelling a special token stays text (transformers would give [MASK]'s id); "["
    # is not in this vocabulary, so it is [UNK], the one special id text can give.
    ids = tok.encode("a [MASK] b [SEP] [CLS] [PAD]")
    assert not set(ids) & {tok.token_id(n) for n in BERT_SPECIAL_TOKENS if n != "[UNK]"}
    assert unk in ids


def test_load_bert_folder_and_file(bert_dir, tmp_path):
    tok = load_tokenizer(bert_dir)  # add_missing_specials is on, yet nothing is appended
    assert tok.kind == "wordpiece" and tok.vocab_size == len(BERT_VOCAB)
    assert load_tokenizer(bert_dir / "vocab.txt").fingerprint() == tok.fingerprint()
    assert tok.encode("The Café") == tok.encode("the cafe")
    # transformers' tokenizer_config.json beside it sets the options.
    (bert_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    cased = load_tokenizer(bert_dir)
    assert cased.encode("The Café") == [BERT_VOCAB.index("The"), BERT_VOCAB.index("Café")]
    # GPT-1's task tokens are appended only when asked for.
    grown = tok.add_special_tokens(["<start>", "<delim>", "<extract>"])
    assert [grown.token_id(n) for n in ("<start>", "<delim>", "<extract>")] == [
        len(BERT_VOCAB) + i for i in range(3)
    ]
    # A saved copy loads back as itself.
    saved = load_tokenizer(cased.save(tmp_path / "saved"))
    assert saved.kind == "wordpiece" and saved.fingerprint() == cased.fingerprint()
    assert saved.special_tokens == cased.special_tokens


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty vocab.txt"),
        (b"\xff\xfe[PAD]\n", "not a UTF-8"),
        (b"[PAD]\n[UNK]\n\n[CLS]\n", "line 3: empty token"),
        (b"[PAD]\n[UNK]\nthe\n[CLS]\nthe\n", "line 5: token 'the' repeats line 3"),
        (b"[PAD]\n[UNK]\n[CLS]\nthe\n", r"lacks the special tokens \['\[SEP\]'"),
    ],
)
def test_bad_bert_vocab_files(tmp_path, content, match):
    path = tmp_path / "vocab.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as error:
        from_bert_vocab(path)
    assert str(path) in str(error.value)
    with pytest.raises(ValueError, match=match):
        load_tokenizer(tmp_path)


def test_bad_bert_folder_config(bert_dir):
    config = bert_dir / "tokenizer_config.json"
    config.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: unreadable"):
        load_tokenizer(bert_dir)
    config.write_text(json.dumps({"do_lower_case": "yes"}))
    with pytest.raises(ValueError, match="do_lower_case is 'yes'; expected true or false"):
        load_tokenizer(bert_dir)
    with pytest.raises(ValueError, match="no vocab.txt at"):
        from_bert_vocab(bert_dir / "missing.txt")


@pytest.fixture(scope="module")
def wordpiece():
    return train_wordpiece(CORPUS, vocab_size=300)


def test_train_wordpiece(wordpiece):
    tok = wordpiece
    assert tok.kind == "wordpiece" and tok.vocab_size <= 300
    vocab = tok.backend.get_vocab()
    assert [vocab[n] for n in BERT_SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert {n: i for n, i in tok.special_tokens.items() if n.startswith("[")} == {
        n: i for i, n in enumerate(BERT_SPECIAL_TOKENS)
    }
    assert tok.token_id("<eos>") == 3 and tok.token_id("<pad>") == 0
    # BERT's pipeline: lower-cased, accents stripped, punctuation split off, "##" pieces.
    ids = tok.encode("The LAZY dog, naïve café.")
    assert tok.decode(ids) == "the lazy dog, naive cafe."
    assert 1 not in ids  # no [UNK]: every character was seen
    assert any(t.startswith("##") for t in vocab)
    assert tok.encode("lazy") == [vocab["lazy"]]  # a word learnt whole
    pieces = tok.encode("quickest")  # unseen word, built from pieces
    assert len(pieces) > 1 and tok.decode(pieces) == "quickest"
    assert tok.encode("§") == [1]  # a character never seen: [UNK]
    cased = train_wordpiece(CORPUS, vocab_size=300, lowercase=False)
    assert cased.decode(cased.encode("Raise TypeError, naïve")) == "Raise TypeError, naïve"


def test_train_wordpiece_is_deterministic_across_processes(wordpiece):
    # tokenizers' trainer orders its "##" symbols by a per-process hash seed; a resumed run
    # rebuilds the tokenizer in a new process and checks its fingerprint.
    assert train_wordpiece(CORPUS, vocab_size=300).fingerprint() == wordpiece.fingerprint()
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from test_tokenizer import CORPUS; "
        "from gptjax.data.tokenizer import train_wordpiece; "
        "print(train_wordpiece(CORPUS, vocab_size=300).fingerprint())"
    )
    here = str(__import__("pathlib").Path(__file__).parent)
    for _ in range(3):
        out = subprocess.run(
            [sys.executable, "-c", code, here], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == wordpiece.fingerprint()


def test_train_wordpiece_errors():
    with pytest.raises(ValueError, match=r"vocab_size >= \d+ for these texts .*got 20"):
        train_wordpiece(CORPUS, vocab_size=20)
    with pytest.raises(ValueError, match="no characters"):
        train_wordpiece(["  ", "\n"], vocab_size=100)


def test_saved_wordpiece_loads_in_transformers(wordpiece, tmp_path):
    from transformers import PreTrainedTokenizerFast

    wordpiece.save(tmp_path)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    text = "The lazy dog returns."
    ids = wordpiece.encode(text)
    assert reference(text, add_special_tokens=False)["input_ids"] == ids
    # The saved post-processor is BERT's template: [CLS] A [SEP] B [SEP], segments 0 and 1.
    pair = reference(text, "A dog.", return_token_type_ids=True)
    b = wordpiece.encode("A dog.")
    assert pair["input_ids"] == [2, *ids, 3, *b, 3]
    assert pair["token_type_ids"] == [0] * (len(ids) + 2) + [1] * (len(b) + 1)


def test_bpe_can_take_bert_special_tokens(bpe):
    grown = bpe.add_special_tokens(BERT_SPECIAL_TOKENS)
    n = bpe.vocab_size
    assert [grown.token_id(t) for t in BERT_SPECIAL_TOKENS] == [n + i for i in range(5)]
    assert grown.token_id("<pad>") == bpe.token_id("<pad>")  # its own, not an alias
    assert grown.token_id("<eos>") == bpe.token_id("<eos>")
    with pytest.raises(ValueError, match="unknown special tokens"):
        ByteTokenizer().add_special_tokens(["[MASK]"])


def test_bert_names_count_only_as_registered_special_tokens(tmp_path):
    import tokenizers
    from tokenizers import models

    # An ordinary vocabulary entry spelled "[SEP]" is text, not BERT's separator.
    backend = tokenizers.Tokenizer(
        models.WordLevel({"[SEP]": 0, "a": 1, "[UNK]": 2}, unk_token="[UNK]")
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json", add_missing_specials=False)
    assert tok.special_tokens == {}
