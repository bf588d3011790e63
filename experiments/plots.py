"""Every figure of the A/B simulation report, drawn from the analysis dict into PNG files.

Figures are built with matplotlib's object API (:class:`~matplotlib.figure.Figure`, no pyplot
state), so drawing needs no display and no global backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from experiments.simulation_result import SimulationResult

__all__ = ["plot_cumulative", "plot_daily", "plot_drift"]


def plot_daily(analysis: Mapping[str, Any], result: SimulationResult, path: Path) -> None:
    """Daily per-user CTR per arm with its 95 % CI, and each arm copy's true CTR (PNG)."""
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


def plot_cumulative(analysis: Mapping[str, Any], path: Path) -> None:
    """Cumulative effect per treatment: fixed-horizon CI, confidence sequence, truth (PNG)."""
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


def plot_drift(analysis: Mapping[str, Any], result: SimulationResult, path: Path) -> None:
    """Daily PSI of both drift monitors per arm, the alert threshold and the drift day (PNG)."""
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
