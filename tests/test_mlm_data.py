"""BERT's pre-training batches: pairs, NSP labels, masking proportions, determinism, errors."""

import numpy as np
import pytest

from gptjax.data.mlm import IGNORE_INDEX, BertVocab, Documents, mlm_eval_batches, mlm_train_batch

PAD, UNK, CLS, SEP, MASK = range(5)
FIRST = 5  # the first ordinary id
VOCAB = BertVocab(vocab_size=300_000, pad=PAD, cls=CLS, sep=SEP, mask=MASK, special=(UNK,))


def position_stream(n, eos_every=None, seed=0):
    """Token `FIRST + p` at every position p, so a token tells where it was read; with
    `eos_every`, [SEP] (the separator) at random gaps of 1..2*eos_every positions."""
    tokens = FIRST + np.arange(n, dtype=np.int64)
    if eos_every:
        rng = np.random.default_rng(seed)
        cuts = np.cumsum(rng.integers(1, 2 * eos_every, size=n // eos_every + 1))
        tokens[cuts[cuts < n]] = SEP
    return tokens.astype(np.uint32)


def originals(batch):
    """The unmasked ids: the label at targets, the input elsewhere."""
    return np.where(batch["mlm_labels"] != IGNORE_INDEX, batch["mlm_labels"], batch["tokens"])


def segments(batch, row):
    """(A, B) original ids of a row, read off its [SEP]s and token types."""
    ids = originals(batch)[row]
    types, real = batch["token_types"][row], batch["attention_mask"][row].astype(bool)
    assert ids[0] == CLS
    a_end = int(np.argmax(types)) - 1 if types.any() else None
    assert a_end is not None and ids[a_end] == SEP, "A ends with [SEP] where B's segment starts"
    last = int(real.sum()) - 1
    assert ids[last] == SEP and types[a_end + 1 : last + 1].all()
    return ids[1:a_end], ids[a_end + 1 : last]


@pytest.fixture(scope="module")
def docs():
    return Documents.from_stream(position_stream(200_000, eos_every=300), eos_id=SEP)


def test_documents_from_stream():
    stream = np.array([7, 8, SEP, SEP, 9, SEP, 10, 11, 12], dtype=np.uint16)
    docs = Documents.from_stream(stream, eos_id=SEP, chunk=4)  # chunk edges mid-document
    assert docs.starts.tolist() == [0, 4, 6] and docs.lengths.tolist() == [2, 1, 3]
    assert docs.num_tokens == 6
    whole = Documents.from_stream(stream, eos_id=None)
    assert whole.starts.tolist() == [0] and whole.lengths.tolist() == [9]


def test_layout(docs):
    context = 64
    batch = mlm_train_batch(docs, VOCAB, seed=0, step=0, batch_size=64, context=context)
    assert set(batch) == {"tokens", "token_types", "attention_mask", "mlm_labels", "nsp_labels"}
    for name, array in batch.items():
        assert array.dtype == np.int32, name
        assert array.shape == ((64,) if name == "nsp_labels" else (64, context)), name
    real = batch["attention_mask"].astype(bool)
    # Real tokens first, then [PAD] (segment 0, never a target).
    assert (np.diff(batch["attention_mask"], axis=1) <= 0).all()
    assert (batch["tokens"][~real] == PAD).all() and (batch["token_types"][~real] == 0).all()
    assert (batch["mlm_labels"][~real] == IGNORE_INDEX).all()
    # [CLS], [SEP] and [PAD] are never targets; targets hold text ids.
    structural = np.isin(batch["tokens"], [CLS, SEP, PAD])
    assert (batch["mlm_labels"][structural] == IGNORE_INDEX).all()
    assert (batch["tokens"][:, 0] == CLS).all()
    labels = batch["mlm_labels"][batch["mlm_labels"] != IGNORE_INDEX]
    assert (labels >= FIRST).all()
    assert set(np.unique(batch["nsp_labels"])) <= {0, 1}
    for row in range(64):
        a, b = segments(batch, row)
        assert len(a) >= 1 and len(b) >= 1
        assert len(a) + len(b) + 3 == real[row].sum() <= context
        assert not np.isin(np.concatenate([a, b]), [PAD, CLS, SEP, MASK]).any()


def test_pairs_are_contiguous_or_from_another_document(docs):
    stream = docs.tokens
    document = np.cumsum(stream == SEP)  # a document number per stream position
    batch = mlm_train_batch(docs, VOCAB, seed=3, step=7, batch_size=256, context=48)
    counts = {0: 0, 1: 0}
    for row in range(256):
        a, b = segments(batch, row)
        pa, pb = a.astype(np.int64) - FIRST, b.astype(np.int64) - FIRST  # stream positions
        for p in (pa, pb):  # each segment is one contiguous read inside one document
            assert (np.diff(p) == 1).all() and document[p[0]] == document[p[-1]]
        label = batch["nsp_labels"][row]
        counts[int(label)] += 1
        if label == 0:  # IsNext: B starts right after A, in the same document
            assert pb[0] == pa[-1] + 1 and document[pa[0]] == document[pb[-1]]
        else:
            assert document[pb[0]] != document[pa[0]]
    assert min(counts.values()) > 64  # both kinds occur


def test_single_document_stream_keeps_notnext_away_from_its_pair():
    docs = Documents.from_stream(position_stream(400), eos_id=None)
    context = 40
    for step in range(20):
        batch = mlm_train_batch(docs, VOCAB, seed=1, step=step, batch_size=32, context=context)
        for row in np.flatnonzero(batch["nsp_labels"] == 1):
            a, b = segments(batch, row)
            pa, pb = a.astype(np.int64) - FIRST, b.astype(np.int64) - FIRST
            true_next = range(pa[-1] + 1, pa[-1] + 1 + len(pb))
            assert not set(pb) & (set(pa) | set(true_next))
            assert (np.diff(pb) == 1).all()


def test_masking_proportions(docs):
    """15% of text tokens are targets; of those 80% [MASK], 10% random, 10% unchanged."""
    targets = candidates = masked = randomised = kept = 0
    random_ids = []
    for step in range(4):
        batch = mlm_train_batch(docs, VOCAB, seed=5, step=step, batch_size=256, context=128)
        real = batch["attention_mask"].astype(bool)
        text = real & ~np.isin(batch["tokens"], [CLS, SEP])  # [MASK] only replaces text
        is_target = batch["mlm_labels"] != IGNORE_INDEX
        assert (is_target.sum(axis=1) >= 1).all()
        targets += is_target.sum()
        candidates += text.sum()
        inputs, labels = batch["tokens"][is_target], batch["mlm_labels"][is_target]
        masked += (inputs == MASK).sum()
        kept += (inputs == labels).sum()
        changed = (inputs != MASK) & (inputs != labels)
        randomised += changed.sum()
        random_ids.append(inputs[changed])
    # The target count per row is round(0.15 * n): only rounding moves the fraction.
    assert abs(targets / candidates - 0.15) < 0.003, targets / candidates
    assert targets > 15_000
    for observed, p in ((masked, 0.8), (randomised, 0.1), (kept, 0.1)):
        sd = np.sqrt(p * (1 - p) / targets)
        assert abs(observed / targets - p) < 5 * sd, (observed / targets, p)
    random_ids = np.concatenate(random_ids)
    assert not np.isin(random_ids, VOCAB.special).any()
    # Drawn over the whole vocabulary, not from the batch.
    assert random_ids.min() < 30_000 and random_ids.max() > 270_000


def test_random_replacements_cover_the_ordinary_ids():
    # Specials scattered through a small vocabulary: a random replacement is never one of
    # them, and every other id turns up.
    vocab = BertVocab(vocab_size=40, pad=7, cls=0, sep=39, mask=20, special=(1, 21, 22, 30))
    stream = np.tile(np.array([2, 3, 4, 5, 6, 8], np.uint16), 500)
    docs = Documents.from_stream(stream, eos_id=None)
    seen = set()
    for step in range(10):
        batch = mlm_train_batch(docs, vocab, seed=0, step=step, batch_size=64, context=32)
        target = batch["mlm_labels"] != IGNORE_INDEX
        inputs, labels = batch["tokens"][target], batch["mlm_labels"][target]
        seen.update(inputs[(inputs != vocab.mask) & (inputs != labels)].tolist())
    ordinary = set(range(40)) - set(vocab.special)
    assert vocab.num_ordinary == len(ordinary) == 32
    assert seen == ordinary


def test_nsp_split_and_short_sequences(docs):
    context, rows = 64, 4096
    batch = mlm_train_batch(docs, VOCAB, seed=11, step=0, batch_size=rows, context=context)
    not_next = batch["nsp_labels"].mean()
    assert abs(not_next - 0.5) < 5 * np.sqrt(0.25 / rows), not_next
    # Long documents, so only the 10% short draws (or a short NotNext document) leave padding.
    short = (batch["attention_mask"].sum(axis=1) < context).mean()
    assert 0.07 < short < 0.16, short
    long_docs = Documents.from_stream(position_stream(100_000, eos_every=5_000), eos_id=SEP)
    full = mlm_train_batch(
        long_docs, VOCAB, seed=11, step=0, batch_size=256, context=context, short_seq_prob=0.0
    )
    assert full["attention_mask"].all()  # without short draws, pairs fill the row


def test_batches_depend_only_on_seed_and_step(docs):
    kwargs = dict(batch_size=16, context=32)
    first = mlm_train_batch(docs, VOCAB, seed=2, step=9, **kwargs)
    mlm_train_batch(docs, VOCAB, seed=2, step=3, **kwargs)  # calls in between change nothing
    fresh = Documents.from_stream(np.array(docs.tokens), eos_id=SEP)
    again = mlm_train_batch(fresh, VOCAB, seed=2, step=9, **kwargs)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    for other in (dict(seed=2, step=10), dict(seed=3, step=9)):
        changed = mlm_train_batch(docs, VOCAB, **other, **kwargs)
        assert not np.array_equal(first["tokens"], changed["tokens"])
        assert not np.array_equal(first["mlm_labels"], changed["mlm_labels"])


def test_shards_are_rows_of_the_global_batch(docs):
    kwargs = dict(seed=4, step=2, batch_size=12, context=40)
    whole = mlm_train_batch(docs, VOCAB, **kwargs)
    parts = [mlm_train_batch(docs, VOCAB, **kwargs, shard=(i, 3)) for i in range(3)]
    for name in whole:
        np.testing.assert_array_equal(whole[name], np.concatenate([p[name] for p in parts]))
    with pytest.raises(ValueError, match="does not split into 5"):
        mlm_train_batch(docs, VOCAB, **kwargs, shard=(0, 5))


def test_eval_batches_are_fixed(docs):
    kwargs = dict(batch_size=8, context=32, num_batches=3)
    first, again = (
        list(mlm_eval_batches(docs, VOCAB, **kwargs)),
        list(mlm_eval_batches(docs, VOCAB, **kwargs)),
    )
    assert len(first) == 3
    for x, y in zip(first, again, strict=True):
        for name in x:
            np.testing.assert_array_equal(x[name], y[name])
    assert not np.array_equal(first[0]["tokens"], first[1]["tokens"])
    train = mlm_train_batch(docs, VOCAB, seed=0, step=0, batch_size=8, context=32)
    assert not np.array_equal(first[0]["tokens"], train["tokens"])
    # By default, as many batches as the stream's tokens fill once.
    small = Documents.from_stream(position_stream(2_000, eos_every=100), eos_id=SEP)
    expected = small.num_tokens // (8 * 29)
    assert len(list(mlm_eval_batches(small, VOCAB, batch_size=8, context=32))) == expected


def test_from_tokenized_corpus(tmp_path):
    """End to end on real text: a WordPiece tokenizer, corpus token files, a batch."""
    from gptjax.data.corpus import prepare_tokens
    from gptjax.data.tokenizer import train_wordpiece

    texts = [
        f"Document {i}: the quick brown fox jumps over the lazy dog. " * (i % 4 + 2)
        for i in range(40)
    ]
    tok = train_wordpiece(texts, vocab_size=200)
    data = prepare_tokens(texts, tok, tmp_path, val_fraction=0.1, progress=False)
    assert data.meta["eos_id"] == tok.token_id("[SEP]")  # BERT's separator ends documents
    vocab = BertVocab.from_tokenizer(tok)
    assert (vocab.pad, vocab.cls, vocab.sep, vocab.mask) == (0, 2, 3, 4)
    assert vocab.special == (0, 1, 2, 3, 4)
    docs = Documents.from_stream(data.train, eos_id=data.meta["eos_id"])
    assert len(docs.lengths) > 30
    batch = mlm_train_batch(docs, vocab, seed=0, step=0, batch_size=4, context=32)
    text = tok.decode(originals(batch)[0][batch["attention_mask"][0].astype(bool)])
    assert text.startswith("[CLS] ") and text.endswith(" [SEP]") and text.count("[SEP]") == 2
    val = Documents.from_stream(data.val, eos_id=data.meta["eos_id"])
    assert len(list(mlm_eval_batches(val, vocab, batch_size=2, context=16, num_batches=2))) == 2


def test_bert_vocab_errors():
    from gptjax.data.tokenizer import ByteTokenizer

    with pytest.raises(ValueError, match=r"lacks BERT's special tokens \['\[PAD\]'"):
        BertVocab.from_tokenizer(ByteTokenizer())
    with pytest.raises(ValueError, match=r"mask = 10 is outside \[0, 10\)"):
        BertVocab(vocab_size=10, pad=0, cls=1, sep=2, mask=10)
    with pytest.raises(ValueError, match="share ids"):
        BertVocab(vocab_size=10, pad=0, cls=1, sep=1, mask=3)
    with pytest.raises(ValueError, match="nothing to draw"):
        BertVocab(vocab_size=4, pad=0, cls=1, sep=2, mask=3)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(context=4), "context 4 is too small for a sentence pair"),
        (dict(mask_rate=0.0), r"mask_rate must be in \(0, 1\), got 0.0"),
        (dict(mask_rate=1.0), r"mask_rate must be in \(0, 1\)"),
        (dict(mask_rate=-0.2), r"mask_rate must be in \(0, 1\)"),
        (dict(mask_token_fraction=1.2), r"mask_token_fraction must be in \[0, 1\]"),
        (dict(mask_token_fraction=0.8, random_token_fraction=0.3), "is over 1"),
        (dict(short_seq_prob=-1), "short_seq_prob"),
        (dict(step=-1), "step must be a non-negative integer"),
        (dict(batch_size=2.5), "batch_size must be a non-negative integer"),
        (dict(shard=(3, 2)), r"shard index 3 is not in \[0, 2\)"),
    ],
)
def test_bad_arguments(docs, overrides, match):
    kwargs = dict(seed=0, step=0, batch_size=4, context=16) | overrides
    with pytest.raises(ValueError, match=match):
        mlm_train_batch(docs, VOCAB, **kwargs)


def test_streams_too_short():
    kwargs = dict(seed=0, step=0, batch_size=2, context=16)
    singles = Documents.from_stream(np.array([7, SEP, 8, SEP, 9], np.uint16), eos_id=SEP)
    with pytest.raises(ValueError, match="no document has 2 tokens"):
        mlm_train_batch(singles, VOCAB, **kwargs)
    with pytest.raises(ValueError, match="no document has 2 tokens"):
        mlm_train_batch(Documents.from_stream(np.zeros(0, np.uint16), SEP), VOCAB, **kwargs)
    one = Documents.from_stream(position_stream(38), eos_id=None)  # needs 3 * 13 = 39
    with pytest.raises(ValueError, match=r"needs at least 3 \* \(context - 3\) = 39 tokens"):
        mlm_train_batch(one, VOCAB, **kwargs)
    mlm_train_batch(Documents.from_stream(position_stream(39)), VOCAB, **kwargs)
    with pytest.raises(ValueError, match="mlm_eval_batches: no document"):
        mlm_eval_batches(singles, VOCAB, batch_size=2, context=16)  # raised before iterating
    with pytest.raises(ValueError, match="must be 1-D"):
        Documents.from_stream(np.zeros((2, 3), np.uint16), SEP)
