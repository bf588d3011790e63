"""What the re-ranking rules read besides the slate: item side info and the batch's requests.

Both are batch-first: :class:`ItemSideInfo` is indexed by item index, :class:`RerankRequest` holds
one row per request. :func:`per_row_mask` is the membership test the filters are built on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from data.catalog import ItemCatalog
from data.errors import DataError
from reranking.slate import BoolArray, FloatArray, IntArray

PerRowItems: TypeAlias = sp.csr_matrix | sp.csr_array | Sequence[npt.ArrayLike]
"""Items per user: an (n, n_items) sparse matrix (any stored entry counts) or n index arrays."""


@dataclass(frozen=True)
class ItemSideInfo:
    """What the rules know about every item, indexed by item index.

    primary_category: (n_items,) int32, -1 for no category.
    created_at:       (n_items,) int64 seconds UTC, ``UNKNOWN_TIME`` (0) when not known.
    available:        (n_items,) bool, or ``None`` for "every item is available".
    embeddings:       (n_items, d) float32 for MMR's cosine similarity, or ``None``.
    """

    primary_category: IntArray
    created_at: npt.NDArray[np.int64]
    available: BoolArray | None = None
    embeddings: FloatArray | None = None

    def __post_init__(self) -> None:
        n = self.primary_category.shape[0]
        if self.primary_category.ndim != 1 or self.created_at.shape != (n,):
            raise DataError(
                f"primary_category {self.primary_category.shape} and created_at "
                f"{self.created_at.shape} must be equal 1-d shapes (n_items,)"
            )
        if self.available is not None and self.available.shape != (n,):
            raise DataError(f"available has shape {self.available.shape}, expected ({n},)")
        if self.embeddings is not None and (
            self.embeddings.ndim != 2 or self.embeddings.shape[0] != n
        ):
            raise DataError(f"embeddings have shape {self.embeddings.shape}, expected ({n}, d)")

    @property
    def n_items(self) -> int:
        return int(self.primary_category.shape[0])

    @classmethod
    def from_catalog(
        cls,
        catalog: ItemCatalog,
        *,
        available: npt.ArrayLike | None = None,
        embeddings: npt.ArrayLike | None = None,
    ) -> ItemSideInfo:
        """The side info of ``catalog`` (categories, release times) plus optional extras."""
        return cls(
            catalog.primary_category,
            catalog.created_at,
            None if available is None else np.asarray(available, dtype=bool),
            None if embeddings is None else np.asarray(embeddings, dtype=np.float32),
        )


@dataclass(frozen=True)
class RerankRequest:
    """What is particular to the ``n`` requests of a batch.

    now:          (n,) int64 seconds UTC, the time of each request (freshness).
    seen:         items each user already interacted with (:data:`PerRowItems`), or ``None``.
    exclude:      items each request asks to leave out (:data:`PerRowItems`), or ``None``.
    user_keys:    (n,) int64, a stable integer per user (the user index, or a hash of the id of a
                  user unknown at training). Exploration needs it: with ``request_keys`` and
                  ``seed`` it seeds the user's draw, so the draw is the same whichever batch the
                  user is in.
    request_keys: (n,) int64 telling apart requests of one user (``None``: all 0, so a user gets
                  the same exploration items until the seed changes).
    seed:         non-negative int, the exploration seed.
    """

    now: npt.NDArray[np.int64]
    seen: PerRowItems | None = None
    exclude: PerRowItems | None = None
    user_keys: npt.NDArray[np.int64] | None = None
    request_keys: npt.NDArray[np.int64] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        now = np.asarray(self.now)
        if now.ndim != 1 or not np.issubdtype(now.dtype, np.integer):
            raise DataError(f"now must be (n,) integer seconds, got {now.dtype} {now.shape}")
        object.__setattr__(self, "now", now.astype(np.int64, copy=False))
        n = now.shape[0]
        for name in ("user_keys", "request_keys"):
            keys = getattr(self, name)
            if keys is None:
                continue
            keys = np.asarray(keys)
            if keys.shape != (n,) or not np.issubdtype(keys.dtype, np.integer):
                raise DataError(f"{name} must be ({n},) integers, got {keys.dtype} {keys.shape}")
            object.__setattr__(self, name, keys.astype(np.int64, copy=False))
        for name in ("seen", "exclude"):
            _check_per_row(getattr(self, name), n, name)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise DataError(f"seed must be an integer, got {self.seed!r}")
        if self.seed < 0:
            raise DataError(f"seed must be non-negative, got {self.seed}")

    def __len__(self) -> int:
        return int(self.now.shape[0])

    def take(self, rows: npt.ArrayLike) -> RerankRequest:
        """The requests of the given rows (same order)."""
        index = np.asarray(rows, dtype=np.intp)
        return RerankRequest(
            self.now[index],
            _take_per_row(self.seen, index),
            _take_per_row(self.exclude, index),
            None if self.user_keys is None else self.user_keys[index],
            None if self.request_keys is None else self.request_keys[index],
            self.seed,
        )


def _check_per_row(value: PerRowItems | None, n: int, name: str) -> None:
    if value is None:
        return
    if sp.issparse(value):
        rows = value.shape[0]  # type: ignore[union-attr]  # issparse narrows at run time only
        if rows != n:
            raise DataError(f"{name} has {rows} rows for {n} requests")
    elif len(value) != n:
        raise DataError(f"{name} has {len(value)} item lists for {n} requests")


def _take_per_row(value: PerRowItems | None, rows: npt.NDArray[np.intp]) -> PerRowItems | None:
    if value is None:
        return None
    if sp.issparse(value):
        return sp.csr_matrix(value)[rows]
    return [value[int(r)] for r in rows]


def per_row_mask(items: IntArray, per_row: PerRowItems | None) -> BoolArray:
    """(n, w) bool: which entries of ``items`` (n, w) appear in their row of ``per_row``.

    One membership test over (row, item) keys for the whole batch; padding never matches.
    """
    if per_row is None:
        return np.zeros(items.shape, dtype=bool)
    if isinstance(per_row, sp.csr_matrix | sp.csr_array):
        # Read straight from the CSR arrays: scipy's COO conversion costs ~0.25 ms a request.
        stored = np.diff(per_row.indptr)
        rows = np.repeat(np.arange(stored.size, dtype=np.int64), stored)
        cols = per_row.indices[: rows.size].astype(np.int64)
    elif sp.issparse(per_row):
        coo = sp.coo_matrix(per_row)
        rows, cols = coo.row.astype(np.int64), coo.col.astype(np.int64)
    else:
        arrays = [np.asarray(a, dtype=np.int64).reshape(-1) for a in per_row]
        rows = np.repeat(np.arange(len(arrays), dtype=np.int64), [a.size for a in arrays])
        cols = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    listed = cols >= 0
    if not listed.any() or items.size == 0:
        return np.zeros(items.shape, dtype=bool)
    rows, cols = rows[listed], cols[listed]
    base = max(int(items.max()), int(cols.max())) + 1
    keys = np.sort(rows * base + cols)
    candidates = np.arange(items.shape[0], dtype=np.int64)[:, None] * base + items
    at = np.minimum(np.searchsorted(keys, candidates), keys.size - 1)
    return (keys[at] == candidates) & (items >= 0)


__all__ = ["ItemSideInfo", "PerRowItems", "RerankRequest", "per_row_mask"]
