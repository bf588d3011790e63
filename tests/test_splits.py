"""Splits: known answers, the partition / no-leakage / determinism invariants, the leakage check."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.errors import ConfigError, DataError
from data.schema import INTERACTION_SCHEMA, ITEM_ID, SPLIT_NAMES, TIMESTAMP, USER_ID, WEIGHT
from data.splits import (
    LeakageExample,
    SplitConfig,
    check_temporal_leakage,
    leave_last_n_split,
    random_split,
    split_interactions,
    temporal_split,
    user_disjoint_split,
)

ROW = "row"  # an extra column: which input row ended up where
PROPERTY = settings(max_examples=60, deadline=None)


def frame(rows: list[tuple[str, str, int]]) -> pl.DataFrame:
    """Canonical interactions from (user, item, timestamp) rows, plus a ``row`` id column."""
    return pl.DataFrame(
        {
            USER_ID: [r[0] for r in rows],
            ITEM_ID: [r[1] for r in rows],
            TIMESTAMP: [r[2] for r in rows],
            WEIGHT: [1.0] * len(rows),
            ROW: list(range(len(rows))),
        },
        schema={**INTERACTION_SCHEMA, ROW: pl.Int64},
    )


@st.composite
def logs(draw: st.DrawFn, max_rows: int = 60) -> pl.DataFrame:
    """Small logs with few users, items and timestamps, so ties and tiny users are common."""
    row = st.tuples(
        st.sampled_from([f"u{i}" for i in range(6)]),
        st.sampled_from([f"i{i}" for i in range(5)]),
        st.integers(0, 8),
    )
    return frame(draw(st.lists(row, min_size=1, max_size=max_rows)))


fractions = st.sampled_from([(0.1, 0.1), (0.2, 0.0), (0.3, 0.2), (0.0, 0.25), (0.5, 0.4)])


def rows_of(splits: dict[str, pl.DataFrame], name: str) -> list[int]:
    return sorted(splits[name][ROW].to_list())


def assert_partition(splits: dict[str, pl.DataFrame], log: pl.DataFrame) -> None:
    """Every input row lands in exactly one split, unchanged, with the input's columns."""
    assert set(splits) == set(SPLIT_NAMES)
    for part in splits.values():
        assert part.schema == log.schema
    combined = pl.concat(list(splits.values())).sort(ROW)
    assert combined.equals(log.sort(ROW))


def users_of(part: pl.DataFrame) -> set[str]:
    return set(part[USER_ID].to_list())


# ------------------------------------------------------------------------------------- temporal
def test_temporal_split_known_answer() -> None:
    log = frame([("u", f"i{t}", t) for t in range(10)])
    splits = temporal_split(log, test_fraction=0.2, valid_fraction=0.1)
    assert splits["test"][TIMESTAMP].to_list() == [8, 9]
    assert splits["valid"][TIMESTAMP].to_list() == [7]
    assert splits["train"][TIMESTAMP].to_list() == list(range(7))


def test_temporal_split_ties_at_a_cut_go_to_the_later_split() -> None:
    log = frame([("a", "x", 1), ("a", "y", 2), ("b", "x", 2), ("b", "y", 2), ("c", "z", 3)])
    splits = temporal_split(log, test_fraction=0.4, valid_fraction=0.0)
    # The 40% cut falls inside the three events at t=2: all three follow it into test.
    assert splits["test"][TIMESTAMP].to_list() == [2, 2, 2, 3]
    assert splits["train"][TIMESTAMP].to_list() == [1]
    assert splits["valid"].is_empty()


def test_temporal_split_keeps_input_order_and_extra_columns() -> None:
    log = frame([("a", "x", 5), ("b", "y", 1), ("c", "z", 9), ("d", "w", 3)])
    splits = temporal_split(log, test_fraction=0.25, valid_fraction=0.25)
    assert splits["train"][ROW].to_list() == [1, 3]
    assert splits["valid"][ROW].to_list() == [0]
    assert splits["test"][ROW].to_list() == [2]


@PROPERTY
@given(log=logs(), fraction=fractions)
def test_temporal_split_partitions_without_leakage(
    log: pl.DataFrame, fraction: tuple[float, float]
) -> None:
    splits = temporal_split(log, *fraction)
    assert_partition(splits, log)
    train, valid, test = (splits[name] for name in SPLIT_NAMES)
    for earlier, later in ((train, valid), (train, test), (valid, test)):
        check_temporal_leakage(earlier, later, per_user=False).raise_if_leaky()
        if earlier.height and later.height:  # ties go later, so the order is strict
            assert earlier[TIMESTAMP].max() < later[TIMESTAMP].min()  # type: ignore[operator]


def test_temporal_split_accepts_a_lazy_frame() -> None:
    log = frame([("u", f"i{t}", t) for t in range(20)])
    eager, lazy = temporal_split(log), temporal_split(log.lazy())
    assert all(eager[name].equals(lazy[name]) for name in SPLIT_NAMES)


# ------------------------------------------------------------------------------- leave_last_n
def test_leave_last_n_known_answer() -> None:
    log = frame(
        [("a", "i1", 1), ("a", "i2", 2), ("a", "i3", 3), ("a", "i4", 4)]
        + [("b", "i1", 1), ("b", "i2", 2)]  # two events: too few to hold out two, all train
    )
    splits = leave_last_n_split(log, n_test=1, n_valid=1)
    assert splits["test"].select(USER_ID, ITEM_ID).rows() == [("a", "i4")]
    assert splits["valid"].select(USER_ID, ITEM_ID).rows() == [("a", "i3")]
    assert rows_of(splits, "train") == [0, 1, 4, 5]


def test_leave_last_n_breaks_timestamp_ties_by_item_id_not_row_order() -> None:
    rows = [("a", "i0", 1), ("a", "x", 5), ("a", "y", 5)]
    for ordered in (rows, rows[::-1]):
        splits = leave_last_n_split(frame(ordered), n_test=1, n_valid=0)
        assert splits["test"][ITEM_ID].to_list() == ["y"]


def test_leave_last_n_matches_a_sort_based_reference() -> None:
    # Big enough for polars to run windows in parallel: pins the eager evaluation that avoids
    # polars 2.1's lazy `when(rank().over())` bug (rows got other rows' ranks).
    rng = np.random.default_rng(7)
    n = 50_000
    log = frame(
        list(
            zip(
                [f"u{u}" for u in rng.integers(0, 500, n)],
                [f"i{i}" for i in rng.integers(0, 50, n)],
                rng.integers(0, 1_000, n).tolist(),
                strict=True,
            )
        )
    )
    splits = leave_last_n_split(log, n_test=2, n_valid=1)
    # Reference: sort each user's events newest first (timestamp, then item id).
    ranked = log.sort([USER_ID, TIMESTAMP, ITEM_ID, ROW], descending=[False, True, True, True])
    ranked = ranked.with_columns(
        pl.int_range(1, pl.len() + 1).over(USER_ID).alias("recency"),
        pl.len().over(USER_ID).alias("n"),
    ).filter(pl.col("n") > 3)
    expected_test = ranked.filter(pl.col("recency") <= 2).select(USER_ID, ITEM_ID, TIMESTAMP)
    expected_valid = ranked.filter(pl.col("recency") == 3).select(USER_ID, ITEM_ID, TIMESTAMP)
    for name, expected in (("test", expected_test), ("valid", expected_valid)):
        got = splits[name].select(USER_ID, ITEM_ID, TIMESTAMP).sort(pl.all())
        assert got.equals(expected.sort(pl.all()))


@PROPERTY
@given(log=logs(), n_test=st.integers(0, 3), n_valid=st.integers(0, 2))
def test_leave_last_n_partitions_without_per_user_leakage(
    log: pl.DataFrame, n_test: int, n_valid: int
) -> None:
    splits = leave_last_n_split(log, n_test=n_test, n_valid=n_valid)
    assert_partition(splits, log)
    train, valid, test = (splits[name] for name in SPLIT_NAMES)
    for earlier, later in ((train, valid), (train, test), (valid, test)):
        check_temporal_leakage(earlier, later, per_user=True).raise_if_leaky()
    per_user = {
        name: dict(part.group_by(USER_ID).len().iter_rows()) for name, part in splits.items()
    }
    for user, n_events in log.group_by(USER_ID).len().iter_rows():
        split_here = n_events > n_test + n_valid
        assert per_user["test"].get(user, 0) == (n_test if split_here else 0)
        assert per_user["valid"].get(user, 0) == (n_valid if split_here else 0)


# ------------------------------------------------------------------------------------- random
def test_random_split_per_user_counts() -> None:
    log = frame(
        [("many", f"i{k}", k) for k in range(10)]  # 10 events: 1 test, 1 valid, 8 train
        + [("two", "i0", 0), ("two", "i1", 1)]  # 2 events: at least one test, one train
        + [("one", "i0", 0)]  # 1 event: stays in train
    )
    splits = random_split(log, test_fraction=0.1, valid_fraction=0.1, seed=3)
    counts = {name: dict(part.group_by(USER_ID).len().iter_rows()) for name, part in splits.items()}
    assert counts["test"] == {"many": 1, "two": 1}
    assert counts["valid"] == {"many": 1}
    assert counts["train"] == {"many": 8, "two": 1, "one": 1}


@PROPERTY
@given(log=logs(), fraction=fractions, seed=st.integers(0, 2**16))
def test_random_split_partitions_and_is_stratified(
    log: pl.DataFrame, fraction: tuple[float, float], seed: int
) -> None:
    test_fraction, valid_fraction = fraction
    splits = random_split(log, test_fraction, valid_fraction, seed)
    assert_partition(splits, log)
    per_user = {
        name: dict(part.group_by(USER_ID).len().iter_rows()) for name, part in splits.items()
    }
    for user, n_events in log.group_by(USER_ID).len().iter_rows():
        n_test, n_valid = per_user["test"].get(user, 0), per_user["valid"].get(user, 0)
        assert per_user["train"].get(user, 0) >= 1  # every user stays known to the model
        if n_events >= 2 and test_fraction > 0:
            assert n_test >= 1  # every user who can spare an event is evaluated
        # About the fraction: within rounding, or the one-event minimum.
        assert n_test <= max(1, int(np.floor(n_events * test_fraction + 0.5)))
        assert n_valid <= max(1, int(np.floor(n_events * valid_fraction + 0.5)))
        if valid_fraction == 0:
            assert n_valid == 0


@PROPERTY
@given(log=logs(), seed=st.integers(0, 2**16))
def test_random_split_is_deterministic_per_seed(log: pl.DataFrame, seed: int) -> None:
    first, second = random_split(log, 0.3, 0.2, seed), random_split(log, 0.3, 0.2, seed)
    assert all(first[name].equals(second[name]) for name in SPLIT_NAMES)


def test_random_split_depends_on_the_seed() -> None:
    log = frame([("u", f"i{k}", k) for k in range(100)])
    held_out = {tuple(rows_of(random_split(log, 0.2, 0.0, seed), "test")) for seed in range(5)}
    assert len(held_out) > 1


# ------------------------------------------------------------------------------ user_disjoint
def test_user_disjoint_split_counts_users() -> None:
    log = frame([(f"u{u}", f"i{k}", k) for u in range(10) for k in range(u + 1)])
    splits = user_disjoint_split(log, test_fraction=0.2, valid_fraction=0.1, seed=0)
    assert [len(users_of(splits[name])) for name in SPLIT_NAMES] == [7, 1, 2]


@PROPERTY
@given(log=logs(), fraction=fractions, seed=st.integers(0, 2**16))
def test_user_disjoint_split_partitions_users(
    log: pl.DataFrame, fraction: tuple[float, float], seed: int
) -> None:
    splits = user_disjoint_split(log, *fraction, seed=seed)
    assert_partition(splits, log)
    train, valid, test = (users_of(splits[name]) for name in SPLIT_NAMES)
    assert not (train & valid or train & test or valid & test)
    assert train  # at least one user is left to train on
    # Row order does not matter: users are shuffled from a sorted list.
    shuffled = user_disjoint_split(log.reverse(), *fraction, seed=seed)
    assert users_of(shuffled["test"]) == test


# ----------------------------------------------------------------------- split_interactions
@pytest.mark.parametrize("method", ["temporal", "leave_last_n", "random", "user_disjoint"])
def test_split_interactions_always_returns_the_three_splits(method: str) -> None:
    log = frame([(f"u{u}", f"i{k}", 10 * u + k) for u in range(5) for k in range(6)])
    config = SplitConfig(method=method, valid_fraction=0.0, n_valid=0)  # type: ignore[arg-type]
    splits = split_interactions(log, config)
    assert_partition(splits, log)
    assert splits["valid"].is_empty()
    assert not splits["test"].is_empty()


@pytest.mark.parametrize("method", ["temporal", "leave_last_n", "random", "user_disjoint"])
def test_split_of_an_empty_log_is_three_empty_frames(method: str) -> None:
    empty = frame([])
    splits = split_interactions(empty, SplitConfig(method=method))  # type: ignore[arg-type]
    assert all(
        splits[name].is_empty() and splits[name].schema == empty.schema for name in SPLIT_NAMES
    )


def test_split_names_the_missing_column() -> None:
    with pytest.raises(DataError, match="timestamp"):
        temporal_split(pl.DataFrame({USER_ID: ["u"]}))


def test_split_rejects_null_timestamps() -> None:
    log = pl.DataFrame({USER_ID: ["u", "v"], TIMESTAMP: [1, None]})
    with pytest.raises(DataError, match="null"):
        temporal_split(log)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "chronological"}, "method"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"valid_fraction": -0.1}, "valid_fraction"),
        ({"test_fraction": 0.6, "valid_fraction": 0.4}, "< 1"),
        ({"n_test": -1}, "n_test"),
        ({"n_valid": 1.5}, "n_valid"),
        ({"seed": -3}, "seed"),
    ],
)
def test_split_config_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SplitConfig(**kwargs)  # type: ignore[arg-type]


def test_split_config_defaults_to_a_temporal_80_10_10_split() -> None:
    config = SplitConfig()
    assert (config.method, config.test_fraction, config.valid_fraction) == ("temporal", 0.1, 0.1)


# ------------------------------------------------------------------------------ leakage check
def test_per_user_leakage_is_found_and_described() -> None:
    train = frame([("a", "x", 5), ("a", "y", 9), ("b", "x", 1)])
    test = frame([("a", "z", 7), ("b", "z", 1)])  # a's train event at 9 is after their test at 7
    report = check_temporal_leakage(train, test, per_user=True)
    assert report.n_violations == 1
    assert report.n_users_checked == 2
    assert report.examples == (LeakageExample("a", 9, 7),)
    with pytest.raises(DataError, match=r"1 training event.*user 'a'.*t=9 > test t=7"):
        report.raise_if_leaky()


def test_global_leakage_compares_with_the_earliest_test_event() -> None:
    train = frame([("a", "x", 5), ("b", "y", 9), ("c", "x", 6)])
    test = frame([("a", "z", 6), ("d", "z", 8)])
    report = check_temporal_leakage(train, test, per_user=False)
    # Per user, nothing leaks (b and c have no test events); globally, 9 > 6 does.
    assert check_temporal_leakage(train, test, per_user=True).n_violations == 0
    assert report.n_violations == 1  # t=6 equals the test start: a tie is not a leak
    assert report.examples == (LeakageExample("b", 9, 6),)
    assert report.n_users_checked == 2


def test_no_leakage_does_not_raise() -> None:
    report = check_temporal_leakage(frame([("a", "x", 1)]), frame([]), per_user=False)
    assert (report.n_violations, report.n_users_checked, report.examples) == (0, 0, ())
    report.raise_if_leaky()


def test_random_split_of_a_time_ordered_log_is_caught_leaking() -> None:
    log = frame([("u", f"i{k}", k) for k in range(50)])
    splits = random_split(log, 0.2, 0.0, seed=0)
    with pytest.raises(DataError, match="temporal leakage"):
        check_temporal_leakage(splits["train"], splits["test"], per_user=True).raise_if_leaky()
