"""Online user state: histories follow feedback, newest first, capped, thread-safe."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from data.idmap import IdMap
from pipeline.online_state import OnlineState
from retrieval.base import PAD_ITEM, UserBatch

# (user, item, time) events over four users and ten items, for the property tests.
EVENTS = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 9), st.integers(0, 50)),
    max_size=40,
)


def state(h: int = 3) -> OnlineState:
    return OnlineState(IdMap.from_ids(["a", "b"]), n_items=10, history_length=h)


def test_newest_first_capped_and_unknown_users() -> None:
    s = state()
    s.observe(["a", "a", "c"], [1, 2, 5], [10, 30, 20])
    s.observe(["a", "a"], [3, 4], [25, 40])
    batch = s.batch(["a", "c", "zz"], now=50)
    assert batch.recent_items[0].tolist() == [4, 2, 3]  # times 40, 30, 25 (10 dropped)
    assert batch.recent_times[0].tolist() == [40, 30, 25]
    assert batch.recent_items[1].tolist() == [5, PAD_ITEM, PAD_ITEM]
    assert (batch.recent_items[2] == PAD_ITEM).all()
    # model index: a is known to the bundle, c (new user) and zz are not
    assert batch.user_idx.tolist() == [0, -1, -1]
    assert batch.now.tolist() == [50, 50, 50]


@settings(max_examples=100, deadline=None)
@given(
    events=EVENTS,
    split=st.integers(0, 40),
    h=st.integers(1, 5),
)
def test_incremental_equals_all_at_once(
    events: list[tuple[str, int, int]], split: int, h: int
) -> None:
    """Observing in two chunks gives the same state as observing everything at once."""
    once, twice = state(h), state(h)
    users = [e[0] for e in events]
    items = [e[1] for e in events]
    times = [e[2] for e in events]
    once.observe(users, items, times)
    twice.observe(users[:split], items[:split], times[:split])
    twice.observe(users[split:], items[split:], times[split:])
    ids = ["a", "b", "c", "d"]
    a, b = once.batch(ids, 0), twice.batch(ids, 0)
    np.testing.assert_array_equal(a.recent_times, b.recent_times)
    # the latest events per user, newest first (item order among equal times may differ)
    for row, user in enumerate(ids):
        mine = sorted((t for u, _, t in events if u == user), reverse=True)[:h]
        assert a.recent_times[row][: len(mine)].tolist() == mine


def test_seeded_from_a_log() -> None:
    from data.interactions import Interactions

    frame = pl.DataFrame(
        {
            "user_id": ["a", "b", "a"],
            "item_id": ["x", "y", "z"],
            "timestamp": [1, 2, 3],
            "weight": [1.0] * 3,
        }
    )
    log = Interactions.from_frame(frame)
    s = OnlineState.from_log(log, log.users, history_length=4)
    batch = s.batch(["a"], 5)
    assert log.items.to_ids(batch.recent_items[0][:2]).to_list() == ["z", "x"]


def test_seen_holds_every_item_beyond_the_recent_history() -> None:
    s = state(h=2)
    s.observe(["a", "a", "a", "c"], [1, 2, 3, 7], [10, 20, 30, 5])
    s.observe(["a"], [1], [40])  # a repeat: seen once
    batch = s.batch(["a", "c", "zz"], now=50)
    assert batch.recent_items[0].tolist() == [1, 3]
    seen = batch.seen_matrix(10)
    assert seen[0].indices.tolist() == [1, 2, 3]  # item 2 left the recent history, not the seen set
    assert seen[1].indices.tolist() == [7]
    assert seen[2].nnz == 0
    assert set(seen.data.tolist()) == {1.0}


def test_seen_survives_take_and_ignores_items_beyond_the_width() -> None:
    s = state(h=1)
    s.observe(["a", "a", "b"], [8, 9, 4], [1, 2, 3])
    batch = s.batch(["a", "b"], now=5).take([1, 0])
    assert batch.seen_matrix(10)[1].indices.tolist() == [8, 9]
    assert batch.seen_matrix(9)[1].indices.tolist() == [8]  # item 9 is not in a 9-item space
    assert batch.seen_matrix(10)[0].indices.tolist() == [4]


def test_negative_item_indices_are_refused() -> None:
    with pytest.raises(ValueError, match="map or drop unknown items"):
        state().observe(["a"], [PAD_ITEM], [1])


@settings(max_examples=100, deadline=None)
@given(
    events=EVENTS,
    split=st.integers(0, 40),
)
def test_seen_is_every_observed_pair_in_any_chunking(
    events: list[tuple[str, int, int]], split: int
) -> None:
    s = state(h=1)
    for chunk in (events[:split], events[split:]):
        s.observe([e[0] for e in chunk], [e[1] for e in chunk], [e[2] for e in chunk])
    ids = ["a", "b", "c", "d"]
    seen = s.batch(ids, 0).seen_matrix(10)
    for row, user in enumerate(ids):
        assert seen[row].indices.tolist() == sorted({i for u, i, _ in events if u == user})


@settings(max_examples=100, deadline=None)
@given(
    recent=arrays(
        np.int32, st.tuples(st.integers(1, 4), st.integers(1, 5)), elements=st.integers(-1, 12)
    ),
    seen_pairs=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 12)), max_size=20),
    n_items=st.integers(1, 12),
)
def test_seen_matrix_is_the_union_of_history_and_seen_within_the_width(
    recent: np.ndarray, seen_pairs: list[tuple[int, int]], n_items: int
) -> None:
    n = recent.shape[0]
    pairs = sorted({(r, i) for r, i in seen_pairs if r < n})
    seen = sp.csr_matrix(
        ([1.0] * len(pairs), ([r for r, _ in pairs], [i for _, i in pairs])), shape=(n, 13)
    )
    batch = UserBatch(
        np.zeros(n, np.int32), recent, np.zeros(recent.shape, np.int64), np.zeros(n, np.int64), seen
    )
    matrix = batch.seen_matrix(n_items)
    assert matrix.shape == (n, n_items) and set(matrix.data.tolist()) <= {1.0}
    for row in range(n):
        expected = {int(i) for i in recent[row] if 0 <= i < n_items}
        expected |= {i for r, i in pairs if r == row and i < n_items}
        assert matrix[row].indices.tolist() == sorted(expected)
