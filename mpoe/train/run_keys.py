"""Which config keys make two runs "the same configuration": read by `mpoe-report` (grouping seeds) and by
`trainer.resume=auto` (finding the run to continue)."""

from __future__ import annotations

from typing import Any

# Keys that do not change what a run trains (seeds are the repeats a report averages over).
IGNORED_KEYS = (
    "trainer.seed",
    "trainer.resume",
    "trainer.save_every",
    "trainer.keep_last",
    "trainer.log_every",
    "trainer.max_bad_steps",
    "logging.",
    "data.cache_dir",
)


def flatten(tree: Any, prefix: str = "") -> dict:
    """A nested config as {"a.b.c": value}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def is_ignored(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in IGNORED_KEYS)
