"""Retrieval recall: how much of each user's future each source (and the merged list) retrieves.

Retrieval bounds everything downstream: an item that is not retrieved can never be ranked. For
every test user we ask each source for its top-N (N up to the largest cutoff), with the user's whole
history excluded, and measure recall@N against the test items they had not seen before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp

from data.interactions import Interactions
from data.schema import ITEM_ID, USER_ID
from evaluation.metrics import mean, recall_at_k
from pipeline.artifacts import Artifacts
from retrieval.base import PAD_ITEM, UserBatch

MERGED = "merged"


@dataclass(frozen=True)
class EvaluationUsers:
    """Test users in index space: their state at test time, what they saw, what they engaged with.

    users:    UserBatch over the test users (user_idx -1 for users unknown to the bundle)
    seen:     (n, n_items) CSR, every item in the user's history (excluded from retrieval)
    relevant: (n, n_items + n_new) CSR, test items not seen before; items unknown to the bundle get
              extra columns, so they count as relevant but can never be hit (an honest recall)
    user_ids: (n,) external ids, aligned with the rows
    """

    users: UserBatch
    seen: sp.csr_matrix
    relevant: sp.csr_matrix
    user_ids: pl.Series


def build_evaluation_users(
    artifacts: Artifacts,
    history: pl.DataFrame,
    test: pl.DataFrame,
    *,
    history_length: int,
    max_users: int | None = None,
    seed: int = 0,
) -> EvaluationUsers:
    """Index the test users against the bundle's id maps; ``history`` is everything before test."""
    test_users = test[USER_ID].unique().sort()
    if max_users is not None and test_users.len() > max_users:
        test_users = test_users.sample(max_users, seed=seed).sort()
    # Users first seen after training get indices past the bundle's map: known to the history,
    # unknown (-1) to the models, exactly as the service would see them.
    user_map = artifacts.users.extend(pl.concat([history[USER_ID], test_users]))
    item_map = artifacts.items.extend(pl.concat([history[ITEM_ID], test[ITEM_ID]]))
    n_known_items = len(artifacts.items)
    past = Interactions.from_frame(history, users=user_map, items=item_map)
    rows = user_map.index(test_users)
    batch = UserBatch.from_interactions(past, rows, history_length=history_length)
    model_users = np.where(rows < len(artifacts.users), rows, -1).astype(np.int32)
    batch = _without_unknown_items(
        UserBatch(model_users, batch.recent_items, batch.recent_times, batch.now), n_known_items
    )

    full_seen = past.matrix[rows]
    seen = (full_seen[:, :n_known_items] > 0).astype(np.float32).tocsr()
    future = Interactions.from_frame(
        test.filter(pl.col(USER_ID).is_in(test_users.implode())), users=user_map, items=item_map
    )
    relevant = sp.csr_matrix(
        (np.ones(len(future), np.float32), (future.user_idx, future.item_idx)),
        shape=(len(user_map), len(item_map)),
    )[rows]
    relevant.sum_duplicates()
    relevant = relevant - relevant.multiply(full_seen > 0)
    relevant.eliminate_zeros()
    relevant.data[:] = 1.0
    return EvaluationUsers(batch, seen, relevant.tocsr(), test_users)


def retrieval_recall(
    artifacts: Artifacts,
    evaluation: EvaluationUsers,
    cutoffs: tuple[int, ...] = (50, 100, 200, 500),
    *,
    batch_size: int = 2048,
) -> dict[str, dict[str, float]]:
    """Recall@N per source and for the merged candidate list: ``{source: {"recall@N": value}}``."""
    stage = artifacts.retrieval
    k = max(cutoffs)
    n = len(evaluation.users)
    names = (*stage.source_names, MERGED)
    lists = {name: np.full((n, k), PAD_ITEM, dtype=np.int32) for name in names}
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        users = evaluation.users.take(rows)
        seen = evaluation.seen[rows]
        for name, cand in stage.retrieve_each(users, k, exclude=seen).items():
            lists[name][rows] = cand.item_idx
        merged = stage.retrieve(users, exclude=seen).item_idx[:, :k]
        lists[MERGED][rows, : merged.shape[1]] = merged
    has_relevant = np.diff(evaluation.relevant.indptr) > 0
    report: dict[str, dict[str, float]] = {}
    for name, recommended in lists.items():
        per_source = {}
        for cutoff in cutoffs:
            values = recall_at_k(
                recommended[has_relevant], evaluation.relevant[has_relevant], cutoff
            )
            per_source[f"recall@{cutoff}"] = mean(values).value
        report[name] = per_source
    report["_meta"] = {"n_users": float(has_relevant.sum())}
    return report


def _without_unknown_items(users: UserBatch, n_known: int) -> UserBatch:
    """History items the bundle does not know become padding (models have no vector for them).

    Known items keep their most-recent-first order; padding moves to the end of each row.
    """
    unknown = users.recent_items >= n_known
    order = np.argsort(unknown | (users.recent_items == PAD_ITEM), axis=1, kind="stable")
    items = np.where(unknown, PAD_ITEM, users.recent_items).astype(np.int32)
    times = np.where(unknown, 0, users.recent_times)
    return UserBatch(
        users.user_idx,
        np.take_along_axis(items, order, axis=1),
        np.take_along_axis(times, order, axis=1),
        users.now,
    )
