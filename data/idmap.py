"""``IdMap``: a frozen, bidirectional mapping between external string ids and int32 indices.

Models, indexes and sparse matrices work on contiguous integer indices ``0 .. n-1``; the outside
world speaks string ids. One ``IdMap`` per entity (users, items) converts between the two, in
bulk: :meth:`IdMap.index` maps 20M ids in about a second (a polars hash lookup, no Python loop).

The map is saved as a two-column parquet-friendly frame (:meth:`IdMap.to_frame`), never pickled.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt
import polars as pl

from data.errors import DataError

ID_COLUMN = "id"
INDEX_COLUMN = "index"
UNKNOWN_INDEX = -1
"""The index :meth:`IdMap.index` returns for an id it does not know (with ``allow_unknown``)."""

# IdMap.index binary-searches a sorted copy of the map (made once, on first use) for calls of up
# to this many ids or of no more ids than the map holds; beyond, polars' hash lookup. The hash
# lookup rebuilds a table of the whole map on every call: right for 20M ids against a small map,
# ruinous for the one user of an HTTP request (a 1M-id map: docs/benchmarks.md, "Measurements
# behind the defaults").
_BINARY_SEARCH_MIN_IDS = 4_096

# How many offending ids an error message quotes: enough to recognise the problem, short enough
# to read on one line.
_MAX_QUOTED_IDS = 5
_FEW_IDS = 256  # id_list reads up to this many ids one by one

IdsLike = pl.Series | Sequence[str] | npt.NDArray[np.object_] | npt.NDArray[np.str_]


@dataclass(frozen=True, eq=False)
class IdMap:
    """An immutable mapping ``id (str) <-> index (int32)`` over ``len(self)`` distinct ids.

    Build it with :meth:`from_ids` (sorted unique ids, so the same ids always give the same
    indices) or :meth:`from_frame` (a saved map). Index ``i`` belongs to ``ids[i]``.
    """

    _ids: pl.Series

    def __post_init__(self) -> None:
        ids = self._ids
        if ids.dtype != pl.String:
            raise DataError(f"IdMap ids must be strings, got dtype {ids.dtype}")
        if ids.null_count():
            raise DataError(f"IdMap ids contain {ids.null_count()} null value(s)")
        if ids.n_unique() != ids.len():
            dupes = ids.filter(ids.is_duplicated()).unique().sort().head(_MAX_QUOTED_IDS)
            raise DataError(f"IdMap ids are not unique; duplicated: {dupes.to_list()}")
        if ids.len() > np.iinfo(np.int32).max:
            raise DataError(f"IdMap holds {ids.len()} ids, more than int32 indices can address")
        # Frozen dataclass: bypass __setattr__ once to store the canonical (renamed) series.
        object.__setattr__(self, "_ids", ids.rename(ID_COLUMN))

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_ids(cls, ids: IdsLike | Iterable[str]) -> IdMap:
        """The map over the distinct values of ``ids``, sorted, so index order is deterministic.

        Repeated ids are fine (a raw interaction column is the usual input); nulls are not.
        """
        series = _as_string_series(ids, "ids")
        if series.null_count():
            raise DataError(
                f"ids contain {series.null_count()} null value(s); every id must be set"
            )
        return cls(series.unique().sort())

    @classmethod
    def from_frame(cls, frame: pl.DataFrame) -> IdMap:
        """Rebuild a map saved with :meth:`to_frame`: columns ``id`` and ``index`` (0..n-1, any
        row order)."""
        missing = [c for c in (ID_COLUMN, INDEX_COLUMN) if c not in frame.columns]
        if missing:
            raise DataError(f"id map frame: missing column(s) {missing}; found {frame.columns}")
        ordered = frame.sort(INDEX_COLUMN)
        index = ordered[INDEX_COLUMN].to_numpy()
        if not np.array_equal(index, np.arange(len(index))):
            raise DataError(
                f"id map frame: column {INDEX_COLUMN!r} must hold each of 0..{len(index) - 1} "
                "exactly once"
            )
        return cls(ordered[ID_COLUMN].cast(pl.String))

    # ----------------------------------------------------------------------------- access
    @property
    def ids(self) -> pl.Series:
        """``(n,)`` String series: ``ids[i]`` is the id of index ``i``."""
        # clone() is O(1) (shared Arrow buffers) and keeps callers from mutating the map.
        return self._ids.clone()

    def __len__(self) -> int:
        return self._ids.len()

    def __contains__(self, external_id: object) -> bool:
        return (
            isinstance(external_id, str)
            and self.index([external_id], allow_unknown=True)[0] != UNKNOWN_INDEX
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IdMap):
            return NotImplemented
        return self._ids.equals(other._ids)

    __hash__ = None  # type: ignore[assignment]  # equal by value, and not meant as a dict key

    def __repr__(self) -> str:
        head = self._ids.head(3).to_list()
        return f"IdMap(n={len(self)}, ids={head}{'...' if len(self) > 3 else ''})"

    def index(self, ids: IdsLike, *, allow_unknown: bool = False) -> npt.NDArray[np.int32]:
        """Map ``ids`` (n,) to ``(n,)`` int32 indices.

        Unknown (and null) ids map to ``UNKNOWN_INDEX`` (-1) if ``allow_unknown``; otherwise they
        raise ``DataError`` quoting up to five of them.
        """
        series = _as_string_series(ids, "ids")
        indices = None
        few = series.len() <= max(_BINARY_SEARCH_MIN_IDS, len(self))
        if few and not series.null_count():
            indices = self._binary_search(series.to_list())
        if indices is None:
            indices = series.replace_strict(
                self._ids,
                pl.int_range(len(self), dtype=pl.Int32, eager=True),
                default=UNKNOWN_INDEX,
                return_dtype=pl.Int32,
            ).to_numpy()
        if not allow_unknown:
            unknown = indices == UNKNOWN_INDEX
            if unknown.any():
                distinct = series.filter(pl.Series(unknown)).unique(maintain_order=True)
                raise DataError(
                    f"{int(unknown.sum())} of {len(indices)} ids ({distinct.len()} distinct) are "
                    f"not in the id map (n={len(self)}), "
                    f"e.g. {distinct.head(_MAX_QUOTED_IDS).to_list()}"
                )
        return indices

    @cached_property
    def _sorted(self) -> tuple[npt.NDArray[np.str_], npt.NDArray[np.int32]] | None:
        """The ids in sorted order (fixed-width numpy strings) and the index of each; ``None``
        when an id holds a NUL character (numpy strings drop trailing NULs: "a\\0" == "a")."""
        if self._ids.str.contains("\x00", literal=True).any():
            return None
        # Sorted by numpy itself, so that the order is the one np.searchsorted assumes.
        ids = np.array(self._ids.to_list(), dtype=np.str_)
        order = np.argsort(ids, kind="stable").astype(np.int32)
        return ids[order], order

    def _binary_search(self, queries: list[str]) -> npt.NDArray[np.int32] | None:
        """Indices of ``queries`` by binary search (``UNKNOWN_INDEX`` if absent); ``None`` when
        a NUL character rules it out."""
        lookup = self._sorted
        if lookup is None or any("\x00" in q for q in queries):
            return None
        sorted_ids, index_of = lookup
        if not queries or sorted_ids.size == 0:
            return np.full(len(queries), UNKNOWN_INDEX, dtype=np.int32)
        # The queries keep their own width: cast to the map's, a longer id would be truncated
        # into a false match.
        wanted = np.array(queries, dtype=np.str_)
        position = np.searchsorted(sorted_ids, wanted).clip(max=sorted_ids.size - 1)
        found = sorted_ids[position] == wanted
        return np.where(found, index_of[position], UNKNOWN_INDEX).astype(np.int32)

    def to_ids(self, indices: npt.ArrayLike) -> pl.Series:
        """Map integer ``indices`` (n,) back to a ``(n,)`` String series.

        Raises ``DataError`` if an index is outside ``[0, len(self))``.
        """
        return self._ids.gather(self._checked(indices))

    def id_list(self, indices: npt.ArrayLike) -> list[str]:
        """``to_ids`` as a Python list: what a response is built from.

        A request's few dozen ids are read one by one, far faster than a polars gather, which
        costs a fixed fraction of a millisecond a call whatever its size (its query engine
        starts, on another thread when called from one; ``docs/benchmarks.md``). Larger lists
        use the gather.
        """
        array = self._checked(indices)
        if array.size > _FEW_IDS:
            return self._ids.gather(array).to_list()
        ids = self._ids
        return [ids[i] for i in array.tolist()]

    def _checked(self, indices: npt.ArrayLike) -> npt.NDArray[np.int64]:
        array = np.asarray(indices)
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise DataError(f"indices must be integers, got dtype {array.dtype}")
        array = array.astype(np.int64, copy=False).ravel()
        bad = (array < 0) | (array >= len(self))
        if bad.any():
            raise DataError(
                f"{int(bad.sum())} indices are outside [0, {len(self)}), "
                f"e.g. {array[bad][:_MAX_QUOTED_IDS].tolist()}"
            )
        return array

    def extend(self, ids: IdsLike) -> IdMap:
        """A new map with the unknown ``ids`` appended (sorted) after the existing ones.

        Existing indices keep their meaning, so vectors already stored by index stay valid: this is
        how items that appear after training are added to a live index.
        """
        series = _as_string_series(ids, "ids").drop_nulls()
        new = series.filter(~series.is_in(self._ids.implode())).unique().sort()
        return self if new.is_empty() else IdMap(pl.concat([self._ids, new.rename(ID_COLUMN)]))

    # ----------------------------------------------------------------------------- persistence
    def to_frame(self) -> pl.DataFrame:
        """The map as a frame with columns ``id`` (String) and ``index`` (Int32), for parquet."""
        return pl.DataFrame(
            {
                ID_COLUMN: self._ids,
                INDEX_COLUMN: pl.int_range(len(self), dtype=pl.Int32, eager=True),
            }
        )


def _as_string_series(ids: IdsLike | Iterable[str], what: str) -> pl.Series:
    """``ids`` as a String series without copying when it already is one."""
    if isinstance(ids, pl.Series):
        if ids.dtype == pl.String:
            return ids
        if ids.dtype in (pl.Categorical, pl.Null) or isinstance(ids.dtype, pl.Enum):
            return ids.cast(pl.String)
        raise DataError(f"{what} must be strings, got a series of dtype {ids.dtype}")
    values = ids if isinstance(ids, np.ndarray | Sequence) else list(ids)
    try:
        return pl.Series(ID_COLUMN, values, dtype=pl.String, strict=True)
    except (TypeError, pl.exceptions.PolarsError) as exc:
        raise DataError(f"{what} must be strings: {exc}") from exc
