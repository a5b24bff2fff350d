"""The embedded corpus: English text that ships inside CPython itself.

Two sources, both present on every Python install, so the default job needs no
download: the `pydoc_data` help topics, and the docstrings of the standard
library's modules, read with `ast` from the source files (never imported:
importing every stdlib module has side effects, `antigravity` opens a browser).
Documents come in a fixed order (sorted file paths), so the corpus, and the
train/validation split made from it, are the same on every machine running
the same Python version.

Parsing the whole standard library costs seconds at every start, so the
docstrings are cached beside the token cache, keyed by the Python version and
the name, size and modification time of every file read.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from pydoc_data.topics import topics

from mpoe.train.data.cache_files import write_once

# Folders of the standard library that hold tests, tools or vendored code rather than prose.
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__", "ensurepip", "venv"}
_MIN_DOC_CHARS = 200


def pydoc_topics() -> list[str]:
    return [topics[key].strip() for key in sorted(topics)]


def stdlib_docstrings(root: str | None = None, cache_dir: Path | None = None) -> list[str]:
    """Module, class and function docstrings of at least _MIN_DOC_CHARS characters, per file in path order.

    With a `cache_dir`, the list is read from (or written to) a file there whose key covers every source file.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = _stdlib_sources(root)
    if cache_dir is None:
        return _docstrings_of(files)
    key = hashlib.sha1(json.dumps([sys.version, str(root), _MIN_DOC_CHARS, sorted(_SKIP_DIRS)]).encode())
    for path in files:
        stat = path.stat()
        key.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    cached = Path(cache_dir) / f"stdlib-docstrings-{key.hexdigest()[:16]}.json"
    if cached.exists():
        return json.loads(cached.read_text(encoding="utf-8"))
    docs = _docstrings_of(files)
    write_once(cached, lambda tmp: tmp.write_text(json.dumps(docs), encoding="utf-8"))
    return docs


def _stdlib_sources(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(f for f in filenames if f.endswith(".py")))
    return files


def _docstrings_of(files: list[Path]) -> list[str]:
    docs: list[str] = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc) >= _MIN_DOC_CHARS:
                docs.append(doc.strip())
    return docs


def embedded_documents(part: str = "all", cache_dir: Path | None = None) -> list[str]:
    """`all`, or one source alone (`pydoc_topics`, `docstrings`): two domains for a continued-training shift."""
    if part == "pydoc_topics":
        return pydoc_topics()
    if part == "docstrings":
        return stdlib_docstrings(cache_dir=cache_dir)
    return pydoc_topics() + stdlib_docstrings(cache_dir=cache_dir)


def is_validation(doc: str, val_fraction: float) -> bool:
    """Whether `doc` belongs to the validation split: by a hash of the document alone."""
    bucket = int.from_bytes(hashlib.sha1(doc.encode("utf-8")).digest()[:4], "little") % 10_000
    return bucket < int(val_fraction * 10_000)


def split_fingerprints(docs: Iterable[str], val_fraction: float) -> dict[str, tuple[str, int]]:
    """{"train": (fingerprint, documents), "val": ...} in one pass over the documents, split by `is_validation`.

    A fingerprint is a hash of the split's documents in order: it names the split's caches."""
    hashes = {"train": hashlib.sha1(), "val": hashlib.sha1()}
    counts = {"train": 0, "val": 0}
    for doc in docs:
        split = "val" if is_validation(doc, val_fraction) else "train"
        hashes[split].update(doc.encode("utf-8"))
        hashes[split].update(b"\0")
        counts[split] += 1
    return {split: (hashes[split].hexdigest()[:16], counts[split]) for split in hashes}
