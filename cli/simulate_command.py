"""``recsys simulate-ab``: run a simulated A/B experiment and write its report."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from experiments.analysis import analyse
from experiments.config import load_experiment_config
from experiments.report import write_report
from experiments.simulation_result import SimulationResult
from experiments.simulator import simulate


def register(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "simulate-ab",
        help="simulate an A/B experiment on the synthetic world with the real pipeline",
        description=(
            "Simulate users arriving day by day, served by each arm's pipeline, clicking by the "
            "world's choice model; write result.json, report.md and plots to --out."
        ),
    )
    command.add_argument("--config", required=True, type=Path, help="experiment TOML file")
    command.add_argument("--out", required=True, type=Path, help="report directory to write")
    command.add_argument(
        "--workdir",
        type=Path,
        help=(
            "keep bundles, datasets, feedback logs and the raw result (workdir/result) here; "
            "a rerun reuses its bundles (default: a temporary directory)"
        ),
    )
    command.add_argument("--quiet", action="store_true", help="no progress bar")
    command.set_defaults(handler=_simulate)


def _simulate(args: argparse.Namespace) -> int:
    result, analysis, paths = run_simulation(
        args.config, args.out, workdir=args.workdir, progress=not args.quiet
    )
    for line in summary_lines(result, analysis):
        print(line)
    print(f"wrote {paths['result']}, {paths['report']} and plots")
    return 0


def run_simulation(
    config_path: Path,
    out: Path,
    *,
    workdir: Path | None = None,
    progress: bool = False,
) -> tuple[SimulationResult, dict[str, Any], dict[str, Path]]:
    """Load the config, simulate, analyse and write the report; returns all three."""
    config = load_experiment_config(config_path)
    if workdir is not None:
        result = simulate(config, workdir, progress=progress)
        result.save(workdir / "result")
    else:
        with tempfile.TemporaryDirectory(prefix="recsys-simulate-") as tmp:
            result = simulate(config, tmp, progress=progress)
    analysis = analyse(result)
    paths = write_report(result, analysis, out)
    return result, analysis, paths


def summary_lines(result: SimulationResult, analysis: dict[str, Any]) -> list[str]:
    """A few lines for the terminal: the primary metric per arm and the SRM verdict."""
    metric = result.config.analysis.primary_metric
    lines = []
    for name, comparison in analysis["comparisons"].items():
        m = comparison["metrics"][metric]
        lines.append(
            f"{name} vs {analysis['control']}: {metric} {m['difference']:+.4f} "
            f"[{m['ci'][0]:+.4f}, {m['ci'][1]:+.4f}] p={m['p_value']:.3g}, "
            f"true {m['true_effect']:+.4f}"
        )
    srm = analysis["srm"]
    lines.append(f"SRM p={srm['p_value']:.3g}" + (" MISMATCH" if srm["mismatch"] else ""))
    return lines
