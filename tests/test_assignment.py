"""Tests for pipeline.assignment: stable, uniform, salt-dependent user-level assignment."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from data.errors import ConfigError, DataError
from pipeline.assignment import assign, assign_indices, hash_to_unit_interval

PROPERTY = settings(max_examples=60, deadline=None)
HALF_HALF = {"control": 0.5, "treatment": 0.5}
N_USERS = 100_000


@pytest.fixture(scope="module")
def user_ids() -> list[str]:
    return [f"user-{i}" for i in range(N_USERS)]


def reference_unit(user_id: str, salt: str) -> float:
    """Independent oracle: the documented recipe, one id at a time."""
    salt_bytes = salt.encode()
    message = len(salt_bytes).to_bytes(8, "big") + salt_bytes + user_id.encode()
    word = int.from_bytes(hashlib.blake2b(message, digest_size=8).digest(), "big")
    return (word >> 11) / 2**53


def test_hash_matches_the_documented_recipe() -> None:
    ids = ["alice", "bob", "", "ünïcödé", "user-123"]
    expected = [reference_unit(u, "exp-1") for u in ids]
    np.testing.assert_array_equal(hash_to_unit_interval(ids, "exp-1"), expected)


def test_assignment_is_pinned_across_versions() -> None:
    # Golden values: a change here re-randomises every running experiment.
    ids = [f"u{i}" for i in range(10)]
    arms = assign(ids, "golden-salt", HALF_HALF)
    expected = [reference_unit(u, "golden-salt") < 0.5 for u in ids]
    assert [a == "control" for a in arms] == expected
    assert "".join(a[0] for a in arms) == "tcttccttcc"  # t = treatment, c = control


def test_stable_across_calls_and_input_types(user_ids: list[str]) -> None:
    ids = user_ids[:1000]
    first = assign(ids, "s", HALF_HALF)
    np.testing.assert_array_equal(first, assign(ids, "s", HALF_HALF))
    np.testing.assert_array_equal(first, assign(pl.Series(ids), "s", HALF_HALF))
    np.testing.assert_array_equal(first, assign(np.array(ids), "s", HALF_HALF))


@PROPERTY
@given(st.lists(st.text(max_size=12), min_size=1, max_size=30, unique=True), st.text(max_size=8))
def test_a_users_arm_does_not_depend_on_the_batch(ids: list[str], salt: str) -> None:
    weights = {"a": 0.2, "b": 0.3, "c": 0.5}
    batch = assign(ids, salt, weights)
    alone = np.array([assign([u], salt, weights)[0] for u in ids])
    np.testing.assert_array_equal(batch, alone)
    np.testing.assert_array_equal(assign(ids[::-1], salt, weights), batch[::-1])


def test_split_matches_weights_chi_square(user_ids: list[str]) -> None:
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    counts = np.bincount(assign_indices(user_ids, "uniformity", weights), minlength=3)
    expected = N_USERS * np.array(list(weights.values()))
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    # The hash itself is uniform on [0, 1).
    unit = hash_to_unit_interval(user_ids, "uniformity")
    assert unit.min() >= 0 and unit.max() < 1
    assert stats.kstest(unit, "uniform").pvalue > 1e-3


def test_salt_changes_assignment_independently(user_ids: list[str]) -> None:
    first = assign_indices(user_ids, "experiment-1", HALF_HALF)
    second = assign_indices(user_ids, "experiment-2", HALF_HALF)
    # Independent experiments: about half the users change arm, and the 2x2 table is independent.
    assert 0.49 < np.mean(first != second) < 0.51
    table = np.zeros((2, 2))
    np.add.at(table, (first, second), 1)
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_salt_is_length_prefixed() -> None:
    # Without the prefix, ("ab", "c") and ("a", "bc") would hash the same bytes.
    assert hash_to_unit_interval(["c"], "ab")[0] != hash_to_unit_interval(["bc"], "a")[0]


def test_ramp_up_only_moves_users_out_of_the_shrinking_arm(user_ids: list[str]) -> None:
    before = assign(user_ids, "ramp", {"control": 0.5, "treatment": 0.1, "holdout": 0.4})
    after = assign(user_ids, "ramp", {"control": 0.5, "treatment": 0.2, "holdout": 0.3})
    assert np.all(after[before == "control"] == "control")
    assert np.all(after[before == "treatment"] == "treatment")
    moved = before != after
    assert np.all(before[moved] == "holdout") and np.all(after[moved] == "treatment")


def test_zero_weight_arms_get_nobody(user_ids: list[str]) -> None:
    arms = assign(user_ids[:20_000], "zero", {"off": 0.0, "on": 1.0, "tail": 0.0})
    assert set(arms.tolist()) == {"on"}


def test_100k_users_in_well_under_a_second(user_ids: list[str]) -> None:
    start = time.perf_counter()
    assign(user_ids, "speed", HALF_HALF)
    # About 0.05 s here; the bound leaves room for a slow CI machine.
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "weights",
    [{}, {"a": -1.0, "b": 1.0}, {"a": 0.0, "b": 0.0}, {"a": float("nan"), "b": 1.0}],
)
def test_bad_weights_raise_config_error(weights: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        assign(["u"], "s", weights)


def test_bad_ids_raise_data_error() -> None:
    with pytest.raises(DataError, match="null"):
        assign(pl.Series(["a", None]), "s", HALF_HALF)
    with pytest.raises(DataError, match="strings"):
        assign([1, 2], "s", HALF_HALF)  # type: ignore[list-item]
