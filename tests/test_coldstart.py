"""ColdStartSource: hand-computed fallback mix, category popularity for unknown visitors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from data.catalog import ItemCatalog
from data.errors import ConfigError, DataError
from data.idmap import IdMap
from data.interactions import Interactions
from retrieval.base import PAD_ITEM, UserBatch
from retrieval.coldstart import ColdStartConfig, ColdStartSource
from retrieval.popular import PopularConfig, PopularSource
from tests.retrieval_contract import (
    N_CATEGORIES,
    N_ITEMS,
    CandidateSourceContract,
    clustered_log,
)

DAY = 86_400
T_END = 1_800_000_000
ITEMS = IdMap.from_ids([f"i{i}" for i in range(4)])


def make_log(rows: list[tuple[str, int, int, float]]) -> Interactions:
    frame = pl.DataFrame(
        [(user, f"i{item}", ts, w) for user, item, ts, w in rows],
        schema={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64,
                "weight": pl.Float32},
        orient="row",
    )  # fmt: skip
    return Interactions.from_frame(frame, items=ITEMS)


# One-day trending half-life, ten-day fresh window, fresh_weight 0.5:
#   pop   = [4, 2, 1, 1]                 -> 0.5 * pop / 4            = [.5, .25, .125, .125]
#   fresh = i2 (2 days old), i3 (5 days old); i0 is 100 days old, i1's release is unknown
#   trend of fresh items: i2 clicked at the end -> 1, i3 a day before -> 1/2
#                                        -> 0.5 * [0, 0, 1, .5]     = [0, 0, .5, .25]
#   fallback = [.5, .25, .625, .375]: order i2, i0, i3, i1
HAND_LOG = (
    [("a", 0, T_END - 50 * DAY, 1.0)] * 4
    + [("b", 1, T_END - 20 * DAY, 1.0)] * 2
    + [("c", 2, T_END, 1.0), ("d", 3, T_END - DAY, 1.0)]
)
HAND_CATALOG = pl.DataFrame(
    {
        "item_id": ["i0", "i1", "i2", "i3"],
        "categories": [["x"], ["y"], ["x"], ["y"]],
        "created_at": [T_END - 100 * DAY, 0, T_END - 2 * DAY, T_END - 5 * DAY],
    }
)
HAND = ColdStartConfig(half_life_days=1.0, fresh_window_days=10.0, fresh_weight=0.5)


def visitors(histories: list[list[int]], user: int = -1) -> UserBatch:
    n = len(histories)
    recent = np.full((n, 4), PAD_ITEM, np.int32)
    for row, items in enumerate(histories):
        recent[row, : len(items)] = items
    return UserBatch(
        np.full(n, user, np.int32),
        recent,
        np.where(recent >= 0, T_END, 0).astype(np.int64),
        np.full(n, T_END, np.int64),
    )


class TestColdStartContract(CandidateSourceContract):
    def make_source(self) -> ColdStartSource:
        return ColdStartSource(ColdStartConfig())


def test_fallback_mixes_popularity_and_fresh_trending() -> None:
    source = ColdStartSource(HAND).fit(
        make_log(HAND_LOG), ItemCatalog.from_frame(HAND_CATALOG, ITEMS)
    )
    np.testing.assert_allclose(source.fallback_, [0.5, 0.25, 0.625, 0.375])
    out = source.retrieve(visitors([[]]), 4)
    np.testing.assert_array_equal(out.item_idx, [[2, 0, 3, 1]])
    np.testing.assert_allclose(out.scores[0], [0.625, 0.5, 0.375, 0.25])


def test_unknown_visitor_gets_their_category_first() -> None:
    source = ColdStartSource(HAND).fit(
        make_log(HAND_LOG), ItemCatalog.from_frame(HAND_CATALOG, ITEMS)
    )
    # Recent item i3 (category y): y items i3, i1 lead (by fallback), then x items.
    out = source.retrieve(visitors([[3]]), 4)
    np.testing.assert_array_equal(out.item_idx, [[3, 1, 2, 0]])
    np.testing.assert_allclose(out.scores[0], [2.375, 2.25, 0.625, 0.5])


def test_category_popularity_on_the_clustered_log() -> None:
    log, catalog = clustered_log()
    source = ColdStartSource().fit(log, catalog)
    for home in range(N_CATEGORIES):
        user = visitors([[home, home + 3]])
        out = source.retrieve(user, N_ITEMS, exclude=user.history_matrix(N_ITEMS))
        per_category = N_ITEMS // N_CATEGORIES
        # The 8 unseen items of the visitor's category first, then everything else.
        row = out.item_idx[0]
        assert (row[: per_category - 2] % N_CATEGORIES == home).all()
        rest = row[per_category - 2 :]
        assert (rest[rest != PAD_ITEM] % N_CATEGORIES != home).all()


def test_mixed_history_covers_both_categories() -> None:
    log, catalog = clustered_log()
    source = ColdStartSource().fit(log, catalog)
    out = source.retrieve(visitors([[0, 1]]), 20)
    assert set((out.item_idx[0] % N_CATEGORIES).tolist()) == {0, 1}


def test_known_users_and_empty_histories_get_the_fallback_list() -> None:
    log, catalog = clustered_log()
    source = ColdStartSource().fit(log, catalog)
    fallback = source.retrieve(visitors([[]]), 10)
    known = source.retrieve(visitors([[1, 4]], user=0), 10)
    np.testing.assert_array_equal(known.item_idx, fallback.item_idx)
    np.testing.assert_array_equal(known.scores, fallback.scores)


def test_without_a_catalogue_it_is_plain_popularity() -> None:
    log, _ = clustered_log()
    source = ColdStartSource().fit(log, None)
    popular = PopularSource(PopularConfig(half_life_days=float("inf"))).fit(log)
    users = visitors([[], [1, 4]])
    np.testing.assert_array_equal(
        source.retrieve(users, 12).item_idx, popular.retrieve(users, 12).item_idx
    )


def test_category_path_survives_save_and_load(tmp_path: Path) -> None:
    log, catalog = clustered_log()
    source = ColdStartSource().fit(log, catalog)
    source.save(tmp_path / "coldstart")
    loaded = ColdStartSource.load(tmp_path / "coldstart")
    users = visitors([[2, 5], [], [0]])
    before, after = source.retrieve(users, 10), loaded.retrieve(users, 10)
    np.testing.assert_array_equal(before.item_idx, after.item_idx)
    np.testing.assert_allclose(before.scores, after.scores)


def test_catalogue_of_another_size_is_rejected() -> None:
    log, _ = clustered_log()
    with pytest.raises(DataError, match="catalog has 4 items"):
        ColdStartSource().fit(log, ItemCatalog.from_frame(HAND_CATALOG, ITEMS))


@pytest.mark.parametrize(
    ("field", "value"),
    [("half_life_days", 0.0), ("fresh_window_days", -1.0), ("fresh_weight", 1.5),
     ("category_boost", -1.0), ("score_block_elements", 0)],
)  # fmt: skip
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        ColdStartConfig(**{field: value})  # type: ignore[arg-type]
