"""Statistics of the calibration harness (discover.stats) on inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from discover.stats import bootstrap_interval, mcnemar, paired_bootstrap


def test_bootstrap_interval_of_a_known_corloc():
    hits = np.array([1] * 30 + [0] * 20)
    iv = bootstrap_interval(hits, resamples=2000, seed=1)
    assert iv.value == pytest.approx(0.6)
    # the normal approximation of a binomial proportion: 0.6 +- 1.96 * sqrt(0.24 / 50)
    half = 1.96 * np.sqrt(0.6 * 0.4 / 50)
    assert iv.low == pytest.approx(0.6 - half, abs=0.03)
    assert iv.high == pytest.approx(0.6 + half, abs=0.03)
    assert bootstrap_interval(hits, seed=1) == bootstrap_interval(hits, seed=1)  # seeded


def test_bootstrap_intervals_cover_the_truth_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = 0
    trials = 200
    for t in range(trials):
        hits = rng.random(120) < 0.55
        iv = bootstrap_interval(hits, resamples=1000, seed=t)
        covered += iv.low <= 0.55 <= iv.high
    # 95% nominal; the percentile bootstrap of a proportion runs a little low at n=120.
    # Binomial(200, 0.95) stays within [181, 198] with probability > 0.999.
    assert 181 <= covered <= 198


def test_paired_comparison_and_mcnemar():
    a = np.array([1, 1, 1, 1, 0, 1, 0, 1, 1, 1])
    b = np.array([0, 0, 1, 1, 0, 1, 0, 0, 1, 0])
    c = paired_bootstrap(a, b, seed=0)
    assert (c.a_only, c.b_only) == (4, 0)
    assert c.difference.value == pytest.approx(0.4)
    assert c.difference.low > 0  # a is better on these pairs, every resample agrees often
    assert c.p_value == pytest.approx(binomtest(4, 4, 0.5).pvalue) == pytest.approx(0.125)
    same = paired_bootstrap(a, a)
    assert (same.difference.low, same.difference.high, same.p_value) == (0.0, 0.0, 1.0)
    assert mcnemar(0, 0) == 1.0
    assert mcnemar(10, 2) == pytest.approx(binomtest(10, 12, 0.5).pvalue)
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:-1])
    with pytest.raises(ValueError):
        bootstrap_interval([])
