"""Tests for evaluation.metrics: known answers, trec_eval agreement, and invariants."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import pytrec_eval
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluation.metrics import (
    METRIC_NAMES,
    average_precision_at_k,
    catalog_coverage,
    evaluate_rankings,
    hit_matrix,
    hit_rate_at_k,
    mean,
    mrr_at_k,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    relevance_from_pairs,
)

PerUserMetric = Callable[..., np.ndarray]

PER_USER_METRICS: dict[str, PerUserMetric] = {
    "ndcg": ndcg_at_k,
    "mrr": mrr_at_k,
    "recall": recall_at_k,
    "precision": precision_at_k,
    "map": average_precision_at_k,
    "hit_rate": hit_rate_at_k,
}


def relevance(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    """Relevance matrix from one list of relevant item indices per user."""
    users = [u for u, items in enumerate(rows) for _ in items]
    items = [i for row in rows for i in row]
    return relevance_from_pairs(
        np.array(users, dtype=np.int64), np.array(items, dtype=np.int64), len(rows), n_items
    )


def naive_hits(recommended: np.ndarray, rel: sp.csr_matrix) -> np.ndarray:
    """Per-user Python reference for hit_matrix (test oracle only)."""
    hits = np.zeros(recommended.shape, dtype=bool)
    for u, row in enumerate(recommended):
        relevant_items = set(rel[u].indices.tolist())
        seen: set[int] = set()
        for c, item in enumerate(row.tolist()):
            hits[u, c] = item in relevant_items and item not in seen
            seen.add(item)
    return hits


# --------------------------------------------------------------------------------------------
# Known answers, computed by hand
# --------------------------------------------------------------------------------------------


class TestKnownAnswers:
    # User 0 sees [hit, miss, hit] with 2 relevant items: the textbook example.
    rec = np.array([[0, 1, 2]])
    rel = relevance([[0, 2]], n_items=4)

    def test_ndcg_binary_gain_log2_discount(self) -> None:
        expected = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
        assert ndcg_at_k(self.rec, self.rel)[0] == pytest.approx(expected, abs=1e-12)

    def test_ndcg_ideal_is_capped_at_k(self) -> None:
        # 4 relevant items, K=2, both slots hit: the ideal list also holds only 2 -> NDCG 1.
        rel = relevance([[0, 1, 2, 3]], n_items=5)
        assert ndcg_at_k(np.array([[3, 1]]), rel)[0] == pytest.approx(1.0, abs=1e-12)
        # Hit only at rank 2 of 2: (1/log2 3) / (1 + 1/log2 3).
        expected = (1 / np.log2(3)) / (1 + 1 / np.log2(3))
        assert ndcg_at_k(np.array([[4, 1]]), rel)[0] == pytest.approx(expected, abs=1e-12)

    def test_mrr(self) -> None:
        rel = relevance([[5], [5], [5]], n_items=6)
        rec = np.array([[5, 0, 1], [0, 5, 1], [0, 1, 2]])
        np.testing.assert_allclose(mrr_at_k(rec, rel), [1.0, 0.5, 0.0])
        # The hit at rank 2 is outside a cutoff of 1.
        np.testing.assert_allclose(mrr_at_k(rec, rel, k=1), [1.0, 0.0, 0.0])

    def test_recall_and_precision(self) -> None:
        rel = relevance([[0, 2, 7, 8]], n_items=9)
        assert recall_at_k(self.rec, rel)[0] == pytest.approx(2 / 4)
        assert precision_at_k(self.rec, rel)[0] == pytest.approx(2 / 3)
        assert recall_at_k(self.rec, rel, k=1)[0] == pytest.approx(1 / 4)
        assert precision_at_k(self.rec, rel, k=2)[0] == pytest.approx(1 / 2)

    def test_average_precision(self) -> None:
        # Hits at ranks 1 and 3: precision@1 = 1, precision@3 = 2/3.
        summed = 1 + 2 / 3
        assert average_precision_at_k(self.rec, self.rel)[0] == pytest.approx(summed / 2)
        # 4 relevant, K=3: "capped" divides by min(4, 3) = 3, "n_relevant" by 4 (trec map_cut).
        rel4 = relevance([[0, 2, 3, 4]], n_items=5)
        assert average_precision_at_k(self.rec, rel4)[0] == pytest.approx(summed / 3)
        n_rel = average_precision_at_k(self.rec, rel4, normalization="n_relevant")
        assert n_rel[0] == pytest.approx(summed / 4)

    def test_hit_rate(self) -> None:
        rel = relevance([[2], [2]], n_items=4)
        rec = np.array([[0, 1, 2], [0, 1, 3]])
        np.testing.assert_array_equal(hit_rate_at_k(rec, rel), [1.0, 0.0])
        np.testing.assert_array_equal(hit_rate_at_k(rec, rel, k=2), [0.0, 0.0])

    def test_padding_is_a_miss_that_keeps_its_rank(self) -> None:
        rel = relevance([[2, 3]], n_items=4)
        rec = np.array([[2, -1, -1]])
        np.testing.assert_array_equal(hit_matrix(rec, rel), [[True, False, False]])
        assert precision_at_k(rec, rel)[0] == pytest.approx(1 / 3)  # divides by K, not by 1
        assert recall_at_k(rec, rel)[0] == pytest.approx(1 / 2)
        assert ndcg_at_k(rec, rel)[0] == pytest.approx(1 / (1 + 1 / np.log2(3)))

    def test_padding_key_never_matches_the_previous_users_last_item(self) -> None:
        # Key of (user 1, -1) is 1 * n_items - 1, the key of (user 0, item n_items - 1).
        rel = relevance([[3], [0]], n_items=4)
        rec = np.array([[3, -1], [-1, -1]])
        np.testing.assert_array_equal(hit_matrix(rec, rel), [[True, False], [False, False]])

    def test_duplicate_counts_once_at_its_first_rank(self) -> None:
        rel = relevance([[0, 2]], n_items=3)
        rec = np.array([[0, 0, 2, 0]])
        np.testing.assert_array_equal(hit_matrix(rec, rel), [[True, False, True, False]])
        assert recall_at_k(rec, rel)[0] == 1.0
        assert precision_at_k(rec, rel)[0] == pytest.approx(2 / 4)

    def test_user_with_no_relevant_items_is_nan_and_skipped(self) -> None:
        rel = relevance([[0], []], n_items=3)
        rec = np.array([[0, 1], [0, 1]])
        # User 0 has one relevant item, hit at rank 1 of 2: every metric is 1 but precision.
        expected_user0 = {name: 1.0 for name in PER_USER_METRICS} | {"precision": 0.5}
        for name, metric in PER_USER_METRICS.items():
            values = metric(rec, rel)
            assert values[0] == pytest.approx(expected_user0[name]), name
            assert np.isnan(values[1]), name
        aggregate = mean(ndcg_at_k(rec, rel))
        assert (aggregate.value, aggregate.n_evaluated, aggregate.n_users) == (1.0, 1, 2)

    def test_mean_of_nothing_is_nan_without_a_warning(self) -> None:
        aggregate = mean(np.array([np.nan, np.nan]))
        assert np.isnan(aggregate.value)
        assert aggregate.n_evaluated == 0
        assert np.isnan(mean(np.zeros(0)).value)

    def test_catalog_coverage(self) -> None:
        rec = np.array([[0, 1, -1], [1, 2, 5]])
        assert catalog_coverage(rec, n_items=10) == pytest.approx(4 / 10)
        assert catalog_coverage(rec, n_items=10, k=1) == pytest.approx(2 / 10)

    def test_evaluate_rankings(self) -> None:
        rel = relevance([[0, 2], [9], []], n_items=10)
        rec = np.array([[0, 1, 2], [3, 9, 4], [5, 6, 7]])
        result = evaluate_rankings(rec, rel, ks=(3, 1))
        expected_keys = [f"{m}@{k}" for k in (1, 3) for m in METRIC_NAMES] + ["n_users"]
        assert list(result) == expected_keys
        assert result["n_users"] == 2.0
        assert result["recall@3"] == pytest.approx((1.0 + 1.0) / 2)
        assert result["mrr@3"] == pytest.approx((1.0 + 0.5) / 2)
        assert result["hit_rate@1"] == pytest.approx(0.5)
        assert result["precision@1"] == pytest.approx(0.5)
        assert result["coverage@1"] == pytest.approx(3 / 10)  # every row counts, user 2 too
        assert result["coverage@3"] == pytest.approx(9 / 10)
        ndcg0 = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
        assert result["ndcg@3"] == pytest.approx((ndcg0 + 1 / np.log2(3)) / 2)
        assert result["map@3"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2) / 2)

    def test_evaluate_rankings_ap_normalization(self) -> None:
        rel = relevance([[0, 1, 2]], n_items=3)
        rec = np.array([[0, 1]])
        assert evaluate_rankings(rec, rel, ks=(2,), metrics=("map",))["map@2"] == 1.0
        trec_style = evaluate_rankings(
            rec, rel, ks=(2,), metrics=("map",), ap_normalization="n_relevant"
        )
        assert trec_style["map@2"] == pytest.approx(2 / 3)


class TestInputs:
    def test_relevance_from_pairs_collapses_repeats(self) -> None:
        rel = relevance_from_pairs(np.array([1, 0, 1, 1]), np.array([2, 0, 2, 1]), 3, 4)
        assert isinstance(rel, sp.csr_matrix)
        assert rel.shape == (3, 4)
        assert rel.has_canonical_format
        np.testing.assert_array_equal(rel.toarray(), [[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])

    def test_relevance_from_no_pairs(self) -> None:
        rel = relevance_from_pairs([], [], 2, 3)
        assert rel.shape == (2, 3)
        assert rel.nnz == 0

    def test_explicit_zeros_are_not_relevant_and_input_is_untouched(self) -> None:
        rel = sp.csr_matrix(
            (np.array([1.0, 0.0]), np.array([0, 1]), np.array([0, 2])), shape=(1, 3)
        )
        rec = np.array([[1, 0]])
        np.testing.assert_array_equal(hit_matrix(rec, rel), [[False, True]])
        assert rel.nnz == 2  # the caller's explicit zero is still stored

    @pytest.mark.parametrize("fmt", ["csr_array", "coo_matrix", "csc_matrix", "lil_matrix"])
    def test_any_sparse_format_is_accepted(self, fmt: str) -> None:
        base = relevance([[0, 2], [1]], n_items=3)
        converted = getattr(sp, fmt)(base)
        rec = np.array([[2, 1], [1, 0]], dtype=np.int32)
        np.testing.assert_array_equal(hit_matrix(rec, converted), hit_matrix(rec, base))

    @pytest.mark.parametrize(
        ("recommended", "relevant_rows", "k", "message"),
        [
            (np.array([[0, 1]]), [[0], [1]], None, "1 user rows but relevant has 2"),
            (np.array([[0, 1]]), [[0]], 3, "k=3 exceeds the 2 columns"),
            (np.array([[0, 1]]), [[0]], 0, "k must be >= 1, got 0"),
            (np.array([[0, 7]]), [[0]], None, r"recommended\[0, 1\] = 7 is out of range .* 3"),
            (np.array([[0, -2]]), [[0]], None, r"recommended\[0, 1\] = -2"),
            (np.array([[-1, 1]]), [[0]], None, "item 1 at column 1 after padding"),
            (np.array([[0.0, 1.0]]), [[0]], None, "integer item indices, got dtype float64"),
            (np.array([0, 1]), [[0]], None, r"2-D \(n_users, K\), got shape \(2,\)"),
        ],
    )
    def test_bad_input_is_named(
        self,
        recommended: np.ndarray,
        relevant_rows: list[list[int]],
        k: int | None,
        message: str,
    ) -> None:
        rel = relevance(relevant_rows, n_items=3)
        with pytest.raises(ValueError, match=message):
            ndcg_at_k(recommended, rel, k)

    def test_relevant_must_be_sparse(self) -> None:
        with pytest.raises(ValueError, match="scipy sparse matrix .* got ndarray"):
            hit_matrix(np.array([[0]]), np.ones((1, 1)))

    def test_evaluate_rankings_arguments(self) -> None:
        rec, rel = np.array([[0, 1]]), relevance([[0]], n_items=2)
        with pytest.raises(ValueError, match=r"unknown metric\(s\) \['auc'\]"):
            evaluate_rankings(rec, rel, ks=(1,), metrics=("ndcg", "auc"))
        with pytest.raises(ValueError, match="k=10 exceeds the 2 columns"):
            evaluate_rankings(rec, rel)
        with pytest.raises(ValueError, match="ks is empty"):
            evaluate_rankings(rec, rel, ks=())
        with pytest.raises(ValueError, match="'harmonic' is not one of"):
            evaluate_rankings(rec, rel, ks=(1,), ap_normalization="harmonic")  # type: ignore[arg-type]

    def test_relevance_from_pairs_arguments(self) -> None:
        with pytest.raises(ValueError, match="3 user indices but 2 item indices"):
            relevance_from_pairs([0, 1, 1], [0, 1], 2, 2)
        with pytest.raises(ValueError, match=r"item_idx\[1\] = 5 is out of range for n_items=2"):
            relevance_from_pairs([0, 1], [0, 5], 2, 2)
        with pytest.raises(ValueError, match=r"user_idx\[0\] = -1 is out of range"):
            relevance_from_pairs([-1], [0], 2, 2)


# --------------------------------------------------------------------------------------------
# Agreement with trec_eval (pytrec_eval), the independent reference
# --------------------------------------------------------------------------------------------

TREC_TOLERANCE = 1e-9  # trec_eval computes in double; only summation order differs


def random_batch(
    rng: np.random.Generator, n_users: int, n_items: int, k: int
) -> tuple[np.ndarray, sp.csr_matrix]:
    """Rankings without repeats (trec runs cannot hold one), random lengths, random relevance."""
    recommended = np.argsort(rng.random((n_users, n_items)), axis=1)[:, :k]
    lengths = rng.integers(0, k + 1, size=n_users)
    recommended[np.arange(k)[None, :] >= lengths[:, None]] = -1
    # Relevant sets from empty to larger than k; bias towards recommended items so hits happen.
    n_relevant = rng.integers(0, 2 * k, size=n_users)
    users = np.repeat(np.arange(n_users), n_relevant)
    from_list = recommended[users, rng.integers(0, k, size=users.size)]
    items = np.where(
        rng.random(users.size) < 0.5, from_list, rng.integers(0, n_items, size=users.size)
    )
    keep = items >= 0  # a draw from the list can land on padding
    return recommended, relevance_from_pairs(users[keep], items[keep], n_users, n_items)


def trec_scores(recommended: np.ndarray, rel: sp.csr_matrix, k: int) -> dict[str, np.ndarray]:
    """trec_eval's per-user measures at cutoff k, for users with >= 1 relevant item."""
    evaluated = np.flatnonzero(np.diff(rel.indptr))
    qrels = {
        str(u): {str(i): 1 for i in rel.indices[rel.indptr[u] : rel.indptr[u + 1]]}
        for u in evaluated
    }
    # Scores fall with rank so trec's sort (score descending) reproduces our order without ties.
    # The run is cut at k because trec's recip_rank has no cutoff.
    run = {
        str(u): {str(i): float(k - rank) for rank, i in enumerate(recommended[u, :k]) if i >= 0}
        for u in evaluated
    }
    measures = {f"ndcg_cut.{k}", "recip_rank", f"recall.{k}", f"P.{k}", f"map_cut.{k}"}
    measures.add(f"success.{k}")
    result = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    names = {
        "ndcg": f"ndcg_cut_{k}",
        "mrr": "recip_rank",
        "recall": f"recall_{k}",
        "precision": f"P_{k}",
        "map": f"map_cut_{k}",
        "hit_rate": f"success_{k}",
    }
    return {
        ours: np.array([result[str(u)][theirs] for u in evaluated])
        for ours, theirs in names.items()
    }


def our_scores(recommended: np.ndarray, rel: sp.csr_matrix, k: int) -> dict[str, np.ndarray]:
    evaluated = np.diff(rel.indptr) > 0
    scores = {name: metric(recommended, rel, k) for name, metric in PER_USER_METRICS.items()}
    scores["map"] = average_precision_at_k(recommended, rel, k, normalization="n_relevant")
    assert all(np.isnan(v[~evaluated]).all() for v in scores.values())
    return {name: values[evaluated] for name, values in scores.items()}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 5, 10])
def test_agrees_with_trec_eval(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    recommended, rel = random_batch(rng, n_users=300, n_items=40, k=10)
    ours, theirs = our_scores(recommended, rel, k), trec_scores(recommended, rel, k)
    assert ours["ndcg"].size > 200  # the draw leaves most users with something relevant
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=TREC_TOLERANCE)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_users=st.integers(1, 8),
    n_items=st.integers(1, 15),
    k=st.integers(1, 8),
)
def test_agrees_with_trec_eval_on_small_edge_cases(
    seed: int, n_users: int, n_items: int, k: int
) -> None:
    k = min(k, n_items)  # a ranking without repeats is at most the catalog long
    recommended, rel = random_batch(np.random.default_rng(seed), n_users, n_items, k)
    ours, theirs = our_scores(recommended, rel, k), trec_scores(recommended, rel, k)
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=TREC_TOLERANCE)


# --------------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------------


@st.composite
def ranking_batches(draw: st.DrawFn) -> tuple[np.ndarray, sp.csr_matrix]:
    """Small batches with padding, repeated items and users with nothing relevant."""
    n_users = draw(st.integers(1, 6))
    n_items = draw(st.integers(1, 12))
    k = draw(st.integers(1, 8))
    rows = []
    for _ in range(n_users):
        items = draw(st.lists(st.integers(0, n_items - 1), max_size=k))
        rows.append(items + [-1] * (k - len(items)))
    relevant_rows = [
        sorted(draw(st.sets(st.integers(0, n_items - 1), max_size=n_items))) for _ in range(n_users)
    ]
    return np.array(rows, dtype=np.int64).reshape(n_users, k), relevance(relevant_rows, n_items)


@settings(max_examples=150, deadline=None)
@given(batch=ranking_batches())
def test_hit_matrix_matches_a_per_user_reference(batch: tuple[np.ndarray, sp.csr_matrix]) -> None:
    recommended, rel = batch
    np.testing.assert_array_equal(hit_matrix(recommended, rel), naive_hits(recommended, rel))


@settings(max_examples=150, deadline=None)
@given(batch=ranking_batches())
def test_metrics_lie_in_unit_interval_and_are_nan_exactly_without_relevance(
    batch: tuple[np.ndarray, sp.csr_matrix],
) -> None:
    recommended, rel = batch
    has_relevant = np.diff(rel.indptr) > 0
    for name, metric in PER_USER_METRICS.items():
        values = metric(recommended, rel)
        np.testing.assert_array_equal(np.isnan(values), ~has_relevant, err_msg=name)
        defined = values[has_relevant]
        assert np.all((defined >= 0) & (defined <= 1 + 1e-12)), name
    coverage = catalog_coverage(recommended, rel.shape[1])
    assert 0 <= coverage <= 1


@settings(max_examples=100, deadline=None)
@given(batch=ranking_batches())
def test_perfect_ranking(batch: tuple[np.ndarray, sp.csr_matrix]) -> None:
    _, rel = batch
    n_users, n_items = rel.shape
    k = n_items  # room for every relevant item, then the rest of the catalog
    dense = rel.toarray().astype(bool)
    # Relevant items first (stable sort on "not relevant"), then the others.
    recommended = np.argsort(~dense, axis=1, kind="stable")[:, :k]
    n_relevant = dense.sum(axis=1)
    evaluated = n_relevant > 0
    for cutoff in {1, max(1, k // 2), k}:
        expected_hits = np.minimum(n_relevant, cutoff)[evaluated]
        ndcg = ndcg_at_k(recommended, rel, cutoff)[evaluated]
        recall = recall_at_k(recommended, rel, cutoff)[evaluated]
        ap = average_precision_at_k(recommended, rel, cutoff)[evaluated]
        mrr = mrr_at_k(recommended, rel, cutoff)[evaluated]
        np.testing.assert_allclose(ndcg, 1.0, atol=1e-12)
        np.testing.assert_allclose(recall, expected_hits / n_relevant[evaluated], atol=1e-12)
        np.testing.assert_allclose(ap, 1.0, atol=1e-12)
        np.testing.assert_allclose(mrr, 1.0)


@settings(max_examples=100, deadline=None)
@given(batch=ranking_batches(), data=st.data())
def test_batch_invariance(batch: tuple[np.ndarray, sp.csr_matrix], data: st.DataObject) -> None:
    recommended, rel = batch
    n_users = recommended.shape[0]
    user = data.draw(st.integers(0, n_users - 1))
    order = data.draw(st.permutations(range(n_users)))
    for name, metric in PER_USER_METRICS.items():
        whole = metric(recommended, rel)
        alone = metric(recommended[user : user + 1], rel[user : user + 1])
        # Equal up to float summation order (numpy may vectorise a sum differently per shape).
        np.testing.assert_allclose(alone, whole[user : user + 1], rtol=1e-12, err_msg=name)
        shuffled = metric(recommended[order], rel[order])
        np.testing.assert_allclose(shuffled, whole[order], rtol=1e-12, err_msg=name)


@settings(max_examples=100, deadline=None)
@given(batch=ranking_batches(), data=st.data())
def test_cutoff_is_a_prefix(batch: tuple[np.ndarray, sp.csr_matrix], data: st.DataObject) -> None:
    recommended, rel = batch
    k = data.draw(st.integers(1, recommended.shape[1]))
    np.testing.assert_array_equal(
        hit_matrix(recommended[:, :k], rel), hit_matrix(recommended, rel)[:, :k]
    )
    summary = evaluate_rankings(recommended, rel, ks=(k,), metrics=("ndcg", "recall"))
    for name in ("ndcg", "recall"):
        expected = mean(PER_USER_METRICS[name](recommended[:, :k], rel)).value
        np.testing.assert_equal(summary[f"{name}@{k}"], expected)
