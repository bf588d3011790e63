"""New and changed items served before the next retrain: the live catalogue extension.

A bundle knows the catalogue of its training time. Items released since then must still reach
users: :func:`extend_artifacts` appends their ids to the item map, reads their features into the
catalogue, embeds them with the trained item tower into the live index (the index overlay when
the bundle is memory-mapped), and gives the ranker's feature store rows for them (no events yet,
their categories and release time). Model weights stay as trained; ALS and co-visitation learn
new items at the next retrain, and trending learns them from feedback.

The artifacts are immutable values except the retrieval stage, which is updated in place (its
index and vectors are built for that); everything else is rebuilt, so a request that picked up
the old pipeline finishes on the old catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import polars as pl

from data.catalog import CATEGORIES, CREATED_AT
from data.errors import DataError
from data.schema import ITEM_ID
from pipeline.artifacts import Artifacts


@dataclass(frozen=True)
class CatalogChange:
    """What one update did: ids new to the bundle, known ids re-read, retrieval sources that
    took the items (``two_tower`` when the bundle has one)."""

    added: int
    updated: int
    sources: tuple[str, ...]


def extend_artifacts(
    artifacts: Artifacts, frame: pl.DataFrame, *, now: int
) -> tuple[Artifacts, CatalogChange]:
    """``artifacts`` serving the items of ``frame`` too, and what changed.

    frame: ``items.parquet``-shaped: ``item_id`` (str, required, distinct), optional
    ``categories`` (list of str) and ``created_at`` (int seconds UTC); nulls keep the item's
    current value.
    Categories unknown to the bundle are dropped (its models know a fixed vocabulary). ``now``
    is the time the item tower sees (an item's age feature).
    """
    check_items_frame(frame)
    ids = frame[ITEM_ID]
    known = artifacts.items.index(ids, allow_unknown=True) >= 0
    items = artifacts.items.extend(ids)
    catalog = artifacts.catalog.updated(frame, items)
    item_idx = items.index(ids)
    sources = artifacts.retrieval.add_items(item_idx, catalog, now=now)
    ranking = artifacts.ranking.with_catalog(catalog) if artifacts.ranking is not None else None
    extended = replace(artifacts, items=items, catalog=catalog, ranking=ranking)
    change = CatalogChange(
        added=int((~known).sum()), updated=int(known.sum()), sources=tuple(sources)
    )
    return extended, change


def check_items_frame(frame: pl.DataFrame) -> None:
    """Refuse what cannot be an items frame, naming the problem (the API answers 422 with it)."""
    if ITEM_ID not in frame.columns:
        raise DataError(f"the items need an {ITEM_ID!r} column, got {frame.columns}")
    unknown = sorted(set(frame.columns) - {ITEM_ID, CATEGORIES, CREATED_AT})
    if unknown:
        raise DataError(
            f"unknown item columns {unknown}; known: {ITEM_ID}, {CATEGORIES}, {CREATED_AT}"
        )
    if frame.height == 0:
        raise DataError("no items given")
    ids = frame[ITEM_ID]
    if ids.dtype != pl.String:
        raise DataError(f"item_id must be a string, got {ids.dtype}")
    if ids.null_count() or (ids.str.len_chars() == 0).any():
        raise DataError("every item needs a non-empty item_id")
    if ids.n_unique() != frame.height:
        duplicated = ids.filter(ids.is_duplicated()).unique().head(3).to_list()
        raise DataError(f"item ids must be distinct within one update, got {duplicated} twice")
    if CATEGORIES in frame.columns and frame[CATEGORIES].dtype != pl.List(pl.String):
        raise DataError(f"categories must be lists of strings, got {frame[CATEGORIES].dtype}")
    if CREATED_AT in frame.columns and not frame[CREATED_AT].dtype.is_integer():
        raise DataError(f"created_at must be integer seconds UTC, got {frame[CREATED_AT].dtype}")
