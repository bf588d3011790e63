"""From explicit ratings or raw events to implicit-feedback positives, and k-core filtering.

Both functions take and return frames in the canonical interaction schema (``data/schema.py``);
both are single polars pipelines (no Python loop over rows or users).
"""

from __future__ import annotations

from typing import Literal, get_args

import polars as pl

from data.errors import DataError
from data.schema import (
    INTERACTION_COLUMNS,
    ITEM_ID,
    TIMESTAMP,
    USER_ID,
    WEIGHT,
    conform_interactions,
    empty_interactions,
    require_columns,
)
from data.validation import one_of, positive_int

Weighting = Literal["binary", "raw", "log1p"]
Dedup = Literal["last", "first", "sum"]


def to_implicit(
    interactions: pl.DataFrame,
    *,
    min_weight: float | None = None,
    weighting: Weighting = "binary",
    dedup: Dedup = "last",
) -> pl.DataFrame:
    """Turn ratings or events into implicit positives: one row per (user, item) pair.

    Steps, in this order:

    1. keep rows with ``weight >= min_weight`` (e.g. ``min_weight=4`` keeps 4- and 5-star
       ratings as positives); ``None`` keeps every row;
    2. collapse repeated (user, item) pairs, ``dedup``:

       - ``"last"``: the latest event (its timestamp and weight); at equal timestamps, the later
         row;
       - ``"first"``: the earliest event; at equal timestamps, the earlier row;
       - ``"sum"``: the weights summed, stamped with the *latest* timestamp, because the sum is only
         known once the last event has happened (an earlier stamp would leak it into the past);

    3. transform the weight, ``weighting``: ``"binary"`` -> 1.0, ``"raw"`` -> unchanged,
       ``"log1p"`` -> ``log(1 + weight)`` (dampens heavy repeat counts; needs weights >= 0).

    Returns the canonical schema, pairs in order of first appearance in ``interactions``.
    Raises ``DataError`` on malformed input or negative weights with ``"raw"``/``"log1p"``.
    """
    one_of(weighting, "weighting", get_args(Weighting))
    one_of(dedup, "dedup", get_args(Dedup))
    frame = _canonical(interactions, "to_implicit input")
    if min_weight is not None:
        frame = frame.filter(pl.col(WEIGHT) >= min_weight)
    if weighting != "binary":
        n_negative, lowest = frame.select(
            (pl.col(WEIGHT) < 0).sum().alias("n_negative"), pl.col(WEIGHT).min()
        ).row(0)
        if n_negative:
            raise DataError(
                f"to_implicit: {n_negative} positive(s) have a negative weight (min {lowest}); "
                f"weighting={weighting!r} needs weights >= 0 (raise min_weight or use 'binary')"
            )

    ts, weight = pl.col(TIMESTAMP), pl.col(WEIGHT)
    if dedup == "last":
        # Latest timestamp; among rows tied at it, the last one in input order.
        aggregations = [ts.max(), weight.filter(ts == ts.max()).last()]
    elif dedup == "first":
        aggregations = [ts.min(), weight.filter(ts == ts.min()).first()]
    else:
        aggregations = [ts.max(), weight.sum()]
    deduped = frame.group_by([USER_ID, ITEM_ID], maintain_order=True).agg(aggregations)

    transformed = {
        "binary": pl.lit(1.0),
        "raw": weight,
        "log1p": weight.log1p(),
    }[weighting]
    return deduped.select(
        pl.col(USER_ID),
        pl.col(ITEM_ID),
        ts,
        transformed.cast(pl.Float32).alias(WEIGHT),
    )


def k_core(
    interactions: pl.DataFrame,
    min_user_interactions: int = 5,
    min_item_interactions: int = 5,
) -> pl.DataFrame:
    """The k-core of the interaction graph: rows of users and items that meet both thresholds.

    Dropping a sparse user can push an item below its threshold (and vice versa), so the filter is
    repeated until nothing changes. The result is the unique largest subset of rows in which every
    user has ``>= min_user_interactions`` rows and every item ``>= min_item_interactions`` rows
    (counting rows, so call :func:`to_implicit` first to count distinct pairs). It may be empty.
    Row order is preserved.
    """
    for name, value in (
        ("min_user_interactions", min_user_interactions),
        ("min_item_interactions", min_item_interactions),
    ):
        positive_int(value, name)
    frame = _canonical(interactions, "k_core input")
    keep = (pl.len().over(USER_ID) >= min_user_interactions) & (
        pl.len().over(ITEM_ID) >= min_item_interactions
    )
    while True:
        # Removing every violating row at once is safe: a user (item) short of its threshold
        # now is short in every subset too, so it cannot be in the core. Each pass removes at
        # least one row or stops, so this reaches the fixed point.
        filtered = frame.filter(keep)
        if filtered.height == frame.height:
            return filtered
        frame = filtered


def _canonical(frame: pl.DataFrame, source: str) -> pl.DataFrame:
    """``frame`` in the canonical schema; an empty input gives an empty canonical frame."""
    require_columns(frame, INTERACTION_COLUMNS, source)
    return empty_interactions() if frame.height == 0 else conform_interactions(frame, source)
