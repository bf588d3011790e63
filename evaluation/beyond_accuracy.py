"""Beyond accuracy: what the lists look like, whatever the users did next.

Accuracy metrics reward a recommender that shows everyone the same blockbusters. These measures
describe the lists themselves, so a report can show what an accuracy gain costs:

* **catalog coverage@K** - share of the catalogue shown to anyone (:func:`catalog_coverage`,
  from :mod:`evaluation.metrics`).
* **novelty@K** - mean self-information ``-log2 p_i`` of the listed items, ``p_i`` the item's share
  of training interactions (Zhou et al. 2010, PNAS, "Solving the apparent diversity-accuracy
  dilemma"): recommending a long-tail item is more informative than a hit.
* **intra-list diversity@K** - ``1 -`` the mean pairwise cosine similarity of the listed items'
  vectors, or of their categories (Ziegler et al. 2005, "Improving recommendation lists through
  topic diversification").
* **popularity bias** - the mean popularity percentile of recommended items against that of the
  training log (Abdollahpouri et al. 2019, "The unfairness of popularity bias in
  recommendation"), and the Gini coefficient of item exposure (0: every item shown equally
  often; towards 1: a few items take every slot).

Inputs follow :mod:`evaluation.metrics`: ``recommended`` is ``(n_users, K)`` int item indices,
best first, ``-1`` padded at the end; every listed slot counts (a repeated item twice). Per-user
measures return ``(n_users,)`` float64 with ``NaN`` for a list too short to define them.
``item_counts`` is the ``(n_items,)`` number of training events per item
(:attr:`data.interactions.Interactions.item_counts`); item indices live in that item space.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike, NDArray

from data.errors import DataError
from data.validation import non_negative_int
from evaluation.metrics import PADDING, catalog_coverage, mean

__all__ = [
    "beyond_accuracy",
    "catalog_coverage",
    "category_vectors",
    "exposure_counts",
    "exposure_gini",
    "gini",
    "intra_list_diversity",
    "log_popularity_percentile",
    "mean_popularity_percentile",
    "novelty",
    "popularity_percentiles",
    "self_information",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
ItemVectors: TypeAlias = NDArray[np.floating] | sp.spmatrix | sp.sparray


# --------------------------------------------------------------------------------------------
# Item-level quantities
# --------------------------------------------------------------------------------------------


def self_information(item_counts: ArrayLike) -> FloatArray:
    """``(n_items,)`` bits ``-log2(c_i / sum c)`` of each item's share of training events.

    An item with no training event would carry infinite information; it is counted as if seen
    once, the most novel any observed item can be, so one cold item cannot make a mean infinite.
    """
    counts = _item_counts(item_counts)
    total = counts.sum()
    if total == 0:
        raise DataError("item_counts are all zero: novelty needs a training log with events")
    return np.log2(total / np.maximum(counts, 1).astype(np.float64))


def popularity_percentiles(item_counts: ArrayLike) -> FloatArray:
    """``(n_items,)`` mid-rank percentile of each item's training count, in ``(0, 1)``.

    ``(#items less popular + 0.5 * #items as popular) / n_items``: ties share a percentile, and
    the catalogue's items average exactly 0.5, so 0.5 is what a popularity-blind list scores.
    """
    counts = _item_counts(item_counts)
    ordered = np.sort(counts)
    below = np.searchsorted(ordered, counts, side="left")
    tied = np.searchsorted(ordered, counts, side="right") - below
    return (below + 0.5 * tied) / max(counts.size, 1)


def category_vectors(item_categories: ArrayLike, n_categories: int | None = None) -> sp.csr_matrix:
    """``(n_items, n_categories)`` one-hot CSR from ``(n_items,)`` int labels (``-1``: none).

    Cosine similarity of one-hot rows is category equality, so this turns labels into vectors
    for :func:`intra_list_diversity`. An item with no category has a zero row.
    """
    labels = np.asarray(item_categories)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(
            f"item_categories must be 1-D integer labels, got shape {labels.shape}, "
            f"dtype {labels.dtype}"
        )
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < -1:
        raise DataError(f"item_categories holds {labels.min()}; labels are >= 0, or -1 for none")
    width = int(labels.max()) + 1 if labels.size else 0
    n_categories = width if n_categories is None else max(int(n_categories), width)
    rows = np.flatnonzero(labels >= 0)
    return sp.csr_matrix(
        (np.ones(rows.size, np.float64), (rows, labels[rows])),
        shape=(labels.size, n_categories),
    )


# --------------------------------------------------------------------------------------------
# Per-user measures: (n_users,) float64
# --------------------------------------------------------------------------------------------


def novelty(recommended: ArrayLike, item_counts: ArrayLike, k: int | None = None) -> FloatArray:
    """Mean self-information (bits) of each user's top ``k``; ``NaN`` for an empty list."""
    info = self_information(item_counts)
    rec, valid = _recommended(recommended, info.size, k)
    return _row_mean(info, rec, valid)


def mean_popularity_percentile(
    recommended: ArrayLike, item_counts: ArrayLike, k: int | None = None
) -> FloatArray:
    """Mean popularity percentile (:func:`popularity_percentiles`) of each user's top ``k``.

    Compare with :func:`log_popularity_percentile`: above it, the lists lean to popular items more
    than the users' own behaviour did. ``NaN`` for an empty list.
    """
    percentile = popularity_percentiles(item_counts)
    rec, valid = _recommended(recommended, percentile.size, k)
    return _row_mean(percentile, rec, valid)


def intra_list_diversity(
    recommended: ArrayLike,
    item_vectors: ItemVectors,
    k: int | None = None,
) -> FloatArray:
    """``1 -`` the mean cosine similarity over pairs of distinct slots of each user's top ``k``.

    item_vectors: ``(n_items, d)`` dense array or sparse matrix (embeddings, a category multi-hot
        such as ``ItemCatalog.categories``, or :func:`category_vectors` of labels). An item with a
        zero vector is unlike every item.
    Lists with fewer than two items get ``NaN``. Computed without the ``k x k`` similarity
    matrices: with ``l_i`` the unit vectors of a list and ``s = sum_i l_i``,
    ``sum_{i != j} l_i . l_j = |s|^2 - sum_i |l_i|^2``; so the cost is one sparse product.
    """
    unit, norms_squared = _unit_rows(item_vectors)
    rec, valid = _recommended(recommended, unit.shape[0], k)
    n_users = rec.shape[0]
    rows, cols = np.nonzero(valid)
    # (n_users, n_items) slot counts: a repeated item adds its vector twice, as two slots do.
    slots = sp.csr_matrix(
        (np.ones(rows.size, np.float64), (rows, rec[rows, cols])), shape=(n_users, unit.shape[0])
    )
    summed = slots @ unit
    if sp.issparse(summed):
        squared_sum = np.asarray(summed.multiply(summed).sum(axis=1)).ravel()
    else:
        squared_sum = np.einsum("nd,nd->n", summed, summed)
    self_pairs = slots @ norms_squared
    m = valid.sum(axis=1).astype(np.float64)
    out = np.full(n_users, np.nan)
    defined = m >= 2
    similarity = (squared_sum - self_pairs)[defined] / (m * (m - 1))[defined]
    out[defined] = 1.0 - similarity
    return out


# --------------------------------------------------------------------------------------------
# List-level measures
# --------------------------------------------------------------------------------------------


def exposure_counts(recommended: ArrayLike, n_items: int, k: int | None = None) -> IntArray:
    """``(n_items,)`` how many slots of the top ``k`` (over all users) show each item."""
    rec, valid = _recommended(recommended, non_negative_int(n_items, "n_items", error=DataError), k)
    return np.bincount(rec[valid], minlength=n_items).astype(np.int64)


def gini(values: ArrayLike) -> float:
    """Gini coefficient of non-negative ``values``: 0 when equal, ``(n-1)/n`` when one has all.

    ``G = sum_i (2i - n - 1) x_(i) / (n sum x)`` over the values sorted ascending (``i`` from 1).
    ``NaN`` when there are no values or they sum to 0.
    """
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if x.size and (not np.isfinite(x).all() or x[0] < 0):
        raise DataError(f"gini needs finite non-negative values, got min {x[0]}, max {x[-1]}")
    total = x.sum()
    if x.size == 0 or total == 0:
        return float("nan")
    n = x.size
    weights = 2.0 * np.arange(1, n + 1) - n - 1
    return float(weights @ x / (n * total))


def exposure_gini(recommended: ArrayLike, n_items: int, k: int | None = None) -> float:
    """Gini of :func:`exposure_counts` over the whole catalogue (never-shown items count as 0)."""
    return gini(exposure_counts(recommended, n_items, k))


def log_popularity_percentile(item_counts: ArrayLike) -> float:
    """Mean popularity percentile of the training log's events (each event weighs one).

    The reference for :func:`mean_popularity_percentile`: how mainstream the users' own
    behaviour is.
    """
    counts = _item_counts(item_counts)
    total = counts.sum()
    if total == 0:
        return float("nan")
    return float(counts @ popularity_percentiles(counts) / total)


def beyond_accuracy(
    recommended: ArrayLike,
    item_counts: ArrayLike,
    ks: Sequence[int] = (10,),
    *,
    item_vectors: ItemVectors | None = None,
) -> dict[str, float]:
    """Every measure of this module at every cutoff, keyed ``f"{name}@{k}"``.

    Keys per cutoff: ``coverage``, ``novelty``, ``popularity_percentile``, ``exposure_gini``, and
    ``diversity`` when ``item_vectors`` are given; plus ``log_popularity_percentile``, the
    training log's reference value. Per-user measures are averaged over the users they are
    defined for (see :func:`evaluation.metrics.mean`).
    """
    counts = _item_counts(item_counts)
    n_items = counts.size
    rec, _ = _recommended(recommended, n_items, None)
    if isinstance(ks, int):
        raise DataError(f"ks must be a sequence of cutoffs, e.g. ({ks},), got the int {ks}")
    if len(ks) == 0:
        raise DataError("ks is empty: give at least one cutoff")
    result: dict[str, float] = {}
    for k in sorted({_cutoff(k, rec.shape[1]) for k in ks}):
        result[f"coverage@{k}"] = catalog_coverage(rec, n_items, k)
        result[f"novelty@{k}"] = mean(novelty(rec, counts, k)).value
        result[f"popularity_percentile@{k}"] = mean(
            mean_popularity_percentile(rec, counts, k)
        ).value
        result[f"exposure_gini@{k}"] = exposure_gini(rec, n_items, k)
        if item_vectors is not None:
            result[f"diversity@{k}"] = mean(intra_list_diversity(rec, item_vectors, k)).value
    result["log_popularity_percentile"] = log_popularity_percentile(counts)
    return result


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _row_mean(per_item: FloatArray, rec: IntArray, valid: NDArray[np.bool_]) -> FloatArray:
    """Mean of ``per_item`` over each row's valid slots; ``NaN`` for a row with none."""
    values = np.where(valid, per_item[np.where(valid, rec, 0)], 0.0)
    m = valid.sum(axis=1)
    out = np.full(rec.shape[0], np.nan)
    np.divide(values.sum(axis=1), m, out=out, where=m > 0)
    return out


def _unit_rows(item_vectors: ItemVectors) -> tuple[FloatArray | sp.csr_matrix, FloatArray]:
    """Rows scaled to unit length (zero rows stay zero) and each row's squared norm (0 or 1).

    Each row is divided by its largest absolute entry before its norm is taken, so tiny or huge
    vectors neither underflow to a zero norm nor overflow when squared.
    """
    if sp.issparse(item_vectors):
        matrix = sp.csr_matrix(item_vectors, dtype=np.float64, copy=True)
        if matrix.ndim != 2:
            raise DataError(f"item_vectors must be 2-D (n_items, d), got {matrix.shape}")
        _check_finite(matrix.data, "item_vectors")
        matrix.eliminate_zeros()
        row_of_entry = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
        peak = np.zeros(matrix.shape[0])
        np.maximum.at(peak, row_of_entry, np.abs(matrix.data))
        matrix.data /= peak[row_of_entry]
        norms = np.sqrt(np.bincount(row_of_entry, matrix.data**2, minlength=matrix.shape[0]))
        matrix.data /= norms[row_of_entry]
        return matrix, (peak > 0).astype(np.float64)
    dense = np.asarray(item_vectors, dtype=np.float64)
    if dense.ndim != 2:
        raise DataError(f"item_vectors must be 2-D (n_items, d), got shape {dense.shape}")
    _check_finite(dense, "item_vectors")
    peak = np.abs(dense).max(axis=1, initial=0.0)
    nonzero = peak > 0
    unit = np.zeros_like(dense)
    scaled = dense[nonzero] / peak[nonzero, None]
    unit[nonzero] = scaled / np.linalg.norm(scaled, axis=1, keepdims=True)
    return unit, nonzero.astype(np.float64)


def _recommended(
    recommended: ArrayLike, n_items: int, k: int | None
) -> tuple[IntArray, NDArray[np.bool_]]:
    """``recommended[:, :k]`` as int64 and its (n_users, k) mask of non-padding slots."""
    rec = np.asarray(recommended)
    if rec.ndim != 2:
        raise DataError(f"recommended must be 2-D (n_users, K), got shape {rec.shape}")
    if rec.size and rec.dtype.kind not in "iu":
        raise DataError(f"recommended must hold integer item indices, got dtype {rec.dtype}")
    rec = rec.astype(np.int64)[:, : _cutoff(k, rec.shape[1])]
    valid = rec != PADDING
    if rec.size and (rec.min() < PADDING or rec.max() >= n_items):
        bad = int(rec.min()) if rec.min() < PADDING else int(rec.max())
        raise DataError(
            f"recommended holds item {bad}, outside a catalogue of {n_items} items "
            f"(valid: 0..{n_items - 1}, or {PADDING} for padding)"
        )
    return rec, valid


def _cutoff(k: int | None, n_columns: int) -> int:
    if k is None:
        return n_columns
    k = non_negative_int(k, "k", error=DataError)
    if not 1 <= k <= n_columns:
        raise DataError(f"cutoff k={k} must lie in 1..{n_columns} (the columns of recommended)")
    return k


def _item_counts(item_counts: ArrayLike) -> NDArray[np.float64]:
    counts = np.asarray(item_counts, dtype=np.float64)
    if counts.ndim != 1:
        raise DataError(f"item_counts must be 1-D (n_items,), got shape {counts.shape}")
    _check_finite(counts, "item_counts")
    if counts.size and counts.min() < 0:
        raise DataError(f"item_counts must be >= 0, got {counts.min()}")
    return counts


def _check_finite(values: NDArray[np.floating], name: str) -> None:
    if not np.isfinite(values).all():
        raise DataError(f"{name} holds non-finite values")
