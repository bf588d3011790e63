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
from retrieval._sorting import sort_order
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

    Vectorized over users: the per-user work is done with sorts over (user, item) keys.
    """
    names = tuple(quotas)
    unknown = [name for name in names if name not in results]
    if unknown:
        raise ConfigError(f"quotas name sources {unknown} that produced no candidates")
    if n_candidates <= 0:
        raise ConfigError(f"n_candidates must be positive, got {n_candidates}")
    n_users = {results[name].item_idx.shape[0] for name in names}
    if len(n_users) != 1:
        raise DataError(f"sources returned different numbers of users: {sorted(n_users)}")
    (n,) = n_users

    # Flatten every (source, user, rank) triple, ordered by merge priority:
    # tier 0 = within the source's quota, tier 1 = beyond it; inside a tier, by source order for
    # quota slots and by rank (round-robin across sources) for fill slots.
    users, items, tiers, priority, source_of, ranks, scores = [], [], [], [], [], [], []
    quota_offset = 0  # quota slots: every slot of source s comes before any of source s + 1
    for s, name in enumerate(names):
        cand = results[name]
        k = cand.k
        user_grid = np.repeat(np.arange(n), k)
        rank_grid = np.tile(np.arange(k), n)
        flat_items = cand.item_idx.reshape(-1)
        valid = flat_items != PAD_ITEM
        # Within a quota, the order between sources is fixed; beyond it, interleave by rank.
        in_quota = rank_grid < quotas[name]
        users.append(user_grid[valid])
        items.append(flat_items[valid].astype(np.int64))
        tiers.append((~in_quota[valid]).astype(np.int64))
        priority.append(
            np.where(in_quota, quota_offset + rank_grid, rank_grid * len(names) + s)[valid].astype(
                np.int64
            )
        )
        quota_offset += k
        source_of.append(np.full(valid.sum(), s, dtype=np.int64))
        ranks.append(rank_grid[valid].astype(np.int32))
        scores.append(cand.scores.reshape(-1)[valid])
    user = np.concatenate(users)
    item = np.concatenate(items)
    tier = np.concatenate(tiers)
    prio = np.concatenate(priority)
    src = np.concatenate(source_of)
    rank = np.concatenate(ranks)
    score = np.concatenate(scores)

    # First occurrence of each (user, item) in priority order decides its merged position.
    order = sort_order([user, item, tier, prio])
    u_sorted, i_sorted = user[order], item[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = (u_sorted[1:] != u_sorted[:-1]) | (i_sorted[1:] != i_sorted[:-1])
    group_id = np.cumsum(first) - 1  # one group per unique (user, item)
    g_user = u_sorted[first]
    g_item = i_sorted[first]
    g_tier = tier[order][first]
    g_prio = prio[order][first]

    # Position of each unique (user, item) within its user: by (tier, priority).
    pos_order = sort_order([g_user, g_tier, g_prio])
    sorted_user = g_user[pos_order]
    user_start = np.searchsorted(sorted_user, np.arange(n))
    position = np.empty(pos_order.size, dtype=np.int64)
    position[pos_order] = np.arange(pos_order.size) - user_start[sorted_user]
    keep_group = position < n_candidates

    m = n_candidates
    out_items = np.full((n, m), PAD_ITEM, dtype=np.int32)
    out_items[g_user[keep_group], position[keep_group]] = g_item[keep_group]
    out_scores = np.full((n, m, len(names)), np.nan, dtype=np.float32)
    out_ranks = np.full((n, m, len(names)), ABSENT_RANK, dtype=np.int32)
    occurrence_group = group_id  # aligned with `order`
    keep_occ = keep_group[occurrence_group]
    occ_user = u_sorted[keep_occ]
    occ_pos = position[occurrence_group[keep_occ]]
    occ_src = src[order][keep_occ]
    out_scores[occ_user, occ_pos, occ_src] = score[order][keep_occ]
    out_ranks[occ_user, occ_pos, occ_src] = rank[order][keep_occ]
    return MergedCandidates(out_items, out_scores, out_ranks, names)
