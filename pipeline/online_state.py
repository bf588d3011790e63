"""Online user state: each user's recent history and seen items, updated from feedback.

Model weights stay frozen between retrains; what moves is the *state* the models read. Every
source takes a :class:`~retrieval.base.UserBatch` built here, so one ``observe`` call changes what
the two-tower encodes, what ALS folds in, what co-visitation expands, and what is filtered as seen.

Two views of the same events, because they answer different questions: the recent history (the
latest ``history_length`` events) is what the models read, and is capped so a request costs the
same for a heavy user; the seen set (every item the user ever interacted with) is what a
recommendation must not repeat, and cannot be capped without recommending old items again.

Users unknown to the bundle get a slot too (their model index stays -1): they leave the cold-start
path as soon as they have a history.
"""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt
import polars as pl
import scipy.sparse as sp

from data.idmap import IdMap
from data.interactions import Interactions
from retrieval.base import PAD_ITEM, UserBatch

# Room added when a new user arrives and the arrays are full (amortised growth, like a list).
_GROWTH = 1.5
# (slot, item) pairs packed into one int64 key: item indices are int32, so 32 bits hold them.
_ITEM_BITS = 32
_ITEM_MASK = (1 << _ITEM_BITS) - 1
_NO_ITEMS: npt.NDArray[np.int32] = np.empty(0, dtype=np.int32)


class OnlineState:
    """Recent histories (most recent first, capped at ``history_length``) and seen-item sets.

    Thread-safe: the HTTP service observes feedback and serves requests concurrently.
    """

    def __init__(self, model_users: IdMap, n_items: int, history_length: int) -> None:
        self.model_users = model_users
        self.n_items = n_items
        self.history_length = history_length
        self._ids: dict[str, int] = {}
        self._items = np.full((0, history_length), PAD_ITEM, dtype=np.int32)
        self._times = np.zeros((0, history_length), dtype=np.int64)
        # Per slot: the sorted, distinct item indices the user interacted with.
        self._seen: list[npt.NDArray[np.int32]] = []
        self._lock = threading.Lock()

    @classmethod
    def from_log(cls, log: Interactions, model_users: IdMap, history_length: int) -> OnlineState:
        """Seed the state with every event of ``log`` (e.g. train + valid at start-up)."""
        state = cls(model_users, log.n_items, history_length)
        ids = log.users.to_ids(log.user_idx)
        state.observe(ids, log.item_idx, log.timestamp)
        return state

    def __len__(self) -> int:
        return len(self._ids)

    def user_ids(self) -> list[str]:
        """Every user with state, in the order they first appeared."""
        with self._lock:
            return list(self._ids)

    def observe(
        self,
        user_ids: pl.Series | list[str],
        item_idx: npt.ArrayLike,
        timestamps: npt.ArrayLike,
    ) -> None:
        """Append events (any order): each user keeps their ``history_length`` latest events,
        and every item joins their seen set.

        Item indices must be valid in the bundle's item map (callers map or drop unknown items).
        """
        users = _as_series(user_ids)
        items = np.asarray(item_idx, dtype=np.int32)
        times = np.asarray(timestamps, dtype=np.int64)
        if not (users.len() == items.size == times.size):
            raise ValueError(f"{users.len()} users, {items.size} items, {times.size} timestamps")
        if items.size == 0:
            return
        if items.min() < 0:
            raise ValueError("item indices must be >= 0 (map or drop unknown items first)")
        with self._lock:
            slots = self._slots(users)
            self._add_seen(slots, items)
            # Merge the new events with each touched user's current history, then keep the latest H.
            touched = np.unique(slots)
            old_items = self._items[touched]
            old_times = self._times[touched]
            old_valid = old_items != PAD_ITEM
            old_rows = np.broadcast_to(touched[:, None], old_items.shape)[old_valid]
            all_slots = np.concatenate([old_rows, slots])
            all_items = np.concatenate([old_items[old_valid], items])
            all_times = np.concatenate([old_times[old_valid], times])
            # Newest first within a user; among equal times the later-arriving event first.
            arrival = np.arange(all_slots.size)
            order = np.lexsort((-arrival, -all_times, all_slots))
            all_slots, all_items, all_times = all_slots[order], all_items[order], all_times[order]
            starts = np.searchsorted(all_slots, touched)
            run_lengths = np.diff(np.append(starts, all_slots.size))
            position = np.arange(all_slots.size) - np.repeat(starts, run_lengths)
            keep = position < self.history_length
            self._items[touched] = PAD_ITEM
            self._times[touched] = 0
            self._items[all_slots[keep], position[keep]] = all_items[keep]
            self._times[all_slots[keep], position[keep]] = all_times[keep]

    def batch(self, user_ids: pl.Series | list[str], now: npt.ArrayLike) -> UserBatch:
        """The current state of ``user_ids`` (unknown ids: empty history, model index -1)."""
        users = _as_series(user_ids)
        n = users.len()
        with self._lock:
            slots = np.array([self._ids.get(u, -1) for u in users.to_list()], dtype=np.int64)
            known = slots >= 0
            items = np.full((n, self.history_length), PAD_ITEM, dtype=np.int32)
            times = np.zeros((n, self.history_length), dtype=np.int64)
            items[known] = self._items[slots[known]]
            times[known] = self._times[slots[known]]
            seen_rows = [self._seen[slot] if slot >= 0 else _NO_ITEMS for slot in slots]
        model_idx = self.model_users.index(users, allow_unknown=True)
        now_array = np.broadcast_to(np.asarray(now, dtype=np.int64), (n,)).copy()
        return UserBatch(model_idx, items, times, now_array, seen=_rows_matrix(seen_rows))

    def _add_seen(self, slots: npt.NDArray[np.int64], items: npt.NDArray[np.int32]) -> None:
        """Union ``items`` into the seen sets of ``slots`` (caller holds the lock).

        One sort of packed (slot, item) keys for the whole call: seeding 100k users from a
        bundle is one vectorised pass, and a single feedback event stays a few microseconds.
        """
        touched = np.unique(slots)
        old = [self._seen[slot] for slot in touched]
        old_slots = np.repeat(touched, [row.size for row in old])
        old_items = np.concatenate(old) if old else _NO_ITEMS
        keys = np.unique(np.concatenate([_pack(old_slots, old_items), _pack(slots, items)]))
        key_slots = keys >> _ITEM_BITS
        distinct_items = (keys & _ITEM_MASK).astype(np.int32)
        bounds = np.searchsorted(key_slots, touched[1:])
        for slot, row in zip(touched.tolist(), np.split(distinct_items, bounds), strict=True):
            self._seen[slot] = row

    def _slots(self, users: pl.Series) -> npt.NDArray[np.int64]:
        """Slot of each user id, allocating slots for new ones (caller holds the lock)."""
        new = [u for u in users.unique(maintain_order=True).to_list() if u not in self._ids]
        if new:
            start = len(self._ids)
            needed = start + len(new)
            if needed > self._items.shape[0]:
                capacity = max(needed, int(self._items.shape[0] * _GROWTH), 16)
                self._items = _grow(self._items, capacity, PAD_ITEM)
                self._times = _grow(self._times, capacity, 0)
            for offset, user in enumerate(new):
                self._ids[user] = start + offset
            self._seen.extend(_NO_ITEMS for _ in new)
        ids = self._ids
        return np.fromiter((ids[u] for u in users.to_list()), dtype=np.int64, count=users.len())


def observe_frame(state: OnlineState, items: IdMap, frame: pl.DataFrame) -> None:
    """Add a canonical interaction frame to ``state``; items unknown to ``items`` are skipped."""
    if frame.height == 0:
        return
    index = items.index(frame["item_id"], allow_unknown=True)
    known = index != PAD_ITEM
    state.observe(
        frame["user_id"].filter(pl.Series(known)),
        index[known],
        frame["timestamp"].to_numpy()[known],
    )


def _pack(slots: npt.NDArray[np.int64], items: npt.NDArray[np.int32]) -> npt.NDArray[np.int64]:
    return (slots.astype(np.int64) << _ITEM_BITS) | items.astype(np.int64)


def _rows_matrix(rows: list[npt.NDArray[np.int32]]) -> sp.csr_matrix:
    """Binary CSR with one row per array of column indices (width: the largest index + 1)."""
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([row.size for row in rows], out=indptr[1:])
    indices = np.concatenate(rows) if rows else _NO_ITEMS
    width = int(indices.max()) + 1 if indices.size else 0
    data = np.ones(indices.size, dtype=np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(len(rows), width))


def _as_series(user_ids: pl.Series | list[str]) -> pl.Series:
    return user_ids if isinstance(user_ids, pl.Series) else pl.Series(user_ids, dtype=pl.String)


def _grow(array: npt.NDArray, capacity: int, fill: int) -> npt.NDArray:
    grown = np.full((capacity, array.shape[1]), fill, dtype=array.dtype)
    grown[: array.shape[0]] = array
    return grown
