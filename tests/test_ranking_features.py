"""Ranking features: hand-computed tables, one assembly path for training and serving, no leakage.

Also home of :func:`tiny_funnel`, the small trained retrieval stage both ranking test modules use
(a 300-user world, temporal 80/10/10 split, retrieval trained on the train split).
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from data.catalog import UNKNOWN_TIME, ItemCatalog
from data.errors import ConfigError, DataError
from data.idmap import IdMap
from data.interactions import Interactions
from data.schema import ITEM_ID, USER_ID
from data.splits import SplitConfig, split_interactions
from data.synthetic import WorldConfig, generate
from ranking.features import (
    FeatureConfig,
    FeatureStore,
    assemble,
    feature_names,
    row_standardized,
)
from ranking.training_set import TrainingSet, TrainingSetConfig, build_training_set
from retrieval.base import PAD_ITEM, UserBatch
from retrieval.covisit import CoVisitationSource
from retrieval.merge import ABSENT_RANK, MergedCandidates
from retrieval.stage import RetrievalConfig, RetrievalStage

DAY = 86_400
HOUR = 3_600
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z, a Thursday
AS_OF = T0 + 30 * DAY

# ------------------------------------------------------------------------------- tiny funnel
TINY_RETRIEVAL = """
n_candidates = 60
history_length = 10

[quotas]
two_tower = 25
als = 15

[index]
kind = "flat"

[two_tower]
min_interactions = 0  # the tests' logs are tiny; they test the tower anyway
embedding_dim = 8
hidden_dims = [16]
output_dim = 8
max_epochs = 2
batch_size = 256
num_threads = 1

[als]
factors = 8
iterations = 3
"""


@dataclass(frozen=True, eq=False)
class TinyFunnel:
    """A tiny synthetic world split by time, with a retrieval stage trained on ``train``."""

    train: Interactions
    valid: Interactions
    test: Interactions
    train_valid: Interactions
    catalog: ItemCatalog
    retrieval: RetrievalStage


@functools.cache
def tiny_funnel(seed: int = 1, *, learn_quotas: bool = False) -> TinyFunnel:
    data = generate(
        WorldConfig.from_overrides(
            n_users=300, n_items=150, n_days=20, target_interactions=9000, seed=seed
        )
    )
    splits = split_interactions(data.interactions, SplitConfig())
    users = IdMap.from_ids(splits["train"][USER_ID])
    items = IdMap.from_ids(pl.concat([splits["train"][ITEM_ID], data.items[ITEM_ID]]))

    def index(frame: pl.DataFrame) -> Interactions:
        return Interactions.from_frame(frame, users=users, items=items, drop_unknown=True)

    train, valid, test = (index(splits[name]) for name in ("train", "valid", "test"))
    catalog = ItemCatalog.from_frame(data.items, items)
    config = RetrievalConfig.from_mapping(tomllib.loads(TINY_RETRIEVAL))
    config = replace(config, learn_quotas=learn_quotas)
    retrieval = RetrievalStage(config).fit(train, catalog, valid)
    train_valid = index(pl.concat([splits["train"], splits["valid"]]))
    return TinyFunnel(train, valid, test, train_valid, catalog, retrieval)


def cut_of(labels: Interactions) -> int:
    return int(labels.timestamp[0])


# ------------------------------------------------------------------------------- hand-made world
def hand_log(rows: list[tuple[str, str, int]]) -> Interactions:
    frame = pl.DataFrame(
        [(user, item, ts, 1.0) for user, item, ts in rows],
        schema={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64,
                "weight": pl.Float32},
        orient="row",
    )  # fmt: skip
    return Interactions.from_frame(
        frame,
        users=IdMap.from_ids(["u0", "u1", "u2"]),
        items=IdMap.from_ids(["i0", "i1", "i2", "i3"]),
    )


HAND_ROWS = [
    ("u0", "i0", AS_OF - 40 * DAY),
    ("u0", "i1", AS_OF - 5 * DAY),
    ("u1", "i0", AS_OF - 2 * DAY),
    ("u0", "i1", AS_OF - DAY // 2),
    ("u1", "i2", AS_OF),  # at as_of: not before it, never read
    ("u2", "i3", AS_OF + DAY),
]


def hand_catalog(items: IdMap) -> ItemCatalog:
    frame = pl.DataFrame(
        {
            "item_id": ["i0", "i1", "i2", "i3"],
            "categories": [["A"], ["B"], ["A", "B"], []],
            "created_at": [AS_OF - 10 * DAY, UNKNOWN_TIME, AS_OF - DAY, AS_OF + DAY],
        }
    )
    return ItemCatalog.from_frame(frame, items)


@pytest.fixture(scope="module")
def hand_store() -> FeatureStore:
    log = hand_log(HAND_ROWS)
    return FeatureStore().fit(log, hand_catalog(log.items), as_of=AS_OF)


def test_store_tables_match_hand_counts(hand_store: FeatureStore) -> None:
    users, items = hand_store.user_table_, hand_store.item_table_
    np.testing.assert_array_equal(users["user_events_total"], [3, 1, 0])
    np.testing.assert_array_equal(users["user_events_7d"], [2, 1, 0])
    np.testing.assert_array_equal(users["user_events_30d"], [2, 1, 0])
    np.testing.assert_array_equal(users["user_distinct_items"], [2, 1, 0])
    np.testing.assert_allclose(users["user_tenure_days"], [40, 2, np.nan])
    np.testing.assert_array_equal(items["item_events_total"], [2, 2, 0, 0])
    np.testing.assert_array_equal(items["item_events_1d"], [0, 1, 0, 0])
    np.testing.assert_array_equal(items["item_events_7d"], [1, 2, 0, 0])
    np.testing.assert_array_equal(items["item_events_30d"], [1, 2, 0, 0])
    # trend = (1d count + 1) / (30d count * 1/30 + 1): 1 for an item with no events
    np.testing.assert_allclose(
        items["item_trend"], [1 / (1 / 30 + 1), 2 / (2 / 30 + 1), 1, 1], rtol=1e-6
    )
    np.testing.assert_allclose(items["item_days_since_first_event"], [40, 5, np.nan, np.nan])
    np.testing.assert_allclose(items["item_days_since_last_event"], [2, 0.5, np.nan, np.nan])
    np.testing.assert_allclose(
        hand_store.user_affinity_.toarray(), [[1 / 3, 2 / 3], [1, 0], [0, 0]], rtol=1e-6
    )


def test_store_never_reads_events_at_or_after_as_of() -> None:
    full = hand_log(HAND_ROWS)
    history = full.before(AS_OF)
    catalog = hand_catalog(full.items)
    a = FeatureStore().fit(full, catalog, as_of=AS_OF)
    b = FeatureStore().fit(history, catalog, as_of=AS_OF)
    _assert_same_tables(a, b)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(-40 * DAY, 5 * DAY)),
        min_size=1,
        max_size=40,
    ),
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 5 * DAY)), max_size=20),
)
def test_store_is_point_in_time(
    past: list[tuple[int, int, int]], future: list[tuple[int, int, int]]
) -> None:
    """Whatever happens at or after as_of, the tables are those of the events before it."""
    before = [(f"u{u}", f"i{i}", AS_OF + min(t, -1)) for u, i, t in past]
    after = [(f"u{u}", f"i{i}", AS_OF + t) for u, i, t in future]
    catalog = hand_catalog(hand_log(before).items)
    a = FeatureStore().fit(hand_log(before + after), catalog, as_of=AS_OF)
    b = FeatureStore().fit(hand_log(before), catalog, as_of=AS_OF)
    _assert_same_tables(a, b)
    shares = a.user_affinity_.toarray().sum(axis=1)
    assert np.all((np.abs(shares - 1) < 1e-5) | (shares == 0))


def _assert_same_tables(a: FeatureStore, b: FeatureStore) -> None:
    for table_a, table_b in ((a.user_table_, b.user_table_), (a.item_table_, b.item_table_)):
        assert list(table_a) == list(table_b)
        for name in table_a:
            np.testing.assert_array_equal(table_a[name], table_b[name], err_msg=name)
    assert (a.user_affinity_ != b.user_affinity_).nnz == 0


def _batch(
    user_idx: list[int], items: list[list[int]], times: list[list[int]], now: int
) -> UserBatch:
    width = max(len(row) for row in items)
    recent = np.full((len(items), width), PAD_ITEM, np.int32)
    stamps = np.zeros((len(items), width), np.int64)
    for r, (row, ts) in enumerate(zip(items, times, strict=True)):
        recent[r, : len(row)] = row
        stamps[r, : len(ts)] = ts
    return UserBatch(np.array(user_idx, np.int32), recent, stamps, np.full(len(items), now))


def _merged(items: list[list[int]], sources: tuple[str, ...] = ()) -> MergedCandidates:
    array = np.array(items, np.int32)
    shape = (*array.shape, len(sources))
    return MergedCandidates(
        array,
        np.full(shape, np.nan, np.float32),
        np.full(shape, ABSENT_RANK, np.int32),
        sources,
    )


def _column(matrix_names: tuple[str, ...], values: np.ndarray, name: str) -> np.ndarray:
    return values[:, :, matrix_names.index(name)]


def test_assembly_hand_computed_user_item_and_context_features(hand_store: FeatureStore) -> None:
    now = AS_OF + 10 * HOUR  # Saturday 2026-01-31, 10:00 UTC
    users = _batch(
        [0, -1],
        [[1, 1, 0], [2, 3, 0]],
        [
            [AS_OF - DAY // 2, AS_OF - 5 * DAY, AS_OF - 40 * DAY],
            [now - 60, now - 600, now - 10_000],
        ],
        now,
    )
    merged = _merged([[2, 3, 0, PAD_ITEM], [0, 1, 2, 3]], sources=("popular",))
    merged.source_ranks[0, 0, 0] = 4
    merged.source_scores[0, 0, 0] = 0.25
    stage = RetrievalStage()  # no sources: the model scores are missing (NaN)
    matrix = assemble(hand_store, stage, users, merged)
    names, values = matrix.names, matrix.values
    assert names == feature_names(hand_store, ("popular",))
    assert values.shape == (2, 4, len(names)) and values.dtype == np.float32
    np.testing.assert_array_equal(matrix.valid, [[True, True, True, False], [True] * 4])
    assert np.isnan(values[0, 3]).all()

    def col(name: str) -> np.ndarray:
        return _column(names, values, name)

    np.testing.assert_allclose(col("user_events_total")[:, 0], [3, 0])
    np.testing.assert_allclose(col("user_tenure_days")[:, 0], [40, np.nan])  # unknown user
    np.testing.assert_allclose(col("user_history_length")[:, 0], [3, 3])
    np.testing.assert_allclose(col("user_hours_since_last_event")[:, 0], [22, 60 / HOUR])
    np.testing.assert_allclose(col("user_session_length")[:, 0], [1, 2])  # 540 s chains, 9400 not
    np.testing.assert_allclose(col("user_recent_events")[:, 0], [1, 3])  # within a day of now
    np.testing.assert_allclose(col("ctx_hour")[:, 0], [10, 10])
    np.testing.assert_allclose(col("ctx_weekday")[:, 0], [5, 5])  # Monday = 0
    np.testing.assert_allclose(col("item_events_total")[1], [2, 2, 0, 0])
    age = col("item_age_days")[1]
    np.testing.assert_allclose(age[[0, 2, 3]], [10 + 10 / 24, 1 + 10 / 24, -1 + 10 / 24])
    assert np.isnan(age[1])  # unknown release time
    # u0's affinity: A 1/3, B 2/3 -> i2 (A and B) gets their mean, i3 (no category) 0
    np.testing.assert_allclose(col("category_affinity")[0, :3], [0.5, 0, 1 / 3], rtol=1e-6)
    # recent shares: u0 (i1, i1, i0) -> A 1/3, B 2/3; the unknown user (i2, i3, i0) -> A 0.5, B 1/6
    np.testing.assert_allclose(col("category_recent_share")[0, :3], [0.5, 0, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(col("category_recent_share")[1], [0.5, 1 / 6, 1 / 3, 0], rtol=1e-6)
    assert np.isnan(col("two_tower_score")[:, :3]).all() and np.isnan(col("covisit_score")).all()
    np.testing.assert_allclose(col("src_popular_rank")[0, :3], [4, 10_000, 10_000])
    np.testing.assert_allclose(col("src_popular_present")[0, :3], [1, 0, 0])
    np.testing.assert_allclose(col("src_popular_score")[0, :3], [0.25, np.nan, np.nan])
    np.testing.assert_allclose(col("n_sources")[0, :3], [1, 0, 0])
    np.testing.assert_allclose(col("merged_position")[0, :3], [0, 10_000, 10_000])


def test_covisit_score_is_the_sum_of_neighbour_weights(hand_store: FeatureStore) -> None:
    neighbours = np.array(
        [[0, 1, 2, 0], [1, 0, 0, 3], [2, 0, 0, 0], [0, 3, 0, 0]], dtype=np.float32
    )
    source = CoVisitationSource()
    source.neighbors_ = sp.csr_matrix(neighbours)
    stage = RetrievalStage()
    stage.sources_ = {"covisit": source}
    users = _batch([0, 1, 2], [[0, 1], [3, 0, 3], []], [[1, 1], [1, 1, 1], []], AS_OF)
    merged = _merged([[1, 2, 3], [1, 2, PAD_ITEM], [0, 1, 2]])
    matrix = assemble(hand_store, stage, users, merged)
    score = _column(matrix.names, matrix.values, "covisit_score")
    history = np.zeros((3, 4), np.float32)
    for row, items in enumerate([[0, 1], [3, 0, 3], []]):
        for item in items:
            history[row, item] += 1
    expected = np.take_along_axis(history @ neighbours, np.maximum(merged.item_idx, 0), axis=1)
    np.testing.assert_allclose(score[:, :2], expected[:, :2])
    np.testing.assert_allclose(score[0, 2], expected[0, 2])
    assert np.isnan(score[1, 2])  # padding
    np.testing.assert_array_equal(score[2], [0, 0, 0])  # no history, no co-visitation


def test_affinity_catches_up_with_the_events_since_the_store_was_built(
    hand_store: FeatureStore,
) -> None:
    # Store (events before AS_OF), categories A=0, B=1: u0 A:1 B:2 (mass 3); u1 A:1; u2 none.
    i0, i1, i2, i3 = 0, 1, 2, 3  # i2 is in A and B, i3 in no category
    recent = np.array(
        [
            [i2, i1, i0],  # u0: i2 at AS_OF is news; the other two are in the store already
            [i0, PAD_ITEM, PAD_ITEM],  # u1: nothing new
            [i3, i0, PAD_ITEM],  # u2: two new events, one without a category
            [i1, PAD_ITEM, PAD_ITEM],  # a user the store never saw, one new event
        ],
        dtype=np.int32,
    )
    times = np.array(
        [
            [AS_OF, AS_OF - DAY // 2, AS_OF - 40 * DAY],
            [AS_OF - 2 * DAY, 0, 0],
            [AS_OF + DAY, AS_OF + 1, 0],
            [AS_OF + 5, 0, 0],
        ],
        dtype=np.int64,
    )
    users = UserBatch(np.array([0, 1, 2, -1], np.int32), recent, times, np.full(4, AS_OF + DAY))
    np.testing.assert_allclose(
        hand_store.current_affinity(users), [[0.4, 0.6], [1, 0], [1, 0], [0, 1]], rtol=1e-6
    )
    # Nothing at or after AS_OF (every training row): exactly the store's affinity.
    before = UserBatch(users.user_idx, recent, np.minimum(times, AS_OF - 1), users.now)
    np.testing.assert_array_equal(
        hand_store.current_affinity(before), hand_store.affinity(users.user_idx)
    )


def test_store_save_load_round_trip(hand_store: FeatureStore, tmp_path: Path) -> None:
    hand_store.save(tmp_path / "store")
    again = FeatureStore.load(tmp_path / "store")
    _assert_same_tables(hand_store, again)
    np.testing.assert_array_equal(again.user_affinity_mass_, [3, 1, 0])
    # Events after AS_OF in the history: the caught-up affinity reads the saved mass too.
    users = _batch([0, 1], [[1, 0], [2]], [[AS_OF + 5, AS_OF - 99], [AS_OF + 7]], AS_OF + 9)
    merged = _merged([[0, 1, 2, 3], [3, 2, 1, 0]])
    a = assemble(hand_store, RetrievalStage(), users, merged).values
    b = assemble(again, RetrievalStage(), users, merged).values
    np.testing.assert_array_equal(a, b)


def test_config_and_input_errors_name_the_problem(hand_store: FeatureStore) -> None:
    with pytest.raises(ConfigError, match="popularity_windows_days"):
        FeatureConfig(popularity_windows_days=(7, 1))
    with pytest.raises(ConfigError, match="covisit_history_decay"):
        FeatureConfig(covisit_history_decay=0.0)
    log = hand_log(HAND_ROWS)
    other = ItemCatalog.empty(IdMap.from_ids(["i0"]))
    with pytest.raises(DataError, match="catalog has 1 items"):
        FeatureStore().fit(log, other, as_of=AS_OF)
    users = _batch([0], [[1]], [[AS_OF - 5]], AS_OF)
    with pytest.raises(DataError, match="1 users but 2 rows"):
        assemble(hand_store, RetrievalStage(), users, _merged([[0], [1]]))


# ------------------------------------------------------------------------------- the funnel
@pytest.fixture(scope="module")
def funnel() -> TinyFunnel:
    return tiny_funnel()


@pytest.fixture(scope="module")
def training(funnel: TinyFunnel) -> tuple[FeatureStore, TrainingSet]:
    store = FeatureStore().fit(funnel.train, funnel.catalog, as_of=cut_of(funnel.valid))
    data = build_training_set(
        funnel.retrieval, store, funnel.train, funnel.valid, funnel.catalog, TrainingSetConfig()
    )
    return store, data


def _serving_rows(
    funnel: TinyFunnel, store: FeatureStore, user_rows: list[int], cut: int
) -> tuple[UserBatch, MergedCandidates, np.ndarray]:
    """What the serving path computes for these users at the cut: state, candidates, features."""
    history = funnel.train.before(cut)
    users = UserBatch.from_interactions(
        history,
        np.array(user_rows, np.int32),
        history_length=funnel.retrieval.config.history_length,
        now=cut,
    )
    seen = history.matrix[np.array(user_rows)]
    merged = funnel.retrieval.retrieve(users, exclude=seen)
    return users, merged, assemble(store, funnel.retrieval, users, merged).values


def _label_users(funnel: TinyFunnel, cut: int) -> list[int]:
    """The users the training set asks retrieval for: new items engaged in the label window."""
    seen = funnel.train.before(cut).matrix > 0
    new = (funnel.valid.matrix > 0).astype(np.int8) - (funnel.valid.matrix > 0).multiply(seen)
    return np.flatnonzero(np.diff(sp.csr_matrix(new).indptr) > 0).tolist()


def _assert_rows_match(
    data: TrainingSet,
    users: list[int],
    merged: MergedCandidates,
    served: np.ndarray,
    *,
    exact: bool,
) -> int:
    """Compare every retrieved training row of ``users`` with the served features; count them."""
    offsets, compared = data.offsets, 0
    for row_in_batch, user in enumerate(users):
        groups = np.flatnonzero(data.group_users == user)
        if groups.size == 0:
            continue
        rows = np.arange(offsets[groups[0]], offsets[groups[0] + 1])
        items = merged.item_idx[row_in_batch]
        column = {int(item): j for j, item in enumerate(items) if item != PAD_ITEM}
        for row in rows[data.retrieved[rows]]:
            expected = served[row_in_batch, column[int(data.item_idx[row])]]
            if exact:
                np.testing.assert_array_equal(data.values[row], expected)
            else:
                np.testing.assert_allclose(data.values[row], expected, rtol=1e-6, atol=1e-7)
            compared += 1
    return compared


def test_training_rows_equal_the_serving_features_of_the_same_users_and_time(
    funnel: TinyFunnel, training: tuple[FeatureStore, TrainingSet]
) -> None:
    """The serving call on the same batch of users at the cut gives bit-identical rows."""
    store, data = training
    users = _label_users(funnel, data.cut)
    _, merged, served = _serving_rows(funnel, store, users, data.cut)
    assert _assert_rows_match(data, users, merged, served, exact=True) > 1000


def test_a_single_request_gets_the_training_features_of_its_user(
    funnel: TinyFunnel, training: tuple[FeatureStore, TrainingSet]
) -> None:
    """A batch of one: equal up to float rounding (BLAS sums a lone user's scores in another
    order than a batch's, which moves the last bit of a model score, nothing else)."""
    store, data = training
    for user in (int(data.group_users[0]), int(data.group_users[-1])):
        _, merged, served = _serving_rows(funnel, store, [user], data.cut)
        assert _assert_rows_match(data, [user], merged, served, exact=False) > 0


def test_assembly_is_batch_invariant(
    funnel: TinyFunnel, training: tuple[FeatureStore, TrainingSet]
) -> None:
    store, data = training
    a, b = (int(u) for u in data.group_users[:2])
    _, _, alone = _serving_rows(funnel, store, [a], data.cut)
    _, _, together = _serving_rows(funnel, store, [a, b], data.cut)
    np.testing.assert_allclose(alone[0], together[0], rtol=1e-6, atol=1e-7)


def test_label_window_changes_labels_never_features(
    funnel: TinyFunnel, training: tuple[FeatureStore, TrainingSet]
) -> None:
    store, data = training
    labels = funnel.valid
    rng = np.random.default_rng(0)
    # Keep the first event (the cut), drop a third of the others, move the rest to other items.
    keep = np.concatenate([[True], rng.random(len(labels) - 1) > 1 / 3])
    shuffled = Interactions(
        labels.users,
        labels.items,
        labels.user_idx[keep],
        rng.permutation(labels.item_idx[keep]).astype(np.int32),
        labels.timestamp[keep],
        labels.weight[keep],
    )
    assert shuffled.timestamp[0] == data.cut
    # A store fitted on history + label window with as_of = cut is the store of the history.
    leaky_log_store = FeatureStore().fit(funnel.train_valid, funnel.catalog, as_of=data.cut)
    _assert_same_tables(store, leaky_log_store)
    # One user per batch: the label window also decides *which* users are asked, and a batch's
    # composition moves the last bit of BLAS-computed scores; alone, a user's rows can only
    # change if a feature read the labels.
    alone = TrainingSetConfig(batch_users=1)
    data = build_training_set(
        funnel.retrieval, store, funnel.train, funnel.valid, funnel.catalog, alone
    )
    other = build_training_set(
        funnel.retrieval, leaky_log_store, funnel.train, shuffled, funnel.catalog, alone
    )
    keys_a = data.group_users[np.repeat(np.arange(data.n_groups), data.groups)].astype(np.int64)
    keys_a = keys_a * funnel.catalog.n_items + data.item_idx
    keys_b = other.group_users[np.repeat(np.arange(other.n_groups), other.groups)].astype(np.int64)
    keys_b = keys_b * funnel.catalog.n_items + other.item_idx
    common, in_a, in_b = np.intersect1d(keys_a, keys_b, return_indices=True)
    assert common.size > 100
    np.testing.assert_array_equal(data.values[in_a], other.values[in_b])
    assert not np.array_equal(data.labels[in_a], other.labels[in_b])  # the labels did change


def test_a_store_that_reads_the_label_window_is_refused(funnel: TinyFunnel) -> None:
    cut = cut_of(funnel.valid)
    late = FeatureStore().fit(funnel.train_valid, funnel.catalog, as_of=cut + 1)
    with pytest.raises(DataError, match="would read labels"):
        build_training_set(funnel.retrieval, late, funnel.train, funnel.valid, funnel.catalog)


def test_catalogue_without_categories_gives_empty_category_share() -> None:
    """A bare ratings log (no items file) has no categories; features must still assemble."""
    import polars as pl

    from data.catalog import ItemCatalog
    from data.interactions import Interactions
    from ranking.features import FeatureConfig, FeatureStore

    frame = pl.DataFrame(
        {
            "user_id": ["a", "a", "b"],
            "item_id": ["x", "y", "x"],
            "timestamp": [1, 2, 3],
            "weight": [1.0, 1.0, 1.0],
        }
    )
    log = Interactions.from_frame(frame)
    store = FeatureStore(FeatureConfig()).fit(log, ItemCatalog.empty(log.items), as_of=10)
    share = store.recent_category_share(np.array([[0, 1], [-1, -1]], dtype=np.int32))
    assert share.shape == (2, 0)


# ------------------------------------------------------------------ fit-time choices on valid


def test_sources_merge_best_first_on_validation() -> None:
    funnel = tiny_funnel()
    stage = funnel.retrieval
    quality = stage.validation_

    assert set(quality) == set(stage.sources_) and all(0 <= v <= 1 for v in quality.values())
    order = list(stage.sources_)
    assert [quality[name] for name in order] == sorted(quality.values(), reverse=True)
    assert stage.config.sources == tuple(order)


def test_row_standardized_uses_only_the_reference_entries() -> None:
    values = np.array([[1.0, 3.0, 100.0, np.nan], [5.0, 5.0, 5.0, 5.0]])
    reference = np.array([[True, True, False, True], [True, True, True, True]])

    got = row_standardized(values, reference)

    # Row 0: mean 2 and deviation 1 over the two finite reference entries; 100 is scaled, not used.
    np.testing.assert_allclose(got[0, :3], [-1.0, 1.0, 98.0])
    assert np.isnan(got[0, 3])
    np.testing.assert_allclose(got[1], 0.0)  # no spread: centred, not divided by 0
