"""Power analysis of an A/B test: two-sided, equal arms, normal approximation.

:func:`required_sample_size` (users per arm for a minimum detectable effect),
:func:`minimum_detectable_effect` (the effect a given size detects) and :func:`achieved_power`.
"""

from __future__ import annotations

import math

from scipy import stats

from data.errors import ConfigError, DataError
from experiments.conventions import DEFAULT_ALPHA, check_alpha, check_arm_size

__all__ = [
    "DEFAULT_POWER",
    "achieved_power",
    "bernoulli_variance",
    "minimum_detectable_effect",
    "required_sample_size",
]


DEFAULT_POWER = 0.8
"""Target power of the power analysis: the convention (a 20 % chance of missing a true MDE)."""


def bernoulli_variance(rate: float) -> float:
    """Per-user variance ``p (1 - p)`` of a 0/1 metric (e.g. "converted") with baseline ``rate``."""
    if not 0 <= rate <= 1:
        raise DataError(f"rate must be in [0, 1], got {rate}")
    return rate * (1 - rate)


def required_sample_size(
    mde: float,
    variance: float,
    *,
    alpha: float = DEFAULT_ALPHA,
    power: float = DEFAULT_POWER,
) -> int:
    """Users needed *per arm* to detect an absolute effect ``mde`` with the given power.

    ``variance``: per-user variance of the metric (assumed equal in both arms).
    ``n = 2 variance (z_{1 - alpha/2} + z_{power})^2 / mde^2``, rounded up. For a relative MDE
    (a lift), pass ``mde = lift * baseline_mean``.
    """
    check_alpha(alpha)
    _check_power(power)
    if not (math.isfinite(mde) and mde != 0):
        raise DataError(f"mde must be finite and non-zero, got {mde}")
    _check_variance(variance)
    z_sum = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return math.ceil(2 * variance * z_sum**2 / mde**2)


def minimum_detectable_effect(
    n_per_arm: int,
    variance: float,
    *,
    alpha: float = DEFAULT_ALPHA,
    power: float = DEFAULT_POWER,
) -> float:
    """Smallest absolute effect detected with probability ``power`` given ``n_per_arm`` users.

    The inverse of :func:`required_sample_size`; divide by the baseline mean for a relative MDE.
    """
    check_alpha(alpha)
    _check_power(power)
    _check_variance(variance)
    check_arm_size(n_per_arm, "n_per_arm")
    z_sum = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return float(z_sum * math.sqrt(2 * variance / n_per_arm))


def achieved_power(
    n_per_arm: int, effect: float, variance: float, *, alpha: float = DEFAULT_ALPHA
) -> float:
    """Probability that a two-sided z-test at ``alpha`` rejects when the true effect is ``effect``.

    Counts both rejection tails, so ``achieved_power(n, 0, v) == alpha``.
    """
    check_alpha(alpha)
    _check_variance(variance)
    check_arm_size(n_per_arm, "n_per_arm")
    shift = effect / math.sqrt(2 * variance / n_per_arm)
    z = stats.norm.ppf(1 - alpha / 2)
    return float(stats.norm.sf(z - shift) + stats.norm.cdf(-z - shift))


def _check_power(power: float) -> None:
    if not 0 < power < 1:
        raise ConfigError(f"power must be in (0, 1), got {power}")


def _check_variance(variance: float) -> None:
    if not (math.isfinite(variance) and variance > 0):
        raise DataError(f"variance must be finite and > 0, got {variance}")
