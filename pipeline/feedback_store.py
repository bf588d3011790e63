"""The feedback store interface, and the backend a location names.

Two backends keep the same contract (append-only, idempotent on ``event_id``, durable once
``append`` returns, ``seq`` increasing in commit order so that tailing misses nothing):

* SQLite in WAL mode (``pipeline/feedback_log.py``): the embedded default, one machine;
* PostgreSQL (``pipeline/feedback_pg.py``): shared by replicas on several machines.

``open_feedback_store("feedback.sqlite3")`` or ``open_feedback_store("postgresql://...")``;
the service never knows which one it holds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import polars as pl

from pipeline.feedback_log import (
    AppendResult,
    BundleGeneration,
    EventRules,
    FeedbackEvent,
    FeedbackLog,
    FeedbackLogConfig,
)
from pipeline.feedback_pg import (
    PostgresFeedbackLog,
    PostgresFeedbackLogConfig,
    is_postgres_url,
    redacted,
)


class FeedbackStore(Protocol):
    """What the service, the log follower and the offline readers need of a feedback log."""

    @property
    def config(self) -> EventRules: ...

    def make_event(
        self, event_id: str, user_id: str, item_id: str, type: str, timestamp: int | None = None
    ) -> FeedbackEvent: ...

    def append(self, events: Iterable[FeedbackEvent]) -> AppendResult: ...

    def append_items(self, frame: pl.DataFrame) -> int: ...

    def item_updates(self) -> pl.DataFrame: ...

    def item_updates_since(self, seq: int) -> tuple[pl.DataFrame, int]: ...

    def publish_bundle(self, bundle: str, model_version: str) -> BundleGeneration: ...

    def latest_bundle(self) -> BundleGeneration | None: ...

    def read_since(self, seq: int, limit: int | None = None) -> tuple[list[FeedbackEvent], int]: ...

    def iter_all(self, since: int = 0, batch_size: int | None = None) -> Iterator[pl.DataFrame]: ...

    def read_users(self, user_ids: Sequence[str], *, until: int | None = None) -> pl.DataFrame: ...

    def to_frame(
        self, since: int | None = None, *, type_weights: Mapping[str, float] | None = None
    ) -> pl.DataFrame: ...

    def count(self) -> int: ...

    def last_seq(self) -> int: ...

    def close(self) -> None: ...


def open_feedback_store(location: str | os.PathLike[str]) -> FeedbackStore:
    """The feedback log at ``location``: a ``postgresql://`` URL, or else a SQLite file path."""
    if is_postgres_url(location):
        return PostgresFeedbackLog(PostgresFeedbackLogConfig(url=str(location)))
    return FeedbackLog(FeedbackLogConfig(path=location))


def describe_location(location: str | os.PathLike[str]) -> str:
    """``location`` fit for a log line: a URL's password is never shown."""
    return redacted(str(location)) if is_postgres_url(location) else str(location)
