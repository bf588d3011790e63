"""Baseline recommenders: the bar every pipeline must clear before its complexity is justified.

Five baselines, one interface (:class:`Baseline`):

* :class:`RandomBaseline` - uniform random items: the no-skill floor.
* :class:`PopularityBaseline` - the most popular items of the training log, for everyone.
* :class:`RecencyPopularityBaseline` - popularity with exponential time decay ("trending").
* :class:`ALSBaseline` - implicit-feedback matrix factorisation (the project's ALS source).
* :class:`EASEBaseline` - Steck's closed-form item-item linear autoencoder (EASE, WWW 2019), a
  strong simple collaborative baseline that often beats deep models on implicit data.

All of them are fitted on an :class:`~data.interactions.Interactions` log and answer batches::

    baseline.fit(train_log)
    items = baseline.recommend(user_rows, k, seen)   # (n, k) int32, -1 padded

``user_rows`` index the log's users (``-1`` for a user the log does not know); ``seen`` is the
``(n, n_items)`` CSR of items each user has already interacted with, which are never returned.
A user a personalised model (ALS, EASE) has nothing to say about - unknown, or with no training
event - gets plain popularity, and any slot a model leaves empty is filled the same way, so every
baseline is judged on full lists just as the pipeline (whose cold-start path is popularity too)
is. Random and popularity treat every user alike anyway.

Recommendations depend only on the user's own row: ``recommend([u])[0] == recommend([u, v])[0]``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Protocol, Self, runtime_checkable

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from data.errors import ConfigError, DataError, NotFittedError
from data.interactions import Interactions
from data.validation import non_negative_int, positive_float, positive_int
from retrieval.als import ALSConfig, ALSSource
from retrieval.base import PAD_ITEM, UserBatch
from retrieval.item_item import ease_weights
from retrieval.popular import PopularConfig, PopularSource
from retrieval.topk import align_exclude, check_k, dense_topk

__all__ = [
    "DEFAULT_EASE_L2",
    "DEFAULT_EASE_MAX_ITEMS",
    "DEFAULT_RECENCY_HALF_LIFE_DAYS",
    "DEFAULT_SCORE_BLOCK_ELEMENTS",
    "ALSBaseline",
    "Baseline",
    "EASEBaseline",
    "PopularityBaseline",
    "RandomBaseline",
    "RecencyPopularityBaseline",
    "default_baselines",
]

IntArray = npt.NDArray[np.int32]

DEFAULT_RECENCY_HALF_LIFE_DAYS = 7.0
"""Half-life of :class:`RecencyPopularityBaseline`: a week, the same default as the trending
retrieval source, so the baseline is what that source would give on its own."""

DEFAULT_EASE_L2 = 250.0
"""L2 weight ``lambda`` of EASE. Steck (2019) tuned 200-1000 on ML-20M, Netflix and MSD; 250 is
RecBole's default. It is added to item counts on the Gram diagonal, so on small logs (tens of
events per item) tune it on the validation split: a smaller value lets the data speak."""

DEFAULT_EASE_MAX_ITEMS = 20_000
"""The largest catalogue :class:`EASEBaseline` accepts. EASE holds dense ``n_items x n_items``
matrices: fitting peaks at a float64 Gram matrix inverted in place plus the float32 weights
(12 * n_items**2 bytes, 4.8 GB at 20k items), and the fitted model keeps the weights (4 *
n_items**2 bytes, 1.6 GB). The inversion is O(n_items**3). Above this, use ALS."""

DEFAULT_SCORE_BLOCK_ELEMENTS = 1 << 22
"""Dense scores materialised at once when scoring every item for a block of users (4M float32
= 16 MiB; the random baseline's uint64 hashing needs a few times that): bounded memory for any
batch size."""

_PLAIN_POPULARITY = PopularConfig(half_life_days=math.inf)  # no decay: all-time popularity


@runtime_checkable
class Baseline(Protocol):
    """What every baseline implements (see the module docstring)."""

    name: str

    def fit(self, log: Interactions) -> Baseline: ...

    def recommend(
        self, user_rows: npt.ArrayLike, k: int, seen: sp.spmatrix | sp.sparray | None = None
    ) -> IntArray: ...


class _FittedBaseline(ABC):
    """Shared plumbing: input checks, cold users, popularity fill.

    Learned state (after :meth:`fit`), common to every baseline:
        n_users_:   users in the training log's id map.
        n_items_:   items in the training log's id map; recommendations index this space.
        has_history_: (n_users_,) bool, the user has at least one training event.
        popular_:   :class:`~retrieval.popular.PopularSource`, undecayed popularity (the fallback).
    """

    name: str
    n_users_: int
    n_items_: int
    has_history_: npt.NDArray[np.bool_]
    popular_: PopularSource

    def fit(self, log: Interactions) -> Self:
        """Learn from ``log`` (index space); ``DataError`` if it is empty."""
        if len(log) == 0:
            raise DataError(f"{type(self).__name__}.fit: the interaction log is empty")
        self._fit(log)
        # Shared state last: a model whose own fit failed stays unfitted, not half fitted.
        self.n_users_, self.n_items_ = log.n_users, log.n_items
        self.has_history_ = log.user_counts > 0
        self.popular_ = PopularSource(_PLAIN_POPULARITY).fit(log)
        return self

    def recommend(
        self, user_rows: npt.ArrayLike, k: int, seen: sp.spmatrix | sp.sparray | None = None
    ) -> IntArray:
        """Top-``k`` items for each user, best first: ``(n, k)`` int32, ``-1`` padded at the end.

        user_rows: (n,) int indices into the training log's users; ``-1`` (or any index the log
            has no events for) is a cold user, who gets popularity.
        seen:      (n, n_items) sparse, nonzero where the user already has the item; those items
            are never returned. Columns past ``n_items_`` (items newer than the log) are ignored.
        A row is padded only when fewer than ``k`` items remain (catalogue exhausted by ``seen``).
        """
        if not hasattr(self, "popular_"):
            raise NotFittedError(f"{type(self).__name__}: call fit() first")
        rows = _user_rows(user_rows)
        k = check_k(k)
        exclude = align_exclude(seen, rows.size, self.n_items_)
        known = (rows >= 0) & (rows < self.n_users_)
        known[known] = self.has_history_[rows[known]]
        recommended = self._recommend(rows, known, k, exclude)
        return _fill_from(recommended, self.popular_, exclude)

    @abstractmethod
    def _fit(self, log: Interactions) -> None:
        """Learn the model-specific state (the shared state is already set)."""

    @abstractmethod
    def _recommend(
        self, rows: IntArray, known: npt.NDArray[np.bool_], k: int, exclude: sp.csr_matrix | None
    ) -> IntArray:
        """(n, k) int32 items for ``rows``; rows not ``known`` (cold) may be left as padding."""


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


class RandomBaseline(_FittedBaseline):
    """``k`` items drawn uniformly without replacement from the catalogue, minus ``seen``.

    The draw is a keyed hash of ``(seed, user row, item)``, not a stateful generator, so a user's
    list depends only on the seed and the user: the same on every call and in any batch. Every
    unknown user (row ``-1``) therefore gets the same list; this floor needs no more than that.
    (It is the hash-based analogue of a counter-based generator such as numpy's ``Philox``.)
    """

    name = "random"

    def __init__(
        self, seed: int = 0, *, score_block_elements: int = DEFAULT_SCORE_BLOCK_ELEMENTS
    ) -> None:
        self.seed = non_negative_int(seed, "RandomBaseline seed")
        self.score_block_elements = positive_int(
            score_block_elements, "RandomBaseline score_block_elements"
        )

    def _fit(self, log: Interactions) -> None:
        pass  # the catalogue size is all it needs

    def _recommend(
        self, rows: IntArray, known: npt.NDArray[np.bool_], k: int, exclude: sp.csr_matrix | None
    ) -> IntArray:
        # One key per (seed, user row); row -1 (unknown) is a user like any other here.
        seed_key = _splitmix64(np.array([self.seed], dtype=np.uint64))
        user_keys = _splitmix64(seed_key ^ (rows.astype(np.int64) + 1).astype(np.uint64))
        items = np.arange(self.n_items_, dtype=np.uint64) * _ITEM_STRIDE

        def score_rows(start: int, stop: int) -> npt.NDArray[np.float32]:
            bits = _splitmix64(user_keys[start:stop, None] ^ items[None, :])
            # The top 24 bits are exact in float32; the rare ties break deterministically.
            return (bits >> np.uint64(40)).astype(np.float32)

        return dense_topk(
            score_rows, rows.size, self.n_items_, k, exclude, self.score_block_elements
        ).item_idx


class PopularityBaseline(_FittedBaseline):
    """The ``k`` items with the largest summed event weight in the training log (MostPop).

    The same list for every user, minus what they have seen; items never interacted with are
    never recommended. Ties go to the lower item index.
    """

    name = "popular"

    def _fit(self, log: Interactions) -> None:
        pass  # popular_ is the model

    def _recommend(
        self, rows: IntArray, known: npt.NDArray[np.bool_], k: int, exclude: sp.csr_matrix | None
    ) -> IntArray:
        return self.popular_.retrieve(_anonymous(rows.size), k, exclude=exclude).item_idx


class RecencyPopularityBaseline(_FittedBaseline):
    """Popularity with exponential decay: an event counts ``2 ** (-age / half_life)``.

    Ages are measured from the last training event (see :mod:`retrieval.popular`), so the list
    follows what was trending when the log ends rather than all-time hits.
    """

    name = "recent_popular"

    trending_: PopularSource

    def __init__(self, half_life_days: float = DEFAULT_RECENCY_HALF_LIFE_DAYS) -> None:
        self.half_life_days = half_life_days
        self._config = PopularConfig(half_life_days=half_life_days)  # ConfigError if not > 0

    def _fit(self, log: Interactions) -> None:
        self.trending_ = PopularSource(self._config, name=self.name).fit(log)

    def _recommend(
        self, rows: IntArray, known: npt.NDArray[np.bool_], k: int, exclude: sp.csr_matrix | None
    ) -> IntArray:
        return self.trending_.retrieve(_anonymous(rows.size), k, exclude=exclude).item_idx


class ALSBaseline(_FittedBaseline):
    """Implicit ALS (:class:`~retrieval.als.ALSSource`) used on its own, without the pipeline.

    Known users are scored with their trained factors (no fold-in: the baseline answers from the
    training log only); cold users get popularity.
    """

    name = "als"
    source_: ALSSource

    def __init__(self, config: ALSConfig | None = None) -> None:
        self.config = config if config is not None else ALSConfig()

    def _fit(self, log: Interactions) -> None:
        self.source_ = ALSSource(self.config, name=self.name).fit(log)

    def _recommend(
        self, rows: IntArray, known: npt.NDArray[np.bool_], k: int, exclude: sp.csr_matrix | None
    ) -> IntArray:
        # An empty history: nothing to fold in, so the trained vectors answer and cold users
        # (-1) come back as padding for the popularity fill.
        users = _anonymous(rows.size, np.where(known, rows, -1).astype(np.int32))
        return self.source_.retrieve(users, k, exclude=exclude).item_idx


class EASEBaseline(_FittedBaseline):
    """EASE: Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019.

    An item-item weight matrix ``B`` (n_items, n_items) that reconstructs each user's binary row
    ``x_u`` from their other items, ``min ||X - X B||^2 + l2 ||B||^2`` subject to ``diag(B) = 0``
    (an item may not predict itself). The closed form (Steck, eq. 8) is

        P = (X^T X + l2 I)^-1,    B = I - P diag(1 / diag(P)),    i.e.  B_ij = -P_ij / P_jj,

    for ``i != j``, and a user's scores are ``x_u B``. ``X`` is the binarised training matrix (an
    interaction is 1 however often it repeats), as in the paper.

    Memory is quadratic in the catalogue (see :data:`DEFAULT_EASE_MAX_ITEMS`): :meth:`fit` raises
    ``ConfigError`` above ``max_items`` instead of exhausting the machine.

    Learned state: ``weights_`` (n_items, n_items) float32 ``B``; ``user_items_`` (n_users,
    n_items) float32 binary CSR, the ``X`` whose rows are scored.
    """

    name = "ease"
    weights_: npt.NDArray[np.float32]
    user_items_: sp.csr_matrix

    def __init__(
        self,
        l2: float = DEFAULT_EASE_L2,
        *,
        max_items: int = DEFAULT_EASE_MAX_ITEMS,
        score_block_elements: int = DEFAULT_SCORE_BLOCK_ELEMENTS,
    ) -> None:
        self.l2 = positive_float(l2, "EASEBaseline l2")
        self.max_items = positive_int(max_items, "EASEBaseline max_items")
        self.score_block_elements = positive_int(
            score_block_elements, "EASEBaseline score_block_elements"
        )

    def _fit(self, log: Interactions) -> None:
        if log.n_items > self.max_items:
            raise ConfigError(
                f"EASEBaseline: {log.n_items} items exceed max_items={self.max_items}; EASE "
                f"needs about {12 * log.n_items**2 / 1e9:.1f} GB of dense n_items x n_items "
                "matrices. Raise max_items if the machine has the memory, or use ALS"
            )
        binary = (log.matrix > 0).astype(np.float32).tocsr()
        weights = ease_weights(binary, self.l2)
        # C order: scoring multiplies sparse user rows by rows of B.
        self.weights_ = np.ascontiguousarray(weights, dtype=np.float32)
        self.user_items_ = binary

    def _recommend(
        self, rows: IntArray, known: npt.NDArray[np.bool_], k: int, exclude: sp.csr_matrix | None
    ) -> IntArray:
        selector = sp.csr_matrix(
            (np.ones(int(known.sum()), np.float32), (np.flatnonzero(known), rows[known])),
            shape=(rows.size, self.n_users_),
        )
        user_rows = (selector @ self.user_items_).tocsr()

        def score_rows(start: int, stop: int) -> npt.NDArray[np.float32]:
            scores = np.asarray(user_rows[start:stop] @ self.weights_, dtype=np.float32)
            scores[~known[start:stop]] = -np.inf  # cold: padding, filled with popularity
            return scores

        return dense_topk(
            score_rows, rows.size, self.n_items_, k, exclude, self.score_block_elements
        ).item_idx


def default_baselines(*, seed: int = 0) -> dict[str, Baseline]:
    """One unfitted instance of every baseline with its default hyperparameters, keyed by name."""
    baselines: list[Baseline] = [
        RandomBaseline(seed),
        PopularityBaseline(),
        RecencyPopularityBaseline(),
        ALSBaseline(),
        EASEBaseline(),
    ]
    return {baseline.name: baseline for baseline in baselines}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

# splitmix64 constants (Steele, Lea & Flood, "Fast splittable pseudorandom number generators",
# OOPSLA 2014): a bijective 64-bit mixer whose outputs pass BigCrush as a counter-based stream.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_ITEM_STRIDE = np.uint64(0xD6E8FEB86659FD93)  # an odd constant: item keys stay distinct


def _splitmix64(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finaliser applied elementwise (uint64 arithmetic wraps modulo 2**64)."""
    z = values + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


def _fill_from(
    recommended: IntArray, source: PopularSource, exclude: sp.csr_matrix | None
) -> IntArray:
    """Fill each row's padding with ``source``'s ranking, skipping seen and already listed items.

    Padding sits at the end of a row, so slot ``j`` of a row holding ``m`` items takes the
    ``(j - m)``-th item of that row's fill list.
    """
    padded = recommended == PAD_ITEM
    rows = np.flatnonzero(padded.any(axis=1))
    if rows.size == 0:
        return recommended
    n, k = rows.size, recommended.shape[1]
    listed = recommended[rows]
    r, c = np.nonzero(listed != PAD_ITEM)
    taken = sp.csr_matrix(
        (np.ones(r.size, np.float32), (r, listed[r, c])), shape=(n, source.n_items)
    )
    if exclude is not None:
        taken = taken + exclude[rows]
    fill = source.retrieve(_anonymous(n), k, exclude=taken).item_idx
    n_listed = (~padded[rows]).sum(axis=1)
    position = np.arange(k)[None, :] - n_listed[:, None]
    slot = position >= 0
    out = recommended.copy()
    block = out[rows]
    block[slot] = fill[np.nonzero(slot)[0], position[slot]]
    out[rows] = block
    return out


def _anonymous(n: int, user_idx: IntArray | None = None) -> UserBatch:
    """A batch of ``n`` users with no history (``user_idx`` -1 unless given)."""
    users = np.full(n, -1, np.int32) if user_idx is None else user_idx.astype(np.int32)
    return UserBatch(
        users, np.empty((n, 0), np.int32), np.empty((n, 0), np.int64), np.zeros(n, np.int64)
    )


def _user_rows(user_rows: npt.ArrayLike) -> IntArray:
    rows = np.asarray(user_rows)
    if rows.ndim != 1:
        raise DataError(f"user_rows must be 1-D (n,), got shape {rows.shape}")
    if rows.size == 0:
        return np.zeros(0, np.int32)
    if rows.dtype.kind not in "iu":
        raise DataError(f"user_rows must hold integer indices, got dtype {rows.dtype}")
    if rows.min() < -1:
        raise DataError(f"user_rows holds {rows.min()}; indices are >= 0, or -1 for unknown")
    return rows.astype(np.int32)
