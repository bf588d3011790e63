"""User vectors remembered across requests, keyed by the inputs they are computed from.

A retrieval source's user vector is a pure function of the user's model row and part of the
user's recent history (no clock, no request field), so a vector computed once stays right until
that part of the history changes:

- two-tower: the recent items the user tower pools. Encoding one user is a forward pass of a few
  small layers, ~1.5 ms of CPU, most of it framework overhead.
- ALS fold-in: the events a user gained since training, solved onto the trained item factors
  (~0.3-0.5 ms a request on the 1M-item load bundle).

Most requests come from users whose history has not changed since their last request, or since
the bundle's snapshot, which the sources' ``warm`` encodes in bulk at start-up (as production
systems precompute user embeddings offline).

Keys are content digests: a request whose history differs from the cached one (feedback arrived,
the online state moved on) misses and is computed again, so the cache can never serve a stale
vector and needs no invalidation hooks from the online state. Only what the model itself changes
(its weights, its item features) clears it.
"""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt

# splitmix64's constants (Steele, Lea & Flood 2014): a cheap bijective mixer whose output bits
# each depend on every input bit, vectorizable with numpy's wrapping uint64 arithmetic.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    x = (x ^ (x >> np.uint64(30))) * _MIX_1
    x = (x ^ (x >> np.uint64(27))) * _MIX_2
    return x ^ (x >> np.uint64(31))


def history_digest(history: npt.NDArray[np.integer]) -> npt.NDArray[np.uint64]:
    """(n,) uint64 digests of the rows of ``history`` (n, H), order-sensitive.

    Each slot is mixed with its position before the row is summed, so the same items in another
    order give another digest. Two different rows collide with probability ~2^-64: far below any
    other error a served vector carries.
    """
    rows = np.ascontiguousarray(history, dtype=np.int64).view(np.uint64)
    positions = (np.arange(rows.shape[1], dtype=np.uint64) + np.uint64(1)) * _GOLDEN
    return _mix(_mix(rows + positions).sum(axis=1, dtype=np.uint64))


class UserVectorCache:
    """One slot per model user row: the last vector encoded for it and its history's digest.

    Slots are allocated lazily by the OS (``np.zeros``): memory grows with the users actually
    served, up to ``n_users * dim * 4`` bytes. Rows outside ``[0, n_users)`` (unknown users)
    are never cached. Thread-safe: lookups and stores take one lock, held for array copies only.
    """

    def __init__(self, n_users: int, dim: int) -> None:
        self.n_users = n_users
        self._vectors = np.zeros((n_users, dim), dtype=np.float32)
        self._digests = np.zeros(n_users, dtype=np.uint64)
        self._filled = np.zeros(n_users, dtype=bool)
        self._lock = threading.Lock()

    def lookup(
        self, user_idx: npt.NDArray[np.integer], digests: npt.NDArray[np.uint64]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """``(vectors (n, dim), hit (n,))``: the cached vector where ``hit``, zeros elsewhere."""
        rows = np.asarray(user_idx, dtype=np.int64)
        cacheable = (rows >= 0) & (rows < self.n_users)
        slots = np.where(cacheable, rows, 0)
        with self._lock:
            hit = cacheable & self._filled[slots] & (self._digests[slots] == digests)
            vectors = np.where(hit[:, None], self._vectors[slots], np.float32(0))
        return vectors, hit

    def store(
        self,
        user_idx: npt.NDArray[np.integer],
        digests: npt.NDArray[np.uint64],
        vectors: npt.NDArray[np.float32],
    ) -> None:
        """Remember ``vectors`` (n, dim) as the users' vectors for the histories ``digests``."""
        rows = np.asarray(user_idx, dtype=np.int64)
        cacheable = (rows >= 0) & (rows < self.n_users)
        with self._lock:
            self._vectors[rows[cacheable]] = vectors[cacheable]
            self._digests[rows[cacheable]] = digests[cacheable]
            self._filled[rows[cacheable]] = True

    def clear(self) -> None:
        with self._lock:
            self._filled[:] = False

    def __len__(self) -> int:
        """Users with a cached vector."""
        return int(self._filled.sum())
