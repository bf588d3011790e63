"""The positional rules: exploration slots and pins place entries in the top ``k`` and lock them.

Later rules reorder only around locked entries (see :mod:`reranking.slate`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt

from data.errors import DataError
from reranking.config import ExplorationConfig, PinsConfig
from reranking.rules import Note, RuleContext, RuleResources
from reranking.slate import BoolArray, Slate

_UINT64 = 2**64  # SeedSequence takes non-negative entropy: keys are taken modulo 2**64.


class ExplorationSlots:
    """Fill reserved positions of the top ``k`` with items drawn from below it; lock them.

    A slot already locked, or past the end of a short row, is left alone. Each user's draw uses
    ``np.random.default_rng([seed, step, user_key, request_key])``: deterministic per request
    and independent of the rest of the batch. Draws are without replacement, from the first
    ``pool_size`` free entries at positions ``>= k``; a slot stays as it was when the pool runs out.
    """

    name = "exploration"
    reason = "exploration"

    def __init__(self, config: ExplorationConfig, resources: RuleResources) -> None:
        self.config = config

    def apply(self, slate: Slate, ctx: RuleContext) -> tuple[Slate, list[Note]]:
        n, w = slate.shape
        k = ctx.k
        if w <= k:
            return slate, []  # nothing below the slate to draw from
        if ctx.request.user_keys is None:
            raise DataError("the exploration rule needs RerankRequest.user_keys to seed its draw")
        request_keys = ctx.request.request_keys
        free, locked, lengths = slate.free, slate.locked, slate.lengths
        rows, cols, slots_used = [], [], []
        for r in range(n):
            end = min(k, int(lengths[r]))
            slots = [p for p in self.config.positions if p < end and not locked[r, p]]
            pool = np.flatnonzero(free[r, k:])[: self.config.pool_size] + k
            n_draw = min(len(slots), pool.size)
            if n_draw == 0:
                continue
            rng = np.random.default_rng(
                [
                    ctx.request.seed,
                    ctx.step,
                    int(ctx.request.user_keys[r]) % _UINT64,
                    0 if request_keys is None else int(request_keys[r]) % _UINT64,
                ]
            )
            drawn = rng.choice(
                pool.size, size=n_draw, replace=False, p=self._weights(slate, r, pool)
            )
            rows.extend([r] * n_draw)
            cols.extend(pool[drawn].tolist())
            slots_used.extend(slots[:n_draw])
        if not rows:
            return slate, []
        row_index = np.array(rows, dtype=np.intp)
        col_index = np.array(cols, dtype=np.intp)
        notes = []
        if ctx.explain:
            notes = [
                Note(r, "explored", int(slate.items[r, c]), f"exploration slot {p}")
                for r, c, p in zip(rows, cols, slots_used, strict=True)
            ]
        placed = slate.place(row_index, col_index, np.array(slots_used, dtype=np.intp), pin=False)
        return placed, notes

    def _weights(
        self, slate: Slate, row: int, pool: npt.NDArray[np.intp]
    ) -> npt.NDArray[np.float64] | None:
        if self.config.sampling == "uniform":
            return None
        scores = slate.scores[row, pool].astype(np.float64)
        low, high = scores.min(), scores.max()
        normalised = (scores - low) / (high - low) if high > low else np.zeros_like(scores)
        weights = np.exp((normalised - 1.0) / self.config.temperature)
        return weights / weights.sum()


class Pins:
    """Put configured items at configured positions of the top ``k``; lock them.

    Pins are taken by position. A pin is skipped (and noted) when its position is past ``k``,
    already locked (by an earlier rule or pin), or its item is already placed; an item missing
    from the list is inserted only with ``insert_if_absent``, and only if it was never a candidate
    and passes the filters that ran before (an item a filter removed stays removed).
    """

    name = "pins"
    reason = "pin"

    def __init__(self, config: PinsConfig, resources: RuleResources) -> None:
        self.config = config
        items = resources.items(self.name, "items", list(config.items), strict=True)
        self.pins_ = sorted(zip(config.items.values(), items.tolist(), strict=True))

    def apply(self, slate: Slate, ctx: RuleContext) -> tuple[Slate, list[Note]]:
        n, w = slate.shape
        every_row = np.arange(n)
        taken = slate.locked.copy()  # positions claimed, by column
        placements: list[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], int]] = []
        inserts: list[tuple[npt.NDArray[np.intp], int, int]] = []
        notes: list[Note] = []

        def note(rows: npt.NDArray[np.bool_], item: int, reason: str) -> None:
            if ctx.explain:
                notes.extend(Note(int(r), "skipped", item, reason) for r in np.flatnonzero(rows))

        for position, item in self.pins_:
            match = slate.items == item
            present = match.any(axis=1)
            column = match.argmax(axis=1) if w else np.zeros(n, dtype=np.intp)
            locked_there = slate.locked[every_row, column] if w else np.zeros(n, dtype=bool)
            if position >= ctx.k:
                note(present, item, f"pin position {position} is past k={ctx.k}")
                continue
            claimed = taken[:, position] if position < w else np.zeros(n, dtype=bool)
            already = present & locked_there
            place = present & ~claimed & ~already
            note(present & claimed & ~already, item, f"position {position} is already taken")
            note(already, item, "already placed by an earlier rule")
            placements.append((np.flatnonzero(place), column[place], position))
            if position < w:
                taken[place, position] = True
            if not self.config.insert_if_absent:
                note(~present, item, "not a candidate (insert_if_absent is false)")
                continue
            refused = (ctx.input_items == item).any(axis=1) | self._filtered(item, ctx)
            insert = ~present & ~refused & ~claimed
            note(~present & refused, item, "removed by an earlier rule")
            note(~present & ~refused & claimed, item, f"position {position} is taken")
            inserts.append((np.flatnonzero(insert), item, position))
            if position < w:
                taken[insert, position] = True

        if inserts:
            slate, extra = self._insert(slate, inserts)
            placements.extend(extra)
        rows = np.concatenate([p[0] for p in placements]) if placements else np.zeros(0, int)
        if rows.size == 0:
            return slate, notes
        cols = np.concatenate([p[1] for p in placements])
        positions = np.concatenate([np.full(p[0].size, p[2]) for p in placements])
        if ctx.explain:
            notes.extend(
                Note(int(r), "pinned", int(slate.items[r, c]), f"pinned to position {p}")
                for r, c, p in zip(rows, cols, positions, strict=True)
            )
        return slate.place(rows, cols, positions, pin=True), notes

    @staticmethod
    def _filtered(item: int, ctx: RuleContext) -> BoolArray:
        """(n,) bool: whether a filter that ran before would have removed ``item`` per user."""
        n = len(ctx.request)
        probe = Slate.start(np.full((n, 1), item, dtype=np.int32), np.zeros((n, 1), np.float32))
        refused = np.zeros(n, dtype=bool)
        for rule in ctx.filters:
            refused |= rule.mask(probe, ctx)[:, 0]
        return refused

    @staticmethod
    def _insert(
        slate: Slate, inserts: list[tuple[npt.NDArray[np.intp], int, int]]
    ) -> tuple[Slate, list[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], int]]]:
        """Append the inserted items after each row's entries (score NaN); their placements."""
        n = slate.shape[0]
        per_row = np.zeros(n, dtype=np.intp)
        for rows, _, _ in inserts:
            per_row[rows] += 1
        if not per_row.any():
            return slate, []
        end = slate.lengths.copy()
        slate = slate.widen(max(0, int((end + per_row).max()) - slate.shape[1]))
        items, scores = slate.items.copy(), slate.scores.copy()
        placements = []
        for rows, item, position in inserts:
            cols = end[rows]
            items[rows, cols] = item
            scores[rows, cols] = np.nan
            end[rows] += 1
            placements.append((rows, cols, position))
        return replace(slate, items=items, scores=scores), placements


__all__ = ["ExplorationSlots", "Pins"]
