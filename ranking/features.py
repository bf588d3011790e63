"""Ranking features: point-in-time tables and the ONE assembly function for training and serving.

Two parts, both used unchanged by the training-set builder and by the serving pipeline:

* :class:`FeatureStore` holds the slowly changing tables, computed from the events of a log
  strictly before ``as_of``: per user, activity counts and category affinity; per item,
  popularity over several windows, trend, first/last engagement. Training fits it with
  ``as_of = cut`` (the start of the label window), serving refits it at the end of the latest
  log, with the same code.
* :func:`assemble` turns (store, retrieval stage, users, merged candidates, request time) into
  a ``(n, m, F)`` feature tensor: user features broadcast over candidates, item features
  gathered, user-item features (model scores, co-visitation, category match, per-source rank /
  presence / score from the merger) and request context.

Everything that depends on the user's *recent* behaviour (recency, session length, recent
category mix, co-visitation with the recent items, the sources' own scores) is read from the
:class:`~retrieval.base.UserBatch`, the online state, never from the store: at serving time the
batch carries feedback that arrived after the store was built, and at training time the batch is
the state at the cut. Training rows and served rows therefore go through identical code
(a test asserts that the same user at the same time gets bit-identical features both ways).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self, runtime_checkable

import numpy as np
import numpy.typing as npt
import polars as pl
import scipy.sparse as sp

from data.catalog import UNKNOWN_TIME, ItemCatalog
from data.configuration import from_mapping, to_mapping
from data.errors import BundleError, ConfigError, DataError, NotFittedError
from data.interactions import Interactions
from data.validation import fraction, positive_float, positive_int
from retrieval.base import PAD_ITEM, UserBatch
from retrieval.covisit import CoVisitationSource
from retrieval.merge import MergedCandidates
from retrieval.stage import RetrievalStage
from retrieval.topk import concatenated_ranges

SECONDS_PER_DAY = 86_400
SECONDS_PER_HOUR = 3_600
# 1970-01-01 was a Thursday: (days since epoch + 3) % 7 numbers Monday as 0.
_EPOCH_WEEKDAY_OFFSET = 3

STORE_FILE = "store.json"
USERS_TABLE = "users.parquet"
ITEMS_TABLE = "items.parquet"
CATEGORIES_FILE = "categories.npz"
STORE_FORMAT_VERSION = 1

# The source whose co-visitation matrix scores candidates.
COVISIT_SOURCE = "covisit"

# Features of the online history (UserBatch), computed at request time; see _online_user_features.
_ONLINE_USER_NAMES = (
    "user_history_length",
    "user_hours_since_last_event",
    "user_session_length",
    "user_recent_events",
)

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class FeatureConfig:
    """What the feature store and the assembly compute.

    popularity_windows_days: item engagement counts over the last ``w`` days before ``as_of``,
        one feature per window. (1, 7, 30): today's buzz, this week, this month.
    activity_windows_days: user event counts over the last ``w`` days before ``as_of`` (7, 30:
        a weekly and a monthly habit).
    trend_smoothing: pseudo-events added to both sides of the trend ratio (below), so an item
        with two clicks is not "trending" by a factor of ten; 1 is the usual add-one prior.
        trend = (count in the shortest window + s) / (expected count there at the longest
        window's rate + s): 1 for a steady item, > 1 for a rising one.
    session_gap_seconds: two consecutive events at most this far apart belong to one session
        (30 minutes, the web-analytics convention).
    recent_window_seconds: "events in the last day" of the online history (counted from the
        UserBatch, so capped at its history length H).
    missing_rank: value of a source's rank feature when that source did not retrieve the
        candidate; larger than any real rank (lists hold at most a few thousand items), so a
        tree splits "retrieved high / low / not at all" with one threshold.
    model_scores: sources whose ``score(users, item_idx)`` scores *every* candidate (a
        ``<name>_score`` feature each; NaN when the stage lacks the source). The merged
        provenance already carries a source's score for the candidates it retrieved; this adds
        it for the others. Each costs that source's user encoding per request (two-tower: a
        tower pass; ALS: a fold-in for users with new events), so latency-bound deployments
        may drop one.
    covisit_history_decay: weight ``decay ** p`` of the ``p``-th most recent history item in the
        co-visitation score; 1.0 (default) is the plain sum of neighbour weights.
    normalized_scores: also give each model score standardised within the user's retrieved
        candidates (``<name>_score_z``: minus the row's mean, over its standard deviation). Raw
        scores live on scales that differ from user to user (an ALS user vector's norm, an EASE
        row's history length); a tree splits one threshold for all users, so it needs the
        per-user scale to compare two sources' opinions, which is what a score blend does.
    """

    popularity_windows_days: tuple[int, ...] = (1, 7, 30)
    activity_windows_days: tuple[int, ...] = (7, 30)
    trend_smoothing: float = 1.0
    session_gap_seconds: int = 1_800
    recent_window_seconds: int = SECONDS_PER_DAY
    missing_rank: float = 10_000.0
    model_scores: tuple[str, ...] = ("two_tower", "als", "item_item", "item_knn")
    covisit_history_decay: float = 1.0
    normalized_scores: bool = True

    def __post_init__(self) -> None:
        for name in ("popularity_windows_days", "activity_windows_days"):
            windows = tuple(int(w) for w in getattr(self, name))
            if not windows or any(w < 1 for w in windows) or list(windows) != sorted(set(windows)):
                raise ConfigError(
                    f"FeatureConfig.{name} must be increasing positive days, got "
                    f"{getattr(self, name)!r}"
                )
            object.__setattr__(self, name, windows)
        for name in ("session_gap_seconds", "recent_window_seconds"):
            positive_int(getattr(self, name), f"FeatureConfig.{name}")
        for name in ("trend_smoothing", "missing_rank"):
            positive_float(getattr(self, name), f"FeatureConfig.{name}", finite=False)
        object.__setattr__(self, "model_scores", tuple(str(n) for n in self.model_scores))
        if len(set(self.model_scores)) != len(self.model_scores):
            raise ConfigError(
                f"FeatureConfig.model_scores lists a source twice: {self.model_scores!r}"
            )
        fraction(self.covisit_history_decay, "FeatureConfig.covisit_history_decay", low_open=True)


@dataclass(frozen=True)
class FeatureMatrix:
    """Features of ``m`` candidates for each of ``n`` users.

    values: (n, m, F) float32; NaN is "missing" (unknown user / item, source absent) and is
        NaN at padded candidates too.
    names:  (F,) feature names, in the order of the last axis.
    valid:  (n, m) bool, False where the candidate slot is padding.
    """

    values: FloatArray
    names: tuple[str, ...]
    valid: npt.NDArray[np.bool_]

    def __post_init__(self) -> None:
        if self.values.ndim != 3 or self.values.shape[:2] != self.valid.shape:
            raise DataError(
                f"feature values {self.values.shape} do not match valid mask {self.valid.shape}"
            )
        if self.values.shape[2] != len(self.names):
            raise DataError(f"{self.values.shape[2]} feature columns but {len(self.names)} names")

    def rows(self) -> FloatArray:
        """(n_valid, F) float32: the valid candidates' rows, users in order, candidates in order."""
        return self.values[self.valid]


@runtime_checkable
class ScoringSource(Protocol):
    """A candidate source that can score any item for a user (two-tower, ALS)."""

    def score(self, users: UserBatch, item_idx: npt.ArrayLike) -> FloatArray: ...


# ------------------------------------------------------------------------------------- store
class FeatureStore:
    """Point-in-time user and item tables (see the module docstring).

    Learned state (after :meth:`fit`):
        as_of_:          int seconds UTC; only events strictly before it were read.
        user_table_:     {name: (n_users,) float32} activity features.
        item_table_:     {name: (n_items,) float32} popularity features.
        user_affinity_:  (n_users, n_categories) float32 CSR, each user's share of past events
                         per category (rows sum to 1, or are empty).
        item_created_at_: (n_items,) int64 release time (``UNKNOWN_TIME`` if unknown).
        item_categories_: (n_items, K) int32 category indices of each item, padded with 0 ...
        item_category_weights_: (n_items, K) float32 ... and 1/(number of categories), 0 at
                         padding: a user-category value averaged over the item's categories
                         is one gather and one sum.
    """

    as_of_: int
    user_table_: dict[str, FloatArray]
    item_table_: dict[str, FloatArray]
    user_affinity_: sp.csr_matrix
    item_created_at_: npt.NDArray[np.int64]
    item_categories_: npt.NDArray[np.int32]
    item_category_weights_: FloatArray

    def __init__(self, config: FeatureConfig | None = None) -> None:
        self.config = config if config is not None else FeatureConfig()
        # Per-user category mass behind user_affinity_ (None: a bundle saved before it existed).
        self.user_affinity_mass_: FloatArray | None = None

    @property
    def n_users(self) -> int:
        return int(self.user_affinity_.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_created_at_.shape[0])

    @property
    def n_categories(self) -> int:
        return int(self.user_affinity_.shape[1])

    def fit(self, log: Interactions, catalog: ItemCatalog, as_of: int) -> Self:
        """Build the tables from the events of ``log`` with ``timestamp < as_of``.

        ``catalog`` must be aligned with ``log.items`` (same item indices); the user tables are
        indexed by ``log.users``, which must be the map of the ``UserBatch.user_idx`` served
        (the bundle's user map). Events at or after ``as_of`` are never read: fitting on a log
        that also holds the label window gives the same tables as fitting on the history alone.
        """
        if catalog.n_items != log.n_items:
            raise DataError(
                f"catalog has {catalog.n_items} items but the log's item map has {log.n_items}"
            )
        events = log.before(int(as_of))
        self.as_of_ = int(as_of)
        self.user_table_ = _user_table(events, self.as_of_, self.config)
        self.item_table_ = _item_table(events, self.as_of_, self.config)
        self.item_categories_, self.item_category_weights_ = _padded_categories(catalog)
        self.item_created_at_ = catalog.created_at.astype(np.int64, copy=True)
        counts = sp.csr_matrix(
            (np.ones(len(events), np.float32), (events.user_idx, events.item_idx)),
            shape=(log.n_users, log.n_items),
        )
        per_category = (counts @ catalog.categories).tocsr().astype(np.float32)
        self.user_affinity_ = _row_normalised(per_category)
        self.user_affinity_mass_ = np.asarray(per_category.sum(axis=1), np.float32).ravel()
        return self

    # ---------------------------------------------------------------------------- lookups
    def user_rows(self, user_idx: npt.NDArray[np.int32]) -> dict[str, FloatArray]:
        """{name: (n,) float32} store features of ``user_idx`` (n,); unknown users get 0 / NaN."""
        self._check_fitted()
        known = (user_idx >= 0) & (user_idx < self.n_users)
        rows = np.where(known, user_idx, 0)
        return {
            name: np.where(known, column[rows], _USER_DEFAULTS.get(name, 0.0)).astype(np.float32)
            for name, column in self.user_table_.items()
        }

    def item_rows(self, item_idx: npt.NDArray[np.int32]) -> dict[str, FloatArray]:
        """{name: item_idx.shape float32} store features; padding / unknown items get 0 / NaN."""
        self._check_fitted()
        known = (item_idx >= 0) & (item_idx < self.n_items)
        rows = np.where(known, item_idx, 0)
        return {
            name: np.where(known, column[rows], _ITEM_DEFAULTS.get(name, 0.0)).astype(np.float32)
            for name, column in self.item_table_.items()
        }

    def affinity(self, user_idx: npt.NDArray[np.int32]) -> FloatArray:
        """(n, n_categories) float32 dense category shares of ``user_idx``; 0 for unknown users."""
        self._check_fitted()
        known = (user_idx >= 0) & (user_idx < self.n_users)
        affinity = self.user_affinity_
        rows = np.where(known, user_idx, 0)
        starts = affinity.indptr[rows]
        lengths = np.where(known, affinity.indptr[rows + 1] - starts, 0)
        # Gather the CSR rows by hand: scipy's row slicing costs more than the data for a request.
        entries = concatenated_ranges(starts, lengths)
        out = np.zeros((user_idx.shape[0], self.n_categories), dtype=np.float32)
        out[np.repeat(np.arange(user_idx.shape[0]), lengths), affinity.indices[entries]] = (
            affinity.data[entries]
        )
        return out

    def current_affinity(self, users: UserBatch) -> FloatArray:
        """(n, n_categories) float32 category shares over the store's events *and* the users'
        recent events at or after ``as_of_``: the affinity as of the request, not the store.

        The store counts events before ``as_of_`` only; a served user who has acted since (the
        online state's news) would otherwise be ranked on the taste they had when the bundle was
        built. Training rows are built from events before ``as_of_``, so they get exactly
        :meth:`affinity`: the feature means the same in training and at serving. Only the news
        still in the recent history (the last ``history_length`` events) is counted. Stores
        loaded from bundles without the per-user category mass keep :meth:`affinity`.
        """
        base = self.affinity(users.user_idx)
        items, times = users.recent_items, users.recent_times
        news = (times >= self.as_of_) & (items >= 0) & (items < self.n_items)
        if self.user_affinity_mass_ is None or self.n_categories == 0 or not news.any():
            return base
        known = (users.user_idx >= 0) & (users.user_idx < self.n_users)
        before = np.where(known, self.user_affinity_mass_[np.where(known, users.user_idx, 0)], 0)
        # The store's mass counts each of an event's categories once: the same here.
        rows, slots = np.nonzero(news)
        events = items[rows, slots]
        has = self.item_category_weights_[events] > 0  # (m, K)
        keys = rows[:, None] * self.n_categories + self.item_categories_[events]
        added = np.bincount(keys[has], minlength=len(users) * self.n_categories).reshape(
            len(users), self.n_categories
        )
        mass = base * before[:, None] + added
        total = mass.sum(axis=1, keepdims=True)
        return np.divide(mass, total, out=np.zeros_like(mass), where=total > 0).astype(np.float32)

    def recent_category_share(self, recent_items: npt.NDArray[np.int32]) -> FloatArray:
        """(n, n_categories) float32: each user's recent items' share per category.

        An item with several categories spreads its unit over them; rows with no (known) history
        are all zero.
        """
        self._check_fitted()
        n = recent_items.shape[0]
        if self.n_categories == 0:  # a catalogue without categories (e.g. a bare ratings log)
            return np.zeros((n, 0), dtype=np.float32)
        known = (recent_items >= 0) & (recent_items < self.n_items)
        rows = np.where(known, recent_items, 0)
        categories = self.item_categories_[rows]  # (n, H, K)
        weights = self.item_category_weights_[rows] * known[:, :, None]
        keys = np.arange(n)[:, None, None] * self.n_categories + categories
        share = np.bincount(keys.ravel(), weights.ravel(), minlength=n * self.n_categories).reshape(
            n, self.n_categories
        )
        total = known.sum(axis=1, keepdims=True)
        return (share / np.maximum(total, 1)).astype(np.float32)

    def category_match(self, per_user: FloatArray, item_idx: npt.NDArray[np.int32]) -> FloatArray:
        """(n, m) float32: ``per_user`` (n, C) averaged over each candidate's categories.

        NaN for padding / unknown items, 0 for items without a category.
        """
        known = (item_idx >= 0) & (item_idx < self.n_items)
        if per_user.shape[1] == 0:  # a catalogue without categories: nothing can match
            return np.where(known, 0.0, np.nan).astype(np.float32)
        rows = np.where(known, item_idx, 0)
        categories = self.item_categories_[rows]  # (n, m, K)
        values = per_user[np.arange(item_idx.shape[0])[:, None, None], categories]
        match = (values * self.item_category_weights_[rows]).sum(axis=2)
        return np.where(known, match, np.nan).astype(np.float32)

    def created_at(self, item_idx: npt.NDArray[np.int32]) -> npt.NDArray[np.int64]:
        """item_idx.shape int64 release times; ``UNKNOWN_TIME`` for padding / unknown items."""
        known = (item_idx >= 0) & (item_idx < self.n_items)
        return np.where(known, self.item_created_at_[np.where(known, item_idx, 0)], UNKNOWN_TIME)

    def with_items(self, catalog: ItemCatalog) -> FeatureStore:
        """A copy describing ``catalog``'s items: items past the store's own (added after it was
        built) have no events yet (counts 0, "days since" missing), and every item's categories
        and release time are read from ``catalog``, whose category codes must be the store's."""
        self._check_fitted()
        if catalog.n_items < self.n_items or catalog.n_categories != self.n_categories:
            raise DataError(
                f"catalog of {catalog.n_items} items x {catalog.n_categories} categories cannot "
                f"extend a store of {self.n_items} x {self.n_categories}"
            )
        grow = catalog.n_items - self.n_items
        store = copy.copy(self)
        store.item_table_ = {
            name: np.concatenate([column, np.full(grow, _ITEM_DEFAULTS.get(name, 0.0), np.float32)])
            for name, column in self.item_table_.items()
        }
        store.item_categories_, store.item_category_weights_ = _padded_categories(catalog)
        store.item_created_at_ = catalog.created_at.astype(np.int64, copy=True)
        return store

    def _check_fitted(self) -> None:
        if not hasattr(self, "as_of_"):
            raise NotFittedError("FeatureStore is not fitted: call fit() or load() first")

    # ---------------------------------------------------------------------------- persistence
    def save(self, directory: Path) -> None:
        """Write ``users.parquet``, ``items.parquet``, ``categories.npz``, then ``store.json``."""
        self._check_fitted()
        directory.mkdir(parents=True, exist_ok=True)
        pl.DataFrame(self.user_table_).write_parquet(directory / USERS_TABLE)
        pl.DataFrame({**self.item_table_, "created_at": self.item_created_at_}).write_parquet(
            directory / ITEMS_TABLE
        )
        arrays = {
            "affinity_data": self.user_affinity_.data,
            "affinity_indices": self.user_affinity_.indices,
            "affinity_indptr": self.user_affinity_.indptr,
            "item_categories": self.item_categories_,
            "item_category_weights": self.item_category_weights_,
        }
        if self.user_affinity_mass_ is not None:  # None: loaded from an older bundle
            arrays["affinity_mass"] = self.user_affinity_mass_
        np.savez(directory / CATEGORIES_FILE, allow_pickle=False, **arrays)
        meta = {
            "format_version": STORE_FORMAT_VERSION,
            "config": to_mapping(self.config),
            "as_of": self.as_of_,
            "n_users": self.n_users,
            "n_categories": self.n_categories,
            "user_columns": list(self.user_table_),
            "item_columns": list(self.item_table_),
        }
        (directory / STORE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path) -> FeatureStore:
        """Read a directory written by :meth:`save`; ``BundleError`` if missing or corrupt."""
        path = directory / STORE_FILE
        if not path.is_file():
            raise BundleError(f"{directory}: {STORE_FILE} is missing (not a feature store)")
        try:
            meta = json.loads(path.read_text())
            if meta.get("format_version") != STORE_FORMAT_VERSION:
                raise BundleError(
                    f"{directory}: feature store format {meta.get('format_version')!r}, "
                    f"expected {STORE_FORMAT_VERSION}"
                )
            store = cls(from_mapping(FeatureConfig, meta["config"], "ranking.features"))
            users = pl.read_parquet(directory / USERS_TABLE)
            items = pl.read_parquet(directory / ITEMS_TABLE)
            with np.load(directory / CATEGORIES_FILE, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, KeyError, ValueError, pl.exceptions.PolarsError) as exc:
            raise BundleError(f"{directory}: unreadable feature store ({exc})") from exc
        store.as_of_ = int(meta["as_of"])
        store.user_table_ = {name: users[name].to_numpy() for name in meta["user_columns"]}
        store.item_table_ = {name: items[name].to_numpy() for name in meta["item_columns"]}
        store.item_created_at_ = items["created_at"].to_numpy()
        store.item_categories_ = arrays["item_categories"]
        store.item_category_weights_ = arrays["item_category_weights"]
        store.user_affinity_mass_ = arrays.get("affinity_mass")  # absent in older bundles
        store.user_affinity_ = sp.csr_matrix(
            (arrays["affinity_data"], arrays["affinity_indices"], arrays["affinity_indptr"]),
            shape=(int(meta["n_users"]), int(meta["n_categories"])),
        )
        return store


# Defaults of store features for users / items the store has never seen: counts are 0 (true: no
# events), "days since" is NaN (undefined; LightGBM routes it to its learned missing branch).
_USER_DEFAULTS: Mapping[str, float] = {"user_tenure_days": np.nan}
_ITEM_DEFAULTS: Mapping[str, float] = {
    "item_days_since_first_event": np.nan,
    "item_days_since_last_event": np.nan,
}


def _user_table(events: Interactions, as_of: int, config: FeatureConfig) -> dict[str, FloatArray]:
    """{name: (n_users,) float32} activity of each user in ``events`` (all before ``as_of``)."""
    n = events.n_users
    table = {"user_events_total": _count(events.user_idx, n)}
    for days in config.activity_windows_days:
        start = _window_start(events, as_of, days)
        table[f"user_events_{days}d"] = _count(events.user_idx[start:], n)
    keys = np.unique(events.user_idx.astype(np.int64) * events.n_items + events.item_idx)
    table["user_distinct_items"] = _count((keys // max(events.n_items, 1)).astype(np.int64), n)
    first, _ = _first_last_time(events.user_idx, events.timestamp, n)
    table["user_tenure_days"] = _days_since(first, as_of)
    return table


def _item_table(events: Interactions, as_of: int, config: FeatureConfig) -> dict[str, FloatArray]:
    """{name: (n_items,) float32} popularity of each item in ``events`` (all before ``as_of``)."""
    n = events.n_items
    table = {"item_events_total": _count(events.item_idx, n)}
    windows = config.popularity_windows_days
    for days in windows:
        start = _window_start(events, as_of, days)
        table[f"item_events_{days}d"] = _count(events.item_idx[start:], n)
    short, long = windows[0], windows[-1]
    expected_short = table[f"item_events_{long}d"] * (short / long)
    smoothing = config.trend_smoothing
    table["item_trend"] = (
        (table[f"item_events_{short}d"] + smoothing) / (expected_short + smoothing)
    ).astype(np.float32)
    first, last = _first_last_time(events.item_idx, events.timestamp, n)
    table["item_days_since_first_event"] = _days_since(first, as_of)
    table["item_days_since_last_event"] = _days_since(last, as_of)
    return table


def _count(index: npt.NDArray[np.integer], n: int) -> FloatArray:
    return np.bincount(index, minlength=n).astype(np.float32)


def _window_start(events: Interactions, as_of: int, days: int) -> int:
    """First position of the events in ``[as_of - days, as_of)`` (the log is sorted by time)."""
    return int(np.searchsorted(events.timestamp, as_of - days * SECONDS_PER_DAY, side="left"))


def _first_last_time(
    index: npt.NDArray[np.integer], timestamp: npt.NDArray[np.int64], n: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(n,) first and last event time per index (-1 where none), from a time-sorted log."""
    first = np.full(n, -1, dtype=np.int64)
    last = np.full(n, -1, dtype=np.int64)
    if index.size:
        # The log is sorted by time: the first occurrence of an index is its earliest event,
        # the first occurrence in the reversed log its latest.
        found, position = np.unique(index, return_index=True)
        first[found] = timestamp[position]
        found, position = np.unique(index[::-1], return_index=True)
        last[found] = timestamp[::-1][position]
    return first, last


def _days_since(times: npt.NDArray[np.int64], as_of: int) -> FloatArray:
    """(as_of - times) in days; NaN where ``times`` is -1 (no event)."""
    days = (as_of - times) / SECONDS_PER_DAY
    return np.where(times >= 0, days, np.nan).astype(np.float32)


def _row_normalised(matrix: sp.csr_matrix) -> sp.csr_matrix:
    totals = np.asarray(matrix.sum(axis=1)).ravel()
    scale = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
    normalised = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ matrix, dtype=np.float32)
    normalised.eliminate_zeros()
    normalised.sort_indices()
    return normalised


def _padded_categories(catalog: ItemCatalog) -> tuple[npt.NDArray[np.int32], FloatArray]:
    """(n_items, K) category indices (0-padded) and weights 1/n_categories(item) (0 at padding).

    K is the largest number of categories of one item (at least 1, so shapes stay 2-d).
    """
    categories = catalog.categories.tocsr()
    per_item = np.diff(categories.indptr)
    width = max(int(per_item.max(initial=0)), 1)
    index = np.zeros((catalog.n_items, width), dtype=np.int32)
    weights = np.zeros((catalog.n_items, width), dtype=np.float32)
    rows = np.repeat(np.arange(catalog.n_items), per_item)
    slot = np.arange(rows.size) - categories.indptr[rows]
    index[rows, slot] = categories.indices
    weights[rows, slot] = 1.0 / per_item[rows]
    return index, weights


# ---------------------------------------------------------------------------------- assembly
def feature_names(store: FeatureStore, sources: tuple[str, ...]) -> tuple[str, ...]:
    """The names :func:`assemble` produces for a store and the merger's ``sources``, in order."""
    store._check_fitted()
    return (
        *store.user_table_,
        *_ONLINE_USER_NAMES,
        "ctx_hour",
        "ctx_weekday",
        *store.item_table_,
        "item_age_days",
        *(f"{name}_score" for name in store.config.model_scores),
        *(
            f"{name}_score_z"
            for name in (store.config.model_scores if store.config.normalized_scores else ())
        ),
        "covisit_score",
        "category_affinity",
        "category_recent_share",
        "n_sources",
        "merged_position",
        *(f"src_{name}_{what}" for name in sources for what in ("rank", "present", "score")),
    )


def assemble(
    store: FeatureStore,
    retrieval_stage: RetrievalStage,
    users: UserBatch,
    merged: MergedCandidates,
    now: npt.ArrayLike | None = None,
) -> FeatureMatrix:
    """The features of every merged candidate, the same way for training rows and for serving.

    users:  the n users' online state (``recent_items`` most recent first).
    merged: (n, m) candidates with provenance. Extra, non-retrieved items may be appended with
            NaN scores and -1 ranks: the training set does so for missed positives and sampled
            negatives, which then get exactly the features any non-retrieved item would get.
    now:    (n,) int64 seconds UTC, the request time; default ``users.now``.

    Returns :class:`FeatureMatrix` with values (n, m, F) float32. Feature groups:
      user (store):  events total / per activity window, distinct items, tenure
      user (online): history length, hours since last event, session length, events in the
                     last ``recent_window_seconds``
      context:       hour of day, weekday (UTC, from ``now``)
      item (store):  events total / per popularity window, trend, days since first/last event
      item at now:   age in days since release (NaN if unknown)
      user x item:   two-tower and ALS scores (``source.score``), co-visitation score with the
                     recent items, category affinity (store, caught up with the online
                     state's events since the store was built) and recent category share,
                     number of sources that retrieved it, merged position (``missing_rank`` if
                     none did), and per source: rank (``missing_rank`` if absent), presence 0/1,
                     score (NaN if absent)
    """
    n, m = merged.item_idx.shape
    if len(users) != n:
        raise DataError(f"{len(users)} users but {n} rows of merged candidates")
    request_time = (
        users.now
        if now is None
        else np.broadcast_to(np.asarray(now, dtype=np.int64), (n,)).astype(np.int64)
    )
    columns = _columns(store, retrieval_stage, users, merged, request_time)
    names = feature_names(store, merged.sources)
    if tuple(columns) != names:  # a programming error, not a data problem
        raise AssertionError(f"assembled columns {tuple(columns)} != declared names {names}")
    values = np.empty((n, m, len(columns)), dtype=np.float32)
    for j, column in enumerate(columns.values()):
        values[:, :, j] = column
    valid = merged.item_idx != PAD_ITEM
    values[~valid] = np.nan
    return FeatureMatrix(values, names, valid)


def _columns(
    store: FeatureStore,
    stage: RetrievalStage,
    users: UserBatch,
    merged: MergedCandidates,
    now: npt.NDArray[np.int64],
) -> dict[str, npt.ArrayLike]:
    """{name: column broadcastable to (n, m)}, in the order of :func:`feature_names`."""
    config = store.config
    items = merged.item_idx
    columns: dict[str, npt.ArrayLike] = {}
    for name, value in store.user_rows(users.user_idx).items():
        columns[name] = value[:, None]
    for name, value in _online_user_features(users, now, config).items():
        columns[name] = value[:, None]
    columns["ctx_hour"] = ((now % SECONDS_PER_DAY) // SECONDS_PER_HOUR)[:, None]
    columns["ctx_weekday"] = ((now // SECONDS_PER_DAY + _EPOCH_WEEKDAY_OFFSET) % 7)[:, None]
    columns.update(store.item_rows(items))
    created = store.created_at(items)
    columns["item_age_days"] = np.where(
        created != UNKNOWN_TIME, (now[:, None] - created) / SECONDS_PER_DAY, np.nan
    )
    retrieved = np.asarray(merged.present.any(axis=2), dtype=bool)
    for name in config.model_scores:
        source = stage.sources_.get(name)
        columns[f"{name}_score"] = (
            source.score(users, items) if isinstance(source, ScoringSource) else np.nan
        )
    if config.normalized_scores:
        for name in config.model_scores:
            columns[f"{name}_score_z"] = row_standardized(columns[f"{name}_score"], retrieved)
    columns["covisit_score"] = _covisit_score(stage, users, items, config)
    columns["category_affinity"] = store.category_match(store.current_affinity(users), items)
    columns["category_recent_share"] = store.category_match(
        store.recent_category_share(users.recent_items), items
    )
    present = merged.present
    columns["n_sources"] = present.sum(axis=2)
    columns["merged_position"] = np.where(
        present.any(axis=2), np.arange(items.shape[1]), config.missing_rank
    )
    for s, name in enumerate(merged.sources):
        columns[f"src_{name}_rank"] = np.where(
            present[:, :, s], merged.source_ranks[:, :, s], config.missing_rank
        )
        columns[f"src_{name}_present"] = present[:, :, s]
        columns[f"src_{name}_score"] = merged.source_scores[:, :, s]
    return columns


def row_standardized(values: npt.ArrayLike, reference: npt.NDArray[np.bool_]) -> FloatArray:
    """``values`` (n, m) minus each row's mean over its ``reference`` entries, divided by their
    standard deviation (1 when it is 0); NaN stays NaN, a row without finite reference values
    is all NaN. The statistics come from the retrieved candidates only, so the rows a training
    set appends (missed positives, sampled negatives) do not shift them away from serving's."""
    array = np.broadcast_to(np.asarray(values, dtype=np.float64), reference.shape)
    use = reference & np.isfinite(array)
    count = use.sum(axis=1, keepdims=True)
    safe = np.where(use, array, 0.0)
    mean = safe.sum(axis=1, keepdims=True) / np.maximum(count, 1)
    spread = np.sqrt(
        np.where(use, (array - mean) ** 2, 0.0).sum(axis=1, keepdims=True) / np.maximum(count, 1)
    )
    spread = np.where(spread > 0, spread, 1.0)
    out = (array - mean) / spread
    out[np.broadcast_to(count == 0, out.shape)] = np.nan
    return out.astype(np.float32)


def _online_user_features(
    users: UserBatch, now: npt.NDArray[np.int64], config: FeatureConfig
) -> dict[str, FloatArray]:
    """{name: (n,) float32} features of the recent history (the online state) at ``now``."""
    has = users.recent_items != PAD_ITEM  # (n, H), valid entries come first
    length = has.sum(axis=1)
    last = users.recent_times[:, 0] if users.recent_times.shape[1] else np.zeros(len(users))
    hours = np.where(length > 0, (now - last) / SECONDS_PER_HOUR, np.nan)
    # Session: the most recent events chained by gaps <= session_gap (times are most recent first).
    gaps = users.recent_times[:, :-1] - users.recent_times[:, 1:]
    chained = (gaps <= config.session_gap_seconds) & has[:, 1:]
    unbroken = np.cumprod(chained, axis=1).sum(axis=1)
    session = np.where(length > 0, 1 + unbroken, 0)
    recent = (has & (now[:, None] - users.recent_times <= config.recent_window_seconds)).sum(axis=1)
    values = (length, hours, session, recent)
    return {
        name: np.asarray(value, dtype=np.float32)
        for name, value in zip(_ONLINE_USER_NAMES, values, strict=True)
    }


def _covisit_score(
    stage: RetrievalStage,
    users: UserBatch,
    items: npt.NDArray[np.int32],
    config: FeatureConfig,
) -> npt.ArrayLike:
    """(n, m) sum over recent items h at position p of ``decay ** p * neighbors[h, candidate]``.

    NaN when the stage has no co-visitation source or the candidate is padding / unknown to it.
    Only the neighbour lists of the recent items are touched (at most H x ``neighbors`` entries
    per user): they are expanded into (user, item) keys, summed per key after a stable sort
    (so a user's sum never depends on the other users of the batch), and the candidates are
    looked up by binary search. No sparse-matrix product: its set-up alone costs more than the
    whole computation for a single request.
    """
    source = stage.sources_.get(COVISIT_SOURCE)
    if not isinstance(source, CoVisitationSource):
        return np.nan
    neighbors = source.neighbors_
    n_items = neighbors.shape[0]
    known = (items >= 0) & (items < n_items)
    recent = users.recent_items
    user, position = np.nonzero((recent >= 0) & (recent < n_items))
    history = recent[user, position]
    starts = neighbors.indptr[history]
    lengths = neighbors.indptr[history + 1] - starts
    entries = concatenated_ranges(starts, lengths)
    if entries.size == 0:
        return np.where(known, 0.0, np.nan)
    owner = np.repeat(np.arange(history.size), lengths)
    keys = user[owner].astype(np.int64) * n_items + neighbors.indices[entries]
    weights = config.covisit_history_decay ** position[owner].astype(np.float64)
    values = neighbors.data[entries].astype(np.float64) * weights
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    first = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    keys, sums = keys[first], np.add.reduceat(values, first)
    wanted = np.arange(items.shape[0], dtype=np.int64)[:, None] * n_items + np.where(
        known, items, 0
    )
    found_at = np.searchsorted(keys, wanted).clip(max=keys.size - 1)
    found = known & (keys[found_at] == wanted)
    score = np.where(found, sums[found_at], 0.0)
    return np.where(known, score, np.nan)


def check_feature_names(expected: tuple[str, ...], found: tuple[str, ...], where: str) -> None:
    """``DataError`` naming the differences when a model's features and the assembly's differ."""
    if expected == found:
        return
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    raise DataError(
        f"{where}: the features assembled now differ from the ones the model was trained on "
        f"(missing {missing}, unexpected {extra}, order differs: {not missing and not extra})"
    )
