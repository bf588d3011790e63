"""``ItemCatalog``: item features in index space (categories, release time), aligned with an IdMap.

The two-tower item tower, the ranker's item features and the re-ranker's category caps all read
item features by item index; this is the one place that aligns ``items.parquet`` with the item map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import polars as pl
import scipy.sparse as sp

from data.idmap import IdMap
from data.schema import ITEM_ID

CATEGORIES = "categories"
CREATED_AT = "created_at"
UNKNOWN_TIME = 0
"""``created_at`` of an item whose release time is not known (treated as 'always available')."""


@dataclass(frozen=True, eq=False)
class ItemCatalog:
    """Features of ``len(items)`` items.

    categories:     (n_items, n_categories) float32 CSR, 1 where the item has the category.
    primary_category: (n_items,) int32, the first listed category, -1 when none.
    created_at:     (n_items,) int64 seconds UTC, ``UNKNOWN_TIME`` when not known.
    """

    items: IdMap
    category_names: tuple[str, ...]
    categories: sp.csr_matrix
    primary_category: npt.NDArray[np.int32]
    created_at: npt.NDArray[np.int64]

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_categories(self) -> int:
        return len(self.category_names)

    @classmethod
    def from_frame(
        cls,
        frame: pl.DataFrame | None,
        items: IdMap,
        *,
        category_names: tuple[str, ...] | None = None,
    ) -> ItemCatalog:
        """Align an ``items.parquet`` frame with ``items``; rows for unknown ids are ignored.

        Items of ``items`` absent from ``frame`` get no category and ``UNKNOWN_TIME``.
        A ``categories`` column may be ``list[str]`` or a ``|``-separated string.
        ``category_names`` fixes the category codes (a trained model's vocabulary): categories
        outside it are dropped, so codes never shift when new items bring new categories.
        """
        n_items = len(items)
        if frame is None or frame.height == 0:
            return cls.empty(items)
        frame = frame.with_columns(pl.col(ITEM_ID).cast(pl.String))
        frame = frame.with_columns(
            _index=pl.Series(items.index(frame[ITEM_ID], allow_unknown=True))
        ).filter(pl.col("_index") >= 0)
        created_at = np.full(n_items, UNKNOWN_TIME, dtype=np.int64)
        if CREATED_AT in frame.columns:
            times = frame.select(
                "_index", pl.col(CREATED_AT).cast(pl.Int64).fill_null(UNKNOWN_TIME)
            )
            created_at[times["_index"].to_numpy()] = times[CREATED_AT].to_numpy()
        if CATEGORIES not in frame.columns:
            return cls(
                items,
                (),
                sp.csr_matrix((n_items, 0), dtype=np.float32),
                np.full(n_items, -1, dtype=np.int32),
                created_at,
            )
        column = frame[CATEGORIES]
        if column.dtype == pl.String:
            column = column.str.split("|")
        exploded = (
            frame.select("_index", column.alias(CATEGORIES))
            .with_columns(_position=pl.int_ranges(pl.col(CATEGORIES).list.len()))
            .explode(CATEGORIES, "_position")
            .drop_nulls(CATEGORIES)
            .filter(pl.col(CATEGORIES) != "")
        )
        if category_names is None:
            names = tuple(sorted(exploded[CATEGORIES].unique().to_list()))
        else:
            names = category_names
            exploded = exploded.filter(pl.col(CATEGORIES).is_in(list(names)))
        codes = (
            exploded[CATEGORIES]
            .replace_strict(list(names), list(range(len(names))), return_dtype=pl.Int32)
            .to_numpy()
        )
        rows = exploded["_index"].to_numpy()
        matrix = sp.csr_matrix(
            (np.ones(rows.size, dtype=np.float32), (rows, codes)), shape=(n_items, len(names))
        )
        matrix.sum_duplicates()
        matrix.data[:] = 1.0
        primary = np.full(n_items, -1, dtype=np.int32)
        first = exploded["_position"].to_numpy() == 0
        primary[rows[first]] = codes[first]
        return cls(items, names, matrix, primary, created_at)

    def updated(self, frame: pl.DataFrame, items: IdMap) -> ItemCatalog:
        """This catalogue over ``items`` (an extension of ``self.items``, as ``IdMap.extend``
        makes), with the values ``frame`` gives for the items it lists. A value not given (no
        such column, or null) keeps the item's current one: none for a new item.

        ``frame`` is shaped like ``items.parquet``; category codes stay those of this catalogue
        (a trained model's vocabulary: categories it does not know are dropped).
        """
        if len(items) < self.n_items:
            raise ValueError(
                f"items has {len(items)} ids, fewer than the catalogue's {self.n_items}"
            )
        fresh = ItemCatalog.from_frame(frame, items, category_names=self.category_names)
        rows = items.index(frame[ITEM_ID].cast(pl.String), allow_unknown=True)
        grow = len(items) - self.n_items
        categories = sp.vstack(
            [self.categories, sp.csr_matrix((grow, self.n_categories), dtype=np.float32)]
        ).tocsr()
        primary = np.concatenate([self.primary_category, np.full(grow, -1, np.int32)])
        created_at = np.concatenate([self.created_at, np.full(grow, UNKNOWN_TIME, np.int64)])
        given = _given_rows(frame, CATEGORIES, rows, len(items))
        if given.any():
            keep = sp.diags((~given).astype(np.float32))
            take = sp.diags(given.astype(np.float32))
            categories = (keep @ categories + take @ fresh.categories).tocsr()
            categories.eliminate_zeros()
            primary = np.where(given, fresh.primary_category, primary)
        given = _given_rows(frame, CREATED_AT, rows, len(items))
        created_at = np.where(given, fresh.created_at, created_at)
        return ItemCatalog(
            items,
            self.category_names,
            categories.astype(np.float32),
            primary.astype(np.int32),
            created_at.astype(np.int64),
        )

    @classmethod
    def empty(cls, items: IdMap) -> ItemCatalog:
        n_items = len(items)
        return cls(
            items,
            (),
            sp.csr_matrix((n_items, 0), dtype=np.float32),
            np.full(n_items, -1, dtype=np.int32),
            np.full(n_items, UNKNOWN_TIME, dtype=np.int64),
        )


def _given_rows(
    frame: pl.DataFrame, column: str, rows: npt.NDArray[np.int32], n_items: int
) -> npt.NDArray[np.bool_]:
    """(n_items,) True for the items whose row of ``frame`` has a non-null ``column``."""
    given = np.zeros(n_items, dtype=bool)
    if column in frame.columns:
        present = frame[column].is_not_null().to_numpy() & (rows >= 0)
        given[rows[present]] = True
    return given
