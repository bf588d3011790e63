"""The durable feedback log: an append-only, idempotent event store on SQLite in WAL mode.

Every feedback event the service acknowledges (``POST /v1/feedback`` answers 202) is first
committed here; the online state, retraining and the drift monitors all read it back from here.

Contract
    * ``append`` is one transaction per call and idempotent on ``event_id``: an id already in the
      log, or repeated within the batch, is stored once (the first copy wins) and reported as a
      duplicate, so a client may safely re-send a batch it got no answer for.
    * Each stored event gets a sequence number ``seq`` (SQLite ``AUTOINCREMENT``): strictly
      increasing in commit order, never reused, possibly with gaps. SQLite admits one writer at a
      time and ``seq`` is assigned while the write lock is held, so a reader that has seen ``seq``
      ``n`` will never later find a committed event with a smaller ``seq``: tailing with
      ``read_since(last_seen)`` misses nothing.
    * The ``weight`` of an event is frozen when it is appended (see ``make_event``); the ``type``
      is kept, so a retrain may re-weight history (``to_frame(type_weights=...)``).

Durability (``FeedbackLogConfig.synchronous``), in WAL mode
    FULL    (default) the WAL is fsynced at every commit: once ``append`` returns, its events
            survive the process being killed (SIGKILL, OOM) *and* an OS crash or power loss.
    NORMAL  the WAL is fsynced only at checkpoints. A commit still survives the process being
            killed (its bytes are in the OS page cache), but the latest commits may roll back
            after an OS crash or power loss. The database is never corrupted in either mode.
            With no fsync per commit, single-event appends are several times faster; batched
            appends gain less (``benchmarks/bench_feedback.py`` measures both).

Concurrency
    Threads: a ``FeedbackLog`` can be shared by the threads of a web server's pool. Each call
    borrows a connection from a small pool, so no connection is ever used by two threads at
    once. WAL lets any number of readers run beside the one writer; writers queue on SQLite's
    write lock.
    Processes: several processes (uvicorn workers) may open the same file, each with its own
    ``FeedbackLog`` (open it after the fork, e.g. in the app's lifespan). SQLite's file locks
    coordinate them; a writer that finds the lock taken waits up to ``busy_timeout_ms`` and is
    then retried ``busy_retries`` times with exponential back-off before ``FeedbackLogBusyError``.
    The lock is not fair: a waiting writer polls it with sleeps of 1 to 100 ms, so a process
    appending in a tight loop can hold others off until their timeout; request traffic, with
    its gaps, interleaves (tests/test_feedback_log.py checks that two processes do).
    WAL needs a local file system (shared memory), not a network share.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal, Protocol, TypeVar

import polars as pl

from data.errors import ConfigError, DataError
from data.schema import ITEM_ID, TIMESTAMP, USER_ID, WEIGHT, empty_interactions

SynchronousMode = Literal["NORMAL", "FULL"]
SYNCHRONOUS_MODES: Final[tuple[str, ...]] = ("NORMAL", "FULL")

DEFAULT_TYPE_WEIGHTS: Final[Mapping[str, float]] = MappingProxyType(
    {
        # Exposure without engagement: kept so that ranking can use it as a negative and monitors
        # can compute CTR, but it adds nothing to the strength of a positive.
        "impression": 0.0,
        # The canonical positive: 1.0 is what every loader gives a plain interaction.
        "click": 1.0,
        # Stronger intent, stronger implicit signal (the confidence weighting of Hu et al.,
        # ICDM 2008). 2 and 4 are a common starting point, not a law: tune them per product.
        "add_to_cart": 2.0,
        "purchase": 4.0,
    }
)

# Stored in PRAGMA user_version. 2 added the catalogue_updates table; a version-1 log is
# upgraded in place when opened (the table is created, nothing else changes).
SCHEMA_VERSION: Final[int] = 2

# One row per accepted event. ``seq`` is AUTOINCREMENT (not a plain rowid) so that a number is
# never handed out twice, even if old events are one day pruned: tailing readers rely on it.
_CREATE_TABLE: Final[str] = """
CREATE TABLE feedback (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT    NOT NULL UNIQUE,
    user_id     TEXT    NOT NULL,
    item_id     TEXT    NOT NULL,
    type        TEXT    NOT NULL,
    timestamp   INTEGER NOT NULL,  -- when the event happened, seconds UTC (client's clock)
    weight      REAL    NOT NULL,
    received_at INTEGER NOT NULL   -- when the log accepted it, seconds UTC (server's clock)
)
"""
# One row per item update the service acknowledged (POST /admin/items): replayed at start-up and
# reload, so items served live survive until a retrain includes them. NULL = not given.
_CREATE_CATALOGUE_TABLE: Final[str] = """
CREATE TABLE IF NOT EXISTS catalogue_updates (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id     TEXT    NOT NULL,
    categories  TEXT,              -- a JSON list of category names
    created_at  INTEGER,           -- release time, seconds UTC
    received_at INTEGER NOT NULL
)
"""
# One user's events in seq order without a scan of the log: what rebuilds the online state of a
# user it evicted (pipeline/online_state.py). Not part of the schema version: created by any
# version of this code that opens the log, and readers never depend on it being there.
_CREATE_USER_INDEX: Final[str] = (
    "CREATE INDEX IF NOT EXISTS feedback_by_user ON feedback (user_id, seq)"
)
# The bundle every worker and replica sharing this log serves (POST /admin/reload appends a row;
# each worker follows the newest: pipeline/log_follower.py). Not part of the schema version, like
# the user index: created by any version of this code that opens the log.
_CREATE_GENERATIONS_TABLE: Final[str] = """
CREATE TABLE IF NOT EXISTS bundle_generations (
    generation    INTEGER PRIMARY KEY AUTOINCREMENT,
    bundle        TEXT    NOT NULL,  -- the bundle directory, as every replica sees it
    model_version TEXT    NOT NULL,
    published_at  INTEGER NOT NULL   -- seconds UTC (server's clock)
)
"""
_LOG_COLUMNS: Final[tuple[str, ...]] = (
    "seq",
    "event_id",
    "user_id",
    "item_id",
    "type",
    "timestamp",
    "weight",
    "received_at",
)
_INSERT: Final[str] = (
    f"INSERT OR IGNORE INTO feedback ({', '.join(_LOG_COLUMNS[1:])}) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_SINCE: Final[str] = (
    f"SELECT {', '.join(_LOG_COLUMNS)} FROM feedback WHERE seq > ? ORDER BY seq LIMIT ?"
)
# Bound parameters per statement: SQLite builds before 3.32 allow at most 999.
_MAX_SQL_PARAMETERS: Final[int] = 900

# The frames ``iter_all`` yields: the stored columns, typed like the interaction schema.
LOG_SCHEMA: Final[Mapping[str, pl.DataType]] = MappingProxyType(
    {
        "seq": pl.Int64(),
        "event_id": pl.String(),
        USER_ID: pl.String(),
        ITEM_ID: pl.String(),
        "type": pl.String(),
        TIMESTAMP: pl.Int64(),
        WEIGHT: pl.Float32(),
        "received_at": pl.Int64(),
    }
)

_T = TypeVar("_T")


class EventRules(Protocol):
    """What an event is checked against (``check_events``): every backend's config has it."""

    @property
    def type_weights(self) -> Mapping[str, float]: ...
    @property
    def max_events_per_append(self) -> int: ...
    @property
    def max_id_length(self) -> int: ...
    @property
    def max_future_skew_s(self) -> int: ...


class FeedbackLogBusyError(RuntimeError):
    """The log stayed locked by other writers through every retry (overload: answer 503)."""


@dataclass(frozen=True)
class FeedbackLogConfig:
    """Where the log lives and how hard it tries to keep what it acknowledged.

    ``type_weights`` is also the list of allowed event types: an unknown type is refused.
    """

    path: str | os.PathLike[str]
    # FULL: an acknowledged event survives power loss; NORMAL: only a process crash (see module).
    synchronous: SynchronousMode = "FULL"
    # How long a writer waits for another writer's lock before SQLite reports SQLITE_BUSY. A FULL
    # commit takes milliseconds, so 5 s means deep overload, not ordinary contention.
    busy_timeout_ms: int = 5_000
    # Extra attempts after a SQLITE_BUSY that outlived busy_timeout, sleeping
    # busy_backoff_s * 2**attempt between them; then FeedbackLogBusyError.
    busy_retries: int = 3
    busy_backoff_s: float = 0.05
    type_weights: Mapping[str, float] = field(default_factory=lambda: DEFAULT_TYPE_WEIGHTS)
    # Bounds one transaction (and the memory of one request); the HTTP layer's 413 is tighter.
    max_events_per_append: int = 10_000
    # Ids are keys, not documents; a longer one is a client bug, not data worth storing.
    max_id_length: int = 256
    # Client clocks drift; an event more than a day in the future is a bug (e.g. milliseconds
    # sent as seconds) and would poison recency features, so it is refused.
    max_future_skew_s: int = 86_400
    # Connections kept open for reuse; more are opened under load and closed when returned.
    max_idle_connections: int = 8
    # Rows per read from SQLite (read_since's default limit, iter_all's frame height).
    read_batch_size: int = 65_536

    def __post_init__(self) -> None:
        if str(self.path) in ("", ":memory:") or str(self.path).startswith("file:"):
            raise ConfigError(
                f"feedback log path must be a file path, got {str(self.path)!r} (an in-memory "
                "database would be private to one connection and lost on exit)"
            )
        mode = str(self.synchronous).upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ConfigError(
                f"synchronous must be one of {list(SYNCHRONOUS_MODES)}, got {self.synchronous!r}"
            )
        object.__setattr__(self, "synchronous", mode)
        minimums: dict[str, tuple[float, int]] = {
            "busy_timeout_ms": (self.busy_timeout_ms, 1),
            "busy_retries": (self.busy_retries, 0),
            "busy_backoff_s": (self.busy_backoff_s, 0),
            "max_events_per_append": (self.max_events_per_append, 1),
            "max_id_length": (self.max_id_length, 1),
            "max_future_skew_s": (self.max_future_skew_s, 0),
            "max_idle_connections": (self.max_idle_connections, 1),
            "read_batch_size": (self.read_batch_size, 1),
        }
        for name, (value, minimum) in minimums.items():
            if value < minimum:
                raise ConfigError(f"{name} must be >= {minimum}, got {value}")
        if not self.type_weights:
            raise ConfigError("type_weights is empty: no event type would be accepted")
        bad = {
            k: v
            for k, v in self.type_weights.items()
            if not (isinstance(k, str) and k.strip()) or not math.isfinite(v)
        }
        if bad:
            raise ConfigError(f"type_weights needs non-empty names and finite weights, got {bad}")
        # A private read-only copy: the caller's dict may change later, this config must not.
        object.__setattr__(self, "type_weights", MappingProxyType(dict(self.type_weights)))


@dataclass(frozen=True, slots=True)
class FeedbackEvent:
    """One feedback event, as stored.

    ``timestamp``: seconds since the Unix epoch, UTC. ``weight``: the strength of the implicit
    signal, usually derived from ``type`` by ``FeedbackLog.make_event``.
    """

    event_id: str
    user_id: str
    item_id: str
    type: str
    timestamp: int
    weight: float


@dataclass(frozen=True)
class BundleGeneration:
    """One published bundle: every worker sharing the log serves the newest generation."""

    generation: int
    bundle: str
    model_version: str


@dataclass(frozen=True)
class AppendResult:
    """What one ``append`` did.

    ``accepted_events``: the newly stored events in ``seq`` order (first copy of each id).
    ``last_seq``: the log's last sequence number when the transaction committed.
    """

    accepted: int
    duplicates: int
    accepted_events: tuple[FeedbackEvent, ...]
    last_seq: int


class FeedbackLog:
    """An append-only, idempotent, durable event log in one SQLite file (see the module doc).

    ``clock`` returns the current time in seconds (injected for tests): it stamps ``received_at``,
    fills a missing event time and bounds how far in the future an event may be.
    """

    def __init__(self, config: FeedbackLogConfig, *, clock: Callable[[], float] = time.time):
        self.config = config
        self.path = Path(config.path)
        self._clock = clock
        self._pid = os.getpid()
        self._idle: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._run(self._initialise)
        except sqlite3.DatabaseError as exc:  # e.g. a corrupt file (busy became our own error)
            self.close()
            raise DataError(f"{self.path}: not a usable feedback log ({exc})") from exc
        except BaseException:
            self.close()
            raise

    # -- writing -------------------------------------------------------------------------------

    def make_event(
        self,
        event_id: str,
        user_id: str,
        item_id: str,
        type: str,
        timestamp: int | None = None,
    ) -> FeedbackEvent:
        """An event whose weight comes from ``config.type_weights`` (timestamp defaults to now).

        Raises ``DataError`` for a type the config does not know; everything else is checked by
        ``append``.
        """
        weights = self.config.type_weights
        if type not in weights:
            raise DataError(
                f"event {event_id!r}: unknown event type {type!r}; allowed: {sorted(weights)}"
            )
        when = int(self._clock()) if timestamp is None else timestamp
        return FeedbackEvent(event_id, user_id, item_id, type, when, weights[type])

    def append(self, events: Iterable[FeedbackEvent]) -> AppendResult:
        """Store ``events`` in one transaction, skipping event ids already stored.

        Returns once the transaction is committed with the configured durability. Raises
        ``DataError`` (nothing stored) if any event is invalid, naming the first bad one, and
        ``FeedbackLogBusyError`` if the write lock could not be had.
        """
        batch = list(events)
        now = int(self._clock())
        check_events(batch, self.config, now)
        if not batch:
            return AppendResult(0, 0, (), self.last_seq())
        rows = [
            (e.event_id, e.user_id, e.item_id, e.type, e.timestamp, float(e.weight), now)
            for e in batch
        ]

        def write(conn: sqlite3.Connection) -> tuple[int, list[tuple[int, str]]]:
            with _write_transaction(conn):
                before = _max_seq(conn)
                conn.executemany(_INSERT, rows)
                # We hold the write lock, so every seq above `before` is one of ours; reading
                # them back tells which events were new without a per-row round trip.
                stored = conn.execute(
                    "SELECT seq, event_id FROM feedback WHERE seq > ? ORDER BY seq", (before,)
                ).fetchall()
            return before, stored

        before, stored = self._run(write)
        first: dict[str, FeedbackEvent] = {}
        for event in batch:
            first.setdefault(event.event_id, event)  # INSERT OR IGNORE keeps the first copy
        accepted = tuple(first[event_id] for _, event_id in stored)
        return AppendResult(
            accepted=len(accepted),
            duplicates=len(batch) - len(accepted),
            accepted_events=accepted,
            last_seq=stored[-1][0] if stored else before,
        )

    def append_items(self, frame: pl.DataFrame) -> int:
        """Store catalogue updates durably, in one transaction; returns how many.

        ``frame``: ``item_id`` and, optionally, ``categories`` (list of str) and ``created_at``
        (int); a missing column or a null is stored as "not given". Validating the values is the
        caller's job (``pipeline/catalog_updates.py``), which runs before this.
        """
        now = int(self._clock())
        categories = (
            frame["categories"].to_list() if "categories" in frame.columns else [None] * len(frame)
        )
        created = (
            frame["created_at"].to_list() if "created_at" in frame.columns else [None] * len(frame)
        )
        rows = [
            (item, None if names is None else json.dumps(list(names)), when, now)
            for item, names, when in zip(frame[ITEM_ID].to_list(), categories, created, strict=True)
        ]

        def write(conn: sqlite3.Connection) -> None:
            with _write_transaction(conn):
                conn.executemany(
                    "INSERT INTO catalogue_updates (item_id, categories, created_at, received_at)"
                    " VALUES (?, ?, ?, ?)",
                    rows,
                )

        self._run(write)
        return len(rows)

    def item_updates(self) -> pl.DataFrame:
        """Every stored catalogue update, oldest first: ``item_id``, ``categories`` (list of
        str or null) and ``created_at`` (or null)."""
        return self.item_updates_since(0)[0]

    def item_updates_since(self, seq: int) -> tuple[pl.DataFrame, int]:
        """The catalogue updates with sequence number > ``seq`` (``item_updates``' frame) and
        the last one's sequence number (``seq`` when there is none): how a worker follows the
        updates other workers stored. One writer at a time (the write lock), so, as for events,
        a reader never later finds a smaller number committed."""
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT seq, item_id, categories, created_at FROM catalogue_updates "
                "WHERE seq > ? ORDER BY seq",
                (seq,),
            ).fetchall()
        )
        return items_frame([row[1:] for row in rows]), rows[-1][0] if rows else seq

    def publish_bundle(self, bundle: str, model_version: str) -> BundleGeneration:
        """Record ``bundle`` as the one every worker sharing this log serves from now on."""
        now = int(self._clock())

        def write(conn: sqlite3.Connection) -> int:
            with _write_transaction(conn):
                cursor = conn.execute(
                    "INSERT INTO bundle_generations (bundle, model_version, published_at) "
                    "VALUES (?, ?, ?)",
                    (bundle, model_version, now),
                )
                return int(cursor.lastrowid or 0)

        return BundleGeneration(self._run(write), bundle, model_version)

    def latest_bundle(self) -> BundleGeneration | None:
        """The newest published bundle, None before any."""
        row = self._run(
            lambda conn: conn.execute(
                "SELECT generation, bundle, model_version FROM bundle_generations "
                "ORDER BY generation DESC LIMIT 1"
            ).fetchone()
        )
        return None if row is None else BundleGeneration(int(row[0]), row[1], row[2])

    # -- reading -------------------------------------------------------------------------------

    def read_since(self, seq: int, limit: int | None = None) -> tuple[list[FeedbackEvent], int]:
        """Up to ``limit`` events with sequence number > ``seq``, oldest first.

        Returns ``(events, last_seq)``: ``last_seq`` is the sequence number of the last event
        returned, or ``seq`` itself when there is none, so ``read_since(last_seq)`` continues
        exactly where this call stopped. ``limit`` defaults to ``config.read_batch_size``.
        """
        rows = self._select_since(seq, limit)
        events = [FeedbackEvent(*row[1:7]) for row in rows]
        return events, rows[-1][0] if rows else seq

    def iter_all(self, since: int = 0, batch_size: int | None = None) -> Iterator[pl.DataFrame]:
        """The log after ``since`` as frames of up to ``batch_size`` rows (``LOG_SCHEMA``), by seq.

        Each frame is its own short read, so a long scan never holds back WAL checkpoints;
        events committed during the scan may therefore appear in its later frames.
        """
        while True:
            rows = self._select_since(since, batch_size)
            if not rows:
                return
            yield pl.DataFrame(rows, schema=dict(LOG_SCHEMA), orient="row")
            since = rows[-1][0]

    def read_users(self, user_ids: Sequence[str], *, until: int | None = None) -> pl.DataFrame:
        """Every stored event of ``user_ids`` with sequence number <= ``until`` (all when None),
        in seq order, as one ``LOG_SCHEMA`` frame.

        An index on (user_id, seq) makes this a lookup per user, not a scan of the log. With
        ``until`` = a ``last_seq()`` read before, the answer is exactly the users' events
        committed up to that point: a later commit has a larger seq.
        """
        bound = self.last_seq() if until is None else until
        if isinstance(bound, bool) or not isinstance(bound, int):
            raise DataError(f"until must be an int, got {until!r}")
        users = list(dict.fromkeys(user_ids))
        chunks = [
            users[start : start + _MAX_SQL_PARAMETERS]
            for start in range(0, len(users), _MAX_SQL_PARAMETERS)
        ]

        def read(conn: sqlite3.Connection) -> list[tuple]:
            rows: list[tuple] = []
            for chunk in chunks:
                marks = ", ".join("?" * len(chunk))
                rows += conn.execute(
                    f"SELECT {', '.join(_LOG_COLUMNS)} FROM feedback "
                    f"WHERE user_id IN ({marks}) AND seq <= ? ORDER BY seq",
                    (*chunk, bound),
                ).fetchall()
            return rows

        rows = self._run(read) if chunks else []
        frame = pl.DataFrame(rows, schema=dict(LOG_SCHEMA), orient="row")
        return frame.sort("seq") if len(chunks) > 1 else frame

    def to_frame(
        self, since: int | None = None, *, type_weights: Mapping[str, float] | None = None
    ) -> pl.DataFrame:
        """The events after ``since`` (all by default) in the canonical interaction schema.

        Rows are in ``seq`` order. Impressions are kept (weight 0 by default): filter
        ``weight > 0`` for positives. ``type_weights`` re-derives every weight from the stored
        type instead of using the weight frozen at append time.
        """
        frames = list(self.iter_all(since or 0))
        if not frames:
            return empty_interactions()
        log = pl.concat(frames)
        weight = pl.col(WEIGHT)
        if type_weights is not None:
            unknown = sorted(set(log["type"].unique()) - set(type_weights))
            if unknown:
                raise DataError(
                    f"{self.path}: type_weights has no weight for stored type(s) {unknown}"
                )
            weight = pl.col("type").replace_strict(dict(type_weights), return_dtype=pl.Float32)
        # LOG_SCHEMA already types these columns as INTERACTION_SCHEMA does: no cast needed.
        return log.select(pl.col(USER_ID), pl.col(ITEM_ID), pl.col(TIMESTAMP), weight.alias(WEIGHT))

    def count(self) -> int:
        """Number of events stored."""
        return int(
            self._run(lambda conn: conn.execute("SELECT count(*) FROM feedback").fetchone()[0])
        )

    def last_seq(self) -> int:
        """The sequence number of the newest event, 0 for an empty log."""
        return self._run(_max_seq)

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the pooled connections; connections in use close when their call returns."""
        with self._pool_lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> FeedbackLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeedbackLog({str(self.path)!r}, synchronous={self.config.synchronous})"

    # -- internals -----------------------------------------------------------------------------

    def _initialise(self, conn: sqlite3.Connection) -> None:
        """Switch the file to WAL and create the table, or check an existing log's version."""
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise DataError(f"{self.path}: cannot use WAL mode (SQLite kept {mode!r})")
        with _write_transaction(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                try:
                    conn.execute(_CREATE_TABLE)
                except sqlite3.OperationalError as exc:  # a "feedback" table of another schema
                    raise DataError(f"{self.path}: not a feedback log ({exc})") from exc
            if version in (0, 1):
                conn.execute(_CREATE_CATALOGUE_TABLE)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise DataError(
                    f"{self.path}: feedback log schema version {version}, this code reads "
                    f"version {SCHEMA_VERSION}"
                )
            # Once per log: a log written by older code is indexed here, under the write lock
            # (~1.6 s per million events on the 2-core reference machine; other processes that
            # open the log meanwhile wait for it, up to busy_timeout_ms per attempt).
            conn.execute(_CREATE_USER_INDEX)
            conn.execute(_CREATE_GENERATIONS_TABLE)

    def _select_since(self, seq: int, limit: int | None) -> list[tuple]:
        limit = self.config.read_batch_size if limit is None else limit
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise DataError(f"seq must be an int >= 0, got {seq!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise DataError(f"limit must be an int >= 1, got {limit!r}")
        return self._run(lambda conn: conn.execute(_SELECT_SINCE, (seq, limit)).fetchall())

    def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``work`` on a pooled connection, retrying while another writer holds the lock."""
        retries = self.config.busy_retries
        for attempt in range(retries + 1):
            try:
                with self._connection() as conn:
                    return work(conn)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                if attempt == retries:
                    raise FeedbackLogBusyError(
                        f"{self.path}: still locked after {retries + 1} attempts of "
                        f"{self.config.busy_timeout_ms} ms each ({exc})"
                    ) from exc
            time.sleep(self.config.busy_backoff_s * 2**attempt)
        raise AssertionError("unreachable")  # the loop returns or raises

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """Borrow a pooled connection (one thread at a time uses it), opening one if none idle."""
        if os.getpid() != self._pid:
            # SQLite forbids carrying a connection across fork(): its locks belong to the parent.
            raise RuntimeError(
                f"{self!r} was opened in process {self._pid} and used in {os.getpid()}; "
                "open a FeedbackLog in each process"
            )
        with self._pool_lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        try:
            yield conn
        finally:
            with self._pool_lock:
                keep = (
                    not self._closed
                    and not conn.in_transaction
                    and len(self._idle) < self.config.max_idle_connections
                )
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.config.busy_timeout_ms / 1000,  # sets SQLite's busy_timeout
                isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
                check_same_thread=False,  # the pool hands it to one thread at a time
            )
            # Per connection, not stored in the file: every pooled connection must set it.
            conn.execute(f"PRAGMA synchronous = {self.config.synchronous}")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise
            raise DataError(f"cannot open feedback log {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise DataError(f"{self.path}: not a feedback log ({exc})") from exc
        return conn


@contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the write lock up front.

    ``BEGIN IMMEDIATE`` waits (busy_timeout) for the lock at the start. A deferred transaction
    would take it at its first write and, in WAL mode, fail at once with SQLITE_BUSY_SNAPSHOT
    if another writer committed in between, without waiting.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def items_frame(rows: Sequence[tuple[str, str | None, int | None]]) -> pl.DataFrame:
    """Stored catalogue updates (``item_id``, JSON ``categories`` or None, ``created_at`` or
    None) as the frame ``item_updates`` returns."""
    return pl.DataFrame(
        [(item, None if names is None else json.loads(names), when) for item, names, when in rows],
        schema={ITEM_ID: pl.String, "categories": pl.List(pl.String), "created_at": pl.Int64},
        orient="row",
    )


def _max_seq(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM feedback").fetchone()[0])


def _is_busy(exc: sqlite3.Error) -> bool:
    # Extended codes (e.g. SQLITE_BUSY_SNAPSHOT) keep the primary code in the low byte.
    return (exc.sqlite_errorcode & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def check_events(events: Sequence[FeedbackEvent], config: EventRules, now: int) -> None:
    """Raise ``DataError`` naming the first invalid event (index, id, rule and value).

    A Python loop, on purpose: a batch is bounded by ``max_events_per_append`` and checking an
    event costs about a microsecond, far below the commit it precedes.
    """
    if len(events) > config.max_events_per_append:
        raise DataError(
            f"{len(events)} feedback events in one append; at most "
            f"{config.max_events_per_append} (max_events_per_append) are allowed"
        )
    latest = now + config.max_future_skew_s
    for index, event in enumerate(events):
        problem = _problem(event, config, latest)
        if problem is not None:
            event_id = getattr(event, "event_id", None)
            raise DataError(f"feedback event {index} (event_id={event_id!r}): {problem}")


def _problem(event: object, config: EventRules, latest: int) -> str | None:
    """What is wrong with one event, or None."""
    if not isinstance(event, FeedbackEvent):
        return f"expected a FeedbackEvent, got {type(event).__name__}"
    for name in ("event_id", "user_id", "item_id"):
        value = getattr(event, name)
        if not isinstance(value, str) or not value.strip():
            return f"{name} must be a non-empty string, got {value!r}"
        if len(value) > config.max_id_length:
            return f"{name} has {len(value)} characters; at most {config.max_id_length} allowed"
    if event.type not in config.type_weights:
        return f"unknown event type {event.type!r}; allowed: {sorted(config.type_weights)}"
    ts = event.timestamp
    if isinstance(ts, bool) or not isinstance(ts, int):
        return f"timestamp must be an int (seconds UTC), got {type(ts).__name__} {ts!r}"
    if ts < 0:
        return f"timestamp {ts} is negative (seconds since 1970-01-01 UTC expected)"
    if ts > latest:
        return (
            f"timestamp {ts} is more than {config.max_future_skew_s} s after the server's clock "
            f"({latest - config.max_future_skew_s}); milliseconds sent as seconds?"
        )
    weight = event.weight
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        return f"weight must be a finite number, got {weight!r}"
    return None
