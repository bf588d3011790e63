"""Merge quotas learned on the validation window: how many of the merged slots each source gets.

The ranker can only order what retrieval hands it, so the merged list's recall bounds the whole
funnel, and which source finds what differs from log to log (the two-tower finds most on the
synthetic world, ALS and the neighbourhood models on Last.fm). Given every source's ranked list
for the validation users, :func:`learn_quotas` hands out the slots in steps: each step goes to
the source whose next candidates would add the most validation items that no source's current
quota already covers. Coverage is submodular in the quotas, the case where such a greedy
allocation is the standard near-optimal one. Every source keeps a floor of one step: the safety
nets (trending, cold-start) answer the users the models cannot, and a validation window holds
few of those.

The measure treats the merged list as the union of each source's top ``quota``; the merge itself
lets a source go deeper when its top items were already taken (``retrieval/merge.py``), so the
real list covers at least as much.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from data.errors import ConfigError
from retrieval.base import PAD_ITEM

NOT_FOUND = np.iinfo(np.int32).max
"""The rank of a relevant item a source did not retrieve."""


def relevant_ranks(
    lists: Mapping[str, npt.NDArray[np.integer]], relevant: sp.csr_matrix
) -> npt.NDArray[np.int32]:
    """(n_pairs, n_sources) int32: the 0-based rank at which each source retrieved each relevant
    (user, item) pair of ``relevant`` (n_users, n_items), ``NOT_FOUND`` where it did not.

    lists: source name -> (n_users, depth) item indices of that source's ranked list for the same
        users (``PAD_ITEM`` padded). Pairs are ``relevant``'s entries in row-major order.
    """
    pair_rows, pair_items = relevant.nonzero()
    out = np.full((pair_rows.size, len(lists)), NOT_FOUND, dtype=np.int32)
    n_users, n_items = relevant.shape
    for column, items in enumerate(lists.values()):
        if items.shape[0] != n_users:
            raise ConfigError(f"a source listed {items.shape[0]} users, the window has {n_users}")
        rows, ranks = np.nonzero((items != PAD_ITEM) & (items < n_items))
        # rank + 1 so that "absent" reads as the sparse matrix's implicit zero.
        found = sp.csr_matrix(
            (ranks.astype(np.int64) + 1, (rows, items[rows, ranks])), shape=(n_users, n_items)
        )
        at = np.asarray(found[pair_rows, pair_items]).ravel()
        out[:, column] = np.where(at > 0, at - 1, NOT_FOUND)
    return out


def learn_quotas(ranks: npt.NDArray[np.int32], n_candidates: int, step: int) -> list[int]:
    """Quotas (one per column of ``ranks``, summing to ``n_candidates``) by greedy coverage.

    ranks: (n_pairs, n_sources) from :func:`relevant_ranks`, sources in merge priority order.
    step: the slots handed out at a time, and every source's floor.
    Ties (and steps that would cover nothing more) go to the earlier source.
    """
    n_sources = ranks.shape[1]
    if n_sources == 0 or step < 1 or step * n_sources > n_candidates:
        raise ConfigError(
            f"cannot give {n_sources} sources a floor of {step} slots within {n_candidates}"
        )
    quotas = np.full(n_sources, step, dtype=np.int64)
    covered = (ranks < quotas).any(axis=1)
    while (left := n_candidates - int(quotas.sum())) > 0:
        grant = min(step, left)
        gains = [
            int(
                np.count_nonzero(
                    ~covered & (ranks[:, s] >= quotas[s]) & (ranks[:, s] < quotas[s] + grant)
                )
            )
            for s in range(n_sources)
        ]
        best = int(np.argmax(gains))  # the first of equal gains
        quotas[best] += grant
        covered |= ranks[:, best] < quotas[best]
    return [int(q) for q in quotas]


def coverage(ranks: npt.NDArray[np.int32], quotas: Sequence[int]) -> float:
    """Share of the relevant pairs inside some source's quota (the union model above)."""
    if ranks.shape[0] == 0:
        return 0.0
    return float(np.mean((ranks < np.asarray(quotas)).any(axis=1)))
