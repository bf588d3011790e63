"""ALSSource: the clustered log's structure is recovered, fold-in personalises without a retrain."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from data.errors import ConfigError, DataError
from data.interactions import Interactions
from retrieval import als
from retrieval.als import ALSConfig, ALSSource, solve_users
from retrieval.base import PAD_ITEM, UserBatch
from tests.retrieval_contract import (
    HISTORY,
    N_CATEGORIES,
    N_ITEMS,
    N_USERS,
    CandidateSourceContract,
    clustered_log,
)

# Linear confidence and a fixed alpha: the fold-in tests compare with implicit's solve of the
# same raw weights.
CONFIG = ALSConfig(
    factors=8, iterations=10, random_state=0, num_threads=1, confidence="linear", alpha=10.0
)


def cluster(items: np.ndarray) -> np.ndarray:
    return np.asarray(items) % N_CATEGORIES  # clustered_log puts item i in category i % 3


def session(user: int, items: list[int], time: int) -> UserBatch:
    """One user whose most recent events are ``items`` (most recent first), all at ``time``."""
    row = np.full((1, HISTORY), PAD_ITEM, np.int32)
    row[0, : len(items)] = items
    times = np.where(row >= 0, time, 0).astype(np.int64)
    return UserBatch(np.array([user], np.int32), row, times, np.array([time], np.int64))


@pytest.fixture(scope="module")
def trained() -> tuple[ALSSource, Interactions]:
    log, catalog = clustered_log()
    return ALSSource(CONFIG).fit(log, catalog), log


class TestALSContract(CandidateSourceContract):
    def make_source(self) -> ALSSource:
        return ALSSource(CONFIG)


class TestALSContractWithIndex(CandidateSourceContract):
    """The same contract when retrieval goes through the approximate index."""

    def make_source(self) -> ALSSource:
        return ALSSource(ALSConfig(**{**vars(CONFIG), "index": "ann"}))


def test_top1_lands_in_the_users_own_cluster(trained: tuple[ALSSource, Interactions]) -> None:
    source, log = trained
    users = UserBatch.from_interactions(log, np.arange(N_USERS), history_length=HISTORY)
    out = source.retrieve(users, 1, exclude=users.history_matrix(log.n_items))
    home = np.arange(N_USERS) % N_CATEGORIES
    assert (cluster(out.item_idx[:, 0]) == home).mean() >= 0.9


@pytest.mark.parametrize("home", range(N_CATEGORIES))
def test_fold_in_gives_an_unknown_user_their_clusters_items(
    trained: tuple[ALSSource, Interactions], home: int
) -> None:
    source, log = trained
    history = [home, home + 3, home + 6]
    user = session(-1, history, time=int(log.timestamp.max()) + 60)
    out = source.retrieve(user, 3, exclude=user.history_matrix(N_ITEMS))
    assert (out.item_idx != PAD_ITEM).all()
    assert (cluster(out.item_idx) == home).all()
    assert not set(out.item_idx[0].tolist()) & set(history)


def test_new_events_move_a_known_user_without_retraining(
    trained: tuple[ALSSource, Interactions],
) -> None:
    source, log = trained
    after = int(log.timestamp.max()) + 60
    all_items = np.arange(N_ITEMS)[None, :]

    def mean_score_per_cluster(user: UserBatch) -> np.ndarray:
        scores = source.score(user, all_items)[0]
        return np.array([scores[cluster(all_items[0]) == c].mean() for c in range(N_CATEGORIES)])

    # User 0 lives in cluster 0 (six training clicks); after training they click six cluster-1
    # items: cluster 1 goes from unrelated to as strong as the home cluster.
    before = mean_score_per_cluster(session(0, [], after))
    switched = mean_score_per_cluster(session(0, [1, 4, 7, 10, 13, 16], after))
    assert before[1] < 0.1 * before[0]
    assert switched[1] > 0.8 * switched[0]
    # The same events at training time are already in the model: the trained vector is kept.
    old = session(0, [1, 4, 7, 10, 13, 16], time=int(log.timestamp.min()))
    np.testing.assert_array_equal(source.user_vectors(old)[0], source.user_factors_[0])


def test_fold_in_never_keeps_trained_vectors_and_skips_unknown_users() -> None:
    log, _ = clustered_log()
    source = ALSSource(ALSConfig(**{**vars(CONFIG), "fold_in": "never"})).fit(log)
    after = int(log.timestamp.max()) + 60
    np.testing.assert_array_equal(
        source.user_vectors(session(0, [1, 4, 7], after))[0], source.user_factors_[0]
    )
    out = source.retrieve(session(-1, [1, 4, 7], after), 4)
    assert (out.item_idx == PAD_ITEM).all() and np.isneginf(out.scores).all()


def test_fold_in_always_is_close_to_the_trained_vectors() -> None:
    log, _ = clustered_log()
    trained_only = ALSSource(CONFIG).fit(log)
    always = ALSSource(ALSConfig(**{**vars(CONFIG), "fold_in": "always"})).fit(log)
    users = UserBatch.from_interactions(log, np.arange(N_USERS), history_length=HISTORY)
    a, b = trained_only.user_vectors(users), always.user_vectors(users)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert np.median(cosine) > 0.95


def test_fold_in_is_batch_invariant(trained: tuple[ALSSource, Interactions]) -> None:
    source, log = trained
    after = int(log.timestamp.max()) + 60
    rows = [session(-1, [2, 5], after), session(3, [1, 4], after), session(7, [], after)]
    batch = UserBatch(
        np.concatenate([r.user_idx for r in rows]),
        np.concatenate([r.recent_items for r in rows]),
        np.concatenate([r.recent_times for r in rows]),
        np.concatenate([r.now for r in rows]),
    )
    together = source.user_vectors(batch)
    for i, row in enumerate(rows):
        np.testing.assert_allclose(source.user_vectors(row)[0], together[i], rtol=1e-5, atol=1e-6)


def test_score_agrees_with_retrieve_and_marks_missing_as_nan(
    trained: tuple[ALSSource, Interactions],
) -> None:
    source, log = trained
    users = UserBatch.from_interactions(log, np.array([0, 1, -1]), history_length=HISTORY)
    out = source.retrieve(users, 6)
    scores = source.score(users, out.item_idx)
    valid = out.item_idx != PAD_ITEM
    np.testing.assert_allclose(scores[valid], out.scores[valid], rtol=1e-5, atol=1e-5)
    assert np.isnan(scores[~valid]).all()  # padding items, and the unknown user's whole row
    assert np.isnan(scores[2]).all()
    with pytest.raises(DataError, match="item_idx has shape"):
        source.score(users, np.zeros((2, 3), np.int32))


def test_one_batch_is_folded_in_once_for_retrieval_and_scoring(
    trained: tuple[ALSSource, Interactions], monkeypatch: pytest.MonkeyPatch
) -> None:
    source, log = trained
    solves: list[int] = []
    real = source._compute_user_vectors
    monkeypatch.setattr(source, "_compute_user_vectors", lambda u: solves.append(len(u)) or real(u))
    users = UserBatch.from_interactions(log, np.array([0, 1]), history_length=HISTORY)
    out = source.retrieve(users, 4)
    source.score(users, out.item_idx)
    assert solves == [2]
    source.retrieve(session(0, [1, 4], 10**9), 4)  # a new batch is computed afresh
    assert solves == [2, 1]


def test_fitting_raises_no_blas_threadpool_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """implicit checks the BLAS thread pool once per process; make it check again here."""
    import implicit.utils

    monkeypatch.setattr(implicit.utils, "_checked_blas_config", False)
    log, _ = clustered_log()
    ALSSource(CONFIG).fit(log)  # filterwarnings=error: a RuntimeWarning would fail this test
    assert implicit.utils._checked_blas_config


def test_same_seed_same_model() -> None:
    log, _ = clustered_log()
    a, b = ALSSource(CONFIG).fit(log), ALSSource(CONFIG).fit(log)
    np.testing.assert_array_equal(a.item_factors_, b.item_factors_)
    np.testing.assert_array_equal(a.user_factors_, b.user_factors_)


def test_items_unknown_to_the_model_are_tolerated(trained: tuple[ALSSource, Interactions]) -> None:
    source, log = trained
    after = int(log.timestamp.max()) + 60
    # History with an item added after training (index N_ITEMS) and an exclude matrix as wide
    # as the extended catalogue.
    user = session(-1, [N_ITEMS, 1, 4], after)
    wide = sp.csr_matrix(([1.0, 1.0], ([0, 0], [7, N_ITEMS])), shape=(1, N_ITEMS + 1))
    out = source.retrieve(user, 5, exclude=wide)
    assert 7 not in out.item_idx and (out.item_idx < N_ITEMS).all()
    assert (cluster(out.item_idx[out.item_idx >= 0]) == 1).all()


def test_exclude_with_the_wrong_row_count_is_rejected(
    trained: tuple[ALSSource, Interactions],
) -> None:
    source, log = trained
    with pytest.raises(DataError, match="exclude has 2 rows"):
        source.retrieve(session(0, [], 0), 3, exclude=sp.csr_matrix((2, N_ITEMS)))


def test_fold_in_survives_save_and_load(
    trained: tuple[ALSSource, Interactions], tmp_path: Path
) -> None:
    source, log = trained
    source.save(tmp_path / "als")
    loaded = ALSSource.load(tmp_path / "als")
    after = int(log.timestamp.max()) + 60
    for user in (session(-1, [2, 5, 8], after), session(4, [0, 3], after)):
        np.testing.assert_allclose(
            loaded.user_vectors(user), source.user_vectors(user), rtol=1e-5, atol=1e-6
        )
    assert loaded.config == source.config and loaded.trained_until_ == source.trained_until_


def test_empty_log_is_rejected() -> None:
    log, _ = clustered_log()
    with pytest.raises(DataError, match="empty"):
        ALSSource(CONFIG).fit(log.before(0))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("factors", 0),
        ("num_threads", -1),
        ("alpha", 0.0),
        ("fold_in", "sometimes"),
        ("index", "fast"),
        ("index_min_items", 0),
        ("index_nlist", 0),
        ("index_nprobe", 0),
    ],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        ALSConfig(**{field: value})  # type: ignore[arg-type]


# ------------------------------------------------------------------ fold-in against implicit


def implicit_solve(config: ALSConfig, item_factors: np.ndarray, rows: sp.csr_matrix) -> np.ndarray:
    """implicit's own least-squares user solve (``recalculate_user``) of ``rows`` of weights."""
    model = als._solver(config)
    model.item_factors = item_factors
    model.user_factors = np.zeros((rows.shape[0], config.factors), np.float32)
    return model.recalculate_user(np.arange(rows.shape[0]), rows)


def assert_vectors_close(got: np.ndarray, expected: np.ndarray) -> None:
    # implicit solves in float32, this module in float64.
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_solve_matches_implicits_least_squares_with_dislikes_and_an_empty_row() -> None:
    rng = np.random.default_rng(3)
    config = ALSConfig(factors=6, regularization=0.05, alpha=3.0, num_threads=1)
    item_factors = rng.normal(0.0, 0.5, (50, 6)).astype(np.float32)
    # Weights in [-1, 3): some confidences negative (dislikes), some below 1; row 2 is empty.
    weights = sp.random(
        5, 50, density=0.2, format="csr", dtype=np.float32, rng=rng, data_rvs=rng.random
    )
    weights.data = weights.data * 4 - 1
    weights = sp.csr_matrix(weights.multiply(np.array([[1], [1], [0], [1], [1]])))
    weights.eliminate_zeros()
    coo = weights.tocoo()
    got, has = solve_users(
        als.item_gram(item_factors),
        item_factors,
        coo.row.astype(np.int64),
        coo.col.astype(np.int64),
        config.alpha * coo.data.astype(np.float64),
        config.regularization,
        5,
    )
    np.testing.assert_array_equal(has, [True, True, False, True, True])
    assert (got[2] == 0).all()
    assert_vectors_close(got, implicit_solve(config, item_factors, weights))


def test_fold_in_equals_implicits_recalculate_user(trained: tuple[ALSSource, Interactions]) -> None:
    source, log = trained
    after = int(log.timestamp.max()) + 60
    training_items = log.matrix[3].indices.tolist()
    # A known user with new events (one on an item of their training row, one twice), an
    # unknown user with a history (one item twice), and user 5 whose events are all trained.
    users = [
        session(3, [training_items[0], 1, 1], after),
        session(-1, [2, 5, 2], after),
        session(5, [0, 3], int(log.timestamp.min())),
    ]
    batch = UserBatch(
        np.concatenate([u.user_idx for u in users]),
        np.concatenate([u.recent_items for u in users]),
        np.concatenate([u.recent_times for u in users]),
        np.concatenate([u.now for u in users]),
    )
    rows = np.zeros((2, N_ITEMS), np.float32)
    rows[0] = log.matrix[3].toarray()[0]
    np.add.at(rows[0], [training_items[0], 1, 1], 1.0)
    np.add.at(rows[1], [2, 5, 2], 1.0)
    expected = implicit_solve(source.config, source.item_factors_, sp.csr_matrix(rows))
    got = source.user_vectors(batch)
    assert_vectors_close(got[:2], expected)
    np.testing.assert_array_equal(got[2], source.user_factors_[5])  # nothing new: trained vector


def test_fold_in_always_equals_implicit_on_the_training_rows() -> None:
    log, _ = clustered_log()
    source = ALSSource(ALSConfig(**{**vars(CONFIG), "fold_in": "always"})).fit(log)
    users = UserBatch.from_interactions(log, np.arange(N_USERS), history_length=HISTORY)
    expected = implicit_solve(source.config, source.item_factors_, log.matrix)
    assert_vectors_close(source.user_vectors(users), expected)


def test_blocked_solves_equal_one_block(
    trained: tuple[ALSSource, Interactions], monkeypatch: pytest.MonkeyPatch
) -> None:
    source, log = trained
    after = int(log.timestamp.max()) + 60
    histories = [[1, 4, 7, 10], [2], [0, 3, 6, 9, 12, 15, 18], [5, 8]]
    batch = UserBatch(
        np.array([0, -1, 2, -1], np.int32),
        np.concatenate([session(0, h, after).recent_items for h in histories]),
        np.concatenate([session(0, h, after).recent_times for h in histories]),
        np.full(4, after, np.int64),
    )
    one_block = source.user_vectors(batch)
    monkeypatch.setattr(als, "FOLD_IN_BLOCK_ELEMENTS", 1)  # every user a block of their own
    source._vectors_memo.clear()
    source._fold_in_cache = None
    np.testing.assert_allclose(source.user_vectors(batch), one_block, rtol=1e-6, atol=1e-7)


def test_the_gram_matrix_is_summed_once_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    log, _ = clustered_log()
    calls: list[int] = []
    real = als.item_gram

    def counted(factors: np.ndarray) -> np.ndarray:
        calls.append(1)
        return real(factors)

    monkeypatch.setattr(als, "item_gram", counted)
    source = ALSSource(CONFIG).fit(log)
    after = int(log.timestamp.max()) + 60
    source.user_vectors(session(-1, [1, 4], after))
    source.user_vectors(session(-1, [2, 5], after))
    assert len(calls) == 1
    source.fit(log)  # new factors, new Gram matrix
    source.user_vectors(session(-1, [1, 4], after))
    assert len(calls) == 2


def test_fold_ins_are_cached_by_the_events_they_read(monkeypatch: pytest.MonkeyPatch) -> None:
    log, _ = clustered_log()
    source = ALSSource(CONFIG).fit(log)
    after = int(log.timestamp.max()) + 60
    solved: list[int] = []
    real = als.solve_users

    def counted(*args: object) -> tuple[np.ndarray, np.ndarray]:
        solved.append(int(args[-1]))  # users solved in this call
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(als, "solve_users", counted)

    def vectors(user: int, items: list[int]) -> np.ndarray:
        source._vectors_memo.clear()  # only the cross-request cache may answer
        return source.user_vectors(session(user, items, after))[0]

    first = vectors(0, [1, 4, 7])
    assert solved == [1]
    np.testing.assert_array_equal(vectors(0, [1, 4, 7]), first)  # same events: no solve
    assert solved == [1]
    moved = vectors(0, [1, 4, 7, 10])  # one more event: solved again, and right
    assert solved == [1, 1]
    source._fold_in_cache = None
    np.testing.assert_array_equal(vectors(0, [1, 4, 7, 10]), moved)
    assert not np.array_equal(moved, first)
    vectors(-1, [1, 4])  # an unknown user has no model row: solved on every request
    vectors(-1, [1, 4])
    assert solved == [1, 1, 1, 1, 1]


def test_warm_folds_in_the_users_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    log, _ = clustered_log()
    source = ALSSource(CONFIG).fit(log)
    after = int(log.timestamp.max()) + 60
    histories = [[1, 4, 7], [2, 5], [0, 3, 6]]
    batch = UserBatch(
        np.arange(3, dtype=np.int32),
        np.concatenate([session(0, h, after).recent_items for h in histories]),
        np.concatenate([session(0, h, after).recent_times for h in histories]),
        np.full(3, after, np.int64),
    )
    expected = ALSSource(CONFIG).fit(log).user_vectors(batch)  # same seed, same model
    source.warm(batch)
    monkeypatch.setattr(als, "solve_users", None)  # any solve now would fail
    source._vectors_memo.clear()
    np.testing.assert_array_equal(source.user_vectors(batch), expected)


# ------------------------------------------------------------------ confidence transform


def test_confidence_transforms_keep_the_sign_of_dislikes() -> None:
    weights = np.array([0.0, 1.0, 3.0, -2.0, 1000.0], np.float32)

    np.testing.assert_allclose(
        als.confidence_weights(weights, "log"),
        [0.0, np.log(2), np.log(4), -np.log(3), np.log(1001)],
        rtol=1e-6,
    )
    np.testing.assert_array_equal(als.confidence_weights(weights, "binary"), [0, 1, 1, -1, 1])
    np.testing.assert_array_equal(als.confidence_weights(weights, "linear"), weights)


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_automatic_alpha_sets_the_mean_confidence_whatever_the_weight_scale(scale: float) -> None:
    log, _ = clustered_log()
    scaled = replace(log, weight=log.weight * np.float32(scale))
    config = ALSConfig(factors=4, iterations=2, num_threads=1, confidence="linear")

    source = ALSSource(config).fit(scaled)

    mean_confidence = source.alpha_ * float(source.user_items_.data.mean())
    assert mean_confidence == pytest.approx(config.mean_confidence, rel=1e-5)


def test_a_bundle_saved_before_the_transform_loads_with_raw_weights(tmp_path: Path) -> None:
    log, _ = clustered_log()
    source = ALSSource(ALSConfig(factors=4, iterations=2, num_threads=1)).fit(log)
    source.save(tmp_path / "als")
    state = tmp_path / "als" / "config.json"
    meta = json.loads(state.read_text())
    del meta["alpha"], meta["config"]["confidence"], meta["config"]["mean_confidence"]
    meta["config"]["alpha"] = 10.0
    state.write_text(json.dumps(meta))

    loaded = ALSSource.load(tmp_path / "als")

    assert loaded.config.confidence == "linear" and loaded.alpha_ == 10.0


def test_regularization_is_chosen_on_the_validation_window() -> None:
    log, _ = clustered_log()
    history = log.before(int(np.quantile(log.timestamp, 0.7)))
    config = ALSConfig(
        factors=4, iterations=3, num_threads=1, regularization_grid=(0.01, 1.0, 100.0)
    )

    source = ALSSource(config).fit(history, valid=log)  # the window: the last 30% of events

    assert set(source.validation_) <= {0.01, 1.0, 100.0} and 1.0 in source.validation_
    assert source.validation_[source.regularization_] == max(source.validation_.values())
    fixed = ALSSource(replace(config, regularization=0.5)).fit(history, valid=log)
    assert fixed.regularization_ == 0.5 and fixed.validation_ == {}


def test_refit_learns_the_longer_log_with_the_regularization_chosen_on_validation() -> None:
    log, _ = clustered_log()
    history = log.before(int(np.quantile(log.timestamp, 0.7)))
    config = ALSConfig(factors=4, iterations=3, num_threads=1, regularization_grid=(0.01, 100.0))
    validated = ALSSource(config).fit(history, valid=log)

    refitted = validated.refit(log)

    assert refitted.regularization_ == validated.regularization_
    assert refitted.validation_ == validated.validation_
    assert refitted.trained_until_ == int(log.timestamp.max()) > validated.trained_until_
    direct = ALSSource(replace(config, regularization=validated.regularization_)).fit(log)
    np.testing.assert_array_equal(refitted.item_factors_, direct.item_factors_)
