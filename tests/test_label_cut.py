"""The ranker's training groups are asked at a moment that keeps every user's history."""

from __future__ import annotations

import polars as pl
import pytest

from data.errors import DataError
from data.idmap import IdMap
from data.interactions import Interactions
from data.schema import INTERACTION_SCHEMA
from ranking.training_set import label_cut

USERS = IdMap.from_ids(pl.Series(["a", "b"]))
ITEMS = IdMap.from_ids(pl.Series(["x", "y", "z"]))


def log(rows: list[tuple[str, str, int]]) -> Interactions:
    frame = pl.DataFrame(
        [(u, i, t, 1.0) for u, i, t in rows], schema=INTERACTION_SCHEMA, orient="row"
    )
    return Interactions.from_frame(frame, users=USERS, items=ITEMS)


def test_a_temporal_label_window_is_asked_at_its_first_event() -> None:
    history = log([("a", "x", 10), ("b", "y", 20)])
    labels = log([("a", "y", 30), ("b", "z", 40)])

    assert label_cut(history, labels) == 30


def test_an_interleaved_window_is_asked_after_the_whole_history() -> None:
    # A random split: label events fall between history events; cutting at 15 would drop b's.
    history = log([("a", "x", 10), ("b", "y", 20)])
    labels = log([("a", "y", 15), ("b", "z", 25)])

    cut = label_cut(history, labels)

    assert cut == 21
    assert len(history.before(cut)) == len(history)


def test_an_untimed_log_keeps_every_history_event() -> None:
    history = log([("a", "x", 0), ("b", "y", 0)])
    labels = log([("a", "y", 0)])

    cut = label_cut(history, labels)

    assert cut == 1
    assert len(history.before(cut)) == 2


def test_an_empty_label_window_is_an_error() -> None:
    with pytest.raises(DataError, match="empty"):
        label_cut(log([("a", "x", 0)]), log([]))
