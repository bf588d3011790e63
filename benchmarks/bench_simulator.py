"""Benchmark: the A/B simulator on the issue's scenario (issue 7).

A 2-arm, 30-day experiment with 50k users on the synthetic world with concept drift on day 10:
the frozen bundle (control) against frozen weights + online state updates (treatment), both
served by the real ``RecommenderService`` pipeline in batches. Reports:

* wall time of the simulation loop and simulated sessions per second (the target: < 10 min on
  2 cores), next to the set-up (world, pre-period log, training) and the analysis;
* each arm's true daily CTR around the drift (drop, trough, recovery), the A/B test on the
  post-drift days and on the whole run, and whether the CIs cover the true (twin) effect;
* A/A false-positive rates over >= 500 re-randomisations, with and without daily peeking;
* SRM: the run's own check with 2 % of the treatment's users lost, the simulated detection rates
  of that loss and of a 2-point split shift over 500 replicates, and the formula's power.

    python -m benchmarks.bench_simulator                   # the full scenario
    python -m benchmarks.bench_simulator --users 5000 --days 12 --drift-day 4   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from benchmarks.common import RESULTS_DIR, peak_rss_mb, write_result
from data.configuration import load_toml
from experiments.analysis import analyse
from experiments.config import ExperimentConfig, SampleLossConfig
from experiments.report import write_report
from experiments.simulation_result import SimulationResult
from experiments.simulator import simulate
from experiments.studies import replicate_assignments, srm_study

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ab_concept_drift.toml"
TARGET_SECONDS = 600.0
INJECTED_LOSS = 0.02
# The population at which the issue asks for >= 95 % detection of that loss.
SRM_POPULATION = 100_000


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, default=EXAMPLE, help="experiment TOML to start from"
    )
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--drift-day", type=int, default=10)
    parser.add_argument("--sessions-per-user-day", type=float, default=0.5)
    parser.add_argument("--replicates", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, default=RESULTS_DIR / "simulator_report")
    parser.add_argument(
        "--workdir", type=Path, help="keep bundles, logs and the raw result (workdir/result) here"
    )
    parser.add_argument(
        "--from-result", type=Path, help="re-analyse a saved raw result instead of simulating"
    )
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="add the oracle arm (one retrain on the true post-drift preferences): the bound "
        "on what any arm can win back; its retrain is outside the loop's time budget",
    )
    parser.add_argument(
        "--name", default="simulator", help="result file name under benchmarks/results/"
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.from_result is not None:
        result = SimulationResult.load(args.from_result)
    elif args.workdir is not None:
        result = simulate(_config(args), args.workdir, progress=True)
        result.save(args.workdir / "result")
    else:
        with tempfile.TemporaryDirectory(prefix="bench-simulator-") as tmp:
            result = simulate(_config(args), tmp, progress=True)
    phases = ("history_seconds", "training_seconds", "simulation_seconds")
    # A re-analysed result reports the run's own time, not the time to load it.
    total_seconds = (
        sum(result.timings[p] for p in phases)
        if args.from_result is not None
        else time.perf_counter() - started
    )
    start = time.perf_counter()
    analysis = analyse(result)
    analysis_seconds = time.perf_counter() - start
    write_report(result, analysis, args.report)
    lossy = _lossy_srm(result)

    figures = _figures(result, analysis, lossy)
    figures["srm_power_at_issue_population"] = _srm_at_population(
        result, SRM_POPULATION, args.replicates
    )
    figures["srm_issue17_criterion"] = srm_issue17_criterion(args.replicates)
    figures["total_seconds"] = total_seconds
    figures["analysis_seconds"] = analysis_seconds
    figures["peak_rss_mb"] = peak_rss_mb()
    path = write_result(args.name, figures)
    for key in ("simulation_seconds", "sessions_per_second", "arm_sessions_per_second"):
        print(f"{key}: {figures[key]:,.1f}")
    print(f"wrote {path} and the report in {args.report}")
    return figures


def _config(args: argparse.Namespace) -> ExperimentConfig:
    values = load_toml(args.config)
    values["n_days"] = args.days
    values["seed"] = args.seed
    values["world"] = {
        **values["world"],
        "n_users": args.users,
        "n_items": args.items,
        "drift_day": args.drift_day,
        "seed": args.seed,
    }
    values["behaviour"] = {
        **values["behaviour"],
        "sessions_per_user_day": args.sessions_per_user_day,
    }
    if args.oracle:
        values["arms"] = [*values["arms"], {"name": "oracle", "kind": "oracle", "weight": 1}]
    values["analysis"] = {
        **values["analysis"],
        "aa_replicates": args.replicates,
        "coverage_replicates": args.replicates,
        "srm_replicates": args.replicates,
    }
    return ExperimentConfig.from_mapping(values, base_dir=args.config.parent)


def _online_learning(result: SimulationResult) -> dict[str, Any]:
    """Per online_learning arm: steps published, examples learned, median freshness (simulated
    seconds from an event to the first model version trained on it)."""
    out: dict[str, Any] = {}
    for arm in result.config.arms:
        if not arm.learns_online:
            continue
        daily = result.daily.filter(pl.col("arm") == arm.name)
        freshness = daily["model_freshness_s"].to_numpy()
        out[arm.name] = {
            "online_steps": int(daily["online_step"].to_numpy().max()),
            "examples": int(daily["online_examples"].to_numpy().sum()),
            "median_daily_freshness_s": float(np.nanmedian(freshness))
            if np.isfinite(freshness).any()
            else None,
        }
    return out


def _lossy_srm(result: SimulationResult) -> dict[str, Any]:
    """The run's own SRM check when 2 % of the treatment's users are lost in logging."""
    config = result.config
    lossy = dataclasses.replace(
        config,
        sample_loss=SampleLossConfig(arm=config.arm_names[-1], fraction=INJECTED_LOSS),
        analysis=dataclasses.replace(
            config.analysis, aa_replicates=0, coverage_replicates=0, srm_replicates=0
        ),
    )
    analysis = analyse(dataclasses.replace(result, config=lossy))
    return {"fraction": INJECTED_LOSS, **analysis["srm"]}


def srm_issue17_criterion(replicates: int) -> dict[str, Any]:
    """Issue 17's SRM criterion: a loss of 2 % of all exposed users, all from one arm of a
    50/50 split (4 % of that arm), at 100k users and alpha 0.001, over ``replicates``
    re-randomised assignments (the real assignment code; counts alone decide SRM power)."""
    user_ids = [f"u{i}" for i in range(SRM_POPULATION)]
    weights = {"control": 0.5, "treatment": 0.5}
    salt = "srm-issue17/replicate"
    groups = replicate_assignments(user_ids, salt, weights, replicates)
    return srm_study(
        user_ids,
        np.ones(SRM_POPULATION, dtype=bool),
        groups,
        weights,
        salt=salt,
        loss_group=1,
        loss_fraction=2 * INJECTED_LOSS,
        shift=INJECTED_LOSS,
        srm_alpha=0.001,
    )


def _srm_at_population(result: SimulationResult, n_users: int, replicates: int) -> dict[str, Any]:
    """The SRM study (detection of the injected loss) on ``n_users`` exposed users.

    The same study as the run's own (``srm_study``, the real assignment code, ``replicates``
    re-randomised salts), on a population of the size the issue names rather than the run's
    exposed users: SRM power depends on the counts alone, not on what the users did.
    """
    config = result.config
    user_ids = [f"u{i}" for i in range(n_users)]
    salt = f"{config.salt}/replicate"
    groups = replicate_assignments(user_ids, salt, config.weights, replicates)
    return srm_study(
        user_ids,
        np.ones(n_users, dtype=bool),
        groups,
        config.weights,
        salt=salt,
        loss_group=len(config.weights) - 1,
        loss_fraction=INJECTED_LOSS,
        shift=config.analysis.srm_shift,
        srm_alpha=config.analysis.srm_alpha,
    )


def _figures(
    result: SimulationResult, analysis: dict[str, Any], lossy_srm: dict[str, Any]
) -> dict[str, Any]:
    timings = result.timings
    learners = [a.name for a in result.config.arms if a.kind != "oracle"]
    treatment = learners[-1]
    comparison = analysis["comparisons"][treatment]["metrics"]
    drift = analysis["drift"]
    return {
        "users": len(result.user_ids),
        "items": int(result.config.world_config().n_items),
        "days": result.n_days,
        "arms": list(result.arm_names),
        "sessions": int(timings["sessions"]),
        "simulation_seconds": timings["simulation_seconds"],
        "target_seconds": TARGET_SECONDS,
        "within_target": timings["simulation_seconds"] < TARGET_SECONDS,
        "sessions_per_second": timings["sessions_per_second"],
        "arm_sessions_per_second": timings["arm_sessions_per_second"],
        "history_seconds": timings["history_seconds"],
        "training_seconds": timings["training_seconds"],
        "serving": analysis["serving"],
        "daily_true_ctr": {
            arm: [row["true_ctr"] for row in rows] for arm, rows in analysis["daily"].items()
        },
        "daily_observed_ctr": {
            arm: [row.get("ctr") for row in rows] for arm, rows in analysis["daily"].items()
        },
        "drift": drift,
        "pairwise": analysis.get("pairwise"),
        "online_learning": _online_learning(result),
        "whole_run": {metric: comparison[metric] for metric in ("ctr", "engagement")},
        "sequential": {
            key: analysis["comparisons"][treatment].get("sequential", {}).get(key)
            for key in (
                "first_rejection_day",
                "confidence_sequence_covers_truth_days",
                "confidence_sequence_empty_from_day",
                "true_effect_range",
            )
        },
        "aa": analysis.get("aa"),
        "coverage": analysis.get("coverage"),
        "srm_power": analysis.get("srm_power"),
        "srm_with_injected_loss": lossy_srm,
        "srm": analysis["srm"],
        "monitors": {
            arm: {name: entry["detection"] for name, entry in monitors.items()}
            for arm, monitors in analysis["monitors"].items()
        },
        "planning": analysis["planning"],
        "observed_power": analysis["observed_power"],
    }


if __name__ == "__main__":
    main(sys.argv[1:])
