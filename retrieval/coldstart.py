"""``ColdStartSource``: the safety net for users the personalised sources cannot serve.

Every user gets the *fallback list*, one global score per item that mixes plain popularity with
what is trending among recently released items (so a new visitor sees both the staples and what
is new and taking off):

    fallback_i = (1 - fresh_weight) * pop_i / max(pop)
               + fresh_weight * fresh_i * trend_i / max(fresh * trend)

with ``pop`` the summed event weights, ``trend`` the time-decayed popularity (see
:mod:`retrieval.popular`) and ``fresh_i`` = 1 for items released within ``fresh_window_days`` of
the end of training. Both terms lie in [0, 1].

An *unknown* user (``user_idx`` -1) whose recent items have categories gets popularity within
those categories: ``fallback_i + category_boost * share_i``, where ``share_i`` is the part of the
user's category mass (their recent items' categories, normalised to sum 1) that item ``i``'s
categories cover. With a boost above 1, every item of a single-category visitor's category
outranks every other item. Known users, and users without categorised history, get the fallback
list: the personalised sources serve known users; this source only guarantees an answer.
Without a catalogue there are no categories and no release times, so the fallback is plain
popularity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from data.catalog import UNKNOWN_TIME, ItemCatalog
from data.configuration import from_mapping, to_mapping
from data.errors import DataError, NotFittedError
from data.interactions import Interactions
from data.validation import fraction, non_negative_float, positive_float, positive_int
from retrieval.base import Candidates, UserBatch
from retrieval.popular import SECONDS_PER_DAY, decayed_popularity
from retrieval.state_io import read_state, write_state
from retrieval.topk import align_exclude, check_k, dense_topk, ranked_topk


@dataclass(frozen=True)
class ColdStartConfig:
    """Hyperparameters of :class:`ColdStartSource`.

    half_life_days: half-life of the trending score of fresh items (7: this week's momentum).
    fresh_window_days: items released at most this many days before the end of training count
        as fresh (30: a month-old release is still news; older ones compete on popularity).
    fresh_weight: share of the fallback score given to trending fresh items, in [0, 1]
        (0.5: staples and news weigh the same at the top).
    category_boost: weight of an unknown user's category share over the fallback score
        (2.0 > 1: a single-category visitor sees their category first; see the module docstring).
    score_block_elements: scores materialised at once for category rows (2**24 float32 = 64 MiB).
    """

    half_life_days: float = 7.0
    fresh_window_days: float = 30.0
    fresh_weight: float = 0.5
    category_boost: float = 2.0
    score_block_elements: int = 1 << 24

    def __post_init__(self) -> None:
        for name in ("half_life_days", "fresh_window_days"):
            positive_float(getattr(self, name), f"ColdStartConfig.{name}", finite=False)
        fraction(self.fresh_weight, "ColdStartConfig.fresh_weight")
        non_negative_float(self.category_boost, "ColdStartConfig.category_boost", finite=False)
        positive_int(self.score_block_elements, "ColdStartConfig.score_block_elements")


def _unit_max(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``values / max(values)``, or zeros when nothing is positive."""
    top = float(values.max(initial=0.0))
    return values / top if top > 0 else np.zeros_like(values)


class ColdStartSource:
    """Fallback and category-popularity candidates (see the module docstring).

    Learned state (after :meth:`fit`):
        fallback_:   (n_items,) float64 in [0, 1], the fallback score of every item.
        categories_: (n_items, n_categories) float32 binary CSR from the catalogue (0 columns
            without one).
        n_users_:    users known at training; other indices are treated as unknown.
    """

    fallback_: npt.NDArray[np.float64]
    categories_: sp.csr_matrix
    n_users_: int

    def __init__(self, config: ColdStartConfig | None = None, *, name: str = "coldstart") -> None:
        self.config = config if config is not None else ColdStartConfig()
        self.name = name
        self._ranking: tuple[npt.NDArray[np.int32], npt.NDArray[np.float64]] | None = None

    @property
    def n_items(self) -> int:
        return int(self.fallback_.shape[0])

    def fit(self, log: Interactions, catalog: ItemCatalog | None = None) -> Self:
        """Score the fallback list at the end of ``log``; ``catalog`` gives categories and
        release times (``None``: plain popularity). ``DataError`` if their item counts differ."""
        if catalog is not None and catalog.n_items != log.n_items:
            raise DataError(
                f"catalog has {catalog.n_items} items but the log's item map has {log.n_items}"
            )
        config = self.config
        t_ref = int(log.timestamp.max()) if len(log) else 0
        kwargs = {"n_items": log.n_items, "t_ref": t_ref}
        popularity = decayed_popularity(
            log.item_idx, log.timestamp, log.weight, half_life_seconds=math.inf, **kwargs
        )
        trend = decayed_popularity(
            log.item_idx,
            log.timestamp,
            log.weight,
            half_life_seconds=config.half_life_days * SECONDS_PER_DAY,
            **kwargs,
        )
        if catalog is None:
            fresh = np.zeros(log.n_items, dtype=bool)
            self.categories_ = sp.csr_matrix((log.n_items, 0), dtype=np.float32)
        else:
            released = catalog.created_at
            fresh = (released != UNKNOWN_TIME) & (
                released > t_ref - config.fresh_window_days * SECONDS_PER_DAY
            )
            self.categories_ = sp.csr_matrix(catalog.categories, dtype=np.float32)
        self.fallback_ = (1 - config.fresh_weight) * _unit_max(
            popularity
        ) + config.fresh_weight * _unit_max(np.where(fresh, trend, 0.0))
        self.n_users_ = log.n_users
        self._ranking = None
        return self

    def retrieve(
        self, users: UserBatch, k: int, *, exclude: sp.csr_matrix | None = None
    ) -> Candidates:
        """Category popularity for unknown users with categorised history, else the fallback.

        Items scoring 0 (no events, no category match) are never candidates.
        """
        self._check_fitted()
        k = check_k(k)
        n = len(users)
        mask = align_exclude(exclude, n, self.n_items)
        shares = self._category_shares(users)
        if shares is None:  # the usual batch (known users): everyone gets the fallback
            order, ordered = self._fallback_ranking()
            return ranked_topk(order, ordered, n, k, mask)
        personal = np.flatnonzero(shares.getnnz(axis=1) > 0)
        generic = np.setdiff1d(np.arange(n), personal)
        out = Candidates.empty(n, k)
        if generic.size:
            order, ordered = self._fallback_ranking()
            rows = ranked_topk(order, ordered, generic.size, k, _rows(mask, generic))
            out.item_idx[generic], out.scores[generic] = rows.item_idx, rows.scores
        if personal.size:
            personal_shares = shares[personal]
            boost = self.config.category_boost

            def score_rows(start: int, stop: int) -> npt.NDArray[np.float32]:
                affinity = (personal_shares[start:stop] @ self.categories_.T).toarray()
                scores = (self.fallback_[None, :] + boost * affinity).astype(np.float32)
                scores[scores <= 0] = -np.inf
                return scores

            rows = dense_topk(
                score_rows,
                personal.size,
                self.n_items,
                k,
                _rows(mask, personal),
                self.config.score_block_elements,
            )
            out.item_idx[personal], out.scores[personal] = rows.item_idx, rows.scores
        return out

    def _category_shares(self, users: UserBatch) -> sp.csr_matrix | None:
        """(n, n_categories) CSR: each unknown user's category mass, rows summing to 1 (or 0);
        ``None`` when no unknown user in the batch has a history (every row would be 0)."""
        known = (users.user_idx >= 0) & (users.user_idx < self.n_users_)
        items = users.recent_items
        rows, cols = np.nonzero((items >= 0) & (items < self.n_items) & ~known[:, None])
        if rows.size == 0:  # the usual request (a known user): skip the sparse algebra
            return None
        history = sp.csr_matrix(
            (np.ones(rows.size, np.float32), (rows, items[rows, cols])),
            shape=(len(users), self.n_items),
        )
        mass = history @ self.categories_
        total = np.asarray(mass.sum(axis=1)).ravel()
        scale = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
        shares = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ mass)
        shares.eliminate_zeros()
        return shares

    def _fallback_ranking(self) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float64]]:
        """Items with a positive fallback score, best first (ties: lower index)."""
        if self._ranking is None:
            order = np.argsort(-self.fallback_, kind="stable").astype(np.int32)
            order = order[self.fallback_[order] > 0]
            self._ranking = (order, self.fallback_[order])
        return self._ranking

    def _check_fitted(self) -> None:
        if not hasattr(self, "fallback_"):
            raise NotFittedError(f"{type(self).__name__} {self.name!r}: call fit() first")

    def save(self, directory: Path) -> None:
        """Write ``config.json`` and ``state.npz`` (fallback scores, category CSR arrays)."""
        self._check_fitted()
        meta = {
            "name": self.name,
            "config": to_mapping(self.config),
            "n_users": self.n_users_,
            "n_categories": int(self.categories_.shape[1]),
        }
        arrays = {
            "fallback": self.fallback_,
            "categories_data": self.categories_.data,
            "categories_indices": self.categories_.indices,
            "categories_indptr": self.categories_.indptr,
        }
        write_state(directory, type(self).__name__, meta, arrays)

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Read a directory written by :meth:`save`; ``BundleError`` if missing or corrupt."""
        meta, arrays = read_state(directory, cls.__name__)
        source = cls(from_mapping(ColdStartConfig, meta["config"], cls.__name__), name=meta["name"])
        source.fallback_ = arrays["fallback"]
        source.categories_ = sp.csr_matrix(
            (arrays["categories_data"], arrays["categories_indices"], arrays["categories_indptr"]),
            shape=(source.fallback_.shape[0], int(meta["n_categories"])),
        )
        source.n_users_ = int(meta["n_users"])
        return source


def _rows(matrix: sp.csr_matrix | None, rows: npt.NDArray[np.intp]) -> sp.csr_matrix | None:
    return None if matrix is None else matrix[rows]
