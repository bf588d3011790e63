"""The human-readable ``report.md`` of a simulated A/B experiment, from the analysis dict."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.analysis import KS_REPORT_P_VALUE

__all__ = ["render_markdown"]


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
        _md_pairwise,
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
            "| arm | lowest share (day) | share at end | cost won back | "
            "end share / oracle's | cost won back / oracle's |",
            "|---|---|---|---|---|---|",
        ]
        vs_oracle = drift.get("recovery_vs_oracle", {})
        for name, d in costs.items():
            bound = vs_oracle.get(name, {})
            lines.append(
                f"| {name} | {d['share_lowest']:.3f} ({d['share_lowest_day']}) | "
                f"{d['share_end']:.3f} | {_fmt(d['cost_recovered'], '.0%')} | "
                f"{_fmt(bound.get('share_end_vs_oracle'), '.2f')} | "
                f"{_fmt(bound.get('cost_recovered_vs_oracle'), '.2f')} |"
            )
    for name, c in drift["post_drift_ctr"].items():
        covered = "covered" if c["ci_covers_true_effect"] else "NOT covered"
        lines += [
            "",
            f"Post-drift CTR, {name} - control: {c['difference']:+.4f} {_interval(c['ci'])}, "
            f"p = {c['p_value']:.3g}; true {c['true_effect']:+.4f} ({covered}).",
        ]
    return [*lines, ""]


def _md_pairwise(analysis: Mapping[str, Any]) -> list[str]:
    """The head-to-head comparisons the config names (``analysis.comparisons``)."""
    pairwise = analysis.get("pairwise") or {}
    if not pairwise:
        return []
    metric = analysis["config"]["analysis"]["primary_metric"]
    lines = ["## Pairwise comparisons", ""]
    for comparison in pairwise.values():
        m = comparison["metrics"][metric]
        covered = "covered" if m["ci_covers_true_effect"] else "NOT covered"
        lines.append(
            f"- {comparison['candidate']} - {comparison['baseline']} ({metric}): "
            f"{m['difference']:+.4f} {_interval(m['ci'])}, p = {m['p_value']:.3g}; "
            f"true {m['true_effect']:+.4f} ({covered})"
        )
        post = comparison.get("post_drift_ctr")
        if post is not None:
            covered = "covered" if post["ci_covers_true_effect"] else "NOT covered"
            lines.append(
                f"  - after the drift (CTR): {post['difference']:+.4f} {_interval(post['ci'])}, "
                f"p = {post['p_value']:.3g}; true {post['true_effect']:+.4f} ({covered})"
            )
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
