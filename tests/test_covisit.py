"""CoVisitationSource: hand-counted pair weights, blocked build == one block, history-driven."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from data.errors import ConfigError
from data.idmap import IdMap
from data.interactions import Interactions
from retrieval.base import PAD_ITEM, Candidates, UserBatch
from retrieval.covisit import CoVisitationConfig, CoVisitationSource
from retrieval.topk import sparse_topk
from tests.retrieval_contract import (
    HISTORY,
    N_CATEGORIES,
    CandidateSourceContract,
    clustered_log,
)

DAY = 86_400


def make_log(rows: list[tuple[str, int, int, float]], n_items: int = 4) -> Interactions:
    frame = pl.DataFrame(
        [(user, f"i{item}", ts, w) for user, item, ts, w in rows],
        schema={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64,
                "weight": pl.Float32},
        orient="row",
    )  # fmt: skip
    return Interactions.from_frame(frame, items=IdMap.from_ids([f"i{i}" for i in range(n_items)]))


# Pairs with max_gap=2, gap_decay=1 (a pair two events apart weighs 1/2), a one-day window:
#   a: 0,1,2              -> (0,1) 1   (1,2) 1   (0,2) 1/2
#   b: 1,2, 3 two days on -> (1,2) 1   (2,3), (1,3): outside the window
#   c: 0,0,3              -> (0,0) same item: no pair   (0,3) 1   (0,3) 1/2
HAND_LOG = [
    ("a", 0, 0, 1.0),
    ("a", 1, 10, 1.0),
    ("a", 2, 20, 1.0),
    ("b", 1, 100, 1.0),
    ("b", 2, 110, 1.0),
    ("b", 3, 110 + 2 * DAY, 1.0),
    ("c", 0, 0, 1.0),
    ("c", 0, 5, 1.0),
    ("c", 3, 10, 1.0),
]
HAND = CoVisitationConfig(window_seconds=DAY, max_gap=2, gap_decay=1.0)
SYMMETRIC = np.array(
    [
        [0.0, 1.0, 0.5, 1.5],
        [1.0, 0.0, 2.0, 0.0],
        [0.5, 2.0, 0.0, 0.0],
        [1.5, 0.0, 0.0, 0.0],
    ]
)


def fit(
    config: CoVisitationConfig, rows: list[tuple[str, int, int, float]] = HAND_LOG
) -> CoVisitationSource:
    return CoVisitationSource(config).fit(make_log(rows))


def history(items: list[list[int]], user: int = -1) -> UserBatch:
    n = len(items)
    recent = np.full((n, 4), PAD_ITEM, np.int32)
    for row, values in enumerate(items):
        recent[row, : len(values)] = values
    return UserBatch(
        np.full(n, user, np.int32),
        recent,
        np.where(recent >= 0, 1_000, 0).astype(np.int64),
        np.full(n, 1_000, np.int64),
    )


class TestCoVisitationContract(CandidateSourceContract):
    def make_source(self) -> CoVisitationSource:
        return CoVisitationSource(CoVisitationConfig())


def test_symmetric_counts_match_hand_computation() -> None:
    np.testing.assert_allclose(fit(HAND).neighbors_.toarray(), SYMMETRIC)


def test_directional_counts_keep_only_first_then_second() -> None:
    source = fit(CoVisitationConfig(window_seconds=DAY, max_gap=2, directional=True))
    np.testing.assert_allclose(source.neighbors_.toarray(), np.triu(SYMMETRIC))


def test_no_window_admits_the_late_pairs() -> None:
    source = fit(CoVisitationConfig(window_seconds=None, max_gap=2))
    late = np.zeros((4, 4))
    late[2, 3] = late[3, 2] = 1.0  # b: (2, 3) adjacent
    late[1, 3] = late[3, 1] = 0.5  # b: (1, 3) two apart
    np.testing.assert_allclose(source.neighbors_.toarray(), SYMMETRIC + late)


def test_plain_counts_and_event_weights() -> None:
    rows = [("a", 0, 0, 1.0), ("a", 1, 1, 3.0), ("a", 2, 2, 1.0)]
    source = fit(CoVisitationConfig(max_gap=2, gap_decay=0.0), rows)
    # Pair weight = mean of the two event weights; gap_decay 0 counts the gap-2 pair fully.
    expected = np.array([[0, 2, 1, 0], [2, 0, 2, 0], [1, 2, 0, 0], [0, 0, 0, 0]], float)
    np.testing.assert_allclose(source.neighbors_.toarray(), expected)


def test_only_the_top_neighbours_are_kept() -> None:
    source = fit(CoVisitationConfig(window_seconds=DAY, max_gap=2, neighbors=1))
    np.testing.assert_allclose(
        source.neighbors_.toarray(),
        np.array([[0, 0, 0, 1.5], [0, 0, 2, 0], [0, 2, 0, 0], [1.5, 0, 0, 0]]),
    )


def test_retrieve_sums_position_decayed_neighbour_rows() -> None:
    source = fit(CoVisitationConfig(window_seconds=DAY, max_gap=2, history_decay=0.5))
    # History 2 (most recent), then 0: score = row 2 + 0.5 * row 0 = [1, 2.5, 0.25, 0.75];
    # the history items 0 and 2 themselves are not candidates.
    out = source.retrieve(history([[2, 0], [], [1]]), 3)
    np.testing.assert_array_equal(
        out.item_idx, [[1, 3, PAD_ITEM], [PAD_ITEM] * 3, [2, 0, PAD_ITEM]]
    )
    np.testing.assert_allclose(out.scores[0, :2], [2.5, 0.75])
    assert np.isneginf(out.scores[1]).all()
    excluded = source.retrieve(history([[2, 0]]), 3, exclude=sp.csr_matrix([[0, 1, 0, 0]]))
    np.testing.assert_array_equal(excluded.item_idx, [[3, PAD_ITEM, PAD_ITEM]])


def test_new_history_changes_the_answer_for_any_user() -> None:
    log, catalog = clustered_log()
    source = CoVisitationSource().fit(log, catalog)
    for home in range(N_CATEGORIES):
        out = source.retrieve(history([[home, home + 3]], user=0), 3)
        assert (out.item_idx >= 0).all() and (out.item_idx % N_CATEGORIES == home).all()


def test_neighbors_lists_similar_items() -> None:
    out = fit(HAND).neighbors([0, 3, 99, -1], 2)
    np.testing.assert_array_equal(
        out.item_idx, [[3, 1], [0, PAD_ITEM], [PAD_ITEM, PAD_ITEM], [PAD_ITEM, PAD_ITEM]]
    )
    np.testing.assert_allclose(out.scores[0], [1.5, 1.0])


def random_log(seed: int) -> Interactions:
    rng = np.random.default_rng(seed)
    n = 600
    rows = list(
        zip(
            [f"u{u}" for u in rng.integers(0, 15, n)],
            rng.integers(0, 25, n).tolist(),
            rng.integers(0, 3 * DAY, n).tolist(),
            rng.choice([1.0, 2.0], n).tolist(),
            strict=True,
        )
    )
    return make_log(rows, n_items=25)


@pytest.mark.parametrize("directional", [False, True])
def test_blocked_build_equals_a_single_block(directional: bool) -> None:
    log = random_log(seed=3)
    # gap_decay 0 and weights 1 or 2: every sum is exact in float32, so the summation order
    # (which blocks change) cannot flip a tie at the neighbour cut-off.
    one = CoVisitationConfig(max_gap=4, neighbors=6, gap_decay=0.0, directional=directional)
    many = CoVisitationConfig(**{**vars(one), "max_pairs_per_block": 7})
    a = CoVisitationSource(one).fit(log).neighbors_
    b = CoVisitationSource(many).fit(log).neighbors_
    assert a.nnz > 0 and (np.diff(a.indptr) <= 6).all()
    np.testing.assert_allclose(a.toarray(), b.toarray(), rtol=1e-6)


def test_a_log_without_pairs_gives_no_candidates() -> None:
    source = fit(HAND, [("a", 0, 0, 1.0), ("b", 1, 0, 1.0)])
    assert source.neighbors_.nnz == 0
    assert (source.retrieve(history([[0, 1]]), 3).item_idx == PAD_ITEM).all()


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_gap", 0), ("neighbors", 0), ("window_seconds", -1), ("history_decay", 0.0),
     ("gap_decay", -1.0)],
)  # fmt: skip
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        CoVisitationConfig(**{field: value})  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    n_rows=st.integers(1, 5),
    n_items=st.integers(1, 12),
    k=st.integers(0, 14),
    seed=st.integers(0, 2**16),
)
def test_sparse_topk_equals_dense_topk(n_rows: int, n_items: int, k: int, seed: int) -> None:
    """Stored entries ranked per row == the dense top-k with unstored entries at -inf."""
    rng = np.random.default_rng(seed)
    stored = rng.random((n_rows, n_items)) < 0.5
    values = rng.permutation(n_rows * n_items).reshape(n_rows, n_items) + 1.0  # distinct
    matrix = sp.csr_matrix(np.where(stored, values, 0.0))
    exclude = sp.csr_matrix(rng.random((n_rows, n_items)) < 0.3, dtype=np.float32)
    fast = sparse_topk(matrix, k, exclude)
    dense = Candidates.from_scores(np.where(stored, values, -np.inf), k, exclude=exclude)
    np.testing.assert_array_equal(fast.item_idx, dense.item_idx)
    np.testing.assert_array_equal(fast.scores, dense.scores)


def test_history_longer_than_the_contract_default_is_fine() -> None:
    log, _ = clustered_log()
    users = UserBatch.from_interactions(log, np.arange(6), history_length=2 * HISTORY)
    out = CoVisitationSource().fit(log).retrieve(users, 5)
    assert out.item_idx.shape == (6, 5)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 6))
def test_retrieve_equals_the_dense_reference(seed: int, k: int) -> None:
    """Scores = decayed history x neighbour rows; history and excluded items never appear."""
    rng = np.random.default_rng(seed)
    n_items = 6
    source = CoVisitationSource(CoVisitationConfig(history_decay=0.5))
    # Distinct random counts: ties (the reference breaks them its own way) have probability 0.
    stored = rng.random((n_items, n_items)) < 0.5
    dense = np.where(stored, rng.random((n_items, n_items)) + 0.1, 0).astype(np.float32)
    np.fill_diagonal(dense, 0)
    source.neighbors_ = sp.csr_matrix(dense)
    recent = [list(rng.choice(n_items, rng.integers(0, 4), replace=False)) for _ in range(4)]
    users = history(recent)
    exclude = sp.csr_matrix(rng.random((4, n_items)) < 0.2, dtype=np.float32)
    out = source.retrieve(users, k, exclude=exclude)
    for row, items in enumerate(recent):
        scores = sum((0.5**p * dense[item] for p, item in enumerate(items)), np.zeros(n_items))
        candidate = (scores != 0) | (source.neighbors_[items].getnnz(axis=0) > 0)
        candidate[items] = False
        candidate &= exclude[row].toarray()[0] == 0
        expected = Candidates.from_scores(
            np.where(candidate, scores, -np.inf)[None, :].astype(np.float32), k
        )
        np.testing.assert_array_equal(out.item_idx[row], expected.item_idx[0])
        np.testing.assert_allclose(out.scores[row], expected.scores[0])
