"""``ItemItemSource``: candidates from an item-to-item model over each user's whole history.

Two models, one source; ``ItemItemConfig.method`` picks, and ``"auto"`` picks by catalogue size:

* ``"ease"`` (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019): the
  closed-form ridge regression of every item column of the binary user x item matrix ``X`` on
  all the others, with a zero diagonal::

      P = (X^T X + l2 * I)^-1,     B = -P / diag(P),     B_ii = 0

  A user's scores are ``x_u B``. It is the strongest simple baseline on small and mid-size
  catalogues (README's quality section), but it inverts a dense (n_items, n_items) matrix: memory
  ``2 * 4 * n_items^2`` bytes and ``n_items^3 / 3`` flops, so ``"auto"`` uses it up to
  ``max_dense_items``.
* ``"cosine"``: item-kNN (Sarwar et al., WWW 2001; Deshpande & Karypis, TOIS 2004): the cosine
  similarity of item columns of ``X``, the ``neighbors`` most similar items kept per item as a
  sparse matrix, built in blocks of items so memory stays bounded on large catalogues.

Either way the learned matrix is row-pruned to ``neighbors`` entries per item when that is smaller
than the catalogue, and a user's vector is the union of their training row, their ``seen`` set and
their recent items (binary): feedback after training changes the answer at once, and a user
unknown at training is served from the history alone.

The EASE regularisation ``l2`` is chosen on the validation window when there is one (``l2 =
None``, the default) and the catalogue is small enough (``tune_max_items``): a hill climb over
``l2_grid`` from its middle, one factorisation per step, stopping when neither neighbour of the
best value scores higher (validation nDCG@10 is unimodal in ``l2``; usually 3-4 steps). Its best
value moves with the log's density (sparser users want more shrinkage) and its size (larger Gram
entries want more), in ways no single formula we measured follows across logs
(``docs/benchmarks.md``, quality section). Otherwise it is ``DEFAULT_L2``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Self, get_args

import numpy as np
import numpy.typing as npt
import scipy.linalg
import scipy.sparse as sp

from data.catalog import ItemCatalog
from data.configuration import from_mapping, to_mapping
from data.errors import ConfigError, DataError, NotFittedError
from data.interactions import Interactions
from data.validation import integer, non_negative_float, one_of, positive_float
from retrieval.base import Candidates, LastBatchMemo, UserBatch
from retrieval.state_io import read_state, write_state
from retrieval.topk import align_exclude, check_k, dense_topk, prune_rows
from retrieval.validation import ValidationWindow, hill_climb, ndcg, validation_window

Method = Literal["auto", "ease", "cosine"]

DEFAULT_L2 = 250.0
"""EASE's ``l2`` without a validation window: Steck (2019) tuned 200-1000 on ML-20M, Netflix and
MSD; 250 is RecBole's default."""


@dataclass(frozen=True)
class ItemItemConfig:
    """Hyperparameters of :class:`ItemItemSource`.

    method: ``"ease"``, ``"cosine"``, or ``"auto"``: EASE up to ``max_dense_items`` items,
        cosine item-kNN beyond.
    l2: EASE ridge strength; ``None`` chooses it on the validation window (module docstring).
    l2_grid: the values the hill climb may visit: a factor of 2 apart, since the optimum is flat
        within about that (validation nDCG within 1% over 75-150 on Last.fm).
    tune_max_items: the largest catalogue whose ``l2`` is chosen on validation (each step is an
        ``n_items^3`` factorisation: seconds at 4k items, minutes at 10k).
    validation_users: users the choice is measured on at most (a seeded subset; nDCG@10 over a
        few thousand users is stable to the third decimal).
    max_dense_items: the largest catalogue EASE inverts (10k items: 0.8 GB and ~30 s on 2 cores).
    max_items: the retrieval stage leaves the source out of a bundle with a larger catalogue:
        the kNN build's co-occurrence blocks and the per-request scoring grow with the catalogue,
        and at that scale the two-tower and ALS indexes serve (the 1M-item load benchmark).
    neighbors: entries kept per item row of the learned matrix (cosine always; EASE when smaller
        than the catalogue); 0 keeps every entry.
    shrinkage: cosine only, added to the norm product (Bell & Koren's shrinkage): similarities of
        items with few users shrink toward 0.
    score_block_elements: dense scores computed at once in retrieval (bounds memory).
    """

    method: Method = "auto"
    l2: float | None = None
    l2_grid: tuple[float, ...] = (25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0)
    tune_max_items: int = 4_000
    validation_users: int = 5_000
    max_dense_items: int = 10_000
    max_items: int = 100_000
    neighbors: int = 0
    shrinkage: float = 10.0
    score_block_elements: int = 1 << 22

    def __post_init__(self) -> None:
        one_of(self.method, "ItemItemConfig.method", get_args(Method))
        if self.l2 is not None:  # None: chosen on the validation window
            positive_float(self.l2, "ItemItemConfig.l2", finite=False)
        non_negative_float(self.shrinkage, "ItemItemConfig.shrinkage", finite=False)
        object.__setattr__(self, "l2_grid", tuple(self.l2_grid))  # TOML gives a list
        if not self.l2_grid:
            raise ConfigError("ItemItemConfig.l2_grid is empty: give at least one l2 to try")
        for value in self.l2_grid:
            positive_float(value, "ItemItemConfig.l2_grid", finite=False)
        for name, low in (
            ("max_dense_items", 1),
            ("max_items", 1),
            ("neighbors", 0),
            ("score_block_elements", 1),
            ("validation_users", 1),
            ("tune_max_items", 0),
        ):
            integer(getattr(self, name), f"ItemItemConfig.{name}", minimum=low)


def binary_matrix(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """``matrix`` with every stored entry set to 1.0 (float32): who interacted with what."""
    out = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    out.data[:] = 1.0
    return out


@dataclass(frozen=True)
class ItemKNNConfig(ItemItemConfig):
    """The ``item_knn`` source: :class:`ItemItemSource` as cosine item-kNN whatever the catalogue
    size, next to EASE in ``item_item``. The two neighbourhood models disagree enough to help a
    ranker (Last.fm validation: kNN 0.181, EASE 0.179 alone; both in a score blend with ALS
    beat either pair, ``docs/benchmarks.md``, quality section).

    neighbors: 500: on Last.fm, nDCG@10 rose with every step from 10 to 500 neighbours.
    shrinkage: 0: the plain cosine ranked best there (10 cost 0.007).
    """

    method: Method = "cosine"
    neighbors: int = 500
    shrinkage: float = 0.0


def ease_weights(user_items: sp.spmatrix | sp.sparray, l2: float) -> npt.NDArray[np.float64]:
    """EASE's ``B`` (n_items, n_items) float64 from a (n_users, n_items) matrix ``X``.

    Steck (2019), eq. 8: ``P = (X^T X + l2 I)^-1``, ``B_ij = -P_ij / P_jj``, ``B_jj = 0``.
    ``X^T X + l2 I`` is symmetric positive definite (``l2 > 0``), so ``P`` comes from its
    Cholesky factor (LAPACK ``potrf`` + ``potri``: half the flops of a general inverse), in
    place: one dense n_items x n_items float64 matrix is all that is allocated.
    """
    x = sp.csr_matrix(user_items, dtype=np.float64)
    gram = (x.T @ x).toarray()
    gram[np.diag_indices_from(gram)] += l2
    # The Gram matrix is symmetric: its transpose is the same matrix as a Fortran-ordered view,
    # which LAPACK can overwrite instead of copying.
    factor, info = scipy.linalg.lapack.dpotrf(gram.T, lower=False, clean=False, overwrite_a=True)
    if info == 0:
        weights, info = scipy.linalg.lapack.dpotri(factor, lower=False, overwrite_c=True)
    if info != 0:
        raise DataError(
            f"EASE: X^T X + {l2} I is not numerically positive definite (LAPACK info {info}); "
            "raise l2"
        )
    _mirror_upper_triangle(weights)
    weights /= -np.diag(weights).copy()  # column j divided by -P_jj
    weights[np.diag_indices_from(weights)] = 0.0
    return weights


def _mirror_upper_triangle(matrix: npt.NDArray[np.float64], block: int = 512) -> None:
    """Copy the upper triangle onto the lower one in place, ``block`` rows at a time.

    ``potri`` writes only the upper triangle; a block loop keeps the temporary copy at
    ``block x n`` instead of the full-size index arrays that ``np.tril_indices`` would need.
    """
    for start in range(block, matrix.shape[0], block):
        stop = min(start + block, matrix.shape[0])
        matrix[start:stop, :start] = matrix[:start, start:stop].T
    for start in range(0, matrix.shape[0], block):  # the diagonal blocks themselves
        stop = min(start + block, matrix.shape[0])
        square = matrix[start:stop, start:stop]
        lower = np.tril_indices(stop - start, -1)
        square[lower] = square.T[lower]


def cosine_neighbors(
    x: sp.csr_matrix, neighbors: int, shrinkage: float, block_items: int = 2048
) -> sp.csr_matrix:
    """(n_items, n_items) float32 CSR: each item's ``neighbors`` most cosine-similar items.

    Built ``block_items`` rows at a time (a block's similarities are a sparse product), so memory
    is one block of rows, never the whole item-item matrix.
    """
    n_items = x.shape[1]
    columns = sp.csc_matrix(x)
    norms = np.sqrt(np.asarray(columns.multiply(columns).sum(axis=0)).ravel())
    xt = sp.csr_matrix(columns.T)
    blocks: list[sp.csr_matrix] = []
    for start in range(0, n_items, block_items):
        stop = min(start + block_items, n_items)
        block = sp.csr_matrix(xt[start:stop] @ x, dtype=np.float64)
        coo = block.tocoo()
        keep = coo.row + start != coo.col  # an item is not its own neighbour
        rows, cols = coo.row[keep], coo.col[keep]
        values = coo.data[keep] / (norms[rows + start] * norms[cols] + shrinkage)
        block = sp.csr_matrix((values, (rows, cols)), shape=(stop - start, n_items))
        blocks.append(prune_rows(block, neighbors))
    return sp.csr_matrix(sp.vstack(blocks), dtype=np.float32)


class ItemItemSource:
    """Item-to-item candidates over the whole history (see the module docstring).

    Learned state (after :meth:`fit`):
        method_:  ``"ease"`` or ``"cosine"``, what ``"auto"`` chose.
        l2_:      the EASE ridge used (0.0 for cosine).
        validation_: {l2: validation nDCG@10} of the values tried (empty when not chosen).
        dense_:   (n_items, n_items) float32 weights when kept dense, else ``None``.
        sparse_:  (n_items, n_items) float32 CSR weights when pruned, else ``None``.
        trained_: (n_users, n_items) float32 binary CSR, the training rows of known users.
    """

    method_: str
    l2_: float
    validation_: dict[float, float]
    dense_: npt.NDArray[np.float32] | None
    sparse_: sp.csr_matrix | None
    trained_: sp.csr_matrix

    def __init__(
        self, config: ItemItemConfig | ItemKNNConfig | None = None, *, name: str = "item_item"
    ) -> None:
        self.config = config if config is not None else ItemItemConfig()
        self.name = name
        # retrieve() and the ranker's score features ask for the same batch's rows in one pass.
        self._rows_memo: LastBatchMemo[sp.csr_matrix] = LastBatchMemo()

    @property
    def n_items(self) -> int:
        return int(self.trained_.shape[1])

    def fit(
        self,
        log: Interactions,
        catalog: ItemCatalog | None = None,
        valid: Interactions | None = None,
    ) -> Self:
        """Learn the item-item weights from ``log`` (binary); ``valid`` (same id maps), when
        given, chooses EASE's ``l2``. ``catalog`` is not used."""
        config = self.config
        x = binary_matrix(log.matrix)
        n_items = x.shape[1]
        method = config.method
        if method == "auto":
            method = "ease" if n_items <= config.max_dense_items else "cosine"
        self.method_, self.trained_, self.validation_ = method, x, {}
        self._rows_memo.clear()
        if method == "ease":
            weights = self._fit_ease(x, log, valid)
            keep = config.neighbors
            if 0 < keep < n_items:
                self.dense_, self.sparse_ = None, prune_rows(sp.csr_matrix(weights), keep)
            else:
                self.dense_, self.sparse_ = weights, None
        else:
            self.l2_ = 0.0
            keep = config.neighbors or 100  # a dense cosine matrix defeats its purpose
            self.dense_, self.sparse_ = None, cosine_neighbors(x, keep, config.shrinkage)
        return self

    def refit(self, log: Interactions, catalog: ItemCatalog | None = None) -> ItemItemSource:
        """A new source fitted on ``log`` (training plus the validation window) with the ``l2``
        this one chose on validation: the served weights learn from every event, the
        hyperparameters only from held-out ones. ``validation_`` is carried over."""
        self._check_fitted()
        config = self.config
        if self.method_ == "ease":
            config = replace(config, l2=self.l2_)
        fresh = type(self)(config, name=self.name).fit(log, catalog)
        fresh.validation_ = dict(self.validation_)
        return fresh

    def _fit_ease(
        self, x: sp.csr_matrix, log: Interactions, valid: Interactions | None
    ) -> npt.NDArray[np.float32]:
        """EASE weights at the configured ``l2``, or at the grid's best on ``valid``."""
        config = self.config
        window = None
        if config.l2 is None and x.shape[1] <= config.tune_max_items:
            window = validation_window(log, valid, max_users=config.validation_users)
        if window is None:
            self.l2_ = float(config.l2) if config.l2 is not None else DEFAULT_L2
            return ease_weights(x, self.l2_).astype(np.float32)
        grid = sorted(float(v) for v in config.l2_grid)
        weights: dict[int, npt.NDArray[np.float32]] = {}

        def score(i: int) -> float:
            if grid[i] not in self.validation_:
                weights[i] = ease_weights(x, grid[i]).astype(np.float32)
                self.validation_[grid[i]] = _window_ndcg(weights[i], window)
            return self.validation_[grid[i]]

        best = hill_climb(len(grid), score)
        for i in list(weights):  # only the chosen matrix is kept
            if i != best:
                del weights[i]
        self.l2_ = grid[best]
        return weights[best]

    def user_rows(self, users: UserBatch) -> sp.csr_matrix:
        """(n, n_items) float32 binary CSR: training row + seen set + recent items of each user
        (read-only: the last batch's rows are remembered)."""
        self._check_fitted()
        return self._rows_memo.get(users, self._build_user_rows)

    def _build_user_rows(self, users: UserBatch) -> sp.csr_matrix:
        n, n_items = len(users), self.n_items
        known = (users.user_idx >= 0) & (users.user_idx < self.trained_.shape[0])
        rows = sp.csr_matrix((n, n_items), dtype=np.float32)
        if known.any():
            selector = sp.csr_matrix(
                (
                    np.ones(int(known.sum()), np.float32),
                    (np.flatnonzero(known), users.user_idx[known]),
                ),
                shape=(n, self.trained_.shape[0]),
            )
            rows = rows + selector @ self.trained_
        recent = users.recent_items
        r, c = np.nonzero((recent >= 0) & (recent < n_items))
        if r.size:
            rows = rows + sp.csr_matrix(
                (np.ones(r.size, np.float32), (r, recent[r, c])), shape=(n, n_items)
            )
        if users.seen is not None and users.seen.nnz:
            seen = sp.csr_matrix(users.seen, dtype=np.float32)
            seen = seen[:, :n_items] if seen.shape[1] >= n_items else _widen(seen, n_items)
            rows = rows + seen
        return binary_matrix(sp.csr_matrix(rows))

    def _scores(self, rows: sp.csr_matrix) -> npt.NDArray[np.float32]:
        """(n, n_items) float32 dense scores ``x_u W``; items in the user's row get ``-inf``."""
        if self.dense_ is not None:
            scores = np.asarray(rows @ self.dense_, dtype=np.float32)
        else:
            assert self.sparse_ is not None
            scores = (rows @ self.sparse_).toarray().astype(np.float32, copy=False)
        has_history = np.diff(rows.indptr) > 0
        scores[~has_history] = -np.inf
        r = np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr))
        scores[r, rows.indices] = -np.inf  # a user's own items are never candidates for them
        return scores

    def retrieve(
        self, users: UserBatch, k: int, *, exclude: sp.csr_matrix | None = None
    ) -> Candidates:
        """Top-``k`` items by ``x_u W`` for each user, minus their history and ``exclude``.

        Users without any known history get an all-padding row.
        """
        k = check_k(k)
        rows = self.user_rows(users)
        mask = align_exclude(exclude, len(users), self.n_items)

        def score_rows(start: int, stop: int) -> npt.NDArray[np.float32]:
            return self._scores(rows[start:stop])

        return dense_topk(
            score_rows, len(users), self.n_items, k, mask, self.config.score_block_elements
        )

    def score(self, users: UserBatch, item_idx: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """(n, m) float32 scores of arbitrary items ``item_idx`` (n, m) for each user.

        NaN for padding / unknown items and for users without history (a missing feature, not a
        low score); an item in the user's own history scores as any other item.
        """
        items = np.asarray(item_idx)
        if items.ndim != 2 or items.shape[0] != len(users):
            raise DataError(f"item_idx has shape {items.shape}, expected ({len(users)}, m)")
        rows = self.user_rows(users)
        valid = (items >= 0) & (items < self.n_items)
        safe = np.where(valid, items, 0)
        if self.dense_ is not None:
            # Per row: the user's history rows of W, summed, read at the requested columns.
            out = np.empty(items.shape, dtype=np.float32)
            for r in range(items.shape[0]):
                history = rows.indices[rows.indptr[r] : rows.indptr[r + 1]]
                out[r] = self.dense_[np.ix_(history, safe[r])].sum(axis=0)
        else:
            assert self.sparse_ is not None
            full = sp.csr_matrix(rows @ self.sparse_)
            out = np.asarray(full[np.arange(items.shape[0])[:, None], safe].toarray())
        has_history = (np.diff(rows.indptr) > 0)[:, None]
        return np.where(valid & has_history, out, np.nan).astype(np.float32)

    def neighbors(self, item_idx: npt.ArrayLike, k: int) -> Candidates:
        """The ``k`` items with the largest weights in each of ``item_idx``'s rows (m,):
        "similar items". An item outside the training catalogue gets padding."""
        self._check_fitted()
        k = check_k(k)
        items = np.asarray(item_idx, dtype=np.int64).ravel()
        known = (items >= 0) & (items < self.n_items)
        rows = np.full((items.size, self.n_items), -np.inf, dtype=np.float32)
        if known.any():
            if self.dense_ is not None:
                rows[known] = self.dense_[items[known]]
            else:
                assert self.sparse_ is not None
                block = self.sparse_[items[known]].toarray()
                rows[known] = np.where(block != 0, block, -np.inf)
        rows[np.flatnonzero(known), items[known]] = -np.inf  # an item is not its own neighbour
        return Candidates.from_scores(rows, k, None)

    def save(self, directory: Path) -> None:
        """Write ``config.json`` and the arrays (weights and training rows), no pickle."""
        self._check_fitted()
        meta = {
            "name": self.name,
            "config": to_mapping(self.config),
            "method": self.method_,
            "l2": self.l2_,
            "validation": {str(k): v for k, v in self.validation_.items()},
            "n_users": int(self.trained_.shape[0]),
            "n_items": self.n_items,
        }
        arrays: dict[str, npt.NDArray[np.generic]] = {
            "trained_indices": self.trained_.indices,
            "trained_indptr": self.trained_.indptr,
        }
        if self.dense_ is not None:
            arrays["dense"] = self.dense_
        else:
            assert self.sparse_ is not None
            arrays.update(
                sparse_data=self.sparse_.data,
                sparse_indices=self.sparse_.indices,
                sparse_indptr=self.sparse_.indptr,
            )
        write_state(directory, type(self).__name__, meta, arrays)

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Read a directory written by :meth:`save`; ``BundleError`` if missing or corrupt."""
        meta, arrays = read_state(directory, cls.__name__)
        source = cls(from_mapping(ItemItemConfig, meta["config"], cls.__name__), name=meta["name"])
        n_users, n_items = int(meta["n_users"]), int(meta["n_items"])
        source.method_, source.l2_ = str(meta["method"]), float(meta["l2"])
        source.validation_ = {float(k): float(v) for k, v in meta.get("validation", {}).items()}
        indices = arrays["trained_indices"]
        source.trained_ = sp.csr_matrix(
            (np.ones(indices.size, np.float32), indices, arrays["trained_indptr"]),
            shape=(n_users, n_items),
        )
        if "dense" in arrays:
            source.dense_, source.sparse_ = arrays["dense"], None
        else:
            source.dense_ = None
            source.sparse_ = sp.csr_matrix(
                (arrays["sparse_data"], arrays["sparse_indices"], arrays["sparse_indptr"]),
                shape=(n_items, n_items),
            )
        return source

    def _check_fitted(self) -> None:
        if not hasattr(self, "trained_"):
            raise NotFittedError(f"{type(self).__name__} {self.name!r} is not fitted; call fit")


def _window_ndcg(weights: npt.NDArray[np.float32], window: ValidationWindow) -> float:
    """Validation nDCG@10 of dense item-item ``weights`` scored from the window's training rows."""
    scores = np.asarray(window.seen @ weights, dtype=np.float32)
    rows = np.repeat(np.arange(len(window)), np.diff(window.seen.indptr))
    scores[rows, window.seen.indices] = -np.inf
    top = Candidates.from_scores(scores, 10, None).item_idx
    return ndcg(top, window.relevant)


def _widen(matrix: sp.csr_matrix, n_items: int) -> sp.csr_matrix:
    """``matrix`` with empty columns appended up to ``n_items``."""
    return sp.csr_matrix((matrix.data, matrix.indices, matrix.indptr), (matrix.shape[0], n_items))
