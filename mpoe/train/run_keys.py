"""Which config keys make two runs "the same": two identities, each with its own list of keys it leaves out.

- Resume identity (`trainer.resume=auto` finding the run to continue): what the run trains. A run continued
  under another seed would take the other seed's batches after its own RNG state, so the seed counts; how
  often the run is measured, logged or saved does not, nor `trainer.max_steps` (a run is continued past its end).
- Report grouping (`mpoe-report`'s rows): what the run trains and how it is measured (runs evaluated on other
  validation sets or at other steps are not one row), minus the seed (a row averages over seeds).
"""

from __future__ import annotations

from typing import Any

# How a run is operated: kept, logged, resumed, where it caches. Neither identity counts these.
_OPERATION = (
    "trainer.resume",
    "trainer.save_every",
    "trainer.keep_last",
    "trainer.log_every",
    "trainer.max_bad_steps",
    "trainer.dry_run",
    "logging.",
    "data.cache_dir",
)
# How a run is measured: its validation set and how often it is evaluated.
_MEASUREMENT = ("trainer.eval_every", "trainer.eval_batches", "trainer.eval_sequences")

NOT_RESUME_IDENTITY = (*_OPERATION, *_MEASUREMENT, "trainer.max_steps")
NOT_REPORT_GROUPING = (*_OPERATION, "trainer.seed")


def flatten(tree: Any, prefix: str = "") -> dict:
    """A nested config as {"a.b.c": value}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def _listed(key: str, keys: tuple[str, ...]) -> bool:
    """`key` is one of `keys`, or below one that ends with '.' (a whole section)."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys)


def in_resume_identity(key: str) -> bool:
    return not _listed(key, NOT_RESUME_IDENTITY)


def in_report_grouping(key: str) -> bool:
    return not _listed(key, NOT_REPORT_GROUPING)
