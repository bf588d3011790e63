"""Two services on one feedback log, in one process, on both backends: each applies what the
other logged (``catch_up``), follows the other's reloads (``follow_published``), and the
``LogFollower`` thread does both on its own.

Deterministic: the steps are called directly, except in the last test, which waits (bounded)
for the follower thread.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from pipeline.feedback_store import FeedbackStore, open_feedback_store
from pipeline.funnel import RecommendRequest
from pipeline.log_follower import FollowerConfig, LogFollower
from pipeline.service import RecommenderService
from tests.test_reload_under_load import resealed_copy

NOW = int(time.time())


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "feedback.sqlite3")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def pair(
    tiny_bundle: tuple[Path, Path], location: str
) -> Iterator[tuple[RecommenderService, RecommenderService]]:
    """Two services (as two workers would be), each with its own connection to the log."""
    _, bundle = tiny_bundle
    logs: list[FeedbackStore] = [open_feedback_store(location) for _ in range(2)]
    services = [
        RecommenderService(
            bundle,
            log,
            enforce_budgets=False,
            publish_reloads=True,
            check_reloads_in_child=False,
        )
        for log in logs
    ]
    yield services[0], services[1]
    for service in services:
        service.close()


def top(service: RecommenderService, user: str, k: int = 10) -> list[str]:
    answer = service.pipeline.recommend([RecommendRequest(user_id=user, k=k)])[0]
    return list(answer.item_ids)


def test_feedback_logged_by_one_is_applied_by_the_other(
    pair: tuple[RecommenderService, RecommenderService],
) -> None:
    a, b = pair
    user = b.pipeline.state.user_ids()[0]
    consumed = top(b, user)[:3]
    events = [
        a.feedback.make_event(f"e{i}", user, item, "purchase", NOW)
        for i, item in enumerate(consumed)
    ]
    result = a.record_feedback(events)
    assert a.applied_seq == result.last_seq  # the accepting worker applied them at once
    assert set(top(b, user)) & set(consumed)  # b has not looked at the log yet
    assert b.catch_up() == result.last_seq
    assert not set(top(b, user)) & set(consumed)
    assert b.catch_up() == result.last_seq  # nothing new: nothing applied twice


def test_an_item_added_through_one_is_served_by_the_other(
    pair: tuple[RecommenderService, RecommenderService],
) -> None:
    a, b = pair
    change = a.add_items(pl.DataFrame({"item_id": ["fresh-item"]}))
    assert change.added == 1
    assert a.similar_items("fresh-item", 3)
    b.catch_up()
    assert b.similar_items("fresh-item", 3)
    # Feedback on it, logged by b after the item: a applies both in log order.
    b.record_feedback([b.feedback.make_event("on-fresh", "someone", "fresh-item", "click", NOW)])
    a.catch_up()
    index = int(a.pipeline.artifacts.items.index(["fresh-item"])[0])
    assert a.pipeline.state.batch(["someone"], NOW + 1).recent_items[0][0] == index


def test_a_reload_through_one_is_followed_by_the_other(
    pair: tuple[RecommenderService, RecommenderService],
    tiny_bundle: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    a, b = pair
    version = resealed_copy(tiny_bundle[1], tmp_path / "second")
    new, old = a.reload(tmp_path / "second")
    assert new == version != old
    assert b.pipeline.model_version == old
    assert b.follow_published()
    assert b.pipeline.model_version == version and b.generation == a.generation
    assert not b.follow_published()  # served already
    assert not a.follow_published()  # its own publication


def test_the_follower_thread_keeps_a_worker_current(
    pair: tuple[RecommenderService, RecommenderService],
) -> None:
    a, b = pair
    follower = LogFollower(b, FollowerConfig(interval_s=0.01)).start()
    try:
        user = b.pipeline.state.user_ids()[1]
        consumed = top(b, user)[:2]
        events = [
            a.feedback.make_event(f"t{i}", user, item, "purchase", NOW)
            for i, item in enumerate(consumed)
        ]
        last = a.record_feedback(events).last_seq
        deadline = time.monotonic() + 10  # far above the tick: only a broken thread misses it
        while b.applied_seq < last:
            assert time.monotonic() < deadline, "the follower did not apply the events"
            time.sleep(0.01)
        assert not set(top(b, user)) & set(consumed)
    finally:
        follower.stop()
