"""Searching a :class:`~retrieval.index.VectorIndex` for a source's candidates.

The two-tower and ALS sources search their index past each user's excluded items
(:func:`search_past_exclusions`) and score what it found again from their float32 vectors
(:func:`search_exact_topk`), so that an index storing compressed vectors still yields the exact
top ``k``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from retrieval._sorting import descending_key
from retrieval.base import PAD_ITEM
from retrieval.index import VectorIndex
from retrieval.topk import excluded_mask


def search_past_exclusions(
    index: VectorIndex, queries: npt.NDArray[np.float32], k: int, mask: sp.csr_matrix | None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """(n, F) index results holding each row's top ``k`` non-excluded items: items (-1 padded),
    their scores (-inf padded) and which of them to keep.

    A row excluding ``e`` items needs ``k + e`` results in the worst case, but the batch shares
    one search width, and a heavy user's seen set would widen every row's search. So the first
    search allows each row ``k`` exclusions beyond ``k``; only rows left short of ``k`` that
    could still find more are searched again, as wide as they need. For the flat and IVF kinds,
    whose wider results extend the narrower ones, the kept items equal those of one search of
    width ``k + most excluded``. Used by the two-tower and ALS sources.
    """
    n_indexed = len(index)
    excluded = np.zeros(len(queries), np.int64) if mask is None else np.diff(mask.indptr)
    fetch = min(k + min(int(excluded.max()), k), n_indexed)
    found, scores = index.search(queries, fetch)
    keep = (found >= 0) & ~excluded_mask(mask, found)
    needed = np.minimum(k + excluded, n_indexed)
    short = np.flatnonzero((keep.sum(axis=1) < k) & (needed > fetch))
    if short.size == 0:
        return found, scores, keep
    wider = int(needed[short].max())
    again, again_scores = index.search(queries[short], wider)
    padded = np.full((len(queries), wider), -1, dtype=found.dtype)
    padded_scores = np.full((len(queries), wider), -np.inf, dtype=np.float32)
    padded[:, :fetch], padded_scores[:, :fetch] = found, scores
    padded[short], padded_scores[short] = again, again_scores
    keep = (padded >= 0) & ~excluded_mask(mask, padded)
    return padded, padded_scores, keep


def search_exact_topk(
    index: VectorIndex,
    queries: npt.NDArray[np.float32],
    query_vectors: npt.NDArray[np.float32],
    item_vectors: npt.NDArray[np.float32],
    k: int,
    mask: sp.csr_matrix | None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Each row's top ``k`` non-excluded items, found through ``index`` and scored exactly as
    ``query_vectors[r] . item_vectors[item]``: ``(items, scores)`` of width <= ``k``, padded with
    ``PAD_ITEM`` / ``-inf`` where a row has fewer.

    The index is asked for :meth:`VectorIndex.refine_depth` results, so an index that stores
    compressed vectors still yields the exact top ``k``. Ties go to the lower item. ``queries``
    is what the index is searched with (a source may transform its vectors for the index, as ALS
    lifts them); ``item_vectors`` is indexed by item. Used by the two-tower and ALS sources.
    """
    found, _, keep = search_past_exclusions(index, queries, index.refine_depth(k), mask)
    exact = np.einsum("nd,nfd->nf", query_vectors, item_vectors[np.where(keep, found, 0)])
    scores = np.where(keep, exact, -np.inf).astype(np.float32)
    # Best score first, ties to the lower item, dropped entries last: one packed int64 key.
    n_items = item_vectors.shape[0]
    tie = np.where(keep, found, n_items).astype(np.int64)
    packed = (descending_key(scores) << int(n_items).bit_length()) | tie
    order = np.argsort(packed, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_items = np.take_along_axis(found, order, axis=1)
    return np.where(np.isfinite(top_scores), top_items, PAD_ITEM), top_scores
