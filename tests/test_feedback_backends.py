"""One contract, two feedback log backends (SQLite file, real PostgreSQL server): idempotence,
commit-ordered sequence numbers under concurrent writers, catalogue updates and bundle
generations followed by number, and a database that goes away."""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from benchmarks.postgres_server import PostgresUnavailableError, start_server, wait_accepting
from data.errors import ConfigError, DataError
from pipeline.feedback_pg import FeedbackLogUnavailableError, is_postgres_url, redacted
from pipeline.feedback_store import FeedbackStore, open_feedback_store


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "feedback.sqlite3")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(location: str) -> Iterator[FeedbackStore]:
    log = open_feedback_store(location)
    yield log
    log.close()


def test_append_is_idempotent_on_event_id(store: FeedbackStore) -> None:
    events = [store.make_event(f"e{i}", "u1", f"i{i}", "click", 100 + i) for i in range(4)]
    repeat = store.make_event("e1", "u1", "other", "purchase", 999)  # same id: a duplicate
    first = store.append([*events, repeat])
    assert (first.accepted, first.duplicates) == (4, 1)
    assert [e.item_id for e in first.accepted_events] == ["i0", "i1", "i2", "i3"]
    again = store.append(events)
    assert (again.accepted, again.duplicates) == (0, 4)
    assert again.last_seq == first.last_seq
    assert store.count() == 4
    stored, last = store.read_since(0)
    assert [(e.event_id, e.item_id) for e in stored] == [(f"e{i}", f"i{i}") for i in range(4)]
    assert last == first.last_seq == store.last_seq()
    assert store.read_users(["u1"]).height == 4
    assert store.to_frame().height == 4


def test_invalid_event_stores_nothing(store: FeedbackStore) -> None:
    good = store.make_event("ok", "u", "i", "click", 1)
    bad = store.make_event("", "u", "i", "click", 1)
    with pytest.raises(DataError, match="event_id"):
        store.append([good, bad])
    assert store.count() == 0


def test_tailing_concurrent_writers_misses_nothing(store: FeedbackStore) -> None:
    """Four threads append while a reader tails by seq: every event is read exactly once, in
    increasing seq. (PostgreSQL: only because writers serialise on the advisory lock.)"""
    writers, batches, per_batch = 4, 15, 3
    seen: list[str] = []
    done = threading.Event()

    def write(w: int) -> None:
        for b in range(batches):
            store.append(
                [
                    store.make_event(f"w{w}-{b}-{i}", f"u{w}", f"i{i}", "click", 10)
                    for i in range(per_batch)
                ]
            )

    def tail() -> None:
        position = 0
        while True:
            finished = done.is_set()  # read before the last pass: nothing is committed after
            events, position = store.read_since(position)
            seen.extend(e.event_id for e in events)
            if finished and not events:
                return

    reader = threading.Thread(target=tail)
    reader.start()
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    reader.join(30)
    assert len(seen) == len(set(seen)) == writers * batches * per_batch


def test_catalogue_updates_and_generations_are_followed_by_number(store: FeedbackStore) -> None:
    assert store.latest_bundle() is None
    empty, position = store.item_updates_since(0)
    assert (empty.height, position) == (0, 0)
    store.append_items(pl.DataFrame({"item_id": ["n1"], "categories": [["a", "b"]]}))
    frame, first = store.item_updates_since(0)
    assert frame.to_dicts() == [{"item_id": "n1", "categories": ["a", "b"], "created_at": None}]
    store.append_items(pl.DataFrame({"item_id": ["n2"], "created_at": [5]}))
    later, second = store.item_updates_since(first)
    assert later["item_id"].to_list() == ["n2"] and second > first
    assert store.item_updates()["item_id"].to_list() == ["n1", "n2"]
    one = store.publish_bundle("/bundles/a", "v-a")
    two = store.publish_bundle("/bundles/b", "v-b")
    assert two.generation > one.generation
    assert store.latest_bundle() == two


def test_password_never_shown() -> None:
    url = "postgresql://svc:s3cret@db.example:5432/recsys"
    assert "s3cret" not in redacted(url)
    assert redacted(url) == "postgresql://svc:***@db.example:5432/recsys"


def test_database_down_refuses_then_recovers() -> None:
    """A stopped server: appends and reads raise FeedbackLogUnavailableError (the API's 503),
    nothing acknowledged is lost, and the same object works again once the server is back."""
    try:
        server = start_server()
    except PostgresUnavailableError as exc:
        pytest.skip(str(exc))
    try:
        wait_accepting(server.url)
        log = open_feedback_store(server.url)
        assert log.append([log.make_event("before", "u", "i", "click", 1)]).accepted == 1
        server.stop("immediate")
        with pytest.raises(FeedbackLogUnavailableError):
            log.append([log.make_event("during", "u", "i", "click", 1)])
        with pytest.raises(FeedbackLogUnavailableError):
            log.read_since(0)
        server.start()
        wait_accepting(server.url)
        assert log.append([log.make_event("after", "u", "i", "click", 1)]).accepted == 1
        assert [e.event_id for e in log.read_since(0)[0]] == ["before", "after"]
        log.close()
    finally:
        with contextlib.suppress(PostgresUnavailableError):
            server.stop("immediate")
        shutil.rmtree(server.root, ignore_errors=True)


def test_a_bad_url_is_a_config_error_that_hides_the_password() -> None:
    with pytest.raises(ConfigError) as refused:
        open_feedback_store("postgresql://svc:s3cret@[unclosed/recsys")
    assert "s3cret" not in str(refused.value) and refused.value.__cause__ is None
    assert is_postgres_url("postgres://h/db") and is_postgres_url("POSTGRESQL://h/db")
    assert not is_postgres_url("feedback.sqlite3") and not is_postgres_url("/tmp/postgresql")
