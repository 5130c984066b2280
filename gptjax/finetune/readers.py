"""Readers for fine-tuning data: GLUE, SNLI, SciTail, Story Cloze, ROCStories, RACE,
generic CSV/JSONL, and Hugging Face `datasets` names.

Every reader returns `tasks.Example`s (text_a, text_b, choices, label index or
score, uid) for one `TaskSpec`: the task kind, the label spellings in index
order (as the files write them, which is also how predictions are written),
and the metrics. Formats, exactly as distributed upstream:

    GLUE (tab-separated, no quoting; `load_task(name, folder)` reads train.tsv,
    dev.tsv, test.tsv from the task's folder as split train / validation / test)
      CoLA   no header, 4 columns: source, label (0/1), original label, sentence;
             test.tsv has a header: index, sentence
      SST-2  sentence, label (0/1);                      test: index, sentence
      MRPC   Quality, #1 ID, #2 ID, #1 String, #2 String; test: index, #1 ID, ...
      STS-B  index genre filename year old_index source1 source2 sentence1
             sentence2 score (a float in [0, 5]);        test: without score
      QQP    id qid1 qid2 question1 question2 is_duplicate; test: id question1 question2
      MNLI   index promptID pairID genre sentence1_binary_parse ... sentence1
             sentence2 label1 [label2..label5] gold_label (entailment, neutral,
             contradiction); files dev_matched.tsv, dev_mismatched.tsv,
             test_matched.tsv, test_mismatched.tsv (splits validation_matched, ...)
      QNLI   index question sentence label (entailment / not_entailment)
      RTE    index sentence1 sentence2 label (entailment / not_entailment)
      WNLI   index sentence1 sentence2 label (0/1)
    SNLI     snli_1.0_{train,dev,test}.jsonl: gold_label, sentence1, sentence2,
             pairID; rows whose gold_label is "-" (no annotator majority) are
             dropped, and counted. The .txt distribution (tab-separated with a
             header holding the same names) reads too.
    SciTail  tsv_format/scitail_1.0_{train,dev,test}.tsv: no header; premise,
             hypothesis, label (entails / neutral); or snli_format/*.txt (JSON
             lines with gold_label entailment / neutral, sentence1, sentence2)
    Story Cloze  CSV: InputStoryid, InputSentence1..4, RandomFifthSentenceQuiz1,
             RandomFifthSentenceQuiz2, AnswerRightEnding (1 or 2). Context = the
             four sentences; choices = the two endings.
    ROCStories  CSV: storyid, storytitle, sentence1..sentence5. No wrong
             endings exist, so each story gets one: the fifth sentence of another
             story (chosen deterministically), at a deterministic position.
    RACE     one JSON object per file (RACE/{train,dev,test}/{high,middle}/*.txt):
             article, questions, options (4 per question), answers (A-D), id.
             One example per question: context = article + " " + question; with
             fill_blanks (zero-shot scoring), a question with one blank (a run of
             "_") instead gives context = article + the words before the blank and,
             per option, the option followed by the words after the blank.
    Winograd schemas (zero-shot pronoun resolution; `read_winograd`, by suffix)
      .xml   WSCollection.xml (Davis's Winograd Schema Challenge collection): one
             <schema> per item with <text><txt1/><pron/><txt2/></text>,
             <answers><answer/><answer/></answers>, <correctAnswer> A or B (a
             trailing "." and spaces allowed); whitespace runs collapse to one space.
             The file holds 285 schemas; WSC273 is the first 273.
      .jsonl one object a line, either HF winograd_wsc / definite_pronoun_resolution
             style: "text" (or "sentence"), "pronoun", "options" (or "candidates",
             two strings), "label" (0 / 1, or the right candidate's text; absent:
             unlabelled), optional "pronoun_loc" (the pronoun's character offset);
             or WinoGrande style: "sentence" with a "_" blank, "option1", "option2",
             "answer" ("1" / "2").
      other  DPR (Rahman & Ng 2012, {train,test}.c.txt): blocks of four lines,
             separated by blank lines: the sentence, the pronoun, the two candidates
             separated by a comma, the right candidate.
             Without a location, the pronoun is its first whole-word occurrence in
             the sentence (DPR's rule), matched case-sensitively, else ignoring case.
    generic  CSV (header row) or JSON lines, with a column mapping for the kind:
             classification text, label; entailment premise, hypothesis, label;
             similarity text_a, text_b, label; multiple_choice context,
             choices (several columns, or one holding a list), label; and an
             optional id.

Bad input raises ValueError with the file and line: a malformed row (wrong
number of fields, unparseable JSON), a label outside the task's label set, an
empty split, or a file whose columns do not fit the task kind.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptjax.finetune.transforms import Example, check_kind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its kind, label set and metrics.

    labels: the label spellings in index order (None for a regression score);
    predictions files write these. aliases: other spellings accepted on input.
    n_choices: the number of answers of a multiple-choice task, when fixed.
    """

    name: str
    kind: str
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...] = ("accuracy",)
    n_choices: int | None = None
    aliases: dict = field(default_factory=dict)
    description: str = ""

    def __post_init__(self):
        check_kind(self.kind)

    @property
    def regression(self) -> bool:
        return self.labels is None and self.kind == "similarity"

    @property
    def n_classes(self) -> int | None:
        if self.kind == "multiple_choice" or self.labels is None:
            return None
        return len(self.labels)

    def label_index(self, value, where: str) -> int | float:
        """The label of a row as the model's target; ValueError naming `where` otherwise."""
        if self.regression:
            try:
                score = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: score {value!r} is not a number") from None
            if not math.isfinite(score):
                raise ValueError(f"{where}: score {value!r} is not finite")
            return score
        text = str(value).strip()
        text = self.aliases.get(text, text)
        if self.labels is not None and text in self.labels:
            return self.labels.index(text)
        raise ValueError(f"{where}: label {value!r} is not one of {list(self.labels or [])}")


@dataclass
class TaskData:
    """A task's spec and its splits (split name -> examples)."""

    spec: TaskSpec
    splits: dict[str, list[Example]]

    def __getitem__(self, split: str) -> list[Example]:
        if split not in self.splits:
            raise ValueError(f"task {self.spec.name} has no split {split!r} "
                             f"(it has {sorted(self.splits)})")
        return self.splits[split]


_NLI3 = ("entailment", "neutral", "contradiction")
_BINARY = ("0", "1")
_QNLI = ("entailment", "not_entailment")

SPECS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", "classification", _BINARY, ("matthews", "accuracy"),
                     description="CoLA: is the sentence grammatical (1) or not (0)"),
    "sst2": TaskSpec("sst2", "classification", _BINARY, ("accuracy",),
                     description="SST-2: sentence sentiment, positive (1) or negative (0)"),
    "mrpc": TaskSpec("mrpc", "similarity", _BINARY, ("f1", "accuracy"),
                     description="MRPC: are the two sentences paraphrases (1)"),
    "stsb": TaskSpec("stsb", "similarity", None, ("pearson", "spearman"),
                     description="STS-B: similarity score in [0, 5]"),
    "qqp": TaskSpec("qqp", "similarity", _BINARY, ("f1", "accuracy"),
                    description="QQP: are the two questions duplicates (1)"),
    "mnli": TaskSpec("mnli", "entailment", _NLI3, ("accuracy",),
                     description="MultiNLI: entailment, neutral or contradiction"),
    "qnli": TaskSpec("qnli", "entailment", _QNLI, ("accuracy",),
                     description="QNLI: does the sentence answer the question"),
    "rte": TaskSpec("rte", "entailment", _QNLI, ("accuracy",),
                    description="RTE: does sentence 1 entail sentence 2"),
    "wnli": TaskSpec("wnli", "entailment", _BINARY, ("accuracy",),
                     description="WNLI: does sentence 1 entail sentence 2 (1)"),
    "snli": TaskSpec("snli", "entailment", _NLI3, ("accuracy",),
                     description="SNLI: entailment, neutral or contradiction"),
    "scitail": TaskSpec("scitail", "entailment", ("entails", "neutral"), ("accuracy",),
                        aliases={"entailment": "entails"},
                        description="SciTail: does the premise entail the hypothesis"),
    "storycloze": TaskSpec("storycloze", "multiple_choice", ("1", "2"), ("accuracy",),
                           n_choices=2, description="Story Cloze: the right ending of a story"),
    "rocstories": TaskSpec("rocstories", "multiple_choice", ("1", "2"), ("accuracy",),
                           n_choices=2, description="ROCStories: the true fifth sentence "
                           "against another story's"),
    "race": TaskSpec("race", "multiple_choice", ("A", "B", "C", "D"), ("accuracy",),
                     n_choices=4, description="RACE: reading comprehension, 4 options"),
}
SPECS["race-middle"] = SPECS["race"]
SPECS["race-high"] = SPECS["race"]

# GLUE files: which columns hold what, by header name (CoLA's train/dev have no header).
_GLUE_COLUMNS = {
    "cola": dict(a="sentence", label="label", id="index"),
    "sst2": dict(a="sentence", label="label", id="index"),
    "mrpc": dict(a="#1 String", b="#2 String", label="Quality", id="index"),
    "stsb": dict(a="sentence1", b="sentence2", label="score", id="index"),
    "qqp": dict(a="question1", b="question2", label="is_duplicate", id="id"),
    "mnli": dict(a="sentence1", b="sentence2", label="gold_label", id="index"),
    "qnli": dict(a="question", b="sentence", label="label", id="index"),
    "rte": dict(a="sentence1", b="sentence2", label="label", id="index"),
    "wnli": dict(a="sentence1", b="sentence2", label="label", id="index"),
    "snli": dict(a="sentence1", b="sentence2", label="gold_label", id="pairID"),
    "scitail": dict(a="sentence1", b="sentence2", label="gold_label", id="pairID"),
}
COLA_COLUMNS = ("source", "label", "original_label", "sentence")
SCITAIL_TSV_COLUMNS = ("premise", "hypothesis", "label")

_GLUE_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
_MNLI_FILES = {"train": "train.tsv", "validation": "dev_matched.tsv",
               "validation_matched": "dev_matched.tsv",
               "validation_mismatched": "dev_mismatched.tsv",
               "test": "test_matched.tsv", "test_matched": "test_matched.tsv",
               "test_mismatched": "test_mismatched.tsv"}
_SPLIT_FILE_WORD = {"train": "train", "validation": "dev", "test": "test"}


_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "story-cloze": "storycloze",
            "story_cloze": "storycloze", "multinli": "mnli"}


def get_spec(name: str) -> TaskSpec:
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in SPECS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(SPECS)} (or a generic "
                         f"csv/jsonl file with a column mapping)")
    return SPECS[key]


# ----------------------------------------------------------------------------- file reading


def _check_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    return path


def read_tsv(path, header: Sequence[str] | None = None, *,
             skip_malformed: bool = False) -> Iterator[tuple[int, dict]]:
    """Rows of a GLUE-style TSV (tabs, no quoting) as (line number, {column: value}).

    header None: the first line is the header. Every row must have as many fields
    as the header; otherwise ValueError "file:line: ..." (or, with
    skip_malformed, the row is skipped and counted in a warning). A UTF-8 byte
    order mark (MRPC's files start with one) is dropped.
    """
    path = _check_file(path)
    skipped = 0
    with open(path, encoding="utf-8-sig", newline="") as f:
        columns = list(header) if header is not None else None
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if columns is None:
                columns = line.split("\t")
                continue
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != len(columns):
                message = (f"{path}:{line_no}: malformed row: {len(fields)} tab-separated "
                           f"fields, the header has {len(columns)} ({columns})")
                if skip_malformed:
                    skipped += 1
                    continue
                raise ValueError(message)
            yield line_no, dict(zip(columns, fields, strict=True))
    if skipped:
        log.warning("%s: skipped %d malformed rows", path, skipped)


def read_jsonl(path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file."""
    path = _check_file(path)
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: malformed JSON line: {err.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got "
                                 f"{type(row).__name__}")
            yield line_no, row


def read_csv(path) -> Iterator[tuple[int, dict]]:
    """(line number, {column: value}) of a CSV with a header row (quoted fields allowed)."""
    path = _check_file(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            columns = next(reader)
        except StopIteration:
            return
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(columns):
                raise ValueError(f"{path}:{reader.line_num}: malformed row: {len(row)} fields, "
                                 f"the header has {len(columns)} ({columns})")
            yield reader.line_num, dict(zip(columns, row, strict=True))


def _first_line(path: Path) -> str:
    with open(_check_file(path), encoding="utf-8-sig") as f:
        return f.readline().rstrip("\r\n")


def _need_columns(path, have, need: dict, spec_name: str):
    missing = [c for c in need.values() if c not in have]
    if missing:
        raise ValueError(
            f"{path}: the columns {sorted(have)} do not fit task {spec_name!r}: it needs "
            f"{sorted(need.values())} (missing {missing})")


def _nonempty(examples: list[Example], path, what: str = "examples") -> list[Example]:
    if not examples:
        raise ValueError(f"{path}: the split is empty (no {what})")
    return examples


# ----------------------------------------------------------------------------- GLUE, SNLI, SciTail


def read_glue(name: str, path, *, skip_malformed: bool = False) -> list[Example]:
    """Examples of one GLUE / SNLI / SciTail file (test files: labels None).

    The layout is recognised by its header (see the module docstring); a file
    whose columns do not fit the task is a ValueError naming both.
    """
    spec = get_spec(name)
    path = _check_file(path)
    if path.suffix == ".jsonl" or (spec.name in ("snli", "scitail")
                                   and _first_line(path).startswith("{")):
        rows = read_jsonl(path)
        return _pairs_from_rows(spec, path, rows, _GLUE_COLUMNS[spec.name])
    first = _first_line(path).split("\t")
    header = None
    columns = dict(_GLUE_COLUMNS.get(spec.name, {}))
    if spec.name == "cola" and first != ["index", "sentence"]:
        if len(first) != len(COLA_COLUMNS):
            raise ValueError(f"{path}:1: a CoLA train/dev file has {len(COLA_COLUMNS)} "
                             f"columns without a header ({COLA_COLUMNS}), this line has "
                             f"{len(first)}")
        header = COLA_COLUMNS
    elif spec.name == "scitail" and "gold_label" not in first:
        if len(first) != len(SCITAIL_TSV_COLUMNS):
            raise ValueError(f"{path}:1: SciTail's tsv_format has {len(SCITAIL_TSV_COLUMNS)} "
                             f"columns without a header, this line has {len(first)}")
        header = SCITAIL_TSV_COLUMNS
        columns = dict(a="premise", b="hypothesis", label="label")
    if spec.name not in _GLUE_COLUMNS:
        raise ValueError(f"{spec.name} is not a GLUE/SNLI/SciTail task")
    rows = read_tsv(path, header, skip_malformed=skip_malformed)
    return _pairs_from_rows(spec, path, rows, columns, header_known=header is not None)


def _pairs_from_rows(spec: TaskSpec, path, rows, columns: dict,
                     header_known: bool = False) -> list[Example]:
    examples: list[Example] = []
    dropped = 0
    need = {k: v for k, v in columns.items() if k in ("a", "b")}
    checked = False
    for line_no, row in rows:
        if not checked:
            _need_columns(path, row.keys(), need, spec.name)
            checked = True
        where = f"{path}:{line_no}"
        label = None
        if columns["label"] in row:
            raw = row[columns["label"]]
            if spec.name in ("snli", "mnli") and raw == "-":
                dropped += 1  # SNLI: no majority among the annotators
                continue
            label = spec.label_index(raw, where)
        uid = str(row.get(columns.get("id", ""), len(examples)))
        b = row[columns["b"]] if "b" in columns else None
        examples.append(Example(row[columns["a"]], b, label=label, uid=uid))
    if dropped:
        log.info("%s: dropped %d rows with gold_label '-'", path, dropped)
    return _nonempty(examples, path)


def glue_file(name: str, folder, split: str) -> Path:
    """The file of `split` in a GLUE / SNLI / SciTail folder."""
    spec, folder = get_spec(name), Path(folder)
    if spec.name == "mnli":
        files = _MNLI_FILES
    elif spec.name in ("snli", "scitail"):
        word = _SPLIT_FILE_WORD.get(split, split)
        stem = "snli_1.0" if spec.name == "snli" else "scitail_1.0"
        candidates = [folder / f"{stem}_{word}.jsonl", folder / f"{stem}_{word}.txt",
                      folder / f"{stem}_{word}.tsv",
                      folder / "tsv_format" / f"{stem}_{word}.tsv",
                      folder / "snli_format" / f"{stem}_{word}.txt"]
        for c in candidates:
            if c.is_file():
                return c
        raise FileNotFoundError(f"no {split} file for {spec.name} in {folder} (looked for "
                                f"{[str(c.relative_to(folder)) for c in candidates]})")
    else:
        files = _GLUE_FILES
    if split not in files:
        raise ValueError(f"task {spec.name} has no split {split!r}; choose from {sorted(files)}")
    return folder / files[split]


# ----------------------------------------------------------------------------- stories, RACE


def read_story_cloze(path) -> list[Example]:
    """Story Cloze CSV: four-sentence context, two endings, AnswerRightEnding 1 or 2."""
    spec = SPECS["storycloze"]
    path = _check_file(path)
    need = {f"s{i}": f"InputSentence{i}" for i in range(1, 5)}
    need.update(e1="RandomFifthSentenceQuiz1", e2="RandomFifthSentenceQuiz2")
    examples = []
    for line_no, row in read_csv(path):
        if not examples:
            _need_columns(path, row.keys(), need, "storycloze")
        where = f"{path}:{line_no}"
        context = " ".join(row[f"InputSentence{i}"].strip() for i in range(1, 5))
        raw = row.get("AnswerRightEnding")
        label = spec.label_index(raw, where) if raw not in (None, "") else None
        examples.append(Example(context, choices=(row[need["e1"]].strip(),
                                                  row[need["e2"]].strip()),
                                label=label, uid=row.get("InputStoryid", str(len(examples)))))
    return _nonempty(examples, path)


def read_rocstories(path, seed: int = 0) -> list[Example]:
    """ROCStories CSV as two-choice examples: the true fifth sentence against the fifth
    sentence of another story (a deterministic permutation by `seed`); the true one is
    choice 1 or 2 by a deterministic coin. A way to train on ROCStories' unlabelled
    stories in Story Cloze's format; its labels are synthetic, not annotated."""
    path = _check_file(path)
    need = {f"s{i}": f"sentence{i}" for i in range(1, 6)}
    stories = []
    for _, row in read_csv(path):
        if not stories:
            _need_columns(path, row.keys(), need, "rocstories")
        stories.append(row)
    if len(stories) < 2:
        raise ValueError(f"{path}: ROCStories needs at least 2 stories to draw wrong endings, "
                         f"got {len(stories)}")
    rng = np.random.default_rng(seed)
    n = len(stories)
    other = (np.arange(n) + rng.integers(1, n, n)) % n  # never the story itself
    first = rng.integers(0, 2, n)
    examples = []
    for i, row in enumerate(stories):
        context = " ".join(row[f"sentence{k}"].strip() for k in range(1, 5))
        right, wrong = row["sentence5"].strip(), stories[other[i]]["sentence5"].strip()
        choices = (right, wrong) if first[i] == 0 else (wrong, right)
        examples.append(Example(context, choices=choices, label=int(first[i]),
                                uid=row.get("storyid", str(i))))
    return examples


_BLANK = re.compile(r"_+")
# After these a filled blank takes no space ("to read _ ." -> "to read books.").
_CLOSING_PUNCTUATION = ".,;:!?)"


def split_blank(question: str) -> tuple[str, str] | None:
    """(words before, words after) the blank of a fill-in-the-blank question, each
    stripped; None when the question has no blank or more than one (RACE writes a blank
    as a run of underscores: "The passage is mainly about _ .")."""
    blanks = list(_BLANK.finditer(question))
    if len(blanks) != 1:
        return None
    return question[: blanks[0].start()].strip(), question[blanks[0].end():].strip()


def fill_blank(option: str, after: str) -> str:
    """The option put in the blank, followed by the words after the blank:
    ("books", ".") -> "books."; ("Tom", "is the best.") -> "Tom is the best."; a final
    "." both in the option and after the blank is kept once."""
    option = option.strip()
    if after[:1] in tuple(".!?") and option.endswith(after[:1]):
        after = after[1:].lstrip()
    if not after:
        return option
    return option + ("" if after[0] in _CLOSING_PUNCTUATION else " ") + after


def race_example(article: str, question: str, options: Sequence[str], label, uid: str,
                 *, fill_blanks: bool = False) -> Example:
    """One RACE question as a multiple-choice example (see the module docstring).

    fill_blanks: a question with one blank puts each option in it, for scoring by
    likelihood (GPT-1 and GPT-2 zero-shot): the choices are the completed question from
    the blank on, so the words after the blank are scored too (a blank at the start, as
    in "_ is the best title.", would otherwise be scored without its question), and the
    context holds what every option shares, the article and the words before the blank.
    Without it (fine-tuning) the question is the context's end and each option follows.
    """
    article, question = article.strip(), question.strip()
    options = tuple(o.strip() for o in options)
    parts = split_blank(question) if fill_blanks else None
    if parts is None:
        return Example(f"{article} {question}", choices=options, label=label, uid=uid)
    before, after = parts
    context = f"{article} {before}" if before else article
    return Example(context, choices=tuple(fill_blank(o, after) for o in options),
                   label=label, uid=uid)


def read_race(path, *, fill_blanks: bool = False) -> list[Example]:
    """RACE: a JSON file, or a folder searched recursively for *.txt / *.json files
    (sorted), each one passage with its questions. One example per question; see
    `race_example` for fill_blanks."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".json")
                       and p.is_file())
    else:
        files = [_check_file(path)]
    spec = SPECS["race"]
    examples = []
    for f in files:
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{f}:{err.lineno}: malformed RACE JSON: {err.msg}") from None
        missing = [k for k in ("article", "questions", "options") if k not in doc]
        if missing:
            raise ValueError(f"{f}: a RACE file needs article, questions, options, answers "
                             f"(missing {missing})")
        questions, options = doc["questions"], doc["options"]
        answers = doc.get("answers")
        if len(options) != len(questions) or (answers is not None
                                              and len(answers) != len(questions)):
            raise ValueError(f"{f}: {len(questions)} questions but {len(options)} option lists "
                             f"and {len(answers or [])} answers")
        for q, (question, opts) in enumerate(zip(questions, options, strict=True)):
            if len(opts) != 4:
                raise ValueError(f"{f}: question {q} has {len(opts)} options, RACE has 4")
            label = None if answers is None else spec.label_index(answers[q],
                                                                  f"{f}: question {q}")
            examples.append(race_example(doc["article"], question, opts, label,
                                         f"{doc.get('id', f.name)}-{q}",
                                         fill_blanks=fill_blanks))
    return _nonempty(examples, path, "questions")


# ----------------------------------------------------------------------------- Winograd schemas


@dataclass(frozen=True)
class WinogradSchema:
    """A sentence, the pronoun to resolve (at character `pronoun_at` of the text), its two
    candidate antecedents, and the right candidate's index (None: unlabelled)."""

    text: str
    pronoun: str
    pronoun_at: int
    candidates: tuple[str, str]
    label: int | None
    uid: str = ""

    def __post_init__(self):
        if self.text[self.pronoun_at: self.pronoun_at + len(self.pronoun)] != self.pronoun:
            raise ValueError(f"{self.pronoun!r} is not at character {self.pronoun_at} of "
                             f"{self.text!r}")
        if len(self.candidates) != 2:
            raise ValueError(f"a Winograd schema has 2 candidates, got {self.candidates!r}")


def read_winograd(path) -> list[WinogradSchema]:
    """Winograd schemas from WSCollection.xml (.xml), JSON lines (.jsonl / .json) or a DPR
    text file (anything else); the formats are in the module docstring."""
    path = _check_file(path)
    if path.suffix == ".xml":
        items = _read_wsc_xml(path)
    elif path.suffix in (".jsonl", ".json"):
        items = [_winograd_from_row(row, f"{path}:{n}") for n, row in read_jsonl(path)]
    else:
        items = _read_dpr(path)
    return _nonempty(items, path, "schemas")


def _clean(text: str | None) -> str:
    return " ".join((text or "").split())


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None


def _read_wsc_xml(path: Path) -> list[WinogradSchema]:
    import xml.etree.ElementTree as ET

    text = _read_text(path)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as err:
        raise ValueError(f"{path}:{err.position[0]}: malformed XML: {err}") from None
    schemas = [root] if root.tag == "schema" else root.findall("schema")
    starts = [text.count("\n", 0, m.start()) + 1 for m in re.finditer(r"<schema\b", text)]
    items = []
    for i, schema in enumerate(schemas):
        where = f"{path}:{starts[i]}" if len(starts) == len(schemas) else f"{path}: schema {i}"
        before, pronoun = _clean(schema.findtext("text/txt1")), _clean(schema.findtext(
            "text/pron"))
        after = _clean(schema.findtext("text/txt2"))
        answers = [_clean(a.text) for a in schema.findall("answers/answer")]
        correct = _clean(schema.findtext("correctAnswer")).rstrip(".").strip().upper()
        if not pronoun:
            raise ValueError(f"{where}: schema {i} has no <text><pron> (the pronoun)")
        if len(answers) != 2 or not all(answers):
            raise ValueError(f"{where}: schema {i} has {len(answers)} non-empty <answer>s "
                             f"in <answers>, a Winograd schema has 2")
        if correct not in ("A", "B"):
            raise ValueError(f"{where}: schema {i}: <correctAnswer> must be A or B, got "
                             f"{schema.findtext('correctAnswer')!r}")
        # "... because" + "it" + "is too big." / "'s owner ...": no space before punctuation
        joint = "" if not after or after[0] in _CLOSING_PUNCTUATION + "'" else " "
        head = f"{before} " if before else ""
        items.append(WinogradSchema(head + pronoun + joint + after, pronoun, len(head),
                                    (answers[0], answers[1]), "AB".index(correct), str(i)))
    return items


def _find_pronoun(sentence: str, pronoun: str, where: str) -> int:
    """The first whole-word occurrence of the pronoun (case-sensitive, else any case)."""
    pattern = r"(?<!\w)" + re.escape(pronoun) + r"(?!\w)"
    found = re.search(pattern, sentence) or re.search(pattern, sentence, re.IGNORECASE)
    if found is None:
        raise ValueError(f"{where}: the pronoun {pronoun!r} is not a word of the sentence "
                         f"{sentence!r}")
    return found.start()


def _winograd_from_row(row: dict, where: str) -> WinogradSchema:
    uid = str(row.get("idx", row.get("id", where.rsplit(":", 1)[-1])))
    if "option1" in row:  # WinoGrande: the blank "_" stands for the pronoun
        sentence, answer = row.get("sentence"), row.get("answer")
        if not isinstance(sentence, str) or sentence.count("_") != 1:
            raise ValueError(f"{where}: a WinoGrande row needs a 'sentence' with one '_'")
        if "option2" not in row:
            raise ValueError(f"{where}: a WinoGrande row needs 'option1' and 'option2'")
        if answer not in (None, "", "1", "2", 1, 2):
            raise ValueError(f"{where}: 'answer' must be 1 or 2, got {answer!r}")
        label = None if answer in (None, "") else int(answer) - 1
        return WinogradSchema(sentence, "_", sentence.index("_"),
                              (str(row["option1"]), str(row["option2"])), label, uid)
    text = row.get("text", row.get("sentence"))
    candidates = row.get("options", row.get("candidates"))
    pronoun = row.get("pronoun")
    if not isinstance(text, str) or not isinstance(pronoun, str) or not pronoun:
        raise ValueError(f"{where}: a Winograd row needs 'text' (or 'sentence') and "
                         f"'pronoun' strings; it has {sorted(row)}")
    if (not isinstance(candidates, list) or len(candidates) != 2
            or not all(isinstance(c, str) and c.strip() for c in candidates)):
        raise ValueError(f"{where}: 'options' (or 'candidates') must be a list of 2 "
                         f"non-empty strings, got {candidates!r}")
    candidates = (candidates[0].strip(), candidates[1].strip())
    loc = row.get("pronoun_loc")
    if loc is None:
        loc = _find_pronoun(text, pronoun, where)
        pronoun = text[loc: loc + len(pronoun)]  # as the sentence spells it
    elif not isinstance(loc, int) or text[loc: loc + len(pronoun)] != pronoun:
        raise ValueError(f"{where}: pronoun_loc={loc!r} does not point at {pronoun!r} in "
                         f"{text!r}")
    label = row.get("label")
    if isinstance(label, str) and label in candidates:
        label = candidates.index(label)
    elif label is not None and (isinstance(label, bool) or label not in (0, 1)):
        raise ValueError(f"{where}: label {label!r} is neither 0, 1 nor one of the "
                         f"candidates {list(candidates)}")
    return WinogradSchema(text, pronoun, loc, candidates, None if label is None else int(label),
                          uid)


def _read_dpr(path: Path) -> list[WinogradSchema]:
    blocks: list[list[tuple[int, str]]] = [[]]
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            blocks[-1].append((n, line.strip()))
        elif blocks[-1]:
            blocks.append([])
    items = []
    for block in filter(None, blocks):
        if len(block) != 4:
            raise ValueError(
                f"{path}:{block[0][0]}: a DPR example is 4 lines (the sentence, the pronoun, "
                f"the two candidates separated by a comma, the right candidate), this one has "
                f"{len(block)}")
        (n, sentence), (_, pronoun), (n_candidates, line), (n_answer, answer) = block
        candidates = [c.strip() for c in line.split(",")]
        if len(candidates) != 2 or not all(candidates):
            raise ValueError(f"{path}:{n_candidates}: expected two candidates separated by "
                             f"a comma, got {line!r}")
        lowered = [c.lower() for c in candidates]
        if answer in candidates:
            label = candidates.index(answer)
        elif answer.lower() in lowered:
            label = lowered.index(answer.lower())
        else:
            raise ValueError(f"{path}:{n_answer}: the answer {answer!r} is not one of the "
                             f"candidates {candidates}")
        at = _find_pronoun(sentence, pronoun, f"{path}:{n}")
        items.append(WinogradSchema(sentence, sentence[at: at + len(pronoun)], at,
                                    (candidates[0], candidates[1]), label, str(len(items))))
    return items


# ----------------------------------------------------------------------------- generic files


GENERIC_FIELDS = {
    "classification": ("text",),
    "entailment": ("premise", "hypothesis"),
    "similarity": ("text_a", "text_b"),
    "multiple_choice": ("context", "choices"),
}


def parse_columns(text: str) -> dict:
    """'text=review,label=stars' or 'choices=a|b|c' -> {'text': 'review', ...}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"column mapping {part!r} must look like field=column")
        key, value = (s.strip() for s in part.split("=", 1))
        out[key] = value.split("|") if key == "choices" and "|" in value else value
    return out


def generic_spec(kind: str, labels: Sequence[str] | None = None, name: str = "custom",
                 n_choices: int | None = None) -> TaskSpec:
    """A TaskSpec for a generic file. labels None: a similarity task is a regression;
    for multiple choice the label is the right choice's 0-based index."""
    check_kind(kind)
    if kind == "multiple_choice":
        n = n_choices or (len(labels) if labels else None)
        return TaskSpec(name, kind, tuple(labels) if labels else None, ("accuracy",), n)
    if labels is None and kind != "similarity":
        raise ValueError(f"a {kind} task needs its label set (e.g. --labels neg,pos)")
    metrics = ("pearson", "spearman") if labels is None else ("accuracy",)
    return TaskSpec(name, kind, tuple(labels) if labels is not None else None, metrics)


def read_generic(path, spec: TaskSpec, columns: dict) -> list[Example]:
    """A CSV (header row) or JSON-lines file mapped by `columns` onto the task kind.

    columns: field -> column name, fields per kind as in GENERIC_FIELDS plus
    "label" (absent: unlabelled) and "id". For multiple choice, "choices" is a
    list of column names or one column holding a list.
    """
    path = _check_file(path)
    kind = spec.kind
    unknown = set(columns) - set(GENERIC_FIELDS[kind]) - {"label", "id"}
    if unknown:
        raise ValueError(f"column mapping has {sorted(unknown)}, which a {kind} task does not "
                         f"use; it takes {list(GENERIC_FIELDS[kind])} + label, id")
    missing_fields = [f for f in GENERIC_FIELDS[kind] if f not in columns]
    if missing_fields:
        raise ValueError(f"a {kind} task needs the column mapping to name {missing_fields}")
    if path.suffix in (".jsonl", ".json"):
        rows = read_jsonl(path)
    elif path.suffix == ".tsv":
        rows = read_tsv(path)
    else:
        rows = read_csv(path)
    choice_cols = columns.get("choices")
    names = [v for k, v in columns.items() if k != "choices"]
    if isinstance(choice_cols, list):
        names += choice_cols
    elif choice_cols:
        names.append(choice_cols)
    examples = []
    for line_no, row in rows:
        where = f"{path}:{line_no}"
        if not examples:
            _need_columns(path, row.keys(), {n: n for n in names if n != columns.get("label")
                                            and n != columns.get("id")}, spec.name)
        label = None
        if "label" in columns:
            if columns["label"] not in row:
                raise ValueError(f"{where}: no label column {columns['label']!r}")
            raw = row[columns["label"]]
            if kind == "multiple_choice" and spec.labels is None:
                try:
                    label = int(raw)
                except (TypeError, ValueError):
                    raise ValueError(f"{where}: label {raw!r} is not a choice index") from None
            else:
                label = spec.label_index(raw, where)
        uid = str(row.get(columns.get("id", ""), len(examples)))
        if kind == "multiple_choice":
            if isinstance(choice_cols, list):
                choices = tuple(str(row[c]) for c in choice_cols)
            else:
                value = row[choice_cols]
                if isinstance(value, str):
                    raise ValueError(f"{where}: column {choice_cols!r} must hold a list of "
                                     "answers (JSON lines), or map choices to several columns")
                choices = tuple(str(c) for c in value)
            if label is not None and not 0 <= label < len(choices):
                raise ValueError(f"{where}: label {label} is outside the {len(choices)} choices")
            examples.append(Example(str(row[columns["context"]]), choices=choices, label=label,
                                    uid=uid))
        else:
            fields = GENERIC_FIELDS[kind]
            b = str(row[columns[fields[1]]]) if len(fields) > 1 else None
            examples.append(Example(str(row[columns[fields[0]]]), b, label=label, uid=uid))
    return _nonempty(examples, path)


# ----------------------------------------------------------------------------- loading a task


def load_task(name: str, source, splits: Sequence[str] = ("train", "validation"), *,
              skip_malformed: bool = False) -> TaskData:
    """The named task's splits from a folder in its upstream layout (or, for one-file
    formats, {split: path} in `source`)."""
    spec = get_spec(name)
    out = {}
    for split in splits:
        if isinstance(source, dict):
            if split not in source:
                raise ValueError(f"no file given for split {split!r}")
            path = Path(source[split])
        else:
            path = _split_path(spec, Path(source), split)
        if spec.name in _GLUE_COLUMNS:
            out[split] = read_glue(spec.name, path, skip_malformed=skip_malformed)
        elif spec.name == "storycloze":
            out[split] = read_story_cloze(path)
        elif spec.name == "rocstories":
            out[split] = read_rocstories(path)
        else:
            if path.is_dir() and name in ("race-middle", "race-high"):
                path = path / name.split("-")[1]
            out[split] = read_race(path)
    return TaskData(spec, out)


def _split_path(spec: TaskSpec, folder: Path, split: str) -> Path:
    if spec.name in _GLUE_COLUMNS:
        return glue_file(spec.name, folder, split)
    if spec.name == "race":
        word = _SPLIT_FILE_WORD.get(split, split)
        path = folder / word
        if not path.is_dir():
            raise FileNotFoundError(f"RACE folder {folder} has no {word}/ (split {split})")
        return path
    word = _SPLIT_FILE_WORD.get(split, split)
    for name in (f"{split}.csv", f"{word}.csv"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no {split}.csv for {spec.name} in {folder}; pass the files "
                            "explicitly")


# ----------------------------------------------------------------------------- Hugging Face


# datasets name -> (task spec, field names: a, b / choices, label)
HF_TASKS = {
    "glue/cola": ("cola", dict(a="sentence")),
    "glue/sst2": ("sst2", dict(a="sentence")),
    "glue/mrpc": ("mrpc", dict(a="sentence1", b="sentence2")),
    "glue/stsb": ("stsb", dict(a="sentence1", b="sentence2")),
    "glue/qqp": ("qqp", dict(a="question1", b="question2")),
    "glue/mnli": ("mnli", dict(a="premise", b="hypothesis")),
    "glue/qnli": ("qnli", dict(a="question", b="sentence")),
    "glue/rte": ("rte", dict(a="sentence1", b="sentence2")),
    "glue/wnli": ("wnli", dict(a="sentence1", b="sentence2")),
    "snli": ("snli", dict(a="premise", b="hypothesis")),
    "race/all": ("race", dict(a="article", question="question", choices="options")),
    "race/high": ("race", dict(a="article", question="question", choices="options")),
    "race/middle": ("race", dict(a="article", question="question", choices="options")),
}


def examples_from_hf_rows(name: str, rows) -> list[Example]:
    """Examples from rows (dicts) of a Hugging Face dataset in HF_TASKS.

    HF's GLUE and SNLI labels are already class indices in our label order
    (-1: unlabelled test rows, and SNLI's no-majority pairs, which are dropped
    from labelled splits); STS-B's label is the score; RACE's answer a letter.
    """
    if name not in HF_TASKS:
        raise ValueError(f"no mapping for Hugging Face dataset {name!r}; known: "
                         f"{sorted(HF_TASKS)}")
    spec_name, fields = HF_TASKS[name]
    spec = SPECS[spec_name]
    examples = []
    for i, row in enumerate(rows):
        where = f"{name} row {i}"
        if spec.kind == "multiple_choice":
            answer = row.get("answer")
            label = None if not answer else spec.label_index(answer, where)
            context = f"{row[fields['a']].strip()} {row[fields['question']].strip()}"
            examples.append(Example(context, choices=tuple(row[fields["choices"]]), label=label,
                                    uid=str(row.get("example_id", i))))
            continue
        raw = row.get("label")
        if spec.regression:
            label = None if raw is None or raw < 0 else float(raw)
        elif raw is None or raw < 0:
            if spec.name == "snli" and raw is not None:
                continue
            label = None
        else:
            if not 0 <= int(raw) < len(spec.labels):
                raise ValueError(f"{where}: label {raw} outside {len(spec.labels)} classes")
            label = int(raw)
        b = row[fields["b"]] if "b" in fields else None
        examples.append(Example(row[fields["a"]], b, label=label, uid=str(row.get("idx", i))))
    return examples


def load_hf_task(name: str, splits: Sequence[str] = ("train", "validation")) -> TaskData:
    """A task from the Hugging Face hub by name (`glue/sst2`, `snli`, `race/high`, ...).

    Needs the `hf` extra (`pip install gptjax[hf]`) and a network (or a warm
    datasets cache). MNLI's validation split is `validation_matched`.
    """
    if name not in HF_TASKS:
        raise ValueError(f"no mapping for Hugging Face dataset {name!r}; known: "
                         f"{sorted(HF_TASKS)}")
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"loading {name!r} from the Hugging Face hub needs the `datasets` "
                         "package: pip install 'gptjax[hf]'") from err
    path, _, config = name.partition("/")
    out = {}
    for split in splits:
        hf_split = "validation_matched" if (name == "glue/mnli" and split == "validation") \
            else split
        ds = datasets.load_dataset(path, config or None, split=hf_split)
        out[split] = _nonempty(examples_from_hf_rows(name, ds), f"{name}:{split}")
    return TaskData(SPECS[HF_TASKS[name][0]], out)


def submission_rows(spec: TaskSpec, examples: Sequence[Example], predictions) -> list[tuple]:
    """(id, prediction) rows in the task's submission spelling: the label as the files
    write it (GLUE: 0/1, entailment/not_entailment, ...), a score for regression, the
    answer's letter or number for multiple choice."""
    rows = []
    for ex, p in zip(examples, np.asarray(predictions).tolist(), strict=True):
        if spec.regression:
            value = f"{float(p):.3f}"
        elif spec.labels is not None:
            value = spec.labels[int(p)]
        else:
            value = str(int(p))
        rows.append((ex.uid, value))
    return rows


def tokenizable_texts(examples: Sequence[Example]) -> list[str]:
    """Every text of the examples (for building a tokenizer)."""
    out = []
    for ex in examples:
        out.append(ex.text_a)
        if ex.text_b is not None:
            out.append(ex.text_b)
        out.extend(ex.choices)
    return out

