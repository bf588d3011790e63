"""``recsys data synth | movielens | import | info``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from data.dataset import dataset_summary
from data.implicit import k_core, to_implicit
from data.prepare import prepare_dataset
from data.schema import TIMESTAMP
from data.splits import SplitConfig

_SPLIT_METHODS = ("temporal", "leave_last_n", "random", "user_disjoint")
_DEFAULT_SPLIT = SplitConfig()


def register(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="create, import and inspect datasets")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    synth = sub.add_parser(
        "synth", help="generate the synthetic world (the embedded default dataset)"
    )
    synth.add_argument("--out", required=True, type=Path, help="dataset directory to write")
    synth.add_argument("--users", type=int, help="number of users")
    synth.add_argument("--items", type=int, help="number of items")
    synth.add_argument("--days", type=int, help="days of simulated activity")
    synth.add_argument("--interactions", type=int, help="approximate number of interactions")
    synth.add_argument("--seed", type=int, default=0, help="random seed (same seed, same dataset)")
    synth.add_argument(
        "--drift",
        choices=("none", "concept", "covariate", "prior"),
        default="none",
        help="drift scenario starting at --drift-day",
    )
    synth.add_argument("--drift-day", type=int, help="day the drift starts")
    _add_split_arguments(synth)
    synth.set_defaults(handler=_synth)

    movielens = sub.add_parser("movielens", help="load a MovieLens ratings file")
    movielens.add_argument(
        "--variant", required=True, choices=("100k", "1m", "latest-small", "20m", "25m")
    )
    movielens.add_argument(
        "--source", help="directory, .zip or URL (default: the official GroupLens download)"
    )
    movielens.add_argument("--out", required=True, type=Path)
    movielens.add_argument("--cache-dir", type=Path, help="where downloads are cached")
    movielens.add_argument(
        "--min-rating",
        type=float,
        help="keep only ratings >= this as implicit positives "
        "(default: every rating is a positive, weight = rating)",
    )
    _add_split_arguments(movielens)
    movielens.set_defaults(handler=_movielens)

    imp = sub.add_parser("import", help="import a generic CSV/parquet interaction log")
    imp.add_argument("--interactions", required=True, type=Path, help="CSV or parquet log")
    imp.add_argument("--test", type=Path, help="explicit test set (kept exactly as given)")
    imp.add_argument("--items", type=Path, help="item side table (CSV or parquet)")
    imp.add_argument("--users", type=Path, help="user side table (CSV or parquet)")
    imp.add_argument("--user-col", default="user_id")
    imp.add_argument("--item-col", default="item_id")
    imp.add_argument(
        "--time-col",
        help="event time column (default: 'timestamp' when the file has one; "
        "without one the log is untimed and split at random per user)",
    )
    imp.add_argument("--weight-col", help="weight column (default: every row weighs 1.0)")
    imp.add_argument(
        "--time-unit", choices=("s", "ms"), default="s", help="unit of integer timestamps"
    )
    imp.add_argument("--min-weight", type=float, help="keep only rows with weight >= this")
    imp.add_argument(
        "--k-core",
        type=int,
        metavar="K",
        help="keep the K-core: drop items with fewer than K users and users with fewer than K "
        "items, repeated until stable (repeated pairs are summed first; applied to the "
        "training log, a --test file is kept exactly as given)",
    )
    imp.add_argument("--out", required=True, type=Path)
    _add_split_arguments(imp)
    imp.set_defaults(handler=_import)

    info = sub.add_parser("info", help="summarise a dataset directory")
    info.add_argument("path", type=Path, metavar="DIR")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(handler=_info)


def _add_split_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("split")
    group.add_argument(
        "--split",
        choices=_SPLIT_METHODS,
        help="how to split (default: temporal, or random per user for a log without times; "
        "random splits of timed behaviour logs leak the future)",
    )
    group.add_argument("--test-fraction", type=float, default=_DEFAULT_SPLIT.test_fraction)
    group.add_argument("--valid-fraction", type=float, default=_DEFAULT_SPLIT.valid_fraction)
    group.add_argument(
        "--n-test",
        type=int,
        default=_DEFAULT_SPLIT.n_test,
        help="leave_last_n: test events per user",
    )
    group.add_argument(
        "--n-valid",
        type=int,
        default=_DEFAULT_SPLIT.n_valid,
        help="leave_last_n: valid events per user",
    )
    group.add_argument("--split-seed", type=int, default=_DEFAULT_SPLIT.seed)


def _split_config(args: argparse.Namespace, *, timed: bool = True) -> SplitConfig:
    default_method = _DEFAULT_SPLIT.method if timed else "random"
    return SplitConfig(
        method=args.split or default_method,
        test_fraction=args.test_fraction,
        valid_fraction=args.valid_fraction,
        n_test=args.n_test,
        n_valid=args.n_valid,
        seed=args.split_seed,
    )


def _synth(args: argparse.Namespace) -> int:
    from data.synthetic import WorldConfig, generate

    overrides = {
        "n_users": args.users,
        "n_items": args.items,
        "n_days": args.days,
        "target_interactions": args.interactions,
        "drift_day": args.drift_day,
    }
    config = WorldConfig.from_overrides(
        seed=args.seed, drift=args.drift, **{k: v for k, v in overrides.items() if v is not None}
    )
    synthetic = generate(config, progress=True)
    manifest = prepare_dataset(
        args.out,
        synthetic.interactions,
        split=_split_config(args),
        source={"kind": "synthetic", "world": config.to_dict()},
        items=synthetic.items,
        users=synthetic.users,
    )
    synthetic.world.save(args.out / "world")
    _print_written(args.out, manifest)
    return 0


def _movielens(args: argparse.Namespace) -> int:
    from data.movielens import load_movielens

    loaded = load_movielens(args.variant, args.source, cache_dir=args.cache_dir)
    interactions = loaded.interactions
    if args.min_rating is not None:
        interactions = to_implicit(interactions, min_weight=args.min_rating)
    manifest = prepare_dataset(
        args.out,
        interactions,
        split=_split_config(args),
        source={"kind": "movielens", "variant": args.variant, "min_rating": args.min_rating},
        items=loaded.items,
    )
    _print_written(args.out, manifest)
    return 0


def _import(args: argparse.Namespace) -> int:
    from data.importer import column_names, import_interactions, import_table

    time_col = args.time_col
    if time_col is None and TIMESTAMP in column_names(args.interactions):
        time_col = TIMESTAMP
    if time_col is None:
        print(f"{args.interactions}: no time column; importing an untimed log")

    def load(path: Path) -> Any:
        frame = import_interactions(
            path,
            user_col=args.user_col,
            item_col=args.item_col,
            time_col=time_col,
            weight_col=args.weight_col,
            time_unit=args.time_unit,
        )
        return (
            frame
            if args.min_weight is None
            else to_implicit(frame, min_weight=args.min_weight, weighting="raw")
        )

    interactions = load(args.interactions)
    test = load(args.test) if args.test else None
    if args.k_core is not None:
        interactions = k_core(
            to_implicit(interactions, weighting="raw", dedup="sum"),
            min_user_interactions=args.k_core,
            min_item_interactions=args.k_core,
        )
    manifest = prepare_dataset(
        args.out,
        interactions,
        split=_split_config(args, timed=time_col is not None),
        source={
            "kind": "import",
            "interactions": str(args.interactions),
            "test": _str(args.test),
            "k_core": args.k_core,
        },
        test=test,
        items=import_table(args.items, "item_id", "items") if args.items else None,
        users=import_table(args.users, "user_id", "users") if args.users else None,
        timed=time_col is not None,
    )
    _print_written(args.out, manifest)
    return 0


def _info(args: argparse.Namespace) -> int:
    summary = dataset_summary(args.path)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True, default=str))
        return 0
    print_summary(args.path, summary)
    return 0


def print_summary(path: Path, summary: dict[str, Any], console: Console | None = None) -> None:
    """Render a dataset summary as a table on the terminal."""
    table = Table(title=f"dataset {path}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows: list[tuple[str, str]] = [
        ("source", json.dumps(_short_source(summary["source"]))),
        ("users", f"{summary['users']:,}"),
        ("items", f"{summary['items']:,}"),
        ("interactions", f"{summary['interactions']:,}"),
        ("density", f"{summary['density']:.5f}"),
        (
            "per user (median / p99 / max)",
            f"{summary['median_per_user']:g} / {summary['p99_per_user']:g} / "
            f"{summary['max_per_user']:,}",
        ),
        (
            "time range (UTC s)",
            f"{summary['first_timestamp']} .. {summary['last_timestamp']}"
            if summary.get("timed", True)
            else "none (an untimed log)",
        ),
        ("split", json.dumps(summary["split_method"])),
        (
            "train / valid / test",
            " / ".join(f"{summary['splits'][n]:,}" for n in ("train", "valid", "test")),
        ),
        (
            "side tables",
            ", ".join(n for n in ("items", "users", "world") if summary[f"has_{n}"]) or "none",
        ),
        ("fingerprint", summary["fingerprint"]),
    ]
    for field, value in rows:
        table.add_row(field, value)
    (console or Console()).print(table)


def _short_source(source: dict[str, Any]) -> dict[str, Any]:
    """The synthetic world config is long; the summary shows its size only."""
    world = source.get("world")
    if not isinstance(world, dict):
        return source
    keys = ("n_users", "n_items", "n_days", "drift", "seed")
    return {"kind": source.get("kind"), **{k: world[k] for k in keys if k in world}}


def _print_written(out: Path, manifest: dict[str, Any]) -> None:
    counts = manifest["counts"]
    splits = manifest["split"]["counts"]
    print(
        f"wrote {out}: {counts['users']:,} users, {counts['items']:,} items, "
        f"{counts['interactions']:,} interactions "
        f"(train {splits['train']:,} / valid {splits['valid']:,} / test {splits['test']:,})"
    )


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
