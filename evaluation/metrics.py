"""Top-K ranking metrics, computed for many users at once.

Every metric is a vectorised function of two inputs:

``recommended``: ``(n_users, K)`` integer array of item indices in rank order (column 0 is rank 1).
    A user with fewer than ``K`` recommendations is padded with ``-1`` at the *end* of the row; an
    item after a ``-1`` is rejected, because a hole in a list has no agreed meaning (does the next
    item keep its rank or move up?).
``relevant``: ``(n_users, n_items)`` scipy sparse matrix of the held-out items; any nonzero entry
    is relevant (binary relevance). Row ``u`` of both inputs is the same user.

Conventions, chosen to agree with ``trec_eval`` where it has the same measure:

* Ranks are 1-based and a padded slot still occupies its rank; ``precision@k`` divides by ``k``
  whatever the list length (trec's ``P.k``).
* An item recommended twice in one row counts once, at its first (best) rank; the later copy is a
  miss. Counting it again would let a ranker raise recall above 1 by repeating a hit.
* A user with no relevant items gets ``NaN`` for every metric (no list can be right or wrong for
  them); :func:`mean` skips them and says how many users it averaged.

Per-user metrics return ``(n_users,)`` float64 arrays so callers can bootstrap or segment them;
:func:`evaluate_rankings` is the one-call summary used by reports.

Only numpy and scipy are imported: metrics depend on nothing else in the project.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
from numpy.typing import ArrayLike, NDArray

from data.validation import integer, non_negative_int

__all__ = [
    "AP_NORMALIZATIONS",
    "METRIC_NAMES",
    "MetricMean",
    "average_precision_at_k",
    "catalog_coverage",
    "evaluate_rankings",
    "hit_matrix",
    "hit_rate_at_k",
    "mean",
    "mrr_at_k",
    "ndcg_at_k",
    "precision_at_k",
    "recall_at_k",
    "relevance_from_pairs",
]

PADDING = -1
"""The item index that fills a row of ``recommended`` past the end of a user's list."""

APNormalization = Literal["capped", "n_relevant"]
AP_NORMALIZATIONS: tuple[str, ...] = ("capped", "n_relevant")

METRIC_NAMES: tuple[str, ...] = (
    "ndcg",
    "mrr",
    "recall",
    "precision",
    "map",
    "hit_rate",
    "coverage",
)
"""Metric names accepted by :func:`evaluate_rankings`; each gives a key ``f"{name}@{k}"``."""

_Int64Array = NDArray[np.int64]
_FloatArray = NDArray[np.float64]
_BoolArray = NDArray[np.bool_]


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def relevance_from_pairs(
    user_idx: ArrayLike, item_idx: ArrayLike, n_users: int, n_items: int
) -> sp.csr_matrix:
    """Build the binary ``(n_users, n_items)`` relevance matrix from (user, item) index pairs.

    ``user_idx`` and ``item_idx`` are equal-length 1-D integer arrays; pair ``j`` marks item
    ``item_idx[j]`` relevant for user ``user_idx[j]``. Repeated pairs collapse to one entry.
    The result is a canonical CSR matrix (sorted indices, no duplicates) with boolean data.
    """
    n_users = non_negative_int(n_users, "n_users", error=ValueError)
    n_items = non_negative_int(n_items, "n_items", error=ValueError)
    users = _index_vector(user_idx, "user_idx")
    items = _index_vector(item_idx, "item_idx")
    if users.shape != items.shape:
        raise ValueError(f"{users.size} user indices but {items.size} item indices")
    _check_range(users, n_users, "user_idx", "n_users")
    _check_range(items, n_items, "item_idx", "n_items")
    _check_key_space(n_users, n_items)

    # One sorted, de-duplicated int64 key per pair is the CSR layout already: rows ascending,
    # columns ascending within a row. (Sort + neighbour compare: np.unique is far slower here.)
    keys = np.sort(users * n_items + items)
    repeated = np.zeros(keys.size, dtype=np.bool_)
    repeated[1:] = keys[1:] == keys[:-1]
    keys = keys[~repeated]
    rows, cols = np.divmod(keys, max(n_items, 1))  # an empty catalog has no pairs to split
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_users), out=indptr[1:])
    return sp.csr_matrix(
        (np.ones(keys.size, dtype=np.bool_), cols, indptr), shape=(n_users, n_items)
    )


def hit_matrix(recommended: ArrayLike, relevant: sp.spmatrix | sp.sparray) -> _BoolArray:
    """Return ``(n_users, K)`` bool: ``True`` where the recommended item is relevant to that user.

    Padding (``-1``) is never a hit. An item repeated within a row is a hit only at its first
    occurrence (see the module docstring).
    """
    rec = _as_recommended(recommended)
    rel = _as_relevance(relevant)
    _check_compatible(rec, rel)
    return _hits(rec, rel)


# --------------------------------------------------------------------------------------------
# Per-user metrics: (n_users,) float64, NaN for users with no relevant items
# --------------------------------------------------------------------------------------------


def ndcg_at_k(
    recommended: ArrayLike, relevant: sp.spmatrix | sp.sparray, k: int | None = None
) -> _FloatArray:
    """Normalised discounted cumulative gain at ``k`` (binary gain, ``1 / log2(rank + 1)``).

    The ideal DCG places ``min(n_relevant, k)`` relevant items at the top, so a perfect list
    scores 1 even when the user has more relevant items than ``k`` (trec's ``ndcg_cut.k``).
    ``k`` defaults to the number of columns of ``recommended``.
    """
    hits, n_relevant, k = _prepare(recommended, relevant, k)
    return _ndcg(hits, n_relevant, k)


def mrr_at_k(
    recommended: ArrayLike, relevant: sp.spmatrix | sp.sparray, k: int | None = None
) -> _FloatArray:
    """Reciprocal rank of the first hit within the top ``k``; 0 when there is none."""
    hits, n_relevant, k = _prepare(recommended, relevant, k)
    return _mrr(hits, n_relevant, k)


def recall_at_k(
    recommended: ArrayLike, relevant: sp.spmatrix | sp.sparray, k: int | None = None
) -> _FloatArray:
    """Hits in the top ``k`` divided by the user's number of relevant items.

    Bounded by ``min(n_relevant, k) / n_relevant``: a user with more relevant items than ``k``
    cannot reach 1 (trec's ``recall.k``).
    """
    hits, n_relevant, k = _prepare(recommended, relevant, k)
    return _recall(hits, n_relevant, k)


def precision_at_k(
    recommended: ArrayLike, relevant: sp.spmatrix | sp.sparray, k: int | None = None
) -> _FloatArray:
    """Hits in the top ``k`` divided by ``k``; padded slots count as misses (trec's ``P.k``)."""
    hits, n_relevant, k = _prepare(recommended, relevant, k)
    return _precision(hits, n_relevant, k)


def average_precision_at_k(
    recommended: ArrayLike,
    relevant: sp.spmatrix | sp.sparray,
    k: int | None = None,
    *,
    normalization: APNormalization = "capped",
) -> _FloatArray:
    """Average precision at ``k``: the sum of ``precision@i`` over hit ranks ``i <= k``, normalised.

    ``normalization="capped"`` (default) divides by ``min(n_relevant, k)``, the most hits a list
    of length ``k`` can hold, so a perfect list scores 1 whatever the size of the held-out set;
    dividing by ``n_relevant`` would mix list quality with how many items a user happens to have
    held out (the usual "MAP@K" of recommender benchmarks). ``normalization="n_relevant"`` divides
    by ``n_relevant``, the IR definition, equal to trec_eval's ``map_cut.k``.
    """
    hits, n_relevant, k = _prepare(recommended, relevant, k)
    return _average_precision(hits, n_relevant, k, normalization)


def hit_rate_at_k(
    recommended: ArrayLike, relevant: sp.spmatrix | sp.sparray, k: int | None = None
) -> _FloatArray:
    """1 if any of the top ``k`` is relevant, else 0."""
    hits, n_relevant, k = _prepare(recommended, relevant, k)
    return _hit_rate(hits, n_relevant, k)


def catalog_coverage(recommended: ArrayLike, n_items: int, k: int | None = None) -> float:
    """Fraction of the ``n_items`` catalog that appears anywhere in the top ``k`` of any row.

    A property of the lists alone, so every row counts, including users with no relevant items.
    Returns ``NaN`` for an empty catalog.
    """
    rec = _as_recommended(recommended)
    n_items = non_negative_int(n_items, "n_items", error=ValueError)
    k = _resolve_k(k, rec.shape[1])
    _check_item_range(rec[:, :k], n_items)
    return _coverage(rec[:, :k], n_items)


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricMean:
    """The mean of a per-user metric over the users it is defined for.

    ``value``: mean over non-NaN entries (``NaN`` when there are none).
    ``n_evaluated``: how many users entered the mean (those with at least one relevant item).
    ``n_users``: how many users were given, evaluated or not.
    """

    value: float
    n_evaluated: int
    n_users: int


def mean(per_user: ArrayLike) -> MetricMean:
    """Average a ``(n_users,)`` per-user metric, skipping ``NaN`` (users with nothing relevant)."""
    values = np.asarray(per_user, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"per-user metric must be 1-D (n_users,), got shape {values.shape}")
    defined = ~np.isnan(values)
    n_evaluated = int(defined.sum())
    # np.nanmean warns on an all-NaN input; no evaluated user is a normal outcome, not a warning.
    value = float(values[defined].mean()) if n_evaluated else float("nan")
    return MetricMean(value=value, n_evaluated=n_evaluated, n_users=int(values.size))


def evaluate_rankings(
    recommended: ArrayLike,
    relevant: sp.spmatrix | sp.sparray,
    ks: Sequence[int] = (10,),
    metrics: Sequence[str] = METRIC_NAMES,
    *,
    ap_normalization: APNormalization = "capped",
) -> dict[str, float]:
    """Mean of each metric at each cutoff, keyed ``f"{metric}@{k}"``, plus ``"n_users"``.

    ``metrics`` are names from :data:`METRIC_NAMES` (``"map"`` is :func:`average_precision_at_k`
    with ``ap_normalization``). User metrics are averaged over users with at least one relevant
    item; ``"n_users"`` is that count. ``"coverage@k"`` uses every row (see
    :func:`catalog_coverage`). Keys come cutoff by cutoff (ascending), metrics in the given order.
    The hit matrix is computed once, at the largest cutoff.
    """
    rec = _as_recommended(recommended)
    rel = _as_relevance(relevant)
    _check_compatible(rec, rel)
    cutoffs = _resolve_ks(ks, rec.shape[1])
    names = _resolve_metrics(metrics)
    _check_ap_normalization(ap_normalization)

    # Hits at cutoff k are the first k columns of the hits at the largest cutoff: the
    # first-occurrence rule for duplicates does not depend on how far the row extends.
    hits = _hits(rec[:, : cutoffs[-1]], rel)
    n_relevant = _n_relevant(rel)
    per_user = _per_user_kernels(ap_normalization)

    result: dict[str, float] = {}
    for k in cutoffs:
        for name in names:
            if name == "coverage":
                result[f"coverage@{k}"] = _coverage(rec[:, :k], rel.shape[1])
            else:
                result[f"{name}@{k}"] = mean(per_user[name](hits[:, :k], n_relevant, k)).value
    result["n_users"] = float(np.count_nonzero(n_relevant))
    return result


# --------------------------------------------------------------------------------------------
# Kernels: (hits (n_users, k) bool, n_relevant (n_users,) int64, k) -> (n_users,) float64
# --------------------------------------------------------------------------------------------

_Kernel = Callable[[_BoolArray, _Int64Array, int], _FloatArray]


def _ndcg(hits: _BoolArray, n_relevant: _Int64Array, k: int) -> _FloatArray:
    discount = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))
    dcg = hits @ discount
    # ideal[m] = DCG of m hits at ranks 1..m; index by the number of hits a perfect list holds.
    ideal = np.concatenate(([0.0], np.cumsum(discount)))
    return _per_user(dcg, ideal[np.minimum(n_relevant, k)], n_relevant)


def _mrr(hits: _BoolArray, n_relevant: _Int64Array, k: int) -> _FloatArray:
    first_rank = hits.argmax(axis=1) + 1  # argmax finds the first True; 1 for an all-False row
    reciprocal = np.where(hits.any(axis=1), 1.0 / first_rank, 0.0)
    return _per_user(reciprocal, np.ones_like(reciprocal), n_relevant)


def _recall(hits: _BoolArray, n_relevant: _Int64Array, k: int) -> _FloatArray:
    return _per_user(hits.sum(axis=1), n_relevant, n_relevant)


def _precision(hits: _BoolArray, n_relevant: _Int64Array, k: int) -> _FloatArray:
    return _per_user(hits.sum(axis=1), np.full(hits.shape[0], float(k)), n_relevant)


def _hit_rate(hits: _BoolArray, n_relevant: _Int64Array, k: int) -> _FloatArray:
    return _per_user(hits.any(axis=1), np.ones(hits.shape[0]), n_relevant)


def _average_precision(
    hits: _BoolArray, n_relevant: _Int64Array, k: int, normalization: APNormalization
) -> _FloatArray:
    _check_ap_normalization(normalization)
    precision_at_rank = np.cumsum(hits, axis=1) / np.arange(1, k + 1, dtype=np.float64)
    summed = np.where(hits, precision_at_rank, 0.0).sum(axis=1)
    denominator = np.minimum(n_relevant, k) if normalization == "capped" else n_relevant
    return _per_user(summed, denominator, n_relevant)


def _coverage(rec: _Int64Array, n_items: int) -> float:
    if n_items == 0:
        return float("nan")
    shown = np.zeros(n_items, dtype=np.bool_)
    shown[rec[rec != PADDING]] = True
    return float(shown.mean())


def _per_user_kernels(ap_normalization: APNormalization) -> dict[str, _Kernel]:
    def average_precision(hits: _BoolArray, n_relevant: _Int64Array, k: int) -> _FloatArray:
        return _average_precision(hits, n_relevant, k, ap_normalization)

    return {
        "ndcg": _ndcg,
        "mrr": _mrr,
        "recall": _recall,
        "precision": _precision,
        "map": average_precision,
        "hit_rate": _hit_rate,
    }


def _per_user(numerator: ArrayLike, denominator: ArrayLike, n_relevant: _Int64Array) -> _FloatArray:
    """``numerator / denominator`` per user, ``NaN`` where the user has no relevant items."""
    out = np.full(n_relevant.shape, np.nan, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=n_relevant > 0)
    return out


# --------------------------------------------------------------------------------------------
# The hit matrix
# --------------------------------------------------------------------------------------------


def _hits(rec: _Int64Array, rel: sp.csr_matrix) -> _BoolArray:
    """Vectorised lookup of every (user, recommended item) pair in the relevance matrix.

    Each pair becomes the int64 key ``user * n_items + item``. A canonical CSR matrix lists its
    entries row by row with sorted columns, so its keys are already sorted and one
    ``np.searchsorted`` answers all ``n_users * K`` lookups at once.
    """
    n_users, n_items = rel.shape
    rel_keys = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(rel.indptr)) * n_items
    rel_keys += rel.indices
    if rel_keys.size == 0:
        return np.zeros(rec.shape, dtype=np.bool_)

    keys = np.arange(n_users, dtype=np.int64)[:, None] * n_items + rec
    position = np.searchsorted(rel_keys, keys)
    np.minimum(position, rel_keys.size - 1, out=position)
    # A padding key (user * n_items - 1) can equal the previous user's last item: mask it out.
    hits = (rel_keys[position] == keys) & (rec != PADDING)

    # Duplicates: the same relevant entry (same `position`) found twice in one row. np.nonzero
    # walks row-major, so within a row earlier ranks come first, and a stable sort keeps that
    # order among equal positions: every element equal to its predecessor is a later copy.
    rows, cols = np.nonzero(hits)
    hit_position = position[rows, cols]
    order = np.argsort(hit_position, kind="stable")
    sorted_position = hit_position[order]
    repeat = order[1:][sorted_position[1:] == sorted_position[:-1]]
    hits[rows[repeat], cols[repeat]] = False
    return hits


def _n_relevant(rel: sp.csr_matrix) -> _Int64Array:
    return np.diff(rel.indptr).astype(np.int64, copy=False)


def _prepare(
    recommended: ArrayLike, relevant: sp.spmatrix | sp.sparray, k: int | None
) -> tuple[_BoolArray, _Int64Array, int]:
    """Validate the inputs of a per-user metric; return (hits at k, n_relevant, k)."""
    rec = _as_recommended(recommended)
    rel = _as_relevance(relevant)
    _check_compatible(rec, rel)
    k = _resolve_k(k, rec.shape[1])
    return _hits(rec[:, :k], rel), _n_relevant(rel), k


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _as_recommended(recommended: ArrayLike) -> _Int64Array:
    rec = np.asarray(recommended)
    if rec.ndim != 2:
        raise ValueError(f"recommended must be 2-D (n_users, K), got shape {rec.shape}")
    if rec.dtype.kind not in "iu":
        raise ValueError(f"recommended must hold integer item indices, got dtype {rec.dtype}")
    if rec.size and rec.min() < PADDING:
        row, col = np.unravel_index(int(rec.argmin()), rec.shape)
        raise ValueError(
            f"recommended[{row}, {col}] = {rec[row, col]}: item indices must be >= 0, "
            f"or {PADDING} for padding"
        )
    if rec.dtype.kind == "u" and rec.size and rec.max() > np.iinfo(np.int64).max:
        raise ValueError(f"recommended holds item index {rec.max()}, beyond int64")
    rec = rec.astype(np.int64, copy=False)
    padded = rec == PADDING
    after_padding = padded[:, :-1] & ~padded[:, 1:]
    if after_padding.any():
        row, col = np.argwhere(after_padding)[0]
        raise ValueError(
            f"recommended row {row} has item {rec[row, col + 1]} at column {col + 1} after "
            f"padding ({PADDING}) at column {col}; padding must come after the last item"
        )
    return rec


def _as_relevance(relevant: sp.spmatrix | sp.sparray) -> sp.csr_matrix:
    """Return ``relevant`` as canonical CSR with only nonzero entries, copying only if needed."""
    if not sp.issparse(relevant):
        raise ValueError(
            f"relevant must be a scipy sparse matrix (n_users, n_items), got "
            f"{type(relevant).__name__}; build one with relevance_from_pairs"
        )
    if relevant.ndim != 2:
        raise ValueError(f"relevant must be 2-D (n_users, n_items), got shape {relevant.shape}")
    rel = sp.csr_matrix(relevant)
    if not rel.has_canonical_format or not np.all(rel.data):
        # Never mutate the caller's arrays: fix a private copy.
        rel = rel.copy()
        rel.sum_duplicates()
        rel.eliminate_zeros()
    return rel


def _check_compatible(rec: _Int64Array, rel: sp.csr_matrix) -> None:
    n_users, n_items = rel.shape
    if rec.shape[0] != n_users:
        raise ValueError(
            f"recommended has {rec.shape[0]} user rows but relevant has {n_users} user rows"
        )
    _check_item_range(rec, n_items)
    _check_key_space(n_users, n_items)


def _check_item_range(rec: _Int64Array, n_items: int) -> None:
    if rec.size and rec.max() >= n_items:
        row, col = np.unravel_index(int(rec.argmax()), rec.shape)
        raise ValueError(
            f"recommended[{row}, {col}] = {rec[row, col]} is out of range for a catalog of "
            f"{n_items} items (valid: 0..{n_items - 1}, or {PADDING} for padding)"
        )


def _check_key_space(n_users: int, n_items: int) -> None:
    if n_users * n_items > np.iinfo(np.int64).max:
        raise ValueError(
            f"{n_users} users x {n_items} items exceeds the int64 key space of the hit lookup"
        )


def _resolve_k(k: int | None, n_columns: int) -> int:
    if k is None:
        k = n_columns
    k = integer(k, "cutoff k", error=ValueError)
    if k < 1:
        raise ValueError(f"cutoff k must be >= 1, got {k}")
    if k > n_columns:
        raise ValueError(f"cutoff k={k} exceeds the {n_columns} columns of recommended")
    return k


def _resolve_ks(ks: Sequence[int], n_columns: int) -> list[int]:
    if isinstance(ks, int):
        raise ValueError(f"ks must be a sequence of cutoffs, e.g. ({ks},), got the int {ks}")
    if len(ks) == 0:
        raise ValueError("ks is empty: give at least one cutoff")
    return sorted({_resolve_k(k, n_columns) for k in ks})


def _resolve_metrics(metrics: Sequence[str]) -> list[str]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(METRIC_NAMES)}")
    if len(metrics) == 0:
        raise ValueError(f"metrics is empty: choose from {list(METRIC_NAMES)}")
    return list(dict.fromkeys(metrics))  # drop repeats, keep order


def _check_ap_normalization(normalization: str) -> None:
    if normalization not in AP_NORMALIZATIONS:
        raise ValueError(
            f"AP normalization {normalization!r} is not one of {list(AP_NORMALIZATIONS)}"
        )


def _index_vector(values: ArrayLike, name: str) -> _Int64Array:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)  # np.asarray([]) is float64; an empty list is fine
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer indices, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _check_range(values: _Int64Array, upper: int, name: str, upper_name: str) -> None:
    if values.size == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= upper:
        bad = low if low < 0 else high
        position = int(np.flatnonzero(values == bad)[0])
        raise ValueError(
            f"{name}[{position}] = {bad} is out of range for {upper_name}={upper} "
            f"(valid: 0..{upper - 1})"
        )
