"""Benchmark: time from a feedback event to changed recommendations (issue 3, online updates).

On the default synthetic world (trained once here), for sampled users: record one click in the
online state, then retrieve the merged candidates again. Reports the event-to-new-candidates latency
(observe + retrieve, p50/p99), how often the candidate list changed, and the time to make a new
item retrievable (embed + live index add).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.common import peak_rss_mb, write_result, write_synthetic_dataset
from data.catalog import ItemCatalog
from data.dataset import load_dataset
from data.interactions import Interactions
from data.synthetic import WorldConfig
from pipeline.artifacts import load_artifacts, train_bundle
from pipeline.online_state import OnlineState


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=300, help="users to update")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        data, bundle = Path(tmp) / "data", Path(tmp) / "bundle"
        config = WorldConfig.from_overrides(seed=args.seed)
        write_synthetic_dataset(data, config)
        start = time.perf_counter()
        train_bundle(data, bundle)
        train_seconds = time.perf_counter() - start
        artifacts = load_artifacts(bundle)
        stage = artifacts.retrieval
        dataset = load_dataset(data)
        history = pl.concat([dataset.splits["train"], dataset.splits["valid"]])
        log = Interactions.from_frame(
            history, users=artifacts.users, items=artifacts.items, drop_unknown=True
        )
        state = OnlineState.from_log(log, artifacts.users, stage.config.history_length)
        now = int(log.timestamp.max()) + 1
        rng = np.random.default_rng(args.seed)
        users = rng.choice(artifacts.users.ids.to_list(), size=args.users, replace=False)
        latencies, changed = [], 0
        for user in users:
            before = stage.retrieve(state.batch([user], now)).item_idx[0]
            item = int(rng.integers(artifacts.catalog.n_items))
            start = time.perf_counter()
            state.observe([user], [item], [now])
            after = stage.retrieve(state.batch([user], now)).item_idx[0]
            latencies.append(time.perf_counter() - start)
            changed += int(not np.array_equal(before, after))

        new_items = artifacts.items.extend([f"new-{i}" for i in range(100)])
        catalog = ItemCatalog.from_frame(
            dataset.items, new_items, category_names=artifacts.catalog.category_names
        )
        new_idx = new_items.index([f"new-{i}" for i in range(100)])
        start = time.perf_counter()
        stage.add_items(new_idx, catalog)
        add_seconds = time.perf_counter() - start

    ms = np.array(latencies) * 1000
    figures = {
        "users_updated": int(args.users),
        "bundle_train_seconds": train_seconds,
        "event_to_candidates_p50_ms": float(np.percentile(ms, 50)),
        "event_to_candidates_p99_ms": float(np.percentile(ms, 99)),
        "candidates_changed_fraction": changed / args.users,
        "add_100_new_items_ms": add_seconds * 1000,
        "peak_rss_mb": peak_rss_mb(),
    }
    path = write_result("online", figures)
    for key, value in figures.items():
        print(f"{key}: {value:,.3f}" if isinstance(value, float) else f"{key}: {value:,}")
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
