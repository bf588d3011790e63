"""Bounded online state: at most ``max_users`` users beyond the seed, least recently used evicted
(or unused for ``ttl_s``), and an evicted user rebuilt exactly from the log when they return.

Known answers: a bounded state fed any events, read at any moments, answers every user exactly as
an unbounded state fed the same events does; the service, after many distinct users pushed a
user out, answers that user as a restart from the same log does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.idmap import IdMap
from pipeline.feedback_log import FeedbackEvent, FeedbackLog, FeedbackLogConfig
from pipeline.online_state import OnlineState, RestoredEvents
from pipeline.service import RecommenderService
from retrieval.base import UserBatch

USERS = ["a", "b", "c", "d", "e", "f"]
N_ITEMS = 10
# (user, item, time) events; times repeat on purpose: ties must order the same after a rebuild.
EVENTS = st.lists(
    st.tuples(st.sampled_from(USERS), st.integers(0, N_ITEMS - 1), st.integers(0, 3)),
    max_size=60,
)
# Far enough after any event of the tiny world that a request sees every history entry.
NOW = 2**40


class FakeLog:
    """The events a state observed, in order, and a restore that reads them back like the
    service's (every event of the asked users up to the newest position)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []
        self.reads = 0

    def restore(self, user_ids: list[str]) -> RestoredEvents:
        self.reads += 1
        wanted = set(user_ids)
        mine = [e for e in self.events if e[0] in wanted]
        return RestoredEvents(
            [e[0] for e in mine],
            np.array([e[1] for e in mine], dtype=np.int32),
            np.array([e[2] for e in mine], dtype=np.int64),
            watermark=len(self.events),
        )


def new_state(h: int = 3) -> OnlineState:
    return OnlineState(IdMap.from_ids(["a", "b"]), n_items=N_ITEMS, history_length=h)


def assert_same(got: UserBatch, expected: UserBatch) -> None:
    np.testing.assert_array_equal(got.recent_items, expected.recent_items)
    np.testing.assert_array_equal(got.recent_times, expected.recent_times)
    assert got.seen is not None and expected.seen is not None
    np.testing.assert_array_equal(
        got.seen_matrix(N_ITEMS).toarray(), expected.seen_matrix(N_ITEMS).toarray()
    )


@settings(max_examples=150, deadline=None)
@given(
    events=EVENTS,
    cuts=st.lists(st.integers(0, 60), max_size=6),
    max_users=st.integers(1, 3),
    h=st.integers(1, 4),
    reads=st.lists(st.lists(st.sampled_from(USERS), min_size=1, max_size=4), max_size=6),
)
def test_a_bounded_state_answers_as_an_unbounded_one(
    events: list[tuple[str, int, int]],
    cuts: list[int],
    max_users: int,
    h: int,
    reads: list[list[str]],
) -> None:
    """Chunks of events observed, some users read after each chunk: every answer equals the
    unbounded state's, and the bounded state never holds more than the cap."""
    log, bounded, reference = FakeLog(), new_state(h), new_state(h)
    bounded.bound(max_users, restore=log.restore)
    bounds = sorted({0, len(events), *(c for c in cuts if c < len(events))})
    for step, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
        chunk = events[start:end]
        log.events += chunk  # appended to the log first, then observed (as the service does)
        for state in (bounded, reference):
            state.observe([e[0] for e in chunk], [e[1] for e in chunk], [e[2] for e in chunk])
        assert len(bounded) <= max_users
        for users in reads[step : step + 1]:
            assert_same(bounded.batch(users, 0), reference.batch(users, 0))
            assert len(bounded) <= max_users
    assert_same(bounded.batch(USERS, 0), reference.batch(USERS, 0))


@settings(max_examples=100, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.integers(0, N_ITEMS - 1), st.integers(0, 2)),
        max_size=30,
    ),
    split=st.integers(0, 30),
    h=st.integers(1, 4),
)
def test_ties_in_time_keep_their_order_of_arrival_in_any_chunking(
    events: list[tuple[str, int, int]], split: int, h: int
) -> None:
    """What makes a rebuild exact: one call or two, the same histories, item for item."""
    once, twice = new_state(h), new_state(h)
    once.observe([e[0] for e in events], [e[1] for e in events], [e[2] for e in events])
    for chunk in (events[:split], events[split:]):
        twice.observe([e[0] for e in chunk], [e[1] for e in chunk], [e[2] for e in chunk])
    assert_same(twice.batch(USERS, 0), once.batch(USERS, 0))


def test_the_cap_holds_after_many_distinct_users_and_the_seed_stays() -> None:
    log, state = FakeLog(), new_state()
    state.observe(["seed-1", "seed-2"], [1, 2], [1, 2])
    state.bound(50, restore=log.restore)
    assert state.pinned_users == 2
    for start in range(0, 5_000, 100):  # batches, as a replay does
        users = [f"u{i}" for i in range(start, start + 100)]
        log.events += [(u, 3, 5) for u in users]
        state.observe(users, [3] * 100, [5] * 100)
        assert len(state) <= 2 + 50
    for i in range(5_000, 6_000):  # one event at a time, as live feedback does
        log.events.append((f"u{i}", 4, 6))
        state.observe([f"u{i}"], [4], [6])
        assert len(state) <= 2 + 50
    # The first batch filled the cap; later newcomers stay in the log until they are read.
    assert state.evictions == 50 and state.pinned_users == 2
    batch = state.batch(["seed-1", "seed-2", "u0", "u5999"], 10)
    assert batch.recent_items[:, 0].tolist() == [1, 2, 3, 4]  # the seed, and restored users
    assert len(state) <= 2 + 50


def test_feedback_alone_does_not_grow_a_state_that_has_evicted() -> None:
    log, state = FakeLog(), new_state()
    state.bound(2, restore=log.restore)
    for user in ["a", "b", "c"]:
        log.events.append((user, 1, 1))
        state.observe([user], [1], [1])
    assert state.user_ids() == ["b", "c"] and state.evictions == 1
    log.events.append(("d", 1, 2))
    state.observe(["d"], [1], [2])  # not held: stays in the log until d is read
    assert state.user_ids() == ["b", "c"] and log.reads == 0
    assert state.batch(["d"], 5).recent_items[0, 0] == 1
    assert log.reads == 1 and "d" in state.user_ids()


def test_least_recently_used_is_evicted_first_reads_included() -> None:
    log, state = FakeLog(), new_state()
    state.bound(2, restore=log.restore)
    for user in ["a", "b"]:
        log.events.append((user, 1, 1))
        state.observe([user], [1], [1])
    state.batch(["a"], 5)  # a is now more recently used than b
    log.events.append(("c", 2, 2))
    state.observe(["c"], [2], [2])
    assert state.user_ids() == ["a", "c"]


def test_users_unused_for_the_ttl_are_evicted() -> None:
    clock = [0.0]
    log, state = FakeLog(), new_state()
    state.bound(100, restore=log.restore, ttl_s=60, clock=lambda: clock[0])
    for user, at in [("a", 0.0), ("b", 30.0)]:
        clock[0] = at
        log.events.append((user, 1, 1))
        state.observe([user], [1], [1])
    clock[0] = 70.0  # a unused for 70 s, b for 40 s
    assert state.batch(["b"], 5).recent_items[0, 0] == 1
    assert state.user_ids() == ["b"] and state.evictions == 1
    assert state.batch(["a"], 5).recent_items[0, 0] == 1  # restored from the log


def test_an_append_already_in_a_restore_is_not_observed_twice() -> None:
    log, state = FakeLog(), new_state()
    state.bound(1, restore=log.restore)
    for user in ["a", "b"]:
        log.events.append((user, 1, 1))
        state.observe([user], [1], [1], seq=len(log.events))
    # a was evicted; an append for a commits (seq 3), a is read before the append is observed
    log.events.append(("a", 2, 2))
    assert state.batch(["a"], 5).recent_items[0].tolist() == [2, 1, -1]  # restored: both
    state.observe(["a"], [2], [2], seq=3)  # the live path catches up: already held
    assert state.batch(["a"], 5).recent_items[0].tolist() == [2, 1, -1]
    log.events.append(("a", 3, 3))
    state.observe(["a"], [3], [3], seq=4)  # committed after the restore: observed
    assert state.batch(["a"], 5).recent_items[0].tolist() == [3, 2, 1]


def test_a_failing_restore_answers_from_what_is_held() -> None:
    state = new_state()

    def broken(user_ids: list[str]) -> RestoredEvents:
        raise OSError("disk I/O error")

    state.bound(1, restore=broken)
    state.observe(["a", "b"], [1, 2], [1, 2])
    batch = state.batch(["a"], 5)  # a was evicted and cannot be read back: a cold answer
    assert (batch.recent_items[0] == -1).all()


def test_bound_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="max_users must be >= 1, got 0"):
        new_state().bound(0, restore=FakeLog().restore)
    with pytest.raises(ValueError, match="ttl_s must be positive"):
        new_state().bound(5, restore=FakeLog().restore, ttl_s=0)


# ------------------------------------------------------------------------------ the service
@pytest.fixture
def log(tmp_path: Path) -> Iterator[FeedbackLog]:
    with FeedbackLog(FeedbackLogConfig(path=tmp_path / "feedback.sqlite3")) as feedback:
        yield feedback


def test_the_service_rebuilds_an_evicted_user_exactly_on_return(
    tiny_bundle: tuple[Path, Path], log: FeedbackLog
) -> None:
    _, bundle = tiny_bundle
    service = RecommenderService(bundle, log, max_online_users=3, check_reloads_in_child=False)
    state = service.pipeline.state
    pinned = state.pinned_users
    items = [str(i) for i in service.pipeline.artifacts.items.ids[:6]]
    known_user = str(service.pipeline.artifacts.users.ids[0])
    # Two of the same second: their order must survive the rebuild too.
    second = int(time.time()) - 60
    service.record_feedback([log.make_event("r-1", "returning", items[0], "click", second)])
    service.record_feedback(
        [
            log.make_event("r-2", "returning", items[1], "click", second + 1),
            log.make_event("r-3", "returning", items[2], "purchase", second + 1),
            log.make_event("k-1", known_user, items[3], "click", second + 1),
        ]
    )
    for i in range(40):  # distinct newcomers push "returning" out
        service.record_feedback([log.make_event(f"n-{i}", f"new-{i}", items[i % 6], "click")])
        assert len(state) <= pinned + 3
    assert "returning" not in state.user_ids() and state.evictions > 0
    assert known_user in state.user_ids(), "the bundle's own users are never evicted"

    restarted = RecommenderService(bundle, log, max_online_users=None, check_reloads_in_child=False)
    users = ["returning", known_user, "new-0", "new-39"]
    assert_same(state.batch(users, NOW), restarted.pipeline.state.batch(users, NOW))
    assert "returning" in state.user_ids() and len(state) <= pinned + 3
    restarted.close()
    service.close()


def test_read_users_is_every_event_of_the_users_up_to_a_seq(log: FeedbackLog) -> None:
    def click(event_id: str, user: str) -> FeedbackEvent:
        return FeedbackEvent(event_id, user, "item", "click", 100, 1.0)

    log.append([click("1", "a"), click("2", "b"), click("3", "a")])
    until = log.last_seq()
    log.append([click("4", "a")])
    frame = log.read_users(["a", "zz"], until=until)
    assert frame["event_id"].to_list() == ["1", "3"] and frame["seq"].is_sorted()
    assert log.read_users(["a"])["event_id"].to_list() == ["1", "3", "4"]
    many = [f"user-{i}" for i in range(2_000)] + ["b"]  # more than one statement's parameters
    assert log.read_users(many)["event_id"].to_list() == ["2"]
    assert log.read_users([]).height == 0
    plan = log._run(
        lambda conn: conn.execute(
            "EXPLAIN QUERY PLAN SELECT seq FROM feedback WHERE user_id IN (?) AND seq <= ?",
            ("a", 5),
        ).fetchall()
    )
    assert any("feedback_by_user" in str(row) for row in plan), plan
