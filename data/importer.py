"""Import a user's own interaction log (and optional item / user tables) from CSV or parquet.

The file format follows the extension: ``.csv`` (comma), ``.tsv`` (tab), ``.parquet`` / ``.pq``.
Files are scanned lazily and collected once; every problem a user can cause becomes a one-line
``DataError`` that names the file, the column and, where it helps, an offending value.

Timestamps become int64 seconds since the Unix epoch, UTC. Accepted inputs:
    integers  seconds, or milliseconds with ``time_unit="ms"`` (never guessed from magnitudes:
              a guess silently shifts a whole log by a factor of 1000 when it is wrong)
    floats    as integers, rounded down to whole seconds
    strings   ISO-8601 dates or date-times (polars infers one format from the data), or any
              format given as ``time_format`` (strftime codes, e.g. ``"%d/%m/%Y %H:%M"``)
    datetimes / dates (parquet)
Naive date-times are taken to be UTC; ones with an offset are converted to UTC.

A log without a time column (play counts, many rating dumps) is imported with ``time_col=None``:
every event is stamped ``UNTIMED_TIMESTAMP`` rather than given an invented order (row numbers as
times would make a random file order look like behaviour).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import polars as pl

from data.errors import ConfigError, DataError
from data.schema import (
    ITEM_ID,
    TIMESTAMP,
    UNTIMED_TIMESTAMP,
    USER_ID,
    WEIGHT,
    conform_interactions,
    require_columns,
)

TimeUnit = Literal["s", "ms"]
TableKind = Literal["items", "users"]

CATEGORIES = "categories"
CATEGORY_SEPARATOR = "|"

# Extension -> CSV separator, or None for parquet.
_FORMATS: Mapping[str, str | None] = MappingProxyType(
    {".csv": ",", ".tsv": "\t", ".parquet": None, ".pq": None}
)
_SECONDS_PER_UNIT: Mapping[str, int] = MappingProxyType({"s": 1, "ms": 1000})
_ID_COLUMN_OF: Mapping[str, str] = MappingProxyType({"items": ITEM_ID, "users": USER_ID})

# Rows polars reads to infer CSV column types (its default is 100). Ids and weights are read
# as strings regardless; this matters for the timestamp column, where a log whose first rows
# happen to look numeric would otherwise fail on a later ISO string.
CSV_INFER_SCHEMA_ROWS = 10_000


def import_interactions(
    path: str | Path,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str | None = "timestamp",
    weight_col: str | None = None,
    time_format: str | None = None,
    time_unit: TimeUnit = "s",
) -> pl.DataFrame:
    """Read an interaction log and map it onto the canonical schema (``data.schema``).

    Args:
        path: a ``.csv``, ``.tsv``, ``.parquet`` or ``.pq`` file, one row per interaction.
        user_col, item_col: id columns; any type, converted to strings (CSV ids are read as
            strings, so "007" stays "007"; integral float ids from parquet lose their ".0").
        time_col: the event time (see the module docstring for accepted forms); ``None`` for an
            untimed log (every event at ``UNTIMED_TIMESTAMP``).
        weight_col: numeric signal strength; ``None`` gives every interaction weight 1.0.
        time_format: strftime format of string timestamps; ``None`` infers ISO-8601.
        time_unit: unit of numeric timestamps, ``"s"`` or ``"ms"``.

    Returns:
        The canonical frame: user_id str, item_id str, timestamp int64 s UTC, weight float32,
        in file order; other columns are dropped.

    Raises:
        DataError: missing file, unsupported extension, empty file, missing column (the message
            lists the columns found), null ids, unparsable timestamps or weights.
        ConfigError: ``time_unit`` is not "s" or "ms".
    """
    if time_unit not in _SECONDS_PER_UNIT:
        raise ConfigError(f"time_unit must be one of {list(_SECONDS_PER_UNIT)}, got {time_unit!r}")
    path = Path(path)
    source = str(path)
    optional = [weight_col] if weight_col is not None else []
    string_columns = [user_col, item_col, *optional]
    if time_format is not None and time_col is not None:
        string_columns.append(time_col)  # "20240105" must reach the parser as text, not an int
    frame = scan_table(path, string_columns=string_columns)
    timed = [time_col] if time_col is not None else []
    require_columns(frame, [user_col, item_col, *timed, *optional], source)
    schema = frame.collect_schema()

    parsed = {
        user_col: _id_expr(user_col, schema[user_col]),
        item_col: _id_expr(item_col, schema[item_col]),
    }
    timestamp = pl.lit(UNTIMED_TIMESTAMP, dtype=pl.Int64)
    if time_col is not None:
        timestamp = _timestamp_expr(time_col, schema[time_col], time_format, time_unit, source)
        parsed[time_col] = timestamp
    weight = pl.lit(1.0, dtype=pl.Float32)
    if weight_col is not None:
        weight = pl.col(weight_col)
        if schema[weight_col] == pl.String:
            weight = weight.str.strip_chars()  # " 316": real exports pad numbers with spaces
        weight = weight.cast(pl.Float32, strict=False).fill_nan(None)
        parsed[weight_col] = weight
    out = _collect(
        frame.select(
            parsed[user_col].alias(USER_ID),
            parsed[item_col].alias(ITEM_ID),
            timestamp.alias(TIMESTAMP),
            weight.alias(WEIGHT),
        ),
        source,
    )
    if out.height == 0:
        raise DataError(f"{source}: the file has a header but no rows")

    null_counts = out.null_count().row(0, named=True)
    checks = [(USER_ID, user_col, "an id"), (ITEM_ID, item_col, "an id")]
    if time_col is not None:
        checks.append((TIMESTAMP, time_col, "a date/time"))
    if weight_col is not None:
        checks.append((WEIGHT, weight_col, "a number"))
    for output, column, expected in checks:
        if null_counts[output]:
            raise _explain_nulls(frame, column, parsed[column], source, expected=expected)
    return conform_interactions(out, source)


def column_names(path: str | Path) -> list[str]:
    """The columns of an interaction file, read from its header only."""
    return scan_table(path).collect_schema().names()


def import_table(path: str | Path, id_col: str, kind: TableKind) -> pl.DataFrame:
    """Read an optional items or users side table, keyed by its id column.

    The id column is renamed to ``item_id`` / ``user_id`` (str) and moved first; the other
    columns are kept as read. A string ``categories`` column of ``"|"``-separated labels
    (``"Action|Comedy"``) becomes ``list[str]``; an empty or null value becomes ``[]``.

    Raises:
        DataError: the file problems of ``import_interactions``, null ids, or duplicate ids.
        ConfigError: ``kind`` is not "items" or "users".
    """
    if kind not in _ID_COLUMN_OF:
        raise ConfigError(f"kind must be one of {list(_ID_COLUMN_OF)}, got {kind!r}")
    path = Path(path)
    source = str(path)
    target = _ID_COLUMN_OF[kind]
    frame = scan_table(path, string_columns=[id_col])
    require_columns(frame, [id_col], source)
    schema = frame.collect_schema()
    if target in schema and target != id_col:
        raise DataError(
            f"{source}: has both {id_col!r} (the id column) and {target!r}; rename or drop one"
        )

    id_expr = _id_expr(id_col, schema[id_col])
    columns = [id_expr.alias(target)]
    for name, dtype in schema.items():
        if name == id_col:
            continue
        if name == CATEGORIES and dtype == pl.String:
            columns.append(_split_categories(pl.col(name)))
        else:
            columns.append(pl.col(name))
    out = _collect(frame.select(columns), source)

    if out.height == 0:
        raise DataError(f"{source}: the file has a header but no rows")
    if out[target].null_count():
        raise _explain_nulls(frame, id_col, id_expr, source, expected="an id")
    duplicated = out.filter(pl.col(target).is_duplicated())
    if duplicated.height:
        raise DataError(
            f"{source}: {duplicated[target].n_unique()} {kind[:-1]} id(s) in column {id_col!r} "
            f"appear more than once, e.g. {duplicated[target][0]!r}"
        )
    return out


def scan_table(path: str | Path, *, string_columns: Sequence[str] = ()) -> pl.LazyFrame:
    """Lazily scan a CSV, TSV or parquet file after checking that it exists and is not empty.

    ``string_columns`` are read as strings from CSV files (no type inference), so ids like
    "007" keep their leading zeros. Raises ``DataError`` naming the path on any problem.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: the file does not exist")
    if not path.is_file():
        raise DataError(f"{path}: is not a file")
    if path.suffix.lower() not in _FORMATS:
        raise DataError(
            f"{path}: unsupported file extension {path.suffix!r}; expected one of {list(_FORMATS)}"
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes)")
    separator = _FORMATS[path.suffix.lower()]
    try:
        if separator is None:
            frame = pl.scan_parquet(path)
        else:
            frame = pl.scan_csv(
                path,
                separator=separator,
                schema_overrides=dict.fromkeys(string_columns, pl.String),
                infer_schema_length=CSV_INFER_SCHEMA_ROWS,
            )
        frame.collect_schema()  # read the header / footer now: a corrupt file fails here
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{path}: cannot read the file: {_first_line(exc)}") from exc
    return frame


def _id_expr(column: str, dtype: pl.DataType) -> pl.Expr:
    """An id column as strings. Integral floats (ids that pandas turned into floats because
    of a missing value) go through int64 first, so ``7.0`` becomes "7", not "7.0"."""
    expr = pl.col(column)
    if dtype.is_float():
        expr = expr.cast(pl.Int64, strict=False)
    return expr.cast(pl.String)


def _timestamp_expr(
    column: str,
    dtype: pl.DataType,
    time_format: str | None,
    time_unit: TimeUnit,
    source: str,
) -> pl.Expr:
    """Seconds since the epoch (int64, UTC) from ``column``; unparsable values become null."""
    expr = pl.col(column)
    per_second = _SECONDS_PER_UNIT[time_unit]
    # Integers with a format are calendar digits such as 20240105, not epoch offsets.
    if dtype == pl.String or (time_format is not None and dtype.is_integer()):
        # time_zone="UTC" converts values with an offset to UTC and declares naive ones UTC.
        as_datetime = expr.cast(pl.String).str.to_datetime(
            format=time_format, time_zone="UTC", strict=False
        )
        return as_datetime.dt.epoch("s")
    if dtype.is_integer():
        return expr.cast(pl.Int64) // per_second
    if dtype.is_float():
        return (expr / per_second).floor().cast(pl.Int64, strict=False)
    if isinstance(dtype, (pl.Datetime, pl.Date)):
        return expr.dt.epoch("s")
    raise DataError(
        f"{source}: column {column!r} has type {dtype}; expected integer epoch "
        "timestamps, date/time strings, or a datetime column"
    )


def _split_categories(column: pl.Expr) -> pl.Expr:
    """``"Action| Comedy"`` -> ``["Action", "Comedy"]``; empty labels are dropped."""
    return (
        column.fill_null("")
        .str.split(CATEGORY_SEPARATOR)
        .list.eval(pl.element().str.strip_chars().filter(pl.element().str.strip_chars() != ""))
    )


def _collect(frame: pl.LazyFrame, source: str) -> pl.DataFrame:
    try:
        return frame.collect()
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{source}: cannot read the file: {_first_line(exc)}") from exc


def _explain_nulls(
    frame: pl.LazyFrame,
    column: str,
    parsed: pl.Expr,
    source: str,
    *,
    expected: str,
) -> DataError:
    """Describe why ``parsed`` (an expression over ``column``) has nulls: the input has nulls,
    or values that do not parse (one is quoted). Runs only on the error path, so the normal
    import stays a single pass over the file."""
    failed = _collect(
        frame.select(pl.col(column).alias("raw"), parsed.alias("parsed")).filter(
            pl.col("parsed").is_null()
        ),
        source,
    )
    unparsable = failed.filter(pl.col("raw").is_not_null())
    if unparsable.height:
        return DataError(
            f"{source}: {unparsable.height} value(s) in column {column!r} cannot be parsed as "
            f"{expected}, e.g. {unparsable['raw'][0]!r}"
        )
    return DataError(f"{source}: {failed.height} null value(s) in column {column!r}")


def _first_line(exc: Exception) -> str:
    """The first line of a polars error (the rest is generic advice)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
