"""``ALSSource``: implicit-feedback matrix factorisation (ALS) as a candidate source.

Training is ``implicit``'s conjugate-gradient ALS (Hu, Koren & Volinsky, "Collaborative Filtering
for Implicit Feedback Datasets", ICDM 2008; Takacs et al., RecSys 2011, for the CG solver) on the
user x item matrix of summed event weights. Retrieval is an exact inner-product search, user
factors @ item factors^T, in bounded blocks of the dense score matrix.

Online updates (fold-in). Item factors stay frozen between retrains; a user's vector is re-solved
from their interactions with implicit's exact least-squares ``recalculate_user``,

    x_u = (Y^T C_u Y + reg * I)^-1  Y^T C_u p_u,

which is what one more ALS half-step would give that user. Whose vector is re-solved is
``ALSConfig.fold_in``:

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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self, get_args

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import ThreadpoolController

from data.catalog import ItemCatalog
from data.configuration import from_mapping, to_mapping
from data.errors import ConfigError, DataError, NotFittedError
from data.interactions import Interactions
from retrieval._topk import align_exclude, check_k, dense_topk, read_state, write_state
from retrieval.base import Candidates, LastBatchMemo, UserBatch

FoldIn = Literal["unknown", "always", "never"]


@dataclass(frozen=True)
class ALSConfig:
    """Hyperparameters of :class:`ALSSource`.

    factors: latent dimension. 64 is enough for a few thousand items and cheap to score.
    regularization: L2 penalty on every factor (implicit's default, 0.01).
    alpha: confidence scaling; an observed user-item pair of summed weight ``w`` gets confidence
        ``alpha * w`` against 1 for unobserved pairs (implicit's form of Hu et al.'s
        ``1 + alpha * r``). 10: one click is solid but not overwhelming evidence.
    iterations: ALS sweeps (implicit's default, 15: the loss has flattened by then).
    random_state: seed of the initial factors; same seed, same model.
    num_threads: threads for fitting and fold-in; 0 lets implicit use every core.
    fold_in: whose vector is re-solved from their history at request time; see the module
        docstring. Default ``"unknown"``.
    history_weight: weight of one history event in a fold-in (the batch carries none). 1.0
        matches a log of plain clicks.
    score_block_elements: scores materialised at once during retrieval (2**24 float32 = 64 MiB).
    """

    factors: int = 64
    regularization: float = 0.01
    alpha: float = 10.0
    iterations: int = 15
    random_state: int = 0
    num_threads: int = 0
    fold_in: FoldIn = "unknown"
    history_weight: float = 1.0
    score_block_elements: int = 1 << 24

    def __post_init__(self) -> None:
        for name in ("factors", "iterations", "score_block_elements"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ALSConfig.{name} must be an integer >= 1, got {value!r}")
        if (
            isinstance(self.num_threads, bool)
            or not isinstance(self.num_threads, int)
            or (self.num_threads < 0)
        ):
            raise ConfigError(
                f"ALSConfig.num_threads must be an integer >= 0, got {self.num_threads!r}"
            )
        for name in ("regularization", "alpha", "history_weight"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"ALSConfig.{name} must be > 0, got {value!r}")
        if self.fold_in not in get_args(FoldIn):
            raise ConfigError(
                f"ALSConfig.fold_in must be one of {get_args(FoldIn)}, got {self.fold_in!r}"
            )


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """One controller per process: building one rescans the loaded libraries (~1 ms a call)."""
    return ThreadpoolController()


def _solver(config: ALSConfig) -> AlternatingLeastSquares:
    """An implicit ALS model configured from ``config``.

    implicit warns (RuntimeWarning) when BLAS runs its own thread pool, because BLAS threads
    inside implicit's threads oversubscribe the cores; we build and fit under
    ``threadpool_limits(1, "blas")``, the remedy its warning names, so the check passes.
    """
    with _blas_controller().limit(limits=1, user_api="blas"):
        return AlternatingLeastSquares(
            factors=config.factors,
            regularization=config.regularization,
            alpha=config.alpha,
            iterations=config.iterations,
            num_threads=config.num_threads,
            random_state=config.random_state,
        )


class ALSSource:
    """Implicit ALS candidates with online fold-in (see the module docstring).

    Learned state (after :meth:`fit`):
        user_factors_:  (n_users, factors) float32.
        item_factors_:  (n_items, factors) float32.
        user_items_:    (n_users, n_items) float32 CSR, summed training weights (fold-in input).
        trained_until_: int seconds UTC, the last training event; later events are "new".
    """

    user_factors_: npt.NDArray[np.float32]
    item_factors_: npt.NDArray[np.float32]
    user_items_: sp.csr_matrix
    trained_until_: int

    def __init__(self, config: ALSConfig | None = None, *, name: str = "als") -> None:
        self.config = config if config is not None else ALSConfig()
        self.name = name
        self._model: AlternatingLeastSquares | None = None
        self._vectors_memo: LastBatchMemo[tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]] = (
            LastBatchMemo()
        )

    @property
    def n_users(self) -> int:
        return int(self.user_factors_.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_factors_.shape[0])

    # ------------------------------------------------------------------------------ learning
    def fit(self, log: Interactions, catalog: ItemCatalog | None = None) -> Self:
        """Factorise ``log.matrix``. ``catalog`` is not used. ``DataError`` on an empty log."""
        if len(log) == 0:
            raise DataError("ALSSource.fit: the interaction log is empty")
        model = _solver(self.config)
        with _blas_controller().limit(limits=1, user_api="blas"):
            model.fit(log.matrix, show_progress=False)
        self.user_factors_ = np.ascontiguousarray(model.user_factors, dtype=np.float32)
        self.item_factors_ = np.ascontiguousarray(model.item_factors, dtype=np.float32)
        self.user_items_ = log.matrix
        self.trained_until_ = int(log.timestamp.max())
        self._model = model
        self._vectors_memo.clear()
        return self

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
        if rows.size:
            # Events counted on top of the training row: all history of an unknown user, only
            # the post-training events of a known one (the rest is in user_items_ already).
            extra = np.where(known[rows, None], new[rows], events[rows])
            interactions = self._fold_in_matrix(
                users.user_idx[rows], known[rows], users.recent_items[rows], extra
            )
            with _blas_controller().limit(limits=1, user_api="blas"):  # see _solver
                solved = self._solver_model().recalculate_user(np.arange(rows.size), interactions)
            has_rows = np.diff(interactions.indptr) > 0
            vectors[rows] = np.where(has_rows[:, None], solved, 0.0)
            has_vector[rows] = has_rows
        return vectors, has_vector

    def _fold_in_matrix(
        self,
        user_idx: npt.NDArray[np.int32],
        known: npt.NDArray[np.bool_],
        recent_items: npt.NDArray[np.int32],
        extra: npt.NDArray[np.bool_],
    ) -> sp.csr_matrix:
        """(m, n_items) CSR: training rows of the known users plus the ``extra`` events."""
        m = user_idx.shape[0]
        base = sp.csr_matrix((m, self.n_items), dtype=np.float32)
        if known.any():
            selector = sp.csr_matrix(
                (np.ones(int(known.sum()), np.float32), (np.flatnonzero(known), user_idx[known])),
                shape=(m, self.n_users),
            )
            base = selector @ self.user_items_
        rows, cols = np.nonzero(extra)
        added = sp.csr_matrix(
            (
                np.full(rows.size, self.config.history_weight, np.float32),
                (rows, recent_items[rows, cols]),
            ),
            shape=(m, self.n_items),
        )
        matrix = sp.csr_matrix(base + added, dtype=np.float32)
        matrix.sum_duplicates()
        return matrix

    def _solver_model(self) -> AlternatingLeastSquares:
        """The implicit model around the frozen factors (rebuilt after :meth:`load`)."""
        if self._model is None:
            model = _solver(self.config)
            model.user_factors = self.user_factors_
            model.item_factors = self.item_factors_
            self._model = model
        return self._model

    # ------------------------------------------------------------------------------ serving
    def retrieve(
        self, users: UserBatch, k: int, *, exclude: sp.csr_matrix | None = None
    ) -> Candidates:
        """Top-``k`` items by ``user vector . item factor`` for each user, minus ``exclude``.

        Users without a vector get an all-padding row (the merger fills from other sources).
        """
        self._check_fitted()
        k = check_k(k)
        vectors, has_vector = self._user_vectors(users)
        mask = align_exclude(exclude, len(users), self.n_items)

        def score_rows(start: int, stop: int) -> npt.NDArray[np.float32]:
            scores = vectors[start:stop] @ self.item_factors_.T
            scores[~has_vector[start:stop]] = -np.inf
            return scores

        return dense_topk(
            score_rows, len(users), self.n_items, k, mask, self.config.score_block_elements
        )

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
        """Write ``config.json`` and the arrays: factors + the training CSR's (``write_state``)."""
        self._check_fitted()
        meta = {
            "name": self.name,
            "config": to_mapping(self.config),
            "trained_until": self.trained_until_,
            "n_items": self.n_items,
        }
        arrays = {
            "user_factors": self.user_factors_,
            "item_factors": self.item_factors_,
            "user_items_data": self.user_items_.data,
            "user_items_indices": self.user_items_.indices,
            "user_items_indptr": self.user_items_.indptr,
        }
        write_state(directory, type(self).__name__, meta, arrays)

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Read a directory written by :meth:`save`; ``BundleError`` if missing or corrupt.

        The factors and the CSR arrays are copy-on-write maps of their files (``read_state``):
        processes that load the same bundle share them.
        """
        meta, arrays = read_state(directory, cls.__name__)
        source = cls(from_mapping(ALSConfig, meta["config"], cls.__name__), name=meta["name"])
        source.user_factors_ = arrays["user_factors"]
        source.item_factors_ = arrays["item_factors"]
        source.user_items_ = sp.csr_matrix(
            (arrays["user_items_data"], arrays["user_items_indices"], arrays["user_items_indptr"]),
            shape=(source.user_factors_.shape[0], int(meta["n_items"])),
        )
        source.trained_until_ = int(meta["trained_until"])
        return source
