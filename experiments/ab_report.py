"""Analyse a simulated A/B experiment and write ``result.json``, ``report.md`` and the plots.

The analysis reads the experiment the way an analyst would, from the observed arm of each user
(the statistics modules do every test, :mod:`experiments.conventions`), and then does what no
real experiment can: it compares the estimates with the truth, which the twin copies of the
population give
(:mod:`experiments.simulator`, :mod:`experiments.simulation_result`).

* **A/B estimates** per treatment arm against the control (the first arm): Welch tests and CIs of
  per-user CTR and engagement, CUPED with the pre-period's clicks, Holm and Benjamini-Hochberg
  over all comparisons, daily always-valid (mSPRT) inference, guardrails, the effect by days
  since exposure, the SRM check.
* **Truth**: the twin difference of expected clicks on the same users; whether the CI covers it,
  and the estimator's bias, RMSE and coverage over re-randomised assignments of the same
  simulated population (``coverage_replicates`` salts, through the real assignment code).
* **A/A**: re-randomised splits of the control copy: false-positive rate of the fixed-horizon test,
  of the alpha-spending test and of mSPRT with a look every day, of naive daily peeking, and the
  SRM false-alarm rate.
* **SRM power**: detection rate of an injected sample loss and of a shifted split, next to the
  formula (:func:`experiments.srm.srm_power`).
* **Drift**: each arm's true daily CTR around the drift day (drop, trough, recovery), the A/B test
  restricted to the post-drift days, and the monitors' detection delays.

Per-user metrics (the unit of randomisation is the user; only users with at least one session,
the exposed users, enter the analysis): ``ctr`` = clicks / sessions, ``engagement`` = clicks,
``latency_ms`` = mean amortised pipeline time per session, ``diversity`` = mean distinct
categories per slate item, ``long_tail_share`` = mean share of slate items outside the head.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl
from matplotlib.figure import Figure
from scipy import stats

from experiments.always_valid import SequentialConfig, always_valid_inference
from experiments.config import AnalysisConfig
from experiments.drift import DriftReport, detection_delay
from experiments.estimators import (
    ArmEstimate,
    WelchResult,
    compare,
    cuped_test,
    effect_by_exposure_day,
    mean_estimate,
    welch_test,
)
from experiments.group_sequential import group_sequential_test, look_correlation
from experiments.guardrails import evaluate_guardrails
from experiments.multiple_testing import benjamini_hochberg, holm
from experiments.power import minimum_detectable_effect
from experiments.simulation_result import SimulationResult
from experiments.srm import srm_check, srm_p_values, srm_power
from pipeline.assignment import assign_indices, hash_to_unit_interval

__all__ = [
    "METRICS",
    "aa_study",
    "analyse",
    "coverage_study",
    "daily_cumulative",
    "group_moments",
    "per_user_metrics",
    "replicate_assignments",
    "srm_study",
    "users_for_srm_power",
    "write_report",
]

METRICS = ("ctr", "engagement")
GUARDRAIL_METRICS = ("latency_ms", "diversity", "long_tail_share")
# Days averaged for the "before the drift" and "at the end" CTR levels of the drift summary.
LEVEL_DAYS = 3
# KS p-value of the comparison alert in the monitor summary (DriftConfig's documented default).
KS_REPORT_P_VALUE = 1e-3
# A time after the drift start and before the end of any window (window times are whole days).
_JUST_AFTER = 1e-6

FloatArray = npt.NDArray[np.float64]


# ------------------------------------------------------------------------------ per-user data


def per_user_metrics(
    result: SimulationResult, days: slice | None = None
) -> tuple[npt.NDArray[np.bool_], dict[str, FloatArray]]:
    """Exposed users and every per-user metric of every arm's copy over ``days`` (default all).

    Returns ``(exposed, metrics)``: ``exposed`` (U,) bool, users with a session in ``days``;
    ``metrics[name]`` (A, U) float64, NaN for unexposed users. ``expected_ctr`` and
    ``expected_engagement`` are the truth (click probabilities instead of sampled clicks).
    """
    window = days if days is not None else slice(None)
    sessions = result.sessions[:, window].sum(axis=1).astype(np.float64)
    exposed = sessions > 0
    clicks = result.clicks[:, :, window].sum(axis=2, dtype=np.float64)
    expected = result.expected_clicks[:, :, window].sum(axis=2, dtype=np.float64)
    per_session = np.where(exposed, sessions, np.nan)
    metrics = {
        "ctr": clicks / per_session,
        "engagement": np.where(exposed, clicks, np.nan),
        "expected_ctr": expected / per_session,
        "expected_engagement": np.where(exposed, expected, np.nan),
    }
    if days is None:  # the serving-side sums are kept for the whole run only
        metrics["latency_ms"] = result.latency_ms / per_session
        metrics["diversity"] = result.diversity / per_session
        metrics["long_tail_share"] = result.long_tail / per_session
    return exposed, metrics


def daily_cumulative(
    result: SimulationResult, arm: int, metric: str, *, expected: bool = False
) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """Per-user metric through each day: (U, D) values (0 where absent) and (U, D) presence.

    ``metric``: ``"ctr"`` or ``"engagement"``; ``expected`` uses click probabilities.
    """
    source = result.expected_clicks if expected else result.clicks
    clicks = np.cumsum(source[arm], axis=1, dtype=np.float64)
    sessions = np.cumsum(result.sessions, axis=1, dtype=np.float64)
    present = sessions > 0
    if metric == "ctr":
        values = np.divide(clicks, sessions, out=np.zeros_like(clicks), where=present)
    elif metric == "engagement":
        values = np.where(present, clicks, 0.0)
    else:
        raise ValueError(f"unknown metric {metric!r}; known: {list(METRICS)}")
    return values, present


# ------------------------------------------------------------------------------- replicates


def replicate_assignments(
    user_ids: Sequence[str], salt: str, weights: Mapping[str, float], n_replicates: int
) -> npt.NDArray[np.int8]:
    """(R, U) arm indices of ``n_replicates`` re-randomised assignments, salts ``salt/r``.

    Each replicate is a real assignment (:func:`pipeline.assignment.assign_indices`) with its
    own salt, so replicates are independent re-randomisations of one simulated population.
    """
    out = np.empty((n_replicates, len(user_ids)), dtype=np.int8)
    for r in range(n_replicates):
        out[r] = assign_indices(list(user_ids), f"{salt}/{r}", weights)
    return out


def group_moments(
    groups: npt.NDArray[np.integer],
    group: int,
    values: FloatArray,
    present: npt.NDArray[np.bool_],
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Size, mean and sample variance (ddof=1) of ``values`` over each replicate's group.

    ``groups``: (R, U) group index per replicate; ``values``, ``present``: (U,) or (U, D) (a
    column per peek). Returns three (R,) or (R, D) arrays; NaN where a group has < 2 users.
    One matrix product per moment: every replicate and peek at once.
    """
    mask = (groups == group).astype(np.float64)
    weight = present.astype(np.float64)
    x = np.where(present, values, 0.0)
    # Shift by a typical value so the sum of squares does not cancel catastrophically.
    shift = float(np.median(x[present])) if present.any() else 0.0
    centred = np.where(present, x - shift, 0.0)
    n = mask @ weight
    s1 = mask @ centred
    s2 = mask @ centred**2
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s1 / n
        variance = np.where(n > 1, (s2 - s1 * mean) / (n - 1), np.nan)
    return n, mean + shift, np.maximum(variance, 0.0)


def _compare_moments(
    n_c: float, m_c: float, v_c: float, n_t: float, m_t: float, v_t: float, alpha: float
) -> WelchResult:
    return compare(
        ArmEstimate(int(n_c), float(m_c), float(v_c / n_c)),
        ArmEstimate(int(n_t), float(m_t), float(v_t / n_t)),
        alpha=alpha,
    )


def aa_study(
    values: FloatArray,
    present: npt.NDArray[np.bool_],
    groups: npt.NDArray[np.integer],
    *,
    alpha: float,
    srm_alpha: float,
    mixture_sd: float,
    weights: Sequence[float],
) -> dict[str, Any]:
    """False-positive rates of A/A splits of one population (groups 0 vs 1 of ``groups``).

    ``values``, ``present``: (U, D) per-user cumulative metric and presence at each daily peek
    (the last column is the end of the experiment). Returns the rates of: the fixed-horizon Welch
    test at the end, mSPRT with a look every day (always-valid), the O'Brien-Fleming-type
    alpha-spending test with a look every day (:mod:`experiments.group_sequential`), naive daily
    peeking with the fixed-horizon z-test, and the SRM check (at ``srm_alpha``) on the exposed
    users per group.
    """
    n_c, m_c, v_c = group_moments(groups, 0, values, present)
    n_t, m_t, v_t = group_moments(groups, 1, values, present)
    final = [
        _compare_moments(
            n_c[r, -1], m_c[r, -1], v_c[r, -1], n_t[r, -1], m_t[r, -1], v_t[r, -1], alpha
        ).p_value
        for r in range(groups.shape[0])
    ]
    with np.errstate(divide="ignore", invalid="ignore"):
        sequential = always_valid_inference(
            m_t - m_c, v_t / n_t + v_c / n_c, SequentialConfig(mixture_sd=mixture_sd, alpha=alpha)
        )
        # Per-user values change between looks (CTR so far): not independent increments, so
        # the boundaries come from the looks' own correlation, the same for every split.
        spending = group_sequential_test(
            m_t - m_c,
            v_t / n_t + v_c / n_c,
            alpha=alpha,
            correlation=look_correlation((values, present)),
        )
    counts = np.stack([n_c[:, -1], n_t[:, -1]], axis=1)
    srm = srm_p_values(counts, np.asarray(weights[:2], dtype=np.float64))
    replicates = groups.shape[0]
    return {
        "replicates": replicates,
        "peeks": int(values.shape[1]),
        "fpr_fixed_horizon": float(np.mean(np.asarray(final) <= alpha)),
        "fpr_sequential_msprt": float(np.mean(sequential.rejected[:, -1])),
        "fpr_sequential_alpha_spending": float(np.mean(spending.rejected[:, -1])),
        "alpha_spending_looks": int(np.isfinite(spending.critical).sum()),
        "fpr_naive_daily_peeking": float(
            np.mean((sequential.fixed_horizon_p_value <= alpha).any(axis=1))
        ),
        "srm_false_alarm_rate": float(np.mean(srm < srm_alpha)),
        "fpr_standard_error": math.sqrt(alpha * (1 - alpha) / replicates),
        "alpha": alpha,
        "srm_alpha": srm_alpha,
        "mixture_sd": mixture_sd,
    }


def coverage_study(
    control: FloatArray,
    treatment: FloatArray,
    observed: npt.NDArray[np.bool_],
    groups: npt.NDArray[np.integer],
    control_group: int,
    treatment_group: int,
    true_effect: float,
    *,
    alpha: float,
) -> dict[str, Any]:
    """Bias, RMSE and CI coverage of the A/B estimate over re-randomised assignments.

    ``control``, ``treatment``: (U,) per-user metric in the two arms' copies; ``observed``: (U,)
    users that enter the analysis; ``groups``: (R, U) replicate assignments; ``true_effect``: the
    twin difference on the observed population.
    """
    n_c, m_c, v_c = group_moments(groups, control_group, control, observed)
    n_t, m_t, v_t = group_moments(groups, treatment_group, treatment, observed)
    results = [
        _compare_moments(n_c[r], m_c[r], v_c[r], n_t[r], m_t[r], v_t[r], alpha)
        for r in range(groups.shape[0])
    ]
    estimates = np.array([w.difference for w in results])
    lower = np.array([w.ci[0] for w in results])
    upper = np.array([w.ci[1] for w in results])
    return {
        "replicates": len(results),
        "true_effect": true_effect,
        "mean_estimate": float(estimates.mean()),
        "bias": float(estimates.mean() - true_effect),
        "bias_standard_error": float(estimates.std(ddof=1) / math.sqrt(len(results))),
        "rmse": float(np.sqrt(np.mean((estimates - true_effect) ** 2))),
        "mean_ci_width": float(np.mean(upper - lower)),
        "coverage": float(np.mean((lower <= true_effect) & (true_effect <= upper))),
        "nominal_coverage": 1 - alpha,
        "power": float(np.mean([w.p_value <= alpha for w in results])),
    }


def srm_study(
    user_ids: Sequence[str],
    exposed: npt.NDArray[np.bool_],
    groups: npt.NDArray[np.integer],
    weights: Mapping[str, float],
    *,
    salt: str,
    loss_group: int,
    loss_fraction: float,
    shift: float,
    srm_alpha: float,
) -> dict[str, Any]:
    """Detection rates of the SRM check, simulated over replicates and by the formula.

    * loss: ``loss_fraction`` of group ``loss_group``'s users vanish (a per-user hash decides,
      independent of the assignment);
    * shift: the split really runs ``shift`` off (the first arm's share moved to the last arm),
      same per-replicate salts, so the same users are re-cut.
    Also the false-alarm rate with neither.
    """
    names = list(weights)
    expected = np.array([weights[a] for a in names], dtype=np.float64)
    n_arms = expected.size
    n_exposed = int(exposed.sum())

    def counts(assigned: npt.NDArray[np.integer], keep: npt.NDArray[np.bool_]) -> FloatArray:
        one_hot = assigned[:, :, None] == np.arange(n_arms)
        return (one_hot & keep[None, :, None]).sum(axis=1).astype(np.float64)

    clean = srm_p_values(counts(groups, exposed), expected)
    survives = hash_to_unit_interval(list(user_ids), f"{salt}/sample-loss") >= loss_fraction
    kept = exposed[None, :] & ((groups != loss_group) | survives[None, :])
    lossy_counts = np.stack(
        [((groups == g) & kept).sum(axis=1) for g in range(n_arms)], axis=1
    ).astype(np.float64)
    lossy = srm_p_values(lossy_counts, expected)
    shares = expected / expected.sum()
    shifted_shares = shares.copy()
    shifted_shares[0] -= shift
    shifted_shares[-1] += shift
    shifted_weights = dict(zip(names, shifted_shares.tolist(), strict=True))
    shifted_groups = np.stack(
        [
            assign_indices(list(user_ids), f"{salt}/{r}", shifted_weights)
            for r in range(groups.shape[0])
        ]
    )
    shifted = srm_p_values(counts(shifted_groups, exposed), expected)
    lossy_shares = shares.copy()
    lossy_shares[loss_group] *= 1 - loss_fraction
    return {
        "replicates": int(groups.shape[0]),
        "exposed_users": n_exposed,
        "srm_alpha": srm_alpha,
        "false_alarm_rate": float(np.mean(clean < srm_alpha)),
        "loss": {
            "arm": names[loss_group],
            "fraction": loss_fraction,
            "detection_rate": float(np.mean(lossy < srm_alpha)),
            "formula_power": srm_power(
                int(lossy_counts.sum(axis=1).mean()), shares, lossy_shares, alpha=srm_alpha
            ),
            "users_for_95_percent_detection": users_for_srm_power(
                shares, lossy_shares, 0.95, alpha=srm_alpha
            ),
        },
        "shift": {
            "shift": shift,
            "actual_shares": shifted_shares.tolist(),
            "detection_rate": float(np.mean(shifted < srm_alpha)),
            "formula_power": srm_power(n_exposed, shares, shifted_shares, alpha=srm_alpha),
        },
    }


def users_for_srm_power(
    expected_shares: FloatArray, actual_shares: FloatArray, power: float, *, alpha: float
) -> int:
    """Smallest number of users at which :func:`srm_power` reaches ``power`` (bisection)."""
    low, high = 2, 2
    while srm_power(high, expected_shares, actual_shares, alpha=alpha) < power:
        low, high = high, high * 2
        if high > 10**12:  # the shares are (numerically) equal: no size detects it
            return -1
    while high - low > 1:
        middle = (low + high) // 2
        if srm_power(middle, expected_shares, actual_shares, alpha=alpha) >= power:
            high = middle
        else:
            low = middle
    return high


# ---------------------------------------------------------------------------------- analysis


def analyse(result: SimulationResult) -> dict[str, Any]:
    """Every figure of the report, as a JSON-ready dict (see the module docstring)."""
    config = result.config
    analysis = config.analysis
    names = list(config.arm_names)
    weights = config.weights
    assignment = assign_indices(result.user_ids, config.salt, weights)
    lost = _sample_loss(result, assignment)
    exposed, metrics = per_user_metrics(result)
    observed = exposed & ~lost
    counts = {name: int((observed & (assignment == a)).sum()) for a, name in enumerate(names)}
    srm = srm_check(counts, weights, alpha=analysis.srm_alpha)

    planning = dict(result.planning)
    mixture_sd = analysis.mixture_sd or float(planning.get("mde_absolute_target") or 0) or None
    comparisons = {}
    p_values: list[float] = []
    labels: list[str] = []
    for t in range(1, len(names)):
        comparison = _compare_arms(result, metrics, assignment, observed, exposed, 0, t, mixture_sd)
        comparisons[names[t]] = comparison
        for metric in METRICS:
            p_values.append(comparison["metrics"][metric]["p_value"])
            labels.append(f"{names[t]}:{metric}")
    adjusted = {
        "labels": labels,
        "p_values": p_values,
        "holm": holm(p_values).tolist(),
        "benjamini_hochberg": benjamini_hochberg(p_values).tolist(),
    }
    replicates = max(analysis.aa_replicates, analysis.coverage_replicates, analysis.srm_replicates)
    studies = _replicate_studies(result, metrics, exposed, replicates, mixture_sd)
    post_planning = _observed_power(metrics, observed, assignment, analysis, len(names))
    return {
        "config": config.to_dict(),
        "arms": names,
        "control": names[0],
        "users": {
            "population": len(result.user_ids),
            "exposed": int(exposed.sum()),
            "observed": int(observed.sum()),
            "lost_to_injected_sample_loss": int((lost & exposed).sum()),
            "per_arm": counts,
        },
        "srm": {
            "observed": dict(zip(srm.arms, srm.observed, strict=True)),
            "expected": dict(zip(srm.arms, srm.expected, strict=True)),
            "chi2": srm.chi2,
            "p_value": srm.p_value,
            "alpha": srm.alpha,
            "mismatch": srm.mismatch,
        },
        "planning": planning,
        "observed_power": post_planning,
        "comparisons": comparisons,
        "multiple_testing": adjusted,
        **studies,
        "daily": _daily_series(result, assignment, observed),
        "drift": _drift_summary(result, assignment, observed),
        "monitors": _monitor_summary(result),
        "retrains": result.retrains.to_dicts(),
        "catalog_coverage": result.catalog_coverage,
        "new_item_coverage": result.new_item_coverage,
        "serving": _serving_summary(result),
        "timings": result.timings,
    }


def _sample_loss(
    result: SimulationResult, assignment: npt.NDArray[np.int64]
) -> npt.NDArray[np.bool_]:
    """(U,) users whose data the injected logging loss dropped (none without a loss)."""
    loss = result.config.sample_loss
    if loss.arm is None or loss.fraction == 0:
        return np.zeros(len(result.user_ids), dtype=bool)
    arm = result.config.arm_names.index(loss.arm)
    draw = hash_to_unit_interval(result.user_ids, f"{result.config.salt}/sample-loss")
    return (assignment == arm) & (draw < loss.fraction)


def _compare_arms(
    result: SimulationResult,
    metrics: Mapping[str, FloatArray],
    assignment: npt.NDArray[np.int64],
    observed: npt.NDArray[np.bool_],
    exposed: npt.NDArray[np.bool_],
    c: int,
    t: int,
    mixture_sd: float | None,
) -> dict[str, Any]:
    """Treatment ``t`` against control ``c``: estimates, truth, CUPED, sequential, guardrails."""
    analysis = result.config.analysis
    in_c, in_t = observed & (assignment == c), observed & (assignment == t)
    out: dict[str, Any] = {"metrics": {}, "guardrails": []}
    covariate = result.pre_user_clicks
    for metric in METRICS:
        welch = welch_test(metrics[metric][c, in_c], metrics[metric][t, in_t], alpha=analysis.alpha)
        truth = metrics[f"expected_{metric}"]
        true_effect = float(np.mean(truth[t, observed] - truth[c, observed]))
        out["metrics"][metric] = {
            **_welch_dict(welch),
            "true_effect": true_effect,
            "true_relative_lift": true_effect / float(np.mean(truth[c, observed])),
            "estimation_error": welch.difference - true_effect,
            "ci_covers_true_effect": bool(welch.ci[0] <= true_effect <= welch.ci[1]),
            "cuped": None,
        }
        # CUPED needs a covariate that varies (a pre-period where nobody clicked explains nothing).
        if np.ptp(covariate[in_c | in_t]) > 0:
            cuped = cuped_test(
                metrics[metric][c, in_c],
                covariate[in_c],
                metrics[metric][t, in_t],
                covariate[in_t],
                alpha=analysis.alpha,
            )
            out["metrics"][metric]["cuped"] = {
                **_welch_dict(cuped.adjusted),
                "theta": cuped.theta,
                "variance_reduction": cuped.variance_reduction,
                "ci_covers_true_effect": bool(
                    cuped.adjusted.ci[0] <= true_effect <= cuped.adjusted.ci[1]
                ),
            }
    if mixture_sd is not None:
        out["sequential"] = _sequential(result, assignment, observed, c, t, mixture_sd)
    guardrail_results = {
        name: welch_test(metrics[name][c, in_c], metrics[name][t, in_t], alpha=analysis.alpha)
        for name in GUARDRAIL_METRICS
    }
    for check in evaluate_guardrails(analysis.guardrails, guardrail_results):
        out["guardrails"].append(
            {
                "metric": check.guardrail.metric,
                "direction": check.guardrail.direction,
                "tolerance": check.guardrail.tolerance,
                "relative_lift": check.relative_lift,
                "relative_ci": list(check.relative_ci),
                "passed": check.passed,
                "reason": check.reason,
            }
        )
    out["novelty"] = _novelty(result, assignment, observed, c, t)
    return out


def _welch_dict(welch: WelchResult) -> dict[str, Any]:
    return {
        "control": welch.control.estimate,
        "treatment": welch.treatment.estimate,
        "n_control": welch.control.n,
        "n_treatment": welch.treatment.n,
        "difference": welch.difference,
        "ci": list(welch.ci),
        "p_value": welch.p_value,
        "relative_lift": welch.relative_lift,
        "relative_ci": list(welch.relative_ci),
        "significant": welch.significant,
    }


def _sequential(
    result: SimulationResult,
    assignment: npt.NDArray[np.int64],
    observed: npt.NDArray[np.bool_],
    c: int,
    t: int,
    mixture_sd: float,
) -> dict[str, Any]:
    """mSPRT with a look after every day, on the primary metric, plus the true cumulative effect."""
    analysis = result.config.analysis
    metric = analysis.primary_metric
    groups = assignment[None, :]
    v_c, present = daily_cumulative(result, c, metric)
    v_t, _ = daily_cumulative(result, t, metric)
    seen = present & observed[:, None]
    n_c, m_c, s_c = group_moments(groups, c, v_c, seen)
    n_t, m_t, s_t = group_moments(groups, t, v_t, seen)
    with np.errstate(divide="ignore", invalid="ignore"):
        inference = always_valid_inference(
            (m_t - m_c)[0],
            (s_t / n_t + s_c / n_c)[0],
            SequentialConfig(mixture_sd=mixture_sd, alpha=analysis.alpha),
        )
    e_c, _ = daily_cumulative(result, c, metric, expected=True)
    e_t, _ = daily_cumulative(result, t, metric, expected=True)
    with np.errstate(invalid="ignore"):
        truth = np.where(seen, e_t - e_c, 0.0).sum(axis=0) / seen.sum(axis=0)
    first = int(inference.first_rejection)
    in_c, in_t = assignment == c, assignment == t
    spending = group_sequential_test(
        (m_t - m_c)[0],
        (s_t / n_t + s_c / n_c)[0],
        alpha=analysis.alpha,
        correlation=look_correlation((v_c[in_c], seen[in_c]), (v_t[in_t], seen[in_t])),
    )
    spending_first = int(spending.first_rejection)
    z = _z(analysis.alpha)
    covered = (inference.ci_lower <= truth) & (truth <= inference.ci_upper)
    # The confidence sequence is a running intersection for one fixed effect; when the effect
    # itself moves (drift, users' states learning), the intersection can become empty.
    empty = np.flatnonzero(inference.ci_lower > inference.ci_upper)
    return {
        "metric": metric,
        "mixture_sd": mixture_sd,
        "day": list(range(result.n_days)),
        "difference": inference.difference.tolist(),
        "fixed_ci_lower": (inference.difference - z * inference.std_error).tolist(),
        "fixed_ci_upper": (inference.difference + z * inference.std_error).tolist(),
        "always_valid_p_value": inference.p_value.tolist(),
        "confidence_sequence_lower": inference.ci_lower.tolist(),
        "confidence_sequence_upper": inference.ci_upper.tolist(),
        "true_cumulative_effect": truth.tolist(),
        "first_rejection_day": first if first >= 0 else None,
        "alpha_spending_first_rejection_day": spending_first if spending_first >= 0 else None,
        "repeated_ci_lower": spending.ci_lower.tolist(),
        "repeated_ci_upper": spending.ci_upper.tolist(),
        "confidence_sequence_covers_truth_every_day": bool(covered.all()),
        "confidence_sequence_covers_truth_days": int(covered.sum()),
        "confidence_sequence_empty_from_day": int(empty[0]) if empty.size else None,
        "true_effect_range": [float(np.nanmin(truth)), float(np.nanmax(truth))],
    }


def _z(alpha: float) -> float:
    """Two-sided normal quantile of ``alpha``."""
    return float(stats.norm.ppf(1 - alpha / 2))


def _novelty(
    result: SimulationResult,
    assignment: npt.NDArray[np.int64],
    observed: npt.NDArray[np.bool_],
    c: int,
    t: int,
) -> list[dict[str, Any]]:
    """Effect on daily clicks by days since each user's first session (novelty / learning)."""
    names = result.config.arm_names
    active = result.sessions > 0
    users = np.flatnonzero(observed & ((assignment == c) | (assignment == t)))
    first = active[users].argmax(axis=1)
    days = np.arange(result.n_days)
    keep = days[None, :] >= first[:, None]
    rows, cols = np.nonzero(keep)
    arm = assignment[users][rows]
    clicks = result.clicks[arm, users[rows], cols]
    frame = pl.DataFrame(
        {
            "user_id": users[rows],
            "arm": np.array(names)[arm],
            "day": cols,
            "clicks": clicks.astype(np.float64),
        }
    )
    table = effect_by_exposure_day(
        frame, "clicks", control=names[c], treatment=names[t], alpha=result.config.analysis.alpha
    )
    return _finite_records(table)


def _replicate_studies(
    result: SimulationResult,
    metrics: Mapping[str, FloatArray],
    exposed: npt.NDArray[np.bool_],
    replicates: int,
    mixture_sd: float | None,
) -> dict[str, Any]:
    """A/A false-positive rates, coverage/bias of the estimates and SRM detection rates.

    Replicates study the method, not this run's injected loss: every exposed user counts.
    """
    config = result.config
    analysis = config.analysis
    if replicates == 0:
        return {}
    groups = replicate_assignments(
        result.user_ids, f"{config.salt}/replicate", config.weights, replicates
    )
    out: dict[str, Any] = {}
    weights = list(config.weights.values())
    if analysis.aa_replicates and mixture_sd is not None:
        values, present = daily_cumulative(result, 0, analysis.primary_metric)
        out["aa"] = aa_study(
            values,
            present,
            groups[: analysis.aa_replicates],
            alpha=analysis.alpha,
            srm_alpha=analysis.srm_alpha,
            mixture_sd=mixture_sd,
            weights=weights,
        )
    if analysis.coverage_replicates:
        coverage: dict[str, Any] = {}
        for t, name in enumerate(config.arm_names[1:], start=1):
            coverage[name] = {}
            for metric in METRICS:
                truth = metrics[f"expected_{metric}"]
                coverage[name][metric] = coverage_study(
                    metrics[metric][0],
                    metrics[metric][t],
                    exposed,
                    groups[: analysis.coverage_replicates],
                    0,
                    t,
                    float(np.mean(truth[t, exposed] - truth[0, exposed])),
                    alpha=analysis.alpha,
                )
        out["coverage"] = coverage
    if analysis.srm_replicates:
        loss = config.sample_loss
        loss_arm = config.arm_names.index(loss.arm) if loss.arm else len(weights) - 1
        out["srm_power"] = srm_study(
            result.user_ids,
            exposed,
            groups[: analysis.srm_replicates],
            config.weights,
            salt=f"{config.salt}/replicate",
            loss_group=loss_arm,
            loss_fraction=loss.fraction or 0.02,
            shift=analysis.srm_shift,
            srm_alpha=analysis.srm_alpha,
        )
    return out


def _observed_power(
    metrics: Mapping[str, FloatArray],
    observed: npt.NDArray[np.bool_],
    assignment: npt.NDArray[np.int64],
    analysis: AnalysisConfig,
    n_arms: int,
) -> dict[str, Any]:
    """The power analysis redone with the control's observed variance and arm sizes."""
    metric = analysis.primary_metric
    values = metrics[metric][0, observed & (assignment == 0)]
    if values.size < 2:
        return {}
    estimate = mean_estimate(values)
    variance = estimate.variance * estimate.n
    n = int(np.bincount(assignment[observed], minlength=n_arms).min())
    mde = minimum_detectable_effect(max(n, 2), variance, alpha=analysis.alpha, power=analysis.power)
    return {
        "metric": metric,
        "control_mean": estimate.estimate,
        "variance": variance,
        "users_per_arm": n,
        "mde_absolute": mde,
        "mde_relative": mde / estimate.estimate if estimate.estimate else math.nan,
    }


def _daily_series(
    result: SimulationResult, assignment: npt.NDArray[np.int64], observed: npt.NDArray[np.bool_]
) -> dict[str, Any]:
    """Per arm and day: observed per-user CTR with its CI, and the arm copy's true CTR."""
    alpha = result.config.analysis.alpha
    out: dict[str, Any] = {}
    z = _z(alpha)
    for a, name in enumerate(result.config.arm_names):
        rows = []
        for day in range(result.n_days):
            active = result.sessions[:, day] > 0
            mine = active & observed & (assignment == a)
            sessions = result.sessions[:, day].astype(np.float64)
            ctr = result.clicks[a, mine, day] / sessions[mine]
            true_ctr = result.expected_clicks[a, active, day] / sessions[active]
            row: dict[str, Any] = {"day": day, "users": int(mine.sum())}
            if ctr.size >= 2:
                estimate = mean_estimate(ctr)
                row |= {
                    "ctr": estimate.estimate,
                    "ci_lower": estimate.estimate - z * estimate.std_error,
                    "ci_upper": estimate.estimate + z * estimate.std_error,
                }
            row["true_ctr"] = float(true_ctr.mean()) if true_ctr.size else None
            rows.append(row)
        out[name] = rows
    return out


def _drift_summary(
    result: SimulationResult, assignment: npt.NDArray[np.int64], observed: npt.NDArray[np.bool_]
) -> dict[str, Any] | None:
    """Each arm's true CTR around the drift day and the A/B test on the post-drift days.

    Per arm, from the twin copy's true daily CTR (all active users, no sampling noise):
    ``ctr_before`` (the last ``LEVEL_DAYS`` days before the drift), ``ctr_after`` (the first
    ``LEVEL_DAYS`` days once the drift has fully ramped in), ``drop = before - after`` and its
    relative size, the ``trough`` after the drift, ``ctr_end`` (the last ``LEVEL_DAYS`` days),
    ``trend_after = end - after`` (> 0: recovering), ``recovered_share = (end - trough) /
    (before - trough)`` and ``days_to_half_recovery`` (from the drift day, ``None`` if never).

    That curve mixes the drift with everything else that moves CTR (fatigue, the catalogue
    ageing), so each arm also gets its *drift cost*: the share of the clicks its slates would have
    earned in the world without drift (same users, slates, times and fatigue) that they earn in
    the drifted one; 1 before the drift. ``share_lowest`` is its minimum after the drift,
    ``share_end`` its mean over the last days, ``cost_recovered`` the part of the lost share won
    back by the end, ``(end - lowest) / (1 - lowest)``: an arm that adapts to the new preferences
    wins it back, a frozen one cannot.
    """
    drift_day = result.config.drift_day
    if drift_day is None:
        return None
    ramp = math.ceil(float(result.config.world.get("drift_ramp_days", 1.0)))
    daily = _daily_series(result, assignment, observed)
    arms: dict[str, Any] = {}
    for name, rows in daily.items():
        curve = np.array([r["true_ctr"] if r["true_ctr"] is not None else np.nan for r in rows])
        before = float(np.nanmean(curve[max(0, drift_day - LEVEL_DAYS) : drift_day]))
        settled = min(drift_day + ramp, curve.size - 1)
        after = float(np.nanmean(curve[settled : settled + LEVEL_DAYS]))
        post = curve[drift_day:]
        trough_offset = int(np.nanargmin(post))
        trough = float(post[trough_offset])
        end = float(np.nanmean(curve[-LEVEL_DAYS:]))
        fall = before - trough
        recovered = (
            np.flatnonzero(post[trough_offset:] >= trough + fall / 2) if fall > 0 else np.array([])
        )
        arms[name] = {
            "ctr_before": before,
            "ctr_after": after,
            "drop": before - after,
            "relative_drop": (before - after) / before if before else math.nan,
            "trough": trough,
            "trough_day": drift_day + trough_offset,
            "ctr_end": end,
            "trend_after": end - after,
            "recovered_share": (end - trough) / fall if fall > 0 else math.nan,
            "days_to_half_recovery": (
                int(trough_offset + recovered[0]) if recovered.size else None
            ),
        } | _drift_cost(result, name, drift_day)
    exposed_post, metrics = per_user_metrics(result, slice(drift_day, None))
    seen = exposed_post & observed
    comparisons = {}
    alpha = result.config.analysis.alpha
    for t, name in enumerate(result.config.arm_names[1:], start=1):
        in_c, in_t = seen & (assignment == 0), seen & (assignment == t)
        welch = welch_test(metrics["ctr"][0, in_c], metrics["ctr"][t, in_t], alpha=alpha)
        truth = metrics["expected_ctr"]
        true_effect = float(np.mean(truth[t, seen] - truth[0, seen]))
        comparisons[name] = {
            **_welch_dict(welch),
            "true_effect": true_effect,
            "ci_covers_true_effect": bool(welch.ci[0] <= true_effect <= welch.ci[1]),
        }
    return {
        "kind": result.config.world.get("drift"),
        "drift_day": drift_day,
        "arms": arms,
        "post_drift_ctr": comparisons,
    }


def _drift_cost(result: SimulationResult, arm: str, drift_day: int) -> dict[str, Any]:
    """The arm's daily share of its no-drift clicks after the drift; see :func:`_drift_summary`."""
    daily = result.daily.filter(pl.col("arm") == arm).sort("day")
    if "undrifted_expected_clicks" not in daily.columns:  # a result saved before it was recorded
        return {}
    with np.errstate(invalid="ignore", divide="ignore"):
        share = daily["expected_clicks"].to_numpy() / daily["undrifted_expected_clicks"].to_numpy()
    post = share[drift_day:]
    if not np.isfinite(post).any():
        return {}
    lowest_offset = int(np.nanargmin(post))
    lowest = float(post[lowest_offset])
    end = float(np.nanmean(share[-LEVEL_DAYS:]))
    return {
        "no_drift_share": [None if not np.isfinite(v) else float(v) for v in share],
        "share_lowest": lowest,
        "share_lowest_day": drift_day + lowest_offset,
        "share_end": end,
        "cost_recovered": (end - lowest) / (1 - lowest) if lowest < 1 else math.nan,
    }


def _monitor_summary(result: SimulationResult) -> dict[str, Any]:
    """Per arm and monitor: daily PSI/KS and the detection delay after the known drift day.

    ``detection`` scores the monitor's own alert (as configured); ``ks_detection`` scores a KS
    alert at ``KS_REPORT_P_VALUE`` from the same windows, for comparison (KS reacts sooner to a
    shift and also to the slow evolution of an arm's own traffic: see its false alarms).
    """
    frame = result.monitors
    out: dict[str, Any] = {}
    for (arm, monitor), windows in frame.group_by(["arm", "monitor"], maintain_order=True):
        windows = windows.sort("day")
        ks_windows = windows.with_columns(alert=pl.col("ks_p_value") < KS_REPORT_P_VALUE)
        out.setdefault(str(arm), {})[str(monitor)] = {
            "windows": _finite_records(windows.drop("arm", "monitor")),
            "detection": _detection(windows, result.config.drift_day),
            "ks_detection": _detection(ks_windows, result.config.drift_day),
        }
    return out


def _detection(windows: pl.DataFrame, drift_day: int | None) -> dict[str, Any]:
    """Detection delay (days) and false alarms of the ``alert`` column of daily windows."""
    alerts = windows.filter(pl.col("alert"))
    if drift_day is None:
        return {"false_alarms": int(alerts.height)}
    report = DriftReport(
        windows=windows, first_alert_time=float(alerts["time"][0]) if alerts.height else None
    )
    # Window times are the days' ends, so the window that ends exactly at the drift start holds
    # no drifted data: the drift time sits just after it. The delay is then the time from the
    # drift start to the end of the first alerting window (>= 1 day with daily windows).
    delay = detection_delay(report, drift_day + _JUST_AFTER)
    return {
        "drift_day": drift_day,
        "first_alert_day_end": delay.first_alert_time,
        "delay_days": None if delay.delay is None else round(delay.delay + _JUST_AFTER, 6),
        "false_alarms_before_drift": delay.false_alarms,
    }


def _serving_summary(result: SimulationResult) -> dict[str, Any]:
    """Per arm: degraded responses, batch latency and amortised time per session."""
    summary = result.daily.group_by("arm", maintain_order=True).agg(
        pl.col("degraded").sum().alias("degraded_responses"),
        pl.col("batch_ms_p50").median(),
        pl.col("batch_ms_p99").max().alias("batch_ms_p99_max"),
        pl.col("ms_per_session").mean(),
    )
    return {row.pop("arm"): row for row in summary.to_dicts()}


def _finite_records(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts with NaN / inf turned into ``None`` (valid JSON)."""
    records = frame.to_dicts()
    for record in records:
        for key, value in record.items():
            if isinstance(value, float) and not math.isfinite(value):
                record[key] = None
    return records


# ----------------------------------------------------------------------------------- writing


def write_report(
    result: SimulationResult, analysis: Mapping[str, Any], out: str | Path
) -> dict[str, Path]:
    """Write ``result.json``, ``report.md`` and the plots into ``out``; returns their paths."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "result": directory / "result.json",
        "report": directory / "report.md",
        "daily_ctr": directory / "daily_ctr.png",
        "cumulative_effect": directory / "cumulative_effect.png",
        "drift": directory / "drift.png",
    }
    paths["result"].write_text(json.dumps(_json_safe(analysis), indent=2, sort_keys=True) + "\n")
    _plot_daily(analysis, result, paths["daily_ctr"])
    _plot_cumulative(analysis, paths["cumulative_effect"])
    _plot_drift(analysis, result, paths["drift"])
    paths["report"].write_text(render_markdown(analysis, paths))
    return paths


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _plot_daily(analysis: Mapping[str, Any], result: SimulationResult, path: Path) -> None:
    figure = Figure(figsize=(9, 4.5))
    axes = figure.subplots()
    for index, (name, rows) in enumerate(analysis["daily"].items()):
        color = f"C{index}"
        days = [r["day"] for r in rows if "ctr" in r]
        axes.plot(days, [r["ctr"] for r in rows if "ctr" in r], color=color, label=f"{name} (A/B)")
        axes.fill_between(
            days,
            [r["ci_lower"] for r in rows if "ctr" in r],
            [r["ci_upper"] for r in rows if "ctr" in r],
            color=color,
            alpha=0.2,
        )
        axes.plot(
            [r["day"] for r in rows],
            [r["true_ctr"] for r in rows],
            color=color,
            linestyle="--",
            label=f"{name} (true, all users)",
        )
    _mark_drift(axes, result)
    axes.set(xlabel="experiment day", ylabel="per-user CTR", title="Daily CTR per arm (95% CI)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _plot_cumulative(analysis: Mapping[str, Any], path: Path) -> None:
    figure = Figure(figsize=(9, 4.5))
    axes = figure.subplots()
    for index, (name, comparison) in enumerate(analysis["comparisons"].items()):
        sequential = comparison.get("sequential")
        if sequential is None:
            continue
        color = f"C{index + 1}"
        days = sequential["day"]
        axes.plot(days, sequential["difference"], color=color, label=f"{name} - control")
        axes.fill_between(
            days,
            _nan(sequential["fixed_ci_lower"]),
            _nan(sequential["fixed_ci_upper"]),
            color=color,
            alpha=0.25,
            label="fixed-horizon CI",
        )
        axes.plot(
            days,
            _nan(sequential["confidence_sequence_lower"]),
            color=color,
            linestyle=":",
            label="always-valid CS",
        )
        axes.plot(days, _nan(sequential["confidence_sequence_upper"]), color=color, linestyle=":")
        axes.plot(
            days,
            sequential["true_cumulative_effect"],
            color="black",
            linestyle="--",
            label="true effect",
        )
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.set(
        xlabel="experiment day",
        ylabel="cumulative effect (per-user metric)",
        title="Cumulative treatment effect",
    )
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _plot_drift(analysis: Mapping[str, Any], result: SimulationResult, path: Path) -> None:
    monitors = analysis["monitors"]
    figure = Figure(figsize=(9, 6))
    axes = figure.subplots(2, 1, sharex=True)
    threshold = result.config.monitors.drift.psi_threshold
    for row, monitor in enumerate(("clicked_popularity", "score")):
        ax = axes[row]
        for index, name in enumerate(result.config.arm_names):
            windows = monitors.get(name, {}).get(monitor, {}).get("windows", [])
            if windows:
                ax.plot(
                    [w["day"] for w in windows],
                    [w["psi"] for w in windows],
                    marker="o",
                    markersize=3,
                    color=f"C{index}",
                    label=name,
                )
        ax.axhline(threshold, color="red", linewidth=0.8, linestyle="--", label="PSI alert")
        _mark_drift(ax, result)
        ax.set(ylabel="PSI", title=f"Drift monitor: {monitor.replace('_', ' ')}")
        ax.legend(fontsize="small")
    axes[-1].set_xlabel("experiment day")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _mark_drift(axes: Any, result: SimulationResult) -> None:
    drift_day = result.config.drift_day
    if drift_day is not None:
        axes.axvline(drift_day, color="black", linewidth=1, label=f"true drift (day {drift_day})")


def _nan(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


# ---------------------------------------------------------------------------------- markdown


def render_markdown(analysis: Mapping[str, Any], paths: Mapping[str, Path]) -> str:
    """The human-readable report: one section per part of the analysis, then the plots."""
    sections = (
        _md_overview,
        _md_srm,
        _md_power,
        _md_results,
        _md_aa,
        _md_coverage,
        _md_srm_power,
        _md_drift,
        _md_monitors,
    )
    lines = ["# A/B simulation report", ""]
    for section in sections:
        lines += section(analysis)
    lines += ["## Plots", ""]
    lines += [f"![{key}]({paths[key].name})" for key in ("daily_ctr", "cumulative_effect", "drift")]
    return "\n".join(lines) + "\n"


def _md_overview(analysis: Mapping[str, Any]) -> list[str]:
    users, timings = analysis["users"], analysis["timings"]
    return [
        f"Arms: {', '.join(analysis['arms'])} (control: **{analysis['control']}**). "
        f"Population {users['population']:,}, exposed {users['exposed']:,}, "
        f"observed {users['observed']:,}.",
        f"Simulated {timings.get('sessions', 0):,.0f} sessions per arm in "
        f"{timings.get('simulation_seconds', 0):.1f} s "
        f"({timings.get('arm_sessions_per_second', 0):,.0f} arm-sessions/s).",
        "",
    ]


def _md_srm(analysis: Mapping[str, Any]) -> list[str]:
    srm = analysis["srm"]
    verdict = "**MISMATCH**: do not trust the results" if srm["mismatch"] else "no mismatch"
    return [
        "## Sample ratio",
        "",
        f"Observed {srm['observed']}, expected {_round(srm['expected'])}: chi2 = "
        f"{srm['chi2']:.2f}, p = {srm['p_value']:.3g} (alpha {srm['alpha']}): {verdict}.",
        "",
    ]


def _md_power(analysis: Mapping[str, Any]) -> list[str]:
    planning = analysis.get("planning", {})
    if "variance" not in planning:
        return []
    lines = [
        "## Power analysis (before the run)",
        "",
        f"Metric {planning['metric']}: baseline {planning['baseline']:.4f}, planning "
        f"variance {planning['variance']:.4g}, ~{planning['expected_users_per_arm']:,} "
        f"exposed users per arm expected. MDE at that size: "
        f"{planning['mde_absolute_at_expected_n']:.4g} (absolute); a "
        f"{planning['mde_relative_target']:.0%} lift needs "
        f"{planning['required_users_per_arm']:,} users per arm.",
    ]
    observed = analysis.get("observed_power", {})
    if observed:
        lines.append(
            f"Observed: control mean {observed['control_mean']:.4f}, variance "
            f"{observed['variance']:.4g}, {observed['users_per_arm']:,} users per arm, "
            f"MDE {observed['mde_absolute']:.4g} ({observed['mde_relative']:.1%})."
        )
    return [*lines, ""]


def _md_results(analysis: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Results (treatment - control)",
        "",
        "| arm | metric | control | treatment | difference | 95% CI | p | true effect | "
        "covered | CUPED CI |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, comparison in analysis["comparisons"].items():
        for metric, m in comparison["metrics"].items():
            lines.append(
                f"| {name} | {metric} | {m['control']:.4f} | {m['treatment']:.4f} | "
                f"{m['difference']:+.4f} | {_interval(m['ci'])} | {m['p_value']:.3g} | "
                f"{m['true_effect']:+.4f} | {'yes' if m['ci_covers_true_effect'] else 'NO'} | "
                f"{_interval(m['cuped']['ci']) if m['cuped'] else '-'} |"
            )
    mt = analysis["multiple_testing"]
    adjusted = ", ".join(
        f"{label} {h:.3g} / {b:.3g}"
        for label, h, b in zip(mt["labels"], mt["holm"], mt["benjamini_hochberg"], strict=True)
    )
    lines += ["", f"Adjusted p-values (Holm / BH): {adjusted}", ""]
    for name, comparison in analysis["comparisons"].items():
        sequential = comparison.get("sequential")
        if sequential:
            first = sequential["first_rejection_day"]
            verdict = f"rejects on day {first}" if first is not None else "no rejection"
            covered = sequential["confidence_sequence_covers_truth_days"]
            low, high = sequential["true_effect_range"]
            text = (
                f"Sequential (mSPRT, daily looks, tau {sequential['mixture_sd']:.4g}) for {name}: "
                f"{verdict}; the confidence sequence covers the true cumulative effect on "
                f"{covered} of {len(sequential['day'])} days."
            )
            empty = sequential["confidence_sequence_empty_from_day"]
            if empty is not None:
                text += (
                    f" It is empty from day {empty}: the true effect moved from {low:+.4f} to "
                    f"{high:+.4f} during the run, and mSPRT assumes one fixed effect."
                )
            spent = sequential["alpha_spending_first_rejection_day"]
            text += " Alpha spending (O'Brien-Fleming type, daily looks): " + (
                f"rejects on day {spent}." if spent is not None else "never rejects."
            )
            lines.append(text)
        guardrails = ", ".join(
            f"{g['metric']} {'pass' if g['passed'] else 'FAIL'} ({g['reason']})"
            for g in comparison["guardrails"]
        )
        lines.append(f"Guardrails for {name}: {guardrails}.")
    return [*lines, ""]


def _md_aa(analysis: Mapping[str, Any]) -> list[str]:
    aa = analysis.get("aa")
    if not aa:
        return []
    return [
        "## A/A false-positive rates",
        "",
        f"{aa['replicates']} re-randomised A/A splits of the control copy, alpha "
        f"{aa['alpha']} (standard error of a rate {aa['fpr_standard_error']:.3f}): fixed "
        f"horizon {aa['fpr_fixed_horizon']:.3f}; alpha spending (O'Brien-Fleming type) with a "
        f"look every day {aa['fpr_sequential_alpha_spending']:.3f}; mSPRT with a look every day "
        f"{aa['fpr_sequential_msprt']:.3f} (valid at any stopping time, hence conservative); "
        f"naive daily peeking "
        f"{aa['fpr_naive_daily_peeking']:.3f}; SRM false alarms "
        f"{aa['srm_false_alarm_rate']:.3f} (alpha {aa['srm_alpha']}).",
        "",
    ]


def _md_coverage(analysis: Mapping[str, Any]) -> list[str]:
    if "coverage" not in analysis:
        return []
    lines = [
        "## Estimator vs truth (re-randomised assignments)",
        "",
        "| arm | metric | true effect | bias | RMSE | coverage | power |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, per_metric in analysis["coverage"].items():
        for metric, c in per_metric.items():
            lines.append(
                f"| {name} | {metric} | {c['true_effect']:+.4f} | {c['bias']:+.5f} | "
                f"{c['rmse']:.4f} | {c['coverage']:.3f} | {c['power']:.3f} |"
            )
    return [*lines, ""]


def _md_srm_power(analysis: Mapping[str, Any]) -> list[str]:
    if "srm_power" not in analysis:
        return []
    s = analysis["srm_power"]
    loss, shift = s["loss"], s["shift"]
    return [
        "## SRM detection",
        "",
        f"Over {s['replicates']} replicates with {s['exposed_users']:,} exposed users: "
        f"false alarms {s['false_alarm_rate']:.3f}; losing {loss['fraction']:.0%} of "
        f"{loss['arm']} detected {loss['detection_rate']:.3f} (formula "
        f"{loss['formula_power']:.3f}; 95 % detection needs "
        f"{loss['users_for_95_percent_detection']:,} users); a split shifted by "
        f"{shift['shift']:.0%} detected {shift['detection_rate']:.3f} (formula "
        f"{shift['formula_power']:.3f}).",
        "",
    ]


def _md_drift(analysis: Mapping[str, Any]) -> list[str]:
    drift = analysis.get("drift")
    if not drift:
        return []
    lines = [
        f"## Drift ({drift['kind']} from day {drift['drift_day']})",
        "",
        "| arm | CTR before | CTR after | drop (relative) | trough (day) | CTR at end | "
        "trend after | recovered | days to half recovery |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in drift["arms"].items():
        lines.append(
            f"| {name} | {d['ctr_before']:.4f} | {d['ctr_after']:.4f} | {d['drop']:+.4f} "
            f"({_fmt(d['relative_drop'], '.0%')}) | {d['trough']:.4f} ({d['trough_day']}) | "
            f"{d['ctr_end']:.4f} | {d['trend_after']:+.4f} | "
            f"{_fmt(d['recovered_share'], '.0%')} | {_fmt(d['days_to_half_recovery'], 'd')} |"
        )
    costs = {name: d for name, d in drift["arms"].items() if "share_lowest" in d}
    if costs:
        lines += [
            "",
            "Drift cost: the share of the clicks each arm's slates would have earned had "
            "preferences not moved (same users, slates, times, fatigue; 1.00 before the drift).",
            "",
            "| arm | lowest share (day) | share at end | cost won back |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {d['share_lowest']:.3f} ({d['share_lowest_day']}) | "
            f"{d['share_end']:.3f} | {_fmt(d['cost_recovered'], '.0%')} |"
            for name, d in costs.items()
        ]
    for name, c in drift["post_drift_ctr"].items():
        covered = "covered" if c["ci_covers_true_effect"] else "NOT covered"
        lines += [
            "",
            f"Post-drift CTR, {name} - control: {c['difference']:+.4f} {_interval(c['ci'])}, "
            f"p = {c['p_value']:.3g}; true {c['true_effect']:+.4f} ({covered}).",
        ]
    return [*lines, ""]


def _md_monitors(analysis: Mapping[str, Any]) -> list[str]:
    lines = ["## Drift monitors", ""]
    for arm, monitors in analysis["monitors"].items():
        for monitor, entry in monitors.items():
            lines.append(
                f"- {arm} / {monitor}: PSI alert {_detection_text(entry['detection'])}; "
                f"KS (p < {KS_REPORT_P_VALUE:g}) {_detection_text(entry['ks_detection'])}"
            )
    if analysis["retrains"]:
        retrains = ", ".join(
            f"{r['arm']} day {r['day']} ({r['reason']}, {r['seconds']:.1f} s)"
            for r in analysis["retrains"]
        )
        lines += ["", f"Retrains: {retrains}"]
    return [*lines, ""]


def _detection_text(detection: Mapping[str, Any]) -> str:
    if "delay_days" not in detection:
        return f"{detection['false_alarms']} alert(s) (no drift in this world)"
    delay = detection["delay_days"]
    text = f"{delay:.0f} day(s) after the drift" if delay is not None else "missed"
    return text + f", {detection['false_alarms_before_drift']} false alarm(s) before it"


def _interval(ci: Sequence[float]) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _fmt(value: float | int | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _round(values: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in values.items()}
