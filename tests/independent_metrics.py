"""Ranking metrics recomputed from ``recsys recommend`` output, independently of ``evaluation/``.

A second implementation to check ``report.json`` against: it imports nothing from the project,
reads files only (the recommendations that ``recsys recommend`` wrote and the dataset's split
parquet files), and computes each metric per user with plain Python sets and loops, straight from
the textbook definitions. Agreement with the vectorised ``evaluation.metrics`` on a real run says
that both the metric code and the report's plumbing (users, relevance, seen items) are right.

Run it by hand::

    python tests/independent_metrics.py --recommendations recs.parquet --data DATASET --k 10 20

and it prints ``{"ndcg@10": ..., ..., "n_users": ...}`` as JSON.

Conventions (the ones ``recsys evaluate`` documents; each matches trec_eval where trec has it):

* **Relevant items** of a user: the distinct items of their rows in ``splits/test.parquet`` that
  they had *not* already interacted with in ``splits/train.parquet`` or ``splits/valid.parquet``.
  Binary relevance: the rating (``weight``) is ignored. A seen item cannot be recommended (seen
  items are excluded), so counting a re-watch as relevant would only lower every system alike.
* **Evaluated users**: every user with at least one relevant item; the reported value is the plain
  mean over them. A user missing from the recommendations file is evaluated with an empty list.
* **The list** of a user: their rows sorted by ``rank``, cut at ``K``. An item listed twice
  counts once, at its first (best) rank.
* ``ndcg@K``: DCG / ideal DCG; gain 1 per hit, discount ``1 / log2(rank + 1)``; the ideal list
  holds ``min(|relevant|, K)`` hits at the top (trec's ``ndcg_cut.K``).
* ``mrr@K``: ``1 / rank`` of the first hit within the top ``K``; 0 without a hit.
* ``recall@K``: hits / ``|relevant|`` (trec's ``recall.K``; a user with more than ``K`` relevant
  items cannot reach 1).
* ``precision@K``: hits / ``K``, also for a list shorter than ``K`` (trec's ``P.K``).
* ``map@K``: the sum over hit ranks ``r <= K`` of precision@r, divided by ``min(|relevant|, K)``:
  the MAP@K of recommender benchmarks (Kaggle's ``apk``), so a perfect list scores 1.
* ``hit_rate@K``: 1 if any of the top ``K`` is relevant, else 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow.parquet as pq

METRICS = ("ndcg", "mrr", "recall", "precision", "map", "hit_rate")


def read_recommendations(path: Path) -> dict[str, list[str]]:
    """``{user_id: [item_id, ...]}`` in rank order, from a ``user_id,item_id,rank,score`` file."""
    rows: list[tuple[str, int, str]]
    if path.suffix == ".parquet":
        table = pq.read_table(path, columns=["user_id", "item_id", "rank"]).to_pydict()
        rows = list(zip(table["user_id"], table["rank"], table["item_id"], strict=True))
    elif path.suffix == ".csv":
        with path.open(newline="") as handle:
            rows = [(r["user_id"], int(r["rank"]), r["item_id"]) for r in csv.DictReader(handle)]
    else:
        raise ValueError(f"{path}: recommendations must be .csv or .parquet")
    ranked: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for user, rank, item in rows:
        ranked[user].append((rank, item))
    return {user: [item for _, item in sorted(pairs)] for user, pairs in ranked.items()}


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """The ``(user_id, item_id)`` pairs of one split file (a missing file is an empty split)."""
    if not path.is_file():
        return []
    table = pq.read_table(path, columns=["user_id", "item_id"]).to_pydict()
    return list(zip(table["user_id"], table["item_id"], strict=True))


def relevant_items(data_dir: Path) -> dict[str, set[str]]:
    """Each user's test items that are new to them (see the module docstring); none: left out."""
    seen: dict[str, set[str]] = defaultdict(set)
    for name in ("train", "valid"):
        for user, item in read_pairs(data_dir / "splits" / f"{name}.parquet"):
            seen[user].add(item)
    relevant: dict[str, set[str]] = defaultdict(set)
    for user, item in read_pairs(data_dir / "splits" / "test.parquet"):
        if item not in seen[user]:
            relevant[user].add(item)
    return dict(relevant)


def hit_ranks(ranked_items: Sequence[str], relevant: set[str], k: int) -> list[int]:
    """1-based ranks within the top ``k`` that hold a relevant item, each item counted once."""
    counted: set[str] = set()
    ranks = []
    for rank, item in enumerate(ranked_items[:k], start=1):
        if item in relevant and item not in counted:
            counted.add(item)
            ranks.append(rank)
    return ranks


def user_metrics(ranked_items: Sequence[str], relevant: set[str], k: int) -> dict[str, float]:
    """Every metric of one user at cutoff ``k`` (``relevant`` must not be empty)."""
    hits = hit_ranks(ranked_items, relevant, k)
    n_ideal = min(len(relevant), k)
    dcg = sum(1.0 / math.log2(rank + 1) for rank in hits)
    ideal_dcg = sum(1.0 / math.log2(rank + 1) for rank in range(1, n_ideal + 1))
    # precision@r at the i-th hit (rank r) is i / r.
    precision_sum = sum(i / rank for i, rank in enumerate(hits, start=1))
    return {
        "ndcg": dcg / ideal_dcg,
        "mrr": 1.0 / hits[0] if hits else 0.0,
        "recall": len(hits) / len(relevant),
        "precision": len(hits) / k,
        "map": precision_sum / n_ideal,
        "hit_rate": 1.0 if hits else 0.0,
    }


def evaluate(
    recommendations: dict[str, list[str]], relevant: dict[str, set[str]], ks: Iterable[int]
) -> dict[str, float]:
    """Mean of every metric at every cutoff over the users with relevant items, plus counts."""
    users = sorted(user for user, items in relevant.items() if items)
    result: dict[str, float] = {}
    for k in sorted(set(ks)):
        if k < 1:
            raise ValueError(f"cutoff k must be >= 1, got {k}")
        totals = dict.fromkeys(METRICS, 0.0)
        for user in users:
            for name, value in user_metrics(
                recommendations.get(user, []), relevant[user], k
            ).items():
                totals[name] += value
        for name in METRICS:
            result[f"{name}@{k}"] = totals[name] / len(users) if users else math.nan
    result["n_users"] = float(len(users))
    result["n_users_without_recommendations"] = float(
        sum(1 for user in users if not recommendations.get(user))
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recommendations", required=True, type=Path, help=".csv or .parquet")
    parser.add_argument("--data", required=True, type=Path, help="dataset directory (splits/)")
    parser.add_argument("--k", type=int, nargs="+", default=[10], help="cutoffs")
    args = parser.parse_args(argv)
    result = evaluate(read_recommendations(args.recommendations), relevant_items(args.data), args.k)
    json.dump(result, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
