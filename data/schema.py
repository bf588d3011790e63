"""The canonical interaction schema that every loader produces and every stage consumes.

``interactions``: one row per (user, item, time) event.
    user_id   str    external user id
    item_id   str    external item id
    timestamp int64  seconds since the Unix epoch, UTC
    weight    float32 strength of the implicit signal (1.0 for a plain click / positive)
"""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl

from data.errors import DataError

USER_ID = "user_id"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"
WEIGHT = "weight"

INTERACTION_SCHEMA: dict[str, pl.DataType] = {
    USER_ID: pl.String(),
    ITEM_ID: pl.String(),
    TIMESTAMP: pl.Int64(),
    WEIGHT: pl.Float32(),
}
INTERACTION_COLUMNS: tuple[str, ...] = tuple(INTERACTION_SCHEMA)

SPLIT_NAMES: tuple[str, ...] = ("train", "valid", "test")

# An untimed log (play counts, rating dumps without dates) stores every event at this time and its
# ``dataset.json`` says ``"timed": false``: splits that need time are refused, and the funnel's
# time features and time rules see one constant moment instead of an invented order.
UNTIMED_TIMESTAMP = 0


def require_columns(
    frame: pl.DataFrame | pl.LazyFrame, columns: Iterable[str], source: str
) -> None:
    """Raise ``DataError`` naming ``source`` and the missing columns if any are absent."""
    present = set(frame.collect_schema().names())
    missing = [c for c in columns if c not in present]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; found {sorted(present)}")


def conform_interactions(frame: pl.DataFrame, source: str) -> pl.DataFrame:
    """Cast ``frame`` to the canonical schema (column order included) and validate it.

    Raises ``DataError`` (naming ``source``) on missing columns, null ids or timestamps, or an
    empty frame. Extra columns are dropped.
    """
    require_columns(frame, INTERACTION_COLUMNS, source)
    if frame.height == 0:
        raise DataError(f"{source}: no interactions (the input is empty)")
    try:
        out = frame.select(
            pl.col(USER_ID).cast(pl.String),
            pl.col(ITEM_ID).cast(pl.String),
            pl.col(TIMESTAMP).cast(pl.Int64),
            pl.col(WEIGHT).cast(pl.Float32),
        )
    except pl.exceptions.PolarsError as exc:  # e.g. a non-numeric timestamp
        raise DataError(f"{source}: cannot convert to the interaction schema: {exc}") from exc
    nulls = {c: n for c, n in zip(out.columns, out.null_count().row(0), strict=True) if n}
    if nulls:
        raise DataError(f"{source}: null values in {nulls}")
    return out


def empty_interactions() -> pl.DataFrame:
    """An empty frame with the canonical schema."""
    return pl.DataFrame(schema=INTERACTION_SCHEMA)
