"""``recsys quickstart``: the embedded default, end to end on a fresh machine.

Builds the default synthetic dataset, trains the bundle and evaluates it on the test split. Each
step is skipped when its output already exists (``--force`` redoes them); then it serves the bundle
on http://127.0.0.1:8000 (``--no-serve`` stops before).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.data_commands import print_summary
from cli.model_commands import run_evaluation
from cli.serve_command import run_server
from data.dataset import MANIFEST_NAME, dataset_summary
from data.prepare import prepare_dataset
from data.splits import SplitConfig
from pipeline.artifacts import train_bundle
from pipeline.bundle import MANIFEST_NAME as BUNDLE_MANIFEST

DEFAULT_OUT = Path(".quickstart")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "quickstart", help="build the default synthetic dataset (then train, evaluate, serve)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="working directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the dataset exists")
    parser.add_argument("--no-serve", action="store_true", help="stop before starting the server")
    parser.set_defaults(handler=_quickstart)


def _quickstart(args: argparse.Namespace) -> int:
    from data.synthetic import WorldConfig, generate

    data_dir = args.out / "data"
    if args.force or not (data_dir / MANIFEST_NAME).is_file():
        config = WorldConfig.from_overrides(seed=args.seed)
        synthetic = generate(config, progress=True)
        prepare_dataset(
            data_dir,
            synthetic.interactions,
            split=SplitConfig(),
            source={"kind": "synthetic", "world": config.to_dict()},
            items=synthetic.items,
            users=synthetic.users,
        )
        synthetic.world.save(data_dir / "world")
    else:
        print(f"reusing {data_dir} (pass --force to rebuild)")
    print_summary(data_dir, dataset_summary(data_dir))

    bundle_dir = args.out / "bundle"
    if args.force or not (bundle_dir / BUNDLE_MANIFEST).is_file():
        print(f"training {bundle_dir} ...", flush=True)
        manifest = train_bundle(data_dir, bundle_dir)
        print(f"wrote bundle {bundle_dir} (model_version {manifest['model_version']})")
    else:
        print(f"reusing {bundle_dir} (pass --force to retrain)")
    run_evaluation(data_dir, bundle_dir, report_dir=args.out / "report")
    if not args.no_serve:
        run_server(bundle_dir, data=data_dir, feedback_db=args.out / "feedback.sqlite3")
    return 0
