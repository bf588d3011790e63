"""Analyse a simulated A/B experiment: every figure of the report, as a JSON-ready dict.

The analysis reads the experiment the way an analyst would, from the observed arm of each user
(the statistics modules do every test, :mod:`experiments.conventions`), and then does what no
real experiment can: it compares the estimates with the truth, which the twin copies of the
population give (:mod:`experiments.simulator`, :mod:`experiments.simulation_result`).

* **A/B estimates** per treatment arm against the control (the first arm): Welch tests and CIs of
  per-user CTR and engagement, CUPED with the pre-period's clicks, Holm and Benjamini-Hochberg
  over all comparisons, daily always-valid (mSPRT) inference, guardrails, the effect by days
  since exposure, the SRM check.
* **Truth**: the twin difference of expected clicks on the same users; whether the CI covers it,
  and the estimator's bias, RMSE and coverage over re-randomised assignments of the same
  simulated population (``coverage_replicates`` salts, through the real assignment code).
* **A/A** and **SRM power**: the replicate studies of :mod:`experiments.studies`.
* **Drift**: each arm's true daily CTR around the drift day (drop, trough, recovery), the A/B test
  restricted to the post-drift days, and the monitors' detection delays.

The per-user metrics are defined in :mod:`experiments.user_metrics`; the files are written by
:func:`experiments.report.write_report`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl
from scipy import stats

from experiments.always_valid import SequentialConfig, always_valid_inference
from experiments.config import AnalysisConfig
from experiments.drift import DriftReport, detection_delay
from experiments.estimators import (
    WelchResult,
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
from experiments.srm import srm_check
from experiments.studies import group_moments, replicate_studies
from experiments.user_metrics import (
    GUARDRAIL_METRICS,
    METRICS,
    daily_cumulative,
    per_user_metrics,
)
from pipeline.assignment import assign_indices, hash_to_unit_interval

__all__ = ["KS_REPORT_P_VALUE", "analyse"]

FloatArray = npt.NDArray[np.float64]


# Days averaged for the "before the drift" and "at the end" CTR levels of the drift summary.
LEVEL_DAYS = 3
# KS p-value of the comparison alert in the monitor summary (DriftConfig's documented default).
KS_REPORT_P_VALUE = 1e-3
# A time after the drift start and before the end of any window (window times are whole days).
_JUST_AFTER = 1e-6


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
    studies = replicate_studies(result, metrics, exposed, replicates, mixture_sd)
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
        "pairwise": _pairwise(result, metrics, assignment, observed, exposed, mixture_sd),
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
    names = result.config.arm_names
    comparisons = {
        name: _post_drift_ctr(result, assignment, observed, drift_day, 0, t)
        for t, name in enumerate(names[1:], start=1)
    }
    out = {
        "kind": result.config.world.get("drift"),
        "drift_day": drift_day,
        "arms": arms,
        "post_drift_ctr": comparisons,
    }
    oracle = next((a.name for a in result.config.arms if a.kind == "oracle"), None)
    if oracle is not None and "cost_recovered" in arms[oracle]:
        out["recovery_vs_oracle"] = _recovery_vs_oracle(arms, oracle)
    return out


def _post_drift_ctr(
    result: SimulationResult,
    assignment: npt.NDArray[np.int64],
    observed: npt.NDArray[np.bool_],
    drift_day: int,
    c: int,
    t: int,
) -> dict[str, Any]:
    """Arm ``t`` against arm ``c`` on the per-user CTR of the days from the drift on, with the
    twin-world true effect on the same users and whether the CI covers it."""
    exposed_post, metrics = per_user_metrics(result, slice(drift_day, None))
    seen = exposed_post & observed
    in_c, in_t = seen & (assignment == c), seen & (assignment == t)
    alpha = result.config.analysis.alpha
    welch = welch_test(metrics["ctr"][c, in_c], metrics["ctr"][t, in_t], alpha=alpha)
    truth = metrics["expected_ctr"]
    true_effect = float(np.mean(truth[t, seen] - truth[c, seen]))
    return {
        **_welch_dict(welch),
        "true_effect": true_effect,
        "ci_covers_true_effect": bool(welch.ci[0] <= true_effect <= welch.ci[1]),
    }


def _recovery_vs_oracle(arms: Mapping[str, Any], oracle: str) -> dict[str, Any]:
    """Each arm's drift recovery next to the oracle's, the bound of what a policy can win back.

    ``share_end_vs_oracle``: the arm's end share of its no-drift clicks over the oracle's;
    ``cost_recovered_vs_oracle``: its ``cost_recovered`` over the oracle's.
    """
    bound = arms[oracle]
    out: dict[str, Any] = {"oracle": oracle}
    for name, arm in arms.items():
        if "cost_recovered" not in arm:
            continue
        out[name] = {
            "share_end": arm["share_end"],
            "cost_recovered": arm["cost_recovered"],
            "share_end_vs_oracle": _ratio(arm["share_end"], bound["share_end"]),
            "cost_recovered_vs_oracle": _ratio(arm["cost_recovered"], bound["cost_recovered"]),
        }
    return out


def _ratio(value: float, bound: float) -> float:
    return value / bound if bound and math.isfinite(bound) else math.nan


def _pairwise(
    result: SimulationResult,
    metrics: Mapping[str, FloatArray],
    assignment: npt.NDArray[np.int64],
    observed: npt.NDArray[np.bool_],
    exposed: npt.NDArray[np.bool_],
    mixture_sd: float | None,
) -> dict[str, Any]:
    """The head-to-head comparisons the config names (``analysis.comparisons``), keyed
    ``"<candidate>_vs_<baseline>"``: the same estimates as each arm against the control, plus
    the post-drift CTR comparison when the world drifts."""
    names = list(result.config.arm_names)
    out: dict[str, Any] = {}
    for baseline, candidate in result.config.analysis.comparisons:
        c, t = names.index(baseline), names.index(candidate)
        comparison = _compare_arms(result, metrics, assignment, observed, exposed, c, t, mixture_sd)
        comparison |= {"baseline": baseline, "candidate": candidate}
        drift_day = result.config.drift_day
        if drift_day is not None:
            comparison["post_drift_ctr"] = _post_drift_ctr(
                result, assignment, observed, drift_day, c, t
            )
        out[f"{candidate}_vs_{baseline}"] = comparison
    return out


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
