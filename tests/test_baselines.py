"""Baselines: EASE against its definition, hand-checked popularity, seeded random, one contract."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from data.errors import ConfigError, DataError, NotFittedError
from data.idmap import IdMap
from data.interactions import Interactions
from evaluation.baselines import (
    ALSBaseline,
    Baseline,
    EASEBaseline,
    PopularityBaseline,
    RandomBaseline,
    RecencyPopularityBaseline,
    default_baselines,
)
from retrieval.als import ALSConfig, ALSSource
from retrieval.base import PAD_ITEM, UserBatch
from retrieval.item_item import ease_weights
from tests.retrieval_contract import N_CATEGORIES, N_ITEMS, N_USERS, clustered_log

DAY = 86_400
T0 = 1_700_000_000
ALS_CONFIG = ALSConfig(factors=8, iterations=10, num_threads=1)


def log_from_rows(rows: list[tuple[int, int, int]], n_items: int) -> Interactions:
    """A log from (user, item, timestamp) rows over items i00..; weights 1."""
    frame = pl.DataFrame(
        {
            "user_id": [f"u{u:02d}" for u, _, _ in rows],
            "item_id": [f"i{i:02d}" for _, i, _ in rows],
            "timestamp": [t for _, _, t in rows],
            "weight": [1.0] * len(rows),
        },
        schema={
            "user_id": pl.String,
            "item_id": pl.String,
            "timestamp": pl.Int64,
            "weight": pl.Float32,
        },
    )
    return Interactions.from_frame(
        frame, items=IdMap.from_ids([f"i{i:02d}" for i in range(n_items)])
    )


def log_from_matrix(matrix: np.ndarray) -> Interactions:
    users, items = np.nonzero(matrix)
    return log_from_rows(
        [(int(u), int(i), T0 + j) for j, (u, i) in enumerate(zip(users, items, strict=True))],
        matrix.shape[1],
    )


def seen_of(log: Interactions, rows: np.ndarray) -> sp.csr_matrix:
    """Each row's training items (zero rows for -1), the usual ``seen`` of an evaluation."""
    selector = sp.csr_matrix(
        (np.ones(int((rows >= 0).sum())), (np.flatnonzero(rows >= 0), rows[rows >= 0])),
        shape=(rows.size, log.n_users),
    )
    return (selector @ log.matrix).tocsr()


# --------------------------------------------------------------------------------------------
# EASE
# --------------------------------------------------------------------------------------------


def ease_by_columns(x: np.ndarray, l2: float) -> np.ndarray:
    """EASE's B column by column from the constrained ridge problem itself.

    Column j regresses x_j on the other items with L2 weight l2, and B_jj is fixed at 0:
    b_{-j} = (X_{-j}^T X_{-j} + l2 I)^-1 X_{-j}^T x_j. Independent of the closed form's algebra.
    """
    n_items = x.shape[1]
    weights = np.zeros((n_items, n_items))
    for j in range(n_items):
        others = np.delete(np.arange(n_items), j)
        design = x[:, others]
        weights[others, j] = np.linalg.solve(
            design.T @ design + l2 * np.eye(n_items - 1), design.T @ x[:, j]
        )
    return weights


def test_ease_weights_match_the_constrained_ridge_solution() -> None:
    x = (np.random.default_rng(0).random((12, 7)) < 0.4).astype(np.float64)
    closed_form = ease_weights(sp.csr_matrix(x), l2=3.0)
    np.testing.assert_allclose(closed_form, ease_by_columns(x, 3.0), atol=1e-10)
    assert np.all(np.diag(closed_form) == 0)


def test_ease_weights_match_the_numpy_closed_form_on_a_larger_catalogue() -> None:
    # 520 items: more than one 512-row block of the in-place triangle mirroring.
    x = sp.random(300, 520, density=0.05, format="csr", random_state=0, dtype=np.float64)
    x.data[:] = 1.0
    precision = np.linalg.inv((x.T @ x).toarray() + 50.0 * np.eye(520))
    expected = np.eye(520) - precision / np.diag(precision)[None, :]
    np.testing.assert_allclose(ease_weights(x, 50.0), expected, atol=1e-9)


def test_ease_baseline_recommends_by_x_times_b_minus_seen() -> None:
    x = (np.random.default_rng(1).random((10, 6)) < 0.5).astype(np.float64)
    x[:, 0] = 1.0  # every user has an event, so every user is known
    log = log_from_matrix(x)
    ease = EASEBaseline(l2=2.0).fit(log)
    np.testing.assert_allclose(ease.weights_, ease_by_columns(x, 2.0), atol=1e-6)

    rows = np.arange(10)
    scores = x @ ease_by_columns(x, 2.0)
    scores[x > 0] = -np.inf
    n_unseen = (x == 0).sum(axis=1)
    out = ease.recommend(rows, 3, seen_of(log, rows))
    for user in rows:  # a small loop over a hand-sized matrix, in the test only
        expected = np.argsort(-scores[user], kind="stable")[: min(3, n_unseen[user])]
        assert set(out[user][out[user] >= 0]) == set(expected)


def test_ease_puts_each_users_top_item_in_their_own_cluster() -> None:
    log, _ = clustered_log()
    rows = np.arange(N_USERS)
    top = EASEBaseline(l2=1.0).fit(log).recommend(rows, 1, seen_of(log, rows))[:, 0]
    assert ((top % N_CATEGORIES) == rows % N_CATEGORIES).mean() >= 0.9


def test_ease_refuses_a_catalogue_above_max_items() -> None:
    log, _ = clustered_log()
    model = EASEBaseline(max_items=10)
    with pytest.raises(ConfigError, match=f"{N_ITEMS} items exceed max_items=10"):
        model.fit(log)
    with pytest.raises(NotFittedError):  # a failed fit leaves nothing half fitted
        model.recommend(np.array([0]), 3, None)


@pytest.mark.parametrize("l2", [0.0, -1.0, float("nan"), float("inf"), True, "5"])
def test_ease_rejects_a_bad_l2(l2: object) -> None:
    with pytest.raises(ConfigError, match="l2"):
        EASEBaseline(l2=l2)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Popularity
# --------------------------------------------------------------------------------------------

# Item counts 3: 4 events, 1: 3, 0: 2 (one of them two days old), 2: 1 (at the end). Plain
# popularity is 3, 1, 0, 2. With a one-day half-life the old events fade: 3's four events are
# three days old (4/8 = 0.5), 1's three are one day old (1.5), 0 has 1 + 1/4, 2 has 1; so 1, 0,
# 2, 3. Item 4 has no event and is never recommended by either.
POPULARITY_LOG = [
    (0, 3, T0),
    (1, 3, T0),
    (2, 3, T0),
    (3, 3, T0),
    (0, 0, T0 + 1 * DAY),
    (0, 1, T0 + 2 * DAY),
    (1, 1, T0 + 2 * DAY),
    (2, 1, T0 + 2 * DAY),
    (3, 0, T0 + 3 * DAY),
    (4, 2, T0 + 3 * DAY),
]


def test_popularity_order_is_by_event_count_minus_seen() -> None:
    log = log_from_rows(POPULARITY_LOG, n_items=5)
    model = PopularityBaseline().fit(log)
    rows = np.array([0, 4, -1])
    out = model.recommend(rows, 4, seen_of(log, rows))
    np.testing.assert_array_equal(out[0], [2, PAD_ITEM, PAD_ITEM, PAD_ITEM])  # saw 3, 0, 1
    np.testing.assert_array_equal(out[1], [3, 1, 0, PAD_ITEM])  # saw 2; item 4 never shown
    np.testing.assert_array_equal(out[2], [3, 1, 0, 2])  # unknown: the whole ranking


def test_recency_popularity_follows_the_decayed_counts() -> None:
    log = log_from_rows(POPULARITY_LOG, n_items=5)
    model = RecencyPopularityBaseline(half_life_days=1.0).fit(log)
    out = model.recommend(np.array([-1]), 5, None)
    np.testing.assert_array_equal(out[0], [1, 0, 2, 3, PAD_ITEM])


def test_recency_popularity_rejects_a_non_positive_half_life() -> None:
    with pytest.raises(ConfigError, match="half_life_days"):
        RecencyPopularityBaseline(half_life_days=0.0)


# --------------------------------------------------------------------------------------------
# Random
# --------------------------------------------------------------------------------------------


def test_random_is_deterministic_per_seed_and_varies_with_it() -> None:
    log, _ = clustered_log()
    rows = np.arange(N_USERS)
    seen = seen_of(log, rows)
    first = RandomBaseline(seed=7).fit(log).recommend(rows, 5, seen)
    again = RandomBaseline(seed=7).fit(log).recommend(rows, 5, seen)
    other = RandomBaseline(seed=8).fit(log).recommend(rows, 5, seen)
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()


def test_random_spreads_over_the_catalogue() -> None:
    log, _ = clustered_log()
    users = np.arange(N_USERS)
    out = RandomBaseline(seed=0).fit(log).recommend(np.concatenate([users, users]), 10, None)
    # The same user gets the same list wherever it sits in the batch ...
    np.testing.assert_array_equal(out[:N_USERS], out[N_USERS:])
    # ... and across users every item shows up, near the uniform 40 * 10 / 30 = 13.3 times.
    counts = np.bincount(out[:N_USERS].ravel(), minlength=N_ITEMS)
    assert counts.min() > 0 and counts.max() < 3 * N_USERS * 10 / N_ITEMS


# --------------------------------------------------------------------------------------------
# The contract every baseline owes the report
# --------------------------------------------------------------------------------------------

MAKERS = {
    "random": lambda: RandomBaseline(seed=3),
    "popular": PopularityBaseline,
    "recent_popular": lambda: RecencyPopularityBaseline(half_life_days=1.0),
    "als": lambda: ALSBaseline(ALS_CONFIG),
    "ease": lambda: EASEBaseline(l2=5.0),
}


@pytest.fixture(scope="module")
def fitted() -> dict[str, Baseline]:
    log, _ = clustered_log()
    return {name: make().fit(log) for name, make in MAKERS.items()}


def check_lists(out: np.ndarray, n: int, k: int, seen: sp.csr_matrix | None) -> None:
    """Shape and dtype, no seen item, no repeat, padding only at the end of a row."""
    assert out.shape == (n, k)
    assert out.dtype == np.int32
    listed = out >= 0
    assert (out[~listed] == PAD_ITEM).all()
    assert not (~listed[:, :-1] & listed[:, 1:]).any()
    for row in out:  # tiny batches: a per-row check in the test is clearest
        items = row[row >= 0]
        assert items.size == np.unique(items).size
    if seen is not None:
        r, c = np.nonzero(listed)
        assert not seen.toarray()[r, out[r, c]].any()


@pytest.mark.parametrize("name", list(MAKERS))
def test_lists_are_full_unseen_and_batch_independent(
    fitted: dict[str, Baseline], name: str
) -> None:
    log, _ = clustered_log()
    rows = np.array([0, 5, 17, -1, 39])
    seen = seen_of(log, rows)
    out = fitted[name].recommend(rows, 8, seen)
    check_lists(out, rows.size, 8, seen)
    # Every user has at least 24 unseen items, 14 with an event: room for 8 everywhere.
    assert (out >= 0).all()
    for i in range(rows.size):
        alone = fitted[name].recommend(rows[i : i + 1], 8, seen[i : i + 1])
        np.testing.assert_array_equal(alone[0], out[i])


@pytest.mark.parametrize("name", ["als", "ease", "popular"])
def test_cold_users_get_popularity(fitted: dict[str, Baseline], name: str) -> None:
    popular = fitted["popular"].recommend(np.array([-1]), 6, None)
    out = fitted[name].recommend(np.array([-1, -1]), 6, None)
    np.testing.assert_array_equal(out, np.vstack([popular, popular]))


def test_als_baseline_is_the_als_source_for_known_users(fitted: dict[str, Baseline]) -> None:
    log, _ = clustered_log()
    rows = np.arange(N_USERS)
    seen = seen_of(log, rows)
    source = ALSSource(ALS_CONFIG).fit(log)
    batch = UserBatch(
        rows.astype(np.int32),
        np.empty((rows.size, 0), np.int32),
        np.empty((rows.size, 0), np.int64),
        np.zeros(rows.size, np.int64),
    )
    expected = source.retrieve(batch, 5, exclude=seen).item_idx
    np.testing.assert_array_equal(fitted["als"].recommend(rows, 5, seen), expected)


@pytest.mark.parametrize("name", list(MAKERS))
def test_unfitted_baselines_raise(name: str) -> None:
    with pytest.raises(NotFittedError):
        MAKERS[name]().recommend(np.array([0]), 3, None)


@pytest.mark.parametrize("name", list(MAKERS))
def test_bad_requests_raise_data_errors(fitted: dict[str, Baseline], name: str) -> None:
    model = fitted[name]
    with pytest.raises(DataError, match="rows"):
        model.recommend(np.array([0, 1]), 3, sp.csr_matrix((3, N_ITEMS)))
    with pytest.raises(DataError, match="k must be"):
        model.recommend(np.array([0]), -1, None)
    with pytest.raises(DataError, match="user_rows"):
        model.recommend(np.array([-2]), 3, None)
    with pytest.raises(DataError, match="user_rows"):
        model.recommend(np.array([0.5]), 3, None)


def test_an_empty_log_is_refused() -> None:
    empty = clustered_log()[0].before(0)  # the same maps, no event
    with pytest.raises(DataError, match="empty"):
        PopularityBaseline().fit(empty)


def test_default_baselines_are_keyed_by_name() -> None:
    baselines = default_baselines(seed=1)
    assert list(baselines) == ["random", "popular", "recent_popular", "als", "ease"]
    assert all(isinstance(b, Baseline) and b.name == key for key, b in baselines.items())


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(list(MAKERS)),
    k=st.integers(0, N_ITEMS + 3),
    data=st.data(),
)
def test_never_returns_seen_items_and_fills_what_it_can(
    fitted: dict[str, Baseline], name: str, k: int, data: st.DataObject
) -> None:
    rows = np.array(data.draw(st.lists(st.integers(-1, N_USERS - 1), min_size=1, max_size=6)))
    seen = sp.csr_matrix(
        np.array(
            data.draw(
                st.lists(
                    st.lists(st.booleans(), min_size=N_ITEMS + 2, max_size=N_ITEMS + 2),
                    min_size=rows.size,
                    max_size=rows.size,
                )
            ),
            dtype=np.float32,
        )
    )  # two columns wider than the catalogue: items newer than the model are ignored
    out = fitted[name].recommend(rows, k, seen)
    check_lists(out, rows.size, k, seen[:, :N_ITEMS])
    # Every item of the clustered log has events, so even popularity can fill every unseen slot.
    assert (clustered_log()[0].item_counts > 0).all()
    available = N_ITEMS - np.asarray(seen[:, :N_ITEMS].sum(axis=1)).ravel()
    np.testing.assert_array_equal((out >= 0).sum(axis=1), np.minimum(k, available))
