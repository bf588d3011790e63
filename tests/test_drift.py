"""Tests for experiments.drift: PSI and KS known answers, and the monitor's alerts and delays."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from data.errors import ConfigError, DataError, NotFittedError
from experiments.drift import (
    DriftConfig,
    DriftMonitor,
    bin_proportions,
    detection_delay,
    ks_test,
    psi,
    psi_from_proportions,
    quantile_bin_edges,
)

PROPERTY = settings(max_examples=60, deadline=None)
finite_samples = arrays(
    np.float64,
    st.integers(1, 200),
    elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------
# PSI
# --------------------------------------------------------------------------------------------


def test_psi_hand_computed_from_proportions() -> None:
    # sum (q - p) ln(q / p) for p = 1/4 each, q = (.1, .2, .3, .4):
    # -.15 ln .4 - .05 ln .8 + .05 ln 1.2 + .15 ln 1.6 = 0.228217...
    value = psi_from_proportions([0.25] * 4, [0.1, 0.2, 0.3, 0.4])
    assert value == pytest.approx(0.2282174, abs=1e-7)
    assert psi_from_proportions([0.1, 0.2, 0.3, 0.4], [0.25] * 4) == pytest.approx(value)


def test_identical_samples_give_zero_and_a_shift_gives_an_alert() -> None:
    reference = rng(1).normal(size=5000)
    assert psi(reference, reference) == 0.0
    assert psi(reference, rng(2).normal(size=5000)) < 0.02
    assert psi(reference, reference + 1.0) > 0.2  # a one-sd shift: about 0.9


def test_psi_of_a_normal_shift_matches_the_analytic_value() -> None:
    # Reference deciles z_k of N(0, 1); a N(0.5, 1) window puts Phi(z_k - 0.5) - Phi(z_{k-1} - 0.5)
    # in bin k, which gives PSI = 0.23775 (computed from the normal CDF).
    g = rng(3)
    value = psi(g.normal(size=200_000), g.normal(0.5, 1.0, size=200_000))
    assert value == pytest.approx(0.23775, abs=0.01)


def test_null_psi_has_the_expected_small_sample_bias() -> None:
    # With no drift, PSI ~ (n_bins - 1)(1/n_ref + 1/n_window) (chi-square approximation): the
    # reason for DriftConfig.min_window_size.
    g = rng(4)
    reference = g.normal(size=5000)
    windows = g.normal(size=(300, 1000))
    values = np.array([psi(reference, w) for w in windows])
    assert values.mean() == pytest.approx(9 * (1 / 5000 + 1 / 1000), rel=0.15)


def test_quantile_edges_give_equal_bins_and_merge_ties() -> None:
    reference = np.arange(1000, dtype=np.float64)
    edges = quantile_bin_edges(reference, 10)
    np.testing.assert_array_equal(edges, np.arange(100, 1000, 100) - 1)
    np.testing.assert_allclose(bin_proportions(reference, edges, 0.0), 0.1)
    # 60 % zeros: the lower six deciles collapse into one bin holding exactly the zeros.
    tied = np.concatenate([np.zeros(600), np.arange(1, 401, dtype=np.float64)])
    tied_edges = quantile_bin_edges(tied, 10)
    np.testing.assert_array_equal(tied_edges, [0, 100, 200, 300])
    np.testing.assert_allclose(bin_proportions(tied, tied_edges, 0.0), [0.6, 0.1, 0.1, 0.1, 0.1])
    # The same at the top: 60 % of the mass on the maximum.
    top = quantile_bin_edges(-tied, 10)
    np.testing.assert_allclose(bin_proportions(-tied, top, 0.0), [0.1, 0.1, 0.1, 0.1, 0.6])


@PROPERTY
@given(finite_samples, finite_samples, st.integers(2, 20))
def test_psi_invariants(reference: np.ndarray, current: np.ndarray, n_bins: int) -> None:
    edges = quantile_bin_edges(reference, n_bins)
    assert edges.size <= n_bins - 1 and np.all(np.diff(edges) > 0)
    # Every reference bin holds at least one reference value.
    assert np.all(np.bincount(np.searchsorted(edges, reference, side="left")) > 0)
    expected = bin_proportions(reference, edges, 1e-4)
    actual = bin_proportions(current, edges, 1e-4)
    assert expected.sum() == pytest.approx(1.0) and actual.sum() == pytest.approx(1.0)
    value = psi(reference, current, n_bins=n_bins)
    assert value >= 0 and math.isfinite(value)
    assert psi(reference, reference, n_bins=n_bins) == 0.0


def test_epsilon_keeps_an_empty_bin_finite() -> None:
    reference = np.arange(100, dtype=np.float64)
    current = np.full(50, 1000.0)  # everything beyond the reference's range: one bin
    value = psi(reference, current, epsilon=1e-4)
    assert math.isfinite(value) and value > 2
    with pytest.raises(DataError, match="> 0"):
        psi_from_proportions([0.5, 0.5], [1.0, 0.0])


# --------------------------------------------------------------------------------------------
# KS
# --------------------------------------------------------------------------------------------


def test_ks_known_answers() -> None:
    disjoint = ks_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert disjoint.statistic == 1.0
    same = ks_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same.statistic == 0.0 and same.p_value == 1.0

    reference, current = [1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0]
    result = ks_test(reference, current)
    # Hand: at x = 2, F_ref = 1/2 and F_cur = 0; nothing is further apart.
    assert result.statistic == 0.5
    # Exact permutation p-value: the share of the 70 splits of the 8 values into 4 + 4 whose
    # statistic is at least 0.5.
    pooled = np.array(reference + current)
    grid = np.sort(pooled)

    def statistic(a: np.ndarray, b: np.ndarray) -> float:
        f_a = np.searchsorted(np.sort(a), grid, side="right") / a.size
        f_b = np.searchsorted(np.sort(b), grid, side="right") / b.size
        return float(np.abs(f_a - f_b).max())

    splits = list(itertools.combinations(range(8), 4))
    extreme = sum(
        statistic(pooled[list(s)], np.delete(pooled, list(s))) >= 0.5 - 1e-12 for s in splits
    )
    assert result.p_value == pytest.approx(extreme / len(splits))


def test_ks_agrees_with_scipy_on_large_samples() -> None:
    g = rng(5)
    a, b = g.normal(size=3000), g.normal(0.1, 1.0, size=2000)
    expected = stats.ks_2samp(a, b)
    result = ks_test(a, b)
    assert (result.statistic, result.p_value) == pytest.approx(
        (expected.statistic, expected.pvalue)
    )


# --------------------------------------------------------------------------------------------
# Monitor and detection delay
# --------------------------------------------------------------------------------------------


def windows_with_shift(
    seed: int, n_windows: int, drift_at: int, shift: float, size: int = 1000
) -> list[tuple[int, np.ndarray]]:
    """Daily windows of N(0, 1) that become N(shift, 1) from day ``drift_at`` on."""
    g = rng(seed)
    return [
        (day, g.normal(shift if day >= drift_at else 0.0, 1.0, size)) for day in range(n_windows)
    ]


def test_monitor_is_quiet_without_drift() -> None:
    monitor = DriftMonitor().fit(rng(6).normal(size=20_000))
    report = monitor.evaluate(windows_with_shift(7, 30, drift_at=30, shift=0.0))
    assert report.first_alert_time is None
    assert report.windows.height == 30
    assert np.all(report.windows["psi"].to_numpy() < 0.05)
    delay = detection_delay(report, drift_time=30)
    assert delay.delay is None and delay.false_alarms == 0


def test_monitor_alerts_on_the_drift_day() -> None:
    monitor = DriftMonitor().fit(rng(8).normal(size=20_000))
    report = monitor.evaluate(windows_with_shift(9, 20, drift_at=12, shift=0.6))
    assert report.first_alert_time == 12
    frame = report.windows
    assert frame.columns == [
        "time",
        "n",
        "psi",
        "ks_statistic",
        "ks_p_value",
        "psi_alert",
        "ks_alert",
        "enough_data",
        "alert",
    ]
    assert frame["psi_alert"].to_list() == [False] * 12 + [True] * 8
    delay = detection_delay(report, drift_time=12)
    assert (delay.first_alert_time, delay.delay, delay.false_alarms) == (12, 0, 0)


def test_gradual_drift_is_detected_with_a_delay() -> None:
    # The mean moves 0.05 sd per day from day 5: PSI passes 0.2 once the shift nears 0.5 sd
    # (measured: day 15, delay 10), while KS (p < 0.001 on 1000 values) fires at 0.15 sd (delay 3).
    g = rng(10)
    windows = [(day, g.normal(max(0, day - 5) * 0.05, 1.0, 1000)) for day in range(30)]
    psi_only = DriftMonitor(DriftConfig(ks_p_value_threshold=None)).fit(g.normal(size=20_000))
    with_ks = DriftMonitor().fit(psi_only.reference_)
    psi_delay = detection_delay(psi_only.evaluate(windows), drift_time=5)
    ks_delay = detection_delay(with_ks.evaluate(windows), drift_time=5)
    assert psi_delay.delay is not None and 6 <= psi_delay.delay <= 12
    assert ks_delay.delay is not None and ks_delay.delay < psi_delay.delay


def test_alert_before_the_drift_counts_as_a_false_alarm() -> None:
    monitor = DriftMonitor().fit(rng(11).normal(size=20_000))
    report = monitor.evaluate(windows_with_shift(12, 10, drift_at=3, shift=1.0))
    delay = detection_delay(report, drift_time=6)  # pretend the drift was logged late
    assert delay.false_alarms == 3 and delay.delay == 0


def test_small_windows_are_reported_but_never_alert() -> None:
    monitor = DriftMonitor(DriftConfig(min_window_size=200)).fit(rng(13).normal(size=5000))
    check = monitor.check(rng(14).normal(3.0, 1.0, 50), time=1)
    assert check.psi > 0.2 and not check.enough_data and not check.alert


def test_monitor_and_config_errors() -> None:
    with pytest.raises(NotFittedError):
        DriftMonitor().check([1.0, 2.0])
    monitor = DriftMonitor().fit([1.0, 2.0, 3.0])
    with pytest.raises(DataError, match="non-finite"):
        monitor.check([1.0, math.nan])
    with pytest.raises(DataError, match="no windows"):
        monitor.evaluate([])
    with pytest.raises(ConfigError, match="n_bins"):
        DriftConfig(n_bins=1)
    with pytest.raises(ConfigError, match="ks_p_value_threshold"):
        DriftConfig(ks_p_value_threshold=1.5)
