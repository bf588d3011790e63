"""Index-space views of the data: Interactions, ItemCatalog, UserBatch, Candidates.from_scores."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from data.catalog import ItemCatalog
from data.errors import DataError
from data.idmap import IdMap
from data.interactions import Interactions
from retrieval.base import PAD_ITEM, Candidates, UserBatch


def frame(rows: list[tuple[str, str, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "timestamp": [r[2] for r in rows],
            "weight": [1.0] * len(rows),
        }
    )


LOG = frame([("b", "x", 5), ("a", "y", 1), ("a", "x", 3), ("a", "x", 4), ("b", "z", 2)])


def test_interactions_sorted_and_matrix_sums_repeats() -> None:
    log = Interactions.from_frame(LOG)
    assert log.timestamp.tolist() == [1, 2, 3, 4, 5]
    assert (log.n_users, log.n_items) == (2, 3)
    dense = log.matrix.toarray()
    a, x = log.users.index(["a"])[0], log.items.index(["x"])[0]
    assert dense[a, x] == 2.0
    assert log.item_counts.sum() == 5 and log.user_counts.tolist() == [3, 2]
    assert len(log.before(4)) == 3


def test_unknown_ids_raise_or_drop() -> None:
    train = Interactions.from_frame(LOG)
    later = frame([("a", "x", 9), ("c", "x", 9), ("a", "w", 9)])
    with pytest.raises(DataError, match="not in the id map"):
        Interactions.from_frame(later, users=train.users, items=train.items)
    kept = Interactions.from_frame(later, users=train.users, items=train.items, drop_unknown=True)
    assert len(kept) == 1


def test_user_batch_history_is_most_recent_first_and_padded() -> None:
    log = Interactions.from_frame(LOG)
    a, b = log.users.index(["a", "b"])
    batch = UserBatch.from_interactions(log, [a, -1, b], history_length=2)
    items = log.items.to_ids(batch.recent_items[0]).to_list()
    assert items == ["x", "x"] and batch.recent_times[0].tolist() == [4, 3]
    assert (batch.recent_items[1] == PAD_ITEM).all()
    assert log.items.to_ids(batch.recent_items[2]).to_list() == ["x", "z"]
    assert batch.now.tolist() == [5, 5, 5]
    seen = batch.history_matrix(log.n_items)
    assert seen[0].nnz == 1 and seen[1].nnz == 0 and seen[2].nnz == 2


def test_user_batch_take_is_batch_invariant() -> None:
    log = Interactions.from_frame(LOG)
    full = UserBatch.from_interactions(log, [0, 1], history_length=3)
    alone = UserBatch.from_interactions(log, [1], history_length=3)
    np.testing.assert_array_equal(full.take([1]).recent_items, alone.recent_items)


def test_catalog_alignment_and_unknown_items() -> None:
    items = IdMap.from_ids(["x", "y", "z", "new"])
    catalog = ItemCatalog.from_frame(
        pl.DataFrame(
            {
                "item_id": ["z", "x", "ghost"],
                "categories": [["drama", "war"], ["comedy"], ["horror"]],
                "created_at": [30, 10, 99],
            }
        ),
        items,
    )
    assert catalog.category_names == ("comedy", "drama", "war")
    z = items.index(["z"])[0]
    assert catalog.categories[z].indices.tolist() == [1, 2]
    # ids are sorted: new, x, y, z
    assert catalog.primary_category.tolist() == [-1, 0, -1, 1]
    assert catalog.created_at.tolist() == [0, 10, 0, 30]


def test_candidates_from_scores_masks_and_pads() -> None:
    scores = np.array([[0.1, 0.9, 0.5], [np.nan, 0.2, -np.inf]], dtype=np.float32)
    out = Candidates.from_scores(scores, 4)
    assert out.item_idx.tolist() == [[1, 2, 0, -1], [1, -1, -1, -1]]
    assert out.scores[0, :3].tolist() == pytest.approx([0.9, 0.5, 0.1])
