"""Statistics for comparing settings on a benchmark (pure functions on arrays).

- :func:`bootstrap_interval`: percentile bootstrap interval of a mean over images
  (CorLoc is the mean of per-image hits);
- :func:`paired_bootstrap`: the same for the difference of two settings measured on the
  same images, resampling images (pairs stay together);
- :func:`mcnemar`: McNemar's exact test on the images where the two settings disagree
  (a two-sided binomial test of the discordant pairs).

Resampling uses a seeded generator, so a table is reproducible run to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

__all__ = ["Interval", "PairedComparison", "bootstrap_interval", "mcnemar", "paired_bootstrap"]

DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided bootstrap interval."""

    value: float
    low: float
    high: float
    level: float = 0.95

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high


def _resample_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    idx = rng.integers(0, n, size=(resamples, n))
    return values[idx].mean(axis=1)


def bootstrap_interval(
    values: np.ndarray | list[float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """The mean of ``values`` with a percentile bootstrap interval (images resampled
    with replacement ``resamples`` times).

    Raises:
        ValueError: no value, resamples < 1, or a level outside (0, 1).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError("values must be a non-empty 1-D array")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    means = _resample_means(v, resamples, seed)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return Interval(float(v.mean()), float(lo), float(hi), level)


@dataclass(frozen=True)
class PairedComparison:
    """``a`` minus ``b`` on the same images."""

    difference: Interval
    """Mean difference and its paired bootstrap interval."""
    a_only: int
    """Images ``a`` gets right and ``b`` wrong."""
    b_only: int
    p_value: float
    """McNemar's exact two-sided p-value."""


def paired_bootstrap(
    a: np.ndarray | list[float],
    b: np.ndarray | list[float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """Compare two settings scored on the same images (hits as 0/1, or any scores).

    Raises:
        ValueError: ``a`` and ``b`` differ in length, or are empty.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"a and b must be 1-D of the same length, got {x.shape} and {y.shape}")
    diff = bootstrap_interval(x - y, resamples=resamples, level=level, seed=seed)
    a_only = int(((x > 0.5) & (y <= 0.5)).sum())
    b_only = int(((y > 0.5) & (x <= 0.5)).sum())
    return PairedComparison(diff, a_only, b_only, mcnemar(a_only, b_only))


def mcnemar(a_only: int, b_only: int) -> float:
    """McNemar's exact test: two-sided p-value of ``a_only`` successes among the
    ``a_only + b_only`` discordant images under a fair coin (1.0 when there are none)."""
    n = int(a_only) + int(b_only)
    if n == 0:
        return 1.0
    return float(binomtest(int(a_only), n, 0.5).pvalue)
