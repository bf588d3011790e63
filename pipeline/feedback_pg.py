"""The feedback log on PostgreSQL: what N replicas on N machines share (SQLite WAL cannot be).

The same contract as the SQLite log (``pipeline/feedback_log.py``), table for table:

* ``append`` is one transaction, idempotent on ``event_id`` (``ON CONFLICT DO NOTHING``; the
  first copy within a batch wins), and returns only after ``COMMIT`` has returned: with the
  server's default ``synchronous_commit = on`` the commit record is flushed to its WAL, so a
  202 built on it survives the service process (and the database server) being killed.
* ``seq`` is strictly increasing **in commit order**, so tailing with ``read_since`` misses
  nothing. A ``BIGSERIAL`` alone does not give that: two transactions may draw 5 and 6 and
  commit 6 first, and a reader that saw 6 would skip 5 for ever. Every writer therefore takes one
  transaction-scoped advisory lock before it draws numbers; PostgreSQL makes a transaction
  visible before it releases its locks, so the next writer's numbers are drawn, and committed,
  after. Writers queue on that lock as SQLite writers queue on its write lock; an append is a
  few milliseconds, far more than the feedback rate of a service needs.
* A database that cannot be reached raises :class:`FeedbackLogUnavailableError` (a
  ``FeedbackLogBusyError``: the API answers 503 with ``Retry-After``); nothing was acknowledged,
  so nothing is lost. Reads raise it too; the log follower retries on its next tick while the
  workers go on serving from their online state.

The URL (``postgresql://user:password@host/db``) may hold a password: it is never logged or
put in an error message (``redacted``).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import polars as pl
import psycopg

from data.errors import ConfigError, DataError
from data.schema import ITEM_ID, TIMESTAMP, USER_ID, WEIGHT, empty_interactions
from pipeline.feedback_log import (
    DEFAULT_TYPE_WEIGHTS,
    LOG_SCHEMA,
    AppendResult,
    BundleGeneration,
    FeedbackEvent,
    FeedbackLogBusyError,
    check_events,
    items_frame,
)

URL_SCHEMES: Final[tuple[str, ...]] = ("postgresql", "postgres")

# One advisory lock key per table whose numbers readers follow (any 64-bit constants that other
# applications sharing the database are unlikely to use: "recsysfb", "recsysci", "recsysbg").
_EVENTS_LOCK: Final[int] = 0x7265637379736662
_ITEMS_LOCK: Final[int] = 0x7265637379736369
_GENERATIONS_LOCK: Final[int] = 0x7265637379736267
_SCHEMA_LOCK: Final[int] = 0x7265637379737363

_SCHEMA: Final[tuple[str, ...]] = (
    """CREATE TABLE IF NOT EXISTS feedback (
        seq         BIGSERIAL PRIMARY KEY,
        event_id    TEXT             NOT NULL UNIQUE,
        user_id     TEXT             NOT NULL,
        item_id     TEXT             NOT NULL,
        type        TEXT             NOT NULL,
        timestamp   BIGINT           NOT NULL,
        weight      DOUBLE PRECISION NOT NULL,
        received_at BIGINT           NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS feedback_by_user ON feedback (user_id, seq)",
    """CREATE TABLE IF NOT EXISTS catalogue_updates (
        seq         BIGSERIAL PRIMARY KEY,
        item_id     TEXT   NOT NULL,
        categories  TEXT,
        created_at  BIGINT,
        received_at BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS bundle_generations (
        generation    BIGSERIAL PRIMARY KEY,
        bundle        TEXT   NOT NULL,
        model_version TEXT   NOT NULL,
        published_at  BIGINT NOT NULL
    )""",
)
_COLUMNS: Final[str] = "seq, event_id, user_id, item_id, type, timestamp, weight, received_at"

_T = TypeVar("_T")


class FeedbackLogUnavailableError(FeedbackLogBusyError):
    """The database cannot be reached now (the API answers 503 with ``Retry-After``)."""


def is_postgres_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names a PostgreSQL database rather than a SQLite file."""
    scheme, separator, _ = str(location).partition("://")
    return bool(separator) and scheme.lower() in URL_SCHEMES


def redacted(url: str) -> str:
    """``url`` without its password, fit for logs and error messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not parsable (a stray bracket): show none of what follows the scheme
        return url.partition("://")[0] + "://..."
    if password is None:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class PostgresFeedbackLogConfig:
    """Where the log lives and the rules its events follow (those of ``FeedbackLogConfig``)."""

    url: str
    type_weights: Mapping[str, float] = field(default_factory=lambda: DEFAULT_TYPE_WEIGHTS)
    max_events_per_append: int = 10_000
    max_id_length: int = 256
    max_future_skew_s: int = 86_400
    # A request must not wait long on a database that is down: it answers 503 and the client
    # retries. 2 s is far above a healthy connection set-up on a LAN (~5 ms).
    connect_timeout_s: int = 2
    # Bounds every statement: a server that hangs (not refuses) must still free the worker.
    statement_timeout_ms: int = 5_000
    max_idle_connections: int = 4
    read_batch_size: int = 65_536

    def __post_init__(self) -> None:
        if not is_postgres_url(self.url):
            raise ConfigError(
                f"a PostgreSQL feedback log needs a postgresql:// URL, got {redacted(self.url)!r}"
            )
        for name in (
            "max_events_per_append",
            "max_id_length",
            "connect_timeout_s",
            "statement_timeout_ms",
            "max_idle_connections",
            "read_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_future_skew_s < 0:
            raise ConfigError(f"max_future_skew_s must be >= 0, got {self.max_future_skew_s}")
        if not self.type_weights:
            raise ConfigError("type_weights is empty: no event type would be accepted")


class PostgresFeedbackLog:
    """An append-only, idempotent, durable event log in a PostgreSQL database (module doc).

    Thread-safe: each call borrows a pooled connection. Open one per process (after a fork).
    """

    def __init__(
        self, config: PostgresFeedbackLogConfig, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self._clock = clock
        self._pid = os.getpid()
        self._idle: list[psycopg.Connection[Any]] = []
        self._pool_lock = threading.Lock()
        self._closed = False
        try:
            self._run(_create_schema)
        except BaseException:
            self.close()
            raise

    # -- writing -------------------------------------------------------------------------------

    def make_event(
        self, event_id: str, user_id: str, item_id: str, type: str, timestamp: int | None = None
    ) -> FeedbackEvent:
        """An event whose weight comes from ``config.type_weights`` (timestamp defaults to now)."""
        weights = self.config.type_weights
        if type not in weights:
            raise DataError(
                f"event {event_id!r}: unknown event type {type!r}; allowed: {sorted(weights)}"
            )
        when = int(self._clock()) if timestamp is None else timestamp
        return FeedbackEvent(event_id, user_id, item_id, type, when, weights[type])

    def append(self, events: Iterable[FeedbackEvent]) -> AppendResult:
        """Store ``events`` in one committed transaction, skipping event ids already stored."""
        batch = list(events)
        now = int(self._clock())
        check_events(batch, self.config, now)
        if not batch:
            return AppendResult(0, 0, (), self.last_seq())
        first: dict[str, FeedbackEvent] = {}
        for event in batch:
            first.setdefault(event.event_id, event)  # the first copy within a batch wins
        unique = list(first.values())
        columns = (
            [e.event_id for e in unique],
            [e.user_id for e in unique],
            [e.item_id for e in unique],
            [e.type for e in unique],
            [e.timestamp for e in unique],
            [float(e.weight) for e in unique],
        )

        def write(conn: psycopg.Connection[Any]) -> tuple[int, list[tuple[int, str]]]:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_EVENTS_LOCK,))
                # ORDER BY ord: numbers are drawn in the batch's order, like SQLite's.
                stored = conn.execute(
                    "INSERT INTO feedback "
                    "(event_id, user_id, item_id, type, timestamp, weight, received_at) "
                    "SELECT e, u, i, t, ts, w, %s FROM unnest("
                    "%s::text[], %s::text[], %s::text[], %s::text[], %s::bigint[], "
                    "%s::float8[]) WITH ORDINALITY AS x(e, u, i, t, ts, w, ord) ORDER BY ord "
                    "ON CONFLICT (event_id) DO NOTHING RETURNING seq, event_id",
                    (now, *columns),
                ).fetchall()
                last = _max_seq(conn)
            return last, sorted(stored)

        last, stored = self._run(write)
        accepted = tuple(first[event_id] for _, event_id in stored)
        return AppendResult(
            accepted=len(accepted),
            duplicates=len(batch) - len(accepted),
            accepted_events=accepted,
            last_seq=last,
        )

    def append_items(self, frame: pl.DataFrame) -> int:
        """Store catalogue updates durably, in one transaction; returns how many."""
        now = int(self._clock())
        n = frame.height
        categories = frame["categories"].to_list() if "categories" in frame.columns else [None] * n
        created = frame["created_at"].to_list() if "created_at" in frame.columns else [None] * n
        rows = [
            (item, None if names is None else json.dumps(list(names)), when, now)
            for item, names, when in zip(frame[ITEM_ID].to_list(), categories, created, strict=True)
        ]

        def write(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ITEMS_LOCK,))
                with conn.cursor() as cursor:
                    cursor.executemany(
                        "INSERT INTO catalogue_updates (item_id, categories, created_at, "
                        "received_at) VALUES (%s, %s, %s, %s)",
                        rows,
                    )

        self._run(write)
        return len(rows)

    def publish_bundle(self, bundle: str, model_version: str) -> BundleGeneration:
        """Record ``bundle`` as the one every worker sharing this log serves from now on."""
        now = int(self._clock())

        def write(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_GENERATIONS_LOCK,))
                row = conn.execute(
                    "INSERT INTO bundle_generations (bundle, model_version, published_at) "
                    "VALUES (%s, %s, %s) RETURNING generation",
                    (bundle, model_version, now),
                ).fetchone()
            assert row is not None  # RETURNING of a one-row INSERT
            return int(row[0])

        return BundleGeneration(self._run(write), bundle, model_version)

    # -- reading -------------------------------------------------------------------------------

    def latest_bundle(self) -> BundleGeneration | None:
        row = self._run(
            lambda conn: conn.execute(
                "SELECT generation, bundle, model_version FROM bundle_generations "
                "ORDER BY generation DESC LIMIT 1"
            ).fetchone()
        )
        return None if row is None else BundleGeneration(int(row[0]), row[1], row[2])

    def item_updates(self) -> pl.DataFrame:
        return self.item_updates_since(0)[0]

    def item_updates_since(self, seq: int) -> tuple[pl.DataFrame, int]:
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT seq, item_id, categories, created_at FROM catalogue_updates "
                "WHERE seq > %s ORDER BY seq",
                (seq,),
            ).fetchall()
        )
        return items_frame([tuple(row[1:]) for row in rows]), int(rows[-1][0]) if rows else seq

    def read_since(self, seq: int, limit: int | None = None) -> tuple[list[FeedbackEvent], int]:
        """Up to ``limit`` events with sequence number > ``seq``, oldest first, and the last
        one's number (``seq`` when there is none)."""
        rows = self._select_since(seq, limit)
        events = [FeedbackEvent(*row[1:7]) for row in rows]
        return events, int(rows[-1][0]) if rows else seq

    def iter_all(self, since: int = 0, batch_size: int | None = None) -> Iterator[pl.DataFrame]:
        while True:
            rows = self._select_since(since, batch_size)
            if not rows:
                return
            yield pl.DataFrame(rows, schema=dict(LOG_SCHEMA), orient="row")
            since = int(rows[-1][0])

    def read_users(self, user_ids: Sequence[str], *, until: int | None = None) -> pl.DataFrame:
        bound = self.last_seq() if until is None else until
        users = list(dict.fromkeys(user_ids))
        rows = (
            self._run(
                lambda conn: conn.execute(
                    f"SELECT {_COLUMNS} FROM feedback WHERE user_id = ANY(%s) AND seq <= %s "
                    "ORDER BY seq",
                    (users, bound),
                ).fetchall()
            )
            if users
            else []
        )
        return pl.DataFrame(rows, schema=dict(LOG_SCHEMA), orient="row")

    def to_frame(
        self, since: int | None = None, *, type_weights: Mapping[str, float] | None = None
    ) -> pl.DataFrame:
        frames = list(self.iter_all(since or 0))
        if not frames:
            return empty_interactions()
        log = pl.concat(frames)
        weight = pl.col(WEIGHT)
        if type_weights is not None:
            unknown = sorted(set(log["type"].unique()) - set(type_weights))
            if unknown:
                raise DataError(f"type_weights has no weight for stored type(s) {unknown}")
            weight = pl.col("type").replace_strict(dict(type_weights), return_dtype=pl.Float32)
        return log.select(pl.col(USER_ID), pl.col(ITEM_ID), pl.col(TIMESTAMP), weight.alias(WEIGHT))

    def count(self) -> int:
        return int(self._run(lambda conn: _one(conn, "SELECT count(*) FROM feedback")))

    def last_seq(self) -> int:
        return self._run(_max_seq)

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> PostgresFeedbackLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresFeedbackLog({redacted(self.config.url)!r})"

    # -- internals -----------------------------------------------------------------------------

    def _select_since(self, seq: int, limit: int | None) -> list[tuple[Any, ...]]:
        limit = self.config.read_batch_size if limit is None else limit
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise DataError(f"seq must be an int >= 0, got {seq!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise DataError(f"limit must be an int >= 1, got {limit!r}")
        return self._run(
            lambda conn: conn.execute(
                f"SELECT {_COLUMNS} FROM feedback WHERE seq > %s ORDER BY seq LIMIT %s",
                (seq, limit),
            ).fetchall()
        )

    def _run(self, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        """Run ``work`` on a pooled connection; a lost connection is the database's absence."""
        try:
            with self._connection() as conn:
                return work(conn)
        except psycopg.DataError as exc:  # e.g. a NUL character, which PostgreSQL text refuses
            raise DataError(f"feedback log refused the values: {exc}") from exc
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise FeedbackLogUnavailableError(
                f"feedback database {redacted(self.config.url)} unavailable: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from exc

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        if os.getpid() != self._pid:
            raise RuntimeError(
                f"{self!r} was opened in process {self._pid} and used in {os.getpid()}; "
                "open a feedback log in each process"
            )
        with self._pool_lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            try:
                conn = psycopg.connect(
                    self.config.url,
                    autocommit=True,  # reads need no transaction; writes open one explicitly
                    connect_timeout=self.config.connect_timeout_s,
                    options=f"-c statement_timeout={self.config.statement_timeout_ms}",
                )
            except psycopg.ProgrammingError:
                # libpq's message quotes the whole URL, password included: not chained.
                raise ConfigError(
                    f"feedback database URL {redacted(self.config.url)} is not a valid "
                    "PostgreSQL connection URL"
                ) from None
        try:
            yield conn
        finally:
            with self._pool_lock:
                keep = (
                    not self._closed
                    and not conn.closed
                    and not conn.broken
                    and len(self._idle) < self.config.max_idle_connections
                )
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()


def _create_schema(conn: psycopg.Connection[Any]) -> None:
    # Under a lock: concurrent CREATE ... IF NOT EXISTS of the same table can still collide.
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        for statement in _SCHEMA:
            conn.execute(statement)  # constant SQL, not user input


def _max_seq(conn: psycopg.Connection[Any]) -> int:
    return int(_one(conn, "SELECT coalesce(max(seq), 0) FROM feedback"))


def _one(conn: psycopg.Connection[Any], sql: str) -> Any:
    row = conn.execute(sql).fetchone()  # constant SQL
    assert row is not None  # an aggregate always has one row
    return row[0]
