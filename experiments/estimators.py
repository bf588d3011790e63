"""Effect estimates of an A/B experiment: per-arm estimates, Welch comparisons, CUPED, novelty.

* **Per-arm estimates** (:class:`ArmEstimate`): a mean, or a ratio of per-user sums
  (clicks / impressions) whose variance comes from the delta method (Deng, Knoblich & Lu 2018,
  "Applying the Delta Method in Metric Analytics"). :func:`aggregate_per_user` sums an
  event-level log per user first (polars).
* **Welch's t-test** (:func:`welch_test`, :func:`compare`): difference of means with a CI, and the
  relative lift with a delta-method CI. :func:`welch_p_values` is the same test for a batch of
  experiments at once (simulations).
* **CUPED** (:func:`cuped_adjust`, :func:`cuped_test`): variance reduction with a pre-period
  covariate (Deng, Xu, Kohavi & Walker 2013).
* **Novelty** (:func:`effect_by_exposure_day`): the effect per day since a user's first exposure.

The conventions (unit of analysis, sign of an effect, what raises): :mod:`experiments.conventions`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from data.errors import DataError
from experiments.conventions import DEFAULT_ALPHA, check_alpha, check_arm_size

__all__ = [
    "ArmEstimate",
    "CupedAdjustment",
    "CupedResult",
    "WelchResult",
    "aggregate_per_user",
    "compare",
    "cuped_adjust",
    "cuped_test",
    "effect_by_exposure_day",
    "mean_by_arm",
    "mean_estimate",
    "ratio_by_arm",
    "ratio_estimate",
    "ratio_test",
    "welch_p_values",
    "welch_test",
]


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
        check_arm_size(row["n"], f"arm {row[arm_col]!r}")
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
        check_arm_size(row["n"], f"arm {arm!r}")
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
    check_alpha(alpha)
    check_arm_size(control.n, "control")
    check_arm_size(treatment.n, "treatment")
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
    check_arm_size(n_c, "control")
    check_arm_size(n_t, "treatment")
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
    check_alpha(alpha)
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
# Input checks
# --------------------------------------------------------------------------------------------


def _user_values(values: ArrayLike, name: str) -> FloatArray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise DataError(f"{name} must be 1-D (one value per user), got shape {x.shape}")
    check_arm_size(x.size, name)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{name} has {int((~np.isfinite(x)).sum())} non-finite values")
    return x


def _require(frame: pl.DataFrame, columns: Sequence[str], source: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{source} lacks column(s) {missing}; found {frame.columns}")
