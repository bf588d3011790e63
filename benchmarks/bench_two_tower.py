"""Benchmark: two-tower training throughput and recall@100 on the default synthetic world.

The world is ``data.synthetic.generate(WorldConfig())`` (~5k users x 2k items x 200k clicks),
split by time 80/10/10. The model trains on the first 80% with early stopping on the next 10%;
throughput is training examples per second, the median over epochs (the first epoch included:
it is the one that pays for warm-up, and the median shrugs it off).

Recall@100 is measured on the last 10%: each test user is encoded from their state at the test
cut (training + validation events, the online view), the seen items are excluded, and the
relevant items are the test items the user had not seen. Plain popularity and 7-day trending
(both over training + validation) are the baselines the model has to beat.

``--device cuda`` runs the same measurement on a GPU.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np
import polars as pl
import torch

from benchmarks.common import peak_rss_mb, write_result
from data.catalog import ItemCatalog
from data.idmap import IdMap
from data.interactions import Interactions
from data.schema import ITEM_ID
from data.splits import temporal_split
from data.synthetic import WorldConfig, generate
from evaluation.metrics import recall_at_k
from retrieval.base import CandidateSource, UserBatch
from retrieval.popular import PopularConfig, PopularSource
from retrieval.two_tower import TwoTowerConfig, TwoTowerSource


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--epochs", type=int, default=8, help="max epochs (early stopping on)")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's own)"
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    data = generate(WorldConfig(seed=args.seed))
    splits = temporal_split(data.interactions, test_fraction=0.1, valid_fraction=0.1)
    # The item map is the whole catalogue: items released after the training cut are in it
    # (the model embeds them from features only).
    items = IdMap.from_ids(data.items[ITEM_ID])
    train = Interactions.from_frame(splits["train"], items=items)
    valid = Interactions.from_frame(
        splits["valid"], users=train.users, items=items, drop_unknown=True
    )
    before_test = Interactions.from_frame(
        pl.concat([splits["train"], splits["valid"]]),
        users=train.users,
        items=items,
        drop_unknown=True,
    )
    test = Interactions.from_frame(
        splits["test"], users=train.users, items=items, drop_unknown=True
    )
    catalog = ItemCatalog.from_frame(data.items, items)
    data_seconds = time.perf_counter() - started

    config = replace(
        TwoTowerConfig(),
        max_epochs=args.epochs,
        device=args.device,
        seed=args.seed,
        num_threads=args.threads,
    )
    started = time.perf_counter()
    source = TwoTowerSource(config).fit(train, catalog, valid)
    fit_seconds = time.perf_counter() - started
    curves = source.curves_

    test_users = np.unique(test.user_idx)
    state = UserBatch.from_interactions(
        before_test, test_users, history_length=config.history_length
    )
    seen = before_test.matrix[test_users]
    relevant = test.matrix[test_users]
    relevant = relevant - relevant.multiply(seen.astype(bool))
    relevant.eliminate_zeros()
    has_relevant = np.diff(relevant.indptr) > 0

    def recall(model: CandidateSource) -> tuple[float, float]:
        """(mean recall@k over users with an unseen test item, seconds to retrieve)."""
        began = time.perf_counter()
        top = model.retrieve(state, args.k, exclude=seen).item_idx
        seconds = time.perf_counter() - began
        per_user = recall_at_k(top[has_relevant], relevant[has_relevant], args.k)
        return float(np.mean(per_user)), seconds

    two_tower_recall, retrieve_seconds = recall(source)
    popular = PopularSource(PopularConfig(half_life_days=math.inf)).fit(before_test)
    trending = PopularSource(PopularConfig(half_life_days=7.0)).fit(before_test)

    speeds = [record.examples_per_second for record in curves.records]
    valid_recalls = [record.valid_recall or 0.0 for record in curves.records]
    figures: dict[str, Any] = {
        "device": args.device,
        "torch": f"{torch.__version__}, {args.threads or torch.get_num_threads()} CPU threads",
        "model": (
            f"dim {config.embedding_dim}, hidden {list(config.hidden_dims)}, "
            f"out {config.output_dim}, H {config.history_length}, batch {config.batch_size}, "
            f"{config.loss}"
        ),
        "train_events": len(train),
        "n_items": catalog.n_items,
        "examples_per_second_median": float(np.median(speeds)),
        "examples_per_second_per_epoch": [round(speed) for speed in speeds],
        "epoch_train_seconds_median": float(
            np.median([record.train_seconds for record in curves.records])
        ),
        "epochs_run": len(curves.records),
        "best_epoch": curves.best_epoch,
        f"valid_recall_at_{config.eval_k}_per_epoch": [round(r, 4) for r in valid_recalls],
        "fit_seconds": fit_seconds,
        "test_users_evaluated": int(has_relevant.sum()),
        f"recall_at_{args.k}_two_tower": two_tower_recall,
        f"recall_at_{args.k}_popular": recall(popular)[0],
        f"recall_at_{args.k}_trending_7d": recall(trending)[0],
        f"retrieve_top{args.k}_seconds_all_test_users": retrieve_seconds,
        "data_seconds": data_seconds,
        "peak_rss_mb": peak_rss_mb(),
    }
    # The default run is the documented one; other devices and thread counts get their own files.
    name = "two_tower" + ("_cuda" if args.device == "cuda" else "")
    name += f"_threads{args.threads}" if args.threads is not None else ""
    path = write_result(name, figures)
    for key, value in figures.items():
        print(f"{key}: {value}")
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
