"""The documents of a data config, read lazily in batches, and split into training and validation.

Sources (`data=`): the embedded CPython corpus (`embedded`, a list: a few MB),
local text/json/parquet files read through `datasets` (`text`), or a dataset on
the hub when online (`hub`). Files and hub datasets stay `datasets` Arrow tables,
memory-mapped from its cache, and are read a batch of documents at a time: no
process holds a corpus as Python strings (`mpoe.train.data.sequences` tokenizes batch by
batch). Empty documents are skipped. The split is by a hash of each document
(`corpus.is_validation`): stable under reordering and across runs.

A file that cannot be read (empty, not UTF-8, a malformed JSON line, a text
value that is not a string) or that holds no text (only whitespace) stops with
one line naming the file and the line (`ConfigError`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Union

from mpoe.config import ConfigError, DataConfig
from mpoe.train.data import corpus

DATA_EXTENSIONS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
BATCH_DOCS = 4096  # documents per batch read (and per tokenizer call downstream)

# A part of a source: a list of documents, or (an Arrow-backed datasets.Dataset, its text column).
Part = Union[list, tuple]


def cache_root(cfg: DataConfig) -> Path:
    # An empty MPOE_CACHE (`export MPOE_CACHE=`) means unset, not the working directory.
    root = Path(cfg.cache_dir or os.environ.get("MPOE_CACHE") or Path.home() / ".cache" / "mpoe").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


class DocumentSource:
    """The documents of one data config, in order, as batches of non-empty strings; iterable any number of
    times (each pass reads the parts again)."""

    def __init__(self, parts: list[Part]):
        self.parts = parts

    def batches(self, split: str = "all", val_fraction: float = 0.0) -> Iterator[list[str]]:
        """Batches of the documents of `split` ("train", "val" or "all")."""
        for part in self.parts:
            if isinstance(part, list):
                chunks = (part[i : i + BATCH_DOCS] for i in range(0, len(part), BATCH_DOCS))
            else:
                table, column = part
                chunks = (rows[column] for rows in table.iter(batch_size=BATCH_DOCS))
            for chunk in chunks:
                docs = [d for d in chunk if isinstance(d, str) and d.strip()]
                if split != "all":
                    docs = [d for d in docs if corpus.is_validation(d, val_fraction) == (split == "val")]
                if docs:
                    yield docs

    def documents(self, split: str = "all", val_fraction: float = 0.0) -> Iterator[str]:
        for batch in self.batches(split, val_fraction):
            yield from batch


def document_source(cfg: DataConfig) -> DocumentSource:
    """The configured source. Files are checked here and turned into `datasets`' Arrow cache on disk (a bad one
    is a ConfigError); no document is read into memory until a pass over the source."""
    if cfg.name == "embedded":
        return DocumentSource([corpus.embedded_documents(cfg.embedded_part, cache_root(cfg))])
    if cfg.name == "text":
        return local_source([Path(p).expanduser() for p in cfg.paths], cfg.text_field)
    # Deferred: datasets is slow to import and only file and hub sources need it (not the embedded corpus).
    import datasets

    table = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split="train")
    if cfg.text_field not in table.column_names:
        raise ConfigError(
            f"data.text_field={cfg.text_field!r} is not a column of the data: use one of {table.column_names}"
        )
    return DocumentSource([(table, cfg.text_field)])


def load_documents(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train, validation) documents as lists: for small corpora and tests (training reads them in batches)."""
    source = document_source(cfg)
    return tuple(list(source.documents(split, cfg.val_fraction)) for split in ("train", "val"))


def local_source(paths: list[Path], text_field: str) -> DocumentSource:
    """Local files, in the order given; text, JSON and parquet files may be mixed.

    Files of one kind are read by one `datasets` loader call; a file it cannot read
    is named in a one-line ConfigError, with the line or row where the format has one.
    """
    for p in paths:
        if not p.is_file():
            raise ConfigError(
                f"data.paths entry {str(p)!r} is not a file: give existing .txt/.json/.jsonl/.parquet files"
            )
        if DATA_EXTENSIONS.get(p.suffix.lower()) is None:
            raise ConfigError(
                f"data.paths entry {str(p)!r} has an unknown type {p.suffix!r}: "
                f"use {', '.join(sorted(DATA_EXTENSIONS))} files"
            )
        if p.stat().st_size == 0:
            raise ConfigError(f"data.paths entry {str(p)!r} is empty: remove it from data.paths or give it text")
    parts: list[Part] = []
    for kind in dict.fromkeys(DATA_EXTENSIONS[p.suffix.lower()] for p in paths):  # first-seen order
        files = [p for p in paths if DATA_EXTENSIONS[p.suffix.lower()] == kind]
        field = "text" if kind == "text" else text_field
        parts.append((_load_kind(kind, files, field), field))
    return DocumentSource(parts)


def _load_kind(kind: str, files: list[Path], field: str):
    # Deferred: datasets is slow to import and only file and hub sources need it (not the embedded corpus).
    import datasets

    try:
        with _quiet_logger("datasets"):  # it logs the failure before raising; we say it once, in one line
            table = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train")
    except Exception as e:  # datasets/pyarrow raise many kinds for one bad file: find it and say where
        raise ConfigError(_unreadable(kind, files, e)) from None
    if field not in table.column_names:
        raise ConfigError(
            f"data.text_field={field!r} is not a column of {', '.join(map(str, files))}: "
            f"use one of {table.column_names}"
        )
    _check_text(kind, files, field, table)
    return table


def _check_text(kind: str, files: list[Path], field: str, table) -> None:
    """Every text value is a string and every file has some text: a number or null where the text should be
    would be dropped without a word, and a file of whitespace would leave nothing to train on."""
    dtype = getattr(table.features[field], "dtype", None)
    if dtype not in ("string", "large_string") or table.data.column(field).null_count:
        for p in files:
            where = _first_non_string(kind, p, field)
            if where:
                raise ConfigError(f"data.paths entry {str(p)!r} {where}: give every record a string {field!r}")
        raise ConfigError(
            f"data.paths {', '.join(map(str, files))}: data.text_field={field!r} holds {table.features[field]} "
            "values, not strings"
        )
    for p in files:
        if not _has_text(kind, p, field):
            only = "whitespace" if kind == "text" else f"empty or whitespace {field!r} values"
            raise ConfigError(
                f"data.paths entry {str(p)!r} has no usable text (only {only}): "
                "remove it from data.paths or give it text"
            )


def _json_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) of a .json or JSON Lines file: `line N`, or `record N` of a JSON array."""
    with open(path, encoding="utf-8") as f:
        if path.suffix.lower() == ".json" and f.read(4096).lstrip()[:1] == "[":  # one JSON array: read whole
            f.seek(0)
            with contextlib.suppress(ValueError):
                yield from ((f"record {n}", record) for n, record in enumerate(json.load(f), 1))
                return
        f.seek(0)
        for number, line in enumerate(f, 1):  # JSON Lines: a line at a time, as far as the caller reads
            if line.strip():
                with contextlib.suppress(ValueError):
                    yield f"line {number}", json.loads(line)


_JSON_KINDS = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}


def _first_non_string(kind: str, path: Path, field: str) -> str | None:
    if kind == "parquet":
        return _parquet_non_string(path, field)
    if kind != "json":
        return None
    for where, record in _json_records(path):
        value = record.get(field) if isinstance(record, dict) else None
        if isinstance(record, dict) and not isinstance(value, str):
            shown = "null" if value is None else f"{_JSON_KINDS.get(type(value), 'a value')} ({json.dumps(value)[:40]})"
            return f"{where}: {field!r} is {shown}, not text"
    return None


def _parquet_non_string(path: Path, field: str) -> str | None:
    # Deferred: pyarrow (a dependency of datasets) is needed only to check parquet files.
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if field not in pq.read_schema(path).names:
        return None
    column = pq.read_table(path, columns=[field]).column(field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return f"column {field!r} is {column.type}, not text"
    if column.null_count:
        return f"row {pc.index(column.is_null(), True).as_py() + 1}: {field!r} is null, not text"
    return None


def _has_text(kind: str, path: Path, field: str) -> bool:
    """Some non-whitespace text, found by reading the file only as far as the first of it."""
    if kind == "parquet":
        return True  # a column of strings (checked above); parquet files are written by programs, not by hand
    if kind == "json":
        return any(
            isinstance(r, dict) and isinstance(r.get(field), str) and r[field].strip() for _, r in _json_records(path)
        )
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.decode("utf-8", "ignore").strip():
                return True
    return False


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _unreadable(kind: str, files: list[Path], error: Exception) -> str:
    """One line naming the first file (and line) that `kind`'s loader cannot read."""
    for p in files:
        where = _first_bad_line(kind, p)
        if where:
            return f"data.paths entry {str(p)!r} cannot be read as {kind}: {where}"
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
    return f"data.paths {', '.join(map(str, files))} cannot be read as {kind}: {type(cause).__name__}: {detail}"


def _first_bad_line(kind: str, path: Path) -> str | None:
    if kind == "parquet":
        # Deferred: pyarrow (a dependency of datasets) is needed only to check parquet files.
        import pyarrow.parquet as pq

        try:
            pq.read_metadata(path)
        except Exception as e:  # pyarrow's errors for a foreign or truncated file
            return f"not a parquet file ({(str(e).splitlines() or [''])[0][:120]})"
        return None
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return f"line {line} is not UTF-8 text (byte {e.start}): is it a binary file?"
    if kind != "json":
        return None
    if path.suffix.lower() == ".json" and text.lstrip()[:1] in ("[", "{"):
        try:
            json.loads(text)
            return None
        except ValueError:
            pass  # perhaps JSON Lines under a .json name: check line by line
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            return f"line {number} is not JSON ({e.msg})"
        if not isinstance(record, dict):
            return f"line {number} is a JSON {type(record).__name__}, not an object with a text field"
    return None
