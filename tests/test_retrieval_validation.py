"""The validation measure that fit-time choices use: hand-computed nDCG, the window's labels."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from data.idmap import IdMap
from data.interactions import Interactions
from data.schema import INTERACTION_SCHEMA
from retrieval.base import PAD_ITEM
from retrieval.validation import ndcg, validation_window


def test_ndcg_matches_a_hand_computation() -> None:
    relevant = sp.csr_matrix(np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]]))
    ranked = np.array([[2, 1, 0], [0, 1, PAD_ITEM], [0, 1, 2]])

    got = ndcg(ranked, relevant, k=3)

    user0 = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))  # hits at ranks 1 and 3 of 2 relevant
    assert got == pytest.approx((user0 + 0.0 + 0.0) / 3)


def test_the_window_labels_only_new_items_of_users_who_have_some() -> None:
    users, items = IdMap.from_ids(["a", "b", "c"]), IdMap.from_ids(["x", "y", "z"])

    def log(rows: list[tuple[str, str]]) -> Interactions:
        frame = pl.DataFrame(
            [(u, i, 0, 1.0) for u, i in rows], schema=INTERACTION_SCHEMA, orient="row"
        )
        return Interactions.from_frame(frame, users=users, items=items)

    train = log([("a", "x"), ("b", "y"), ("c", "z")])
    valid = log([("a", "y"), ("a", "x"), ("b", "y")])  # b only re-engages: not a label

    window = validation_window(train, valid)

    assert window is not None
    assert window.user_idx.tolist() == [0]
    assert window.relevant.toarray().tolist() == [[0, 1, 0]]
    assert window.seen.toarray().tolist() == [[1, 0, 0]]
    assert validation_window(train, log([("b", "y")])) is None


def test_sources_that_need_more_data_or_event_times_are_left_out() -> None:
    from retrieval.covisit import CoVisitationConfig
    from retrieval.stage import skip_reason
    from retrieval.two_tower.config import TwoTowerConfig

    users, items = IdMap.from_ids(["a", "b"]), IdMap.from_ids(["x", "y"])

    def log(times: list[int]) -> Interactions:
        rows = [("a", "x", times[0], 1.0), ("b", "y", times[1], 1.0)]
        frame = pl.DataFrame(rows, schema=INTERACTION_SCHEMA, orient="row")
        return Interactions.from_frame(frame, users=users, items=items)

    timed, untimed = log([10, 20]), log([0, 0])
    assert "min_interactions 3" in str(
        skip_reason("two_tower", TwoTowerConfig(min_interactions=3), timed)
    )
    assert skip_reason("two_tower", TwoTowerConfig(min_interactions=2), timed) is None
    assert "no event times" in str(skip_reason("covisit", CoVisitationConfig(), untimed))
    assert skip_reason("covisit", CoVisitationConfig(), timed) is None


def test_item_item_sources_stop_at_their_catalogue_size() -> None:
    from retrieval.item_item import ItemItemConfig, ItemKNNConfig
    from retrieval.stage import skip_reason

    users, items = IdMap.from_ids(["a"]), IdMap.from_ids(["x", "y", "z"])
    frame = pl.DataFrame([("a", "x", 1, 1.0)], schema=INTERACTION_SCHEMA, orient="row")
    log = Interactions.from_frame(frame, users=users, items=items)

    assert "3 items > max_items 2" in str(skip_reason("item_knn", ItemKNNConfig(max_items=2), log))
    assert skip_reason("item_item", ItemItemConfig(max_items=3), log) is None


@pytest.mark.parametrize(
    ("curve", "expected"),
    [([1, 2, 3, 4, 5], 4), ([5, 4, 3, 2, 1], 0), ([1, 3, 2], 1), ([2, 2, 2, 2], 1), ([7], 0)],
)
def test_hill_climb_finds_the_peak_of_a_unimodal_curve(curve: list[int], expected: int) -> None:
    from retrieval.validation import hill_climb

    asked: list[int] = []

    def score(i: int) -> float:
        asked.append(i)
        return float(curve[i])

    assert hill_climb(len(curve), score) == expected
    assert set(asked) <= set(range(len(curve)))
