"""Negative sampling: never a positive, right counts, popularity in proportion, hard negatives."""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from data.errors import ConfigError, DataError
from data.negatives import (
    NO_ITEM,
    NegativeSamplerConfig,
    Strategy,
    hard_negatives,
    sample_negatives,
)


def pair_set(users: npt.ArrayLike, items: npt.ArrayLike) -> set[tuple[int, int]]:
    return set(zip(np.asarray(users).tolist(), np.asarray(items).tolist(), strict=True))


@st.composite
def positives(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    """Random positive pairs over a few users and items; some users hold most of the items."""
    n_items = draw(st.integers(2, 12))
    pairs = draw(
        st.lists(st.tuples(st.integers(0, 5), st.integers(0, n_items - 1)), min_size=1, max_size=60)
    )
    # Leave every user at least one item that is not theirs, so a negative exists.
    pairs = [(u, i) for u, i in pairs if i != (u % n_items)]
    pairs = pairs or [(0, 1)]
    users, items = (np.array(column, dtype=np.int32) for column in zip(*pairs, strict=True))
    return users, items, n_items


@settings(max_examples=80, deadline=None)
@given(
    data=positives(),
    ratio=st.integers(0, 6),
    strategy=st.sampled_from(["uniform", "popularity"]),
    seed=st.integers(0, 2**16),
)
def test_negatives_are_never_positives_and_counts_are_right(
    data: tuple[np.ndarray, np.ndarray, int], ratio: int, strategy: Strategy, seed: int
) -> None:
    users, items, n_items = data
    # Popularity sampling over all items (+1: items without positives can be drawn too).
    counts = np.bincount(items, minlength=n_items) + 1
    neg_users, neg_items = sample_negatives(
        users,
        items,
        n_items,
        ratio,
        strategy=strategy,
        item_counts=counts,
        rng=seed,
    )
    assert neg_users.dtype == neg_items.dtype == np.int32
    assert np.array_equal(neg_users, np.repeat(users, ratio))
    assert ((neg_items >= 0) & (neg_items < n_items)).all()
    assert not pair_set(neg_users, neg_items) & pair_set(users, items)


def test_same_seed_same_negatives() -> None:
    users, items = np.array([0, 0, 1, 2]), np.array([0, 1, 2, 3])
    first = sample_negatives(users, items, 50, 4, rng=11)
    second = sample_negatives(users, items, 50, 4, rng=np.random.default_rng(11))
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    other = sample_negatives(users, items, 50, 4, rng=12)
    assert not np.array_equal(first[1], other[1])


def test_excluded_pairs_are_never_drawn() -> None:
    users, items = np.zeros(1, dtype=np.int32), np.zeros(1, dtype=np.int32)
    exclude = (np.zeros(3, dtype=np.int32), np.array([1, 2, 3]))
    _, neg_items = sample_negatives(users, items, 5, 500, exclude=exclude, rng=0)
    assert set(neg_items.tolist()) == {4}


def test_uniform_negatives_are_uniform_over_the_non_positives() -> None:
    n = 80_000
    _, neg_items = sample_negatives([0, 0], [0, 1], 10, n // 2, rng=0)
    frequency = np.bincount(neg_items, minlength=10) / n
    assert frequency[:2].sum() == 0
    # 8 allowed items at 1/8 each; the standard error is about 0.0012.
    assert np.allclose(frequency[2:], 1 / 8, atol=0.006)


@pytest.mark.parametrize("exponent", [1.0, 0.75])
def test_popularity_negatives_follow_count_to_the_exponent(exponent: float) -> None:
    counts = np.array([0, 1, 10, 100, 1000, 50])
    n = 200_000
    # One positive (user 0, item 5): item 5 is excluded, item 0 has a zero count.
    _, neg_items = sample_negatives(
        [0],
        [5],
        6,
        n,
        strategy="popularity",
        popularity_exponent=exponent,
        item_counts=counts,
        rng=1,
    )
    expected = np.where(counts > 0, counts.astype(float) ** exponent, 0.0)
    expected[5] = 0.0
    expected /= expected.sum()
    frequency = np.bincount(neg_items, minlength=6) / n
    assert frequency[0] == 0 and frequency[5] == 0
    # Within five standard errors of the expected share, for every item.
    tolerance = 5 * np.sqrt(expected * (1 - expected) / n) + 1e-9
    assert (np.abs(frequency - expected) <= tolerance).all()


def test_popularity_counts_default_to_the_positives() -> None:
    # Item 1 is positive twice, item 2 once; user 3 holds neither, so sees them 2:1.
    users, items = np.array([0, 1, 2, 3]), np.array([1, 1, 2, 0])
    neg_users, neg_items = sample_negatives(
        users, items, 4, 30_000, strategy="popularity", popularity_exponent=1.0, rng=0
    )
    mine = neg_items[neg_users == 3]
    assert set(mine.tolist()) == {1, 2}  # items 3 (never positive) and 0 (own) never drawn
    assert np.mean(mine == 1) == pytest.approx(2 / 3, abs=0.02)


def test_a_user_holding_every_item_is_named() -> None:
    users, items = np.array([0, 0, 0, 1]), np.array([0, 1, 2, 0])
    with pytest.raises(DataError, match=r"no negative exists for 1 user.*\[0\]"):
        sample_negatives(users, items, 3, 2, rng=0)


def test_popularity_counts_only_drawable_items_when_checking_saturation() -> None:
    # User 0 holds items 0 and 1, the only ones with a nonzero count: nothing can be drawn.
    with pytest.raises(DataError, match="no negative exists"):
        sample_negatives(
            [0, 0], [0, 1], 4, 1, strategy="popularity", item_counts=[3, 1, 0, 0], rng=0
        )


def test_nearly_saturated_users_are_sampled_exactly() -> None:
    # 999 of 1000 items are positives: rejection would take ~1000 draws per negative, so after
    # zero redraws the exact fallback picks the single free item.
    n_items = 1000
    users = np.zeros(n_items - 1, dtype=np.int32)
    items = np.delete(np.arange(n_items), 637)
    neg_users, neg_items = sample_negatives(users, items, n_items, 3, rng=0, max_rejection_rounds=0)
    assert neg_users.size == 3 * (n_items - 1)
    assert set(neg_items.tolist()) == {637}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"item_idx": [0, 5]}, DataError, "item_idx"),
        ({"item_idx": [0]}, DataError, "2 entries"),
        ({"user_idx": [-1, 0]}, DataError, "user_idx"),
        ({"item_idx": [0.0, 1.0]}, DataError, "integers"),
        ({"ratio": -1}, ConfigError, "ratio"),
        ({"strategy": "hard"}, ConfigError, "strategy"),
        ({"strategy": "popularity", "item_counts": [1, 2]}, DataError, "item_counts"),
        ({"n_items": 0}, DataError, "n_items"),
    ],
)
def test_bad_arguments_are_reported(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    arguments: dict[str, object] = {
        "user_idx": [0, 1],
        "item_idx": [0, 1],
        "n_items": 5,
        "ratio": 2,
    }
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        sample_negatives(rng=0, **arguments)  # type: ignore[arg-type]


def test_negative_sampler_config_defaults() -> None:
    config = NegativeSamplerConfig()
    assert (config.ratio, config.strategy, config.popularity_exponent) == (4, "uniform", 0.75)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ratio = 10  # type: ignore[misc]
    with pytest.raises(ConfigError, match="popularity_exponent"):
        NegativeSamplerConfig(popularity_exponent=-1.0)


# ------------------------------------------------------------------------------ hard negatives
SCORES = np.array(
    [
        [0.9, 0.1, 0.8, 0.7, 0.3],  # user 0 likes 0 > 2 > 3 > 4 > 1
        [0.2, 0.6, 0.5, 0.4, 0.9],  # user 1 likes 4 > 1 > 2 > 3 > 0
        [0.5, 0.5, 0.5, 0.1, 0.5],  # user 2: ties
    ]
)
POSITIVES = sp.csr_matrix(
    (np.ones(4), ([0, 0, 1, 2], [0, 3, 4, 3])), shape=(3, 5)
)  # user 0: {0, 3}; user 1: {4}; user 2: {3}


def table_scorer(batch: np.ndarray) -> np.ndarray:
    return SCORES[batch]


def test_hard_negatives_known_answer() -> None:
    top = hard_negatives(table_scorer, [0, 1, 2], POSITIVES, 2)
    assert top.dtype == np.int32
    # Positives skipped; ties (user 2) go to the lower item index.
    assert top.tolist() == [[2, 4], [1, 2], [0, 1]]


def test_hard_negatives_respect_exclude_and_pad_short_rows() -> None:
    exclude = sp.csr_matrix((np.ones(2), ([0, 0], [2, 4])), shape=(3, 5))
    top = hard_negatives(table_scorer, [0], POSITIVES, 3, exclude=exclude)
    assert top.tolist() == [[1, NO_ITEM, NO_ITEM]]  # only item 1 is neither positive nor excluded


def test_hard_negatives_are_the_same_in_any_batch() -> None:
    users = np.array([2, 0, 1, 0])
    whole = hard_negatives(table_scorer, users, POSITIVES, 3)
    one_by_one = hard_negatives(table_scorer, users, POSITIVES, 3, batch_size=1)
    assert np.array_equal(whole, one_by_one)
    assert np.array_equal(hard_negatives(table_scorer, [1], POSITIVES, 3)[0], whole[2])


def test_hard_negatives_keep_minus_infinity_scores_before_padding() -> None:
    def scorer(batch: np.ndarray) -> np.ndarray:
        return np.tile([-np.inf, 1.0, -np.inf], (batch.size, 1))

    positives = sp.csr_matrix((np.ones(1), ([0], [1])), shape=(1, 3))
    assert hard_negatives(scorer, [0], positives, 3).tolist() == [[0, 2, NO_ITEM]]


def test_hard_negatives_do_not_modify_the_scores() -> None:
    scores = SCORES.copy()
    hard_negatives(lambda batch: scores[batch], [0, 1, 2], POSITIVES, 2)
    assert np.array_equal(scores, SCORES)


def test_hard_negatives_check_the_scorer_output() -> None:
    with pytest.raises(DataError, match=r"shape \(2, 4\)"):
        hard_negatives(lambda batch: SCORES[batch, :4], [0, 1], POSITIVES, 2)
    with pytest.raises(DataError, match="NaN"):
        hard_negatives(lambda batch: np.full((batch.size, 5), np.nan), [0], POSITIVES, 2)
    with pytest.raises(DataError, match="user_idx"):
        hard_negatives(table_scorer, [3], POSITIVES, 2)
    with pytest.raises(ConfigError, match="n_per_user"):
        hard_negatives(table_scorer, [0], POSITIVES, -1)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 6), st.integers(1, 9)),
    n_per_user=st.integers(1, 10),
    seed=st.integers(0, 2**16),
)
def test_hard_negatives_match_a_full_sort(
    shape: tuple[int, int], n_per_user: int, seed: int
) -> None:
    n_users, n_items = shape
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, size=shape).astype(np.float32)  # few values: many ties
    positives = sp.csr_matrix(rng.random(shape) < 0.3)
    top = hard_negatives(lambda batch: scores[batch], np.arange(n_users), positives, n_per_user)
    dense = positives.toarray()
    for user in range(n_users):
        # Reference: every non-positive item, by score descending, then item index ascending.
        allowed = [item for item in range(n_items) if not dense[user, item]]
        expected = sorted(allowed, key=lambda item: (-scores[user, item], item))[:n_per_user]
        expected += [NO_ITEM] * (n_per_user - len(expected))
        assert top[user].tolist() == expected
