"""How sure is an offline number? Per-user bootstrap CIs and paired comparisons of two systems.

Offline metrics are means of per-user values (``evaluation.metrics`` returns them as ``(n_users,)``
arrays), and users are the independent units: resampling *users* with replacement (Efron's
nonparametric bootstrap) gives the sampling distribution of the mean without assuming its shape.
Per-user metrics are bounded and skewed (many zeros, a few ones), which is where a bootstrap
beats a normal approximation on small test sets.

* :func:`bootstrap_ci` - percentile CI of the mean of one per-user metric.
* :func:`paired_comparison` - two systems scored on the *same* users: the CI of the mean
  per-user difference (the users' resamples are shared, so between-user variation cancels), and
  a paired test p-value (paired t-test, or the Wilcoxon signed-rank test, via scipy).

``NaN`` marks a user for whom a metric is undefined (no relevant items); such users are left out,
as :func:`evaluation.metrics.mean` does (pairwise for a comparison: a user must be defined for
both systems). Resampling is vectorised, ``(chunk, n_users)`` indices at a time, and driven by
one seeded ``np.random.Generator``: the same seed gives the same interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from data.errors import DataError
from data.validation import fraction, one_of, positive_int

__all__ = [
    "DEFAULT_BLOCK_ELEMENTS",
    "DEFAULT_CONFIDENCE",
    "DEFAULT_N_BOOT",
    "PAIRED_TESTS",
    "BootstrapCI",
    "PairedComparison",
    "bootstrap_ci",
    "bootstrap_means",
    "paired_comparison",
]

FloatArray = NDArray[np.float64]
PairedTest = Literal["t", "wilcoxon"]
PAIRED_TESTS: tuple[str, ...] = get_args(PairedTest)

DEFAULT_N_BOOT = 1000
"""Bootstrap resamples. 1000 puts the Monte-Carlo error of a 95 % percentile bound well below
the sampling error it measures (Efron & Tibshirani 1993, ch. 19), at ~2 s for 100k users."""

DEFAULT_CONFIDENCE = 0.95
"""Two-sided coverage of the intervals: the field's convention."""

DEFAULT_BLOCK_ELEMENTS = 1 << 22
"""Resample indices drawn at once (4M int64 = 32 MiB, plus as much again for the gathered values):
memory stays bounded however many users and resamples there are."""

_RELATIVE_TIE = 1e-12
"""Per-user differences closer than this (relative to the largest) count as all equal: the t-test
divides by their spread, so that case is answered here instead of letting scipy warn."""


@dataclass(frozen=True)
class BootstrapCI:
    """A mean of per-user values and its bootstrap percentile interval.

    mean:      mean over users with a defined (non-NaN) value; ``NaN`` if there are none.
    low, high: the ``confidence`` percentile interval of the resampled means.
    std_error: standard deviation of the resampled means (the bootstrap standard error).
    n_users:   users that entered the mean. n_boot: resamples drawn.
    """

    mean: float
    low: float
    high: float
    std_error: float
    confidence: float
    n_users: int
    n_boot: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class PairedComparison:
    """``candidate`` vs ``reference`` on the same users; differences are ``candidate - reference``.

    reference_mean, candidate_mean: the two means over the users defined for both.
    difference: mean per-user difference (= the difference of those means).
    low, high, std_error: bootstrap percentile CI and standard error of ``difference``.
    test: ``"t"`` (paired t-test) or ``"wilcoxon"`` (signed-rank); statistic, p_value: its result,
        two-sided. ``NaN`` with fewer than two users.
    """

    reference_mean: float
    candidate_mean: float
    difference: float
    low: float
    high: float
    std_error: float
    test: str
    statistic: float
    p_value: float
    confidence: float
    n_users: int
    n_boot: int

    @property
    def significant(self) -> bool:
        """Whether the paired test rejects "no difference" at level ``1 - confidence``."""
        return bool(self.p_value <= 1 - self.confidence)

    def to_dict(self) -> dict[str, float | int | str | bool]:
        return {**asdict(self), "significant": self.significant}


def bootstrap_ci(
    per_user: ArrayLike,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> BootstrapCI:
    """Percentile bootstrap CI of the mean of ``(n_users,)`` per-user values (``NaN`` skipped).

    With no defined user every field but the counts is ``NaN``; with one, the interval is that
    single value (the bootstrap cannot see variance it has no second user to show).
    """
    values = _per_user(per_user, "per_user")
    n_boot, confidence = _check_settings(n_boot, confidence)
    values = values[~np.isnan(values)]
    if values.size == 0:
        nan = math.nan
        return BootstrapCI(nan, nan, nan, nan, confidence, 0, n_boot)
    means = bootstrap_means(values, n_boot, np.random.default_rng(seed), block_elements)
    low, high, std_error = _interval(means, confidence)
    return BootstrapCI(
        float(values.mean()), low, high, std_error, confidence, int(values.size), n_boot
    )


def paired_comparison(
    reference: ArrayLike,
    candidate: ArrayLike,
    *,
    test: PairedTest = "t",
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> PairedComparison:
    """Compare two systems' ``(n_users,)`` per-user values on the same users, row by row.

    The CI resamples users and averages their differences; the p-value is scipy's
    ``ttest_rel(candidate, reference)`` for ``test="t"`` or ``wilcoxon(candidate - reference)``
    (zero differences dropped, scipy's default) for ``test="wilcoxon"``. Where scipy's answer is
    undefined the limit is given instead: ``p = 1`` (statistic ``NaN``) if the systems agree on
    every user; for the t-test, ``p = 0`` (statistic ``+-inf``) if one beats the other by the
    same margin on every user (zero spread, so ``t = d / 0``).
    """
    ref = _per_user(reference, "reference")
    cand = _per_user(candidate, "candidate")
    if ref.shape != cand.shape:
        raise DataError(
            f"reference has {ref.size} users but candidate has {cand.size}; a paired comparison "
            "needs both systems' values for the same users, row by row"
        )
    one_of(test, "test", PAIRED_TESTS)
    n_boot, confidence = _check_settings(n_boot, confidence)
    both = ~(np.isnan(ref) | np.isnan(cand))
    ref, cand = ref[both], cand[both]
    n = int(ref.size)
    nan = math.nan
    if n == 0:
        return PairedComparison(nan, nan, nan, nan, nan, nan, test, nan, nan, confidence, 0, n_boot)
    differences = cand - ref
    means = bootstrap_means(differences, n_boot, np.random.default_rng(seed), block_elements)
    low, high, std_error = _interval(means, confidence)
    statistic, p_value = _paired_test(cand, ref, differences, test)
    return PairedComparison(
        reference_mean=float(ref.mean()),
        candidate_mean=float(cand.mean()),
        difference=float(differences.mean()),
        low=low,
        high=high,
        std_error=std_error,
        test=test,
        statistic=statistic,
        p_value=p_value,
        confidence=confidence,
        n_users=n,
        n_boot=n_boot,
    )


def bootstrap_means(
    values: ArrayLike,
    n_boot: int,
    rng: np.random.Generator,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> FloatArray:
    """``(n_boot,)`` means of ``values`` (``(n,)``, finite) resampled with replacement.

    Resample ``b`` draws ``n`` indices uniformly from ``0..n-1``; chunks of resamples are drawn
    as one ``(chunk, n)`` index matrix, ``block_elements`` indices at a time. The generator's
    stream is consumed in the same order whatever the chunking, so ``block_elements`` bounds
    memory without changing the result.
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if x.ndim != 1 or n == 0:
        raise DataError(f"values must be a non-empty 1-D array, got shape {x.shape}")
    block_elements = positive_int(block_elements, "block_elements")
    means = np.empty(n_boot, dtype=np.float64)
    per_chunk = max(1, block_elements // n)
    for start in range(0, n_boot, per_chunk):
        stop = min(start + per_chunk, n_boot)
        indices = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[indices].mean(axis=1)
    return means


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _interval(means: FloatArray, confidence: float) -> tuple[float, float, float]:
    """(low, high, std_error) of resampled means: percentile bounds and their spread."""
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    std_error = float(means.std(ddof=1)) if means.size > 1 else math.nan
    return float(low), float(high), std_error


def _paired_test(
    candidate: FloatArray, reference: FloatArray, differences: FloatArray, test: PairedTest
) -> tuple[float, float]:
    """(statistic, two-sided p-value) of the paired test; ``NaN`` below two users."""
    if differences.size < 2:
        return math.nan, math.nan
    largest = float(np.abs(differences).max())
    if largest == 0:
        return math.nan, 1.0  # the systems agree on every user: no evidence of a difference
    if test == "wilcoxon":
        result = stats.wilcoxon(differences)
    elif float(np.ptp(differences)) <= _RELATIVE_TIE * largest:
        # Every user moved by the same nonzero amount: t = d / 0, and its limit p = 0 is exact.
        return math.copysign(math.inf, float(differences.mean())), 0.0
    else:
        result = stats.ttest_rel(candidate, reference)
    return float(result.statistic), float(result.pvalue)


def _per_user(values: ArrayLike, name: str) -> FloatArray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise DataError(f"{name} must be 1-D (n_users,), got shape {array.shape}")
    infinite = np.isinf(array)
    if infinite.any():
        position = int(np.flatnonzero(infinite)[0])
        raise DataError(
            f"{name}[{position}] = {array[position]}: per-user values must be finite "
            "(NaN marks an undefined user)"
        )
    return array


def _check_settings(n_boot: int, confidence: float) -> tuple[int, float]:
    n_boot = positive_int(n_boot, "n_boot")
    return n_boot, fraction(confidence, "confidence", low_open=True, high_open=True)
