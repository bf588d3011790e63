"""Benchmark: synthetic world generation + temporal split at 1M users x 100k items x 20M clicks.

Issue 2 asks for generation + temporal split of a 20M-interaction log in under 60 s and 6 GB on
2 cores. Phases are timed separately (world sampling, log simulation, frames, split), and peak
memory is the process high-water mark (``ru_maxrss``), so run it in a fresh process
(``python -m benchmarks.bench_synthetic``; ``make bench`` does).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from benchmarks.common import peak_rss_mb, write_result
from data.splits import temporal_split
from data.synthetic import (
    World,
    WorldConfig,
    interactions_frame,
    items_frame,
    simulate_log,
    users_frame,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--interactions", type=int, default=20_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="threads (default: all CPUs)")
    parser.add_argument("--no-write", action="store_true", help="print only, keep results/ as is")
    args = parser.parse_args(argv)

    config = WorldConfig(
        n_users=args.users,
        n_items=args.items,
        n_days=args.days,
        target_interactions=args.interactions,
        seed=args.seed,
    )
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    world = World.sample(config)
    seconds["world"] = time.perf_counter() - start

    mark = time.perf_counter()
    log = simulate_log(world, workers=args.workers)
    seconds["log"] = time.perf_counter() - mark

    mark = time.perf_counter()
    interactions = interactions_frame(log)
    items_frame(world)
    users_frame(world)
    seconds["frames"] = time.perf_counter() - mark
    generation = time.perf_counter() - start

    mark = time.perf_counter()
    splits = temporal_split(interactions, test_fraction=0.1, valid_fraction=0.1)
    seconds["split"] = time.perf_counter() - mark
    total = time.perf_counter() - start

    figures: dict[str, Any] = {
        "users": config.n_users,
        "items": config.n_items,
        "days": config.n_days,
        "target_interactions": config.target_interactions,
        "interactions": interactions.height,
        "sessions": log.n_sessions,
        "slates": log.n_slates,
        "slate_click_rate": interactions.height / max(log.n_slates, 1),
        "workers": args.workers if args.workers is not None else len(os.sched_getaffinity(0)),
        **{f"{phase}_seconds": value for phase, value in seconds.items()},
        "generation_seconds": generation,
        "generation_and_split_seconds": total,
        "interactions_per_second": interactions.height / generation,
        "train_valid_test_rows": "/".join(
            str(splits[k].height) for k in ("train", "valid", "test")
        ),
        "peak_rss_mb": peak_rss_mb(),
    }
    for key, value in figures.items():
        print(f"{key}: {value:,.3f}" if isinstance(value, float) else f"{key}: {value}")
    if not args.no_write:
        print(f"wrote {write_result('synthetic', figures)}")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
