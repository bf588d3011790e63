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
from typing import NamedTuple, Self

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from data.catalog import ItemCatalog
from data.configuration import from_mapping, to_mapping
from data.errors import DataError, NotFittedError
from data.interactions import Interactions
from data.validation import positive_float
from retrieval.base import Candidates, UserBatch
from retrieval.state_io import read_state, write_state
from retrieval.topk import align_exclude, check_k, ranked_topk

SECONDS_PER_DAY = 86_400
# Undecayed scores grow by 2x per half-life past their anchor; re-anchored beyond this many
# half-lives (2**64 ~ 2e19 stays far inside float32, the type of retrieve's scores).
_MAX_HALF_LIVES = 64


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
        positive_float(self.half_life_days, "half_life_days", finite=False)

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
        scores_: (n_items,) float64 decayed popularity at ``t_ref_``, higher is more popular
            (read-only, derived: O(n_items) per read).
        t_ref_:  int, seconds UTC: the time the scores are decayed to (the last event seen).

    Inside, scores are kept undecayed relative to an anchor time: an event at ``t`` adds
    ``w * 2 ** ((t - anchor) / half_life)``. Decay to ``t_ref_`` is then one factor common to
    every item, which the ranking does not depend on, so a batch of new events changes only the
    touched items' values and places (no pass over the catalogue, no sort).
    """

    t_ref_: int

    def __init__(self, config: PopularConfig | None = None, *, name: str = "popular") -> None:
        self.config = config if config is not None else PopularConfig()
        self.name = name
        self._raw: npt.NDArray[np.float64]
        self._anchor = 0
        # Built on first use, then kept current by observe(); replaced as one value, so a
        # concurrent retrieve reads a ranking and its decay that belong together.
        self._ranking: _Ranking | None = None

    @property
    def n_items(self) -> int:
        self._check_fitted()
        return int(self._raw.size)

    @property
    def scores_(self) -> npt.NDArray[np.float64]:
        self._check_fitted()
        return self._raw * self._decay()

    # ------------------------------------------------------------------------------ learning
    def fit(self, log: Interactions, catalog: ItemCatalog | None = None) -> Self:
        """Score every item of ``log`` at the end of the log. ``catalog`` is not used."""
        t_ref = int(log.timestamp.max()) if len(log) else 0
        scores = decayed_popularity(
            log.item_idx,
            log.timestamp,
            log.weight,
            n_items=log.n_items,
            t_ref=t_ref,
            half_life_seconds=self.config.half_life_seconds,
        )
        self._start(scores, t_ref)
        return self

    def observe(
        self,
        item_idx: npt.ArrayLike,
        timestamps: npt.ArrayLike,
        weights: npt.ArrayLike | None = None,
    ) -> Self:
        """Fold new events into the scores online.

        item_idx (m,) int item indices (an index past the current catalogue grows the scores:
        an item added after training), timestamps (m,) int seconds UTC, weights (m,) float >= 0
        (default 1). The scores move to ``t_ref = max(t_ref_, timestamps)``; late events (older
        than ``t_ref_``) are decayed by their true age, so the result equals :meth:`fit` on the
        extended log.

        Costs O(m log n) plus two memory moves of the ranking (the serving path calls it for
        every feedback batch through ``RetrievalStage.observe``). Calls must not overlap (the
        service makes them under its state lock); :meth:`retrieve` may run meanwhile: it reads
        one ranking, old or new.
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
        if not (values >= 0).all():
            raise DataError("observe: weights must be >= 0")
        t_ref = max(self.t_ref_, int(times.max()))
        half_life = self.config.half_life_seconds
        if (t_ref - self._anchor) / half_life > _MAX_HALF_LIVES:
            # Keep undecayed scores inside float32 range (retrieve's output type).
            self._start(self.scores_, self.t_ref_)
        order, ordered, _ = self._global_ranking()
        touched, position = np.unique(items, return_inverse=True)
        gained = np.bincount(
            position,
            weights=values.astype(np.float64) * np.exp2((times - self._anchor) / half_life),
            minlength=touched.size,
        )
        raw = self._raw
        if int(touched[-1]) >= raw.size:  # new items: grow (the only O(n_items) case)
            raw = np.concatenate([raw, np.zeros(int(touched[-1]) + 1 - raw.size)])
        before = raw[touched]
        after = before + gained
        moved = _moved(order, ordered, touched, before, after)
        raw[touched] = after  # in place: retrieve reads the ranking, never these values
        self._raw, self.t_ref_ = raw, t_ref
        self._ranking = _Ranking(*moved, self._decay())
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
        ranking = self._global_ranking()
        mask = align_exclude(exclude, len(users), self._raw.size)
        out = ranked_topk(ranking.order, ranking.raw_scores, len(users), k, mask)
        out.scores[...] = out.scores * np.float32(ranking.decay)
        return out

    def _global_ranking(self) -> _Ranking:
        if self._ranking is None:
            order = np.argsort(-self._raw, kind="stable").astype(np.int32)
            order = order[self._raw[order] > 0]
            self._ranking = _Ranking(order, self._raw[order], self._decay())
        return self._ranking

    def _start(self, scores: npt.NDArray[np.float64], t_ref: int) -> None:
        """Scores decayed to ``t_ref``, which becomes the anchor; the ranking is rebuilt lazily."""
        self._raw, self._anchor, self.t_ref_, self._ranking = scores, t_ref, t_ref, None

    def _decay(self) -> float:
        """The factor from undecayed (anchor-relative) scores to scores at ``t_ref_``."""
        return math.exp2(-(self.t_ref_ - self._anchor) / self.config.half_life_seconds)

    def _check_fitted(self) -> None:
        if not hasattr(self, "_raw"):
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
        source._start(arrays["scores"].astype(np.float64), int(meta["t_ref"]))
        return source


class _Ranking(NamedTuple):
    """Items with a positive score, best first (ties: lower index), their undecayed scores,
    and the factor that decays those to ``t_ref_``."""

    order: npt.NDArray[np.int32]
    raw_scores: npt.NDArray[np.float64]
    decay: float


def _moved(
    order: npt.NDArray[np.int32],
    ordered: npt.NDArray[np.float64],
    items: npt.NDArray[np.integer],
    before: npt.NDArray[np.float64],
    after: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float64]]:
    """The ranking (``order``, its scores ``ordered``: descending, ties to the lower item) after
    the distinct ``items`` change score from ``before`` to ``after``: found by binary search,
    taken out, and put back in their new places."""
    ranked = before > 0  # zero-score items are not in the ranking
    out = _positions(order, ordered, items[ranked], before[ranked])
    kept_order, kept_scores = np.delete(order, out), np.delete(ordered, out)
    enter = after > 0
    new_items, new_scores = items[enter].astype(np.int32), after[enter]
    by_rank = np.lexsort((new_items, -new_scores))
    new_items, new_scores = new_items[by_rank], new_scores[by_rank]
    slots = _positions(kept_order, kept_scores, new_items, new_scores, present=False)
    return np.insert(kept_order, slots, new_items), np.insert(kept_scores, slots, new_scores)


def _positions(
    order: npt.NDArray[np.int32],
    ordered: npt.NDArray[np.float64],
    items: npt.NDArray[np.integer],
    scores: npt.NDArray[np.float64],
    *,
    present: bool = True,
) -> npt.NDArray[np.intp]:
    """Where ``items`` with ``scores`` are (``present``) or belong in the ranking: after every
    higher score and after equal scores of lower items (ties are rare: equal float sums)."""
    descending = -ordered
    slots = np.searchsorted(descending, -scores, side="left")
    ends = np.searchsorted(descending, -scores, side="right")
    for j in np.flatnonzero(ends > slots):
        slots[j] += np.searchsorted(order[slots[j] : ends[j]], items[j])
    if present and not np.array_equal(order[slots], items):
        raise AssertionError("popularity ranking out of step with its scores")  # a bug, not input
    return slots
