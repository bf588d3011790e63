"""PNG figures for the offline evaluation report.

Each function draws one figure from the plain dictionaries the evaluation modules return, writes
it as a PNG to ``path`` (creating parent folders) and returns that path:

* :func:`plot_metric_curves` - metric@K against K, one line per system, one panel per metric;
* :func:`plot_funnel` - recall at each stage of the funnel (retrieval -> ranking -> reranking);
* :func:`plot_segment_bars` - a metric per segment, one bar per system, with CI whiskers;
* :func:`plot_training_curves` - training / validation curves saved as JSON by training
  (the two-tower's and the rankers' ``curves.json``).

Figures are built with the object API (``matplotlib.figure.Figure`` on an Agg canvas), never
``pyplot``: no global figure state, no display, safe in threads and servers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from data.errors import DataError

__all__ = [
    "DPI",
    "plot_funnel",
    "plot_metric_curves",
    "plot_segment_bars",
    "plot_training_curves",
]

DPI = 100
"""Resolution of the PNGs: sharp on screen, small enough (tens of kB) to keep in a report."""

PANEL_SIZE = (4.8, 3.6)
"""Inches per panel: room for a legend of a handful of systems without hiding the data."""

PathLike = str | Path


def plot_metric_curves(
    results: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str],
    path: PathLike,
    *,
    title: str | None = None,
) -> Path:
    """Metric@K against K: one panel per metric, one line per system.

    results: ``{system: {"ndcg@10": value, "recall@20": value, ...}}``, e.g. each system's
        :func:`evaluation.metrics.evaluate_rankings`. Keys that are not ``f"{metric}@{K}"`` for
        a requested metric are ignored; a system without a metric is left out of that panel.
    metrics: metric names without the cutoff, e.g. ``("ndcg", "recall")``.
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    if not metrics:
        raise DataError("metrics is empty: name at least one metric to plot, e.g. ('ndcg',)")
    figure, axes = _figure(len(metrics))
    for ax, metric in zip(axes, metrics, strict=True):
        drawn, cutoffs = 0, set[int]()
        for system, values in results.items():
            curve = sorted(
                (cutoff, value)
                for key, value in values.items()
                if (cutoff := _cutoff_of(key, metric)) is not None
            )
            if curve:
                ks, ys = zip(*curve, strict=True)
                ax.plot(ks, ys, marker="o", label=system)
                drawn, cutoffs = drawn + 1, cutoffs | set(ks)
        if not drawn:
            raise DataError(
                f"no system has any {metric!r}@K value; systems: {list(results)}, e.g. keys "
                f"{_example_keys(results)}"
            )
        ax.set(title=f"{metric}@K", xlabel="K (list length)", ylabel=metric)
        ax.set_xticks(sorted(cutoffs))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(figure, path, title)


def plot_funnel(
    stages: Mapping[str, float],
    path: PathLike,
    *,
    ylabel: str = "recall",
    title: str | None = "Recall through the funnel",
) -> Path:
    """One bar per funnel stage, in the given order, labelled with its value.

    stages: ``{stage label: value}``, e.g. ``{"retrieval@500": 0.61, "ranking@100": 0.44,
        "reranking@10": 0.18}``: how much of the users' future survives each stage.
    """
    if not stages:
        raise DataError("stages is empty: give at least one {stage: value}")
    figure, (ax,) = _figure(1, width=max(PANEL_SIZE[0], 1.4 * len(stages)))
    labels = list(stages)
    heights = np.array([_finite_or_nan(stages[label]) for label in labels])
    bars = ax.bar(labels, np.nan_to_num(heights), color="tab:blue")
    ax.bar_label(bars, labels=[_format(v) for v in heights], padding=2, fontsize="small")
    ax.set(ylabel=ylabel)
    ax.set_ylim(0, max(1.0, float(np.nanmax(heights, initial=0.0)) * 1.1))
    ax.grid(axis="y", alpha=0.3)
    return _save(figure, path, title)


def plot_segment_bars(
    by_system: Mapping[str, Mapping[str, Mapping[str, Any]]],
    metric: str,
    path: PathLike,
    *,
    title: str | None = None,
) -> Path:
    """``metric`` per segment, one bar per system, whiskers at the confidence interval.

    by_system: ``{system: segment_metrics(...)}``, i.e. ``{system: {segment: {"n_users": n,
        "metrics": {metric: {"mean", "low", "high", ...}}}}}`` as returned by
    :func:`evaluation.segments.segment_metrics` or :func:`~evaluation.segments.bucket_metrics`.
    Segments keep the order of their first appearance; a segment without a value (no users)
    gets no bar. Tick labels show each segment's user count (from the first system).
    """
    if not by_system:
        raise DataError("by_system is empty: give at least one system's segment metrics")
    segments: list[str] = []
    for summary in by_system.values():
        segments += [s for s in summary if s not in segments]
    n_systems = len(by_system)
    figure, (ax,) = _figure(1, width=max(PANEL_SIZE[0], 0.9 * len(segments) * (n_systems + 1)))
    width = 0.8 / n_systems
    x = np.arange(len(segments), dtype=np.float64)
    found = False
    for offset, (system, summary) in enumerate(by_system.items()):
        mean, low, high = (np.full(len(segments), np.nan) for _ in range(3))
        for j, segment in enumerate(segments):
            ci = summary.get(segment, {}).get("metrics", {}).get(metric)
            if ci is not None:
                mean[j], low[j], high[j] = (
                    _finite_or_nan(ci[key]) for key in ("mean", "low", "high")
                )
        found |= bool(np.isfinite(mean).any())
        shown = np.isfinite(mean)
        # Whisker lengths from the mean to each bound; a missing bound draws no whisker.
        errors = np.nan_to_num(np.vstack([mean - low, high - mean])[:, shown]).clip(min=0)
        ax.bar(
            x[shown] - 0.4 + width * (offset + 0.5),
            mean[shown],
            width,
            yerr=errors,
            capsize=3,
            label=system,
        )
    if not found:
        raise DataError(f"no system has a value of {metric!r} in any segment")
    first = next(iter(by_system.values()))
    ax.set_xticks(x, [_segment_label(s, first.get(s, {})) for s in segments])
    ax.set(ylabel=metric)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(figure, path, title if title is not None else f"{metric} by segment")


def plot_training_curves(
    curves: PathLike | Mapping[str, Any],
    path: PathLike,
    *,
    title: str | None = None,
) -> Path:
    """Re-draw training curves saved as JSON (a path, or the parsed document).

    Two layouts are understood, the two that training writes:

    * two-tower (``retrieval.two_tower.train.TrainingCurves``): ``{"eval_k", "best_epoch",
      "epochs": [{"epoch", "train_loss", "valid_loss", "valid_recall", ...}]}`` - panels for
      the losses and the validation recall@K;
    * rankers (``ranking.training_set.write_curves``): ``{"xlabel", "best", "panels":
      {title: {series: [values]}}}`` - one panel per title.

    The kept epoch / iteration is marked by a dotted line.
    """
    document = _read_json(curves) if isinstance(curves, str | Path) else curves
    panels, xlabel, best = _curve_panels(document)
    figure, axes = _figure(len(panels))
    for ax, (panel, series) in zip(axes, panels.items(), strict=True):
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, label=name)
        if best:
            ax.axvline(best, color="grey", linestyle=":", linewidth=1)
        ax.set(title=panel, xlabel=xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and rounds are whole
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(figure, path, title)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

_Series = dict[str, tuple[list[float], list[float]]]


def _curve_panels(document: Mapping[str, Any]) -> tuple[dict[str, _Series], str, int | None]:
    """``({panel: {series: (x, y)}}, x label, best x)`` from either curves layout."""
    if "epochs" in document:
        epochs = list(document["epochs"])
        if not epochs:
            raise DataError("the training curves hold no epochs")
        x = [float(e["epoch"]) for e in epochs]
        loss: _Series = {"train": (x, [_finite_or_nan(e.get("train_loss")) for e in epochs])}
        valid_loss = [_finite_or_nan(e.get("valid_loss")) for e in epochs]
        if not all(math.isnan(v) for v in valid_loss):
            loss["valid"] = (x, valid_loss)
        panels = {"loss per example": loss}
        recall = [_finite_or_nan(e.get("valid_recall")) for e in epochs]
        if not all(math.isnan(v) for v in recall):
            panels[f"valid recall@{document.get('eval_k', 'K')}"] = {"valid": (x, recall)}
        return panels, "epoch", _optional_int(document.get("best_epoch"))
    if "panels" in document:
        panels = {
            str(title): {
                str(name): (
                    [float(i) for i in range(1, len(values) + 1)],
                    [_finite_or_nan(v) for v in values],
                )
                for name, values in series.items()
            }
            for title, series in document["panels"].items()
        }
        if not panels:
            raise DataError("the training curves hold no panels")
        return panels, str(document.get("xlabel", "iteration")), _optional_int(document.get("best"))
    raise DataError(
        f"unrecognised training-curves JSON (keys {sorted(document)}); expected 'epochs' "
        "(two-tower) or 'panels' (ranker)"
    )


def _figure(n_panels: int, *, width: float | None = None) -> tuple[Figure, list[Axes]]:
    """A figure of ``n_panels`` side by side on an Agg canvas (no pyplot)."""
    figure = Figure(
        figsize=(width if width is not None else PANEL_SIZE[0] * n_panels, PANEL_SIZE[1]),
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    return figure, list(figure.subplots(1, n_panels, squeeze=False)[0])


def _save(figure: Figure, path: PathLike, title: str | None) -> Path:
    if title:
        figure.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=DPI)
    return out


def _read_json(path: PathLike) -> Mapping[str, Any]:
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read training curves ({exc})") from exc
    if not isinstance(document, dict):
        raise DataError(f"{path}: training curves must be a JSON object")
    return document


def _cutoff_of(key: str, metric: str) -> int | None:
    """``K`` if ``key`` is ``f"{metric}@{K}"``, else ``None``."""
    name, at, cutoff = key.rpartition("@")
    if at and name == metric and cutoff.isdigit():
        return int(cutoff)
    return None


def _example_keys(results: Mapping[str, Mapping[str, float]]) -> list[str]:
    for values in results.values():
        return list(values)[:5]
    return []


def _segment_label(segment: str, summary: Mapping[str, Any]) -> str:
    n_users = summary.get("n_users")
    return f"{segment}\n(n={n_users})" if n_users is not None else segment


def _finite_or_nan(value: Any) -> float:
    """A float, ``NaN`` for ``None`` / missing / non-finite (JSON writes NaN as null or NaN)."""
    if value is None:
        return math.nan
    number = float(value)
    return number if math.isfinite(number) else math.nan


def _optional_int(value: Any) -> int | None:
    return int(value) if value is not None else None


def _format(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"
