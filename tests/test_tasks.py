"""Classification tasks: the embedded ones (from CPython's help topics) and local files in GLUE's layout.

The truths the embedded tasks are checked against are the raw help topics themselves (whitespace collapsed,
footnote marks such as "[3]" dropped), not the task builder's own sentence splitter. No test uses the network:
every socket connection fails.
"""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import types
from collections import Counter
from pydoc_data.topics import topics

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mpoe.config import ConfigError, DataConfig
from mpoe.train.data.tasks import EMBEDDED_TASKS, Example, load_task

SPLITS = ("train", "val", "test")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("tests/test_tasks.py: no network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _task(task, **data):
    return load_task(DataConfig(name="task", task=str(task), **data))


@pytest.fixture(scope="module")
def embedded():
    return {name: load_task(DataConfig(name="task", task=name)) for name in EMBEDDED_TASKS}


@pytest.fixture(scope="module")
def topic_texts():
    return [" ".join(re.sub(r"\s*\[\d+\]", "", text).split()) for text in topics.values()]


# --- embedded tasks ---------------------------------------------------------------------------------------


FINGERPRINTS = """
import hashlib
from mpoe.config import DataConfig
from mpoe.train.data.tasks import load_task
for name in ("topic", "acceptability", "next_sentence"):
    task = load_task(DataConfig(name="task", task=name))
    print(hashlib.sha1(repr((task.label_words, task.splits, task.selection)).encode()).hexdigest())
"""


def test_embedded_tasks_are_deterministic_across_loads_and_hash_seeds(embedded):
    assert set(EMBEDDED_TASKS) >= {"acceptability", "next_sentence"}
    for name in EMBEDDED_TASKS:
        assert load_task(DataConfig(name="task", task=name)) == embedded[name]
    # str hashing is salted per process: a set iterated in hash order would change the examples between runs
    runs = {
        subprocess.run(
            [sys.executable, "-c", FINGERPRINTS],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    here = [embedded[n] for n in ("topic", "acceptability", "next_sentence")]
    assert runs == {
        "".join(hashlib.sha1(repr((t.label_words, t.splits, t.selection)).encode()).hexdigest() + "\n" for t in here)
    }


@pytest.mark.parametrize("name", ["topic", "acceptability", "next_sentence"])
def test_embedded_splits_are_sized_balanced_and_share_no_sentence(embedded, name):
    task = embedded[name]
    assert task.name == name and task.label_words == ("false", "true") and set(task.splits) == set(SPLITS)
    assert task.selection and "\n" not in task.selection
    sizes = {split: len(task.splits[split]) for split in SPLITS}
    assert sizes["train"] >= 800 and sizes["val"] >= 100 and sizes["test"] >= 200, sizes
    for split in SPLITS:
        counts = Counter(e.label for e in task.splits[split])
        assert set(counts) == {0, 1} and abs(counts[0] - counts[1]) <= 1, (split, counts)
    # a sentence's words as a multiset: the same for a sentence and its word-swapped copy
    owner = {}
    for split in SPLITS:
        for e in task.splits[split]:
            for text in (e.text_a, e.text_b):
                if text is not None:
                    key = tuple(sorted(text.split()))
                    assert owner.setdefault(key, split) == split, f"{text!r} in {owner[key]} and {split}"


def test_topic_labels_a_sentence_by_the_help_topic_it_comes_from(embedded):
    # The truth from the raw topics: the topics (by name) whose text holds the sentence, each classed by name.
    texts = {name: " ".join(re.sub(r"\s*\[\d+\]", "", text).split()) for name, text in topics.items()}
    types = {"string-methods", "typesseq", "specialnames", "dict", "integers", "types"}  # a few, by hand
    statements = {"compound", "import", "execmodel", "raise", "assignment", "debugger"}
    checked = 0
    for split in SPLITS:
        for e in embedded["topic"].splits[split]:
            assert e.text_b is None
            homes = {name for name, text in texts.items() if e.text_a in text}
            assert homes, e.text_a
            if homes <= types or homes <= statements:
                assert e.label == (1 if homes <= types else 0), (e, homes)
                checked += 1
    assert checked > 500


def test_acceptability_labels_a_real_sentence_yes_and_its_two_word_swap_no(embedded, topic_texts):
    corpus = "\n".join(topic_texts)
    for split in SPLITS:
        for e in embedded["acceptability"].splits[split]:
            assert e.text_b is None
            assert (e.text_a in corpus) == (e.label == 1), e
    # every "false" sentence is a real sentence with exactly two words exchanged (checked on a sample: slow search)
    noes = [e.text_a for e in embedded["acceptability"].splits["test"] if e.label == 0][:25]
    for text in noes:
        words = text.split()
        originals = []
        for i in range(len(words)):
            for j in range(i + 1, len(words)):
                if words[i] != words[j]:
                    swapped = words[:i] + [words[j]] + words[i + 1 : j] + [words[i]] + words[j + 1 :]
                    if " ".join(swapped) in corpus:
                        originals.append((i, j))
        assert originals, text


def _follows(doc, a, b):
    """b comes right after a in doc: only a space (and a list item's marker) between them."""
    start = doc.find(a)
    while start >= 0:
        rest = doc[start + len(a) :]
        gap = re.match(r" (?:(?:\d+\.|\*|-|\(\d+\)) )?", rest)
        if gap and rest[gap.end() :].startswith(b):
            return True
        start = doc.find(a, start + 1)
    return False


def test_next_sentence_pairs_a_sentence_with_its_successor_yes_and_with_another_topic_no(embedded, topic_texts):
    for split in SPLITS:
        for e in embedded["next_sentence"].splits[split]:
            homes_a = {i for i, doc in enumerate(topic_texts) if e.text_a in doc}
            homes_b = {i for i, doc in enumerate(topic_texts) if e.text_b in doc}
            assert homes_a and homes_b, e
            if e.label == 1:
                assert any(_follows(topic_texts[i], e.text_a, e.text_b) for i in homes_a), e
            else:
                assert not any(_follows(doc, e.text_a, e.text_b) for doc in topic_texts), e
                assert homes_a != homes_b, e  # from another document


def _threshold_accuracy(train, test):
    """Accuracy on `test` of the best rule `label = (x > t)` or `label = (x <= t)` fitted on `train` [(x, label)]."""
    best = (0.0, 0, True)
    for t in sorted({x for x, _ in train}):
        for above in (True, False):
            acc = sum((x > t) == (label == 1) == above for x, label in train) / len(train)
            best = max(best, (acc, t, above))
    _, t, above = best
    return sum((x > t) == (label == 1) == above for x, label in test) / len(test)


@pytest.mark.parametrize("name", ["acceptability", "next_sentence"])
def test_embedded_labels_are_not_given_away_by_length(embedded, name):
    task = embedded[name]

    def lengths(split, of):
        return [(of(e), e.label) for e in task.splits[split]]

    for of in (lambda e: len(e.text_a), lambda e: len(e.text_b or ""), lambda e: len(e.text_a) - len(e.text_b or "")):
        assert _threshold_accuracy(lengths("train", of), lengths("test", of)) < 0.6


def test_embedded_task_label_words_can_be_renamed_but_not_miscounted():
    assert _task("acceptability", task_label_words=["bad", "good"]).label_words == ("bad", "good")
    with pytest.raises(ConfigError, match="acceptability"):
        _task("acceptability", task_label_words=["a", "b", "c"])


# --- local files in GLUE's layout ---------------------------------------------------------------------------


def _csv(path, header, rows):
    lines = [",".join(header)] + [
        ",".join(json.dumps(v) if isinstance(v, str) else str(v) for v in row) for row in rows
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


SST2_TRAIN = [(f"review number {i} was {'good' if i % 2 else 'bad'}", i % 2) for i in range(40)]
SST2_VAL = [("a fine, warm film", 1), ("dull", 0), ("42", 1)]  # a quoted comma; text that looks like a number


def test_sst2_style_csv_without_test_holds_out_part_of_train_and_scores_on_validation(tmp_path):
    d = tmp_path / "sst2"
    d.mkdir()
    _csv(d / "train.csv", ["sentence", "label"], SST2_TRAIN + SST2_TRAIN[:1])  # a duplicate: one side only
    _csv(d / "validation.csv", ["sentence", "label"], SST2_VAL)
    task = _task(d, val_fraction=0.25)
    assert task.name == "sst2" and task.label_words == ("false", "true")
    assert task.splits["test"] == [Example(t, None, y) for t, y in SST2_VAL]
    train, val = task.splits["train"], task.splits["val"]
    everything = [Example(t, None, y) for t, y in SST2_TRAIN + SST2_TRAIN[:1]]
    assert Counter(train + val) == Counter(everything)
    assert train == [e for e in everything if e in train] and val == [e for e in everything if e in val]  # file order
    assert 3 <= len(val) <= 20 and not set(train) & set(val)
    assert Counter(train)[everything[0]] in (0, 2)  # a duplicated example stays on one side
    assert "held out" in task.selection and "validation.csv" in task.selection
    assert _task(d, val_fraction=0.25) == task


def test_glue_tsv_files_keep_quotes_as_text(tmp_path):
    d = tmp_path / "cola"
    d.mkdir()
    rows = ['it\'s "great"', "plain", 'a "b', "c d"]
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(rows)))
    (d / "validation.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(rows)))
    (d / "test.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(rows)))
    task = _task(d)
    assert task.splits["test"] == [Example(t, None, i % 2) for i, t in enumerate(rows)]


def test_mrpc_style_jsonl_pairs_with_an_unlabelled_test_file(tmp_path):
    d = tmp_path / "mrpc"
    d.mkdir()
    rows = [{"idx": i, "sentence1": f"first {i}", "sentence2": f"second {i}", "label": i % 2} for i in range(30)]
    _jsonl(d / "train.jsonl", rows)
    _jsonl(d / "validation.jsonl", rows[:4])
    _jsonl(d / "test.jsonl", [{**r, "label": -1} for r in rows[:5]])  # GLUE hides its test labels
    task = _task(d, val_fraction=0.2)
    assert task.splits["test"] == [Example(f"first {i}", f"second {i}", i % 2) for i in range(4)]
    assert len(task.splits["train"]) + len(task.splits["val"]) == 30 and task.splits["val"]
    assert all(e.text_b == e.text_a.replace("first", "second") for s in SPLITS for e in task.splits[s])
    assert "test.jsonl has no labels" in task.selection


def test_qnli_style_parquet_with_a_labelled_test_file_maps_splits_one_to_one(tmp_path):
    d = tmp_path / "qnli"
    d.mkdir()
    for stem, n in (("train", 6), ("validation", 3), ("test", 2)):
        table = pa.table({"question": [f"{stem} q{i}?" for i in range(n)], "sentence": [f"s{i}." for i in range(n)]})
        pq.write_table(
            table.append_column("label", pa.array([i % 2 for i in range(n)], pa.int64())), d / f"{stem}.parquet"
        )
    task = _task(d)
    for split, stem, n in (("train", "train", 6), ("val", "validation", 3), ("test", "test", 2)):
        assert task.splits[split] == [Example(f"{stem} q{i}?", f"s{i}.", i % 2) for i in range(n)]
    assert task.selection == "train = train.parquet; val = validation.parquet; test = test.parquet"


def test_named_columns_three_classes_and_label_words(tmp_path):
    d = tmp_path / "stars"
    d.mkdir()
    _jsonl(d / "train.jsonl", [{"review": f"r{i}", "stars": i % 3} for i in range(9)])
    _jsonl(d / "validation.jsonl", [{"review": "v", "stars": 2.0}])  # an integral float is an integer
    _jsonl(d / "test.jsonl", [{"review": "t", "stars": 1}])
    task = _task(d, task_text_fields=["review"], task_label_field="stars")
    assert task.label_words == ("zero", "one", "two") and task.splits["val"] == [Example("v", None, 2)]
    named = _task(d, task_text_fields=["review"], task_label_field="stars", task_label_words=["bad", "ok", "good"])
    assert named.label_words == ("bad", "ok", "good")


def test_a_datasets_name_goes_through_datasets_load_dataset(monkeypatch):
    class Split:
        def __init__(self, columns):
            self.columns = columns

        def to_dict(self):
            return self.columns

    calls = []

    def load_dataset(name, config):
        calls.append((name, config))
        train = {"sentence": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)], "idx": list(range(20))}
        return {
            "train": Split(train),
            "validation": Split({"sentence": ["v0", "v1"], "label": [1, 0], "idx": [0, 1]}),
            "test": Split({"sentence": ["x"], "label": [-1], "idx": [0]}),
        }

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = _task("glue", task_config="sst2", val_fraction=0.3)
    assert calls == [("glue", "sst2")] and task.name == "glue/sst2"
    assert task.splits["test"] == [Example("v0", None, 1), Example("v1", None, 0)]

    def offline(name, config):
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(ConfigError, match=r"data.task='glue' data.task_config='sst2'.*ConnectionError") as error:
        _task("glue", task_config="sst2")
    assert "\n" not in str(error.value)


# --- bad input: one line naming the file -------------------------------------------------------------------

GOOD_TRAIN = [("one", 0), ("two", 1), ("three", 0), ("four", 1)]


def _bad(d, case):
    """Writes the files of `case` into d; returns (the file the error must name, words it must contain, data keys)."""
    d.mkdir()
    train, val = d / "train.csv", d / "validation.csv"
    data = {}
    if case != "no train file":
        _csv(train, ["sentence", "label"], GOOD_TRAIN)
    if case != "no validation file":
        _csv(val, ["sentence", "label"], GOOD_TRAIN[:2])
    if case == "no label column":
        _csv(train, ["sentence", "stars"], GOOD_TRAIN)
        return "train.csv", ["'label'", "'stars'"], data
    if case == "one class":
        _csv(train, ["sentence", "label"], [(t, 1) for t, _ in GOOD_TRAIN])
        return "train.csv", ["one class"], data
    if case == "string labels":
        _csv(val, ["sentence", "label"], [("good", "positive"), ("bad", "negative")])
        return "validation.csv", ["row 1", "'positive'", "integer"], data
    if case == "fractional labels":
        val.unlink()
        _jsonl(d / "validation.jsonl", [{"sentence": "a", "label": 1}, {"sentence": "b", "label": 0.5}])
        return "validation.jsonl", ["row 2", "0.5", "integer"], data
    if case == "empty split":
        val.write_text("sentence,label\n")
        return "validation.csv", ["no examples"], data
    if case == "no train file":
        return str(d), ["train"], data
    if case == "no validation file":
        return str(d), ["validation"], data
    if case == "no text column":
        _csv(val, ["text_a", "label"], GOOD_TRAIN[:2])
        return "validation.csv", ["'sentence'", "'text_a'"], data
    if case == "label words miscounted":
        data["task_label_words"] = ["a", "b", "c"]
        return "train.csv", ["3 words", "2 classes"], data
    if case == "unlabelled validation":
        _csv(val, ["sentence", "label"], [("x", -1), ("y", -1)])
        return "validation.csv", ["row 1", "-1"], data
    if case == "bad json line":
        val.unlink()
        (d / "validation.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": oops}\n')
        return "validation.jsonl", ["line 2", "not JSON"], data
    if case == "unknown file type":
        val.unlink()
        (d / "validation.txt").write_text("a\n")
        return str(d), ["validation.txt"], data
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "no label column",
        "one class",
        "string labels",
        "fractional labels",
        "empty split",
        "no train file",
        "no validation file",
        "no text column",
        "label words miscounted",
        "unlabelled validation",
        "bad json line",
        "unknown file type",
    ],
)
def test_bad_task_files_stop_with_one_line_naming_the_file(tmp_path, case):
    named, words, data = _bad(tmp_path / "task", case)
    with pytest.raises(ConfigError) as error:
        _task(tmp_path / "task", **data)
    message = str(error.value)
    assert "\n" not in message and named in message, message
    for word in words:
        assert word in message, message


def test_a_task_path_that_is_not_a_directory_is_named(tmp_path):
    (tmp_path / "train.csv").write_text("sentence,label\na,0\n")
    for task in (tmp_path / "train.csv", tmp_path / "missing"):
        with pytest.raises(ConfigError, match="is not a directory"):
            _task(task)
