"""``recsys train`` and ``recsys evaluate``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.table import Table

from cli.progress import add_progress_flag, stage_summary, terminal_progress, wants_progress
from data.errors import DataError
from data.progress import StageLog
from evaluation.offline import OfflineConfig, PipelineEngine, evaluate_offline, write_report
from pipeline.artifacts import load_artifacts, load_config_file, train_bundle

DEFAULT_CUTOFFS = (50, 100, 200, 500)


def register(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train every stage into a bundle")
    train.add_argument("--data", required=True, type=Path, help="dataset directory")
    train.add_argument("--out", required=True, type=Path, help="bundle directory to write")
    train.add_argument("--config", type=Path, help="TOML config (default: built-in defaults)")
    train.add_argument("--device", choices=("cpu", "cuda"), help="two-tower training device")
    train.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="train the two-tower with N local DDP processes (gloo on CPU, NCCL on CUDA);"
        " multi-node: run `recsys train` under torchrun instead (docs/scale.md)",
    )
    train.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="distributed runs: the two-tower's per-epoch checkpoint, resumed by a rerun"
        " (default: BUNDLE.checkpoint beside --out; removed once the bundle is written)",
    )
    add_progress_flag(train)
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "evaluate", help="offline evaluation of a bundle on the test split"
    )
    evaluate.add_argument("--data", required=True, type=Path)
    evaluate.add_argument("--bundle", required=True, type=Path)
    evaluate.add_argument(
        "--k", type=int, nargs="+", default=[10, 20, 50], help="ranking-metric cutoffs"
    )
    evaluate.add_argument(
        "--cutoffs",
        type=int,
        nargs="+",
        default=list(DEFAULT_CUTOFFS),
        help="retrieval recall cutoffs",
    )
    evaluate.add_argument("--max-users", type=int, help="evaluate a seeded sample of test users")
    evaluate.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples")
    evaluate.add_argument(
        "--now",
        type=int,
        help="request time, seconds UTC (default: when the test window opens, after the history;"
        " report.json records it)",
    )
    evaluate.add_argument("--report", type=Path, help="directory for report.json, report.md, plots")
    add_engine_flags(evaluate)
    add_progress_flag(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    recommend = commands.add_parser("recommend", help="batch recommendations through the Pipeline")
    recommend.add_argument("--bundle", required=True, type=Path)
    who = recommend.add_mutually_exclusive_group(required=True)
    who.add_argument("--all", action="store_true", help="every user known to the bundle")
    who.add_argument("--users", type=Path, help="CSV/parquet with a user_id column")
    recommend.add_argument("--k", type=int, default=10)
    recommend.add_argument(
        "--now",
        type=int,
        help="request time, seconds UTC (default: the wall clock; report.json's now reproduces"
        " what recsys evaluate scored)",
    )
    recommend.add_argument(
        "--workers",
        type=int,
        help="batches answered at once (default: one per available CPU core)",
    )
    recommend.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output .csv or .parquet; with --engine ray, a path without either suffix is a"
        " directory of parquet parts that the workers write in parallel",
    )
    add_engine_flags(recommend)
    recommend.set_defaults(handler=_recommend)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """--engine local|ray, --address, --num-workers (docs/scale.md)."""
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process (default); ray: Ray Data over the users, one actor per worker"
        " holding the memory-mapped bundle (needs the ray extra)",
    )
    parser.add_argument(
        "--address",
        help="--engine ray: the Ray cluster to join (default: start a local one for this command)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        help="--engine ray: actors (default: one per CPU of the cluster)",
    )


def _ray_options(args: argparse.Namespace) -> Any:
    """The engine flags as ``RayOptions`` (Ray imported only now), or None for --engine local."""
    if args.engine != "ray":
        if args.address is not None or args.num_workers is not None:
            raise DataError("--address and --num-workers need --engine ray")
        return None
    if args.num_workers is not None and args.num_workers <= 0:
        raise DataError(f"--num-workers must be positive, got {args.num_workers}")
    from evaluation.ray_engine import RayOptions

    return RayOptions(address=args.address, num_workers=args.num_workers)


def _train(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise DataError(f"--nproc must be positive, got {args.nproc}")
    config = load_config_file(args.config)
    checkpoint = None if args.checkpoint_dir is None else str(args.checkpoint_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one rank of a torchrun job
        if args.nproc > 1:
            raise DataError("--nproc starts its own processes; under torchrun leave it out")
        from pipeline.distributed_train import run_rank

        manifest = run_rank(str(args.data), str(args.out), config, args.device, checkpoint)
        if manifest is not None:
            print(f"wrote bundle {args.out} (model_version {manifest['model_version']})")
        return 0
    if args.nproc > 1:
        from pipeline.distributed_train import launch_local

        manifest = launch_local(
            args.data,
            args.out,
            nproc=args.nproc,
            config=config,
            device=args.device,
            checkpoint_dir=checkpoint,
        )
        print(
            f"wrote bundle {args.out} (model_version {manifest['model_version']}) with "
            f"{args.nproc} DDP processes"
        )
        return 0
    with terminal_progress(wants_progress(args.progress)) as display:
        stages = StageLog(display)
        manifest = train_bundle(
            args.data, args.out, config=config, device=args.device, progress=stages
        )
    print(
        f"wrote bundle {args.out} (model_version {manifest['model_version']}) in "
        f"{stage_summary(stages.seconds)}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    ray_options = _ray_options(args)
    engine = None
    if ray_options is not None:
        from evaluation.ray_engine import evaluation_recommendations_ray

        def engine(bundle: Path, data: Path, users: list[str], k: int, now: int) -> dict[str, Any]:
            return evaluation_recommendations_ray(bundle, data, users, k, now, ray_options)

    run_evaluation(
        args.data,
        args.bundle,
        config=OfflineConfig(
            ks=tuple(args.k),
            recall_cutoffs=tuple(sorted(args.cutoffs)),
            max_users=args.max_users,
            n_boot=args.n_boot,
            now=args.now,
        ),
        report_dir=args.report,
        progress=wants_progress(args.progress),
        engine=engine,
    )
    return 0


def run_evaluation(
    data: Path,
    bundle: Path,
    *,
    config: OfflineConfig | None = None,
    report_dir: Path | None = None,
    progress: bool = False,
    engine: PipelineEngine | None = None,
) -> dict[str, Any]:
    """Evaluate ``bundle`` on the test split of ``data``; print tables, optionally write files.

    progress: show the evaluation's stages on stderr while it runs; engine: where the
    pipelines answer (``evaluate_offline``)."""
    with terminal_progress(progress) as display:
        report = evaluate_offline(data, bundle, config, progress=display, engine=engine)
    print_recall_table(report["retrieval"])
    print_systems_table(report)
    if report_dir is not None:
        for path in write_report(report, report_dir, bundle):
            print(f"wrote {path}")
    return report


def _recommend(args: argparse.Namespace) -> int:
    from data.importer import scan_table
    from evaluation.batch_recommend import recommend_batch
    from pipeline.factory import make_pipeline, online_state_for

    if args.k <= 0:
        raise DataError(f"--k must be positive, got {args.k}")
    if args.workers is not None and args.workers <= 0:
        raise DataError(f"--workers must be positive, got {args.workers}")
    ray_options = _ray_options(args)
    parts_dir = ray_options is not None and args.out.suffix not in (".csv", ".parquet")
    if args.out.suffix not in (".csv", ".parquet") and not parts_dir:
        raise DataError(f"--out must end in .csv or .parquet, got {str(args.out)!r}")
    artifacts = load_artifacts(args.bundle, mmap=ray_options is not None)
    if args.all:
        users = artifacts.users.ids.to_list()
    else:
        frame = scan_table(args.users, string_columns=("user_id",)).collect()
        if "user_id" not in frame.columns:
            raise DataError(f"{args.users}: missing column 'user_id'; found {frame.columns}")
        users = frame["user_id"].cast(pl.String).unique(maintain_order=True).to_list()
    if ray_options is not None:
        from evaluation.ray_engine import recommend_ray

        if args.workers is not None:
            raise DataError("--workers is for --engine local; Ray takes --num-workers")
        result = recommend_ray(
            args.bundle,
            users,
            args.k,
            now=args.now,
            options=ray_options,
            out_dir=args.out if parts_dir else None,
        )
        if result is None:
            print(f"wrote parquet parts for {len(users):,} users to {args.out}/")
            return 0
        rows = result
    else:
        pipeline = make_pipeline(artifacts, online_state_for(artifacts), enforce_budgets=False)
        workers = args.workers or available_cores()
        rows = recommend_batch(
            pipeline, users, args.k, now=args.now, workers=workers, progress=True
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix == ".csv":
        rows.write_csv(args.out)
    else:
        rows.write_parquet(args.out)
    print(f"wrote {rows.height:,} rows for {len(users):,} users to {args.out}")
    return 0


def available_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS has one, e.g. a container)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def print_systems_table(report: dict[str, Any], console: Console | None = None) -> None:
    cut = report["ks"][0]
    table = Table(title=f"ranking on the test split ({report['n_users']:,} users, 95% CI)")
    for column in ("system", f"ndcg@{cut}", f"recall@{cut}", f"mrr@{cut}", f"coverage@{cut}"):
        table.add_column(column, justify="left" if column == "system" else "right")
    for name, values in report["systems"].items():
        ci = values[f"ndcg@{cut}"]
        table.add_row(
            name,
            f"{ci['mean']:.4f} [{ci['low']:.3f}, {ci['high']:.3f}]",
            f"{values[f'recall@{cut}']['mean']:.4f}",
            f"{values[f'mrr@{cut}']['mean']:.4f}",
            f"{report['beyond_accuracy'][name][f'coverage@{cut}']:.4f}",
        )
    (console or Console()).print(table)


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
