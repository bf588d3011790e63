"""BlendRanker: the simplex grid, weights recovered from labels, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.errors import DataError
from ranking.blend import BlendConfig, BlendRanker, simplex_grid
from ranking.training_set import TrainingSet

NAMES = ("item_pop", "als_score_z", "item_knn_score_z")


def training_set(values: np.ndarray, labels: np.ndarray, group_size: int) -> TrainingSet:
    n = values.shape[0]
    groups = np.full(n // group_size, group_size, dtype=np.int64)
    return TrainingSet(
        values=values.astype(np.float32),
        labels=labels.astype(np.float32),
        groups=groups,
        weights=np.ones(n, np.float32),
        names=NAMES,
        group_users=np.arange(groups.size, dtype=np.int32),
        item_idx=np.arange(n, dtype=np.int32),
        retrieved=np.ones(n, bool),
        cut=0,
    )


@given(st.integers(1, 4), st.sampled_from([0.5, 0.25, 0.1]))
@settings(max_examples=20, deadline=None)
def test_simplex_grid_rows_are_non_negative_and_sum_to_one(n: int, step: float) -> None:
    grid = simplex_grid(n, step)

    assert grid.shape[1] == n and np.all(grid >= 0)
    np.testing.assert_allclose(grid.sum(axis=1), 1.0)
    assert len({tuple(row) for row in grid}) == grid.shape[0]


def test_the_weights_follow_the_score_that_predicts_the_labels() -> None:
    rng = np.random.default_rng(0)
    n_groups, size = 200, 20
    values = rng.normal(size=(n_groups * size, 3))
    # In every group the positive is the row with the highest kNN z-score; ALS is noise.
    labels = np.zeros(n_groups * size)
    best = values[:, 2].reshape(n_groups, size).argmax(axis=1) + np.arange(n_groups) * size
    labels[best] = 1.0
    ranker = BlendRanker(BlendConfig(step=0.25)).fit(training_set(values, labels, size))

    assert ranker.weights_ == {"als_score_z": 0.0, "item_knn_score_z": 1.0}
    assert ranker.train_ndcg_ == pytest.approx(1.0)
    scores = ranker.predict(values[:size])
    assert scores.argmax() == values[:size, 2].argmax()


def test_a_missing_score_counts_as_far_below_the_users_mean(tmp_path: Path) -> None:
    values = np.array([[0.0, np.nan, 1.0], [0.0, 0.5, 0.5]])
    ranker = BlendRanker(BlendConfig(step=0.5, missing_z=-3.0))
    ranker.feature_names_ = NAMES
    ranker.weights_ = {"als_score_z": 0.5, "item_knn_score_z": 0.5}
    ranker.train_ndcg_ = 0.0

    np.testing.assert_allclose(ranker.predict(values), [(-3.0 + 1.0) / 2, 0.5])
    ranker.save(tmp_path / "blend")
    loaded = BlendRanker.load(tmp_path / "blend")
    np.testing.assert_array_equal(loaded.predict(values), ranker.predict(values))


def test_a_set_without_standardised_scores_is_refused() -> None:
    values = np.zeros((4, 3))
    data = training_set(values, np.array([1, 0, 1, 0]), 2)
    data = TrainingSet(**{**data.__dict__, "names": ("a", "b", "c")})

    with pytest.raises(DataError, match="standardised"):
        BlendRanker().fit(data)
