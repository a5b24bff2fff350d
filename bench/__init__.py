"""Benchmarks that print ratios against peers; not part of the tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Optional


def write_json(path: Optional[str], payload: dict) -> None:
    """Each benchmark's --json FILE: {"results": {name: value}, ...details}; nothing without a path."""
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)


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
