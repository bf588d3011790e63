"""ItemItemSource: EASE and cosine item-kNN, checked against their formulas and the contract."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from data.errors import ConfigError
from retrieval.base import PAD_ITEM, UserBatch
from retrieval.item_item import (
    DEFAULT_L2,
    ItemItemConfig,
    ItemItemSource,
    binary_matrix,
    cosine_neighbors,
    ease_weights,
)
from retrieval.topk import prune_rows
from tests.retrieval_contract import CandidateSourceContract, clustered_log

# Users x items, binary: two taste groups {0, 1, 2} and {3, 4}, item 2 shared with user 3.
X = np.array(
    [
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1],
    ],
    dtype=np.float32,
)


class TestEaseContract(CandidateSourceContract):
    def make_source(self) -> ItemItemSource:
        return ItemItemSource(ItemItemConfig(method="ease", l2=5.0))


class TestCosineContract(CandidateSourceContract):
    def make_source(self) -> ItemItemSource:
        return ItemItemSource(ItemItemConfig(method="cosine", neighbors=10))


def test_ease_weights_match_the_closed_form() -> None:
    l2 = 2.0
    gram = X.T.astype(np.float64) @ X + l2 * np.eye(5)
    precision = np.linalg.inv(gram)
    expected = -precision / np.diag(precision)  # column j divided by P_jj
    np.fill_diagonal(expected, 0.0)

    got = ease_weights(sp.csr_matrix(X), l2)

    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.diag(got) == 0)


def test_cosine_neighbors_match_hand_computed_similarities() -> None:
    norms = np.sqrt(X.sum(axis=0))
    expected = (X.T @ X) / (np.outer(norms, norms) + 1.0)
    np.fill_diagonal(expected, 0.0)

    got = cosine_neighbors(sp.csr_matrix(X), neighbors=5, shrinkage=1.0, block_items=2)

    np.testing.assert_allclose(got.toarray(), expected, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.floats(0.1, 10.0), min_size=6, max_size=6), min_size=1, max_size=6),
    st.integers(0, 6),
)
def test_prune_rows_keeps_each_rows_largest_entries(rows: list[list[float]], keep: int) -> None:
    matrix = np.array(rows)
    pruned = prune_rows(sp.csr_matrix(matrix), keep).toarray()
    for original, kept in zip(matrix, pruned, strict=True):
        n_kept = np.count_nonzero(kept)
        assert n_kept == (6 if keep == 0 else min(keep, 6))
        # Every kept value is at least every dropped one.
        dropped = original[kept == 0]
        if dropped.size and n_kept:
            assert kept[kept != 0].min() >= dropped.max()


def test_recommends_the_taste_group_of_the_users_history() -> None:
    log, _ = clustered_log()
    source = ItemItemSource(ItemItemConfig(method="ease", l2=2.0)).fit(log)
    # A user unknown at training whose history is two items of category 0 (items 0, 3).
    users = UserBatch(
        np.array([-1], np.int32),
        np.array([[0, 3]], np.int32),
        np.zeros((1, 2), np.int64),
        np.array([2_000], np.int64),
    )

    top = source.retrieve(users, 5).item_idx[0]

    assert PAD_ITEM not in top and not {0, 3} & set(top.tolist())
    assert all(item % 3 == 0 for item in top.tolist())  # category 0 items are i % 3 == 0


def test_score_agrees_with_retrieve_and_is_nan_where_undefined() -> None:
    log, _ = clustered_log()
    source = ItemItemSource(ItemItemConfig(method="ease", l2=2.0)).fit(log)
    users = UserBatch.from_interactions(log, np.array([0, 1], np.int32), history_length=8, now=9e9)
    found = source.retrieve(users, 4)

    scores = source.score(users, np.concatenate([found.item_idx, [[PAD_ITEM], [PAD_ITEM]]], 1))

    np.testing.assert_allclose(scores[:, :4], found.scores, rtol=1e-5)
    assert np.isnan(scores[:, 4]).all()


def test_auto_picks_ease_for_small_catalogues_and_cosine_beyond() -> None:
    log, _ = clustered_log()
    small = ItemItemSource(ItemItemConfig(max_dense_items=log.n_items)).fit(log)
    large = ItemItemSource(ItemItemConfig(max_dense_items=log.n_items - 1)).fit(log)

    assert small.method_ == "ease" and large.method_ == "cosine"


def test_l2_is_the_grid_value_with_the_best_validation_ndcg() -> None:
    log, _ = clustered_log()
    # The model learns from the first 70% of the log; the window's new items are the rest.
    history = log.before(int(np.quantile(log.timestamp, 0.7)))
    config = ItemItemConfig(method="ease", l2_grid=(0.5, 5.0, 500.0))

    source = ItemItemSource(config).fit(history, valid=log)

    assert set(source.validation_) == {0.5, 5.0, 500.0}
    assert source.validation_[source.l2_] == max(source.validation_.values())
    assert all(0.0 <= v <= 1.0 for v in source.validation_.values())


def test_refit_learns_the_longer_log_with_the_l2_chosen_on_validation() -> None:
    log, _ = clustered_log()
    history = log.before(int(np.quantile(log.timestamp, 0.7)))
    config = ItemItemConfig(method="ease", l2_grid=(0.5, 5.0, 500.0))
    validated = ItemItemSource(config).fit(history, valid=log)

    refitted = validated.refit(log)

    assert refitted.l2_ == validated.l2_ and refitted.validation_ == validated.validation_
    assert refitted.trained_.nnz == binary_matrix(log.matrix).nnz > validated.trained_.nnz
    direct = ItemItemSource(ItemItemConfig(method="ease", l2=validated.l2_)).fit(log)
    np.testing.assert_array_equal(refitted.dense_, direct.dense_)


def test_l2_without_a_validation_window_is_the_default_or_the_configured_value() -> None:
    log, _ = clustered_log()

    assert ItemItemSource(ItemItemConfig(method="ease")).fit(log).l2_ == DEFAULT_L2
    fixed = ItemItemSource(ItemItemConfig(method="ease", l2=7.0)).fit(log, valid=log)
    assert fixed.l2_ == 7.0 and fixed.validation_ == {}


@pytest.mark.parametrize(
    "values",
    [{"method": "svd"}, {"l2": 0.0}, {"neighbors": -1}, {"max_dense_items": True}, {"l2_grid": ()}],
)
def test_bad_config_is_refused(values: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ItemItemConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["ease", "cosine"])
def test_neighbors_are_the_largest_weights_of_the_items_row(method: str) -> None:
    log, _ = clustered_log()
    source = ItemItemSource(ItemItemConfig(method=method, l2=2.0, neighbors=10)).fit(log)
    weights = source.dense_ if source.dense_ is not None else source.sparse_.toarray()

    found = source.neighbors(np.array([0, 5, -1]), 3)

    for row, item in ((0, 0), (1, 5)):
        assert item not in found.item_idx[row]
        np.testing.assert_allclose(
            found.scores[row], np.sort(np.delete(weights[item], item))[::-1][:3], rtol=1e-6
        )
    assert (found.item_idx[2] == PAD_ITEM).all()
