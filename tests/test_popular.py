"""PopularSource: hand-computed decayed scores, online observe() == refit, the shared top-k."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from data.errors import ConfigError, DataError
from data.idmap import IdMap
from data.interactions import Interactions
from retrieval.base import PAD_ITEM, Candidates, UserBatch
from retrieval.popular import SECONDS_PER_DAY, PopularConfig, PopularSource
from retrieval.topk import ranked_topk
from tests.retrieval_contract import CandidateSourceContract

T_END = 1_800_000_000
DAY = SECONDS_PER_DAY


def make_log(rows: list[tuple[str, int, int, float]], n_items: int = 4) -> Interactions:
    """A log over items i0..i{n_items-1} from (user, item, timestamp, weight) rows."""
    frame = pl.DataFrame(
        [(user, f"i{item}", ts, w) for user, item, ts, w in rows],
        schema={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64,
                "weight": pl.Float32},
        orient="row",
    )  # fmt: skip
    return Interactions.from_frame(frame, items=IdMap.from_ids([f"i{i}" for i in range(n_items)]))


# A one-day half-life over four items, with scores worked out by hand:
#   i0: weight 1 two days old            -> 1 * 1/4             = 0.25
#   i1: two clicks one day old           -> 2 * 1/2             = 1.00
#   i2: weight 0.75 at the end           -> 0.75                = 0.75
#   i3: weight 4 three days old          -> 4 * 1/8             = 0.50
# Undecayed (plain popularity) the order flips: i3 (4), i1 (2), i0 (1), i2 (0.75).
HAND_LOG = [
    ("a", 0, T_END - 2 * DAY, 1.0),
    ("b", 1, T_END - DAY, 1.0),
    ("c", 1, T_END - DAY, 1.0),
    ("a", 2, T_END, 0.75),
    ("b", 3, T_END - 3 * DAY, 4.0),
]


def empty_batch(n: int) -> UserBatch:
    return UserBatch(
        np.full(n, -1, np.int32),
        np.full((n, 2), PAD_ITEM, np.int32),
        np.zeros((n, 2), np.int64),
        np.full(n, T_END, np.int64),
    )


class TestPopularContract(CandidateSourceContract):
    def make_source(self) -> PopularSource:
        return PopularSource(PopularConfig(half_life_days=7.0))


def test_decayed_scores_match_hand_computation() -> None:
    source = PopularSource(PopularConfig(half_life_days=1.0)).fit(make_log(HAND_LOG))
    np.testing.assert_allclose(source.scores_, [0.25, 1.0, 0.75, 0.5], rtol=1e-12)
    assert source.t_ref_ == T_END
    out = source.retrieve(empty_batch(2), 5)
    np.testing.assert_array_equal(out.item_idx, [[1, 2, 3, 0, PAD_ITEM]] * 2)
    np.testing.assert_allclose(out.scores[0, :4], [1.0, 0.75, 0.5, 0.25])
    assert out.scores[0, 4] == -np.inf


def test_infinite_half_life_is_plain_popularity() -> None:
    source = PopularSource(PopularConfig(half_life_days=math.inf)).fit(make_log(HAND_LOG))
    np.testing.assert_allclose(source.scores_, [1.0, 2.0, 0.75, 4.0])
    np.testing.assert_array_equal(source.retrieve(empty_batch(1), 4).item_idx, [[3, 1, 0, 2]])


def test_exclusions_are_per_row_and_the_rest_moves_up() -> None:
    source = PopularSource(PopularConfig(half_life_days=1.0)).fit(make_log(HAND_LOG))
    exclude = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], np.float32))
    out = source.retrieve(empty_batch(3), 3, exclude=exclude)
    np.testing.assert_array_equal(out.item_idx, [[2, 3, 0], [1, 2, 3], [PAD_ITEM] * 3])


def test_items_without_events_are_not_candidates() -> None:
    source = PopularSource().fit(make_log(HAND_LOG, n_items=6))
    out = source.retrieve(empty_batch(1), 6)
    assert set(out.item_idx[0].tolist()) == {0, 1, 2, 3, PAD_ITEM}


def random_log(seed: int, n: int = 400, n_items: int = 12) -> Interactions:
    rng = np.random.default_rng(seed)
    rows = [
        (f"u{u}", int(i), int(t), float(w))
        for u, i, t, w in zip(
            rng.integers(0, 20, n),
            rng.integers(0, n_items, n),
            T_END + rng.integers(0, 30 * DAY, n),
            rng.choice([0.5, 1.0, 3.0], n),
            strict=True,
        )
    ]
    return make_log(rows, n_items)


@pytest.mark.parametrize("half_life_days", [0.5, 3.0, math.inf])
def test_observe_equals_refit_on_the_extended_log(half_life_days: float) -> None:
    log = random_log(seed=1)
    cut = T_END + 20 * DAY
    train, late = log.before(cut), slice(int(np.searchsorted(log.timestamp, cut)), None)
    config = PopularConfig(half_life_days=half_life_days)
    online = PopularSource(config).fit(train)
    # Fold the new events in two chunks, the second one out of time order.
    new_items, new_times, new_weights = (
        log.item_idx[late],
        log.timestamp[late],
        log.weight[late],
    )
    half = new_items.size // 2
    online.observe(new_items[half:], new_times[half:], new_weights[half:])
    online.observe(new_items[:half], new_times[:half], new_weights[:half])
    refit = PopularSource(config).fit(log)
    assert online.t_ref_ == refit.t_ref_
    np.testing.assert_allclose(online.scores_, refit.scores_, rtol=1e-5)
    batch = empty_batch(1)
    np.testing.assert_array_equal(
        online.retrieve(batch, 8).item_idx, refit.retrieve(batch, 8).item_idx
    )


def test_observe_grows_the_catalogue_for_new_items(tmp_path: Path) -> None:
    source = PopularSource(PopularConfig(half_life_days=1.0)).fit(make_log(HAND_LOG))
    source.observe([5], [T_END + DAY], [10.0])
    assert source.scores_.shape == (6,)
    # Everything older halves once more; the new item leads.
    np.testing.assert_allclose(source.scores_, [0.125, 0.5, 0.375, 0.25, 0.0, 10.0])
    assert source.retrieve(empty_batch(1), 1).item_idx[0, 0] == 5
    source.save(tmp_path / "popular")
    loaded = PopularSource.load(tmp_path / "popular")
    np.testing.assert_array_equal(loaded.scores_, source.scores_)
    assert (loaded.t_ref_, loaded.config, loaded.name) == (source.t_ref_, source.config, "popular")


def test_observe_rejects_bad_input() -> None:
    source = PopularSource().fit(make_log(HAND_LOG))
    with pytest.raises(DataError, match="equal 1-d shapes"):
        source.observe([0, 1], [T_END])
    with pytest.raises(DataError, match="non-negative"):
        source.observe([-1], [T_END])


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan])
def test_config_rejects_non_positive_half_life(value: float) -> None:
    with pytest.raises(ConfigError, match="half_life_days"):
        PopularConfig(half_life_days=value)


def test_negative_k_is_rejected() -> None:
    source = PopularSource().fit(make_log(HAND_LOG))
    with pytest.raises(DataError, match="k must be"):
        source.retrieve(empty_batch(1), -1)


@settings(max_examples=150, deadline=None)
@given(
    n_items=st.integers(1, 15),
    n_rows=st.integers(1, 5),
    k=st.integers(0, 18),
    density=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**16),
)
def test_ranked_topk_equals_brute_force(
    n_items: int, n_rows: int, k: int, density: float, seed: int
) -> None:
    """One global ranking minus exclusions == the dense top-k of the broadcast scores.

    Dense exclusions send rows past the first look (``k`` beyond ``k``) to the wider one.
    """
    rng = np.random.default_rng(seed)
    scores = rng.permutation(n_items).astype(np.float64) + 1.0  # distinct: no tie ambiguity
    exclude = sp.csr_matrix(rng.random((n_rows, n_items)) < density, dtype=np.float32)
    order = np.argsort(-scores, kind="stable").astype(np.int32)
    fast = ranked_topk(order, scores[order], n_rows, k, exclude)
    brute = Candidates.from_scores(np.tile(scores, (n_rows, 1)), k, exclude=exclude)
    np.testing.assert_array_equal(fast.item_idx, brute.item_idx)
    np.testing.assert_array_equal(fast.scores, brute.scores)


@given(
    batches=st.lists(
        st.lists(
            st.tuples(
                st.integers(0, 14), st.integers(0, 3 * DAY), st.sampled_from([0.0, 1.0, 2.0])
            ),
            min_size=1,
            max_size=12,
        ),
        min_size=1,
        max_size=5,
    )
)
@settings(max_examples=60, deadline=None)
def test_observe_keeps_the_ranking_of_a_fresh_sort(
    batches: list[list[tuple[int, int, float]]],
) -> None:
    """The ranking observe() maintains without sorting equals argsort of the new scores (ties
    to the lower item), whatever the batches, their order in time and zero weights; with a
    half-life of 1 h, 3 days of events also cross the re-anchoring threshold."""
    source = PopularSource(PopularConfig(half_life_days=1 / 24)).fit(make_log(HAND_LOG))
    source.retrieve(empty_batch(1), 1)  # the ranking exists before the first observe
    for batch in batches:
        items, offsets, weights = (np.array(column) for column in zip(*batch, strict=True))
        source.observe(items, T_END + offsets, weights)
    scores = source.scores_
    expected = np.argsort(-scores, kind="stable")
    expected = expected[scores[expected] > 0]
    got = source.retrieve(empty_batch(1), expected.size)
    np.testing.assert_array_equal(got.item_idx[0], expected)
    # float32 scores: relative precision down to its smallest normal number.
    tiny = float(np.finfo(np.float32).tiny)
    np.testing.assert_allclose(got.scores[0], scores[expected], rtol=1e-6, atol=tiny)
