"""Benchmark: the LightGBM ranker scored by LightGBM vs compiled to machine code (lleaves).

One request's 500 candidates x 41 features (the ranker's shape), two models trained here on
synthetic LambdaRank groups: the defaults' shape on the default dataset (15 leaves, 50 trees)
and the 1M load benchmark's pinned ranker (31 leaves, 163 trees). Both predictors run in the
same process, alternately, so the ratio holds on a noisy machine. Also: compile time (cold, then
from the on-disk cache) and the largest score difference.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from benchmarks.common import write_result
from ranking.compiled_forest import compile_forest, probe_rows

N_FEATURES = 41
CANDIDATES = 500
SHAPES = {"default": (15, 50), "load_bench": (31, 163)}  # leaves, trees


def train(leaves: int, trees: int, seed: int) -> lgb.Booster:
    """A LambdaRank model of the given shape on synthetic groups with missing values."""
    rng = np.random.default_rng(seed)
    groups, size = 400, 100
    values = rng.normal(size=(groups * size, N_FEATURES)).astype(np.float32)
    values[rng.random(values.shape) < 0.2] = np.nan
    signal = np.nan_to_num(values[:, :8]) @ rng.normal(size=8)
    labels = (signal + rng.normal(0, 1, len(signal)) > 2.0).astype(np.float32)
    data = lgb.Dataset(values, labels, group=np.full(groups, size))
    params = {
        "objective": "lambdarank",
        "num_leaves": leaves,
        "min_data_in_leaf": 20,
        "learning_rate": 0.05,
        "verbosity": -1,
        "num_threads": 1,
        "seed": seed,
    }
    return lgb.train(params, data, num_boost_round=trees)


def median_ms(run: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def measure(name: str, leaves: int, trees: int, repeats: int, cache: Path) -> dict[str, float]:
    booster = train(leaves, trees, seed=0)
    start = time.perf_counter()
    forest = compile_forest(booster, cache_dir=cache)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    again = compile_forest(booster, cache_dir=cache)
    cached = time.perf_counter() - start
    if forest is None or again is None:
        raise RuntimeError("the ranker did not compile; see the warning above")
    rows = np.random.default_rng(1).normal(size=(CANDIDATES, N_FEATURES)).astype(np.float32)
    rows[np.random.default_rng(2).random(rows.shape) < 0.2] = np.nan
    lightgbm_ms, compiled_ms = [], []
    for _ in range(5):  # alternate rounds: both see the same moments of the machine
        lightgbm_ms.append(median_ms(lambda: booster.predict(rows, num_threads=1), repeats))
        compiled_ms.append(median_ms(lambda: forest.predict(rows), repeats))
    edges = probe_rows(booster, 5_000, seed=3)
    difference = np.abs(forest.predict(edges) - booster.predict(edges, num_threads=1)).max()
    lgbm, compiled = float(np.median(lightgbm_ms)), float(np.median(compiled_ms))
    return {
        f"{name}_trees": float(booster.num_trees()),
        f"{name}_leaves": float(leaves),
        f"{name}_lightgbm_p50_ms": lgbm,
        f"{name}_compiled_p50_ms": compiled,
        f"{name}_speedup": lgbm / compiled,
        f"{name}_compile_cold_s": cold,
        f"{name}_compile_cached_s": cached,
        f"{name}_max_abs_score_difference": float(difference),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    figures: dict[str, Any] = {"candidates": CANDIDATES, "features": N_FEATURES, "threads": 1}
    with tempfile.TemporaryDirectory() as cache:
        for name, (leaves, trees) in SHAPES.items():
            figures.update(measure(name, leaves, trees, args.repeats, Path(cache)))
            print({k: round(v, 4) for k, v in figures.items() if k.startswith(name)}, flush=True)
    path = write_result("compiled_ranker", figures)
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main()
