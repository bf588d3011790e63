"""The feedback log: idempotent, tailable, thread- and process-safe, and durable under SIGKILL."""

from __future__ import annotations

import dataclasses
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.errors import ConfigError, DataError
from data.schema import INTERACTION_SCHEMA
from pipeline.feedback_log import (
    LOG_SCHEMA,
    FeedbackEvent,
    FeedbackLog,
    FeedbackLogBusyError,
    FeedbackLogConfig,
)

NOW = 1_700_000_000  # the injected clock: seconds UTC
WRITER = Path(__file__).with_name("feedback_writer_process.py")


def open_log(path: Path, **overrides: object) -> FeedbackLog:
    return FeedbackLog(FeedbackLogConfig(path=path, **overrides), clock=lambda: NOW)  # type: ignore[arg-type]


def click(log: FeedbackLog, event_id: str, user: str = "u1", item: str = "i1") -> FeedbackEvent:
    return log.make_event(event_id, user, item, "click", NOW - 60)


def ids(events: list[FeedbackEvent] | tuple[FeedbackEvent, ...]) -> list[str]:
    return [e.event_id for e in events]


# -- events and configuration ------------------------------------------------------------------


def test_make_event_derives_the_weight_and_defaults_the_time(tmp_path: Path) -> None:
    with open_log(tmp_path / "log.db") as log:
        assert log.make_event("e1", "u", "i", "purchase", 123) == FeedbackEvent(
            "e1", "u", "i", "purchase", 123, 4.0
        )
        assert log.make_event("e2", "u", "i", "impression").timestamp == NOW
        assert log.make_event("e3", "u", "i", "impression").weight == 0.0
        with pytest.raises(DataError, match=r"unknown event type 'like'.*'click'"):
            log.make_event("e4", "u", "i", "like")


def test_config_is_validated_and_frozen(tmp_path: Path) -> None:
    for bad in (
        {"path": ":memory:"},
        {"path": tmp_path / "x.db", "synchronous": "OFF"},
        {"path": tmp_path / "x.db", "busy_timeout_ms": 0},
        {"path": tmp_path / "x.db", "max_events_per_append": 0},
        {"path": tmp_path / "x.db", "busy_retries": -1},
        {"path": tmp_path / "x.db", "type_weights": {}},
        {"path": tmp_path / "x.db", "type_weights": {"click": float("nan")}},
    ):
        with pytest.raises(ConfigError):
            FeedbackLogConfig(**bad)
    weights = {"view": 0.5}
    config = FeedbackLogConfig(path=tmp_path / "x.db", synchronous="normal", type_weights=weights)  # type: ignore[arg-type]
    weights["view"] = 9.0
    assert config.synchronous == "NORMAL"
    assert dict(config.type_weights) == {"view": 0.5}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("event_id", "", "event_id must be a non-empty string"),
        ("user_id", "   ", "user_id must be a non-empty string"),
        ("item_id", 7, "item_id must be a non-empty string, got 7"),
        ("item_id", "x" * 257, "item_id has 257 characters; at most 256"),
        ("type", "like", "unknown event type 'like'"),
        ("timestamp", -1, "timestamp -1 is negative"),
        ("timestamp", NOW * 1000, "more than 86400 s after the server's clock"),
        ("timestamp", 1.5, "timestamp must be an int"),
        ("timestamp", True, "timestamp must be an int"),
        ("weight", float("nan"), "weight must be a finite number"),
    ],
)
def test_invalid_events_are_refused_and_nothing_is_stored(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    with open_log(tmp_path / "log.db") as log:
        good = click(log, "good")
        bad = dataclasses.replace(good, **{"event_id": "bad", field: value})  # type: ignore[arg-type]  # wrong on purpose
        with pytest.raises(DataError, match=f"feedback event 1 .*{message}"):
            log.append([good, bad])
        assert log.count() == 0


def test_batch_size_and_event_type_are_guarded(tmp_path: Path) -> None:
    with open_log(tmp_path / "log.db", max_events_per_append=2) as log:
        with pytest.raises(DataError, match=r"3 feedback events in one append; at most 2"):
            log.append([click(log, f"e{i}") for i in range(3)])
        with pytest.raises(DataError, match="expected a FeedbackEvent, got dict"):
            log.append([{"event_id": "e"}])  # type: ignore[list-item]
        assert log.append([]).accepted == 0


# -- idempotency and tailing -------------------------------------------------------------------


def test_duplicates_across_and_within_calls_count_once(tmp_path: Path) -> None:
    with open_log(tmp_path / "log.db") as log:
        first = log.append([click(log, "a"), click(log, "b"), click(log, "a", item="other")])
        assert (first.accepted, first.duplicates) == (2, 1)
        assert first.accepted_events == (click(log, "a"), click(log, "b"))  # first copy wins
        second = log.append([click(log, "b"), click(log, "c")])
        assert (second.accepted, second.duplicates) == (1, 1)
        assert ids(second.accepted_events) == ["c"]
        again = log.append([click(log, "a"), click(log, "c")])
        assert (again.accepted, again.duplicates, again.accepted_events) == (0, 2, ())
        assert again.last_seq == second.last_seq == log.last_seq()
        assert log.count() == 3
        assert ids(log.read_since(0)[0]) == ["a", "b", "c"]
        assert log.read_since(0)[0][0].item_id == "i1"


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.lists(st.sampled_from("abcdefg"), max_size=6), max_size=6))
def test_log_holds_the_first_copy_of_every_id_in_order(batches: list[list[str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp, open_log(Path(tmp) / "log.db") as log:
        stored: list[str] = []
        for batch in batches:
            result = log.append([click(log, event_id) for event_id in batch])
            new = list(dict.fromkeys(e for e in batch if e not in stored))
            assert ids(result.accepted_events) == new
            assert result.duplicates == len(batch) - len(new)
            stored += new
        events, last_seq = log.read_since(0)
        assert ids(events) == stored
        assert log.count() == len(stored)
        assert last_seq == log.last_seq()


def test_read_since_tails_the_log_page_by_page(tmp_path: Path) -> None:
    with open_log(tmp_path / "log.db") as log:
        assert log.read_since(0) == ([], 0)
        assert (log.count(), log.last_seq()) == (0, 0)
        log.append([click(log, "a"), click(log, "b"), click(log, "c")])
        log.append([click(log, "a"), click(log, "d")])  # "a" ignored: its seq is never reused
        log.append([click(log, "e")])
        pages, seq = [], 0
        while True:
            events, next_seq = log.read_since(seq, limit=2)
            if not events:
                assert next_seq == seq == log.last_seq()
                break
            assert next_seq > seq
            pages.append(ids(events))
            seq = next_seq
        assert pages == [["a", "b"], ["c", "d"], ["e"]]
        with pytest.raises(DataError, match="limit must be an int >= 1"):
            log.read_since(0, limit=0)
        with pytest.raises(DataError, match="seq must be an int >= 0"):
            log.read_since(-1)


def test_frames_for_retraining_and_monitors(tmp_path: Path) -> None:
    with open_log(tmp_path / "log.db") as log:
        assert log.to_frame().equals(pl.DataFrame(schema=INTERACTION_SCHEMA))
        assert list(log.iter_all()) == []
        log.append([log.make_event("e1", "u1", "i1", "impression", 100)])
        mark = log.append([log.make_event("e2", "u1", "i1", "click", 101)]).last_seq
        log.append(
            [
                log.make_event("e3", "u2", "i2", "purchase", 102),
                log.make_event("e4", "u2", "i3", "click", 99),
            ]
        )
        frame = log.to_frame()
        assert frame.schema == pl.Schema(INTERACTION_SCHEMA)
        assert frame.rows() == [
            ("u1", "i1", 100, 0.0),
            ("u1", "i1", 101, 1.0),
            ("u2", "i2", 102, 4.0),
            ("u2", "i3", 99, 1.0),
        ]
        assert log.to_frame(since=mark)["item_id"].to_list() == ["i2", "i3"]
        reweighted = log.to_frame(type_weights={"impression": -1.0, "click": 1.0, "purchase": 9.0})
        assert reweighted["weight"].to_list() == [-1.0, 1.0, 9.0, 1.0]
        with pytest.raises(DataError, match=r"no weight for stored type\(s\) \['purchase'\]"):
            log.to_frame(type_weights={"impression": 0.0, "click": 1.0})
        batches = list(log.iter_all(batch_size=3))
        assert [b.height for b in batches] == [3, 1]
        assert all(b.schema == pl.Schema(dict(LOG_SCHEMA)) for b in batches)
        assert batches[0]["received_at"].to_list() == [NOW] * 3
        assert batches[0]["seq"].is_sorted() and batches[0]["seq"].n_unique() == 3


# -- the file ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "code"), [("FULL", 2), ("NORMAL", 1)])
def test_file_is_wal_with_the_configured_sync_and_survives_reopening(
    tmp_path: Path, mode: str, code: int
) -> None:
    path = tmp_path / "nested" / "log.db"
    with open_log(path, synchronous=mode) as log:
        first = log.append([click(log, "a"), click(log, "b")])
        # Private on purpose: the durability promise rests on this per-connection setting.
        assert log._run(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]) == code
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()
    with open_log(path, synchronous=mode) as log:
        assert ids(log.read_since(0)[0]) == ["a", "b"]
        second = log.append([click(log, "b"), click(log, "c")])
        assert (second.accepted, second.duplicates) == (1, 1)
        assert second.last_seq > first.last_seq
    with pytest.raises(RuntimeError, match="closed"):
        log.count()


def test_foreign_files_are_refused_with_the_path(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database " * 100)
    with pytest.raises(DataError, match="junk.db"):
        FeedbackLog(FeedbackLogConfig(path=junk))
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as raw:
        raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(DataError, match="schema version 99, this code reads version 2"):
        FeedbackLog(FeedbackLogConfig(path=newer))
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as raw:
        raw.execute("CREATE TABLE feedback (x)")
    raw.close()
    with pytest.raises(DataError, match="not a feedback log"):
        FeedbackLog(FeedbackLogConfig(path=other))


def test_a_held_write_lock_is_waited_for_then_reported(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with open_log(path, busy_timeout_ms=20, busy_retries=3, busy_backoff_s=0.05) as log:
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")
        threading.Timer(0.1, lambda: holder.execute("COMMIT")).start()
        assert log.append([click(log, "waited")]).accepted == 1  # succeeded on a retry
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(FeedbackLogBusyError, match="still locked after 4 attempts"):
            log.append([click(log, "refused")])
        holder.execute("ROLLBACK")
        holder.close()
        assert ids(log.read_since(0)[0]) == ["waited"]


# -- concurrency and durability ----------------------------------------------------------------


def test_threads_append_and_tail_concurrently(tmp_path: Path) -> None:
    n_threads, n_batches = 8, 20
    with open_log(tmp_path / "log.db") as log:
        start = threading.Barrier(n_threads + 1)
        results: list[list[str]] = [[] for _ in range(n_threads)]
        tailed: list[str] = []
        writers_done = threading.Event()

        def write(t: int) -> None:
            start.wait()
            for b in range(n_batches):
                # three ids of its own and one that every thread races for
                batch = [click(log, f"t{t}-{b}-{k}") for k in range(3)] + [click(log, f"s{b}")]
                results[t] += ids(log.append(batch).accepted_events)

        def tail() -> None:
            start.wait()
            seq = 0
            while True:
                done = writers_done.is_set()  # read before the final drain
                events, seq = log.read_since(seq, limit=7)
                tailed.extend(ids(events))
                if done and not events:
                    return

        threads = [threading.Thread(target=write, args=(t,)) for t in range(n_threads)]
        tailer = threading.Thread(target=tail)
        for thread in [*threads, tailer]:
            thread.start()
        for thread in threads:
            thread.join()
        writers_done.set()
        tailer.join()

        expected = {
            f"t{t}-{b}-{k}" for t in range(n_threads) for b in range(n_batches) for k in range(3)
        }
        expected |= {f"s{b}" for b in range(n_batches)}
        accepted = [event_id for per_thread in results for event_id in per_thread]
        assert sorted(accepted) == sorted(expected)  # every id accepted by exactly one thread
        assert log.count() == len(expected)
        assert tailed == ids(log.read_since(0, limit=10_000)[0])  # the tail missed nothing


def run_writer(path: Path, prefix: str, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, str(WRITER), "--path", str(path), "--prefix", prefix, *extra]
    return subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_acknowledged_events_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    acked: list[str] = []
    with run_writer(path, "k", "--batch", "3") as writer:
        watchdog = threading.Timer(15, writer.kill)  # never hang the suite on a stuck writer
        watchdog.start()
        assert writer.stdout is not None and writer.stderr is not None
        try:
            for line in writer.stdout:
                acked.append(line.split()[1])
                if len(acked) >= 90:
                    break
        finally:
            writer.send_signal(signal.SIGKILL)  # mid-stream: it is appending more right now
            writer.wait(timeout=10)
            watchdog.cancel()
        assert len(acked) >= 90, writer.stderr.read()
    assert writer.returncode == -signal.SIGKILL

    with open_log(path) as log:
        stored = set(ids(log.read_since(0, limit=100_000)[0]))
        assert set(acked) <= stored
        resent = log.append([click(log, event_id) for event_id in acked])
        assert (resent.accepted, resent.duplicates) == (0, len(acked))
        assert log.count() == len(stored)


def test_two_processes_append_to_one_file_and_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "log.db"  # created by whichever writer opens it first
    n_events, batch, n_shared = 300, 5, 20
    args: tuple[str, ...] = (
        "--count",
        str(n_events),
        "--batch",
        str(batch),
        "--shared",
        str(n_shared),
    )
    args += ("--pause-s", "0.002", "--wait")
    with run_writer(path, "a", *args) as first, run_writer(path, "b", *args) as second:
        writers = [first, second]
        for writer in writers:  # both have opened the log ...
            assert writer.stdout is not None and writer.stdin is not None
            assert writer.stdout.readline() == "READY\n"
        for writer in writers:  # ... before either writes
            assert writer.stdin is not None
            writer.stdin.write("go\n")
            writer.stdin.flush()
        outputs = [writer.communicate(timeout=15) for writer in writers]
    for writer, (_, stderr) in zip(writers, outputs, strict=True):
        assert writer.returncode == 0, stderr
    totals = [line.split() for out, _ in outputs for line in out.splitlines() if "DONE" in line]
    sent = 2 * (n_events + n_events // batch)  # each batch carries one shared id
    distinct = 2 * n_events + n_shared
    assert sum(int(t[1]) for t in totals) == distinct
    assert sum(int(t[2]) for t in totals) == sent - distinct
    with open_log(path) as log:
        stored = ids(log.read_since(0, limit=10_000)[0])
    assert len(stored) == len(set(stored)) == distinct
    own = [event_id[0] for event_id in stored if not event_id.startswith("shared")]
    switches = sum(a != b for a, b in zip(own, own[1:], strict=False))
    assert switches > 1, "the two writers never interleaved: the test proved nothing"


def test_a_version_1_log_is_upgraded_in_place(tmp_path: Path) -> None:
    """A log written before the catalogue table existed opens, keeps its events, and takes
    catalogue updates."""
    path = tmp_path / "old.sqlite3"
    with FeedbackLog(FeedbackLogConfig(path=path)) as log:
        log.append([FeedbackEvent("e1", "u", "i", "click", 1, 1.0)])
    raw = sqlite3.connect(path)
    raw.execute("DROP TABLE catalogue_updates")
    raw.execute("PRAGMA user_version = 1")
    raw.commit()
    raw.close()
    with FeedbackLog(FeedbackLogConfig(path=path)) as log:
        assert log.count() == 1
        log.append_items(pl.DataFrame({"item_id": ["new"], "created_at": [5]}))
        updates = log.item_updates()
    assert updates.to_dicts() == [{"item_id": "new", "categories": None, "created_at": 5}]
