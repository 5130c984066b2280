"""Task readers on small files written in the exact upstream layouts."""

import json

import pytest

from gptjax.finetune.readers import (
    WinogradSchema,
    examples_from_hf_rows,
    fill_blank,
    generic_spec,
    get_spec,
    load_hf_task,
    load_task,
    parse_columns,
    read_generic,
    read_glue,
    read_race,
    read_rocstories,
    read_story_cloze,
    read_winograd,
    split_blank,
    submission_rows,
)


def write(path, lines, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")
    return path


def tsv(*fields):
    return "\t".join(fields)


# ----------------------------------------------------------------------------- GLUE


def test_cola_no_header_and_test_header(tmp_path):
    d = tmp_path / "CoLA"
    write(d / "train.tsv", [tsv("gj04", "1", "", "Our friends won't buy this analysis."),
                            tsv("gj04", "0", "*", "They drank the pub.")])
    write(d / "dev.tsv", [tsv("gj04", "1", "", "One more pseudo generalization.")])
    write(d / "test.tsv", [tsv("index", "sentence"), tsv("0", "Bill whistled past the house.")])
    data = load_task("cola", d, ("train", "validation", "test"))
    assert data.spec.kind == "classification" and data.spec.metrics[0] == "matthews"
    assert [(e.text_a, e.label) for e in data["train"]] == [
        ("Our friends won't buy this analysis.", 1), ("They drank the pub.", 0)]
    assert data["test"][0].label is None and data["test"][0].uid == "0"


def test_sst2(tmp_path):
    f = write(tmp_path / "train.tsv", [tsv("sentence", "label"),
                                       tsv("hide new secretions from the parental units ", "0"),
                                       tsv("contains no wit , only labored gags ", "0"),
                                       tsv("that loves its characters ", "1")])
    ex = read_glue("sst2", f)
    assert [e.label for e in ex] == [0, 0, 1]
    assert ex[2].text_a.startswith("that loves")


def test_mrpc_with_bom(tmp_path):
    f = write(tmp_path / "train.tsv", [
        tsv("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
        tsv("1", "702876", "702977", "Amrozi accused his brother .", "Referring to him ."),
        tsv("0", "2108705", "2108831", "Yucaipa owned Dominick 's .", "Yucaipa bought it .")],
        bom=True)
    ex = read_glue("mrpc", f)
    assert get_spec("mrpc").kind == "similarity"
    assert (ex[0].text_a, ex[0].text_b, ex[0].label) == (
        "Amrozi accused his brother .", "Referring to him .", 1)


def test_stsb_float_scores(tmp_path):
    header = tsv("index", "genre", "filename", "year", "old_index", "source1", "source2",
                 "sentence1", "sentence2", "score")
    f = write(tmp_path / "dev.tsv", [header, tsv("0", "main-captions", "MSRvid", "2012test",
                                                 "0000", "none", "none", "A man with a hard hat"
                                                 " is dancing.", "A man is dancing.", "5.000"),
                                     tsv("1", "main-captions", "MSRvid", "2012test", "0002",
                                         "none", "none", "A young child.", "A child.", "4.750")])
    ex = read_glue("stsb", f)
    assert [e.label for e in ex] == [5.0, 4.75]
    assert get_spec("sts-b").regression


def test_qqp_and_malformed_row(tmp_path):
    header = tsv("id", "qid1", "qid2", "question1", "question2", "is_duplicate")
    f = write(tmp_path / "train.tsv", [header,
                                       tsv("133273", "213221", "213222", "How is the life?",
                                           "How is life?", "0"),
                                       tsv("402555", "536040", "How do I?"),
                                       tsv("1", "2", "3", "A?", "B?", "1")])
    with pytest.raises(ValueError, match=r"train.tsv:3: malformed row: 3 tab-separated"):
        read_glue("qqp", f)
    ex = read_glue("qqp", f, skip_malformed=True)
    assert [(e.uid, e.label) for e in ex] == [("133273", 0), ("1", 1)]
    test = write(tmp_path / "test.tsv", [tsv("id", "question1", "question2"),
                                         tsv("0", "Why?", "Why not?")])
    assert read_glue("qqp", test)[0].label is None


MNLI_TRAIN = ("index", "promptID", "pairID", "genre", "sentence1_binary_parse",
              "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
              "sentence2", "label1", "gold_label")


def test_mnli_matched_mismatched(tmp_path):
    d = tmp_path / "MNLI"
    row = ["0", "31193", "31193n", "government", "( ( Conceptually cream ) ...",
           "( ( ( Product and ) ...", "(ROOT ...)", "(ROOT ...)",
           "Conceptually cream skimming has two basic dimensions.",
           "Product and geography are what make cream skimming work.", "neutral", "neutral"]
    write(d / "train.tsv", [tsv(*MNLI_TRAIN), tsv(*row)])
    dev_header = MNLI_TRAIN[:11] + ("label2", "label3", "label4", "label5", "gold_label")
    dev_row = row[:11] + ["entailment"] * 4 + ["entailment"]
    write(d / "dev_matched.tsv", [tsv(*dev_header), tsv(*dev_row)])
    write(d / "dev_mismatched.tsv", [tsv(*dev_header),
                                     tsv(*(dev_row[:-1] + ["contradiction"]))])
    data = load_task("mnli", d, ("train", "validation_matched", "validation_mismatched"))
    assert data["train"][0].label == 1  # entailment, neutral, contradiction
    assert data["validation_matched"][0].label == 0
    assert data["validation_mismatched"][0].label == 2
    assert data["train"][0].text_b.startswith("Product and geography")


def test_qnli_rte_wnli(tmp_path):
    q = write(tmp_path / "qnli.tsv", [tsv("index", "question", "sentence", "label"),
                                      tsv("0", "When?", "In 1990.", "entailment"),
                                      tsv("1", "Who?", "Nobody knows.", "not_entailment")])
    assert [e.label for e in read_glue("qnli", q)] == [0, 1]
    r = write(tmp_path / "rte.tsv", [tsv("index", "sentence1", "sentence2", "label"),
                                     tsv("0", "No weapons.", "Weapons found.", "not_entailment")])
    assert read_glue("rte", r)[0].label == 1
    w = write(tmp_path / "wnli.tsv", [tsv("index", "sentence1", "sentence2", "label"),
                                      tsv("0", "I stuck a pin.", "The pin had a hole.", "1")])
    assert read_glue("wnli", w)[0].label == 1


def test_label_outside_set_names_file_and_line(tmp_path):
    f = write(tmp_path / "dev.tsv", [tsv("index", "sentence1", "sentence2", "label"),
                                     tsv("0", "a", "b", "entailment"),
                                     tsv("1", "a", "b", "maybe")])
    with pytest.raises(ValueError, match=r"dev.tsv:3: label 'maybe' is not one of"):
        read_glue("rte", f)


def test_empty_split_and_kind_mismatch(tmp_path):
    empty = write(tmp_path / "empty.tsv", [tsv("sentence", "label")])
    with pytest.raises(ValueError, match="empty"):
        read_glue("sst2", empty)
    sst = write(tmp_path / "sst.tsv", [tsv("sentence", "label"), tsv("good", "1")])
    with pytest.raises(ValueError, match=r"do not fit task 'rte'.*missing"):
        read_glue("rte", sst)
    with pytest.raises(ValueError, match="CoLA train/dev file has 4 columns"):
        read_glue("cola", sst)
    with pytest.raises(FileNotFoundError):
        read_glue("sst2", tmp_path / "nope.tsv")
    with pytest.raises(ValueError, match="unknown task"):
        get_spec("squad")


# ----------------------------------------------------------------------------- SNLI, SciTail


def test_snli_jsonl_drops_no_majority(tmp_path):
    rows = [{"annotator_labels": ["neutral"], "captionID": "3416050480.jpg#4",
             "gold_label": "neutral", "pairID": "3416050480.jpg#4r1n",
             "sentence1": "A person on a horse jumps.", "sentence1_binary_parse": "( ... )",
             "sentence1_parse": "(ROOT ...)", "sentence2": "A person is training a horse.",
             "sentence2_binary_parse": "( ... )", "sentence2_parse": "(ROOT ...)"},
            {"gold_label": "-", "pairID": "x", "sentence1": "a", "sentence2": "b"},
            {"gold_label": "contradiction", "pairID": "y", "sentence1": "c", "sentence2": "d"}]
    write(tmp_path / "snli_1.0_train.jsonl", [json.dumps(r) for r in rows])
    data = load_task("snli", tmp_path, ("train",))
    assert [(e.uid, e.label) for e in data["train"]] == [("3416050480.jpg#4r1n", 1), ("y", 2)]
    bad = write(tmp_path / "bad.jsonl", ['{"gold_label": "neutral",'])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: malformed JSON"):
        read_glue("snli", bad)


def test_scitail_tsv_and_snli_format(tmp_path):
    write(tmp_path / "tsv_format" / "scitail_1.0_train.tsv",
          [tsv("Pluto rotates once every 6.39 days.", "Earth rotates once a day.", "neutral"),
           tsv("Heat flows from hot to cold.", "Heat moves to colder things.", "entails")])
    data = load_task("scitail", tmp_path, ("train",))
    assert [e.label for e in data["train"]] == [1, 0]
    f = write(tmp_path / "snli_format" / "scitail_1.0_dev.txt",
              [json.dumps({"gold_label": "entailment", "sentence1": "a", "sentence2": "b",
                           "pairID": "p1"})])
    assert read_glue("scitail", f)[0].label == 0  # "entailment" spelled for "entails"


# ----------------------------------------------------------------------------- stories, RACE

CLOZE_HEADER = ("InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
                "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding")


def test_story_cloze_csv(tmp_path):
    f = write(tmp_path / "val.csv", [
        CLOZE_HEADER,
        'b929f263-1dcd-4a0b-b267-5d5ff2fe65bb,My friends all love to go to the club to dance.,'
        'They think it\'s a lot of fun.,They asked me to go with them.,"I said yes, so I went.",'
        'My friends decided not to go dancing.,I had a great time.,2'])
    ex = read_story_cloze(f)
    assert ex[0].label == 1 and ex[0].choices[1] == "I had a great time."
    assert ex[0].text_a.endswith("I said yes, so I went.")
    bad = write(tmp_path / "bad.csv", [CLOZE_HEADER, "id,a,b,c,d,e,f,3"])
    with pytest.raises(ValueError, match=r"bad.csv:2: label '3'"):
        read_story_cloze(bad)
    wrong = write(tmp_path / "wrong.csv", ["storyid,storytitle,sentence1", "1,t,s"])
    with pytest.raises(ValueError, match="do not fit task 'storycloze'"):
        read_story_cloze(wrong)


def test_rocstories_synthetic_endings_are_deterministic(tmp_path):
    header = "storyid,storytitle,sentence1,sentence2,sentence3,sentence4,sentence5"
    rows = [f"id{i},T{i},a{i}.,b{i}.,c{i}.,d{i}.,e{i}." for i in range(6)]
    f = write(tmp_path / "roc.csv", [header, *rows])
    a, b = read_rocstories(f), read_rocstories(f)
    assert a == b
    for i, ex in enumerate(a):
        assert ex.choices[ex.label] == f"e{i}."
        assert ex.choices[1 - ex.label] != f"e{i}."


def test_race_folder(tmp_path):
    doc = {"answers": ["B", "D"], "options": [["a", "b", "c", "d"], ["e", "f", "g", "h"]],
           "questions": ["What is it?", "The _ is blue."], "article": "The sky is blue.",
           "id": "high1.txt"}
    write(tmp_path / "RACE" / "dev" / "high" / "1.txt", [json.dumps(doc)])
    data = load_task("race", tmp_path / "RACE", ("validation",))
    ex = data["validation"]
    assert [e.label for e in ex] == [1, 3]
    assert ex[0].text_a == "The sky is blue. What is it?" and ex[1].choices[3] == "h"
    assert ex[0].uid == "high1.txt-0"
    bad = dict(doc, options=[["a", "b", "c"], ["e", "f", "g", "h"]])
    write(tmp_path / "bad" / "1.txt", [json.dumps(bad)])
    with pytest.raises(ValueError, match="3 options"):
        read_race(tmp_path / "bad")


def test_race_blanks_filled_for_scoring(tmp_path):
    """For scoring, an option goes into the question's blank and the words after the blank
    follow it; without fill_blanks (fine-tuning) the question is the context's end."""
    assert split_blank("The passage is mainly about  _  .") == ("The passage is mainly about",
                                                                ".")
    assert split_blank("What is it?") is None and split_blank("_ and _ .") is None
    assert fill_blank("books", ".") == "books."
    assert fill_blank("to tell a story.", ".") == "to tell a story."
    assert fill_blank("Tom", "is the best title.") == "Tom is the best title."
    assert fill_blank("hot", "") == "hot"
    doc = {"answers": ["A", "B", "C"],
           "options": [["cats", "dogs", "cows", "pigs"], ["Cats", "Dogs", "Cows", "Pigs"],
                       ["a", "b", "c", "d"]],
           "questions": ["The text is about  _  .", "_ is the best title.",
                         "It is _ or _ ."], "article": "Cats purr.", "id": "m1"}
    f = write(tmp_path / "m1.txt", [json.dumps(doc)])
    scored = read_race(f, fill_blanks=True)
    assert [(e.text_a, e.choices[0], e.label) for e in scored] == [
        ("Cats purr. The text is about", "cats.", 0),
        ("Cats purr.", "Cats is the best title.", 1),
        ("Cats purr. It is _ or _ .", "a", 2)]  # two blanks: the option follows
    assert read_race(f)[0].text_a == "Cats purr. The text is about  _  ."
    assert read_race(f)[0].choices == ("cats", "dogs", "cows", "pigs")


# ----------------------------------------------------------------------------- Winograd

WSC_XML = """<?xml version="1.0" encoding="UTF-8"?>
<collection>
<schema>
<text>
<txt1>The city councilmen refused the demonstrators a permit
      because</txt1>
<pron>they</pron>
<txt2>feared violence.</txt2>
</text>
<quote><quote1></quote1><pron>they</pron><quote2>feared violence.</quote2></quote>
<answers>
<answer>The city councilmen</answer>
<answer>The demonstrators</answer>
</answers>
<correctAnswer>A</correctAnswer>
<source>(Winograd 1972)</source>
</schema>
<schema>
<text><txt1></txt1><pron>It</pron><txt2>was Bob's, said Ann.</txt2></text>
<answers><answer>The cup</answer><answer>The pot</answer></answers>
<correctAnswer>  B. </correctAnswer>
</schema>
</collection>
"""


def test_winograd_wsc273_xml(tmp_path):
    f = tmp_path / "WSCollection.xml"
    f.write_text(WSC_XML)
    first, second = read_winograd(f)
    assert first == WinogradSchema(
        "The city councilmen refused the demonstrators a permit because they feared violence.",
        "they", 63, ("The city councilmen", "The demonstrators"), 0, "0")
    assert (second.text, second.pronoun_at, second.label) == ("It was Bob's, said Ann.", 0, 1)
    bad = tmp_path / "bad.xml"
    bad.write_text(WSC_XML.replace("<correctAnswer>  B. </correctAnswer>",
                                   "<correctAnswer>C</correctAnswer>"))
    with pytest.raises(ValueError, match=r"bad.xml:18: schema 1: <correctAnswer> must be A"):
        read_winograd(bad)
    bad.write_text(WSC_XML.replace("<answer>The pot</answer>", ""))
    with pytest.raises(ValueError, match=r"bad.xml:18: schema 1 has 1 non-empty <answer>s"):
        read_winograd(bad)
    bad.write_text(WSC_XML.replace("</txt2>\n</text>", "</txt2>\n"))
    with pytest.raises(ValueError, match=r"bad.xml:\d+: malformed XML"):
        read_winograd(bad)


def test_winograd_dpr_text(tmp_path):
    """Four lines per example; the pronoun is its first whole-word occurrence (not the "he"
    of "the"), matched ignoring case when the sentence writes it in another case."""
    f = write(tmp_path / "test.c.txt", [
        "The bee landed on the flower because it had pollen, and it was sunny.", "it",
        "bee,flower", "flower", "", "", "He was late, so Ed scolded the man.", "he",
        "Ed, the man", "the man", ""])
    bee, ed = read_winograd(f)
    assert (bee.pronoun, bee.pronoun_at, bee.candidates, bee.label) == (
        "it", 37, ("bee", "flower"), 1)
    assert (ed.pronoun, ed.pronoun_at, ed.candidates, ed.label) == ("He", 0, ("Ed", "the man"), 1)
    for lines, message in [
        (["A b.", "it", "a,b"], r"x.txt:1: a DPR example is 4 lines .* this one has 3"),
        (["A b it.", "it", "a", "a"], r"x.txt:3: expected two candidates"),
        (["A b it.", "it", "a,b", "c"], r"x.txt:4: the answer 'c' is not one of"),
        (["A b.", "", "A b.", "it", "a,b", "a"], r"x.txt:1: a DPR example is 4 lines"),
        (["", "A b its.", "it", "a,b", "a"], r"x.txt:2: the pronoun 'it' is not a word")]:
        with pytest.raises(ValueError, match=message):
            read_winograd(write(tmp_path / "x.txt", lines))


def test_winograd_jsonl_forms(tmp_path):
    rows = [{"text": "Ann thanked Sue because she had helped.", "pronoun": "she",
             "pronoun_loc": 24, "options": ["Ann", "Sue"], "label": 1},
            {"sentence": "The cat chased the mouse until it was tired.", "pronoun": "it",
             "candidates": ["The cat", "the mouse"], "label": "The cat"},
            {"sentence": "Ian helped Tom because _ was weak.", "option1": "Ian",
             "option2": "Tom", "answer": "2"}]
    f = write(tmp_path / "wsc.jsonl", [json.dumps(r) for r in rows])
    ann, cat, ian = read_winograd(f)
    assert (ann.pronoun_at, ann.label, ann.candidates) == (24, 1, ("Ann", "Sue"))
    assert (cat.pronoun_at, cat.label) == (31, 0)
    assert (ian.pronoun, ian.pronoun_at, ian.label) == ("_", 23, 1)
    for row, message in [
        (dict(rows[0], pronoun_loc=3), r"bad.jsonl:2: pronoun_loc=3 does not point at 'she'"),
        (dict(rows[0], label=2), r"bad.jsonl:2: label 2 is neither 0, 1 nor one of"),
        (dict(rows[0], options=["Ann"]), r"bad.jsonl:2: 'options' .* list of 2"),
        ({"text": "No pronoun."}, r"bad.jsonl:2: a Winograd row needs 'text'"),
        (dict(rows[2], answer="3"), r"bad.jsonl:2: 'answer' must be 1 or 2")]:
        with pytest.raises(ValueError, match=message):
            read_winograd(write(tmp_path / "bad.jsonl", [json.dumps(rows[1]), json.dumps(row)]))
    with pytest.raises(ValueError, match="empty"):
        read_winograd(write(tmp_path / "empty.jsonl", [""]))


# ----------------------------------------------------------------------------- generic


def test_generic_csv_classification_and_jsonl_multiple_choice(tmp_path):
    f = write(tmp_path / "reviews.csv", ["review,stars", '"Great, really",pos', "Bad,neg"])
    spec = generic_spec("classification", ["neg", "pos"])
    ex = read_generic(f, spec, parse_columns("text=review,label=stars"))
    assert [(e.text_a, e.label) for e in ex] == [("Great, really", 1), ("Bad", 0)]
    j = write(tmp_path / "mc.jsonl", [json.dumps({"q": "2+2?", "opts": ["3", "4"], "y": 1})])
    mc = read_generic(j, generic_spec("multiple_choice"),
                      parse_columns("context=q,choices=opts,label=y"))
    assert mc[0].choices == ("3", "4") and mc[0].label == 1
    cols = parse_columns("context=q,choices=a|b,label=y")
    assert cols["choices"] == ["a", "b"]


def test_generic_errors(tmp_path):
    f = write(tmp_path / "pairs.csv", ["s1,s2,y", "a,b,yes"])
    spec = generic_spec("entailment", ["yes", "no"])
    with pytest.raises(ValueError, match="needs the column mapping to name"):
        read_generic(f, spec, {"premise": "s1", "label": "y"})
    with pytest.raises(ValueError, match="missing"):
        read_generic(f, spec, {"premise": "s1", "hypothesis": "nope", "label": "y"})
    with pytest.raises(ValueError, match=r"pairs.csv:2: label 'yes' is not one of"):
        read_generic(f, generic_spec("entailment", ["a", "b"]),
                     {"premise": "s1", "hypothesis": "s2", "label": "y"})
    with pytest.raises(ValueError, match="label set"):
        generic_spec("classification")
    assert generic_spec("similarity").regression


# ----------------------------------------------------------------------------- HF, submissions


def test_hf_rows_mapping_and_missing_datasets(monkeypatch):
    rows = [{"premise": "p", "hypothesis": "h", "label": 2},
            {"premise": "p", "hypothesis": "h", "label": -1}]
    ex = examples_from_hf_rows("snli", rows)
    assert [e.label for e in ex] == [2]  # no-majority rows dropped
    race = examples_from_hf_rows("race/high", [{"article": "A.", "question": "Q?",
                                                "options": ["1", "2", "3", "4"],
                                                "answer": "C", "example_id": "high1"}])
    assert race[0].label == 2 and race[0].text_a == "A. Q?"
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ValueError, match="pip install"):
        load_hf_task("glue/sst2")
    with pytest.raises(ValueError, match="no mapping"):
        load_hf_task("glue/nope")


def test_submission_rows_use_file_spelling(tmp_path):
    f = write(tmp_path / "rte.tsv", [tsv("index", "sentence1", "sentence2", "label"),
                                     tsv("7", "a", "b", "entailment")])
    ex = read_glue("rte", f)
    assert submission_rows(get_spec("rte"), ex, [1]) == [("7", "not_entailment")]
    assert submission_rows(get_spec("stsb"), ex, [3.14159]) == [("7", "3.142")]
