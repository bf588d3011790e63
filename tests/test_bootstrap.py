"""Bootstrap CIs: seeded, ~95 % coverage; paired tests agree with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from data.errors import ConfigError, DataError
from evaluation.bootstrap import (
    BootstrapCI,
    PairedComparison,
    bootstrap_ci,
    bootstrap_means,
    paired_comparison,
)

# --------------------------------------------------------------------------------------------
# One metric
# --------------------------------------------------------------------------------------------


def test_same_seed_same_interval_other_seed_other_interval() -> None:
    values = np.random.default_rng(0).random(300)
    first = bootstrap_ci(values, n_boot=200, seed=5)
    assert bootstrap_ci(values, n_boot=200, seed=5) == first
    assert bootstrap_ci(values, n_boot=200, seed=6).low != first.low


def test_chunking_changes_memory_not_the_result() -> None:
    values = np.random.default_rng(1).random(50)
    whole = bootstrap_ci(values, n_boot=100, block_elements=1 << 20)
    assert bootstrap_ci(values, n_boot=100, block_elements=70) == whole
    assert bootstrap_ci(values, n_boot=100, block_elements=1) == whole


def test_interval_covers_the_true_mean_about_95_percent_of_the_time() -> None:
    # 400 experiments of 150 users with a skewed metric (exponential, true mean 1).
    rng = np.random.default_rng(2)
    samples = rng.exponential(1.0, size=(400, 150))
    covered = [
        (ci := bootstrap_ci(sample, n_boot=400, seed=i)).low <= 1.0 <= ci.high
        for i, sample in enumerate(samples)
    ]
    assert 0.91 <= np.mean(covered) <= 0.98


def test_standard_error_matches_the_textbook_formula() -> None:
    values = np.random.default_rng(3).normal(0.3, 0.2, size=2000)
    ci = bootstrap_ci(values, n_boot=2000)
    analytic = values.std(ddof=1) / math.sqrt(values.size)
    assert ci.std_error == pytest.approx(analytic, rel=0.08)
    assert ci.low == pytest.approx(values.mean() - 1.96 * analytic, abs=0.2 * analytic)
    assert ci.high == pytest.approx(values.mean() + 1.96 * analytic, abs=0.2 * analytic)


def test_nan_users_are_left_out() -> None:
    ci = bootstrap_ci([1.0, np.nan, 3.0, np.nan])
    assert (ci.mean, ci.n_users) == (2.0, 2)
    assert 1.0 <= ci.low <= ci.high <= 3.0


def test_no_defined_user_gives_nan_and_one_user_a_point() -> None:
    empty = bootstrap_ci([np.nan, np.nan])
    assert math.isnan(empty.mean) and math.isnan(empty.low) and empty.n_users == 0
    single = bootstrap_ci([0.4])
    assert (single.mean, single.low, single.high, single.n_users) == (0.4, 0.4, 0.4, 1)


def test_to_dict_is_flat_and_complete() -> None:
    ci = bootstrap_ci([0.0, 1.0, 1.0], n_boot=50)
    assert ci.to_dict() == {
        "mean": ci.mean,
        "low": ci.low,
        "high": ci.high,
        "std_error": ci.std_error,
        "confidence": 0.95,
        "n_users": 3,
        "n_boot": 50,
    }
    assert isinstance(ci, BootstrapCI)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"per_user": [[1.0, 2.0]]}, DataError, "1-D"),
        ({"per_user": [1.0, np.inf]}, DataError, r"per_user\[1\]"),
        ({"per_user": [1.0], "n_boot": 0}, ConfigError, "n_boot"),
        ({"per_user": [1.0], "confidence": 1.0}, ConfigError, "confidence"),
        ({"per_user": [1.0], "confidence": float("nan")}, ConfigError, "confidence"),
        ({"per_user": [1.0], "block_elements": 0}, ConfigError, "block_elements"),
    ],
)
def test_bad_input_is_named(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        bootstrap_ci(**kwargs)


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-10, 10), min_size=1, max_size=40),
    confidence=st.floats(0.5, 0.99),
)
def test_interval_lies_within_the_data_and_around_the_resamples(
    values: list[float], confidence: float
) -> None:
    ci = bootstrap_ci(values, n_boot=64, confidence=confidence)
    tolerance = 1e-9 * (1 + max(abs(v) for v in values))
    assert min(values) - tolerance <= ci.low <= ci.high <= max(values) + tolerance
    means = bootstrap_means(values, 64, np.random.default_rng(0))
    assert means.shape == (64,) and means.min() - tolerance <= ci.low


# --------------------------------------------------------------------------------------------
# Two systems on the same users
# --------------------------------------------------------------------------------------------

REFERENCE = np.array([0.2, 0.5, 0.1, 0.9, 0.4])
# The candidate beats the reference by 0.1, 0.2, ..., 0.5: mean 0.3, sd sqrt(0.025), so
# t = 0.3 / (sqrt(0.025) / sqrt(5)) = sqrt(18) = 4.2426 on 4 degrees of freedom, p = 0.013236.
# Wilcoxon: all five differences positive, W- = 0; exact two-sided p = 2 / 2**5 = 0.0625.
CANDIDATE = REFERENCE + np.array([0.1, 0.2, 0.3, 0.4, 0.5])


def test_paired_t_test_matches_the_hand_computed_values() -> None:
    result = paired_comparison(REFERENCE, CANDIDATE, test="t")
    assert result.statistic == pytest.approx(math.sqrt(18))
    assert result.p_value == pytest.approx(0.0132355995636827, rel=1e-9)
    scipy_result = stats.ttest_rel(CANDIDATE, REFERENCE)
    assert result.p_value == pytest.approx(scipy_result.pvalue, rel=1e-12)
    assert result.difference == pytest.approx(0.3)
    assert result.significant


def test_wilcoxon_matches_the_exact_distribution() -> None:
    result = paired_comparison(REFERENCE, CANDIDATE, test="wilcoxon")
    assert (result.statistic, result.p_value) == (0.0, pytest.approx(0.0625))
    assert not result.significant


def test_paired_interval_is_narrower_than_the_unpaired_one() -> None:
    # Users differ a lot, systems by a little: pairing removes the between-user spread.
    rng = np.random.default_rng(4)
    reference = rng.random(500)
    candidate = np.clip(reference + 0.02 + rng.normal(0, 0.01, 500), 0, 1)
    paired = paired_comparison(reference, candidate, n_boot=500)
    assert paired.low > 0
    assert paired.low <= paired.difference <= paired.high
    assert paired.std_error < 0.2 * bootstrap_ci(candidate, n_boot=500).std_error
    assert paired.p_value < 1e-10


def test_users_undefined_for_either_system_are_dropped() -> None:
    result = paired_comparison([0.1, np.nan, 0.3, 0.5], [0.2, 0.4, np.nan, 0.7], n_boot=20)
    assert result.n_users == 2
    assert (result.reference_mean, result.candidate_mean) == pytest.approx((0.3, 0.45))


def test_degenerate_differences_get_their_exact_limits() -> None:
    same = paired_comparison(REFERENCE, REFERENCE)
    assert (same.difference, same.p_value, same.low, same.high) == (0.0, 1.0, 0.0, 0.0)
    shifted = paired_comparison(REFERENCE, REFERENCE + 0.25, test="t")
    assert shifted.p_value == 0.0 and shifted.statistic == math.inf
    worse = paired_comparison(REFERENCE, REFERENCE - 0.25, test="t")
    assert worse.statistic == -math.inf
    one_user = paired_comparison([0.1], [0.2])
    assert one_user.n_users == 1 and math.isnan(one_user.p_value)
    nobody = paired_comparison([np.nan], [0.2])
    assert nobody.n_users == 0 and math.isnan(nobody.difference)


def test_paired_to_dict_includes_the_verdict() -> None:
    result = paired_comparison(REFERENCE, CANDIDATE, n_boot=30)
    document = result.to_dict()
    assert document["significant"] is True and document["test"] == "t"
    assert set(document) == {f for f in PairedComparison.__dataclass_fields__} | {"significant"}


def test_paired_inputs_are_checked() -> None:
    with pytest.raises(DataError, match="same users"):
        paired_comparison([0.1, 0.2], [0.1])
    with pytest.raises(ConfigError, match="test"):
        paired_comparison([0.1, 0.2], [0.1, 0.3], test="mann-whitney")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="candidate"):
        paired_comparison([0.1, 0.2], [0.1, -np.inf])
