"""Implicit-feedback conversion and k-core filtering: known answers and the fixed-point property."""

from __future__ import annotations

import math

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.errors import ConfigError, DataError
from data.implicit import k_core, to_implicit
from data.schema import INTERACTION_SCHEMA, ITEM_ID, TIMESTAMP, USER_ID, WEIGHT


def frame(rows: list[tuple[str, str, int, float]]) -> pl.DataFrame:
    """Canonical interactions from (user, item, timestamp, weight) rows."""
    return pl.DataFrame(rows, schema=INTERACTION_SCHEMA, orient="row")


RATINGS = frame(
    [
        ("a", "x", 10, 5.0),
        ("a", "y", 11, 2.0),  # below min_weight=4: dropped
        ("a", "x", 30, 4.0),  # a re-rates x later
        ("b", "x", 20, 4.0),
        ("b", "z", 15, 3.0),  # dropped
        ("a", "x", 20, 5.0),
    ]
)


# ----------------------------------------------------------------------------------- to_implicit
def test_min_weight_keeps_ratings_at_or_above_it_as_binary_positives() -> None:
    out = to_implicit(RATINGS, min_weight=4)
    assert out.schema == INTERACTION_SCHEMA
    assert out.rows() == [("a", "x", 30, 1.0), ("b", "x", 20, 1.0)]


@pytest.mark.parametrize(
    ("dedup", "expected"),
    [
        ("last", [("a", "x", 30, 4.0), ("b", "x", 20, 4.0)]),
        ("first", [("a", "x", 10, 5.0), ("b", "x", 20, 4.0)]),
        # The sum is only known after the last event, so it carries the latest timestamp.
        ("sum", [("a", "x", 30, 14.0), ("b", "x", 20, 4.0)]),
    ],
)
def test_dedup_known_answers(dedup: str, expected: list[tuple[str, str, int, float]]) -> None:
    out = to_implicit(RATINGS, min_weight=4, weighting="raw", dedup=dedup)  # type: ignore[arg-type]
    assert out.rows() == expected


def test_log1p_weighting_dampens_summed_counts() -> None:
    clicks = frame([("a", "x", t, 1.0) for t in range(3)] + [("a", "y", 5, 1.0)])
    out = to_implicit(clicks, weighting="log1p", dedup="sum")
    assert out[ITEM_ID].to_list() == ["x", "y"]
    assert out[WEIGHT].to_list() == pytest.approx([math.log1p(3), math.log1p(1)])


def test_dedup_ties_at_the_same_timestamp_follow_row_order() -> None:
    tied = frame([("a", "x", 7, 1.0), ("a", "x", 7, 2.0), ("a", "x", 7, 3.0)])
    assert to_implicit(tied, weighting="raw", dedup="last")[WEIGHT].to_list() == [3.0]
    assert to_implicit(tied, weighting="raw", dedup="first")[WEIGHT].to_list() == [1.0]


def test_output_keeps_the_order_of_first_appearance() -> None:
    log = frame([("b", "y", 3, 1.0), ("a", "x", 1, 1.0), ("b", "y", 9, 1.0), ("c", "z", 2, 1.0)])
    assert to_implicit(log).select(USER_ID, ITEM_ID).rows() == [("b", "y"), ("a", "x"), ("c", "z")]


def test_negative_weights_are_rejected_unless_binary() -> None:
    log = frame([("a", "x", 1, -1.0), ("a", "y", 2, 3.0)])
    assert to_implicit(log)[WEIGHT].to_list() == [1.0, 1.0]
    with pytest.raises(DataError, match="negative weight"):
        to_implicit(log, weighting="log1p")
    assert to_implicit(log, min_weight=0, weighting="raw")[WEIGHT].to_list() == [3.0]


def test_bad_options_and_input_are_reported() -> None:
    with pytest.raises(ConfigError, match="weighting"):
        to_implicit(RATINGS, weighting="tfidf")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="dedup"):
        to_implicit(RATINGS, dedup="max")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="weight"):
        to_implicit(RATINGS.drop(WEIGHT))


def test_empty_input_and_everything_filtered_give_empty_canonical_frames() -> None:
    assert to_implicit(frame([])).schema == INTERACTION_SCHEMA
    out = to_implicit(RATINGS, min_weight=6)
    assert out.is_empty() and out.schema == INTERACTION_SCHEMA


def test_input_is_cast_to_the_canonical_schema() -> None:
    raw = pl.DataFrame({USER_ID: [1, 2], ITEM_ID: [3, 3], TIMESTAMP: [5, 6], WEIGHT: [4, 5]})
    out = to_implicit(raw, min_weight=5, weighting="raw")
    assert out.schema == INTERACTION_SCHEMA
    assert out.rows() == [("2", "3", 6, 5.0)]


# --------------------------------------------------------------------------------------- k_core
def test_k_core_iterates_to_the_fixed_point() -> None:
    # Thresholds 2/2. Pass 1: user e and item z have one row each and go. That leaves user c
    # and item x with one row (pass 2), which leaves user b and item y with one (pass 3).
    log = frame(
        [
            ("a", "w", 1, 1.0),
            ("a", "v", 2, 1.0),
            ("d", "w", 3, 1.0),
            ("d", "v", 4, 1.0),
            ("b", "x", 5, 1.0),
            ("b", "y", 6, 1.0),
            ("c", "y", 7, 1.0),
            ("c", "z", 8, 1.0),
            ("e", "x", 9, 1.0),
        ]
    )
    core = k_core(log, min_user_interactions=2, min_item_interactions=2)
    assert core.select(USER_ID, ITEM_ID).rows() == [("a", "w"), ("a", "v"), ("d", "w"), ("d", "v")]
    # One pass alone is not enough here, which is why k_core iterates.
    one_pass = log.filter((pl.len().over(USER_ID) >= 2) & (pl.len().over(ITEM_ID) >= 2))
    assert one_pass.height > core.height


def naive_k_core(rows: list[tuple[str, str]], min_user: int, min_item: int) -> list[int]:
    """Reference: drop one violating user or item at a time until none is left (row indices)."""
    alive = set(range(len(rows)))
    while True:
        users: dict[str, int] = {}
        items: dict[str, int] = {}
        for k in alive:
            users[rows[k][0]] = users.get(rows[k][0], 0) + 1
            items[rows[k][1]] = items.get(rows[k][1], 0) + 1
        bad_user = next((u for u, n in users.items() if n < min_user), None)
        bad_item = next((i for i, n in items.items() if n < min_item), None)
        if bad_user is None and bad_item is None:
            return sorted(alive)
        alive = {k for k in alive if rows[k][0] != bad_user and rows[k][1] != bad_item}


pairs = st.lists(
    st.tuples(st.sampled_from("abcdef"), st.sampled_from("uvwxyz")), min_size=0, max_size=40
)


@settings(max_examples=80, deadline=None)
@given(rows=pairs, min_user=st.integers(1, 4), min_item=st.integers(1, 4))
def test_k_core_is_the_largest_subset_meeting_both_thresholds(
    rows: list[tuple[str, str]], min_user: int, min_item: int
) -> None:
    log = frame([(u, i, k, 1.0) for k, (u, i) in enumerate(rows)])
    core = k_core(log, min_user, min_item)
    # Every survivor meets the thresholds; it is a fixed point; it is the same set of rows as
    # the one-at-a-time reference (the k-core is unique, whatever the removal order).
    assert (core.group_by(USER_ID).len()["len"] >= min_user).all()
    assert (core.group_by(ITEM_ID).len()["len"] >= min_item).all()
    assert k_core(core, min_user, min_item).equals(core)
    assert core[TIMESTAMP].to_list() == naive_k_core(rows, min_user, min_item)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_k_core_rejects_bad_thresholds(bad: object) -> None:
    with pytest.raises(ConfigError, match="min_user_interactions"):
        k_core(RATINGS, min_user_interactions=bad)  # type: ignore[arg-type]
