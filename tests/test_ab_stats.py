"""Tests for the A/B statistics (experiments.estimators, srm, power, always_valid,
multiple_testing, guardrails): known answers, scipy agreement and simulated error rates.

Every simulation draws all replicates at once as ``(replicates, users)`` matrices from a fixed
seed, so the rates asserted below are deterministic; the bounds still leave Monte-Carlo slack so
they would hold for other seeds too.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from data.errors import ConfigError, DataError
from experiments.always_valid import (
    SequentialConfig,
    always_valid_inference,
    peek_sizes,
    sequential_test,
)
from experiments.estimators import (
    ArmEstimate,
    aggregate_per_user,
    compare,
    cuped_adjust,
    cuped_test,
    effect_by_exposure_day,
    mean_by_arm,
    mean_estimate,
    ratio_by_arm,
    ratio_estimate,
    ratio_test,
    welch_p_values,
    welch_test,
)
from experiments.guardrails import Guardrail, evaluate_guardrails
from experiments.multiple_testing import benjamini_hochberg, holm
from experiments.power import (
    achieved_power,
    bernoulli_variance,
    minimum_detectable_effect,
    required_sample_size,
)
from experiments.srm import srm_check, srm_p_values, srm_power

PROPERTY = settings(max_examples=60, deadline=None)
REPLICATES = 2000


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------
# Welch: known answers against scipy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_c", "n_t", "scale_c", "scale_t"), [(300, 250, 1.0, 1.1), (40, 400, 1.0, 3.0), (5, 7, 2, 1)]
)
def test_welch_matches_scipy(n_c: int, n_t: int, scale_c: float, scale_t: float) -> None:
    g = rng(n_c + n_t)
    control, treatment = g.exponential(scale_c, n_c), g.exponential(scale_t, n_t)
    ours = welch_test(control, treatment, alpha=0.1)
    ref = stats.ttest_ind(treatment, control, equal_var=False)
    ref_ci = ref.confidence_interval(confidence_level=0.9)
    assert ours.difference == pytest.approx(treatment.mean() - control.mean(), rel=1e-12)
    assert ours.t_statistic == pytest.approx(ref.statistic, rel=1e-10)
    assert ours.dof == pytest.approx(ref.df, rel=1e-10)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert ours.ci == pytest.approx((ref_ci.low, ref_ci.high), rel=1e-9)
    assert (ours.control.n, ours.treatment.n) == (n_c, n_t)
    assert ours.significant == (ref.pvalue <= 0.1)


def test_batch_welch_matches_scipy_row_by_row() -> None:
    g = rng(1)
    control, treatment = g.normal(0, 1, (50, 30)), g.normal(0.3, 2, (50, 45))
    expected = stats.ttest_ind(treatment, control, axis=-1, equal_var=False).pvalue
    np.testing.assert_allclose(welch_p_values(control, treatment), expected, rtol=1e-9)
    assert welch_p_values(control[0], treatment[0]) == pytest.approx(
        welch_test(control[0], treatment[0]).p_value, rel=1e-12
    )


def test_relative_lift_uses_the_delta_method() -> None:
    control = ArmEstimate(n=1000, estimate=10.0, variance=0.04)
    treatment = ArmEstimate(n=1000, estimate=11.0, variance=0.09)
    result = compare(control, treatment, alpha=0.05)
    # Hand: Var(T/C) = (0.09 + 1.1^2 * 0.04) / 10^2 = 0.001384.
    se = math.sqrt(0.001384)
    assert result.relative_lift == pytest.approx(0.1)
    assert result.relative_ci == pytest.approx((0.1 - 1.959964 * se, 0.1 + 1.959964 * se), rel=1e-6)


def test_relative_ci_covers_the_true_lift() -> None:
    g = rng(2)
    control = g.normal(10, 3, (1000, 400))
    treatment = g.normal(11, 4, (1000, 400))
    intervals = [welch_test(c, t).relative_ci for c, t in zip(control, treatment, strict=True)]
    covered = [lo <= 0.1 <= hi for lo, hi in intervals]
    assert 0.93 <= np.mean(covered) <= 0.97


def test_symmetry_swapping_arms_negates_the_difference() -> None:
    g = rng(3)
    a, b = g.normal(0, 1, 80), g.normal(0.5, 2, 60)
    forward, backward = welch_test(a, b), welch_test(b, a)
    assert forward.difference == pytest.approx(-backward.difference)
    assert forward.p_value == pytest.approx(backward.p_value)


def test_constant_arms_give_nan_not_warnings() -> None:
    result = welch_test(np.zeros(10), np.zeros(12))
    assert math.isnan(result.p_value) and not result.significant
    assert math.isnan(result.relative_lift)


def test_bad_inputs_raise_data_error() -> None:
    with pytest.raises(DataError, match="1 user"):
        welch_test([1.0], [1.0, 2.0])
    with pytest.raises(DataError, match="non-finite"):
        welch_test([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(DataError, match="1-D"):
        welch_test(np.ones((2, 2)), [1.0, 2.0])
    with pytest.raises(ConfigError, match="alpha"):
        welch_test([1.0, 2.0], [1.0, 2.0], alpha=1.5)


# --------------------------------------------------------------------------------------------
# A/A false-positive rate and peeking
# --------------------------------------------------------------------------------------------


def test_aa_false_positive_rate_is_alpha() -> None:
    # Skewed per-user values (exponential, like time spent): Welch still holds its level.
    users = rng(10).exponential(1.0, (REPLICATES, 2, 200))
    rate = np.mean(welch_p_values(users[:, 0], users[:, 1]) < 0.05)
    assert 0.03 <= rate <= 0.07  # measured 0.0575


@pytest.fixture(scope="module")
def aa_streams() -> np.ndarray:
    """(replicates, 2 arms, 2000 users) of A/A data in arrival order."""
    return rng(11).normal(0.0, 1.0, (REPLICATES, 2, 2000))


def test_peeking_inflates_the_naive_test_but_not_the_always_valid_one(
    aa_streams: np.ndarray,
) -> None:
    config = SequentialConfig(mixture_sd=0.1, alpha=0.05)
    result = sequential_test(aa_streams[:, 0], aa_streams[:, 1], peek_every=100, config=config)
    assert result.p_value.shape == (REPLICATES, 20)
    # Stop at the first peek where the test says "significant".
    naive = np.mean((result.fixed_horizon_p_value < 0.05).any(axis=-1))
    always_valid = np.mean(result.first_rejection >= 0)
    single_look = np.mean(result.fixed_horizon_p_value[:, -1] < 0.05)
    assert naive > 0.15  # measured 0.26: 20 peeks quintuple the error rate
    assert 0.03 <= single_look <= 0.07  # the same z-test, looked at once, is fine
    assert always_valid <= 0.05 + 0.01  # measured 0.011


def test_confidence_sequence_covers_the_truth_at_every_peek() -> None:
    effect = 0.15
    streams = rng(12).normal(0.0, 1.0, (REPLICATES, 2, 2000))
    streams[:, 1] += effect
    config = SequentialConfig(mixture_sd=effect)
    result = sequential_test(streams[:, 0], streams[:, 1], peek_every=100, config=config)
    covered_throughout = ((result.ci_lower <= effect) & (result.ci_upper >= effect)).all(axis=-1)
    assert covered_throughout.mean() >= 0.95 - 0.01
    # It also has power: a 0.15 sd effect at 2000 users per arm is found almost always (0.97)...
    assert np.mean(result.first_rejection >= 0) > 0.9
    # ...and the confidence sequence only shrinks.
    assert np.all(np.diff(result.ci_upper - result.ci_lower, axis=-1) <= 1e-12)


def test_always_valid_p_value_known_answer_and_ci_duality() -> None:
    difference, variance, tau, alpha = 0.3, 0.01, 0.2, 0.05
    result = always_valid_inference(
        [0.0, difference], [0.04, variance], SequentialConfig(mixture_sd=tau, alpha=alpha)
    )
    # Hand: Lambda = sqrt(V / (V + tau^2)) exp(tau^2 d^2 / (2 V (V + tau^2))) at the last peek,
    # V = 0.01, tau^2 = 0.04, d = 0.3.
    lam = math.sqrt(0.01 / 0.05) * math.exp(0.04 * 0.09 / (2 * 0.01 * 0.05))
    assert result.p_value[-1] == pytest.approx(1 / lam)
    assert result.p_value[0] == 1.0  # Lambda < 1 at d = 0: no evidence, p capped at 1
    # Rejecting at alpha is the same as the confidence sequence excluding 0.
    excludes_zero = (result.ci_lower > 0) | (result.ci_upper < 0)
    np.testing.assert_array_equal(result.rejected, excludes_zero)


def test_sequential_running_moments_match_direct_computation() -> None:
    g = rng(13)
    control, treatment = g.normal(5e6, 2.0, 23), g.normal(5e6, 3.0, 31)  # large mean, small sd
    config = SequentialConfig(mixture_sd=1.0)
    result = sequential_test(control, treatment, peek_every=10, config=config)
    n_c, n_t = peek_sizes(23, 31, 10)
    assert n_c.tolist() == [10, 20, 23, 23] and n_t.tolist() == [10, 20, 30, 31]
    for k, (a, b) in enumerate(zip(n_c, n_t, strict=True)):
        direct = welch_test(control[:a], treatment[:b])
        assert result.difference[k] == pytest.approx(direct.difference, abs=1e-6)
        assert result.std_error[k] == pytest.approx(direct.std_error, rel=1e-6)


# --------------------------------------------------------------------------------------------
# Ratio metrics and per-user aggregation
# --------------------------------------------------------------------------------------------


def clicks_and_impressions(g: np.random.Generator, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Heterogeneous users: activity and click propensity vary by user (clustered events)."""
    impressions = g.poisson(g.gamma(2.0, 10.0, n_users)) + 1
    clicks = g.binomial(impressions, g.beta(2.0, 18.0, n_users))
    return clicks.astype(np.float64), impressions.astype(np.float64)


def test_delta_method_ratio_variance_matches_the_bootstrap() -> None:
    g = rng(20)
    clicks, impressions = clicks_and_impressions(g, 3000)
    estimate = ratio_estimate(clicks, impressions)
    assert estimate.estimate == pytest.approx(clicks.sum() / impressions.sum())
    resampled = g.integers(0, clicks.size, (2000, clicks.size))
    boot = clicks[resampled].sum(axis=1) / impressions[resampled].sum(axis=1)
    assert estimate.std_error == pytest.approx(boot.std(ddof=1), rel=0.07)
    # The per-impression binomial SE ignores the clustering by user and is far too small.
    ctr = estimate.estimate
    assert math.sqrt(ctr * (1 - ctr) / impressions.sum()) < 0.8 * estimate.std_error


def test_ratio_test_aa_false_positive_rate() -> None:
    # The delta method is first-order: at 300 users per arm of this skewed population the rate is
    # about 0.057 (over 10k replicates); from 1000 users on it is at alpha.
    g = rng(21)
    p_values = []
    for _ in range(1000):
        c_clicks, c_impr = clicks_and_impressions(g, 1000)
        t_clicks, t_impr = clicks_and_impressions(g, 1000)
        p_values.append(ratio_test(c_clicks, c_impr, t_clicks, t_impr).p_value)
    assert 0.03 <= np.mean(np.array(p_values) < 0.05) <= 0.07


def test_per_user_aggregation_and_arm_summaries() -> None:
    events = pl.DataFrame(
        {
            "user_id": ["a", "a", "b", "c", "c", "c", "d", "e", "f"],
            "arm": ["control", "control", "control", "treatment", "treatment", "treatment"]
            + ["treatment", "control", "treatment"],
            "clicks": [1, 0, 2, 1, 1, 0, 0, 1, 3],
            "impressions": [3, 2, 4, 2, 2, 1, 5, 2, 6],
        }
    )
    per_user = aggregate_per_user(events, ["clicks", "impressions"])
    assert per_user["user_id"].to_list() == ["a", "b", "c", "d", "e", "f"]
    assert per_user["clicks"].to_list() == [1, 2, 2, 0, 1, 3]
    assert per_user["impressions"].to_list() == [5, 4, 5, 5, 2, 6]

    control = per_user.filter(pl.col("arm") == "control")
    means = mean_by_arm(per_user, "clicks")
    direct_mean = mean_estimate(control["clicks"].to_numpy())
    assert means["control"].n == direct_mean.n == 3
    assert means["control"].estimate == pytest.approx(direct_mean.estimate, rel=1e-12)
    assert means["control"].variance == pytest.approx(direct_mean.variance, rel=1e-12)
    ratios = ratio_by_arm(per_user, "clicks", "impressions")
    direct = ratio_estimate(control["clicks"].to_numpy(), control["impressions"].to_numpy())
    assert ratios["control"].estimate == pytest.approx(4 / 11)
    assert ratios["control"].variance == pytest.approx(direct.variance, rel=1e-12)


def test_a_user_in_two_arms_is_rejected() -> None:
    events = pl.DataFrame({"user_id": ["a", "a"], "arm": ["control", "treatment"], "x": [1, 2]})
    with pytest.raises(DataError, match="more than one arm"):
        aggregate_per_user(events, ["x"])
    with pytest.raises(DataError, match="lack"):
        aggregate_per_user(events, ["missing"])


# --------------------------------------------------------------------------------------------
# Sample-ratio mismatch
# --------------------------------------------------------------------------------------------


def test_srm_known_answer_against_scipy() -> None:
    result = srm_check({"control": 50_500, "treatment": 49_500}, {"control": 1, "treatment": 1})
    expected = stats.chisquare([50_500, 49_500], [50_000, 50_000])
    assert result.chi2 == pytest.approx(10.0)  # hand: 2 * 500^2 / 50_000
    assert result.p_value == pytest.approx(expected.pvalue)
    # p = 0.0016: suspicious, but not a mismatch at the strict default alpha of 0.001.
    assert result.alpha == 0.001 and not result.mismatch
    assert srm_check([50_500, 49_500], [1, 1], alpha=0.01).mismatch
    three = srm_check([200, 310, 490], [0.2, 0.3, 0.5])
    assert three.p_value == pytest.approx(stats.chisquare([200, 310, 490], [200, 300, 500]).pvalue)
    assert not three.mismatch


def random_splits(seed: int, n_users: int, treatment_share: float, replicates: int) -> np.ndarray:
    treatment = rng(seed).binomial(n_users, treatment_share, replicates)
    return np.stack([n_users - treatment, treatment], axis=-1)


def test_srm_flags_a_two_point_split_shift_at_100k_users() -> None:
    # Configured 50/50, delivered 51/49: 2 % of the traffic lands in the wrong arm.
    p_values = srm_p_values(random_splits(30, 100_000, 0.49, REPLICATES), [1, 1])
    assert np.mean(p_values < 0.001) >= 0.95  # measured 1.0


def test_srm_detection_of_a_small_loss_matches_its_analytic_power() -> None:
    # Losing 2 % of the treatment arm's users (a logging bug) at 100k users is only caught about
    # half the time at alpha = 0.001: srm_power says so, and the simulation agrees.
    share = 0.98 / 1.98
    p_values = srm_p_values(random_splits(31, 100_000, share, REPLICATES), [1, 1])
    analytic = srm_power(100_000, [1, 1], [1, 0.98])
    assert analytic == pytest.approx(0.46, abs=0.01)
    assert np.mean(p_values < 0.001) == pytest.approx(analytic, abs=0.035)


def test_srm_false_alarm_rate_is_alpha() -> None:
    p_values = srm_p_values(random_splits(32, 100_000, 0.5, 20_000), [1, 1])
    assert 0.045 <= np.mean(p_values < 0.05) <= 0.055
    assert np.mean(p_values < 0.001) <= 0.0025  # expected 0.001; 20 of 20000
    assert srm_power(100_000, [1, 1], [1, 1]) == pytest.approx(0.001)


def test_srm_bad_inputs() -> None:
    with pytest.raises(DataError, match="arms"):
        srm_check({"a": 1, "b": 2}, {"a": 1, "c": 1})
    with pytest.raises(DataError, match="both"):
        srm_check({"a": 1, "b": 2}, [1, 1])
    with pytest.raises(ConfigError, match="> 0"):
        srm_check([1, 2], [1, 0])


# --------------------------------------------------------------------------------------------
# Power analysis
# --------------------------------------------------------------------------------------------


def test_required_sample_size_known_answer() -> None:
    # 10 % CTR, detect +2 % relative (0.002 absolute): 2 * 0.09 * (1.959964 + 0.841621)^2 / 0.002^2.
    n = required_sample_size(0.002, bernoulli_variance(0.1))
    assert n == math.ceil(2 * 0.09 * (1.959964 + 0.841621) ** 2 / 0.002**2)
    assert minimum_detectable_effect(n, 0.09) == pytest.approx(0.002, rel=1e-4)
    assert achieved_power(n, 0.002, 0.09) == pytest.approx(0.8, abs=1e-3)
    assert achieved_power(n, 0.0, 0.09) == pytest.approx(0.05)


def test_simulated_power_at_the_computed_n_hits_the_target() -> None:
    mde, sd = 0.2, 1.0
    n = required_sample_size(mde, sd**2, alpha=0.05, power=0.8)
    assert n == 393
    users = rng(40).normal(0.0, sd, (REPLICATES, 2, n))
    users[:, 1] += mde
    power = np.mean(welch_p_values(users[:, 0], users[:, 1]) < 0.05)
    assert power == pytest.approx(0.8, abs=0.05)  # measured 0.79


def test_power_inputs_are_checked() -> None:
    with pytest.raises(DataError, match="mde"):
        required_sample_size(0.0, 1.0)
    with pytest.raises(ConfigError, match="power"):
        minimum_detectable_effect(100, 1.0, power=1.0)
    with pytest.raises(DataError, match="rate"):
        bernoulli_variance(1.5)


# --------------------------------------------------------------------------------------------
# Multiple testing
# --------------------------------------------------------------------------------------------


def test_holm_and_bh_hand_computed() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm, sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x = 0.02, 0.03, 0.06, 0.04 -> cummax.
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    # BH: m p / rank = 0.02, 0.02, 0.04, 0.04 -> cummin from the top.
    np.testing.assert_allclose(benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])
    np.testing.assert_allclose(benjamini_hochberg([0.5, 0.9]), [0.9, 0.9])
    np.testing.assert_allclose(holm([0.2]), [0.2])


@PROPERTY
@given(st.lists(st.floats(0, 1), min_size=1, max_size=20))
def test_adjusted_p_values_invariants(p_list: list[float]) -> None:
    p = np.array(p_list)
    h, b = holm(p), benjamini_hochberg(p)
    for adjusted in (h, b):
        assert np.all(adjusted >= p - 1e-15) and np.all(adjusted <= 1)
        order = np.argsort(p, kind="stable")
        assert np.all(np.diff(adjusted[order]) >= -1e-15)  # monotone in the raw p-value
    assert np.all(b <= h + 1e-15)  # FDR control is never stricter than FWER control
    np.testing.assert_array_equal(holm(np.stack([p, p])), np.stack([h, h]))


def test_invalid_p_values_are_rejected() -> None:
    with pytest.raises(DataError):
        holm([0.1, 1.2])
    with pytest.raises(DataError):
        benjamini_hochberg([])


# --------------------------------------------------------------------------------------------
# CUPED
# --------------------------------------------------------------------------------------------


def correlated_experiment(
    g: np.random.Generator, n: int, rho: float, effect: float
) -> tuple[np.ndarray, ...]:
    """Pre-period x and in-experiment y with corr(x, y) = rho; treatment adds ``effect`` to y."""
    x = g.normal(10.0, 1.0, (2, n))
    y = 5.0 + rho * (x - 10.0) + math.sqrt(1 - rho**2) * g.normal(0.0, 1.0, (2, n))
    y[1] += effect
    return y[0], x[0], y[1], x[1]


def test_cuped_theta_and_variance_reduction_known_answer() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([2.0, 4.5, 5.5, 8.0])
    adjusted = cuped_adjust(y, x)
    # Hand: cov(y, x) = 9.5 / 3, var(x) = 5 / 3 -> theta = 1.9; mean(x) = 2.5.
    assert adjusted.theta == pytest.approx(1.9)
    np.testing.assert_allclose(adjusted.adjusted, y - 1.9 * (x - 2.5))
    assert adjusted.adjusted.mean() == pytest.approx(y.mean())
    expected = 1 - np.var(y - 1.9 * x, ddof=1) / np.var(y, ddof=1)
    assert adjusted.variance_reduction == pytest.approx(expected)


def test_cuped_reduces_variance_and_stays_unbiased() -> None:
    g = rng(50)
    rho, effect = 0.7, 0.1
    single = cuped_test(*correlated_experiment(g, 5000, rho, effect))
    assert single.variance_reduction == pytest.approx(rho**2, abs=0.04)
    assert single.adjusted.std_error < single.unadjusted.std_error
    assert single.theta == pytest.approx(rho, abs=0.05)

    raw, cuped = [], []
    for _ in range(400):
        result = cuped_test(*correlated_experiment(g, 500, rho, effect))
        raw.append(result.unadjusted.difference)
        cuped.append(result.adjusted.difference)
    raw_arr, cuped_arr = np.array(raw), np.array(cuped)
    # Unbiased: the mean estimate is within 3 Monte-Carlo standard errors of the truth.
    assert abs(cuped_arr.mean() - effect) < 3 * cuped_arr.std() / math.sqrt(cuped_arr.size)
    # Var ratio is about 1 - rho^2 = 0.51 across experiments, not only within one.
    assert cuped_arr.var() / raw_arr.var() == pytest.approx(1 - rho**2, abs=0.1)


def test_cuped_needs_a_varying_covariate() -> None:
    with pytest.raises(DataError, match="constant"):
        cuped_adjust([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])


# --------------------------------------------------------------------------------------------
# Novelty
# --------------------------------------------------------------------------------------------


def test_effect_by_exposure_day_matches_per_day_welch_tests() -> None:
    g = rng(60)
    n_users, n_days = 400, 8
    arm = np.where(np.arange(n_users) % 2 == 0, "control", "treatment")
    first_day = g.integers(0, 3, n_users)
    rows_user, rows_day, rows_value = [], [], []
    for user in range(n_users):
        days = np.arange(first_day[user], n_days)
        age = days - first_day[user]
        # Novelty: a +1.0 lift on the first exposure day that decays to +0.2.
        lift = (0.2 + 0.8 * np.exp(-age / 1.5)) * (arm[user] == "treatment")
        rows_user += [f"u{user}"] * days.size
        rows_day += days.tolist()
        rows_value += (g.normal(2.0, 1.0, days.size) + lift).tolist()
    daily = pl.DataFrame(
        {
            "user_id": rows_user,
            "arm": np.repeat(arm, n_days - first_day).tolist(),
            "day": rows_day,
            "minutes": rows_value,
        }
    )
    effects = effect_by_exposure_day(daily, "minutes")
    assert effects["days_since_exposure"].to_list() == list(range(n_days))

    with_age = daily.with_columns(
        age=pl.col("day") - pl.col("day").min().over("user_id"),
    )
    for row in effects.iter_rows(named=True):
        day = with_age.filter(pl.col("age") == row["days_since_exposure"])
        direct = welch_test(
            day.filter(pl.col("arm") == "control")["minutes"].to_numpy(),
            day.filter(pl.col("arm") == "treatment")["minutes"].to_numpy(),
        )
        assert row["difference"] == pytest.approx(direct.difference)
        assert (row["ci_lower"], row["ci_upper"]) == pytest.approx(direct.ci)
        assert row["p_value"] == pytest.approx(direct.p_value)
    # The decay is visible: the first day's CI lies above the last day's.
    assert effects["ci_lower"][0] > effects["ci_upper"][-1]


# --------------------------------------------------------------------------------------------
# Guardrails
# --------------------------------------------------------------------------------------------


def test_guardrails_are_non_inferiority_checks() -> None:
    # Treatment 1 % below control: relative CI about (-3.8 %, +1.8 %).
    result = compare(ArmEstimate(10_000, 100.0, 1.0), ArmEstimate(10_000, 99.0, 1.0))
    lower, upper = result.relative_ci
    assert lower == pytest.approx(-0.0376, abs=5e-4) and upper == pytest.approx(0.0176, abs=5e-4)
    checks = evaluate_guardrails(
        [
            Guardrail("revenue", "higher_is_better", tolerance=0.05),
            Guardrail("clicks", "higher_is_better", tolerance=0.02),
            Guardrail("latency", "lower_is_better", tolerance=0.02),
            Guardrail("errors", "lower_is_better", tolerance=0.01),
        ],
        {"revenue": result, "clicks": result, "latency": result, "errors": result},
    )
    assert [c.passed for c in checks] == [True, False, True, False]
    assert checks[0].worst_case == pytest.approx(lower)
    assert checks[2].worst_case == pytest.approx(upper)
    assert "cannot rule out" in checks[1].reason


def test_guardrail_inputs_are_checked() -> None:
    with pytest.raises(ConfigError, match="direction"):
        Guardrail("x", "up", 0.1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="tolerance"):
        Guardrail("x", "higher_is_better", -0.1)
    with pytest.raises(DataError, match="no result"):
        evaluate_guardrails([Guardrail("x", "higher_is_better", 0.1)], {})
