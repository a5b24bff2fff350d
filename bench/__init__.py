"""Benchmarks that print ratios against peers; not part of the tests."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional


def json_path(path: str) -> str:
    """The `type` of every benchmark's --json argument: its folders are made and the file is checked writable
    when the arguments are read, so a path that cannot be written stops the command in one line before the
    benchmark runs, not after it (the results would be lost)."""
    file = Path(path).expanduser()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        if file.is_dir():
            raise IsADirectoryError(21, "is a directory")
        probe = file.with_name(f".{file.name}.probe")  # the file itself is left alone until the results exist
        probe.touch()
        probe.unlink()
    except OSError as e:
        print(
            f"bench: error: --json {path}: cannot write there ({e.strerror or e}): give a writable file path",
            file=sys.stderr,
        )
        sys.exit(2)
    return str(file)


def write_json(path: Optional[str], payload: dict) -> None:
    """Each benchmark's --json FILE: {"results": {name: value}, ...details}, written whole or not at all (a
    temporary file renamed into place); its folders are made; nothing without a path."""
    if path:
        file = Path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, file)


def interleaved_times(steps: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each step's timings (what the step returns) over `repeats` rounds after a warm-up round.

    The steps take turns within every round (the order rotates), so timings a
    ratio compares are taken seconds, not minutes, apart: a shared machine's
    speed drifts over a run, which timing one step's repeats after the
    other's would turn into a ratio.
    """
    names, times = list(steps), {name: [] for name in steps}
    for r in range(repeats + 1):  # round 0 is a warm-up
        for name in names[r % len(names) :] + names[: r % len(names)]:
            elapsed = steps[name]()
            if r:
                times[name].append(elapsed)
    return times
