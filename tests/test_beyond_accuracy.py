"""Beyond-accuracy measures on hand-worked examples, and the ILD shortcut against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from data.errors import DataError
from evaluation.beyond_accuracy import (
    beyond_accuracy,
    category_vectors,
    exposure_counts,
    exposure_gini,
    gini,
    intra_list_diversity,
    log_popularity_percentile,
    mean_popularity_percentile,
    novelty,
    popularity_percentiles,
    self_information,
)

# Four items with 4, 2, 1 and 1 training events (8 in all): shares 1/2, 1/4, 1/8, 1/8.
COUNTS = np.array([4, 2, 1, 1])
LISTS = np.array([[0, 1], [2, -1], [-1, -1]])  # a full list, a short one, an empty one


def test_self_information_is_minus_log2_of_the_share() -> None:
    np.testing.assert_allclose(self_information(COUNTS), [1.0, 2.0, 3.0, 3.0])
    # An item never seen in training counts as seen once: log2(4 / 1) = 2 bits, not infinity.
    np.testing.assert_allclose(self_information([4, 0]), [0.0, 2.0])


def test_novelty_averages_the_listed_items() -> None:
    np.testing.assert_allclose(novelty(LISTS, COUNTS), [1.5, 3.0, np.nan])
    np.testing.assert_allclose(novelty(LISTS, COUNTS, k=1), [1.0, 3.0, np.nan])


def test_popularity_percentiles_use_mid_ranks() -> None:
    # Sorted counts 1, 1, 2, 4: the two 1s share (0 + 0.5 * 2) / 4 = 0.25.
    percentile = popularity_percentiles(COUNTS)
    np.testing.assert_allclose(percentile, [0.875, 0.625, 0.25, 0.25])
    assert percentile.mean() == pytest.approx(0.5)  # the catalogue's items average one half
    np.testing.assert_allclose(mean_popularity_percentile(LISTS, COUNTS), [0.75, 0.25, np.nan])
    # Events lean popular: (4 * 0.875 + 2 * 0.625 + 0.25 + 0.25) / 8.
    assert log_popularity_percentile(COUNTS) == pytest.approx(0.65625)


def test_diversity_by_category_is_the_share_of_unlike_pairs() -> None:
    categories = category_vectors([0, 0, 1, -1])  # item 3 has no category
    lists = np.array([[0, 1, 2], [0, 1, -1], [2, 3, -1], [0, -1, -1]])
    # [0, 1, 2]: one like pair of three -> 1 - 1/3; [0, 1]: alike -> 0; item 3 is unlike all.
    np.testing.assert_allclose(intra_list_diversity(lists, categories), [2 / 3, 0.0, 1.0, np.nan])


def test_diversity_by_vectors_uses_cosine_similarity() -> None:
    vectors = np.array([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])
    # cos(0, 1) = 0, cos(0, 2) = cos(1, 2) = 1/sqrt(2): mean similarity sqrt(2) / 3.
    diversity = intra_list_diversity(np.array([[0, 1, 2]]), vectors)
    assert diversity[0] == pytest.approx(1 - math.sqrt(2) / 3)
    sparse = intra_list_diversity(np.array([[0, 1, 2]]), sp.csr_matrix(vectors))
    assert sparse[0] == pytest.approx(diversity[0])
    # Scale does not matter, down to the smallest floats.
    tiny = intra_list_diversity(np.array([[0, 1, 2]]), vectors * 1e-310)
    assert tiny[0] == pytest.approx(diversity[0])


def brute_force_ild(lists: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """The definition: 1 - mean over pairs of distinct slots of cosine similarity."""
    unit = np.zeros_like(vectors)
    for item, vector in enumerate(vectors):
        if vector.any():
            scaled = vector / np.abs(vector).max()  # no underflow in the norm of tiny vectors
            unit[item] = scaled / np.linalg.norm(scaled)
    out = np.full(lists.shape[0], np.nan)
    for row, items in enumerate(lists):  # the definition, pair by pair
        items = items[items >= 0]
        pairs = [(i, j) for i in range(items.size) for j in range(items.size) if i != j]
        if pairs:
            out[row] = 1 - np.mean([unit[items[i]] @ unit[items[j]] for i, j in pairs])
    return out


@settings(max_examples=40, deadline=None)
@given(
    vectors=hnp.arrays(np.float64, (6, 3), elements=st.floats(-3, 3)),
    lists=hnp.arrays(np.int64, (4, 5), elements=st.integers(-1, 5)),
)
def test_diversity_shortcut_equals_the_pairwise_definition(
    vectors: np.ndarray, lists: np.ndarray
) -> None:
    lists = -np.sort(-lists, axis=1)  # padding (-1) to the end of each row
    expected = brute_force_ild(lists, vectors)
    np.testing.assert_allclose(intra_list_diversity(lists, vectors), expected, atol=1e-9)
    sparse = intra_list_diversity(lists, sp.csr_matrix(vectors))
    np.testing.assert_allclose(sparse, expected, atol=1e-9)


def test_gini_of_hand_examples() -> None:
    assert gini([2, 2, 2]) == 0.0
    assert gini([0, 0, 0, 4]) == pytest.approx(0.75)  # (n - 1) / n: one item has everything
    assert gini([1, 2, 3]) == pytest.approx(2 / 9)
    assert math.isnan(gini([])) and math.isnan(gini([0, 0]))
    with pytest.raises(DataError, match="non-negative"):
        gini([1, -1])


@settings(max_examples=50, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        st.integers(1, 12),
        # Zero or a "real" magnitude: subnormal exposures (5e-324) underflow the reference
        # formula's denominator to zero, which says nothing about gini itself.
        elements=st.one_of(st.just(0.0), st.floats(1e-6, 100)),
    )
)
def test_gini_equals_the_mean_absolute_difference_form(values: np.ndarray) -> None:
    if values.sum() == 0:
        return
    pairwise = np.abs(values[:, None] - values[None, :]).sum()
    expected = pairwise / (2 * values.size**2 * values.mean())
    assert gini(values) == pytest.approx(expected, abs=1e-9)


def test_exposure_counts_and_gini_over_the_whole_catalogue() -> None:
    lists = np.array([[0, 1], [0, 1], [1, -1]])
    np.testing.assert_array_equal(exposure_counts(lists, 4), [2, 3, 0, 0])
    # Sorted exposures 0, 0, 2, 3: (-3 * 0 - 1 * 0 + 1 * 2 + 3 * 3) / (4 * 5) = 11 / 20.
    assert exposure_gini(lists, 4) == pytest.approx(11 / 20)
    assert exposure_gini(lists, 4, k=1) == pytest.approx(gini([2, 1, 0, 0]))


def test_the_summary_has_every_measure_at_every_cutoff() -> None:
    lists = np.array([[0, 1], [2, 3]])
    report = beyond_accuracy(lists, COUNTS, ks=(2, 1), item_vectors=category_vectors([0, 0, 1, 1]))
    assert list(report) == [
        "coverage@1",
        "novelty@1",
        "popularity_percentile@1",
        "exposure_gini@1",
        "diversity@1",
        "coverage@2",
        "novelty@2",
        "popularity_percentile@2",
        "exposure_gini@2",
        "diversity@2",
        "log_popularity_percentile",
    ]
    assert report["coverage@1"] == 0.5 and report["coverage@2"] == 1.0
    assert report["novelty@2"] == pytest.approx((1.5 + 3.0) / 2)
    assert report["diversity@2"] == 0.0  # each list holds one category
    assert math.isnan(report["diversity@1"])  # one item: no pair
    assert report["exposure_gini@2"] == 0.0


@pytest.mark.parametrize(
    ("lists", "match"),
    [
        (np.array([[0, 4]]), "outside a catalogue of 4"),
        (np.array([[0, -2]]), "outside a catalogue of 4"),
        (np.array([0, 1]), "2-D"),
        (np.array([[0.0, 1.0]]), "integer"),
    ],
)
def test_bad_lists_are_named(lists: np.ndarray, match: str) -> None:
    with pytest.raises(DataError, match=match):
        novelty(lists, COUNTS)


def test_bad_counts_and_cutoffs_are_named() -> None:
    with pytest.raises(DataError, match="all zero"):
        self_information([0, 0])
    with pytest.raises(DataError, match="item_counts must be >= 0"):
        novelty(LISTS, [1, -1, 1, 1])
    with pytest.raises(DataError, match="cutoff k=3"):
        novelty(LISTS, COUNTS, k=3)
    with pytest.raises(DataError, match="-2"):
        category_vectors([0, -2])
