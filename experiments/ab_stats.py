"""Statistics for online A/B experiments, with the user as the unit of randomisation.

Users, not events, are randomised (:mod:`pipeline.assignment`), so users are the independent
observations: every test here takes one value per user (or per user and day). Event-level logs
are first summed per user with :func:`aggregate_per_user`. Treating events as independent would
understate the variance, because one user's events are correlated.

What is here, and where it comes from:

* **Per-arm estimates** (:class:`ArmEstimate`): a mean, or a ratio of per-user sums
  (clicks / impressions) whose variance comes from the delta method (Deng, Knoblich & Lu 2018,
  "Applying the Delta Method in Metric Analytics").
* **Welch's t-test** (:func:`welch_test`, :func:`compare`): difference of means with a CI, and the
  relative lift with a delta-method CI. :func:`welch_p_values` is the same test for a batch of
  experiments at once (simulations).
* **Sample-ratio mismatch** (:func:`srm_check`): chi-square goodness of fit of arm sizes.
* **Power analysis** (:func:`required_sample_size`, :func:`minimum_detectable_effect`,
  :func:`achieved_power`): two-sided, normal approximation.
* **Always-valid sequential inference** (:func:`always_valid_inference`, :func:`sequential_test`):
  the normal-mixture sequential probability ratio test (mSPRT) of Johari, Koomen, Pekelis & Walsh
  (2017, "Peeking at A/B Tests"), so an experiment can be looked at after every batch of users and
  stopped early without inflating the false-positive rate.
* **Multiple testing** (:func:`holm`, :func:`benjamini_hochberg`): adjusted p-values.
* **CUPED** (:func:`cuped_adjust`, :func:`cuped_test`): variance reduction with a pre-period
  covariate (Deng, Xu, Kohavi & Walker 2013).
* **Novelty** (:func:`effect_by_exposure_day`): the effect per day since a user's first exposure.
* **Guardrails** (:func:`evaluate_guardrails`): non-inferiority checks on metrics that must not get
  worse.

Conventions: "control" is the baseline arm and every difference is ``treatment - control``;
relative lift is ``treatment / control - 1``; ``alpha`` is two-sided. Degenerate inputs that can
arise in a running experiment (both arms constant, a control mean of zero) give ``NaN`` rather
than an exception; inputs that are plainly wrong (one user in an arm, non-finite values, a
mismatched shape) raise :class:`~data.errors.DataError` naming the input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from data.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_POWER",
    "SRM_ALPHA",
    "ArmEstimate",
    "CupedAdjustment",
    "CupedResult",
    "Guardrail",
    "GuardrailCheck",
    "SRMResult",
    "SequentialConfig",
    "SequentialResult",
    "WelchResult",
    "achieved_power",
    "aggregate_per_user",
    "always_valid_inference",
    "benjamini_hochberg",
    "bernoulli_variance",
    "compare",
    "cuped_adjust",
    "cuped_test",
    "effect_by_exposure_day",
    "evaluate_guardrails",
    "holm",
    "mean_by_arm",
    "mean_estimate",
    "minimum_detectable_effect",
    "peek_sizes",
    "ratio_by_arm",
    "ratio_estimate",
    "ratio_test",
    "required_sample_size",
    "sequential_test",
    "srm_check",
    "srm_p_values",
    "srm_power",
    "welch_p_values",
    "welch_test",
]

DEFAULT_ALPHA = 0.05
"""Two-sided significance level of the tests: the field's convention for a single primary metric."""

DEFAULT_POWER = 0.8
"""Target power of the power analysis: the convention (a 20 % chance of missing a true MDE)."""

SRM_ALPHA = 0.001
"""Significance level of the sample-ratio-mismatch check. Stricter than 0.05 by convention
(Fabijan et al. 2019, "Diagnosing Sample Ratio Mismatch"): SRM is checked on every experiment and
often on every day of it, and a flag invalidates the whole experiment, so false alarms must be rare;
real SRM bugs (lost users, redirect losses) are usually large enough to give tiny p-values."""

FloatArray = NDArray[np.float64]


# --------------------------------------------------------------------------------------------
# Per-arm estimates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmEstimate:
    """One arm's point estimate of a metric and the sampling variance of that estimate.

    ``n``: users in the arm. ``estimate``: the metric's per-user mean (or pooled ratio).
    ``variance``: the variance *of the estimate* (the squared standard error), not of the metric.
    """

    n: int
    estimate: float
    variance: float

    @property
    def std_error(self) -> float:
        """Standard error of ``estimate`` (same unit as the metric)."""
        return math.sqrt(self.variance)


def mean_estimate(values: ArrayLike) -> ArmEstimate:
    """Mean of ``(n_users,)`` per-user values, with variance ``s^2 / n`` (``s^2`` with ddof=1)."""
    x = _user_values(values, "values")
    return _mean_from_moments(x.size, float(x.mean()), float(x.var(ddof=1)))


def ratio_estimate(numerators: ArrayLike, denominators: ArrayLike) -> ArmEstimate:
    """Pooled ratio ``sum(numerators) / sum(denominators)`` with its delta-method variance.

    ``numerators``, ``denominators``: ``(n_users,)`` per-user sums, e.g. clicks and impressions.
    The pooled ratio is a ratio of two means, ``R = mean(x) / mean(y)``; to first order

        ``Var(R) = (Var(x) / mu_y^2 - 2 mu_x Cov(x, y) / mu_y^3 + mu_x^2 Var(y) / mu_y^4) / n``

    (Deng et al. 2018, eq. 3). The naive per-impression binomial variance is wrong here: the
    impressions of one user are not independent.
    """
    x = _user_values(numerators, "numerators")
    y = _user_values(denominators, "denominators")
    if x.shape != y.shape:
        raise DataError(f"{x.size} numerators but {y.size} denominators; need one of each per user")
    covariance = np.cov(x, y, ddof=1)
    return _ratio_from_moments(
        x.size,
        float(x.mean()),
        float(y.mean()),
        float(covariance[0, 0]),
        float(covariance[1, 1]),
        float(covariance[0, 1]),
    )


def _mean_from_moments(n: int, mean: float, variance: float) -> ArmEstimate:
    return ArmEstimate(n=n, estimate=mean, variance=variance / n)


def _ratio_from_moments(
    n: int, mean_x: float, mean_y: float, var_x: float, var_y: float, cov_xy: float
) -> ArmEstimate:
    if mean_y == 0:
        raise DataError("the denominators sum to 0; the ratio metric is undefined in this arm")
    ratio = mean_x / mean_y
    variance = (var_x - 2 * ratio * cov_xy + ratio**2 * var_y) / (mean_y**2 * n)
    return ArmEstimate(n=n, estimate=ratio, variance=variance)


# --------------------------------------------------------------------------------------------
# Per-user aggregation (polars)
# --------------------------------------------------------------------------------------------


def aggregate_per_user(
    events: pl.DataFrame | pl.LazyFrame,
    metrics: Sequence[str],
    *,
    user_col: str = "user_id",
    arm_col: str = "arm",
) -> pl.DataFrame:
    """Sum event-level metric columns per user: one row per user, the unit of analysis.

    ``events``: one row per event with ``user_col``, ``arm_col`` and the numeric ``metrics``
    columns (e.g. ``clicks``, ``impressions``). Returns ``user_col, arm_col, *metrics`` with the
    per-user sums, sorted by user. A user seen in two arms means the assignment was not user-level
    (or the log mixes experiments) and raises :class:`DataError`.
    """
    frame = events.lazy()
    names = frame.collect_schema().names()
    missing = [c for c in (user_col, arm_col, *metrics) if c not in names]
    if missing:
        raise DataError(f"events lack column(s) {missing}; found {names}")
    per_user = (
        frame.group_by(user_col)
        .agg(
            pl.col(arm_col).first(),
            pl.col(arm_col).n_unique().alias("__n_arms"),
            *(pl.col(m).sum() for m in metrics),
        )
        .sort(user_col)
        .collect()
    )
    crossed = per_user.filter(pl.col("__n_arms") > 1)
    if crossed.height:
        raise DataError(
            f"{crossed.height} user(s) appear in more than one arm, e.g. "
            f"{crossed[user_col][0]!r}; assignment must be per user"
        )
    return per_user.drop("__n_arms")


def mean_by_arm(
    per_user: pl.DataFrame, metric: str, *, arm_col: str = "arm"
) -> dict[str, ArmEstimate]:
    """:func:`mean_estimate` of ``metric`` for every arm of a per-user frame, keyed by arm name."""
    _require(per_user, (arm_col, metric), "per_user")
    moments = per_user.group_by(arm_col).agg(
        pl.len().alias("n"), pl.col(metric).mean().alias("mean"), pl.col(metric).var().alias("var")
    )
    out: dict[str, ArmEstimate] = {}
    for row in moments.sort(arm_col).iter_rows(named=True):
        _check_arm_size(row["n"], f"arm {row[arm_col]!r}")
        out[str(row[arm_col])] = _mean_from_moments(row["n"], row["mean"], row["var"])
    return out


def ratio_by_arm(
    per_user: pl.DataFrame, numerator: str, denominator: str, *, arm_col: str = "arm"
) -> dict[str, ArmEstimate]:
    """:func:`ratio_estimate` of ``numerator / denominator`` for every arm, keyed by arm name."""
    _require(per_user, (arm_col, numerator, denominator), "per_user")
    x, y = pl.col(numerator), pl.col(denominator)
    moments = per_user.group_by(arm_col).agg(
        pl.len().alias("n"),
        x.mean().alias("mean_x"),
        y.mean().alias("mean_y"),
        x.var().alias("var_x"),
        y.var().alias("var_y"),
        pl.cov(x, y).alias("cov_xy"),
    )
    out: dict[str, ArmEstimate] = {}
    for row in moments.sort(arm_col).iter_rows(named=True):
        arm = row.pop(arm_col)
        _check_arm_size(row["n"], f"arm {arm!r}")
        out[str(arm)] = _ratio_from_moments(**row)
    return out


# --------------------------------------------------------------------------------------------
# Welch's t-test
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WelchResult:
    """Comparison of a treatment arm with the control arm (all differences are ``t - c``).

    ``difference``, ``ci``: absolute effect in metric units and its ``1 - alpha`` CI (Welch t).
    ``relative_lift``, ``relative_ci``: ``treatment / control - 1`` and its delta-method CI
    (normal quantile; ``NaN`` when the control estimate is 0).
    ``dof``: Welch-Satterthwaite degrees of freedom. ``p_value``: two-sided; ``NaN`` when both
    arms have zero variance.
    """

    control: ArmEstimate
    treatment: ArmEstimate
    difference: float
    std_error: float
    ci: tuple[float, float]
    t_statistic: float
    dof: float
    p_value: float
    relative_lift: float
    relative_ci: tuple[float, float]
    alpha: float

    @property
    def significant(self) -> bool:
        """Whether the two-sided test rejects "no difference" at level ``alpha``."""
        return bool(self.p_value <= self.alpha)


def compare(
    control: ArmEstimate, treatment: ArmEstimate, *, alpha: float = DEFAULT_ALPHA
) -> WelchResult:
    """Welch's unequal-variance t-test on two arm estimates (means or delta-method ratios).

    With means, this is exactly ``scipy.stats.ttest_ind(equal_var=False)``. With ratios it is the
    linearised (delta-method) test, with the per-arm variances of the estimates feeding the same
    Welch-Satterthwaite degrees of freedom.
    """
    _check_alpha(alpha)
    _check_arm_size(control.n, "control")
    _check_arm_size(treatment.n, "treatment")
    difference = treatment.estimate - control.estimate
    std_error, dof, t_stat, p_value = (
        float(a)
        for a in _welch(difference, control.variance, treatment.variance, control.n, treatment.n)
    )
    half_width = float(stats.t.ppf(1 - alpha / 2, dof)) * std_error if dof > 0 else math.nan
    lift, lift_se = _relative_lift(control, treatment)
    z = float(stats.norm.ppf(1 - alpha / 2))
    return WelchResult(
        control=control,
        treatment=treatment,
        difference=difference,
        std_error=std_error,
        ci=(difference - half_width, difference + half_width),
        t_statistic=t_stat,
        dof=dof,
        p_value=p_value,
        relative_lift=lift,
        relative_ci=(lift - z * lift_se, lift + z * lift_se),
        alpha=alpha,
    )


def welch_test(
    control: ArrayLike, treatment: ArrayLike, *, alpha: float = DEFAULT_ALPHA
) -> WelchResult:
    """Welch's t-test of the mean of ``(n_users,)`` per-user values, treatment vs control."""
    return compare(mean_estimate(control), mean_estimate(treatment), alpha=alpha)


def ratio_test(
    control_numerators: ArrayLike,
    control_denominators: ArrayLike,
    treatment_numerators: ArrayLike,
    treatment_denominators: ArrayLike,
    *,
    alpha: float = DEFAULT_ALPHA,
) -> WelchResult:
    """Test of a pooled ratio metric (e.g. CTR = clicks / impressions) with delta-method variances.

    Every argument is ``(n_users,)`` per-user sums of that arm.
    """
    return compare(
        ratio_estimate(control_numerators, control_denominators),
        ratio_estimate(treatment_numerators, treatment_denominators),
        alpha=alpha,
    )


def welch_p_values(control: ArrayLike, treatment: ArrayLike) -> FloatArray:
    """Two-sided Welch p-values for a batch of experiments at once.

    ``control``: ``(..., n_control)``, ``treatment``: ``(..., n_treatment)`` per-user values, users
    on the last axis and matching (broadcastable) leading axes, e.g. ``(n_replicates, n_users)``
    for a simulation. Returns the ``(...)`` p-values; same arithmetic as :func:`welch_test`.
    """
    c = np.asarray(control, dtype=np.float64)
    t = np.asarray(treatment, dtype=np.float64)
    if c.ndim == 0 or t.ndim == 0:
        raise DataError("control and treatment need a users axis (the last axis)")
    n_c, n_t = c.shape[-1], t.shape[-1]
    _check_arm_size(n_c, "control")
    _check_arm_size(n_t, "treatment")
    var_c = c.var(axis=-1, ddof=1) / n_c
    var_t = t.var(axis=-1, ddof=1) / n_t
    difference = t.mean(axis=-1) - c.mean(axis=-1)
    return np.asarray(_welch(difference, var_c, var_t, n_c, n_t)[3], dtype=np.float64)


def _welch(
    difference: ArrayLike, var_c: ArrayLike, var_t: ArrayLike, n_c: ArrayLike, n_t: ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Vectorised Welch core from variances of the means: (std_error, dof, t, p)."""
    d, vc, vt = (np.asarray(a, dtype=np.float64) for a in (difference, var_c, var_t))
    nc, nt = (np.asarray(a, dtype=np.float64) for a in (n_c, n_t))
    # Zero variance in both arms is a legitimate state of a running experiment (say every user
    # has 0 clicks so far): the statistics are 0/0 and come out NaN instead of warning.
    with np.errstate(divide="ignore", invalid="ignore"):
        total = vc + vt
        std_error = np.sqrt(total)
        dof = total**2 / (vc**2 / (nc - 1) + vt**2 / (nt - 1))
        t_stat = d / std_error
        p_value = 2 * stats.t.sf(np.abs(t_stat), dof)
    return std_error, dof, t_stat, p_value


def _relative_lift(control: ArmEstimate, treatment: ArmEstimate) -> tuple[float, float]:
    """``treatment / control - 1`` and its delta-method standard error (independent arms)."""
    if control.estimate == 0:
        return math.nan, math.nan
    ratio = treatment.estimate / control.estimate
    variance = (treatment.variance + ratio**2 * control.variance) / control.estimate**2
    return ratio - 1, math.sqrt(variance)


# --------------------------------------------------------------------------------------------
# Sample-ratio mismatch
# --------------------------------------------------------------------------------------------


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
    _check_alpha(alpha)
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
    _check_alpha(alpha)
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


# --------------------------------------------------------------------------------------------
# Power analysis (two-sided, equal arms, normal approximation)
# --------------------------------------------------------------------------------------------


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
    _check_alpha(alpha)
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
    _check_alpha(alpha)
    _check_power(power)
    _check_variance(variance)
    _check_arm_size(n_per_arm, "n_per_arm")
    z_sum = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return float(z_sum * math.sqrt(2 * variance / n_per_arm))


def achieved_power(
    n_per_arm: int, effect: float, variance: float, *, alpha: float = DEFAULT_ALPHA
) -> float:
    """Probability that a two-sided z-test at ``alpha`` rejects when the true effect is ``effect``.

    Counts both rejection tails, so ``achieved_power(n, 0, v) == alpha``.
    """
    _check_alpha(alpha)
    _check_variance(variance)
    _check_arm_size(n_per_arm, "n_per_arm")
    shift = effect / math.sqrt(2 * variance / n_per_arm)
    z = stats.norm.ppf(1 - alpha / 2)
    return float(stats.norm.sf(z - shift) + stats.norm.cdf(-z - shift))


# --------------------------------------------------------------------------------------------
# Always-valid sequential inference (mSPRT)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequentialConfig:
    """Settings of the normal-mixture SPRT (Johari et al. 2017).

    ``mixture_sd`` (tau, in metric units, no default): spread of the normal prior over true effects
    that the mixture averages over. The test is most powerful for effects around ``tau``; set it
    to the effect you hope to detect (e.g. the MDE of the power analysis). Type-I error is
    controlled whatever the choice. ``alpha``: two-sided level, valid over any number of peeks.
    ``null_difference``: the difference under the null hypothesis (0: no effect).
    """

    mixture_sd: float
    alpha: float = DEFAULT_ALPHA
    null_difference: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mixture_sd) and self.mixture_sd > 0):
            raise ConfigError(f"mixture_sd must be finite and > 0, got {self.mixture_sd}")
        _check_alpha(self.alpha)


@dataclass(frozen=True)
class SequentialResult:
    """Inference after each peek; every array is ``(..., n_peeks)`` (leading axes: replicates).

    ``p_value``: always-valid p-value (non-increasing over peeks); stopping the first time it is
    ``<= alpha`` keeps the false-positive rate at most ``alpha``. ``ci_lower``/``ci_upper``: the
    always-valid ``1 - alpha`` confidence sequence (nested over peeks): with probability
    ``>= 1 - alpha`` it holds the true difference at *every* peek simultaneously.
    ``fixed_horizon_p_value``: the ordinary z-test p-value at each peek, valid only if that peek
    were the single, pre-planned analysis; stopping on it inflates false positives.
    """

    difference: FloatArray
    std_error: FloatArray
    p_value: FloatArray
    ci_lower: FloatArray
    ci_upper: FloatArray
    fixed_horizon_p_value: FloatArray
    alpha: float

    @property
    def rejected(self) -> NDArray[np.bool_]:
        """``(..., n_peeks)``: whether the null is rejected at or before each peek."""
        return np.asarray(self.p_value <= self.alpha)

    @property
    def first_rejection(self) -> NDArray[np.int64]:
        """``(...)``: index of the first peek that rejects, ``-1`` where none does."""
        rejected = self.rejected
        return np.where(rejected.any(axis=-1), rejected.argmax(axis=-1), -1).astype(np.int64)


def always_valid_inference(
    difference: ArrayLike, variance: ArrayLike, config: SequentialConfig
) -> SequentialResult:
    """mSPRT p-values and confidence sequence from the estimates at successive peeks.

    ``difference``: ``(..., n_peeks)`` estimated ``treatment - control`` at each peek, computed
    from all users so far; ``variance``: its variance ``s_t^2 / n_t + s_c^2 / n_c`` at the same
    peeks. With the normal approximation ``difference ~ N(theta, V)`` and a ``N(theta0, tau^2)``
    mixture over ``theta``, the mixture likelihood ratio is (Johari et al. 2017, eq. 11)

        ``Lambda = sqrt(V / (V + tau^2)) exp(tau^2 (difference - theta0)^2 / (2 V (V + tau^2)))``

    a martingale under the null, so by Ville's inequality ``P(sup Lambda >= 1/alpha) <= alpha``.
    The always-valid p-value is ``min(1, 1 / max_{m <= n} Lambda_m)``, and the confidence sequence
    is the running intersection of ``{theta: Lambda(theta) < 1/alpha}``, i.e. ``difference +- h``
    with ``h^2 = 2 V (V + tau^2) / tau^2 * (log(1/alpha) + log((V + tau^2) / V) / 2)``.
    Plugging in estimated variances makes this asymptotic, as in the paper.
    """
    d = np.asarray(difference, dtype=np.float64)
    v = np.asarray(variance, dtype=np.float64)
    if d.shape != v.shape or d.ndim == 0:
        raise DataError(
            f"difference {d.shape} and variance {v.shape} must have one shape with a peek axis"
        )
    tau2 = config.mixture_sd**2
    alpha = config.alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        log_shrink = 0.5 * np.log(v / (v + tau2))
        log_lr = log_shrink + tau2 * (d - config.null_difference) ** 2 / (2 * v * (v + tau2))
        half_width = np.sqrt(2 * v * (v + tau2) / tau2 * (math.log(1 / alpha) - log_shrink))
        fixed_p = 2 * stats.norm.sf(np.abs(d - config.null_difference) / np.sqrt(v))
    # fmax/fmin skip NaN (a peek where both arms were still constant) instead of spreading it.
    p_value = np.minimum(1.0, np.exp(-np.fmax.accumulate(log_lr, axis=-1)))
    return SequentialResult(
        difference=d,
        std_error=np.sqrt(v),
        p_value=p_value,
        ci_lower=np.fmax.accumulate(d - half_width, axis=-1),
        ci_upper=np.fmin.accumulate(d + half_width, axis=-1),
        fixed_horizon_p_value=np.asarray(fixed_p, dtype=np.float64),
        alpha=alpha,
    )


def peek_sizes(
    n_control: int, n_treatment: int, peek_every: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Users per arm seen at each peek when looking after every ``peek_every`` users per arm.

    Returns two ``(n_peeks,)`` arrays; peek ``k`` (1-based) sees ``min(k * peek_every, n_arm)``
    users of each arm, and the last peek sees everyone.
    """
    if peek_every < 2:
        raise ConfigError(f"peek_every must be >= 2 (a variance needs two users), got {peek_every}")
    _check_arm_size(n_control, "control")
    _check_arm_size(n_treatment, "treatment")
    n_peeks = -(-max(n_control, n_treatment) // peek_every)
    seen = np.arange(1, n_peeks + 1, dtype=np.int64) * peek_every
    return np.minimum(seen, n_control), np.minimum(seen, n_treatment)


def sequential_test(
    control: ArrayLike, treatment: ArrayLike, *, peek_every: int, config: SequentialConfig
) -> SequentialResult:
    """Run :func:`always_valid_inference` over per-user values in arrival order.

    ``control``: ``(..., n_control)``, ``treatment``: ``(..., n_treatment)``, users on the last axis
    in the order they entered the experiment (leading axes: replicates of a simulation). Peeks are
    taken every ``peek_every`` users per arm (:func:`peek_sizes`); cumulative means and variances
    come from running sums, so all peeks cost one pass over the data.
    """
    c = np.asarray(control, dtype=np.float64)
    t = np.asarray(treatment, dtype=np.float64)
    if c.ndim == 0 or t.ndim == 0:
        raise DataError("control and treatment need a users axis (the last axis)")
    n_c, n_t = peek_sizes(c.shape[-1], t.shape[-1], peek_every)
    mean_c, var_c = _running_moments(c, n_c)
    mean_t, var_t = _running_moments(t, n_t)
    return always_valid_inference(mean_t - mean_c, var_t / n_t + var_c / n_c, config)


def _running_moments(values: FloatArray, sizes: NDArray[np.int64]) -> tuple[FloatArray, FloatArray]:
    """Mean and sample variance (ddof=1) of the first ``sizes[k]`` users, for every ``k``."""
    # Shifting by the first user's value keeps the running sum of squares from cancelling
    # catastrophically when the mean is large compared with the spread.
    shifted = values - values[..., :1]
    sums = np.cumsum(shifted, axis=-1)[..., sizes - 1]
    squares = np.cumsum(shifted**2, axis=-1)[..., sizes - 1]
    mean = sums / sizes
    variance = np.maximum(squares - sums * mean, 0.0) / (sizes - 1)
    return mean + values[..., :1], variance


# --------------------------------------------------------------------------------------------
# Multiple testing
# --------------------------------------------------------------------------------------------


def holm(p_values: ArrayLike) -> FloatArray:
    """Holm-Bonferroni adjusted p-values (family-wise error control), along the last axis.

    With ``m`` tests sorted ascending, ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``;
    reject where ``adj <= alpha``. Returned in the input order.
    """
    p, order, m = _sorted_p_values(p_values)
    ranks = np.arange(1, m + 1)
    adjusted = np.maximum.accumulate(np.minimum(1.0, (m - ranks + 1) * p), axis=-1)
    return _unsort(adjusted, order)


def benjamini_hochberg(p_values: ArrayLike) -> FloatArray:
    """Benjamini-Hochberg adjusted p-values (false-discovery-rate control), along the last axis.

    With ``m`` tests sorted ascending, ``adj_(i) = min_{j >= i} min(1, m p_(j) / j)``; rejecting
    where ``adj <= q`` controls the FDR at ``q`` for independent (or positively dependent) tests.
    """
    p, order, m = _sorted_p_values(p_values)
    ranks = np.arange(1, m + 1)
    scaled = np.minimum(1.0, m * p / ranks)
    adjusted = np.flip(np.minimum.accumulate(np.flip(scaled, axis=-1), axis=-1), axis=-1)
    return _unsort(adjusted, order)


def _sorted_p_values(p_values: ArrayLike) -> tuple[FloatArray, NDArray[np.intp], int]:
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim == 0 or p.shape[-1] == 0:
        raise DataError("p_values must hold at least one p-value on its last axis")
    if not np.all((p >= 0) & (p <= 1)):
        raise DataError(f"p-values must lie in [0, 1], got {p[~((p >= 0) & (p <= 1))][:5]}")
    order = np.argsort(p, axis=-1, kind="stable")
    return np.take_along_axis(p, order, axis=-1), order, p.shape[-1]


def _unsort(values: FloatArray, order: NDArray[np.intp]) -> FloatArray:
    out = np.empty_like(values)
    np.put_along_axis(out, order, values, axis=-1)
    return out


# --------------------------------------------------------------------------------------------
# CUPED
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CupedAdjustment:
    """CUPED-adjusted metric ``Y - theta (X - mean(X))`` over the pooled users of all arms.

    ``theta = Cov(Y, X) / Var(X)``; ``adjusted``: ``(n_users,)`` in the input order;
    ``variance_reduction``: ``1 - Var(adjusted) / Var(Y)``, about ``corr(Y, X)^2``.
    """

    theta: float
    covariate_mean: float
    adjusted: FloatArray
    variance_reduction: float


@dataclass(frozen=True)
class CupedResult:
    """The CUPED test next to the unadjusted one, on the same users.

    ``variance_reduction``: ``1 - SE_cuped^2 / SE_raw^2`` of the difference: the fraction of
    users (or time) the adjustment saves for the same precision.
    """

    adjusted: WelchResult
    unadjusted: WelchResult
    theta: float
    variance_reduction: float


def cuped_adjust(metric: ArrayLike, covariate: ArrayLike) -> CupedAdjustment:
    """Adjust ``(n_users,)`` ``metric`` with a ``(n_users,)`` pre-experiment ``covariate``.

    Pass the users of *all* arms together: theta must come from the pooled data (Deng et al.
    2013), and the covariate must be measured before exposure, so the treatment cannot move it and
    the adjustment leaves the expected difference between arms unchanged (no bias).
    """
    y = _user_values(metric, "metric")
    x = _user_values(covariate, "covariate")
    if x.shape != y.shape:
        raise DataError(f"{y.size} metric values but {x.size} covariate values")
    covariance = np.cov(y, x, ddof=1)
    if covariance[1, 1] == 0:
        raise DataError("the covariate is constant; it cannot explain any variance")
    theta = float(covariance[0, 1] / covariance[1, 1])
    x_mean = float(x.mean())
    adjusted = y - theta * (x - x_mean)
    reduction = 1 - float(adjusted.var(ddof=1)) / covariance[0, 0] if covariance[0, 0] else 0.0
    return CupedAdjustment(
        theta=theta, covariate_mean=x_mean, adjusted=adjusted, variance_reduction=float(reduction)
    )


def cuped_test(
    control_metric: ArrayLike,
    control_covariate: ArrayLike,
    treatment_metric: ArrayLike,
    treatment_covariate: ArrayLike,
    *,
    alpha: float = DEFAULT_ALPHA,
) -> CupedResult:
    """Welch test on CUPED-adjusted per-user values (theta pooled over both arms).

    Each argument is ``(n_users_in_arm,)``; the covariate is the same metric (or a correlated
    one) measured before the experiment, 0 for users without pre-period data.
    """
    y_c = _user_values(control_metric, "control_metric")
    y_t = _user_values(treatment_metric, "treatment_metric")
    x_c = _user_values(control_covariate, "control_covariate")
    x_t = _user_values(treatment_covariate, "treatment_covariate")
    if x_c.shape != y_c.shape or x_t.shape != y_t.shape:
        raise DataError(
            f"metric/covariate sizes differ: control {y_c.size}/{x_c.size}, "
            f"treatment {y_t.size}/{x_t.size}"
        )
    pooled = cuped_adjust(np.concatenate([y_c, y_t]), np.concatenate([x_c, x_t]))
    adjusted = welch_test(pooled.adjusted[: y_c.size], pooled.adjusted[y_c.size :], alpha=alpha)
    unadjusted = welch_test(y_c, y_t, alpha=alpha)
    return CupedResult(
        adjusted=adjusted,
        unadjusted=unadjusted,
        theta=pooled.theta,
        variance_reduction=1 - adjusted.std_error**2 / unadjusted.std_error**2,
    )


# --------------------------------------------------------------------------------------------
# Novelty: effect by days since first exposure
# --------------------------------------------------------------------------------------------


def effect_by_exposure_day(
    daily: pl.DataFrame | pl.LazyFrame,
    metric: str,
    *,
    control: str = "control",
    treatment: str = "treatment",
    user_col: str = "user_id",
    arm_col: str = "arm",
    day_col: str = "day",
    alpha: float = DEFAULT_ALPHA,
) -> pl.DataFrame:
    """Treatment effect as a function of days since each user's first exposure.

    ``daily``: one row per user and calendar day with an integer ``day_col`` (days since the
    experiment started) and the per-user daily ``metric``. Days a user was exposed but inactive
    must be present with a 0, or the inactive users silently drop out of that day. A user's first
    row is their exposure day (``days_since_exposure = 0``).

    Returns one row per ``days_since_exposure`` with ``n_control, n_treatment, mean_control,
    mean_treatment, difference, ci_lower, ci_upper, p_value, relative_lift``: per-day Welch tests.
    A novelty effect shows as a lift that decays with exposure age; a learning effect as one that
    grows. Two caveats: the CIs are per day (adjust with :func:`holm` before claiming any single
    day), and late days only contain early-exposed users, so their cohort differs.
    """
    _check_alpha(alpha)
    frame = daily.lazy()
    names = frame.collect_schema().names()
    missing = [c for c in (user_col, arm_col, day_col, metric) if c not in names]
    if missing:
        raise DataError(f"daily lacks column(s) {missing}; found {names}")
    exposure_age = (pl.col(day_col) - pl.col(day_col).min().over(user_col)).alias(
        "days_since_exposure"
    )
    moments = (
        frame.filter(pl.col(arm_col).is_in([control, treatment]))
        .with_columns(exposure_age)
        .group_by("days_since_exposure")
        .agg(
            *(
                expr
                for arm, tag in ((control, "control"), (treatment, "treatment"))
                for expr in (
                    (pl.col(arm_col) == arm).sum().alias(f"n_{tag}"),
                    pl.col(metric).filter(pl.col(arm_col) == arm).mean().alias(f"mean_{tag}"),
                    pl.col(metric).filter(pl.col(arm_col) == arm).var().alias(f"var_{tag}"),
                )
            )
        )
        .sort("days_since_exposure")
        .collect()
    )
    n_c = moments["n_control"].to_numpy().astype(np.float64)
    n_t = moments["n_treatment"].to_numpy().astype(np.float64)
    mean_c = moments["mean_control"].to_numpy().astype(np.float64)
    mean_t = moments["mean_treatment"].to_numpy().astype(np.float64)
    # Days with fewer than two users in an arm have no variance: NaN rows, kept so the day axis
    # stays complete.
    raw_var_c = moments["var_control"].fill_null(np.nan).to_numpy()
    raw_var_t = moments["var_treatment"].fill_null(np.nan).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        var_c = np.where(n_c > 1, raw_var_c, np.nan) / n_c
        var_t = np.where(n_t > 1, raw_var_t, np.nan) / n_t
    difference = mean_t - mean_c
    std_error, dof, _, p_value = _welch(difference, var_c, var_t, n_c, n_t)
    with np.errstate(invalid="ignore"):
        half_width = stats.t.ppf(1 - alpha / 2, dof) * std_error
    with np.errstate(divide="ignore", invalid="ignore"):
        lift = np.where(mean_c != 0, mean_t / mean_c - 1, np.nan)
    return moments.select(
        "days_since_exposure", "n_control", "n_treatment", "mean_control", "mean_treatment"
    ).with_columns(
        pl.Series("difference", difference),
        pl.Series("ci_lower", difference - half_width),
        pl.Series("ci_upper", difference + half_width),
        pl.Series("p_value", p_value),
        pl.Series("relative_lift", lift),
    )


# --------------------------------------------------------------------------------------------
# Guardrails
# --------------------------------------------------------------------------------------------

Direction = Literal["higher_is_better", "lower_is_better"]


@dataclass(frozen=True)
class Guardrail:
    """A metric that the treatment must not make worse by more than ``tolerance``.

    ``metric``: key into the results passed to :func:`evaluate_guardrails`.
    ``direction``: which way is good (``"lower_is_better"`` for latency or error rate).
    ``tolerance``: the largest acceptable *relative* degradation, e.g. ``0.01`` for 1 %. No
    default: a tolerance of 0 demands proof of no harm at all, which no finite experiment gives.
    """

    metric: str
    direction: Direction
    tolerance: float

    def __post_init__(self) -> None:
        if self.direction not in ("higher_is_better", "lower_is_better"):
            raise ConfigError(
                f"guardrail {self.metric!r}: direction must be 'higher_is_better' or "
                f"'lower_is_better', got {self.direction!r}"
            )
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ConfigError(
                f"guardrail {self.metric!r}: tolerance must be finite and >= 0, "
                f"got {self.tolerance}"
            )


@dataclass(frozen=True)
class GuardrailCheck:
    """Outcome of one guardrail: ``passed`` and a one-line ``reason`` for the report.

    ``worst_case``: the bound of the relative-lift CI on the harmful side (the most harm the data
    cannot rule out), signed like the lift.
    """

    guardrail: Guardrail
    relative_lift: float
    relative_ci: tuple[float, float]
    worst_case: float
    passed: bool
    reason: str


def evaluate_guardrails(
    guardrails: Sequence[Guardrail], results: Mapping[str, WelchResult]
) -> list[GuardrailCheck]:
    """Non-inferiority check of every guardrail against its metric's :class:`WelchResult`.

    A guardrail passes when the CI bound on the harmful side stays within ``tolerance``, i.e.
    the data rule out a degradation larger than the tolerance (a one-sided non-inferiority test at
    level ``alpha / 2`` of the result's CI). An underpowered guardrail therefore fails: "no
    significant harm" is not evidence of no harm.
    """
    missing = [g.metric for g in guardrails if g.metric not in results]
    if missing:
        raise DataError(f"no result for guardrail metric(s) {missing}; have {sorted(results)}")
    checks = []
    for guardrail in guardrails:
        result = results[guardrail.metric]
        lower, upper = result.relative_ci
        if guardrail.direction == "higher_is_better":
            worst, harm = lower, -lower
        else:
            worst, harm = upper, upper
        if math.isnan(worst):
            passed, reason = False, "relative lift undefined (control mean 0 or no variance)"
        elif harm <= guardrail.tolerance:
            passed = True
            reason = f"worst case {worst:+.2%} is within the {guardrail.tolerance:.2%} tolerance"
        else:
            passed = False
            reason = (
                f"cannot rule out a {harm:.2%} degradation (tolerance {guardrail.tolerance:.2%}; "
                f"lift {result.relative_lift:+.2%})"
            )
        checks.append(
            GuardrailCheck(
                guardrail=guardrail,
                relative_lift=result.relative_lift,
                relative_ci=result.relative_ci,
                worst_case=worst,
                passed=passed,
                reason=reason,
            )
        )
    return checks


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _user_values(values: ArrayLike, name: str) -> FloatArray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise DataError(f"{name} must be 1-D (one value per user), got shape {x.shape}")
    _check_arm_size(x.size, name)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{name} has {int((~np.isfinite(x)).sum())} non-finite values")
    return x


def _check_arm_size(n: int, name: str) -> None:
    if n < 2:
        raise DataError(f"{name} has {n} user(s); a variance needs at least 2")


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")


def _check_power(power: float) -> None:
    if not 0 < power < 1:
        raise ConfigError(f"power must be in (0, 1), got {power}")


def _check_variance(variance: float) -> None:
    if not (math.isfinite(variance) and variance > 0):
        raise DataError(f"variance must be finite and > 0, got {variance}")


def _require(frame: pl.DataFrame, columns: Sequence[str], source: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{source} lacks column(s) {missing}; found {frame.columns}")
