"""The studies' comparison rule: paired bootstrap over (seed, example), verdicts, the paper-claim line, lr choice."""

from __future__ import annotations

import numpy as np
import pytest

from mpoe.study.stats import Interval, choose_lr, paired_bootstrap, paper_claim, verdict


def _bernoulli(p: float, shape, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) < p).astype(float)


def test_a_large_effect_is_ahead_or_behind():
    good, bad = _bernoulli(0.9, (3, 200), 1), _bernoulli(0.3, (3, 200), 2)
    forward = paired_bootstrap(good, bad, resamples=2000)
    assert forward.mean == pytest.approx(good.mean() - bad.mean())
    assert 0 < forward.low < forward.mean < forward.high
    assert (forward.n_seeds, forward.n_examples) == (3, 200)
    assert verdict(forward) == "ahead"
    assert verdict(paired_bootstrap(bad, good, resamples=2000)) == "behind"
    # a loss: lower is better, so the higher one is behind
    assert verdict(forward, higher_is_better=False) == "behind"


def test_identical_variants_give_exactly_zero():
    a = _bernoulli(0.6, (4, 50), 3)
    interval = paired_bootstrap(a, a.copy(), resamples=500)
    assert (interval.mean, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert verdict(interval) == "not separated" and verdict(interval, higher_is_better=False) == "not separated"


def test_two_seeds_only_hand_computed():
    # per-seed differences 0 and 1: a replicate's mean is 0 (1/4), 0.5 (1/2) or 1 (1/4), so the 2.5th and 97.5th
    # percentiles are exactly 0 and 1
    interval = paired_bootstrap([1.0, 3.0], [1.0, 2.0], resamples=4000)
    assert interval == Interval(mean=0.5, low=0.0, high=1.0, n_seeds=2, n_examples=1)
    assert verdict(interval) == "not separated"  # the interval touches 0
    # one value per run as a column is the same as a 1-D array
    assert paired_bootstrap([[1.0], [3.0]], [[1.0], [2.0]], resamples=4000) == interval


def test_every_seed_scores_the_same_example_draw():
    # four seeds that scored the test set alike (every row [0, 1]): seeds add no spread, and one shared draw of
    # the two examples gives 0, 0.5 or 1 with 1/4, 1/2, 1/4, so the interval is [0, 1]; independent draws per
    # seed would average four draws and give 0 with 1/256 only (low > 0)
    d = np.tile([0.0, 1.0], (4, 1))
    interval = paired_bootstrap(d, np.zeros_like(d), resamples=4000)
    assert (interval.low, interval.high) == (0.0, 1.0)


def test_a_single_value_is_never_separated():
    interval = paired_bootstrap([[2.0]], [[1.0]], resamples=100)
    assert (interval.low, interval.high) == (1.0, 1.0)
    assert verdict(interval) == "not separated"


def test_the_interval_covers_the_true_difference_in_most_simulated_studies():
    true_diff = 0.05
    rng = np.random.default_rng(123)
    covered = 0
    for _ in range(100):
        seeds, examples = 5, 100
        example_effect = rng.normal(true_diff, 1.0, size=examples)  # which examples the test set holds
        seed_effect = rng.normal(0.0, 0.1, size=(seeds, 1))  # which seeds were run
        diff = example_effect + seed_effect + rng.normal(0.0, 0.3, size=(seeds, examples))
        interval = paired_bootstrap(diff, np.zeros_like(diff), resamples=200, seed=int(rng.integers(1 << 30)))
        covered += interval.low <= true_diff <= interval.high
    assert covered >= 90


def test_the_same_inputs_give_the_same_interval():
    a, b = _bernoulli(0.7, (3, 80), 4), _bernoulli(0.6, (3, 80), 5)
    assert paired_bootstrap(a, b, resamples=700) == paired_bootstrap(a, b, resamples=700)
    assert paired_bootstrap(a, b, resamples=700, seed=1) != paired_bootstrap(a, b, resamples=700, seed=2)


@pytest.mark.parametrize(
    "a, b, message",
    [
        (np.zeros((2, 3)), np.zeros((3, 3)), "pair the same seeds and examples"),
        (np.array([[1.0, np.nan]]), np.zeros((1, 2)), "non-finite"),
        (np.zeros((0, 3)), np.zeros((0, 3)), "non-empty"),
    ],
)
def test_bad_inputs_say_what_is_wrong(a, b, message):
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(a, b, resamples=10)


def _interval(low, high):
    return Interval(mean=(low + high) / 2, low=low, high=high, n_seeds=3, n_examples=100)


def test_paper_claim_lines():
    supported = paper_claim(_interval(0.01, 0.03), 2_969_408, 4_392_192)
    assert "**supported**: MPOE is ahead of Switch on test accuracy" in supported
    assert "[+0.0100, +0.0300] over 3 seeds x 100 examples" in supported
    assert "MPOE has fewer parameters (2,969,408 vs 4,392,192, 32% fewer)" in supported
    contradicted = paper_claim(_interval(-0.03, -0.01), 2_969_408, 4_392_192)
    assert "**contradicted**: MPOE is behind Switch" in contradicted
    inconclusive = paper_claim(_interval(-0.01, 0.02), 2_969_408, 4_392_192)
    assert "**inconclusive**: MPOE and Switch are not separated" in inconclusive
    assert "[-0.0100, +0.0200]" in inconclusive
    # a loss: MPOE's higher loss is behind
    loss = paper_claim(_interval(0.01, 0.03), 2, 3, higher_is_better=False, measure="validation loss")
    assert "**contradicted**: MPOE is behind Switch on validation loss" in loss
    premise = paper_claim(_interval(0.01, 0.03), 5_000_000, 4_392_192)
    assert "**inconclusive**: MPOE is ahead of Switch" in premise  # ahead, but not with fewer parameters
    assert "MPOE does not have fewer parameters (5,000,000 vs 4,392,192): the claim's premise fails" in premise
    assert "unchecked" in paper_claim(_interval(0.01, 0.03), None, 4_392_192)
    assert "\n" not in supported + contradicted + inconclusive + premise


def test_choose_lr_takes_the_best_score_and_the_smaller_rate_on_a_tie():
    assert choose_lr({3e-4: 0.70, 1e-3: 0.80}) == 1e-3
    assert choose_lr({1e-3: 0.80, 3e-4: 0.80}) == 3e-4
    assert choose_lr({1e-3: 0.80, 3e-4: 0.80, 1e-4: 0.79}) == 3e-4
    assert choose_lr({3e-4: float("nan"), 1e-3: 0.5}) == 1e-3
    with pytest.raises(ValueError, match="learning-rate pilot"):
        choose_lr({})
