"""The studies' rule for comparing two variants: a paired bootstrap interval and a verdict read from it.

Two variants run on the same seeds (the same data order, router init and mask) and are scored on the
same examples, so a comparison is a paired difference a - b per (seed, example). Its uncertainty has
two sources: which seeds were run and which examples the test set happens to hold. The bootstrap
resamples both (seeds with replacement, and one draw of examples with replacement shared by every
seed of a replicate, since every seed scores the same test set) and takes the 2.5th and 97.5th
percentiles of the resampled mean difference. A verdict says "ahead" or "behind" only where that
95% interval excludes 0. The random generator has a fixed seed: the same inputs give the same
interval, and a report written twice is the same report.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np

# Replicates per chunk: the [chunk, examples] product stays small with large test sets.
_CHUNK = 1000


@dataclass(frozen=True)
class Interval:
    """Mean of a - b over seeds and examples and its 95% bootstrap interval."""

    mean: float
    low: float
    high: float
    n_seeds: int
    n_examples: int

    def text(self, digits: int = 4) -> str:
        """'+0.0123, 95% interval [+0.0040, +0.0200]' (the caller says over what)."""
        return f"{self.mean:+.{digits}f}, 95% interval [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def _as_scores(x, name: str) -> np.ndarray:
    """[seeds, examples] float64; a 1-D array is one value per seed (one column)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{name} has shape {arr.shape}: give a non-empty [seeds, examples] array")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds a non-finite score: drop that seed or example before comparing")
    return arr


def paired_bootstrap(a, b, resamples: int = 10000, seed: int = 0) -> Interval:
    """mean(a - b) and its 95% percentile interval, resampling seeds and examples (see the module doc).

    a, b: [seeds, examples] scores of two variants, row i = the same seed, column j = the same example.
    With one column (one value per run) only seeds are resampled; with one row, only examples.
    """
    a, b = _as_scores(a, "a"), _as_scores(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a has shape {a.shape} and b {b.shape}: pair the same seeds and examples")
    if resamples < 1:
        raise ValueError(f"resamples={resamples} is invalid: give at least 1")
    diff = a - b
    n_seeds, n_examples = diff.shape
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        n = min(_CHUNK, resamples - start)
        # How often each seed / example is drawn: drawing indices with replacement, counted.
        seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n)  # [n, S]
        example_counts = rng.multinomial(n_examples, np.full(n_examples, 1.0 / n_examples), size=n)  # [n, N]
        stats[start : start + n] = ((seed_counts @ diff) * example_counts).sum(1) / (n_seeds * n_examples)
    low, high = np.percentile(stats, [2.5, 97.5])
    return Interval(float(diff.mean()), float(low), float(high), n_seeds, n_examples)


def verdict(interval: Interval, higher_is_better: bool = True) -> str:
    """'ahead' / 'behind' where the interval excludes 0 on the good / bad side, else 'not separated'.

    A single value (one seed, one example) has no spread to judge a difference by: not separated.
    """
    if interval.n_seeds * interval.n_examples < 2:
        return "not separated"
    above, below = interval.low > 0, interval.high < 0
    if not (above or below):
        return "not separated"
    return "ahead" if above == higher_is_better else "behind"


def paper_claim(
    interval_mpoe_vs_switch: Interval,
    params_mpoe: Optional[float],
    params_switch: Optional[float],
    higher_is_better: bool = True,
    measure: str = "test accuracy",
) -> str:
    """One line on the paper's claim "MPOE at least matches Switch with fewer parameters", by `verdict`'s rule.

    The interval is of MPOE - Switch on `measure`.
    """
    side = verdict(interval_mpoe_vs_switch, higher_is_better)
    word = {"ahead": "supported", "behind": "contradicted", "not separated": "inconclusive"}[side]
    fewer = _finite(params_mpoe) and _finite(params_switch) and params_mpoe < params_switch
    if word == "supported" and not fewer:  # ahead, but the claim is about doing so with fewer parameters
        word = "inconclusive"
    where = {
        "ahead": "MPOE is ahead of Switch",
        "behind": "MPOE is behind Switch",
        "not separated": "MPOE and Switch are not separated",
    }[side]
    line = (
        f"Paper's claim (MPOE at least matches Switch with fewer parameters): **{word}**: {where} on {measure}, "
        f"MPOE - Switch = {interval_mpoe_vs_switch.text()} over {_units(interval_mpoe_vs_switch)}"
    )
    return line + "; " + _premise(params_mpoe, params_switch) + "."


def _units(interval: Interval) -> str:
    seeds = f"{interval.n_seeds} seed{'s' if interval.n_seeds != 1 else ''}"
    return seeds if interval.n_examples == 1 else f"{seeds} x {interval.n_examples} examples"


def _premise(params_mpoe: Optional[float], params_switch: Optional[float]) -> str:
    if not (_finite(params_mpoe) and _finite(params_switch)) or params_switch <= 0:
        return "the parameter counts are unknown, so the claim's premise (fewer parameters) is unchecked"
    if params_mpoe < params_switch:
        fewer = 100 * (1 - params_mpoe / params_switch)
        return f"MPOE has fewer parameters ({params_mpoe:,.0f} vs {params_switch:,.0f}, {fewer:.0f}% fewer)"
    return (
        f"but MPOE does not have fewer parameters ({params_mpoe:,.0f} vs {params_switch:,.0f}): "
        "the claim's premise fails here"
    )


def _finite(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def choose_lr(scores: dict[float, float]) -> float:
    """The learning rate with the highest (finite) score; a tie goes to the smaller rate."""
    finite = {lr: s for lr, s in scores.items() if _finite(s)}
    if not finite:
        raise ValueError(f"no finite score among {scores!r}: the learning-rate pilot has nothing to choose from")
    return min(finite, key=lambda lr: (-finite[lr], lr))
