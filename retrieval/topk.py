"""Batched top-``k`` selection shared by the candidate sources (and the helpers it rests on).

Three shapes of score cover every source here, each with its own vectorized selection:

* :func:`dense_topk`  - a dense (n, n_items) score matrix built block by block (ALS, cold start);
* :func:`ranked_topk` - one global ranking shared by every user, minus each row's exclusions
  (popularity);
* :func:`sparse_topk` - a sparse (n, n_items) score matrix (co-visitation).

All of them return :class:`~retrieval.base.Candidates` (best first, ``PAD_ITEM`` / ``-inf`` at the
end of short rows), never return an excluded item, and break score ties by the lower item index
(:func:`dense_topk` by ``Candidates.from_scores``' own rule), so a row's answer does not depend on
the other rows of the batch. :func:`align_exclude` and :func:`excluded_mask` bring a caller's
exclusions into that form; :func:`concatenated_ranges` gathers the entries of CSR rows (also used
by the ranking features).

A source's saved state (``config.json`` and memory-mappable arrays) is written and read by
:mod:`retrieval.state_io`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from data.errors import DataError
from data.validation import non_negative_int
from retrieval._sorting import descending_key, sort_order
from retrieval.base import Candidates

ScoreBlock = Callable[[int, int], npt.NDArray[np.floating]]
"""``score_rows(start, stop) -> (stop - start, n_items)`` dense scores of a block of rows."""


def check_k(k: int) -> int:
    """``k`` as an int; ``DataError`` unless it is a non-negative integer."""
    return non_negative_int(k, "k", error=DataError)


def align_exclude(
    exclude: sp.spmatrix | sp.sparray | None, n_rows: int, n_items: int
) -> sp.csr_matrix | None:
    """``exclude`` as an (n_rows, n_items) CSR; ``None`` when there is nothing to exclude.

    The caller's matrix may be wider than the source's item space (items added to the id map
    after training: the source cannot return them anyway, so those columns are dropped) or
    narrower (an older item map: padded with empty columns). A row count different from the
    batch is a caller error. The result is binary (every stored entry set to 1): a stored entry
    excludes its item whatever its value. A matrix that already has that form is returned as is
    (no copy: treat the result as read-only), which is what the serving pipeline passes.
    """
    if exclude is None:
        return None
    if exclude.shape[0] != n_rows:
        raise DataError(
            f"exclude has {exclude.shape[0]} rows for a batch of {n_rows} users; "
            "it needs one row per user"
        )
    if _is_aligned_binary(exclude, n_items):
        return exclude if exclude.nnz else None
    matrix = sp.csr_matrix(exclude, dtype=np.float32, copy=True)
    matrix.data[:] = 1.0
    if matrix.shape[1] > n_items:
        matrix = matrix[:, :n_items]
    elif matrix.shape[1] < n_items:
        matrix = sp.csr_matrix((matrix.data, matrix.indices, matrix.indptr), (n_rows, n_items))
    return matrix if matrix.nnz else None


def _is_aligned_binary(matrix: sp.spmatrix | sp.sparray, n_items: int) -> bool:
    return (
        isinstance(matrix, sp.csr_matrix)
        and matrix.shape[1] == n_items
        and matrix.dtype == np.float32
        and bool(np.all(matrix.data == 1))
    )


def excluded_mask(
    exclude: sp.csr_matrix | None, items: npt.NDArray[np.integer]
) -> npt.NDArray[np.bool_]:
    """(n, L) bool: ``items[r, j]`` is stored in row ``r`` of ``exclude`` (n, n_items).

    ``PAD_ITEM`` and items outside the matrix are never excluded.
    """
    mask = np.zeros(items.shape, dtype=bool)
    if exclude is None or exclude.nnz == 0:
        return mask
    valid = (items >= 0) & (items < exclude.shape[1])
    rows = np.broadcast_to(np.arange(items.shape[0])[:, None], items.shape)
    mask[valid] = pair_excluded(exclude, rows[valid], items[valid])
    return mask


def pair_excluded(
    exclude: sp.csr_matrix, rows: npt.NDArray[np.integer], items: npt.NDArray[np.integer]
) -> npt.NDArray[np.bool_]:
    """(m,) bool: the pair ``(rows[j], items[j])`` is stored in ``exclude``.

    Vectorized as a sorted-key lookup on ``row * n_items + item`` (no per-row Python loop),
    read straight from the CSR arrays: a scipy conversion (``tocoo``) costs more than the whole
    lookup for the few hundred entries of a serving request.
    """
    n_items = exclude.shape[1]
    per_row = np.diff(exclude.indptr)
    row_of_entry = np.repeat(np.arange(per_row.size, dtype=np.int64), per_row)
    keys = np.sort(row_of_entry * n_items + exclude.indices[: row_of_entry.size])
    query = rows.astype(np.int64) * n_items + items
    if keys.size == 0:
        return np.zeros(query.shape, dtype=bool)
    position = np.searchsorted(keys, query).clip(max=keys.size - 1)
    return keys[position] == query


def dense_topk(
    score_rows: ScoreBlock,
    n_rows: int,
    n_items: int,
    k: int,
    exclude: sp.csr_matrix | None,
    block_elements: int,
) -> Candidates:
    """Top-``k`` of a dense score matrix produced ``block_elements`` scores at a time.

    Bounds memory to one block of about ``block_elements`` float32 scores however many users
    and items there are; non-finite scores (e.g. ``-inf`` for a user without a vector) never
    become candidates.
    """
    out = Candidates.empty(n_rows, k)
    rows_per_block = max(1, block_elements // max(n_items, 1))
    for start in range(0, n_rows, rows_per_block):
        stop = min(start + rows_per_block, n_rows)
        block = Candidates.from_scores(
            score_rows(start, stop), k, None if exclude is None else exclude[start:stop]
        )
        out.item_idx[start:stop] = block.item_idx
        out.scores[start:stop] = block.scores
    return out


def ranked_topk(
    order: npt.NDArray[np.integer],
    ordered_scores: npt.NDArray[np.floating],
    n_rows: int,
    k: int,
    exclude: sp.csr_matrix | None,
) -> Candidates:
    """Top-``k`` of one global ranking for each of ``n_rows`` rows, minus each row's exclusions.

    order:          (m,) item indices, best first.
    ordered_scores: (m,) their scores, non-increasing.

    Only the first ``k + (items the row excludes)`` entries of the ranking can reach a row's
    top ``k``. One heavy user's seen set must not widen every row, so all rows first look at
    ``k + min(most excluded, k)`` entries, and only the rows left short look further.
    """
    out = Candidates.empty(n_rows, k)
    if k == 0 or order.size == 0 or n_rows == 0:
        return out
    excluded = np.zeros(n_rows, np.int64) if exclude is None else np.diff(exclude.indptr)
    width = min(order.size, k + min(int(excluded.max()), k))
    rows = np.arange(n_rows)
    filled = _fill_from_ranking(out, rows, order, ordered_scores, width, exclude, k)
    needed = np.minimum(k + excluded, order.size)
    short = np.flatnonzero((filled < k) & (needed > width))
    if short.size:
        wider = int(needed[short].max())
        assert exclude is not None  # only rows with exclusions can be short
        _fill_from_ranking(out, short, order, ordered_scores, wider, exclude[short], k)
    return out


def _fill_from_ranking(
    out: Candidates,
    rows: npt.NDArray[np.int64],
    order: npt.NDArray[np.integer],
    ordered_scores: npt.NDArray[np.floating],
    width: int,
    exclude_rows: sp.csr_matrix | None,
    k: int,
) -> npt.NDArray[np.int64]:
    """Write the top-``k`` non-excluded of the ranking's first ``width`` entries into ``rows``
    of ``out`` (``exclude_rows``: those rows' exclusions); returns how many each row got."""
    items = np.broadcast_to(order[:width].astype(np.int32), (rows.size, width))
    keep = ~excluded_mask(exclude_rows, items)
    rank = np.cumsum(keep, axis=1) - 1
    keep &= rank < k
    row_of = np.broadcast_to(rows[:, None], (rows.size, width))[keep]
    out.item_idx[row_of, rank[keep]] = items[keep]
    scores = np.broadcast_to(ordered_scores[:width].astype(np.float32), (rows.size, width))
    out.scores[row_of, rank[keep]] = scores[keep]
    return keep.sum(axis=1)


def sparse_topk(matrix: sp.csr_matrix, k: int, exclude: sp.csr_matrix | None) -> Candidates:
    """Top-``k`` stored entries of each row of a sparse (n, n_items) score matrix.

    Entries that are not stored are not candidates (a row with three entries gets three items and
    padding), nor are non-finite or excluded ones. Ties go to the lower item index.
    """
    coo = matrix.tocoo()
    return entries_topk(coo.row, coo.col, coo.data, matrix.shape[0], k, exclude)


def entries_topk(
    rows: npt.NDArray[np.integer],
    items: npt.NDArray[np.integer],
    scores: npt.NDArray[np.floating],
    n_rows: int,
    k: int,
    exclude: sp.csr_matrix | None,
) -> Candidates:
    """:func:`sparse_topk` of the entries ``(rows[j], items[j]) = scores[j]`` (no duplicate
    pairs), for a caller that has them as arrays already."""
    out = Candidates.empty(n_rows, k)
    rows, items = rows.astype(np.int64, copy=False), items.astype(np.int32, copy=False)
    scores = scores.astype(np.float32, copy=False)
    keep = np.isfinite(scores)
    if exclude is not None:
        keep &= ~pair_excluded(exclude, rows, items)
    rows, items, scores = rows[keep], items[keep], scores[keep]
    order = sort_order([rows, descending_key(scores), items.astype(np.int64)])
    rows, items, scores = rows[order], items[order], scores[order]
    rank = np.arange(rows.size) - np.searchsorted(rows, np.arange(n_rows))[rows]
    top = rank < k
    out.item_idx[rows[top], rank[top]] = items[top]
    out.scores[rows[top], rank[top]] = scores[top]
    return out


def concatenated_ranges(
    starts: npt.NDArray[np.integer], lengths: npt.NDArray[np.integer]
) -> npt.NDArray[np.int64]:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``, vectorized."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.asarray(starts, dtype=np.int64) - (np.cumsum(lengths) - lengths)
    return np.arange(total, dtype=np.int64) + np.repeat(shift, lengths)


__all__ = [
    "check_k",
    "align_exclude",
    "concatenated_ranges",
    "dense_topk",
    "excluded_mask",
    "pair_excluded",
    "ranked_topk",
    "entries_topk",
    "sparse_topk",
]


def prune_rows(matrix: sp.csr_matrix, keep: int) -> sp.csr_matrix:
    """The ``keep`` largest entries of each row (ties to the lower column); ``0`` keeps all."""
    matrix = sp.csr_matrix(matrix)
    if keep == 0 or np.diff(matrix.indptr).max(initial=0) <= keep:
        return matrix.sorted_indices()
    coo = matrix.tocoo()
    order = np.lexsort((coo.col, -coo.data, coo.row))
    rows, cols, data = coo.row[order], coo.col[order], coo.data[order]
    rank = np.arange(rows.size) - np.searchsorted(rows, rows, side="left")
    kept = rank < keep
    pruned = sp.csr_matrix((data[kept], (rows[kept], cols[kept])), shape=matrix.shape)
    pruned.sort_indices()
    return pruned
