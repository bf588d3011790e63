"""The slate: the working lists of a batch that the re-ranking rules act on.

* **Slate**: ``n`` rows (users) of ``w`` columns; column ``j`` of a row *is* position ``j`` of the
  user's list. Valid entries come first, ``PAD_ITEM`` (-1) fills the rest.
* **Locked entries**: a positional rule (pins, exploration) locks the entry it places. Later
  rules reorder only the *free* entries around locked ones, which keep their position (a filter
  still removes a locked entry: a blocked item is never shown, pinned or not). When removals
  leave a row shorter than a lock's position, the lock moves up just enough to keep the row free
  of holes.

Every rule is written with three vectorized operations, :meth:`Slate.remove`,
:meth:`Slate.reorder_free` and :meth:`Slate.place`: a few row-wise sorts for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

PAD_ITEM = -1
"""Item index of an empty slot (the end of a short row)."""
PAD_SCORE = -np.inf
"""Score of an empty slot."""

IntArray = npt.NDArray[np.int32]
FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Slate:
    """The working lists of ``n`` users (see the module docstring for columns and locks).

    items:    (n, w) int32, valid entries first, ``PAD_ITEM`` after.
    scores:   (n, w) float32, the current score of each entry (rules that boost change it);
              ``PAD_SCORE`` at padding, NaN for a pinned item inserted without a score.
    pinned:   (n, w) bool, locked by a pin.
    explored: (n, w) bool, locked by an exploration slot.
    """

    items: IntArray
    scores: FloatArray
    pinned: BoolArray
    explored: BoolArray

    @classmethod
    def start(cls, item_idx: IntArray, scores: FloatArray) -> Slate:
        """A slate of unlocked entries, as given (the engine compacts and deduplicates it)."""
        return cls(
            item_idx.astype(np.int32, copy=True),
            np.where(item_idx >= 0, scores, PAD_SCORE).astype(np.float32),
            np.zeros(item_idx.shape, dtype=bool),
            np.zeros(item_idx.shape, dtype=bool),
        )

    @property
    def shape(self) -> tuple[int, int]:
        n, w = self.items.shape
        return n, w

    @property
    def valid(self) -> BoolArray:
        return self.items != PAD_ITEM

    @property
    def locked(self) -> BoolArray:
        return self.pinned | self.explored

    @property
    def free(self) -> BoolArray:
        """Valid entries that reordering rules may move."""
        return self.valid & ~self.locked

    @property
    def lengths(self) -> npt.NDArray[np.intp]:
        """(n,) number of valid entries per row."""
        return self.valid.sum(axis=1)

    def head(self, k: int) -> Slate:
        """The first ``k`` positions, padded when the slate is narrower."""
        n, w = self.shape
        if k <= w:
            return Slate(
                self.items[:, :k], self.scores[:, :k], self.pinned[:, :k], self.explored[:, :k]
            )
        return self.widen(k - w)

    def take_rows(self, rows: slice) -> Slate:
        """The slate of a range of rows."""
        return Slate(self.items[rows], self.scores[rows], self.pinned[rows], self.explored[rows])

    def widen(self, extra: int) -> Slate:
        """The slate with ``extra`` empty columns appended (room for inserted pins)."""
        n = self.shape[0]
        return Slate(
            np.hstack([self.items, np.full((n, extra), PAD_ITEM, dtype=np.int32)]),
            np.hstack([self.scores, np.full((n, extra), PAD_SCORE, dtype=np.float32)]),
            np.hstack([self.pinned, np.zeros((n, extra), dtype=bool)]),
            np.hstack([self.explored, np.zeros((n, extra), dtype=bool)]),
        )

    def with_scores(self, scores: FloatArray) -> Slate:
        return replace(self, scores=np.where(self.valid, scores, PAD_SCORE).astype(np.float32))

    # The three operations every rule is written with; all go through `_layout`.
    def remove(self, mask: BoolArray) -> Slate:
        """Drop the entries where ``mask`` (n, w) is true; the others keep their order."""
        return self._layout(self.valid & ~mask, self._lock_targets(), None)

    def reorder_free(self, key: npt.NDArray[np.floating] | npt.NDArray[np.integer]) -> Slate:
        """Sort the free entries of each row by ``key`` (n, w), ascending, ties by position.

        The free entries stay on the positions free entries held before; locked ones stay put.
        """
        return self._layout(self.valid, self._lock_targets(), key)

    def place(
        self,
        rows: npt.NDArray[np.intp],
        cols: npt.NDArray[np.intp],
        positions: npt.NDArray[np.intp],
        *,
        pin: bool,
    ) -> Slate:
        """Move entry ``(rows[i], cols[i])`` to ``positions[i]`` and lock it (as a pin if ``pin``,
        else as exploration). The caller keeps positions distinct and off locked positions."""
        target = self._lock_targets()
        target[rows, cols] = positions
        flagged = replace(self, pinned=self.pinned.copy(), explored=self.explored.copy())
        (flagged.pinned if pin else flagged.explored)[rows, cols] = True
        return flagged._layout(self.valid, target, None)

    def _lock_targets(self) -> npt.NDArray[np.int64]:
        """(n, w) int64: each locked entry's position (its column), -1 for the others."""
        columns = np.arange(self.shape[1], dtype=np.int64)
        return np.where(self.locked, columns[None, :], -1)

    def _layout(
        self,
        keep: BoolArray,
        target: npt.NDArray[np.int64],
        free_key: npt.NDArray[np.floating] | npt.NDArray[np.integer] | None,
    ) -> Slate:
        """The slate holding the ``keep`` entries: those with ``target >= 0`` at that position
        (clamped into the row), the others, ordered by ``free_key`` (default: current
        position), on the remaining positions. Vectorized over the batch: a few row-wise sorts.
        """
        n, w = self.shape
        if w == 0:
            return self
        position = np.arange(w)
        length = keep.sum(axis=1)
        locked = keep & (target >= 0)
        free = keep & ~locked
        source = np.full((n, w), -1, dtype=np.intp)  # destination position -> source column
        n_locked = locked.sum(axis=1)
        if n_locked.any():
            wanted_by = np.where(locked, target, np.iinfo(np.int64).max)
            lock_src = np.argsort(wanted_by, axis=1, kind="stable")
            wanted = np.take_along_axis(wanted_by, lock_src, axis=1)
            # The j-th of a row's t locks sits no later than length - t + j, so the locks after
            # it still fit: a row that filters shortened pulls its locks in, never leaves a hole.
            placed = np.minimum(wanted, (length - n_locked)[:, None] + position[None, :])
            in_use = position[None, :] < n_locked[:, None]
            source[np.nonzero(in_use)[0], placed[in_use]] = lock_src[in_use]
        open_slot = (source < 0) & (position[None, :] < length[:, None])
        if free_key is None:  # keep the order: a stable sort of a bool (radix) is enough
            free_src = np.argsort(~free, axis=1, kind="stable")
        else:
            free_src = np.argsort(np.where(free, free_key, np.inf), axis=1, kind="stable")
        slots = np.argsort(~open_slot, axis=1, kind="stable")
        in_use = position[None, :] < free.sum(axis=1)[:, None]
        source[np.nonzero(in_use)[0], slots[in_use]] = free_src[in_use]
        return self._gather(source)

    def _gather(self, source: npt.NDArray[np.intp]) -> Slate:
        filled = source >= 0
        src = np.where(filled, source, 0)

        def take(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
            return np.take_along_axis(array, src, axis=1)

        return Slate(
            np.where(filled, take(self.items), PAD_ITEM).astype(np.int32),
            np.where(filled, take(self.scores), PAD_SCORE).astype(np.float32),
            filled & take(self.pinned),
            filled & take(self.explored),
        )


__all__ = ["PAD_ITEM", "PAD_SCORE", "BoolArray", "FloatArray", "IntArray", "Slate"]
