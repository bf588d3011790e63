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

Bounded memory (:meth:`OnlineState.bound`). Anyone can post feedback under a new user id, so the
users a service holds must be capped, not only counted. The users held when ``bound`` is called
(the seed history: the bundle's snapshot, a fixed number per bundle) stay for the state's
lifetime; users who arrive later are held in a least-recently-used order, at most ``max_users``
of them, optionally dropped after ``ttl_s`` unused. An evicted user's events are still in the
feedback log: ``restore`` reads them back when the user is next asked for, and the rebuilt state
is the one the user would have had (a restart rebuilds it the same way). Once a state has evicted
anyone, events of a user it does not hold are not kept in memory either (the next read restores
them with the rest), so feedback alone never takes it past the cap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

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

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoredEvents:
    """What ``restore`` returns for some users: each of their events with log seq <=
    ``watermark``, mapped and filtered as live events are (item indices of the bundle, positive
    weights only), in log order."""

    user_ids: pl.Series | list[str]
    item_idx: npt.NDArray[np.int32]
    timestamps: npt.NDArray[np.int64]
    watermark: int


# Reads the events of the given user ids back from the feedback log.
Restore = Callable[[list[str]], RestoredEvents]


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
        # Slots ever handed out; slots of evicted users wait in _free for the next new user.
        self._n_slots = 0
        self._free: list[int] = []
        self._lock = threading.Lock()
        # Set by bound(): users that may be evicted, least recently used first (-> last use,
        # in clock seconds), the cap, the restore, and each restored user's log watermark.
        self._bounded = False
        self._lru: OrderedDict[str, float] = OrderedDict()
        self.max_users: int | None = None
        self.ttl_s: float | None = None
        self._restore: Restore | None = None
        self._clock: Callable[[], float] = time.monotonic
        self._watermarks: dict[str, int] = {}
        self.evictions = 0

    @classmethod
    def from_log(cls, log: Interactions, model_users: IdMap, history_length: int) -> OnlineState:
        """Seed the state with every event of ``log`` (e.g. train + valid at start-up)."""
        state = cls(model_users, log.n_items, history_length)
        ids = log.users.to_ids(log.user_idx)
        state.observe(ids, log.item_idx, log.timestamp)
        return state

    def __len__(self) -> int:
        """Users held now (a bounded state holds at most ``pinned + max_users``)."""
        return len(self._ids)

    def bound(
        self,
        max_users: int,
        *,
        restore: Restore,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """From now on hold at most ``max_users`` users beyond those held now (see the module
        docstring); ``restore`` reads an evicted user's events back from the log.

        The users held now (the seed history) are pinned: never evicted, never counted. Users
        unused for ``ttl_s`` seconds of ``clock`` are evicted too (None: only the cap evicts).
        """
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1, got {max_users}")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive (or None), got {ttl_s}")
        with self._lock:
            self._bounded = True
            self.max_users = max_users
            self.ttl_s = ttl_s
            self._restore = restore
            self._clock = clock

    @property
    def pinned_users(self) -> int:
        """Users held for the state's lifetime (all of them in an unbounded state)."""
        return len(self._ids) - len(self._lru)

    def user_ids(self) -> list[str]:
        """Every user with state, in the order they first appeared."""
        with self._lock:
            return list(self._ids)

    def observe(
        self,
        user_ids: pl.Series | list[str],
        item_idx: npt.ArrayLike,
        timestamps: npt.ArrayLike,
        *,
        seq: int | npt.ArrayLike | None = None,
    ) -> None:
        """Append events (any order): each user keeps their ``history_length`` latest events,
        and every item joins their seen set.

        Item indices must be valid in the bundle's item map (callers map or drop unknown items).
        seq: the log sequence number of each event (one number: of them all); a user whose
        state was restored from the log up to an event's number already holds that event.
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
            if self._bounded:
                self._expire()
                keep = self._kept_events(users.to_list(), seq)
                if keep is not None:
                    users, items, times = users.filter(pl.Series(keep)), items[keep], times[keep]
                    if items.size == 0:
                        return
            self._merge(self._slots(users), items, times)
            if self._bounded:
                # In the order they arrived: the last user of a batch is the most recently used.
                self._touch(users.unique(maintain_order=True).to_list())
                self._shrink()

    def _kept_events(
        self, users: list[str], seq: int | npt.ArrayLike | None
    ) -> npt.NDArray[np.bool_] | None:
        """Which events a bounded state keeps (None: all). Caller holds the lock.

        After an eviction, a user not held may have events the state no longer has: theirs stay
        in the log until the user is next read (restore). A user restored from the log up to a
        watermark >= ``seq`` holds this append's events already.
        """
        ids, watermarks = self._ids, self._watermarks
        if not self.evictions and not (seq is not None and watermarks):
            return None
        if seq is None:
            keep = np.fromiter((u in ids for u in users), dtype=bool, count=len(users))
        else:
            seqs = np.broadcast_to(np.asarray(seq, dtype=np.int64), (len(users),)).tolist()
            keep = np.fromiter(
                (u in ids and watermarks.get(u, -1) < s for u, s in zip(users, seqs, strict=True)),
                dtype=bool,
                count=len(users),
            )
        return None if keep.all() else keep

    def _merge(
        self,
        slots: npt.NDArray[np.int64],
        items: npt.NDArray[np.int32],
        times: npt.NDArray[np.int64],
    ) -> None:
        """Merge events into the held users' histories and seen sets. Caller holds the lock."""
        self._add_seen(slots, items)
        # Merge the new events with each touched user's current history, then keep the latest H.
        # The history is read oldest first (reversed rows), so that its events keep their order
        # of arrival before the new ones: ties in time then order as if every event had been
        # observed in one call, and a state rebuilt from the log in one call is the same.
        touched = np.unique(slots)
        old_items = self._items[touched][:, ::-1]
        old_times = self._times[touched][:, ::-1]
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
        names = users.to_list()
        with self._lock:
            if self._bounded:
                self._expire()
                self._restore_missing(names)
            slots = np.array([self._ids.get(u, -1) for u in names], dtype=np.int64)
            known = slots >= 0
            items = np.full((n, self.history_length), PAD_ITEM, dtype=np.int32)
            times = np.zeros((n, self.history_length), dtype=np.int64)
            items[known] = self._items[slots[known]]
            times[known] = self._times[slots[known]]
            seen_rows = [self._seen[slot] if slot >= 0 else _NO_ITEMS for slot in slots]
            if self._bounded:  # after the rows are read: the cap may evict one of this batch
                self._touch(names)
                self._shrink()
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
        ids = self._ids
        new = [u for u in users.unique(maintain_order=True).to_list() if u not in ids]
        if new:
            reused = [self._free.pop() for _ in range(min(len(new), len(self._free)))]
            start = self._n_slots
            self._n_slots += len(new) - len(reused)
            if self._n_slots > self._items.shape[0]:
                capacity = max(self._n_slots, int(self._items.shape[0] * _GROWTH), 16)
                self._items = _grow(self._items, capacity, PAD_ITEM)
                self._times = _grow(self._times, capacity, 0)
            self._seen.extend(_NO_ITEMS for _ in range(self._n_slots - start))
            for user, slot in zip(new, [*reused, *range(start, self._n_slots)], strict=True):
                ids[user] = slot
            if self._bounded:
                now = self._clock()
                for user in new:
                    self._lru[user] = now
        return np.fromiter((ids[u] for u in users.to_list()), dtype=np.int64, count=users.len())

    # -- bounded state (callers hold the lock) -------------------------------------------------
    def _touch(self, users: list[str]) -> None:
        """Mark ``users`` used now: the last to be evicted (pinned users are never evicted)."""
        lru, now = self._lru, self._clock()
        for user in users:
            if user in lru:
                lru[user] = now
                lru.move_to_end(user)

    def _shrink(self) -> None:
        assert self.max_users is not None
        while len(self._lru) > self.max_users:
            self._evict(next(iter(self._lru)))

    def _expire(self) -> None:
        if self.ttl_s is None or not self._lru:
            return
        oldest = self._clock() - self.ttl_s
        while self._lru and next(iter(self._lru.values())) < oldest:
            self._evict(next(iter(self._lru)))

    def _evict(self, user: str) -> None:
        slot = self._ids.pop(user)
        del self._lru[user]
        self._watermarks.pop(user, None)
        self._items[slot] = PAD_ITEM
        self._times[slot] = 0
        self._seen[slot] = _NO_ITEMS
        self._free.append(slot)
        self.evictions += 1

    def _restore_missing(self, users: list[str]) -> None:
        """Read back from the log the users of ``users`` the state may have evicted.

        Under the state lock, so that no live event of theirs is observed (and dropped, as the
        user is not held) between the log read and the install: an append committed before the
        read is in it, one committed after is observed into the restored state.
        """
        if not self.evictions or self._restore is None:
            return
        missing = [u for u in dict.fromkeys(users) if u not in self._ids]
        if not missing:
            return
        try:
            restored = self._restore(missing)
        except Exception:  # the log is unreadable now: answer from what is held (cold start)
            logger.exception("could not restore %d evicted users from the log", len(missing))
            return
        found = _as_series(restored.user_ids)
        if found.len():
            self._merge(
                self._slots(found),
                np.asarray(restored.item_idx, dtype=np.int32),
                np.asarray(restored.timestamps, dtype=np.int64),
            )
        for user in found.unique().to_list():
            self._watermarks[user] = restored.watermark


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
