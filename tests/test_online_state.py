"""Online user state: histories follow feedback, newest first, capped, thread-safe."""

from __future__ import annotations

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from data.idmap import IdMap
from retrieval.base import PAD_ITEM
from serving.online_state import OnlineState


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
    events=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 9), st.integers(0, 50)),
        max_size=40,
    ),
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
