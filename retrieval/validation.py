"""Choices made on the validation window at fit time: what a source's hyperparameter or the merge
order should be is measured, not assumed, so the defaults hold on logs this project never saw.

The measure is the one the project is judged by: nDCG@k with binary relevance (gain 1 for an item
the user engaged with in the window and had not engaged with before), items the user already
had excluded, averaged over the users who have such an item.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from data.interactions import Interactions
from retrieval.base import PAD_ITEM, UserBatch

VALIDATION_K = 10
"""The cut-off of the validation nDCG: the length of the list a user is shown."""


@dataclass(frozen=True)
class ValidationWindow:
    """The users of a validation window, their state before it and what they engaged with in it.

    user_idx: (n,) int32 users with at least one new item in the window.
    seen:     (n, n_items) float32 binary CSR, their items in the training log (excluded).
    relevant: (n, n_items) float32 binary CSR, their new items in the window (the labels).
    """

    user_idx: npt.NDArray[np.int32]
    seen: sp.csr_matrix
    relevant: sp.csr_matrix

    def __len__(self) -> int:
        return int(self.user_idx.shape[0])

    def batch(self, log: Interactions, history_length: int) -> UserBatch:
        """The users' state after every training event (``now`` just after the log ends)."""
        now = int(log.timestamp.max()) + 1 if len(log) else 0
        return UserBatch.from_interactions(
            log, self.user_idx, history_length=history_length, now=now
        )


def validation_window(
    log: Interactions, valid: Interactions | None, *, max_users: int | None = None, seed: int = 0
) -> ValidationWindow | None:
    """The window of ``valid`` against training ``log`` (same id maps); ``None`` if it has no
    user with a new item. ``max_users`` keeps a seeded random subset (the measure's cost is
    linear in users; a few thousand pin it within noise)."""
    if valid is None or len(valid) == 0:
        return None
    seen = _binary(log.matrix)
    window = _binary(valid.matrix)
    relevant = _binary(window - window.multiply(seen[: window.shape[0]]))
    users = np.flatnonzero(np.diff(relevant.indptr) > 0).astype(np.int32)
    if users.size == 0:
        return None
    if max_users is not None and users.size > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    return ValidationWindow(users, seen[users], relevant[users])


def ndcg(
    item_idx: npt.NDArray[np.integer], relevant: sp.csr_matrix, k: int = VALIDATION_K
) -> float:
    """Mean binary nDCG@k of ranked lists ``item_idx`` (n, >= k) against ``relevant`` (n, items).

    Padding (``PAD_ITEM``) earns nothing; a row without relevant items counts 0.
    """
    top = np.asarray(item_idx)[:, :k]
    n = top.shape[0]
    if n == 0:
        return 0.0
    valid = top != PAD_ITEM
    rows = np.broadcast_to(np.arange(n)[:, None], top.shape)
    hits = np.zeros(top.shape, dtype=bool)
    hits[valid] = np.asarray(relevant[rows[valid], top[valid]]).ravel() > 0
    discounts = 1.0 / np.log2(np.arange(2, top.shape[1] + 2))
    dcg = hits @ discounts
    n_relevant = np.minimum(np.diff(relevant.indptr), top.shape[1])
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])[n_relevant]
    return float(np.mean(np.divide(dcg, ideal, out=np.zeros(n), where=ideal > 0)))


def hill_climb(n: int, score: Callable[[int], float]) -> int:
    """The index of a local maximum of ``score`` over grid positions ``0 .. n-1``.

    Starts in the middle and moves to the better neighbour while one scores higher (ties stay),
    so a unimodal curve costs about ``log``-many evaluations fewer than the whole grid; ``score``
    should cache, since a position may be asked for twice.
    """
    best = (n - 1) // 2
    while True:
        neighbours = [i for i in (best - 1, best + 1) if 0 <= i < n]
        better = max(neighbours, key=score, default=best)
        if score(better) <= score(best):
            return best
        best = better


def _binary(matrix: sp.csr_matrix) -> sp.csr_matrix:
    out = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    out.data[:] = 1.0
    out.eliminate_zeros()
    return out
