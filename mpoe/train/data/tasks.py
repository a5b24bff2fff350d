"""Classification tasks to fine-tune on: examples (one or two texts and an integer label) in train/val/test.

`load_task(cfg.data)` reads `data.task`:
- an embedded task's name (EMBEDDED_TASKS: built offline from CPython's help topics, see
  mpoe.train.data.embedded_tasks);
- a local directory with train.* and validation.* (or GLUE's dev.*) files, test.* optional, each .csv, .tsv,
  .jsonl, .json (JSON Lines or one array of objects) or .parquet; the directory's name names the task;
- otherwise a `datasets` name, with `data.task_config` (glue + sst2 is GLUE's SST-2, named "glue/sst2"): needs
  a network or the datasets cache.

Columns: GLUE's are recognised without flags (GLUE_TEXT_FIELDS, in that order of preference, and `label`);
`data.task_text_fields` (one or two columns) and `data.task_label_field` name others. Labels are integers
0..C-1 (C = the largest label in train + 1, every class present in train).

Splits: with a labelled test split, train/validation/test are train/val/test. Without one (no test split, a
test split without the label column, or with every label -1 as GLUE hides its test labels), a fraction
`data.val_fraction` of train, chosen by a hash of each example's text (the same examples in every run), is
held out as val (to select on) and validation becomes test (to score on).

Label words (label i is scored as word i): `data.task_label_words` if given, else "false", "true" for two classes
and "zero", "one", "two", ... for three to ten: words that are one token of GPT-2's tokenizer and of the BPE the
study pre-trains on the docstrings (where "yes" is two). They are tags the model learns, not a description of the
classes: GLUE's RTE label 0 (entailment) is "false" unless words are given.

Bad input stops with one line (ConfigError) naming the file, or the datasets name and split, and the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mpoe.config import ConfigError, DataConfig
from mpoe.train.data import embedded_tasks
from mpoe.train.data.corpus import is_validation

EMBEDDED_TASKS: tuple[str, ...] = embedded_tasks.EMBEDDED_TASKS
TASK_FILE_KINDS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# GLUE's text columns, one or two per task: pairs first (qnli has question and sentence; sst2 sentence alone).
GLUE_TEXT_FIELDS = (
    ("sentence1", "sentence2"),  # mrpc, rte, stsb, wnli
    ("question1", "question2"),  # qqp
    ("question", "sentence"),  # qnli
    ("premise", "hypothesis"),  # mnli, ax
    ("sentence",),  # sst2, cola
    ("text",),
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
UNLABELLED = -1  # GLUE's label for a hidden test label


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: Optional[str]  # None for one-text tasks
    label: int


@dataclass(frozen=True)
class Task:
    name: str  # "acceptability", "glue/sst2", or the directory's name
    label_words: tuple[str, ...]  # label i is scored as word i: single plain words
    splits: dict[str, list[Example]]  # "train", "val", "test", each in a fixed order
    selection: str  # one line: where val and test come from


@dataclass(frozen=True)
class _Split:
    """A split as read: named in errors by `where`, its columns as Python lists of equal length."""

    where: str
    columns: dict[str, list]

    @property
    def rows(self) -> int:
        return len(next(iter(self.columns.values()), []))


def load_task(cfg: DataConfig) -> Task:
    if cfg.task in EMBEDDED_TASKS:
        return _embedded_task(cfg)
    path = Path(cfg.task).expanduser()
    if path.is_dir():
        return _local_task(cfg, path)
    if path.exists() or cfg.task.startswith(("/", ".", "~")):
        raise ConfigError(
            f"data.task={cfg.task!r} is not a directory: give a directory holding train.* and validation.* "
            f"files, a datasets name, or an embedded task ({', '.join(EMBEDDED_TASKS)})"
        )
    return _hub_task(cfg)


def _embedded_task(cfg: DataConfig) -> Task:
    words = _label_words(cfg, 2, f"embedded task {cfg.task!r}", embedded_tasks.EMBEDDED_LABEL_WORDS)
    splits = {
        split: [Example(a, b, label) for a, b, label in examples]
        for split, examples in embedded_tasks.embedded_splits(cfg.task).items()
    }
    return Task(cfg.task, words, splits, embedded_tasks.SELECTION)


def _local_task(cfg: DataConfig, directory: Path) -> Task:
    files = {stem: _split_file(directory, stem, required=stem != "test") for stem in ("train", "test")}
    files["validation"] = _split_file(directory, _validation_stem(directory), required=True)
    raw = {stem: _read_file(path, cfg.task_label_field) for stem, path in files.items() if path is not None}
    return _task_of(cfg, directory.resolve().name, raw, {stem: path.name for stem, path in files.items() if path})


def _hub_task(cfg: DataConfig) -> Task:
    name = f"{cfg.task}/{cfg.task_config}" if cfg.task_config else cfg.task
    # Deferred: datasets is slow to import and only hub tasks need it.
    import datasets

    try:
        loaded = datasets.load_dataset(cfg.task, cfg.task_config)
    except Exception as e:  # network, unknown name or config, missing cache: many kinds, one line
        raise ConfigError(
            f"data.task={cfg.task!r} data.task_config={cfg.task_config!r}: datasets cannot load it "
            f"({type(e).__name__}: {_first_line(e)}); offline, give a directory with train.* and validation.* files"
        ) from None
    missing = [s for s in ("train", "validation") if s not in loaded]
    if missing:
        raise ConfigError(
            f"datasets {name!r} has no {' or '.join(missing)} split (splits: {sorted(loaded)}): "
            "use a config with train and validation splits, or a local directory"
        )
    raw = {
        split: _Split(f"datasets {name!r} split {split!r}", loaded[split].to_dict())
        for split in ("train", "validation", "test")
        if split in loaded
    }
    return _task_of(cfg, name, raw, {split: f"{name} {split}" for split in raw})


def _task_of(cfg: DataConfig, name: str, raw: dict[str, _Split], shown: dict[str, str]) -> Task:
    """The task from its read splits (train, validation, maybe test); `shown` names them in `selection`."""
    for split in raw.values():
        if split.rows == 0:
            raise ConfigError(f"{split.where} has no examples: give it labelled examples")
    train_labels = _labels(raw["train"], cfg.task_label_field)
    classes = _class_count(raw["train"], train_labels)
    fields = _text_fields(cfg, raw["train"])
    test_labelled = "test" in raw and _is_labelled(raw["test"], cfg.task_label_field)
    examples = {"train": _examples(raw["train"], fields, train_labels)}
    for stem in ("validation", "test") if test_labelled else ("validation",):
        labels = _labels(raw[stem], cfg.task_label_field)
        _check_range(raw[stem], labels, classes)
        examples[stem] = _examples(raw[stem], fields, labels)
    words = _label_words(cfg, classes, raw["train"].where)
    if test_labelled:
        splits = {"train": examples["train"], "val": examples["validation"], "test": examples["test"]}
        selection = f"train = {shown['train']}; val = {shown['validation']}; test = {shown['test']}"
        return Task(name, words, splits, selection)
    train, val = _hold_out(examples["train"], cfg.val_fraction, raw["train"].where)
    why = f"{shown['test']} has no labels" if "test" in raw else "no test split"
    selection = (
        f"val = {cfg.val_fraction:g} of {shown['train']} held out by a hash of the text; "
        f"test = {shown['validation']} ({why})"
    )
    return Task(name, words, {"train": train, "val": val, "test": examples["validation"]}, selection)


def _validation_stem(directory: Path) -> str:
    """validation.*, or dev.* where there is no validation file (GLUE's own download names it dev.tsv)."""
    stems = {p.name.split(".", 1)[0] for p in directory.iterdir() if p.is_file()}
    return "dev" if "validation" not in stems and "dev" in stems else "validation"


def _split_file(directory: Path, stem: str, required: bool) -> Optional[Path]:
    candidates = sorted(p for p in directory.iterdir() if p.is_file() and p.name.split(".", 1)[0] == stem)
    usable = [p for p in candidates if p.name == stem + p.suffix and p.suffix.lower() in TASK_FILE_KINDS]
    kinds = ", ".join(sorted(TASK_FILE_KINDS))
    if len(usable) > 1:
        raise ConfigError(f"task directory {str(directory)!r} has {', '.join(p.name for p in usable)}: keep one")
    if not usable and (required or candidates):
        found = f" (found {', '.join(p.name for p in candidates)})" if candidates else ""
        raise ConfigError(
            f"task directory {str(directory)!r} has no {stem}.* file of a known type{found}: "
            f"give {stem} with one of {kinds}"
        )
    return usable[0] if usable else None


def _read_file(path: Path, label_field: str) -> _Split:
    where = f"task file {str(path)!r}"
    if path.stat().st_size == 0:
        raise ConfigError(f"{where} is empty: give it examples, or remove it")
    kind = TASK_FILE_KINDS[path.suffix.lower()]
    try:
        columns = _json_columns(path, where) if kind == "json" else _arrow_columns(path, kind, label_field)
    except ConfigError:
        raise
    except Exception as e:  # pyarrow raises many kinds for a malformed file
        raise ConfigError(f"{where} cannot be read as {kind}: {type(e).__name__}: {_first_line(e)}") from None
    return _Split(where, columns)


def _arrow_columns(path: Path, kind: str, label_field: str) -> dict[str, list]:
    # Deferred: pyarrow (a dependency of datasets) is needed only for task files.
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if kind == "parquet":
        return pq.read_table(path).to_pydict()
    # GLUE's .tsv files quote nothing; a CSV text cell may hold quoted newlines.
    parse = (
        pacsv.ParseOptions(delimiter="\t", quote_char=False)
        if kind == "tsv"
        else pacsv.ParseOptions(newlines_in_values=True)
    )
    names = pacsv.open_csv(path, parse_options=parse).schema.names
    # CSV has no types: every column but the label is text, even one that looks like numbers.
    convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names if n != label_field})
    return pacsv.read_csv(path, parse_options=parse, convert_options=convert).to_pydict()


def _json_columns(path: Path, where: str) -> dict[str, list]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = list(enumerate(json.loads(text), 1))
        except ValueError as e:
            raise ConfigError(f"{where} is not valid JSON: {_first_line(e)}") from None
        unit = "record"
    else:
        records, unit = [], "line"
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except ValueError as e:
                    raise ConfigError(f"{where} line {number} is not JSON: {_first_line(e)}") from None
    for number, record in records:
        if not isinstance(record, dict):
            raise ConfigError(f"{where} {unit} {number} is not a JSON object: give one object per {unit}")
    names = list(dict.fromkeys(key for _, record in records for key in record))
    return {name: [record.get(name) for _, record in records] for name in names}


def _labels(split: _Split, field: str) -> list[int]:
    if field not in split.columns:
        raise ConfigError(
            f"{split.where} has no label column {field!r} (columns: {list(split.columns)}): set data.task_label_field"
        )
    labels = []
    for row, value in enumerate(split.columns[field], 1):
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole:
            shown = "empty" if value is None else repr(value)
            raise ConfigError(
                f"{split.where} row {row}: {field!r} is {shown}, not an integer label: "
                "give integer labels 0..C-1 (map class names to numbers)"
            )
        labels.append(int(value))
    return labels


def _is_labelled(split: _Split, field: str) -> bool:
    """A test split without the label column, or with every label -1 (GLUE), has no labels to score on."""
    return field in split.columns and any(v != UNLABELLED for v in split.columns[field])


def _class_count(train: _Split, labels: list[int]) -> int:
    present = sorted(set(labels))
    if present[0] < 0:
        raise ConfigError(
            f"{train.where} has label {present[0]}: labels must be 0..C-1 (-1 only in an unlabelled test split)"
        )
    if len(present) < 2:
        raise ConfigError(f"{train.where} has only one class (label {present[0]}): a classifier needs two or more")
    missing = sorted(set(range(present[-1] + 1)) - set(present))
    if missing:
        raise ConfigError(
            f"{train.where} has no example of label {missing[0]}: labels must be 0..C-1 with every class in train"
        )
    return present[-1] + 1


def _check_range(split: _Split, labels: list[int], classes: int) -> None:
    for row, label in enumerate(labels, 1):
        if not 0 <= label < classes:
            raise ConfigError(
                f"{split.where} row {row}: label {label} is outside train's labels 0..{classes - 1}"
                + (
                    " (-1 marks an unlabelled example: only a test split may be unlabelled, all of it)"
                    if label == UNLABELLED
                    else ""
                )
            )


def _text_fields(cfg: DataConfig, train: _Split) -> tuple[str, ...]:
    if cfg.task_text_fields:
        if len(cfg.task_text_fields) > 2:
            raise ConfigError(
                f"data.task_text_fields={list(cfg.task_text_fields)} names more than two columns: give one or two"
            )
        return tuple(cfg.task_text_fields)
    for fields in GLUE_TEXT_FIELDS:
        if all(f in train.columns for f in fields):
            return fields
    glue = "; ".join("/".join(f) for f in GLUE_TEXT_FIELDS)
    raise ConfigError(
        f"{train.where} has none of GLUE's text columns ({glue}); columns: {list(train.columns)}: "
        "set data.task_text_fields"
    )


def _examples(split: _Split, fields: tuple[str, ...], labels: list[int]) -> list[Example]:
    for field in fields:
        if field not in split.columns:
            raise ConfigError(
                f"{split.where} has no text column {field!r} (columns: {list(split.columns)}): "
                "set data.task_text_fields"
            )
    texts = [_texts(split, field) for field in fields]
    second = texts[1] if len(texts) > 1 else [None] * len(labels)
    return [Example(a, b, label) for a, b, label in zip(texts[0], second, labels)]


def _texts(split: _Split, field: str) -> list[str]:
    values = split.columns[field]
    for row, value in enumerate(values, 1):
        if not isinstance(value, str):
            shown = "empty" if value is None else f"{type(value).__name__} {value!r}"[:60]
            raise ConfigError(f"{split.where} row {row}: text {field!r} is {shown}, not text: give every row text")
    return values


def _hold_out(examples: list[Example], fraction: float, where: str) -> tuple[list[Example], list[Example]]:
    """(train, val): val is the examples whose text hashes into `fraction`, so a duplicate stays on one side."""
    held = [is_validation(f"{e.text_a}\0{e.text_b or ''}", fraction) for e in examples]
    train = [e for e, h in zip(examples, held) if not h]
    val = [e for e, h in zip(examples, held) if h]
    if not train or not val:
        side = "no val examples" if not val else "no train examples"
        raise ConfigError(
            f"{where}: holding out data.val_fraction={fraction:g} of its {len(examples)} examples leaves {side}: "
            "change data.val_fraction or give a labelled test.* file"
        )
    return train, val


def _label_words(
    cfg: DataConfig, classes: int, where: str, default: Optional[tuple[str, ...]] = None
) -> tuple[str, ...]:
    if cfg.task_label_words:
        words = tuple(cfg.task_label_words)
        if len(words) != classes:
            raise ConfigError(
                f"data.task_label_words={list(words)} gives {len(words)} words but {where} has {classes} classes: "
                "give one word per class"
            )
        if any(not isinstance(w, str) or not w or len(w.split()) != 1 or w != w.strip() for w in words):
            raise ConfigError(f"data.task_label_words={list(words)}: each must be one word without spaces")
        if len(set(words)) != len(words):
            raise ConfigError(f"data.task_label_words={list(words)} repeats a word: give distinct words")
        return words
    if default is not None:
        return default
    if classes == 2:
        return ("false", "true")
    if classes <= len(NUMBER_WORDS):
        return NUMBER_WORDS[:classes]
    raise ConfigError(f"{where} has {classes} classes: name a word for each with data.task_label_words=[...]")


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
