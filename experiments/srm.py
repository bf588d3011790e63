"""Sample-ratio mismatch (SRM): chi-square goodness of fit of the arms' sizes to their weights.

:func:`srm_check` tests one experiment, :func:`srm_p_values` a batch of them at once
(simulations), and :func:`srm_power` is the check's chance of detecting a given split error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from data.errors import ConfigError, DataError
from experiments.conventions import check_alpha

__all__ = ["SRM_ALPHA", "SRMResult", "srm_check", "srm_p_values", "srm_power"]

FloatArray = NDArray[np.float64]


SRM_ALPHA = 0.001
"""Significance level of the sample-ratio-mismatch check. Stricter than 0.05 by convention
(Fabijan et al. 2019, "Diagnosing Sample Ratio Mismatch"): SRM is checked on every experiment and
often on every day of it, and a flag invalidates the whole experiment, so false alarms must be rare;
real SRM bugs (lost users, redirect losses) are usually large enough to give tiny p-values."""


@dataclass(frozen=True)
class SRMResult:
    """Chi-square goodness of fit of the arm sizes to the configured split.

    ``observed``: users per arm; ``expected``: users per arm under the configured weights;
    ``mismatch``: ``p_value < alpha``, i.e. the split is broken and the experiment's results
    should not be trusted until the cause is found.
    """

    arms: tuple[str, ...]
    observed: tuple[int, ...]
    expected: tuple[float, ...]
    chi2: float
    p_value: float
    alpha: float

    @property
    def mismatch(self) -> bool:
        return bool(self.p_value < self.alpha)


def srm_check(
    counts: Mapping[str, int] | Sequence[int],
    expected_weights: Mapping[str, float] | Sequence[float],
    *,
    alpha: float = SRM_ALPHA,
) -> SRMResult:
    """Check the observed users per arm against the configured split (sample-ratio mismatch).

    ``counts`` and ``expected_weights`` are either both mappings keyed by arm name (same keys) or
    both sequences in the same arm order; weights are relative. ``alpha`` defaults to the
    conventional strict :data:`SRM_ALPHA` (0.001), see there for why.
    """
    check_alpha(alpha)
    arms, observed, weights = _align_counts(counts, expected_weights)
    if observed.sum() == 0:
        raise DataError("counts are all 0; there is no split to check")
    expected = observed.sum() * weights / weights.sum()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    p_value = float(srm_p_values(observed, weights))
    return SRMResult(
        arms=arms,
        observed=tuple(int(c) for c in observed),
        expected=tuple(float(e) for e in expected),
        chi2=chi2,
        p_value=p_value,
        alpha=alpha,
    )


def srm_p_values(counts: ArrayLike, expected_weights: ArrayLike) -> FloatArray:
    """Chi-square SRM p-values for a batch: ``counts`` ``(..., n_arms)``, weights ``(n_arms,)``.

    Returns ``(...)`` p-values (``chi2`` with ``n_arms - 1`` degrees of freedom).
    """
    observed = np.asarray(counts, dtype=np.float64)
    weights = _weights_vector(expected_weights)
    if observed.shape[-1:] != weights.shape:
        raise DataError(f"counts have {observed.shape[-1:]} arms but weights {weights.shape}")
    expected = observed.sum(axis=-1, keepdims=True) * weights / weights.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2 = ((observed - expected) ** 2 / expected).sum(axis=-1)
    return np.asarray(stats.chi2.sf(chi2, weights.size - 1), dtype=np.float64)


def srm_power(
    n_users: int,
    expected_weights: ArrayLike,
    actual_weights: ArrayLike,
    *,
    alpha: float = SRM_ALPHA,
) -> float:
    """Probability that :func:`srm_check` flags a split that really is ``actual_weights``.

    ``n_users``: users in the experiment (all arms); weights: ``(n_arms,)`` relative weights, the
    configured ones and the ones the broken pipeline really produces. Under the alternative the
    chi-square statistic is approximately non-central chi-square with ``n_arms - 1`` degrees of
    freedom and non-centrality ``n_users * sum((q - p)^2 / p)`` (``p`` expected, ``q`` actual
    shares). Use it to see which losses SRM can catch at your traffic: at 100k users, losing 2 %
    of the treatment arm of a 50/50 test is caught only about half the time at ``alpha = 0.001``.
    """
    check_alpha(alpha)
    expected = _weights_vector(expected_weights)
    actual = _weights_vector(actual_weights)
    if expected.shape != actual.shape:
        raise DataError(f"{expected.size} expected weights but {actual.size} actual weights")
    p, q = expected / expected.sum(), actual / actual.sum()
    noncentrality = n_users * float(((q - p) ** 2 / p).sum())
    dof = p.size - 1
    return float(stats.ncx2.sf(stats.chi2.isf(alpha, dof), dof, noncentrality))


def _align_counts(
    counts: Mapping[str, int] | Sequence[int],
    weights: Mapping[str, float] | Sequence[float],
) -> tuple[tuple[str, ...], FloatArray, FloatArray]:
    if isinstance(counts, Mapping) != isinstance(weights, Mapping):
        raise DataError("counts and expected_weights must both be mappings or both be sequences")
    if isinstance(counts, Mapping) and isinstance(weights, Mapping):
        if set(counts) != set(weights):
            raise DataError(
                f"counts have arms {sorted(counts)} but weights have arms {sorted(weights)}"
            )
        arms = tuple(weights)
        observed = np.array([counts[a] for a in arms], dtype=np.float64)
        weight_vector = _weights_vector([weights[a] for a in arms])
    else:
        observed = np.asarray(counts, dtype=np.float64)
        weight_vector = _weights_vector(weights)
        arms = tuple(str(i) for i in range(observed.size))
        if observed.shape != weight_vector.shape:
            raise DataError(f"{observed.size} counts but {weight_vector.size} expected weights")
    if np.any(observed < 0) or not np.all(np.isfinite(observed)):
        raise DataError(f"counts must be finite and >= 0, got {observed.tolist()}")
    return arms, observed, weight_vector


def _weights_vector(weights: ArrayLike | Mapping[str, float]) -> FloatArray:
    values = np.asarray(
        list(weights.values()) if isinstance(weights, Mapping) else weights, dtype=np.float64
    )
    if values.ndim != 1 or values.size < 2:
        raise ConfigError(f"need weights for at least 2 arms, got {values.tolist()}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ConfigError(f"expected weights must be finite and > 0, got {values.tolist()}")
    return values
