"""Benchmark: DDP two-tower training and Ray batch scoring on the default synthetic world.

The world is ``make run``'s (``WorldConfig()``, seed 0, temporal 80/10/10). Two parts:

1. **DDP training** (``recsys train --nproc N``). Three bundles with the same config and seed,
   hence the same global batch (512): single-process ``train_bundle`` (the baseline), DDP with
   1 process, and DDP with 2 gloo processes, one torch thread per process. Each run's
   two-tower examples/s is the median over its epochs (``curves.json``), and its recall@100 on
   the test split is what ``recsys evaluate`` reports for the ``two_tower`` source. Retrieval
   is ``two_tower`` + ``popular`` and the ranker is cut to 20 rounds: the other stages run on
   rank 0 alone and are not what is measured.
2. **Batch scoring** (``recsys recommend --all``), on the single-process bundle: users/s of
   today's local engine with 1 and 2 worker threads (``recommend_batch``) against the Ray
   engine with 1 and 2 actors on a local 2-CPU Ray (``evaluation.ray_engine``). The Ray
   cluster's start is timed apart; each Ray run includes its actors' start (loading the mapped
   bundle), which is part of what a command pays. Every Ray output is checked equal to the
   local one.

    python -m benchmarks.bench_distributed [--workdir DIR] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

from benchmarks.common import peak_rss_mb, write_result
from data.dataset import load_dataset
from data.prepare import prepare_dataset
from data.splits import SplitConfig
from data.synthetic import WorldConfig, generate
from evaluation.batch_recommend import recommend_batch
from evaluation.offline import evaluation_history
from evaluation.retrieval_eval import build_evaluation_users, retrieval_recall
from pipeline.artifacts import load_artifacts, train_bundle
from pipeline.distributed_train import launch_local
from pipeline.factory import make_pipeline, online_state_for

# Only the two-tower is distributed; see the module docstring. One torch thread per process:
# N processes are then N threads, and on a shared machine torch's default pool (one thread per
# core) stalls every step waiting for a busy core (TwoTowerConfig.num_threads).
CONFIG: dict[str, Any] = {
    "retrieval": {"sources": ["two_tower", "popular"], "two_tower": {"num_threads": 1}},
    "ranking": {"lightgbm": {"max_rounds": 20, "num_threads": 1}},
}
K = 10
NOW = 1_700_000_000


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep the dataset and bundles here")
    parser.add_argument("--repeats", type=int, default=2, help="timed scoring runs per engine")
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        figures = _run(args.workdir, args.repeats)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            figures = _run(Path(tmp), args.repeats)
    path = write_result("distributed", figures)
    for key, value in figures.items():
        print(f"{key}: {value:,.3f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"wrote {path}")
    return figures


def _run(workdir: Path, repeats: int) -> dict[str, Any]:
    data = workdir / "data"
    figures: dict[str, Any] = {"load_average_1min_start": os.getloadavg()[0]}
    figures.update(_prepare_world(data))
    bundles = {
        "single": workdir / "bundle_single",
        "ddp1": workdir / "bundle_ddp1",
        "ddp2": workdir / "bundle_ddp2",
    }
    for name, bundle in bundles.items():
        started = time.perf_counter()
        if name == "single":
            train_bundle(data, bundle, config=CONFIG)
        else:
            launch_local(data, bundle, nproc=int(name[-1]), config=CONFIG)
        figures[f"train_{name}_seconds"] = time.perf_counter() - started
        figures.update(_two_tower_figures(name, data, bundle))
    base = figures["train_single_examples_per_second"]
    for name in ("ddp1", "ddp2"):
        figures[f"train_{name}_speedup_vs_single"] = (
            figures[f"train_{name}_examples_per_second"] / base
        )
        figures[f"recall_at_100_{name}_minus_single"] = (
            figures[f"recall_at_100_{name}"] - figures["recall_at_100_single"]
        )
    figures.update(_scoring(bundles["single"], repeats))
    figures["load_average_1min_end"] = os.getloadavg()[0]
    figures["peak_rss_mb"] = peak_rss_mb()
    return figures


def _prepare_world(data: Path) -> dict[str, Any]:
    if not (data / "dataset.json").is_file():
        config = WorldConfig()
        synthetic = generate(config)
        prepare_dataset(
            data,
            synthetic.interactions,
            split=SplitConfig(),
            source={"kind": "synthetic", "world": config.to_dict()},
            items=synthetic.items,
            users=synthetic.users,
        )
    dataset = load_dataset(data)
    return {"train_events": dataset.splits["train"].height}


def _two_tower_figures(name: str, data: Path, bundle: Path) -> dict[str, Any]:
    curves = json.loads((bundle / "retrieval" / "two_tower" / "curves.json").read_text())
    epochs = curves["epochs"]
    artifacts = load_artifacts(bundle)
    dataset = load_dataset(data)
    evaluation = build_evaluation_users(
        artifacts,
        evaluation_history(dataset),
        dataset.splits["test"],
        history_length=artifacts.retrieval.config.history_length,
    )
    recall = retrieval_recall(artifacts, evaluation, (100,))
    return {
        f"train_{name}_examples_per_second": statistics.median(
            e["examples_per_second"] for e in epochs
        ),
        f"train_{name}_epochs": len(epochs),
        f"train_{name}_best_epoch": curves["best_epoch"],
        f"valid_recall_at_100_{name}": epochs[curves["best_epoch"] - 1]["valid_recall"],
        f"recall_at_100_{name}": recall["two_tower"]["recall@100"],
    }


def _scoring(bundle: Path, repeats: int) -> dict[str, Any]:
    import ray

    from evaluation.ray_engine import RayOptions, recommend_ray

    artifacts = load_artifacts(bundle)
    users = artifacts.users.ids.to_list()
    figures: dict[str, Any] = {"scoring_users": len(users)}
    pipeline = make_pipeline(artifacts, online_state_for(artifacts), enforce_budgets=False)
    reference: pl.DataFrame | None = None
    for workers in (1, 2):
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            reference = recommend_batch(pipeline, users, K, now=NOW, workers=workers)
            seconds.append(time.perf_counter() - started)
        figures[f"local_{workers}_workers_users_per_second"] = len(users) / statistics.median(
            seconds
        )
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    figures["ray_start_seconds"] = time.perf_counter() - started
    try:
        for workers in (1, 2):
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                rows = recommend_ray(
                    bundle, users, K, now=NOW, options=RayOptions(num_workers=workers)
                )
                seconds.append(time.perf_counter() - started)
                assert rows is not None and reference is not None and rows.equals(reference)
            figures[f"ray_{workers}_workers_users_per_second"] = len(users) / statistics.median(
                seconds
            )
    finally:
        ray.shutdown()
    base = figures["local_1_workers_users_per_second"]
    for name in ("local_2", "ray_1", "ray_2"):
        figures[f"{name}_workers_speedup_vs_local_1"] = (
            figures[f"{name}_workers_users_per_second"] / base
        )
    figures["ray_output_equals_local"] = True
    return figures


if __name__ == "__main__":
    main()
