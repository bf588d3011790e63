"""Benchmark: vectorized negative sampling, 10M negatives (issue 2: "10M negatives in seconds").

Positives are a power-law log of 2M (user, item) pairs over 200k users x 100k items; we draw 5
negatives per positive (10M) uniformly and popularity-weighted, and report the median wall time.
"""

from __future__ import annotations

import argparse
import functools
import sys

import numpy as np

from benchmarks.common import median_seconds, peak_rss_mb, write_result
from data.negatives import sample_negatives


def make_positives(
    n_users: int, n_items: int, n_positives: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unique (user, item) pairs with Zipf-like item popularity, as a real log has."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n_positives, dtype=np.int64)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    items = rng.choice(n_items, size=n_positives, p=popularity / popularity.sum())
    keys = np.sort(users * n_items + items)
    # sort + neighbour comparison: np.unique is far slower on this numpy build for int64 keys.
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
    return (keys // n_items).astype(np.int32), (keys % n_items).astype(np.int32)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--positives", type=int, default=2_000_000)
    parser.add_argument("--ratio", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    users, items = make_positives(args.users, args.items, args.positives, seed=0)
    counts = np.bincount(items, minlength=args.items)
    figures: dict[str, float] = {
        "positives": int(users.size),
        "negatives_per_call": int(users.size * args.ratio),
    }
    for strategy in ("uniform", "popularity"):
        rng = np.random.default_rng(1)
        sample = functools.partial(
            sample_negatives,
            users,
            items,
            args.items,
            args.ratio,
            strategy=strategy,
            item_counts=counts,
            rng=rng,
        )
        median, _ = median_seconds(sample, args.repeats)
        figures[f"{strategy}_seconds_median"] = median
        figures[f"{strategy}_negatives_per_second"] = users.size * args.ratio / median
    figures["peak_rss_mb"] = peak_rss_mb()
    path = write_result("negatives", figures)
    for key, value in figures.items():
        print(f"{key}: {value:,.3f}" if isinstance(value, float) else f"{key}: {value:,}")
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
