"""The diversity rules: a cap per category in the top ``k``, and maximal marginal relevance."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from data.errors import DataError
from reranking.config import CategoryCapConfig, MMRConfig
from reranking.rules import Note, RuleContext, RuleResources, category_of
from reranking.slate import BoolArray, FloatArray, IntArray, Slate

# MMR works on (rows, n_candidates, d) arrays; a chunk of 1024 rows bounds them (1024 x 100 x 64
# float32 is 26 MB) while a serving batch, and most offline batches, run in one piece.
_MMR_ROWS_PER_CHUNK = 1024


class CategoryCap:
    """At most ``max_per_category`` items per primary category in the first ``k`` positions.

    Going down the list, an item is kept in place while its category has room (locked entries in
    the top ``k`` use up room too); the others are pushed below every kept item, in their order.
    Vectorized over the batch: an item's rank within its (user, category) group decides.
    """

    name = "category_cap"
    reason = "category cap"

    def __init__(self, config: CategoryCapConfig, resources: RuleResources) -> None:
        self.config = config

    def apply(self, slate: Slate, ctx: RuleContext) -> tuple[Slate, list[Note]]:
        n, w = slate.shape
        cap = self.config.max_per_category
        category = category_of(slate.items, ctx.item_info).astype(np.int64)
        if w == 0 or category.max() < 0:
            return slate, []
        group = np.arange(n, dtype=np.int64)[:, None] * (int(category.max()) + 1) + category
        position = np.arange(w)
        locked_top = slate.locked & (position < ctx.k)[None, :] & (category >= 0)
        free = slate.free & (category >= 0)
        locked_groups = np.sort(group[locked_top])

        flat = np.flatnonzero(free)  # row-major: position order within each row
        groups = group.ravel()[flat]
        order = np.argsort(groups, kind="stable")
        sorted_groups = groups[order]
        rank = np.empty(flat.size, dtype=np.int64)
        rank[order] = np.arange(flat.size) - np.searchsorted(sorted_groups, sorted_groups)
        used = np.searchsorted(locked_groups, groups, "right") - np.searchsorted(
            locked_groups, groups, "left"
        )
        over = np.zeros((n, w), dtype=bool)
        over.ravel()[flat[rank >= cap - used]] = True
        if not over.any():
            return slate, []
        notes = []
        if ctx.explain:
            rows, cols = np.nonzero(over & (position < ctx.k)[None, :])
            notes = [
                Note(
                    int(r),
                    "capped",
                    int(slate.items[r, c]),
                    f"category {int(category[r, c])} already has {cap} item(s) in the top {ctx.k}",
                )
                for r, c in zip(rows, cols, strict=True)
            ]
        return slate.reorder_free(position[None, :] + over * w), notes


class MMRDiversity:
    """Greedy maximal marginal relevance over the first ``n_candidates`` free entries.

    Fills the free positions of the top ``k`` one at a time with the candidate maximising
    ``w * relevance - (1 - w) * max similarity to the slate so far`` (the slate so far includes
    locked entries in the top ``k``). The candidates not picked keep their order after the picks.

    The greedy steps run for all users at once: step ``t`` picks every user's ``t``-th item, so
    the Python loop is over the ``k`` slots, not over users.
    """

    name = "mmr"
    reason = "diversity"

    def __init__(self, config: MMRConfig, resources: RuleResources) -> None:
        self.config = config

    def apply(self, slate: Slate, ctx: RuleContext) -> tuple[Slate, list[Note]]:
        n, w = slate.shape
        similarity = self.config.similarity
        if similarity == "auto":
            similarity = "category" if ctx.item_info.embeddings is None else "embedding"
        if similarity == "embedding" and ctx.item_info.embeddings is None:
            raise DataError("mmr.similarity is 'embedding' but no item embeddings were given")
        if w == 0:
            return slate, []
        position = np.arange(w)
        # Picked entries get keys 0.. in pick order; the others keep their order behind them.
        key = np.broadcast_to(position + w, (n, w)).copy()
        for start in range(0, n, _MMR_ROWS_PER_CHUNK):
            rows = slice(start, start + _MMR_ROWS_PER_CHUNK)
            columns, picks = self._pick(slate.take_rows(rows), ctx, similarity)
            picked = picks >= 0
            chunk_row, step = np.nonzero(picked)
            key[start + chunk_row, columns[chunk_row, picks[picked]]] = step
        return slate.reorder_free(key), []

    def _pick(
        self, slate: Slate, ctx: RuleContext, similarity: str
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        """The candidate columns (n, N) and, per row, the candidates picked, in pick order
        (n, steps) as indices into the columns, -1 past a row's picks."""
        n, w = slate.shape
        position = np.arange(w)
        free, locked = slate.free, slate.locked
        columns = np.argsort(~free, axis=1, kind="stable")[:, : self.config.n_candidates]
        candidate = np.take_along_axis(free, columns, axis=1)
        items = np.where(candidate, np.take_along_axis(slate.items, columns, axis=1), 0)
        in_top = position[None, :] < np.minimum(ctx.k, slate.lengths)[:, None]
        n_pick = np.minimum((in_top & ~locked).sum(axis=1), candidate.sum(axis=1))
        steps = int(n_pick.max(initial=0))
        picks = np.full((n, steps), -1, dtype=np.intp)
        if steps == 0:
            return columns, picks

        scores = np.take_along_axis(slate.scores, columns, axis=1).astype(np.float64)
        low = np.where(candidate, scores, np.inf).min(axis=1, keepdims=True)
        high = np.where(candidate, scores, -np.inf).max(axis=1, keepdims=True)
        spread = high > low
        # Padding (-inf) and rows without a spread get relevance 0, never inf or NaN.
        relevance = np.where(
            candidate & spread,
            (np.where(candidate, scores, 0.0) - np.where(spread, low, 0.0))
            / np.where(spread, high - low, 1.0),
            0.0,
        )
        similar_to = self._similarity(items, candidate, ctx, similarity)

        # Max similarity to the slate so far; `started` is false while a row's slate is empty
        # (no penalty yet: the max over nothing), then the first pick sets it.
        anchors = locked & in_top
        anchor_columns = np.argsort(~anchors, axis=1, kind="stable")[:, : int(anchors.sum(1).max())]
        anchor_valid = np.take_along_axis(anchors, anchor_columns, axis=1)
        anchor_items = np.where(anchor_valid, np.take_along_axis(slate.items, anchor_columns, 1), 0)
        max_similarity = np.zeros(items.shape)
        started = np.zeros(n, dtype=bool)
        for a in range(anchor_columns.shape[1]):
            max_similarity = self._merge(
                max_similarity, similar_to(anchor_items[:, a]), started, anchor_valid[:, a]
            )
            started |= anchor_valid[:, a]

        weight = self.config.relevance_weight
        taken = ~candidate
        every_row = np.arange(n)
        for t in range(steps):
            active = t < n_pick
            penalty = np.where(started[:, None], max_similarity, 0.0)
            gain = np.where(taken, -np.inf, weight * relevance - (1.0 - weight) * penalty)
            best = np.argmax(gain, axis=1)  # ties: the earlier position
            picks[active, t] = best[active]
            taken[every_row[active], best[active]] = True
            picked_items = items[every_row, best]
            max_similarity = self._merge(max_similarity, similar_to(picked_items), started, active)
            started |= active
        return columns, picks

    @staticmethod
    def _merge(
        current: npt.NDArray[np.float64],
        new: npt.NDArray[np.float64],
        started: BoolArray,
        active: BoolArray,
    ) -> npt.NDArray[np.float64]:
        """Fold the similarities to one more slate item into the running max (active rows)."""
        merged = np.where(started[:, None], np.maximum(current, new), new)
        return np.where(active[:, None], merged, current)

    @staticmethod
    def _similarity(
        items: IntArray, candidate: BoolArray, ctx: RuleContext, similarity: str
    ) -> Callable[[IntArray], npt.NDArray[np.float64]]:
        """``f(item per row) -> (n, N)``: each candidate's similarity to that row's item."""
        info = ctx.item_info
        if similarity == "embedding":
            embeddings: FloatArray = info.embeddings  # type: ignore[assignment]
            vectors = _unit_rows(embeddings[items]) * candidate[:, :, None]

            def cosine(other: IntArray) -> npt.NDArray[np.float64]:
                # A stacked matmul: one (N, d) @ (d, 1) product per row, the same for a row
                # whatever the batch around it.
                unit = _unit_rows(embeddings[other])
                return np.matmul(vectors, unit[:, :, None])[:, :, 0].astype(np.float64)

            return cosine
        category = np.where(candidate, info.primary_category[items], -1)

        def same_category(other: IntArray) -> npt.NDArray[np.float64]:
            theirs = info.primary_category[other][:, None]
            return ((category == theirs) & (category >= 0)).astype(np.float64)

        return same_category


def _unit_rows(vectors: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """Vectors (last axis) scaled to unit length; zero vectors stay zero (similar to nothing)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


__all__ = ["CategoryCap", "MMRDiversity"]
