"""Merge the candidates of several sources: per-source quotas, dedup, provenance kept.

The ranker learns from *where* a candidate came from (which sources, at which rank, with which
score), so the merger does not flatten that away: for every merged candidate it keeps, per source,
the source's score and rank (NaN / -1 where the source did not produce it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from data.errors import ConfigError, DataError
from data.validation import positive_int
from retrieval.base import PAD_ITEM, Candidates

ABSENT_RANK = -1


@dataclass(frozen=True)
class MergedCandidates:
    """Up to ``n_candidates`` merged candidates per user, in merge order, padded with -1.

    item_idx:      (n, m) int32
    source_scores: (n, m, n_sources) float32, the score each source gave (NaN if absent)
    source_ranks:  (n, m, n_sources) int32, 0-based rank in each source's list (-1 if absent)
    sources:       the source names, in the order of the last axis
    """

    item_idx: npt.NDArray[np.int32]
    source_scores: npt.NDArray[np.float32]
    source_ranks: npt.NDArray[np.int32]
    sources: tuple[str, ...]

    @property
    def present(self) -> npt.NDArray[np.bool_]:
        """(n, m, n_sources) bool: which sources produced each candidate."""
        return self.source_ranks != ABSENT_RANK

    def source_names(self, row: int, column: int) -> list[str]:
        """Names of the sources that produced candidate ``column`` of user ``row``."""
        return [s for s, hit in zip(self.sources, self.present[row, column], strict=True) if hit]


def merge_candidates(
    results: dict[str, Candidates], quotas: dict[str, int], n_candidates: int
) -> MergedCandidates:
    """Merge per-source candidates into one deduplicated list per user.

    Each source contributes up to ``quotas[name]`` *new* items (not yet taken from a source listed
    before it), sources taken in the order of ``quotas``; then, if a user has fewer than
    ``n_candidates``, the remaining slots are filled round-robin by rank from what the sources
    retrieved beyond their quotas. Provenance (score, rank) is recorded from every source that
    retrieved the item, whether or not that source's quota admitted it.

    Vectorized over users as (n, total slots) arrays: the sources' columns are laid out in merge
    priority order once, so a row's merged list is its first occurrences in column order; one
    row-wise sort of packed (item, column) keys finds those first occurrences and, for every
    occurrence, the merged position that carries its provenance.
    """
    names = tuple(quotas)
    unknown = [name for name in names if name not in results]
    if unknown:
        raise ConfigError(f"quotas name sources {unknown} that produced no candidates")
    positive_int(n_candidates, "n_candidates")
    n_users = {results[name].item_idx.shape[0] for name in names}
    if len(n_users) != 1:
        raise DataError(f"sources returned different numbers of users: {sorted(n_users)}")
    (n,) = n_users
    m = n_candidates
    out_items = np.full((n, m), PAD_ITEM, dtype=np.int32)
    out_scores = np.full((n, m, len(names)), np.nan, dtype=np.float32)
    out_ranks = np.full((n, m, len(names)), ABSENT_RANK, dtype=np.int32)
    columns = _priority_columns([results[s].k for s in names], [quotas[s] for s in names])
    if n == 0 or columns.order.size == 0:
        return MergedCandidates(out_items, out_scores, out_ranks, names)
    source_of, rank_of, order = columns.source, columns.rank, columns.order
    items = np.concatenate([results[name].item_idx for name in names], axis=1)[:, order]
    scores = np.concatenate([results[name].scores for name in names], axis=1)[:, order]

    # Row-wise sort of (item, column): equal items sit together, their first column leading.
    total = items.shape[1]
    column_bits = max(1, (total - 1).bit_length())
    padding = int(items.max(initial=0)) + 1  # sorts after every real item
    packed = np.where(items != PAD_ITEM, items, padding).astype(np.int64) << column_bits
    packed |= np.arange(total, dtype=np.int64)
    packed.sort(axis=1)
    sorted_items = packed >> column_bits
    sorted_columns = packed & ((1 << column_bits) - 1)
    group_start = np.ones((n, total), dtype=bool)
    group_start[:, 1:] = sorted_items[:, 1:] != sorted_items[:, :-1]
    real = sorted_items != padding

    # A first occurrence's merged position: how many first occurrences precede it in its row.
    rows = np.arange(n)[:, None]
    first = np.zeros((n, total), dtype=bool)
    first[rows, sorted_columns] = group_start & real
    position = np.cumsum(first, axis=1) - 1
    kept = first & (position < m)
    r, c = np.nonzero(kept)
    out_items[r, position[r, c]] = items[r, c]

    # Every occurrence (of any source) records its provenance at its item's merged position.
    start_index = np.where(group_start, np.arange(total), 0)
    np.maximum.accumulate(start_index, axis=1, out=start_index)
    leader = np.take_along_axis(sorted_columns, start_index, axis=1)  # the group's first column
    recorded = real & kept[rows, leader]
    r, j = np.nonzero(recorded)
    column, at = sorted_columns[r, j], position[r, leader[r, j]]
    out_scores[r, at, source_of[column]] = scores[r, column]
    out_ranks[r, at, source_of[column]] = rank_of[column]
    return MergedCandidates(out_items, out_scores, out_ranks, names)


def merge_order_scores(item_idx: npt.NDArray[np.int32]) -> npt.NDArray[np.float32]:
    """(n, m) float32 scores that reproduce the merge order of ``item_idx`` (n, m): -position,
    -inf at padding. What the pipeline serves when it does not rank."""
    n, m = item_idx.shape
    scores = np.broadcast_to(-np.arange(m, dtype=np.float32), (n, m)).copy()
    scores[item_idx == PAD_ITEM] = -np.inf
    return scores


@dataclass(frozen=True)
class _Columns:
    """The sources' candidate slots in merge priority order: ``order`` indexes the sources'
    concatenated columns; ``source`` and ``rank`` say whose slot each ordered column is."""

    order: npt.NDArray[np.intp]
    source: npt.NDArray[np.intp]
    rank: npt.NDArray[np.int32]


def _priority_columns(depths: list[int], quotas: list[int]) -> _Columns:
    """Quota slots first, source by source in rank order; then the slots beyond each quota,
    round-robin across sources by rank."""
    source = np.concatenate([np.full(k, s, dtype=np.intp) for s, k in enumerate(depths)])
    rank = np.concatenate([np.arange(k, dtype=np.int32) for k in depths])
    beyond = rank >= np.asarray(quotas, dtype=np.int64)[source]
    # np.lexsort: the last key is the primary one.
    order = np.lexsort((np.where(beyond, source, rank), np.where(beyond, rank, source), beyond))
    return _Columns(order, source[order], rank[order])
