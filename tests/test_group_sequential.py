"""Group-sequential alpha spending: published boundaries, and nominal error rates by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from data.errors import ConfigError, DataError
from experiments.group_sequential import (
    _distinct_looks,
    boundaries,
    correlated_boundaries,
    group_sequential_test,
    look_correlation,
    spent_alpha,
)


def test_one_look_is_the_fixed_horizon_test() -> None:
    assert boundaries([1.0], 0.05)[0] == pytest.approx(1.959964, abs=1e-5)
    assert boundaries([1.0], 0.05, "pocock")[0] == pytest.approx(1.959964, abs=1e-5)


def test_pocock_type_spending_matches_published_boundaries() -> None:
    # Lan-DeMets Pocock-type spending, 5 equally spaced looks, two-sided alpha 0.05
    # (Jennison & Turnbull 2000, ch. 7; gsDesign sfLDPocock): 2.438 2.427 2.410 2.397 2.386.
    found = boundaries(np.arange(1, 6) / 5, 0.05, "pocock")
    np.testing.assert_allclose(found, [2.438, 2.427, 2.410, 2.397, 2.386], atol=2e-3)


def test_obrien_fleming_type_first_look_is_analytic_and_boundaries_fall() -> None:
    found = boundaries(np.arange(1, 6) / 5, 0.05, "obrien_fleming")
    # The first look spends 2 - 2 Phi(z / sqrt(t)): its boundary is z_{alpha/2} / sqrt(t).
    assert found[0] == pytest.approx(stats.norm.isf(0.025) / np.sqrt(0.2), abs=1e-6)
    assert np.all(np.diff(found) < 0)
    assert 1.96 < found[-1] < 2.1  # the last look is close to the fixed-horizon test


def test_spending_reaches_alpha_at_full_information() -> None:
    for kind in ("obrien_fleming", "pocock"):
        spent = spent_alpha([0.0, 0.5, 1.0, 1.5], 0.05, kind)  # type: ignore[arg-type]
        assert spent[0] == 0.0 and spent[2] == pytest.approx(0.05) and spent[3] == spent[2]
        assert 0 < spent[1] < 0.05


@pytest.mark.parametrize("kind", ["obrien_fleming", "pocock"])
def test_brownian_paths_reject_at_the_nominal_rate(kind: str) -> None:
    rng = np.random.default_rng(11)
    looks = np.array([1, 2, 3, 5, 8, 12, 17, 23, 30]) / 30  # unequal spacing
    increments = rng.normal(size=(40_000, looks.size)) * np.sqrt(np.diff(looks, prepend=0.0))
    z = np.cumsum(increments, axis=1) / np.sqrt(looks)
    rate = (np.abs(z) >= boundaries(looks, 0.05, kind)).any(axis=1).mean()  # type: ignore[arg-type]
    assert rate == pytest.approx(0.05, abs=3 * np.sqrt(0.05 * 0.95 / 40_000))


def test_daily_looks_keep_the_false_positive_rate_and_intervals_cover() -> None:
    rng = np.random.default_rng(3)
    days, replicates, effect = 30, 4_000, 0.2
    n = np.arange(1, days + 1) * 50.0  # users per arm seen by each day
    sums = np.cumsum(rng.normal(size=(replicates, days)) * np.sqrt(2 * 50.0), axis=1)
    null = group_sequential_test(sums / n, np.broadcast_to(2 / n, sums.shape))
    assert null.rejected[:, -1].mean() == pytest.approx(0.05, abs=0.011)
    assert np.all(null.rejected[:, 1:] >= null.rejected[:, :-1])  # once rejected, stays so
    shifted = group_sequential_test(sums / n + effect, np.broadcast_to(2 / n, sums.shape))
    covered = (shifted.ci_lower <= effect) & (effect <= shifted.ci_upper) | np.isnan(
        shifted.ci_lower
    )
    assert covered.all(axis=1).mean() >= 0.94  # simultaneous over every look
    assert (shifted.first_rejection >= 0).mean() > 0.99  # a 5-sigma effect is found


def test_looks_without_new_information_are_skipped() -> None:
    finite = np.array([False, True, True, True, True, True])
    fractions = np.array([np.nan, 0.3, 0.305, 0.6, 0.995, 1.0])
    # 0.305 adds < 1 % over 0.3; the last look displaces 0.995, too close before it.
    assert _distinct_looks(fractions, finite).tolist() == [False, True, False, True, False, True]


def test_bad_inputs_are_named() -> None:
    with pytest.raises(DataError, match="increase strictly"):
        boundaries([0.5, 0.4])
    with pytest.raises(ConfigError, match="alpha"):
        boundaries([1.0], alpha=1.5)
    with pytest.raises(ConfigError, match="spending function"):
        boundaries([1.0], kind="linear")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="looks axis"):
        group_sequential_test([0.1, 0.2], [0.1])
    with pytest.raises(DataError, match="finite positive variance"):
        group_sequential_test([0.1], [np.nan])


def canonical_correlation(fractions: np.ndarray, power: float = 0.5) -> np.ndarray:
    """corr(Z_j, Z_k) = (t_min / t_max) ** power; 0.5 is independent increments."""
    return (
        np.minimum.outer(fractions, fractions) / np.maximum.outer(fractions, fractions)
    ) ** power


def null_crossing_rate(critical: np.ndarray, correlation: np.ndarray, seed: int) -> float:
    paths = np.random.default_rng(seed).standard_normal((400_000, critical.size))
    z = paths @ np.linalg.cholesky(correlation).T
    return float((np.abs(z) >= critical).any(axis=1).mean())


def test_correlated_boundaries_match_the_canonical_ones_for_independent_increments() -> None:
    fractions = np.linspace(0.1, 1.0, 10)
    found = correlated_boundaries(fractions, canonical_correlation(fractions))
    np.testing.assert_allclose(found[2:], boundaries(fractions)[2:], atol=0.03)


def test_correlated_boundaries_hold_alpha_where_the_canonical_ones_do_not() -> None:
    """Looks less correlated than independent increments (per-user values that change): the
    canonical boundaries reject a true null too often; boundaries from the correlation do not
    (checked on fresh null paths, not those the boundaries were solved on)."""
    fractions = np.arange(1, 31) / 30
    correlation = canonical_correlation(fractions, power=1.0)
    canonical = null_crossing_rate(boundaries(fractions), correlation, seed=11)
    corrected = null_crossing_rate(
        correlated_boundaries(fractions, correlation), correlation, seed=11
    )
    assert canonical > 0.058
    assert corrected == pytest.approx(0.05, abs=0.002)


def test_look_correlation_known_answers() -> None:
    rng = np.random.default_rng(5)
    users, looks = 40_000, 6
    # Fixed values, users joining over the looks: the canonical sqrt(n_s / n_t).
    joins = rng.integers(0, looks, users)
    present = np.arange(looks)[None, :] >= joins[:, None]
    fixed = np.broadcast_to(rng.normal(size=(users, 1)), (users, looks))
    counts = present.sum(axis=0)
    expected = np.sqrt(np.minimum.outer(counts, counts) / np.maximum.outer(counts, counts))
    np.testing.assert_allclose(look_correlation((fixed, present)), expected, atol=0.02)
    # Everyone present, values summing independent increments: also canonical, sqrt(s / t).
    sums = rng.normal(size=(users, looks)).cumsum(axis=1)
    everyone = np.ones((users, looks), dtype=bool)
    steps = np.arange(1, looks + 1)
    np.testing.assert_allclose(
        look_correlation((sums, everyone)), canonical_correlation(steps), atol=0.02
    )
    # Two groups add their covariances: the same population twice gives the same correlation.
    np.testing.assert_allclose(
        look_correlation((sums, everyone), (sums, everyone)), look_correlation((sums, everyone))
    )


def test_an_estimated_correlation_that_is_not_positive_definite_still_gives_boundaries() -> None:
    fractions = np.array([0.3, 0.6, 1.0])
    inconsistent = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.9], [0.1, 0.9, 1.0]])
    assert np.linalg.eigvalsh(inconsistent).min() < 0
    found = correlated_boundaries(fractions, inconsistent)
    assert np.all(np.isfinite(found[1:])) and np.all(found > 1.9)
