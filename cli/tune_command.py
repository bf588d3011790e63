"""``recsys tune``: search the funnel's hyperparameters on the validation split (never on test)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from evaluation.offline import PIPELINE, OfflineConfig, evaluate_offline
from pipeline.artifacts import load_config_file

if TYPE_CHECKING:
    from pipeline.tuning import TuneResult

# Bootstrap resamples per trial: the objective reads only the mean; a few resamples keep the
# report's intervals defined at a negligible cost.
_TRIAL_N_BOOT = 20


def register(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "tune",
        help="search the sources' and ranker's hyperparameters for the best validation nDCG@10",
        description=(
            "Optuna (TPE) search over the funnel's main hyperparameters. Each trial trains the "
            "whole pipeline on the train split minus a validation slice and scores its nDCG@10 "
            "on the valid split; the test split is never read. The best config is written as a "
            "TOML file for `recsys train --config`. Trials are stored in an SQLite study, so "
            "running the same command again continues the search."
        ),
    )
    command.add_argument("--data", required=True, type=Path, help="dataset directory")
    command.add_argument(
        "--trials",
        required=True,
        type=int,
        help="trials to run now (a resumed study keeps its earlier trials)",
    )
    command.add_argument(
        "--timeout",
        type=float,
        help="seconds after which no new trial starts (the running one finishes)",
    )
    command.add_argument("--out", required=True, type=Path, help="TOML config to write")
    command.add_argument(
        "--config",
        type=Path,
        help="base TOML config: its settings are kept fixed and not searched",
    )
    command.add_argument(
        "--storage",
        help="study storage: a file (SQLite) or an SQLAlchemy URL (default: --out with .db)",
    )
    command.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    command.add_argument("--quiet", action="store_true", help="no progress bar")
    command.set_defaults(handler=_tune)


def _tune(args: argparse.Namespace) -> int:
    # Imported here: Optuna and SQLAlchemy load only when a search runs, not for every command.
    import optuna

    from pipeline.tuning import TuneConfig, tune

    # The bar reports each trial; Optuna's own INFO line per trial would interleave with it.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = TuneConfig(
        n_trials=args.trials,
        timeout=args.timeout,
        seed=args.seed,
        storage=args.storage,
        base=load_config_file(args.config),
    )
    result = tune(args.data, args.out, config, scorer=validation_ndcg, progress=not args.quiet)
    for line in summary_lines(result):
        print(line)
    return 0


def validation_ndcg(data: Path, bundle: Path) -> Mapping[str, float]:
    """nDCG@10 per system of ``bundle`` on the test split of ``data`` (for tuning, the derived
    dataset whose test split is the original valid split), baselines skipped."""
    report = evaluate_offline(
        data,
        bundle,
        OfflineConfig(ks=(10,), recall_cutoffs=(10,), n_boot=_TRIAL_N_BOOT, baselines=()),
    )
    scores = {name: float(values["ndcg@10"]["mean"]) for name, values in report["systems"].items()}
    assert PIPELINE in scores, "the offline report always scores the pipeline"
    return scores


def summary_lines(result: TuneResult) -> list[str]:
    default = (
        f"; default config {result.default_value:.4f}" if result.default_value is not None else ""
    )
    return [
        f"best validation nDCG@10 {result.best_value:.4f} (trial {result.best_number}, "
        f"{result.n_complete} of {result.n_trials} trials completed{default})",
        f"wrote {result.out}",
        f"study {result.study_name} in {result.storage} (run again to continue it)",
    ]
