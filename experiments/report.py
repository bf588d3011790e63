"""Write the report of a simulated A/B experiment: ``result.json``, ``report.md`` and the plots.

The figures come from :func:`experiments.analysis.analyse`; the markdown from
:mod:`experiments.report_markdown`, the plots from :mod:`experiments.plots`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from experiments.plots import plot_cumulative, plot_daily, plot_drift
from experiments.report_markdown import render_markdown
from experiments.simulation_result import SimulationResult

__all__ = ["write_report"]


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
    plot_daily(analysis, result, paths["daily_ctr"])
    plot_cumulative(analysis, paths["cumulative_effect"])
    plot_drift(analysis, result, paths["drift"])
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
