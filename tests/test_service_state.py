"""The service's online state and the feedback that feeds it.

Known answers: a user's history after start-up, reload or restart equals the bundle's snapshot
plus exactly the logged events after its training cut, each once; feedback recorded at any
moment of a reload reaches the new state exactly once; the event types the API documents are
exactly those the feedback log accepts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient

from pipeline.artifacts import HISTORY
from pipeline.factory import online_state_for
from pipeline.feedback_log import (
    DEFAULT_TYPE_WEIGHTS,
    FeedbackEvent,
    FeedbackLog,
    FeedbackLogConfig,
)
from pipeline.service import RecommenderService
from retrieval.base import UserBatch
from serving.app import create_app
from serving.settings import ServiceSettings

# Far enough after any event of the tiny world that a request sees every history entry.
NOW = 2**40


@pytest.fixture
def log(tmp_path: Path) -> Iterator[FeedbackLog]:
    with FeedbackLog(FeedbackLogConfig(path=tmp_path / "feedback.sqlite3")) as feedback:
        yield feedback


def click(event_id: str, user: str, item: str, timestamp: int | None = None) -> FeedbackEvent:
    return FeedbackEvent(event_id, user, item, "click", timestamp or 0, 1.0)


def now_click(log: FeedbackLog, event_id: str, user: str, item: str) -> FeedbackEvent:
    return log.make_event(event_id, user, item, "click")


def histories(service: RecommenderService, users: list[str]) -> UserBatch:
    return service.pipeline.state.batch(users, NOW)


def assert_same_histories(got: UserBatch, expected: UserBatch) -> None:
    np.testing.assert_array_equal(got.recent_items, expected.recent_items)
    np.testing.assert_array_equal(got.recent_times, expected.recent_times)


def test_events_in_the_bundle_history_are_not_replayed_twice(
    tiny_bundle: tuple[Path, Path], log: FeedbackLog
) -> None:
    _, bundle = tiny_bundle
    snapshot = pl.read_parquet(bundle / HISTORY)
    cut = int(snapshot["timestamp"].max())  # type: ignore[arg-type]
    users = snapshot["user_id"].unique(maintain_order=True).to_list()
    user, other = users[0], users[1]
    item_a, item_b, item_c = snapshot["item_id"].unique(maintain_order=True).head(3).to_list()
    # The log the training data came from: every snapshot event, logged as a click ...
    log.append(
        [
            click(f"train-{i}", row["user_id"], row["item_id"], row["timestamp"])
            for i, row in enumerate(snapshot.iter_rows(named=True))
        ]
    )
    # ... then feedback around the training cut: only what comes after it is new.
    log.append(
        [
            click("at-cut", user, item_a, cut),
            click("after-cut", user, item_b, cut + 1),
            click("later", other, item_c, cut + 50),
        ]
    )

    service = RecommenderService(bundle, log)
    expected = online_state_for(service.pipeline.artifacts)
    index = service.pipeline.artifacts.items.index([item_b, item_c])
    expected.observe([user, other], index, [cut + 1, cut + 50])
    want = expected.batch(users, NOW)
    assert_same_histories(histories(service, users), want)
    assert histories(service, [user]).recent_items[0, 0] == index[0]

    service.reload(bundle)
    assert_same_histories(histories(service, users), want)
    restarted = RecommenderService(bundle, log)
    assert_same_histories(histories(restarted, users), want)
    restarted.close()


def test_live_feedback_follows_the_replay_rule(
    tiny_bundle: tuple[Path, Path], log: FeedbackLog
) -> None:
    """A late event (at or before the training cut) is logged but stays out of the state, live
    as on replay, so a restart rebuilds exactly the state the live service had."""
    _, bundle = tiny_bundle
    snapshot = pl.read_parquet(bundle / HISTORY)
    cut = int(snapshot["timestamp"].max())  # type: ignore[arg-type]
    item = str(snapshot["item_id"][0])
    service = RecommenderService(bundle, log)
    result = service.record_feedback(
        [click("late", "newcomer", item, cut), now_click(log, "fresh", "newcomer", item)]
    )
    assert result.accepted == 2 and log.count() == 2
    live = histories(service, ["newcomer"])
    item_idx = service.pipeline.artifacts.items.index([item])[0]
    assert live.recent_items[0].tolist().count(item_idx) == 1
    restarted = RecommenderService(bundle, log)
    assert_same_histories(histories(restarted, ["newcomer"]), live)
    restarted.close()


def test_trending_follows_live_feedback_and_a_restart_replays_it(
    tiny_bundle: tuple[Path, Path], log: FeedbackLog
) -> None:
    """Feedback moves the population-level trending source too, not only the clicker's state:
    an item nobody engaged with leads it after a burst of clicks, for every user, and a restart
    (log replay) rebuilds the same scores."""
    _, bundle = tiny_bundle
    service = RecommenderService(bundle, log, enforce_budgets=False)
    popular = service.pipeline.artifacts.retrieval.sources_["popular"]
    quiet_item = int(np.argmin(popular.scores_))
    item_id = service.pipeline.artifacts.items.to_ids(np.array([quiet_item])).to_list()[0]
    service.record_feedback([now_click(log, f"burst-{i}", f"fan-{i}", item_id) for i in range(50)])
    stranger = service.pipeline.state.batch(["never-seen-user"], NOW)
    assert popular.retrieve(stranger, 1).item_idx[0, 0] == quiet_item
    restarted = RecommenderService(bundle, log, enforce_budgets=False)
    replayed = restarted.pipeline.artifacts.retrieval.sources_["popular"]
    assert replayed.t_ref_ == popular.t_ref_
    np.testing.assert_allclose(replayed.scores_, popular.scores_, rtol=1e-9)
    restarted.close()
    service.close()


class FeedbackAtRead:
    """Record one event from another thread right after the ``k``-th log read of a reload.

    The hook returns only once that event is committed to the log; the recording thread may
    still be on its way to the online state (or waiting for the reload to let it in).
    """

    def __init__(self, service: RecommenderService, k: int, event: FeedbackEvent) -> None:
        self.service, self.k, self.event = service, k, event
        self.reads = 0
        self.committed = threading.Event()
        self.thread = threading.Thread(target=service.record_feedback, args=([event],))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        log = self.service.feedback
        select, append = log._select_since, log.append

        def select_then_record(*args: Any) -> Any:
            rows = select(*args)
            self.reads += 1
            if self.reads == self.k:
                self.thread.start()
                assert self.committed.wait(timeout=30), "the racing append never committed"
            return rows

        def append_and_signal(events: Any) -> Any:
            result = append(events)
            if any(e.event_id == self.event.event_id for e in events):
                self.committed.set()
            return result

        monkeypatch.setattr(log, "_select_since", select_then_record)
        monkeypatch.setattr(log, "append", append_and_signal)


def test_feedback_recorded_at_any_moment_of_a_reload_reaches_the_new_state_once(
    tiny_bundle: tuple[Path, Path], log: FeedbackLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, bundle = tiny_bundle
    service = RecommenderService(bundle, log)
    item = str(service.pipeline.artifacts.items.ids[0])
    item_idx = service.pipeline.artifacts.items.index([item])[0]
    service.record_feedback([now_click(log, "before", "someone", item)])

    # How many log reads a reload makes (none fires: k = 0).
    with monkeypatch.context() as patch:
        counter = FeedbackAtRead(service, 0, now_click(log, "unused", "nobody", item))
        counter.install(patch)
        service.reload(bundle)
    assert counter.reads >= 2, "a reload reads the log during the load and before the swap"

    racers = []
    for k in range(1, counter.reads + 1):
        racer = f"racer-{k}"
        with monkeypatch.context() as patch:
            race = FeedbackAtRead(service, k, now_click(log, f"race-{k}", racer, item))
            race.install(patch)
            service.reload(bundle)
            race.thread.join(timeout=30)
        assert not race.thread.is_alive()
        history = histories(service, [racer]).recent_items[0].tolist()
        assert history.count(item_idx) == 1, f"event after read {k} of {counter.reads}: {history}"
        racers.append(racer)

    # The state built live through every race is the one a restart rebuilds from the log.
    restarted = RecommenderService(bundle, log)
    users = ["someone", *racers]
    assert_same_histories(histories(service, users), histories(restarted, users))
    restarted.close()


def test_event_types_are_documented_in_the_schema_and_others_refused(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    data, bundle = tiny_bundle
    app = create_app(ServiceSettings(bundle=bundle, feedback_db=tmp_path / "feedback.sqlite3"))
    event_type = app.openapi()["components"]["schemas"]["EventIn"]["properties"]["type"]
    assert event_type["enum"] == list(DEFAULT_TYPE_WEIGHTS)
    assert event_type["examples"][0] in DEFAULT_TYPE_WEIGHTS
    assert all(name in event_type["description"] for name in DEFAULT_TYPE_WEIGHTS)

    with TestClient(app) as client:
        user = str(client.app.state.service.pipeline.artifacts.users.ids[0])  # type: ignore[attr-defined]
        item = str(client.app.state.service.pipeline.artifacts.items.ids[0])  # type: ignore[attr-defined]
        events = [
            {"event_id": f"e-{name}", "user_id": user, "item_id": item, "type": name}
            for name in event_type["enum"]
        ]
        accepted = client.post("/v1/feedback", json={"events": events})
        assert accepted.status_code == 202
        assert accepted.json() == {"accepted": len(events), "duplicates": 0}
        unknown = {"event_id": "e-x", "user_id": user, "item_id": item, "type": "teleport"}
        refused = client.post("/v1/feedback", json={"events": [unknown]})
        assert refused.status_code == 422
        assert "teleport" in refused.json()["error"] and "purchase" in refused.json()["error"]


def test_the_online_user_cap_reaches_the_service_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    _, bundle = tiny_bundle
    monkeypatch.setenv("RECSYS_MAX_ONLINE_USERS", "1234")
    monkeypatch.setenv("RECSYS_ONLINE_USER_TTL_S", "60")
    settings = ServiceSettings(bundle=bundle, feedback_db=tmp_path / "feedback.sqlite3")

    with TestClient(create_app(settings)) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        assert service.max_online_users == 1234 and service.online_user_ttl_s == 60.0
