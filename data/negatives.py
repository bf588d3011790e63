"""Negative sampling over integer indices (map string ids with ``data.idmap.IdMap`` first).

Two kinds of negatives:

- :func:`sample_negatives`: random negatives for every positive (user, item) pair, drawn
  uniformly or by popularity, never one of the user's positives. Vectorised rejection sampling:
  draw for every row at once, look each (user, item) key up in the sorted positive keys, redraw
  only the rejected rows. 10M negatives take a few seconds.
- :func:`hard_negatives`: the items a model scores highest among those the user did *not*
  engage with (the confusable ones, which teach a ranker the most).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from data.errors import DataError
from data.validation import non_negative_float, non_negative_int, one_of, positive_int

Strategy = Literal["uniform", "popularity"]
IndexArray = npt.NDArray[np.int32]
_Int = TypeVar("_Int", np.int32, np.int64)
Scorer = Callable[[IndexArray], npt.ArrayLike]

NO_ITEM = -1
"""Padding in :func:`hard_negatives` rows of users with fewer candidates than requested."""

# After this many redraws, the rows still rejected belong to users who hold (nearly) every item
# as a positive; they are sampled exactly from their complement instead. With a 50% rejection
# rate, 32 rounds leave one row in ~4e9 pending, so the exact path is for degenerate users only.
DEFAULT_MAX_REJECTION_ROUNDS = 32
# How many offending users an error message quotes.
_MAX_QUOTED = 5


@dataclass(frozen=True)
class NegativeSamplerConfig:
    """How :func:`sample_negatives` draws negatives (the fields are its keyword arguments).

    Attributes:
        ratio: negatives per positive. 4:1 to 10:1 is the usual practice for implicit feedback
            (enough contrast per positive without drowning the positives); 4 is its cheap end.
        strategy: ``"uniform"`` over all items, or ``"popularity"``: proportional to
            ``count ** popularity_exponent``: harder negatives (popular items the user skipped),
            so a model cannot separate positives from negatives by popularity alone.
        popularity_exponent: 0.75, the smoothing of word2vec's negative sampling (Mikolov et al.,
            2013): between uniform (0) and raw popularity (1), which over-samples the head.
        max_rejection_rounds: redraw rounds before the exact fallback (see the module constant).
    """

    ratio: int = 4
    strategy: Strategy = "uniform"
    popularity_exponent: float = 0.75
    max_rejection_rounds: int = DEFAULT_MAX_REJECTION_ROUNDS

    def __post_init__(self) -> None:
        _check_sampling_args(
            self.ratio, self.strategy, self.popularity_exponent, self.max_rejection_rounds
        )


def sample_negatives(
    user_idx: npt.ArrayLike,
    item_idx: npt.ArrayLike,
    n_items: int,
    ratio: int,
    *,
    strategy: Strategy = "uniform",
    popularity_exponent: float = 0.75,
    item_counts: npt.ArrayLike | None = None,
    exclude: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    rng: np.random.Generator | int,
    max_rejection_rounds: int = DEFAULT_MAX_REJECTION_ROUNDS,
) -> tuple[IndexArray, IndexArray]:
    """Draw ``ratio`` negative items per positive pair, never a positive of that user.

    Args:
        user_idx, item_idx: ``(n,)`` integer indices of the positive pairs; they are also the
            set of positives a negative must avoid.
        n_items: number of items; items are ``0 .. n_items - 1``.
        ratio: negatives per positive (>= 0).
        strategy: ``"uniform"``, or ``"popularity"``: ``P(item) ∝ count ** popularity_exponent``
            (items with a zero count are never drawn).
        item_counts: ``(n_items,)`` popularity counts; default: counted from ``item_idx``. Pass
            training-set counts, not counts that include evaluation data.
        exclude: extra ``(user_idx, item_idx)`` pairs that must never be drawn (e.g. positives
            from other splits, or items the user was never shown).
        rng: a ``np.random.Generator`` or a seed; same seed, same negatives.
        max_rejection_rounds: vectorised redraws before the exact per-user fallback.

    Returns:
        ``(neg_user_idx, neg_item_idx)``, each ``(n * ratio,)`` int32; rows ``i * ratio ..
        (i + 1) * ratio - 1`` are the negatives of positive ``i``. Draws are with replacement, so
        one user's negatives can repeat.

    Raises ``DataError`` on malformed indices, or naming the users for whom no negative exists
    (every drawable item is a positive of theirs).
    """
    _check_sampling_args(ratio, strategy, popularity_exponent, max_rejection_rounds)
    n_items = _check_n_items(n_items)
    users = _index_array(user_idx, "user_idx")
    items = _index_array(item_idx, "item_idx", upper=n_items)
    if users.shape != items.shape:
        raise DataError(f"user_idx has {users.size} entries but item_idx has {items.size}")
    generator = np.random.default_rng(rng)
    weights = _item_weights(items, n_items, strategy, popularity_exponent, item_counts)
    draw = _Drawer(weights, n_items, generator)

    blocked_users, blocked_items = users, items
    if exclude is not None:
        extra_users = _index_array(exclude[0], "exclude user_idx")
        extra_items = _index_array(exclude[1], "exclude item_idx", upper=n_items)
        if extra_users.shape != extra_items.shape:
            raise DataError(
                f"exclude has {extra_users.size} user indices but {extra_items.size} item indices"
            )
        blocked_users = np.concatenate([users, extra_users])
        blocked_items = np.concatenate([items, extra_items])
    # One int64 key per (user, item) pair, sorted: membership is a binary search.
    blocked = _sorted_unique(_pair_keys(blocked_users, blocked_items, n_items))
    _check_negatives_exist(_sorted_unique(users), blocked, weights, n_items)

    neg_users = np.repeat(users, ratio)
    neg_items = draw(neg_users.size)
    pending = np.arange(neg_users.size)
    for round_ in range(max_rejection_rounds + 1):
        keys = _pair_keys(neg_users[pending], neg_items[pending], n_items)
        pending = pending[_contains(blocked, keys)]
        if pending.size == 0 or round_ == max_rejection_rounds:
            break
        neg_items[pending] = draw(pending.size)
    if pending.size:
        _draw_from_complement(neg_users, neg_items, pending, blocked, weights, n_items, generator)
    return neg_users, neg_items


def hard_negatives(
    scorer: Scorer,
    user_idx: npt.ArrayLike,
    positives_csr: sp.csr_matrix | sp.csr_array,
    n_per_user: int,
    *,
    batch_size: int = 1024,
    exclude: sp.csr_matrix | sp.csr_array | None = None,
) -> IndexArray:
    """The ``n_per_user`` highest-scored items of each user that are not their positives.

    Args:
        scorer: maps a batch of user indices ``(b,)`` to scores ``(b, n_items)``, higher = more
            relevant (e.g. a retrieval model's dot products). Its output is not modified.
        user_idx: ``(n_users,)`` rows of ``positives_csr`` to mine negatives for.
        positives_csr: ``(n_all_users, n_items)`` sparse matrix; nonzeros are positives.
        n_per_user: negatives per user.
        batch_size: users scored per call; memory is ``batch_size * n_items`` scores.
        exclude: optional sparse matrix of ``positives_csr``'s shape; its nonzeros are never
            returned either (e.g. validation positives, unavailable items).

    Returns:
        ``(n_users, n_per_user)`` int32 item indices, best-scored first (equal scores: lower item
        index first). Users with fewer than ``n_per_user`` candidate items are padded with
        ``NO_ITEM`` (-1).
    """
    non_negative_int(n_per_user, "n_per_user")
    positive_int(batch_size, "batch_size")
    positives = sp.csr_matrix(positives_csr)
    n_all_users, n_items = positives.shape
    if exclude is not None:
        if exclude.shape != positives.shape:
            raise DataError(
                f"exclude has shape {exclude.shape} but positives_csr has {positives.shape}"
            )
        positives = (positives + sp.csr_matrix(exclude)).tocsr()
    users = _index_array(user_idx, "user_idx", upper=n_all_users)

    out = np.full((users.size, n_per_user), NO_ITEM, dtype=np.int32)
    k = min(n_per_user, n_items)
    if k == 0:
        return out
    for start in range(0, users.size, batch_size):
        batch = users[start : start + batch_size]
        out[start : start + batch.size, :k] = _top_unblocked(scorer, batch, positives, k)
    return out


# --------------------------------------------------------------------------------- internals
class _Drawer:
    """Draws item indices i.i.d. from ``weights`` (``None``: uniform over all items)."""

    def __init__(
        self, weights: npt.NDArray[np.float64] | None, n_items: int, rng: np.random.Generator
    ) -> None:
        self._n_items = n_items
        self._rng = rng
        self._cdf = None if weights is None else np.cumsum(weights)
        # A uniform draw can land exactly on the total through rounding; clamp to the last item
        # that can be drawn (not merely the last item, whose weight may be zero).
        self._last = -1 if weights is None else int(np.flatnonzero(weights)[-1])

    def __call__(self, size: int) -> IndexArray:
        if self._cdf is None:
            return self._rng.integers(0, self._n_items, size=size, dtype=np.int32)
        # Inverse-CDF sampling; side="right" skips zero-weight items (their CDF step is flat).
        targets = self._rng.random(size) * self._cdf[-1]
        drawn = np.searchsorted(self._cdf, targets, side="right")
        return np.minimum(drawn, self._last).astype(np.int32)


def _item_weights(
    items: IndexArray,
    n_items: int,
    strategy: Strategy,
    exponent: float,
    item_counts: npt.ArrayLike | None,
) -> npt.NDArray[np.float64] | None:
    """Unnormalised sampling weights ``(n_items,)``, or ``None`` for uniform sampling."""
    if strategy == "uniform":
        return None
    if item_counts is None:
        counts = np.bincount(items, minlength=n_items).astype(np.float64)
    else:
        counts = np.asarray(item_counts, dtype=np.float64)
        if counts.shape != (n_items,):
            raise DataError(f"item_counts has shape {counts.shape}, expected ({n_items},)")
        if not np.isfinite(counts).all() or (counts < 0).any():
            raise DataError("item_counts must be finite and >= 0")
    weights = np.zeros(n_items, dtype=np.float64)
    seen = counts > 0
    weights[seen] = counts[seen] ** exponent
    if not seen.any():
        raise DataError("popularity sampling: every item count is zero, nothing can be drawn")
    return weights


def _check_negatives_exist(
    users: IndexArray,
    blocked: npt.NDArray[np.int64],
    weights: npt.NDArray[np.float64] | None,
    n_items: int,
) -> None:
    """Raise ``DataError`` naming the users whose every drawable item is blocked."""
    blocked_users, blocked_items = np.divmod(blocked, n_items)
    if weights is not None:
        blocked_users = blocked_users[weights[blocked_items] > 0]
    n_drawable = n_items if weights is None else int(np.count_nonzero(weights))
    n_blocked = np.bincount(blocked_users, minlength=int(users.max(initial=-1)) + 1)
    saturated = users[n_blocked[users] >= n_drawable]
    if saturated.size:
        raise DataError(
            f"no negative exists for {saturated.size} user(s) (every one of the {n_drawable} "
            f"drawable items is a positive or excluded), e.g. user indices "
            f"{saturated[:_MAX_QUOTED].tolist()}"
        )


def _draw_from_complement(
    neg_users: IndexArray,
    neg_items: IndexArray,
    pending: npt.NDArray[np.intp],
    blocked: npt.NDArray[np.int64],
    weights: npt.NDArray[np.float64] | None,
    n_items: int,
    rng: np.random.Generator,
) -> None:
    """Fill ``neg_items[pending]`` exactly, per user, from the items they do not block.

    Only reached for users who block nearly every item, so the loop runs over a handful of users.
    """
    for user in np.unique(neg_users[pending]):
        rows = pending[neg_users[pending] == user]
        lo, hi = np.searchsorted(blocked, [user * n_items, (user + 1) * n_items])
        allowed = np.setdiff1d(np.arange(n_items), blocked[lo:hi] - user * n_items)
        p = None if weights is None else weights[allowed] / weights[allowed].sum()
        neg_items[rows] = rng.choice(allowed, size=rows.size, p=p)


def _top_unblocked(scorer: Scorer, batch: IndexArray, blocked: sp.csr_matrix, k: int) -> IndexArray:
    """``(b, k)`` top-scored items per user of ``batch`` with ``blocked`` items removed."""
    n_items = blocked.shape[1]
    raw = np.asarray(scorer(batch))
    if raw.shape != (batch.size, n_items):
        raise DataError(
            f"scorer returned shape {raw.shape} for {batch.size} users; "
            f"expected ({batch.size}, {n_items})"
        )
    # Work on costs (negated scores, a fresh array, so the scorer's output is left alone): the
    # top scores are the smallest costs, and a blocked item set to NaN is never among them, even
    # next to a scorer's own -inf score.
    cost = np.negative(raw, dtype=np.result_type(raw.dtype, np.float32))
    if np.isnan(cost).any():
        raise DataError("scorer returned NaN scores")
    rows_blocked = blocked[batch]
    rows = np.repeat(np.arange(batch.size), np.diff(rows_blocked.indptr))
    cost[rows, rows_blocked.indices] = np.nan
    return _smallest_k(cost, k)


def _smallest_k(cost: npt.NDArray[np.floating], k: int) -> IndexArray:
    """``(b, k)`` column indices of each row's ``k`` smallest costs, ascending.

    Equal costs: lower column first, also when the tie straddles the k-th place. NaN marks a
    column that must not be chosen; rows with fewer than ``k`` others are padded with ``NO_ITEM``.
    Linear-time selection (``np.partition``), then a sort of the ``k`` chosen only.
    """
    n_rows = cost.shape[0]
    kth = np.partition(cost, k - 1, axis=1)[:, k - 1 : k]  # (b, 1); NaN if fewer than k valid
    chosen = cost < kth
    tied = cost == kth
    room = k - chosen.sum(axis=1)
    # Rows where more columns tie at the k-th cost than places are left: keep the lowest.
    crowded = np.flatnonzero(tied.sum(axis=1) > room)
    if crowded.size:
        tied[crowded] &= np.cumsum(tied[crowded], axis=1, dtype=np.int32) <= room[crowded, None]
    chosen |= tied
    short = np.isnan(kth[:, 0])
    chosen[short] = ~np.isnan(cost[short])

    rows, cols = np.nonzero(chosen)  # row-major: each row's columns are contiguous, ascending
    slot = np.arange(rows.size) - np.searchsorted(rows, rows)
    picked = np.full((n_rows, k), NO_ITEM, dtype=np.int32)
    picked_cost = np.full((n_rows, k), np.inf)
    padding = np.ones((n_rows, k), dtype=bool)
    picked[rows, slot], picked_cost[rows, slot], padding[rows, slot] = cols, cost[rows, cols], False
    # Sort the k by (padding last, cost, column): np.lexsort's last key is the primary one.
    order = np.lexsort((picked, picked_cost, padding), axis=1)
    return np.take_along_axis(picked, order, axis=1)


def _pair_keys(users: IndexArray, items: IndexArray, n_items: int) -> npt.NDArray[np.int64]:
    """One int64 key per (user, item) pair, ``user * n_items + item``, ordered by user then item."""
    keys: npt.NDArray[np.int64] = users.astype(np.int64) * n_items + items
    return keys


def _sorted_unique(values: npt.NDArray[_Int]) -> npt.NDArray[_Int]:
    """``np.unique(values)``, by sort and neighbour comparison: much faster than ``np.unique``'s
    hash-based path in numpy 2.x on millions of int64 keys."""
    ordered = np.sort(values)
    if ordered.size == 0:
        return ordered
    first = np.empty(ordered.size, dtype=bool)
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first]


def _contains(
    sorted_keys: npt.NDArray[np.int64], queries: npt.NDArray[np.int64]
) -> npt.NDArray[np.bool_]:
    """``(m,)`` bool: which ``queries`` occur in ``sorted_keys`` (binary search)."""
    if sorted_keys.size == 0:
        return np.zeros(queries.shape, dtype=bool)
    position = np.searchsorted(sorted_keys, queries)
    np.minimum(position, sorted_keys.size - 1, out=position)
    return sorted_keys[position] == queries


def _index_array(values: npt.ArrayLike, name: str, *, upper: int | None = None) -> IndexArray:
    """``values`` as a 1-D int32 array of indices in ``[0, upper)``; ``DataError`` otherwise."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=np.int32)
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{name} must hold integers, got dtype {array.dtype}")
    lowest, highest = int(array.min()), int(array.max())
    limit = np.iinfo(np.int32).max + 1 if upper is None else upper
    if lowest < 0 or highest >= limit:
        raise DataError(f"{name} must lie in [0, {limit}), got values in [{lowest}, {highest}]")
    return array.astype(np.int32, copy=False)


def _check_n_items(n_items: int) -> int:
    n_items = positive_int(n_items, "n_items", error=DataError)
    if n_items > np.iinfo(np.int32).max:
        raise DataError(f"n_items={n_items} exceeds the int32 index range")
    return n_items


def _check_sampling_args(
    ratio: int, strategy: str, popularity_exponent: float, max_rejection_rounds: int
) -> None:
    non_negative_int(ratio, "ratio")
    one_of(strategy, "strategy", get_args(Strategy))
    non_negative_float(popularity_exponent, "popularity_exponent")
    non_negative_int(max_rejection_rounds, "max_rejection_rounds")
