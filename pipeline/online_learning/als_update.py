"""Online ALS: the item factors of items with new feedback re-solved between retrains.

ALS users already follow the stream: a user's vector is folded in at request time from the
events they gained since training (``retrieval/als.py``). What stays frozen is the item side:
an item that a new population now clicks keeps the factor its old users gave it. This update
re-solves the touched items' factors exactly as an ALS half-step would, from the item's training
column plus the new events, against the trained user factors (Hu, Koren & Volinsky, ICDM 2008:
the same normal equations as the user fold-in, with the roles swapped).

Items without a trained row (added live) and users without one are left out: their events have
no factor on the other side to solve against.
"""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from retrieval.als import ALSSource, confidence_weights, item_gram, solve_users


class AlsItemUpdater:
    """Accumulates new (user, item) events and re-solves the touched items of one
    :class:`ALSSource` on :meth:`update`."""

    def __init__(self, source: ALSSource) -> None:
        self.source = source
        # Training columns: each item's users and summed training weights (confidence space).
        self._columns = sp.csc_matrix(source.user_items_)
        self._user_gram = item_gram(source.user_factors_)
        # item -> {user: summed raw weight of the events since training}
        self._new: dict[int, dict[int, float]] = {}
        self._pending_items: set[int] = set()
        self._lock = threading.Lock()
        self.updates = 0
        # The trained factors of every item changed since the bundle (for rollback).
        self._trained: dict[int, npt.NDArray[np.float32]] = {}

    def submit(self, user_idx: npt.ArrayLike, item_idx: npt.ArrayLike) -> int:
        """Queue positive events (model user rows, item indices); returns how many were usable."""
        users = np.asarray(user_idx, dtype=np.int64)
        items = np.asarray(item_idx, dtype=np.int64)
        usable = (
            (users >= 0)
            & (users < self.source.n_users)
            & (items >= 0)
            & (items < self.source.n_items)
        )
        weight = float(self.source.config.history_weight)
        with self._lock:
            for user, item in zip(users[usable].tolist(), items[usable].tolist(), strict=True):
                column = self._new.setdefault(item, {})
                column[user] = column.get(user, 0.0) + weight
                self._pending_items.add(item)
        return int(usable.sum())

    def update(self) -> int:
        """Re-solve the items with events since the last update, publish; returns how many."""
        with self._lock:
            touched = np.array(sorted(self._pending_items), dtype=np.int64)
            self._pending_items.clear()
            new = {item: dict(self._new[item]) for item in touched.tolist()}
        if touched.size == 0:
            return 0
        owner, users, weights = self._interactions(touched, new)
        source = self.source
        factors, solvable = solve_users(
            self._user_gram,
            source.user_factors_,
            owner,
            users,
            source.alpha_ * weights,
            source.regularization_,
            touched.size,
        )
        self._remember(touched[solvable])
        source.publish_item_factors(touched[solvable], factors[solvable])
        self.updates += 1
        return int(solvable.sum())

    def _remember(self, items: npt.NDArray[np.int64]) -> None:
        for item in items.tolist():
            if item not in self._trained:
                self._trained[item] = self.source.item_factors_[item].copy()

    def changed(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """The items re-solved since the bundle and their current factors (checkpoints)."""
        items = np.array(sorted(self._trained), dtype=np.int64)
        return items, self.source.item_factors_[items].copy()

    def restore(self, items: npt.NDArray[np.int64], factors: npt.NDArray[np.float32]) -> None:
        """Serve checkpointed factors of ``items`` again (a restart resuming)."""
        self._remember(items)
        self.source.publish_item_factors(items, factors)

    def rollback(self) -> None:
        """Back to the trained factors; the events seen so far are forgotten."""
        with self._lock:
            self._new.clear()
            self._pending_items.clear()
            items = np.array(sorted(self._trained), dtype=np.int64)
            if items.size:
                factors = np.stack([self._trained[i] for i in items.tolist()])
                self.source.publish_item_factors(items, factors)
            self._trained.clear()

    def _interactions(
        self, touched: npt.NDArray[np.int64], new: dict[int, dict[int, float]]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """(row in ``touched``, user, confidence weight) triples sorted by row: each item's
        training column plus its new events, raw weights summed per user before the
        confidence transform, as a retrain on the whole log would."""
        columns, confidence = self._columns, self.source.config.confidence
        rows, users, weights = [], [], []
        for row, item in enumerate(touched.tolist()):
            lo, hi = columns.indptr[item], columns.indptr[item + 1]
            trained = columns.data[lo:hi].astype(np.float64)
            raw = dict(
                zip(
                    columns.indices[lo:hi].tolist(), _raw(trained, confidence).tolist(), strict=True
                )
            )
            for user, weight in new[item].items():
                raw[user] = raw.get(user, 0.0) + weight
            ordered = sorted(raw)
            summed = confidence_weights(np.array([raw[u] for u in ordered]), confidence)
            keep = summed != 0
            rows.extend([row] * int(keep.sum()))
            users.extend(np.asarray(ordered)[keep].tolist())
            weights.extend(summed[keep].tolist())
        return (
            np.asarray(rows, dtype=np.int64),
            np.asarray(users, dtype=np.int64),
            np.asarray(weights, dtype=np.float64),
        )


def _raw(transformed: npt.NDArray[np.float64], confidence: str) -> npt.NDArray[np.float64]:
    """The summed raw weights behind ``confidence_weights``' output (binary: 1 per pair, the
    most a sign tells)."""
    if confidence == "log":
        return np.sign(transformed) * np.expm1(np.abs(transformed))
    return transformed
