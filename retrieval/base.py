"""The candidate-source contract shared by every retrieval source.

A source answers, for a batch of users, "which ``k`` items are worth ranking?". Every source (two-
tower ANN, ALS, trending, co-visitation, cold start) takes the same :class:`UserBatch` and returns
the same :class:`Candidates`, so the merger, the evaluator and the pipeline treat them alike, and
one contract test suite (``tests/retrieval_contract.py``) checks them all.

Users are described by their *state* (id index + recent history), not by the training log: at
serving time the history includes feedback that arrived after training, which is how online
updates reach every source without a retrain.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from data.catalog import ItemCatalog
from data.errors import DataError
from data.interactions import Interactions

PAD_ITEM = -1
"""Item index that fills a row of :class:`Candidates` or a history when there are fewer items."""

IntArray = npt.NDArray[np.int32]
FloatArray = npt.NDArray[np.float32]
T = TypeVar("T")


@dataclass(frozen=True)
class UserBatch:
    """The state of ``n`` users at request time.

    user_idx:     (n,) int32 index in the training user map; -1 for a user unknown at training.
    recent_items: (n, H) int32 item indices, most recent first, padded with -1.
    recent_times: (n, H) int64 seconds UTC of those events (0 at padding).
    now:          (n,) int64 seconds UTC, the time of the request.
    seen:         optional (n, any width) binary CSR of every item each user interacted with,
                  beyond the recent ones (the online state keeps it); ``None`` when only the
                  recent history is known, as for a batch built from a log slice.
    """

    user_idx: IntArray
    recent_items: IntArray
    recent_times: npt.NDArray[np.int64]
    now: npt.NDArray[np.int64]
    seen: sp.csr_matrix | None = None

    def __post_init__(self) -> None:
        n = self.user_idx.shape[0]
        if self.recent_items.ndim != 2 or self.recent_items.shape[0] != n:
            raise DataError(f"recent_items has shape {self.recent_items.shape}, expected ({n}, H)")
        if self.recent_times.shape != self.recent_items.shape:
            raise DataError(
                f"recent_times shape {self.recent_times.shape} != recent_items shape "
                f"{self.recent_items.shape}"
            )
        if self.now.shape != (n,):
            raise DataError(f"now has shape {self.now.shape}, expected ({n},)")
        if self.seen is not None and self.seen.shape[0] != n:
            raise DataError(f"seen has {self.seen.shape[0]} rows, expected {n}")

    def __len__(self) -> int:
        return int(self.user_idx.shape[0])

    @property
    def has_history(self) -> npt.NDArray[np.bool_]:
        """(n,) bool: whether each user has any event a model can read (known at training, a
        recent event, or a seen item)."""
        known = self.user_idx >= 0
        recent = (self.recent_items >= 0).any(axis=1)
        seen = np.diff(self.seen.indptr) > 0 if self.seen is not None else False
        return np.asarray(known | recent | seen, dtype=bool)

    def take(self, rows: npt.ArrayLike) -> UserBatch:
        """The sub-batch of the given rows (same order)."""
        index = np.asarray(rows)
        return UserBatch(
            self.user_idx[index],
            self.recent_items[index],
            self.recent_times[index],
            self.now[index],
            None if self.seen is None else self.seen[index],
        )

    def history_matrix(self, n_items: int) -> sp.csr_matrix:
        """(n, n_items) binary CSR of the recent items: what to exclude as already seen."""
        rows, cols = np.nonzero(self.recent_items >= 0)
        items = self.recent_items[rows, cols]
        matrix = sp.csr_matrix(
            (np.ones(items.size, dtype=np.float32), (rows, items)), shape=(len(self), n_items)
        )
        matrix.sum_duplicates()
        matrix.data[:] = 1.0
        return matrix

    def seen_matrix(self, n_items: int) -> sp.csr_matrix:
        """(n, n_items) binary CSR of every item to exclude as already seen: the recent history
        plus ``seen`` (items at or beyond ``n_items`` are dropped).

        Built from one sorted array of ``row * n_items + item`` keys and one CSR construction:
        the scipy union (``recent + seen``) costs several times more for a serving request.
        """
        rows, cols = np.nonzero((self.recent_items >= 0) & (self.recent_items < n_items))
        keys = [rows.astype(np.int64) * n_items + self.recent_items[rows, cols]]
        if self.seen is not None and self.seen.nnz:
            per_row = np.diff(self.seen.indptr)
            seen_rows = np.repeat(np.arange(len(self), dtype=np.int64), per_row)
            seen_items = self.seen.indices[: seen_rows.size].astype(np.int64)
            inside = seen_items < n_items
            keys.append(seen_rows[inside] * n_items + seen_items[inside])
        unique = np.unique(np.concatenate(keys))
        indptr = np.searchsorted(unique, np.arange(len(self) + 1, dtype=np.int64) * n_items)
        return sp.csr_matrix(
            (np.ones(unique.size, dtype=np.float32), (unique % n_items).astype(np.int32), indptr),
            shape=(len(self), n_items),
        )

    @classmethod
    def from_interactions(
        cls,
        log: Interactions,
        user_idx: npt.ArrayLike,
        *,
        history_length: int,
        now: int | npt.ArrayLike | None = None,
    ) -> UserBatch:
        """The state of ``user_idx`` after every event in ``log`` (the offline-evaluation view).

        ``history_length`` caps H; ``now`` defaults to the last timestamp in the log.
        """
        users = np.asarray(user_idx, dtype=np.int32)
        n = users.shape[0]
        items = np.full((n, history_length), PAD_ITEM, dtype=np.int32)
        times = np.zeros((n, history_length), dtype=np.int64)
        if len(log) and history_length:
            # Events of each user, most recent first: sort by (user, -time), stable on log order.
            order = np.lexsort((-np.arange(len(log)), -log.timestamp, log.user_idx))
            sorted_users = log.user_idx[order]
            starts = np.searchsorted(sorted_users, np.arange(log.n_users + 1))
            known = (users >= 0) & (users < log.n_users)
            first = np.where(known, starts[np.clip(users, 0, log.n_users - 1)], 0)
            count = np.where(known, starts[np.clip(users, 0, log.n_users - 1) + 1] - first, 0).clip(
                max=history_length
            )
            offsets = np.arange(history_length)
            valid = offsets[None, :] < count[:, None]
            source = order[(first[:, None] + offsets[None, :])[valid]]
            items[valid] = log.item_idx[source]
            times[valid] = log.timestamp[source]
        if now is None:
            now_array = np.full(n, int(log.timestamp[-1]) if len(log) else 0, dtype=np.int64)
        else:
            now_array = np.broadcast_to(np.asarray(now, dtype=np.int64), (n,)).copy()
        return cls(users, items, times, now_array)


@dataclass(frozen=True)
class Candidates:
    """Top-``k`` candidates for ``n`` users.

    item_idx: (n, k) int32 item indices, best first, padded with -1 at the end of a row.
    scores:   (n, k) float32, higher is better, non-increasing along a row, -inf at padding.
    """

    item_idx: IntArray
    scores: FloatArray

    def __post_init__(self) -> None:
        if self.item_idx.shape != self.scores.shape or self.item_idx.ndim != 2:
            raise DataError(
                f"candidate items {self.item_idx.shape} and scores {self.scores.shape} "
                "must be equal 2-d shapes"
            )

    @property
    def k(self) -> int:
        return int(self.item_idx.shape[1])

    @classmethod
    def empty(cls, n_users: int, k: int) -> Candidates:
        return cls(
            np.full((n_users, k), PAD_ITEM, dtype=np.int32),
            np.full((n_users, k), -np.inf, dtype=np.float32),
        )

    @classmethod
    def from_scores(
        cls, scores: npt.NDArray[np.floating], k: int, exclude: sp.csr_matrix | None = None
    ) -> Candidates:
        """Top-``k`` of a dense (n, n_items) score matrix; ``exclude`` (n, n_items) masks items.

        Masked and non-finite scores never appear; rows with fewer than ``k`` valid items are
        padded.
        """
        scores = np.array(scores, dtype=np.float32, copy=True)
        n, n_items = scores.shape
        scores[~np.isfinite(scores)] = -np.inf
        if exclude is not None and exclude.nnz:
            coo = exclude.tocoo()
            scores[coo.row, coo.col] = -np.inf
        k_eff = min(k, n_items)
        if k_eff == 0:
            return cls.empty(n, k)
        top = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1).astype(np.int32)
        top_scores = np.take_along_axis(top_scores, order, axis=1)
        top[~np.isfinite(top_scores)] = PAD_ITEM
        out = cls.empty(n, k)
        out.item_idx[:, :k_eff] = top
        out.scores[:, :k_eff] = top_scores
        return out


@runtime_checkable
class CandidateSource(Protocol):
    """What every retrieval source implements (see the module docstring).

    Hyperparameters go in ``__init__``; ``fit`` learns from the training log and returns ``self``;
    ``retrieve`` never returns an item in ``exclude`` and raises ``NotFittedError`` before ``fit``.
    """

    name: str

    def fit(self, log: Interactions, catalog: ItemCatalog | None = None) -> CandidateSource: ...

    def retrieve(
        self, users: UserBatch, k: int, *, exclude: sp.csr_matrix | None = None
    ) -> Candidates: ...

    def save(self, directory: Path) -> None: ...


@runtime_checkable
class WarmableSource(Protocol):
    """A source with work worth doing before the first request (see ``RetrievalStage.warm``)."""

    def warm(self, users: UserBatch) -> None: ...


@runtime_checkable
class ObservingSource(Protocol):
    """A source that follows the live event stream between retrains (``RetrievalStage.observe``):
    population-level signals such as trending, as opposed to per-user state."""

    def observe(
        self,
        item_idx: npt.ArrayLike,
        timestamps: npt.ArrayLike,
        weights: npt.ArrayLike | None = None,
    ) -> object: ...


class LastBatchMemo(Generic[T]):
    """Remembers one value computed for the most recent :class:`UserBatch`, by identity.

    One funnel pass asks a source for the same batch's user vectors twice (retrieval, then the
    ranker's score features); an ALS fold-in is a least-squares solve per user, and a two-tower
    encoding a forward pass, so the second ask is served from here. The batch is held by weak
    reference: the memo never keeps a batch alive, and a new batch that happens to reuse the
    address of a collected one is never mistaken for it. Safe across threads: the entry is one
    tuple, replaced atomically; the cached value must be treated as read-only.
    """

    def __init__(self) -> None:
        self._entry: tuple[weakref.ref[UserBatch], T] | None = None

    def get(self, users: UserBatch, compute: Callable[[UserBatch], T]) -> T:
        entry = self._entry
        if entry is not None and entry[0]() is users:
            return entry[1]
        value = compute(users)
        self._entry = (weakref.ref(users), value)
        return value

    def clear(self) -> None:
        self._entry = None
