"""``recsys train`` and ``recsys evaluate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.table import Table

from data.dataset import load_dataset
from data.errors import DataError
from evaluation.retrieval_eval import build_evaluation_users, retrieval_recall
from serving.artifacts import load_artifacts, load_config_file, train_bundle

DEFAULT_CUTOFFS = (50, 100, 200, 500)


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train every stage into a bundle")
    train.add_argument("--data", required=True, type=Path, help="dataset directory")
    train.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    train.add_argument("--config", type=Path, help="TOML config (default: built-in defaults)")
    train.add_argument("--device", choices=("cpu", "cuda"), help="two-tower training device")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "evaluate", help="offline evaluation of a bundle on the test split"
    )
    evaluate.add_argument("--data", required=True, type=Path)
    evaluate.add_argument("--bundle", required=True, type=Path)
    evaluate.add_argument(
        "--cutoffs",
        type=int,
        nargs="+",
        default=list(DEFAULT_CUTOFFS),
        help="retrieval recall cutoffs",
    )
    evaluate.add_argument("--max-users", type=int, help="evaluate a seeded sample of test users")
    evaluate.add_argument("--report", type=Path, help="directory for report.json")
    evaluate.set_defaults(handler=_evaluate)


def _train(args: argparse.Namespace) -> int:
    manifest = train_bundle(
        args.data, args.out, config=load_config_file(args.config), device=args.device
    )
    print(f"wrote bundle {args.out} (model_version {manifest['model_version']})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    if any(c <= 0 for c in args.cutoffs):
        raise DataError(f"--cutoffs must be positive, got {args.cutoffs}")
    run_evaluation(
        args.data,
        args.bundle,
        cutoffs=tuple(args.cutoffs),
        max_users=args.max_users,
        report_dir=args.report,
    )
    return 0


def run_evaluation(
    data: Path,
    bundle: Path,
    *,
    cutoffs: tuple[int, ...] = DEFAULT_CUTOFFS,
    max_users: int | None = None,
    report_dir: Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``bundle`` on the test split of ``data``; print tables, optionally write JSON."""
    artifacts = load_artifacts(bundle)
    dataset = load_dataset(data)
    history = pl.concat([dataset.splits["train"], dataset.splits["valid"]])
    evaluation = build_evaluation_users(
        artifacts,
        history,
        dataset.splits["test"],
        history_length=artifacts.retrieval.config.history_length,
        max_users=max_users,
    )
    recall = retrieval_recall(artifacts, evaluation, tuple(sorted(cutoffs)))
    report: dict[str, Any] = {
        "bundle": str(bundle),
        "model_version": artifacts.model_version,
        "data": str(data),
        "retrieval": recall,
    }
    print_recall_table(recall)
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        print(f"wrote {report_dir / 'report.json'}")
    return report


def print_recall_table(recall: dict[str, dict[str, float]], console: Console | None = None) -> None:
    meta = recall.get("_meta", {})
    table = Table(title=f"retrieval recall ({int(meta.get('n_users', 0)):,} test users)")
    rows = {name: values for name, values in recall.items() if not name.startswith("_")}
    columns = list(next(iter(rows.values())))
    table.add_column("source", style="bold")
    for column in columns:
        table.add_column(column, justify="right")
    for name, values in rows.items():
        table.add_row(name, *(f"{values[c]:.4f}" for c in columns))
    (console or Console()).print(table)
