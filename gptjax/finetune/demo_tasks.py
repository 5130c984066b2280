"""Built-in demo tasks, one per GPT-1 task kind, made from the built-in corpus.

No download: like `python train.py`, they use Python's own documentation
(`gptjax.data.builtin_corpus`: the pydoc topics and the standard library's
docstrings). Every label is derived mechanically from where a text comes from,
never from a judgement, so each task is honest about what it measures:

    demo-classification   docstring kind. text = the first paragraph of a docstring;
                          label = the kind of definition it documents, read from the
                          `ast` node that holds it: "module", "class" or "function"
                          (methods count as functions). Up to a third of the
                          examples per class; the held-out text has only 30 module
                          docstrings, 14 of them in the validation documents and 16
                          in the test documents, so the default validation split is
                          14 / 52 / 100 and the test split 16 / 52 / 100: the
                          majority-class rate (about 0.6) is the bar to beat.
    demo-entailment       order. premise A, hypothesis B, from a pair of neighbouring
                          sentences of one document: B is the sentence right after A
                          ("follows"), right before A ("precedes": the pair swapped),
                          or a sentence of another document ("unrelated"), a third
                          each. Directional, as entailment is; not logical
                          entailment, a premise/hypothesis task of the same shape.
                          Chance: 1/3.
    demo-similarity       neighbours. A and B are two neighbouring sentences of one
                          document ("same") or a sentence and one of another document
                          ("different"), half each, in a random order: the relation
                          is symmetric, as similarity is. Chance: 1/2.
    demo-multiple-choice  next sentence, as Story Cloze. context = one sentence of a
                          document and the one before it (if any); choices = the
                          sentence that follows and three sentences of other
                          documents, in a random order. Chance: 1/4.

Splits. The held-out documents are those that lie wholly in the last 5% of the
corpus (by characters), which is exactly the text `train.py` holds out for
validation with its default `--val-fraction 0.05`. They are dealt alternately, in
corpus order, to two splits: "validation" (the 1st, 3rd, 5th ... held-out
document), on which a fine-tuning run chooses its best epoch, and "test" (the 2nd,
4th ...), on which a result chosen on validation is reported; no document is in
both. Training examples come only from the other documents, and wrong answers
(negatives, distractors) are drawn from the example's own split. So a model
pre-trained by `python train.py` has never been trained on a validation or test
example's text. The held-out text gives about 290 neighbouring-sentence pairs,
about 145 per split, which caps the sentence tasks' validation and test sizes.
Everything is deterministic: the same examples for the same Python and seed.

Sentences are found by a simple rule (a '.', '!' or '?' followed by white space
and a capital letter), and kept when they have 4 to 30 words and hold no code
(no '>>>', no line of 4-space indented text).
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptjax.finetune.readers import TaskData, TaskSpec
from gptjax.finetune.transforms import Example

VAL_FRACTION = 0.05  # train.py's default --val-fraction
MIN_DOC_CHARS = 40  # the built-in corpus's own cut-off

DEMO_SPECS: dict[str, TaskSpec] = {
    "demo-classification": TaskSpec(
        "demo-classification", "classification", ("module", "class", "function"),
        ("accuracy",), description="what kind of definition a docstring documents"),
    "demo-entailment": TaskSpec(
        "demo-entailment", "entailment", ("follows", "precedes", "unrelated"), ("accuracy",),
        description="is the hypothesis the sentence after the premise, the one before it, "
        "or from another document"),
    "demo-similarity": TaskSpec(
        "demo-similarity", "similarity", ("different", "same"), ("accuracy", "f1"),
        description="are the two sentences neighbours in one document"),
    "demo-multiple-choice": TaskSpec(
        "demo-multiple-choice", "multiple_choice", ("1", "2", "3", "4"), ("accuracy",),
        n_choices=4, description="the true next sentence among four"),
}
KIND_TO_DEMO = {spec.kind: name for name, spec in DEMO_SPECS.items()}
DEFAULT_SIZES = {"train": 1200, "validation": 300, "test": 300}
SPLITS = tuple(DEFAULT_SIZES)

_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages"}
_SKIP_TOP = {"encodings", "pydoc_data"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@dataclass(frozen=True)
class Document:
    text: str
    kind: str  # "topic", "module", "class", "function"
    held_out: bool  # wholly inside train.py's validation text
    split: str  # "train" (not held out), else "validation" or "test", alternately


def _definitions(tree: ast.Module):
    """(kind, docstring) of a module's public definitions, in source order."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            name = getattr(node, "name", "")
            if name.startswith("_") and not name.endswith("__"):
                continue
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                kind = {ast.Module: "module", ast.ClassDef: "class"}.get(type(node), "function")
                yield kind, inspect.cleandoc(doc)
        children = []
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            for child in getattr(node, field, ()):
                if isinstance(child, (ast.ExceptHandler, ast.match_case)):
                    children.extend(child.body)
                else:
                    children.append(child)
        stack.extend(reversed(children))


@functools.lru_cache(maxsize=1)
def _docstring_kinds() -> dict[str, str]:
    """docstring text -> the kind of its first definition, over the standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    kinds: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if _SKIP_PARTS.intersection(parts) or parts[0] in _SKIP_TOP or \
                path.name.startswith("test_"):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue
        for kind, doc in _definitions(tree):
            if len(doc) >= MIN_DOC_CHARS:
                kinds.setdefault(doc, kind)
    return kinds


@functools.lru_cache(maxsize=1)
def documents() -> tuple[Document, ...]:
    """The built-in corpus as Documents: kind from the ast walk, held-out flag and split by
    position (held-out documents alternate between validation and test)."""
    from gptjax.data.corpus import builtin_corpus

    corpus = builtin_corpus()
    kinds = _docstring_kinds()
    total = sum(len(t) for t in corpus)
    cut = total - int(np.ceil(VAL_FRACTION * total))  # train.py's train/val boundary
    out, start, n_held_out = [], 0, 0
    for text in corpus:
        held_out = start >= cut
        split = ("validation", "test")[n_held_out % 2] if held_out else "train"
        n_held_out += held_out
        out.append(Document(text, kinds.get(text, "topic"), held_out, split))
        start += len(text)
    return tuple(out)


def _clean(text: str) -> str:
    return " ".join(text.split())


def sentences(text: str) -> list[str | None]:
    """The prose sentences of a document, in order (see the module docstring), with None
    in place of each run of text left out (a code paragraph, a too short or too long
    sentence), so that neighbours in the list are neighbours in the document."""
    out: list[str | None] = []
    for paragraph in re.split(r"\n\s*\n", text):
        if ">>>" in paragraph or re.search(r"^( {4}|\t)", paragraph, re.M):
            out.append(None)
            continue
        for s in _SENTENCE_END.split(_clean(paragraph)):
            words = s.split()
            keep = 4 <= len(words) <= 30 and s[0].isupper() and s[-1] in ".!?"
            out.append(s if keep else None)
    return out


def _first_paragraph(text: str, max_words: int = 40) -> str:
    words = _clean(re.split(r"\n\s*\n", text.strip())[0]).split()
    return " ".join(words[:max_words])


def _split_docs(split: str) -> list[Document]:
    return [d for d in documents() if d.split == split]


def _classification(split, n, rng) -> list[Example]:
    docs = _split_docs(split)
    labels = DEMO_SPECS["demo-classification"].labels
    by_kind = {k: [d for d in docs if d.kind == k] for k in labels}
    examples = []
    for label, kind in enumerate(labels):
        pool = by_kind[kind]
        for i in rng.permutation(len(pool))[: n // len(labels)]:
            examples.append(Example(_first_paragraph(pool[i].text), label=label,
                                    uid=f"{kind}-{i}"))
    return [examples[i] for i in rng.permutation(len(examples))]


@functools.lru_cache(maxsize=len(SPLITS))
def _sentence_table(split: str):
    """Per document of the split with any kept sentence: its sentence list (None where
    text was left out)."""
    table = [sentences(d.text) for d in _split_docs(split)]
    return [s for s in table if any(x is not None for x in s)]


def _adjacent_pairs(table):
    """(document, i) where sentences i and i + 1 are both kept: true neighbours."""
    return [(d, i) for d, sents in enumerate(table) for i in range(len(sents) - 1)
            if sents[i] is not None and sents[i + 1] is not None]


def _other_sentence(table, doc_index, rng) -> str:
    while True:
        j = int(rng.integers(len(table)))
        if j != doc_index:
            kept = [x for x in table[j] if x is not None]
            return kept[int(rng.integers(len(kept)))]


def _entailment(split, n, rng) -> list[Example]:
    table = _sentence_table(split)
    pairs = _adjacent_pairs(table)
    examples = []
    for k, idx in enumerate(rng.permutation(len(pairs))[:n]):
        d, i = pairs[idx]
        first, second = table[d][i], table[d][i + 1]
        if k % 3 == 0:
            examples.append(Example(first, second, label=0, uid=f"{d}-{i}-follows"))
        elif k % 3 == 1:
            examples.append(Example(second, first, label=1, uid=f"{d}-{i}-precedes"))
        else:
            examples.append(Example(first, _other_sentence(table, d, rng), label=2,
                                    uid=f"{d}-{i}-unrelated"))
    return examples


def _similarity(split, n, rng) -> list[Example]:
    table = _sentence_table(split)
    pairs = _adjacent_pairs(table)
    examples = []
    for k, idx in enumerate(rng.permutation(len(pairs))[:n]):
        d, i = pairs[idx]
        if k % 2 == 0:
            a, b, label, uid = table[d][i], table[d][i + 1], 1, f"{d}-{i}-same"
        else:
            a, b, label, uid = table[d][i], _other_sentence(table, d, rng), 0, f"{d}-{i}-other"
        if rng.integers(2):
            a, b = b, a
        examples.append(Example(a, b, label=label, uid=uid))
    return examples


def _multiple_choice(split, n, rng) -> list[Example]:
    table = _sentence_table(split)
    pairs = _adjacent_pairs(table)
    examples = []
    for idx in rng.permutation(len(pairs))[:n]:
        d, i = pairs[idx]
        before = table[d][i - 1] if i > 0 else None
        context = table[d][i] if before is None else f"{before} {table[d][i]}"
        choices = [table[d][i + 1]] + [_other_sentence(table, d, rng) for _ in range(3)]
        order = rng.permutation(4)
        examples.append(Example(context, choices=tuple(choices[o] for o in order),
                                label=int(np.argmin(order)), uid=f"{d}-{i}"))
    return examples


_BUILDERS = {"demo-classification": _classification, "demo-entailment": _entailment,
             "demo-similarity": _similarity, "demo-multiple-choice": _multiple_choice}


def chance_accuracy(spec: TaskSpec, examples) -> float:
    """Accuracy of the best constant guess: the majority class, or 1/choices."""
    if spec.kind == "multiple_choice":
        return float(np.mean([1.0 / len(e.choices) for e in examples]))
    counts = np.bincount([int(e.label) for e in examples])
    return float(counts.max() / counts.sum())


def demo_name(name_or_kind: str) -> str:
    """'multiple_choice' or 'demo-multiple-choice' -> 'demo-multiple-choice'."""
    name = KIND_TO_DEMO.get(name_or_kind.replace("-", "_"), name_or_kind)
    if name not in DEMO_SPECS:
        raise ValueError(f"unknown demo task {name_or_kind!r}; choose one of "
                         f"{sorted(DEMO_SPECS)} or a kind {sorted(KIND_TO_DEMO)}")
    return name


def demo_task(name_or_kind: str, n_train: int | None = None, n_val: int | None = None,
              seed: int = 0, n_test: int | None = None) -> TaskData:
    """A built-in task's train, validation and test splits (at most n_train / n_val /
    n_test examples, None for the defaults; fewer where the held-out text runs out, and
    classification may give fewer to keep its three classes balanced)."""
    name = demo_name(name_or_kind)
    build = _BUILDERS[name]
    sizes = {"train": n_train, "validation": n_val, "test": n_test}
    splits = {}
    for index, split in enumerate(SPLITS):  # the rng of split i: (seed, i)
        rng = np.random.default_rng([seed, index])
        examples = build(split, sizes[split] or DEFAULT_SIZES[split], rng)
        if not examples:
            raise ValueError(f"{name}: the built-in corpus gave no {split} examples")
        splits[split] = examples
    return TaskData(DEMO_SPECS[name], splits)
