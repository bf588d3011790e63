"""``PopularSource``: time-decayed popularity ("trending"), the same list for every user.

An item's score is the decayed sum of its events' weights,

    score_i = sum over events e of item i:  w_e * 2 ** (-(t_ref - t_e) / half_life)

with ``t_ref`` the end of the training log. A very large (or infinite) half-life gives plain
popularity. The scores are an exponential accumulator, so :meth:`PopularSource.observe` folds new
events in online by rescaling to the new ``t_ref`` and adding, with no pass over the old log; the
result equals refitting on the extended log.

This is the baseline every personalised source must beat, the retrieval fallback when a stage
degrades, and ``scores_`` is a ranker feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from data.catalog import ItemCatalog
from data.configuration import from_mapping, to_mapping
from data.errors import ConfigError, DataError, NotFittedError
from data.interactions import Interactions
from retrieval._topk import align_exclude, check_k, ranked_topk, read_state, write_state
from retrieval.base import Candidates, UserBatch

SECONDS_PER_DAY = 86_400


@dataclass(frozen=True)
class PopularConfig:
    """Hyperparameters of :class:`PopularSource`.

    half_life_days: an event's weight halves for every ``half_life_days`` between its time and
        the reference time. Default 7: a week-old click counts half as much as one at the end of
        training, so the list follows what is trending this week rather than all-time hits.
        ``math.inf`` (or any very large value) gives plain popularity.
    """

    half_life_days: float = 7.0

    def __post_init__(self) -> None:
        # `not >` also rejects NaN.
        if not self.half_life_days > 0:
            raise ConfigError(f"half_life_days must be > 0, got {self.half_life_days!r}")

    @property
    def half_life_seconds(self) -> float:
        return float(self.half_life_days) * SECONDS_PER_DAY


def decayed_popularity(
    item_idx: npt.NDArray[np.integer],
    timestamps: npt.NDArray[np.integer],
    weights: npt.NDArray[np.floating],
    *,
    n_items: int,
    t_ref: int,
    half_life_seconds: float,
) -> npt.NDArray[np.float64]:
    """(n_items,) float64: ``sum w * 2 ** (-(t_ref - t) / half_life)`` per item.

    item_idx (m,) int, timestamps (m,) int64 seconds UTC, weights (m,) float.
    """
    age = (t_ref - timestamps.astype(np.int64)).astype(np.float64)
    decay = np.exp2(-age / half_life_seconds)
    return np.bincount(
        item_idx, weights=weights.astype(np.float64) * decay, minlength=n_items
    ).astype(np.float64)


class PopularSource:
    """Time-decayed popularity (see the module docstring).

    Learned state (after :meth:`fit`):
        scores_: (n_items,) float64 decayed popularity at ``t_ref_``, higher is more popular.
        t_ref_:  int, seconds UTC: the time the scores are decayed to (the last event seen).
    """

    scores_: npt.NDArray[np.float64]
    t_ref_: int

    def __init__(self, config: PopularConfig | None = None, *, name: str = "popular") -> None:
        self.config = config if config is not None else PopularConfig()
        self.name = name
        # Derived from scores_ on first use and dropped by observe(): the global ranking.
        self._ranking: tuple[npt.NDArray[np.int32], npt.NDArray[np.float64]] | None = None

    # ------------------------------------------------------------------------------ learning
    def fit(self, log: Interactions, catalog: ItemCatalog | None = None) -> Self:
        """Score every item of ``log`` at the end of the log. ``catalog`` is not used."""
        self.t_ref_ = int(log.timestamp.max()) if len(log) else 0
        self.scores_ = decayed_popularity(
            log.item_idx,
            log.timestamp,
            log.weight,
            n_items=log.n_items,
            t_ref=self.t_ref_,
            half_life_seconds=self.config.half_life_seconds,
        )
        self._ranking = None
        return self

    def observe(
        self,
        item_idx: npt.ArrayLike,
        timestamps: npt.ArrayLike,
        weights: npt.ArrayLike | None = None,
    ) -> Self:
        """Fold new events into the scores online.

        item_idx (m,) int item indices (an index past the current catalogue grows ``scores_``:
        an item added after training), timestamps (m,) int seconds UTC, weights (m,) float
        (default 1). The scores move to ``t_ref = max(t_ref_, timestamps)``; late events (older
        than ``t_ref_``) are decayed by their true age, so the result equals :meth:`fit` on the
        extended log.

        Costs O(n_items) copies, no sort: the serving path calls it for every feedback batch
        (``RetrievalStage.observe``). Calls must not overlap (the service makes them under its
        state lock); :meth:`retrieve` may run meanwhile: it reads one ranking, old or new.
        """
        self._check_fitted()
        items = np.asarray(item_idx)
        times = np.asarray(timestamps)
        values = np.ones(items.shape, np.float64) if weights is None else np.asarray(weights)
        if not (items.ndim == 1 and times.shape == items.shape and values.shape == items.shape):
            raise DataError(
                f"observe: item_idx {items.shape}, timestamps {times.shape} and weights "
                f"{values.shape} must be equal 1-d shapes"
            )
        if items.size == 0:
            return self
        if not np.issubdtype(items.dtype, np.integer) or items.min() < 0:
            raise DataError(f"observe: item_idx must be non-negative integers, got {items[:5]}")
        n_items = max(self.scores_.size, int(items.max()) + 1)
        t_ref = max(self.t_ref_, int(times.max()))
        half_life = self.config.half_life_seconds
        factor = math.exp2(-(t_ref - self.t_ref_) / half_life)
        touched, position = np.unique(items, return_inverse=True)
        gained = decayed_popularity(
            position, times, values, n_items=touched.size, t_ref=t_ref, half_life_seconds=half_life
        )
        scores = np.zeros(n_items, dtype=np.float64)
        scores[: self.scores_.size] = self.scores_ * factor
        scores[touched] += gained
        ranking = (
            _reranked(*self._global_ranking(), factor, touched, scores)
            if factor > 0  # a gap of ~3000 half-lives underflows every old score: sort afresh
            else None
        )
        self.scores_, self.t_ref_, self._ranking = scores, t_ref, ranking
        return self

    # ------------------------------------------------------------------------------ serving
    def retrieve(
        self, users: UserBatch, k: int, *, exclude: sp.csr_matrix | None = None
    ) -> Candidates:
        """The ``k`` most popular items for each user, minus that user's ``exclude`` row.

        Items without any (decayed) popularity are never candidates: the source has nothing to
        say about them. Scores are ``scores_`` as float32.
        """
        self._check_fitted()
        k = check_k(k)
        order, ordered = self._global_ranking()
        mask = align_exclude(exclude, len(users), self.scores_.size)
        return ranked_topk(order, ordered, len(users), k, mask)

    def _global_ranking(self) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float64]]:
        """Items with a positive score, best first (ties: lower index), and their scores."""
        if self._ranking is None:
            order = np.argsort(-self.scores_, kind="stable").astype(np.int32)
            order = order[self.scores_[order] > 0]
            self._ranking = (order, self.scores_[order])
        return self._ranking

    def _check_fitted(self) -> None:
        if not hasattr(self, "scores_"):
            raise NotFittedError(f"{type(self).__name__} {self.name!r}: call fit() first")

    # ------------------------------------------------------------------------------ persistence
    def save(self, directory: Path) -> None:
        """Write ``config.json`` (config, name, ``t_ref_``) and ``state.npz`` (``scores_``)."""
        self._check_fitted()
        meta = {"name": self.name, "config": to_mapping(self.config), "t_ref": self.t_ref_}
        write_state(directory, type(self).__name__, meta, {"scores": self.scores_})

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Read a directory written by :meth:`save`; ``BundleError`` if it is missing or corrupt."""
        meta, arrays = read_state(directory, cls.__name__)
        source = cls(from_mapping(PopularConfig, meta["config"], cls.__name__), name=meta["name"])
        source.scores_ = arrays["scores"].astype(np.float64)
        source.t_ref_ = int(meta["t_ref"])
        return source


def _reranked(
    order: npt.NDArray[np.int32],
    ordered: npt.NDArray[np.float64],
    factor: float,
    touched: npt.NDArray[np.integer],
    scores: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float64]]:
    """The global ranking after an :meth:`PopularSource.observe`, without a full sort.

    A uniform decay keeps the order of the untouched items, so only the ``touched`` items (sorted
    by score, ties to the lower index) are merged back in: O(n) copies instead of an
    O(n log n) sort of the catalogue on every feedback batch (~0.1 s for 1M items).
    """
    moved = np.zeros(scores.size, dtype=bool)
    moved[touched] = True
    stay = ~moved[order]
    kept_order, kept_scores = order[stay], ordered[stay] * factor
    new_scores = scores[touched]
    ranked = np.lexsort((touched, -new_scores))
    ranked = ranked[new_scores[ranked] > 0]  # zero-score items are never candidates
    items, values = touched[ranked].astype(np.int32), new_scores[ranked]
    # Slot of each item among the kept ones: after every higher score, and after equal scores
    # of lower items (ties are rare: equal float sums).
    descending = -kept_scores
    slots = np.searchsorted(descending, -values, side="left")
    ends = np.searchsorted(descending, -values, side="right")
    for j in np.flatnonzero(ends > slots):
        slots[j] += np.searchsorted(kept_order[slots[j] : ends[j]], items[j])
    return np.insert(kept_order, slots, items), np.insert(kept_scores, slots, values)
