"""``ALSSource``: implicit-feedback matrix factorisation (ALS) as a candidate source.

Training is ``implicit``'s conjugate-gradient ALS (Hu, Koren & Volinsky, "Collaborative Filtering
for Implicit Feedback Datasets", ICDM 2008; Takacs et al., RecSys 2011, for the CG solver) on the
user x item matrix of summed event weights. Retrieval ranks items by the inner product user
factors . item factors, searched one of two ways (``ALSConfig.index``):

* exact: the dense score matrix, in bounded blocks. Its cost is linear in the catalogue, so it is
  the default only below ``ALSConfig.index_min_items``.
* approximate: an IVF :class:`~retrieval.index.VectorIndex` built at fit time. ALS factors are not
  normalised (popular items have long vectors, items never seen in training are zero), and an
  inner-product IVF clusters them badly (recall far below the target on the 1M-item benchmark
  model). So the index holds each item vector lifted by one coordinate, ``sqrt(M^2 - |y|^2)``
  with ``M`` the largest norm, and queries get a 0 there: every lifted vector has norm ``M`` and
  the inner product is unchanged, so maximum inner product becomes a nearest-neighbour search
  that k-means cells fit (Bachrach et al., "Speeding up the Xbox recommender system using a
  euclidean transformation for inner-product spaces", RecSys 2014), which meets the target
  (``docs/benchmarks.md``, "Measurements behind the defaults").
  Items whose factors are zero (no training interactions: ALS leaves them at zero, they score 0
  for every user) are not indexed. The inverted lists hold the float32 vectors, so the scores
  returned are exact inner products (up to float32 summation order).

Online updates (fold-in). Item factors stay frozen between retrains; a user's vector is re-solved
from their interactions, which is what one more ALS half-step would give that user:

    x_u = (Y^T Y + Y^T (C_u - I) Y + reg * I)^-1  Y^T C_u p_u

with implicit's conventions (``implicit.cpu.als`` ``least_squares``, the solve behind
``recalculate_user``): the confidence of an interaction of summed weight ``w`` is ``c = alpha *
w``, unobserved pairs count 1, a negative ``c`` is a dislike (``|c|`` in the Gram term, nothing
in the target), and ``reg`` is a constant. ``Y^T Y`` is summed once per model (the only term over
the whole catalogue); the rest costs a user's events, solved with numpy on the calling thread
(implicit's OpenMP solve stalled behind a busy core on a loaded 2-core box; ``docs/benchmarks.md``).
Whose vector is re-solved is ``ALSConfig.fold_in``:

* ``"unknown"`` (default): users the model has never seen (``user_idx`` -1) with a non-empty
  history, from that history; and known users whose history holds events *newer than training*
  (``recent_times > trained_until_``), from their training row plus those new events. Everyone
  else keeps the trained vector, so offline evaluation of a trained model is unaffected and
  serving pays the solve only for users whose state changed since training. (An event in the
  last second of training counts as trained: the comparison is strict.)
* ``"always"``: every known user, and every unknown user with a history, is re-solved the same
  way (a known user without new events gets the exact solve of their training row: close to the
  trained vector, which came from the approximate CG solver). Costs a solve per request.
* ``"never"``: trained vectors only; unknown users get no candidates.

History events carry no weights in a :class:`~retrieval.base.UserBatch`; each counts
``ALSConfig.history_weight``. Items added to the id map after training (index >= ``n_items``)
have no factors and are ignored.
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Self, get_args

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import ThreadpoolController

from data.catalog import ItemCatalog
from data.configuration import from_mapping, to_mapping
from data.errors import BundleError, ConfigError, DataError, NotFittedError
from data.interactions import Interactions
from data.validation import integer, non_negative_int, one_of, positive_float, positive_int
from retrieval.base import PAD_ITEM, Candidates, LastBatchMemo, UserBatch
from retrieval.index import VectorIndex
from retrieval.index_config import IndexConfig
from retrieval.index_search import search_exact_topk
from retrieval.state_io import read_state, write_state
from retrieval.topk import align_exclude, check_k, dense_topk
from retrieval.user_cache import UserVectorCache, history_digest
from retrieval.validation import (
    VALIDATION_K,
    ValidationWindow,
    hill_climb,
    ndcg,
    validation_window,
)

FoldIn = Literal["unknown", "always", "never"]
# implicit's default L2 penalty: the regularisation without a validation window to choose one.
DEFAULT_REGULARIZATION = 0.01
# Users the regularisation is measured on at most (as the retrieval stage's merge order).
VALIDATION_USERS = 5_000
Confidence = Literal["log", "linear", "binary"]
IndexMode = Literal["auto", "exact", "ann"]

INDEX_DIR = "index"
# Item rows per float64 block of the Gram matrix sum: 16 MiB at 32 factors, whatever the catalogue.
GRAM_BLOCK_ROWS = 1 << 16
# Float64 elements per array of one block of fold-in solves (the padded (users, events, factors)
# item vectors and the (users, factors, factors) systems): 32 MiB, however large the batch.
FOLD_IN_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ALSConfig:
    """Hyperparameters of :class:`ALSSource`.

    factors: latent dimension. 64 is enough for a few thousand items and cheap to score.
    regularization: L2 penalty on every factor. ``None`` (default) chooses it on the validation
        window: a hill climb over ``regularization_grid`` from its middle, one fit per step, the
        best validation nDCG@10 kept; without a window, implicit's default 0.01. Its best value
        depends on the log more than any other ALS setting (Last.fm: 10-30 with 32 factors,
        0.190 validation nDCG@10 against 0.166 at 0.1; ``docs/benchmarks.md``, quality section).
    regularization_grid: the values the climb may visit, about a factor of 3 apart.
    confidence: how an observed pair's summed weight ``w`` becomes evidence ``t(w)``:
        ``"log"`` (default) ``log(1 + w)``, ``"linear"`` ``w``, ``"binary"`` 1. Counts such as
        plays are heavy-tailed (one pair of 5,000 plays would outweigh a user's other 49
        artists): the log keeps their order without letting the tail swamp the fit.
    alpha: confidence scaling; an observed pair gets confidence ``alpha * t(w)`` against 1 for
        unobserved pairs (implicit's form of Hu et al.'s ``1 + alpha * r``). ``None`` (default)
        sets it from the data: ``mean_confidence / mean(t(w))`` over the training pairs, so the
        same default holds for clicks, ratings and play counts alike.
    mean_confidence: the mean confidence of an observed pair when ``alpha`` is ``None``. 8:
        between the best binary alpha and the best log-count scaling on the validation logs
        (``docs/benchmarks.md``, quality section).
    iterations: ALS sweeps (implicit's default, 15: the loss has flattened by then).
    random_state: seed of the initial factors and of the index's k-means; same seed, same model.
    num_threads: threads for fitting and for the index; 0 lets implicit and FAISS use every core.
    fold_in: whose vector is re-solved from their history at request time; see the module
        docstring. Default ``"unknown"``.
    history_weight: weight of one history event in a fold-in (the batch carries none). 1.0
        matches a log of plain clicks.
    score_block_elements: scores materialised at once by exact retrieval (2**24 float32 = 64 MiB).
    index: how retrieval searches the items (module docstring). ``"exact"``: dense scoring of
        every item; ``"ann"``: the IVF index, built at fit time; ``"auto"`` (default): the index
        from ``index_min_items`` items on, exact below.
    index_min_items: catalogue size from which ``"auto"`` builds the index. 100_000: below it,
        exact scoring of one user's top 500 fits ALS's share of a request without an index
        build or approximate results; above it, its cost outgrows that share while the index's
        stays flat (``docs/benchmarks.md``, "Measurements behind the defaults").
    index_nlist: IVF cells; ``None`` = ``IndexConfig``'s ``4 * sqrt(n)`` of the indexed items.
    index_nprobe: IVF cells scanned per query. 64 clears the 0.95 recall@500 target against
        exact search with a margin on the 1M-item benchmark model; 32 is too close to it, 128
        buys little recall for more latency (``docs/benchmarks.md``).
    """

    factors: int = 64
    regularization: float | None = None
    regularization_grid: tuple[float, ...] = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    confidence: Confidence = "log"
    alpha: float | None = None
    mean_confidence: float = 8.0
    iterations: int = 15
    random_state: int = 0
    num_threads: int = 0
    fold_in: FoldIn = "unknown"
    history_weight: float = 1.0
    score_block_elements: int = 1 << 24
    index: IndexMode = "auto"
    index_min_items: int = 100_000
    index_nlist: int | None = None
    index_nprobe: int = 64

    def __post_init__(self) -> None:
        for name in (
            "factors",
            "iterations",
            "score_block_elements",
            "index_min_items",
            "index_nprobe",
        ):
            positive_int(getattr(self, name), f"ALSConfig.{name}")
        integer(self.index_nlist, "ALSConfig.index_nlist", minimum=1, none_ok=True)
        non_negative_int(self.num_threads, "ALSConfig.num_threads")
        for name in ("mean_confidence", "history_weight"):
            positive_float(getattr(self, name), f"ALSConfig.{name}", finite=False)
        if self.regularization is not None:
            positive_float(self.regularization, "ALSConfig.regularization", finite=False)
        object.__setattr__(self, "regularization_grid", tuple(self.regularization_grid))
        if not self.regularization_grid:
            raise ConfigError("ALSConfig.regularization_grid must not be empty")
        for value in self.regularization_grid:
            positive_float(value, "ALSConfig.regularization_grid", finite=False)
        if self.alpha is not None:
            positive_float(self.alpha, "ALSConfig.alpha", finite=False)
        one_of(self.confidence, "ALSConfig.confidence", get_args(Confidence))
        one_of(self.fold_in, "ALSConfig.fold_in", get_args(FoldIn))
        one_of(self.index, "ALSConfig.index", get_args(IndexMode))

    def uses_index(self, n_items: int) -> bool:
        """Whether a model of ``n_items`` items is searched through the approximate index."""
        return self.index == "ann" or (self.index == "auto" and n_items >= self.index_min_items)

    def index_config(self) -> IndexConfig:
        """The :class:`IndexConfig` of the item index: inverted lists of half-precision
        vectors (the found items are scored again from the float32 factors), seeded like the
        factors."""
        return IndexConfig(
            kind="ivf_fp16",
            nlist=self.index_nlist,
            nprobe=self.index_nprobe,
            seed=self.random_state,
            num_threads=self.num_threads or None,
        )


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """One controller per process: building one rescans the loaded libraries (~1 ms a call)."""
    return ThreadpoolController()


def confidence_weights(
    weights: npt.NDArray[np.floating], confidence: Confidence
) -> npt.NDArray[np.float32]:
    """``t(w)`` of summed pair weights (see ``ALSConfig.confidence``); negatives keep their sign
    (a dislike stays a dislike under the log)."""
    w = np.asarray(weights, dtype=np.float32)
    if confidence == "binary":
        return np.sign(w).astype(np.float32)
    if confidence == "log":
        return (np.sign(w) * np.log1p(np.abs(w))).astype(np.float32)
    return w.copy()


def _solver(
    config: ALSConfig, alpha: float | None = None, regularization: float | None = None
) -> AlternatingLeastSquares:
    """An implicit ALS model configured from ``config``.

    implicit warns (RuntimeWarning) when BLAS runs its own thread pool, because BLAS threads
    inside implicit's threads oversubscribe the cores; we build and fit under
    ``threadpool_limits(1, "blas")``, the remedy its warning names, so the check passes.
    """
    with _blas_controller().limit(limits=1, user_api="blas"):
        return AlternatingLeastSquares(
            factors=config.factors,
            regularization=regularization
            if regularization is not None
            else (config.regularization or DEFAULT_REGULARIZATION),
            alpha=alpha if alpha is not None else config.alpha,
            iterations=config.iterations,
            num_threads=config.num_threads,
            random_state=config.random_state,
        )


class ALSSource:
    """Implicit ALS candidates with online fold-in (see the module docstring).

    Learned state (after :meth:`fit`):
        user_factors_:  (n_users, factors) float32.
        item_factors_:  (n_items, factors) float32.
        user_items_:    (n_users, n_items) float32 CSR, ``t(w)`` of the summed training weights
                        (fold-in input).
        alpha_:         the confidence scaling used (``config.alpha`` or the data's).
        regularization_: the L2 penalty used (``config.regularization`` or the chosen one).
        validation_:    {regularization: validation nDCG@10} of the values tried (may be empty).
        trained_until_: int seconds UTC, the last training event; later events are "new".
        index_:         :class:`VectorIndex` of the lifted non-zero item factors (dim factors + 1),
                        or None: exact retrieval (small catalogues, bundles saved without one).
    """

    user_factors_: npt.NDArray[np.float32]
    item_factors_: npt.NDArray[np.float32]
    user_items_: sp.csr_matrix
    alpha_: float
    regularization_: float
    validation_: dict[float, float]
    trained_until_: int
    index_: VectorIndex | None

    def __init__(self, config: ALSConfig | None = None, *, name: str = "als") -> None:
        self.config = config if config is not None else ALSConfig()
        self.name = name
        self._gram: npt.NDArray[np.float64] | None = None
        self._vectors_memo: LastBatchMemo[tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]] = (
            LastBatchMemo()
        )
        self._fold_in_cache: UserVectorCache | None = None
        # Online updates published on the fitted factors (pipeline/online_learning).
        self.online_step_ = 0

    @property
    def n_users(self) -> int:
        return int(self.user_factors_.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_factors_.shape[0])

    # ------------------------------------------------------------------------------ learning
    def fit(
        self,
        log: Interactions,
        catalog: ItemCatalog | None = None,
        valid: Interactions | None = None,
    ) -> Self:
        """Factorise ``log.matrix`` (and index the items, per ``config.index``); ``valid`` (same
        id maps) chooses the regularisation when the config leaves it open. ``catalog`` is not
        used. ``DataError`` on an empty log."""
        if len(log) == 0:
            raise DataError("ALSSource.fit: the interaction log is empty")
        matrix = log.matrix.copy()
        matrix.data = confidence_weights(matrix.data, self.config.confidence)
        matrix.eliminate_zeros()
        self.alpha_ = self._alpha(matrix)
        self.validation_ = {}
        window = None
        if self.config.regularization is None:
            window = validation_window(log, valid, max_users=VALIDATION_USERS)
        if window is None:
            self.regularization_ = self.config.regularization or DEFAULT_REGULARIZATION
            model = self._factorise(matrix, self.regularization_)
        else:
            model = self._climb(matrix, window)
        self.user_factors_ = np.ascontiguousarray(model.user_factors, dtype=np.float32)
        self.item_factors_ = np.ascontiguousarray(model.item_factors, dtype=np.float32)
        self.user_items_ = matrix
        self.trained_until_ = int(log.timestamp.max())
        self.index_ = (
            build_item_index(self.item_factors_, self.config.index_config())
            if self.config.uses_index(self.n_items)
            else None
        )
        self._gram = None
        self._vectors_memo.clear()
        self._fold_in_cache = None
        return self

    def refit(self, log: Interactions, catalog: ItemCatalog | None = None) -> ALSSource:
        """A new source fitted on ``log`` (training plus the validation window) with the
        regularisation this one chose on validation; ``validation_`` is carried over."""
        self._check_fitted()
        config = replace(self.config, regularization=self.regularization_)
        fresh = type(self)(config, name=self.name).fit(log, catalog)
        fresh.validation_ = dict(self.validation_)
        return fresh

    def _factorise(self, matrix: sp.csr_matrix, regularization: float) -> AlternatingLeastSquares:
        model = _solver(self.config, self.alpha_, regularization)
        with _blas_controller().limit(limits=1, user_api="blas"):
            model.fit(matrix, show_progress=False)
        return model

    def _climb(self, matrix: sp.csr_matrix, window: ValidationWindow) -> AlternatingLeastSquares:
        """Hill-climb ``regularization_grid`` from its middle on validation nDCG@10 of the
        window's users (their trained vectors, training items excluded)."""
        grid = sorted(float(v) for v in self.config.regularization_grid)
        models: dict[int, AlternatingLeastSquares] = {}

        def score(i: int) -> float:
            if i not in models:
                model = self._factorise(matrix, grid[i])
                models[i] = model
                factors = np.asarray(model.user_factors, dtype=np.float32)[window.user_idx]
                scores = factors @ np.asarray(model.item_factors, dtype=np.float32).T
                found = Candidates.from_scores(scores, VALIDATION_K, window.seen)
                self.validation_[grid[i]] = ndcg(found.item_idx, window.relevant)
            return self.validation_[grid[i]]

        best = hill_climb(len(grid), score)
        self.regularization_ = grid[best]
        return models[best]

    def _alpha(self, matrix: sp.csr_matrix) -> float:
        if self.config.alpha is not None:
            return float(self.config.alpha)
        mean = float(np.abs(matrix.data).mean()) if matrix.nnz else 1.0
        return self.config.mean_confidence / mean

    # ------------------------------------------------------------------------------ user vectors
    def user_vectors(self, users: UserBatch) -> npt.NDArray[np.float32]:
        """(n, factors) float32 vectors of the batch, folded in per ``config.fold_in``.

        A user with no vector (unknown, with no usable history, or ``fold_in="never"``) gets a
        zero row, which scores 0 against every item.
        """
        return self._user_vectors(users)[0].copy()

    def _user_vectors(
        self, users: UserBatch
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """(n, factors) vectors and (n,) bool "has a vector" (read-only: shared per batch)."""
        self._check_fitted()
        return self._vectors_memo.get(users, self._compute_user_vectors)

    def _compute_user_vectors(
        self, users: UserBatch
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        n = len(users)
        known = (users.user_idx >= 0) & (users.user_idx < self.n_users)
        vectors = np.zeros((n, self.config.factors), dtype=np.float32)
        vectors[known] = self.user_factors_[users.user_idx[known]]
        has_vector = known.copy()
        if self.config.fold_in == "never":
            return vectors, has_vector
        events = (users.recent_items >= 0) & (users.recent_items < self.n_items)
        new = events & (users.recent_times > self.trained_until_)
        if self.config.fold_in == "always":
            refold = events.any(axis=1) | known
        else:
            refold = (~known & events.any(axis=1)) | (known & new.any(axis=1))
        rows = np.flatnonzero(refold)
        if rows.size == 0:
            return vectors, has_vector
        # Events counted on top of the training row: all history of an unknown user, only the
        # post-training events of a known one (the rest is in user_items_ already). A known
        # user's fold-in is a function of these events alone: cached under their digest.
        extra = np.where(known[rows, None], new[rows], events[rows])
        user_idx, recent = users.user_idx[rows], users.recent_items[rows]
        digests = history_digest(np.where(extra, recent, PAD_ITEM))
        cached, hit = self._vector_cache().lookup(np.where(known[rows], user_idx, -1), digests)
        vectors[rows[hit]] = cached[hit]
        miss = np.flatnonzero(~hit)
        if miss.size:
            owner, items, weights = self._fold_in_events(
                user_idx[miss], known[rows[miss]], recent[miss], extra[miss]
            )
            solved, solvable = solve_users(
                self._item_gram(),
                self.item_factors_,
                owner,
                items,
                self.alpha_ * weights,
                self.regularization_,
                miss.size,
            )
            vectors[rows[miss]] = solved
            has_vector[rows[miss]] = solvable
            keep = miss[solvable & known[rows[miss]]]
            self._vector_cache().store(user_idx[keep], digests[keep], vectors[rows[keep]])
        return vectors, has_vector

    def _vector_cache(self) -> UserVectorCache:
        cache = self._fold_in_cache
        if cache is None:  # two threads may both build one: either is right, one is kept
            cache = UserVectorCache(self.n_users, self.config.factors)
            self._fold_in_cache = cache
        return cache

    def _fold_in_events(
        self,
        user_idx: npt.NDArray[np.int32],
        known: npt.NDArray[np.bool_],
        recent_items: npt.NDArray[np.int32],
        extra: npt.NDArray[np.bool_],
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """The m fold-in rows as ``(row, item, weight)`` arrays, sorted by row then item: each
        known user's training row (sliced out of ``user_items_``) plus the ``extra`` events,
        weights summed per item, zero sums dropped (as a sparse sum drops them)."""
        trained = np.flatnonzero(known)
        starts = self.user_items_.indptr[user_idx[trained]].astype(np.int64)
        lengths = self.user_items_.indptr[user_idx[trained] + 1] - starts
        before = np.cumsum(lengths) - lengths
        entries = np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()))
        event_rows, event_cols = np.nonzero(extra)
        row = np.concatenate([np.repeat(trained, lengths), event_rows]).astype(np.int64)
        item = np.concatenate(
            [self.user_items_.indices[entries], recent_items[event_rows, event_cols]]
        ).astype(np.int64)
        weight = np.concatenate(
            [
                self.user_items_.data[entries].astype(np.float64),
                np.full(
                    event_rows.size,
                    confidence_weights(
                        np.array([self.config.history_weight]), self.config.confidence
                    )[0],
                ),
            ]
        )
        pairs, slot = np.unique(row * self.n_items + item, return_inverse=True)
        summed = np.bincount(slot, weights=weight, minlength=pairs.size)
        nonzero = summed != 0
        return pairs[nonzero] // self.n_items, pairs[nonzero] % self.n_items, summed[nonzero]

    def _item_gram(self) -> npt.NDArray[np.float64]:
        """``Y^T Y`` (factors, factors), summed once per fitted or loaded model.

        Two threads may both compute it on first use; both get the same matrix.
        """
        if self._gram is None:
            self._gram = item_gram(self.item_factors_)
        return self._gram

    def publish_item_factors(
        self, item_idx: npt.NDArray[np.int64], factors: npt.NDArray[np.float32]
    ) -> None:
        """Serve new factors (n, f) for items ``item_idx`` (n,) re-solved online
        (``pipeline/online_learning/als_update.py``) from the next batch on.

        The Gram matrix is corrected in place of a full re-sum; the index (large catalogues)
        takes the new rows with their lift against the current largest norm (candidates are
        rescored exactly from ``item_factors_``, so a lift off by a new largest norm costs
        recall on that item only); user fold-ins computed against the old factors are dropped.
        """
        self._check_fitted()
        items = np.asarray(item_idx, dtype=np.int64)
        if items.size == 0:
            return
        if not self.item_factors_.flags.writeable:  # memory-mapped: a private copy to edit
            self.item_factors_ = np.array(self.item_factors_)
        old = self.item_factors_[items].astype(np.float64)
        new = np.asarray(factors, dtype=np.float32)
        gram = self._item_gram() + new.T.astype(np.float64) @ new - old.T @ old
        self.item_factors_[items] = new
        self._gram = gram
        if self.index_ is not None:
            norms = np.linalg.norm(self.item_factors_.astype(np.float64), axis=1)
            lift = np.sqrt(np.maximum(norms.max() ** 2 - norms[items] ** 2, 0.0))
            self.index_.add(np.hstack([new, lift[:, None].astype(np.float32)]), items)
        self._fold_in_cache = None
        self._vectors_memo.clear()

    # ------------------------------------------------------------------------------ serving
    def warm(self, users: UserBatch) -> None:
        """Sum the fold-in's Gram matrix now (~1 s for a million items), not in the first
        request that needs it, and fold ``users`` in now into the cross-request cache (e.g. the
        snapshot's users at start-up), so their first requests skip the solve."""
        self._check_fitted()
        self._item_gram()
        if self.config.fold_in != "never":
            self._compute_user_vectors(users)

    def retrieve(
        self, users: UserBatch, k: int, *, exclude: sp.csr_matrix | None = None
    ) -> Candidates:
        """Top-``k`` items by ``user vector . item factor`` for each user, minus ``exclude``.

        Exact, or approximate through ``index_`` when the model has one. Users without a vector
        get an all-padding row (the merger fills from other sources).
        """
        self._check_fitted()
        k = check_k(k)
        vectors, has_vector = self._user_vectors(users)
        mask = align_exclude(exclude, len(users), self.n_items)
        if self.index_ is not None:
            return self._search_index(self.index_, vectors, has_vector, k, mask)

        def score_rows(start: int, stop: int) -> npt.NDArray[np.float32]:
            scores = vectors[start:stop] @ self.item_factors_.T
            scores[~has_vector[start:stop]] = -np.inf
            return scores

        return dense_topk(
            score_rows, len(users), self.n_items, k, mask, self.config.score_block_elements
        )

    def _search_index(
        self,
        index: VectorIndex,
        vectors: npt.NDArray[np.float32],
        has_vector: npt.NDArray[np.bool_],
        k: int,
        mask: sp.csr_matrix | None,
    ) -> Candidates:
        """:meth:`retrieve` through the index: ties to the lower item, short rows padded."""
        out = Candidates.empty(len(vectors), k)
        rows = np.flatnonzero(has_vector)
        if k == 0 or rows.size == 0 or len(index) == 0:
            return out
        # Rows without a vector are left out of the search (their row stays padding).
        everyone = rows.size == len(vectors)
        searched = vectors if everyone else vectors[rows]
        row_mask = mask if everyone or mask is None else mask[rows]
        top_items, top_scores = search_exact_topk(
            index, lift_queries(searched), searched, self.item_factors_, k, row_mask
        )
        width = top_items.shape[1]
        out.item_idx[rows, :width], out.scores[rows, :width] = top_items, top_scores
        return out

    def score(self, users: UserBatch, item_idx: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """(n, m) float32 ALS scores of arbitrary items ``item_idx`` (n, m) for each user.

        NaN where the item is padding / unknown to the model or the user has no vector (a
        missing feature for the ranker, not a low score).
        """
        self._check_fitted()
        items = np.asarray(item_idx)
        if items.ndim != 2 or items.shape[0] != len(users):
            raise DataError(f"item_idx has shape {items.shape}, expected ({len(users)}, m)")
        vectors, has_vector = self._user_vectors(users)
        valid = (items >= 0) & (items < self.n_items)
        factors = self.item_factors_[np.where(valid, items, 0)]
        scores = np.einsum("nf,nmf->nm", vectors, factors).astype(np.float32)
        scores[~(valid & has_vector[:, None])] = np.nan
        return scores

    def _check_fitted(self) -> None:
        if not hasattr(self, "item_factors_"):
            raise NotFittedError(f"{type(self).__name__} {self.name!r}: call fit() first")

    # ------------------------------------------------------------------------------ persistence
    def save(self, directory: Path) -> None:
        """Write the index (``index/``, when there is one), then ``config.json`` and the arrays:
        factors + the training CSR's (``write_state``)."""
        self._check_fitted()
        out = Path(directory)
        # An index left by an earlier save in the same directory must not outlive this one.
        shutil.rmtree(out / INDEX_DIR, ignore_errors=True)
        if self.index_ is not None:
            self.index_.save(out / INDEX_DIR)
        meta = {
            "name": self.name,
            "config": to_mapping(self.config),
            "trained_until": self.trained_until_,
            "n_items": self.n_items,
            "alpha": self.alpha_,
            "regularization": self.regularization_,
            "validation": {str(k): v for k, v in self.validation_.items()},
        }
        arrays = {
            "user_factors": self.user_factors_,
            "item_factors": self.item_factors_,
            "user_items_data": self.user_items_.data,
            "user_items_indices": self.user_items_.indices,
            "user_items_indptr": self.user_items_.indptr,
        }
        # Last: a directory with config.json holds a complete source.
        write_state(out, type(self).__name__, meta, arrays)

    @classmethod
    def load(cls, directory: Path, *, mmap: bool = False) -> Self:
        """Read a directory written by :meth:`save`; ``BundleError`` if missing or corrupt.

        The factors and the CSR arrays are copy-on-write maps of their files (``read_state``):
        processes that load the same bundle share them. mmap: also map the index (read-only),
        so the serving workers of one machine share one copy of it through the page cache. A
        directory without an index (saved before ALS had one, or exact) retrieves exactly.
        """
        path = Path(directory)
        meta, arrays = read_state(path, cls.__name__)
        config = from_mapping(ALSConfig, meta["config"], cls.__name__)
        if "alpha" not in meta:
            # Saved before the confidence transform: raw weights and a fixed alpha.
            config = replace(config, confidence="linear", alpha=config.alpha or 10.0)
        source = cls(config, name=meta["name"])
        source.user_factors_ = arrays["user_factors"]
        source.item_factors_ = arrays["item_factors"]
        source.user_items_ = sp.csr_matrix(
            (arrays["user_items_data"], arrays["user_items_indices"], arrays["user_items_indptr"]),
            shape=(source.user_factors_.shape[0], int(meta["n_items"])),
        )
        source.trained_until_ = int(meta["trained_until"])
        source.alpha_ = float(meta.get("alpha", config.alpha or 10.0))
        source.regularization_ = float(
            meta.get("regularization", config.regularization or DEFAULT_REGULARIZATION)
        )
        source.validation_ = {float(k): float(v) for k, v in meta.get("validation", {}).items()}
        source.index_ = None
        if (path / INDEX_DIR).is_dir():
            index = VectorIndex.load(path / INDEX_DIR, mmap=mmap)
            if index.dim != source.item_factors_.shape[1] + 1:
                raise BundleError(
                    f"{path / INDEX_DIR}: index of {index.dim}-d vectors for "
                    f"{source.item_factors_.shape[1]} factors (expected factors + 1)"
                )
            source.index_ = index
        return source


# ---------------------------------------------------------------------------------- fold-in


def item_gram(factors: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """``Y^T Y`` (f, f) float64 of ``factors`` (n, f), summed in blocks of ``GRAM_BLOCK_ROWS``
    rows (float64 without a float64 copy of the whole matrix)."""
    gram = np.zeros((factors.shape[1], factors.shape[1]))
    for start in range(0, factors.shape[0], GRAM_BLOCK_ROWS):
        block = factors[start : start + GRAM_BLOCK_ROWS].astype(np.float64)
        gram += block.T @ block
    return gram


def solve_users(
    gram: npt.NDArray[np.float64],
    factors: npt.NDArray[np.floating],
    row: npt.NDArray[np.int64],
    item: npt.NDArray[np.int64],
    confidence: npt.NDArray[np.float64],
    regularization: float,
    n_rows: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Each row's implicit-ALS user vector given frozen item ``factors`` Y (n_items, f).

    The interactions are ``(row, item, confidence)`` triples sorted by row, unique per pair.
    Row ``u`` solves Hu et al.'s normal equations in implicit's conventions (module docstring):

        (gram + reg I + sum_i (|c_i| - 1) y_i y_i^T) x_u = sum_{i: c_i > 0} c_i y_i

    with ``gram`` = Y^T Y. Returns (n_rows, f) float32 vectors, zero for a row without
    interactions, and (n_rows,) bool "has interactions". Rows are solved in blocks of similar
    length (sorted by length, padded to the block's longest, ``FOLD_IN_BLOCK_ELEMENTS`` a block),
    each block one stacked ``np.linalg.solve``.
    """
    f = gram.shape[0]
    starts = np.searchsorted(row, np.arange(n_rows + 1))
    lengths = np.diff(starts)
    solved = np.zeros((n_rows, f), dtype=np.float32)
    todo = np.flatnonzero(lengths)
    todo = todo[np.argsort(lengths[todo], kind="stable")]
    base = gram + regularization * np.eye(f)
    begin = 0
    while begin < todo.size:
        # Sorted by length, so a block's cost (rows x (longest + f) x f) grows with its end.
        longest = lengths[todo[begin:]]
        cost = np.arange(1, longest.size + 1) * (longest + f) * f
        end = begin + max(1, int(np.count_nonzero(cost <= FOLD_IN_BLOCK_ELEMENTS)))
        block = todo[begin:end]
        width = int(lengths[block].max())
        present = np.arange(width) < lengths[block, None]  # (b, width): padding is False
        entries = (starts[block, None] + np.arange(width))[present]
        padded = np.zeros((block.size, width, f))
        padded[present] = factors[item[entries]]
        conf = np.zeros((block.size, width))
        conf[present] = confidence[entries]
        # Padding rows of `padded` are zero, so their (|0| - 1) weight adds nothing.
        systems = base + (padded.transpose(0, 2, 1) * (np.abs(conf) - 1)[:, None, :]) @ padded
        targets = np.einsum("bwf,bw->bf", padded, np.maximum(conf, 0.0))
        solved[block] = np.linalg.solve(systems, targets[..., None])[..., 0]
        begin = end
    return solved, lengths > 0


# ---------------------------------------------------------------------------------- the index


def build_item_index(factors: npt.NDArray[np.float32], config: IndexConfig) -> VectorIndex | None:
    """An inner-product index of the non-zero rows of ``factors`` (n_items, f), lifted to f + 1
    dimensions (module docstring), labelled by item index; None when every row is zero."""
    norms = np.linalg.norm(factors.astype(np.float64), axis=1)
    items = np.flatnonzero(norms > 0)
    if items.size == 0:
        return None
    lift = np.sqrt(np.maximum(norms[items].max() ** 2 - norms[items] ** 2, 0.0))
    lifted = np.hstack([factors[items], lift[:, None].astype(np.float32)])
    return VectorIndex.build(config, lifted, items)


def lift_queries(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """User vectors (n, f) as queries of the lifted index (n, f + 1): 0 in the lift coordinate,
    so each inner product is the user's score of the item."""
    return np.hstack([vectors, np.zeros((vectors.shape[0], 1), np.float32)])
