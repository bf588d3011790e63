"""``recsys quickstart``: the embedded default, end to end on a fresh machine.

Today it builds the default synthetic dataset and prints its summary; training, evaluation and
serving join this command as those stages land (see the open issues).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.data_commands import print_summary
from data.dataset import MANIFEST_NAME, dataset_summary
from data.prepare import prepare_dataset
from data.splits import SplitConfig

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
    return 0
