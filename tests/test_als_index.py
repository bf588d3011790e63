"""ALSSource through its approximate item index: known answers against exact scoring.

A 600-item model is indexed in 8 IVF cells; probing every cell must give exactly the dense
scoring's candidates (exclusions included), and probing one must not (the cells are real).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from data.idmap import IdMap
from data.interactions import Interactions
from retrieval.als import ALSConfig, ALSSource, build_item_index, lift_queries
from retrieval.base import PAD_ITEM, UserBatch
from retrieval.index import recall_at_k
from retrieval.index_config import IndexConfig
from tests.retrieval_contract import events_frame

N_USERS, N_ITEMS, N_GROUPS, HISTORY = 300, 600, 6, 8
EXACT = ALSConfig(factors=8, iterations=5, random_state=0, num_threads=1, index="exact")
ANN = ALSConfig(**{**vars(EXACT), "index": "ann", "index_nlist": 8, "index_nprobe": 8})


def grouped_log() -> Interactions:
    """Users in 6 groups clicking 12 items of their group (popular ones more often), plus two
    items each that cover the catalogue, so that every item has factors."""
    rng = np.random.default_rng(0)
    rows = []
    for user in range(N_USERS):
        own = np.arange(user % N_GROUPS, N_ITEMS, N_GROUPS)
        popularity = 1.0 / np.arange(1, own.size + 1)
        picks = rng.choice(own, size=12, replace=False, p=popularity / popularity.sum())
        for step, item in enumerate([*picks, 2 * user, 2 * user + 1]):
            rows.append((f"u{user:03d}", f"i{item:03d}", 1_000 + 20 * user + step, 1.0))
    frame = events_frame(rows)
    return Interactions.from_frame(
        frame, items=IdMap.from_ids([f"i{i:03d}" for i in range(N_ITEMS)])
    )


@pytest.fixture(scope="module")
def models() -> tuple[ALSSource, ALSSource, Interactions]:
    """(exact, indexed) sources fitted on the same log with the same seed: the same factors."""
    log = grouped_log()
    return ALSSource(EXACT).fit(log), ALSSource(ANN).fit(log), log


def everyone(log: Interactions) -> UserBatch:
    """Every training user, an unknown user with a history and one without."""
    known = UserBatch.from_interactions(log, np.arange(N_USERS), history_length=HISTORY)
    items = np.full((2, HISTORY), PAD_ITEM, np.int32)
    items[0, :3] = [0, 6, 12]
    times = np.where(items >= 0, int(log.timestamp.max()) + 60, 0).astype(np.int64)
    return UserBatch(
        np.concatenate([known.user_idx, [-1, -1]]).astype(np.int32),
        np.concatenate([known.recent_items, items]),
        np.concatenate([known.recent_times, times]),
        np.concatenate([known.now, known.now[:2]]),
    )


def test_probing_every_cell_gives_the_exact_candidates(
    models: tuple[ALSSource, ALSSource, Interactions],
) -> None:
    exact, indexed, log = models
    assert exact.index_ is None and indexed.index_ is not None
    np.testing.assert_array_equal(exact.item_factors_, indexed.item_factors_)
    users = everyone(log)
    expected, got = exact.retrieve(users, 25), indexed.retrieve(users, 25)
    np.testing.assert_array_equal(got.item_idx, expected.item_idx)
    np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-5, atol=1e-6)
    assert (got.item_idx[-1] == PAD_ITEM).all()  # no history, no vector: all padding
    assert (got.item_idx[:-1] != PAD_ITEM).all()
    # The cells are real: probing one of the eight misses part of the exact answer.
    one_cell, _ = indexed.index_.search(lift_queries(exact.user_vectors(users)[:-1]), 25, nprobe=1)
    assert recall_at_k(one_cell, expected.item_idx[:-1]) < 1.0


def test_exclusions_past_the_first_search_width(
    models: tuple[ALSSource, ALSSource, Interactions], monkeypatch: pytest.MonkeyPatch
) -> None:
    exact, indexed, log = models
    assert indexed.index_ is not None
    # Row 0 is an unknown user without a history: no vector, not searched, all padding.
    users = UserBatch.from_interactions(log, np.array([-1, 0, 1, 2]), history_length=HISTORY)
    k = 5
    depth = indexed.index_.refine_depth(k)  # k, or more where the index scores approximately
    top = exact.retrieve(users, depth + 20).item_idx
    # Row 1 excludes its best depth + 3 items: more than the first search (2 x depth) gets past.
    skipped = depth + 3
    pairs = [(1, item) for item in top[1, :skipped]] + [(2, top[2, 0]), (2, top[2, 3])]
    pairs += [(0, item) for item in range(20)]
    rows, items = zip(*pairs, strict=True)
    exclude = sp.csr_matrix((np.ones(len(pairs)), (rows, items)), shape=(4, N_ITEMS))
    widths: list[tuple[int, int]] = []
    search = indexed.index_.search

    def recorded(queries: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        widths.append((len(queries), width))
        return search(queries, width)

    monkeypatch.setattr(indexed.index_, "search", recorded)
    got = indexed.retrieve(users, k, exclude=exclude)
    # Only row 1 is searched again, as wide as it needs.
    assert widths == [(3, 2 * depth), (1, depth + skipped)]
    np.testing.assert_array_equal(got.item_idx, exact.retrieve(users, k, exclude=exclude).item_idx)
    np.testing.assert_array_equal(got.item_idx[1], top[1, skipped : skipped + k])
    assert (got.item_idx[0] == PAD_ITEM).all()


@pytest.mark.parametrize("mmap", [False, True])
def test_save_and_load_keep_the_index(
    models: tuple[ALSSource, ALSSource, Interactions], tmp_path: Path, mmap: bool
) -> None:
    _, indexed, log = models
    indexed.save(tmp_path / "als")
    loaded = ALSSource.load(tmp_path / "als", mmap=mmap)
    assert loaded.index_ is not None and loaded.index_.read_only == mmap
    assert len(loaded.index_) == N_ITEMS and loaded.config == indexed.config
    users = everyone(log)
    before, after = indexed.retrieve(users, 30), loaded.retrieve(users, 30)
    np.testing.assert_array_equal(after.item_idx, before.item_idx)
    np.testing.assert_array_equal(after.scores, before.scores)


def test_a_directory_without_an_index_loads_and_scores_exactly(
    models: tuple[ALSSource, ALSSource, Interactions], tmp_path: Path
) -> None:
    exact, indexed, log = models
    indexed.save(tmp_path / "als")
    exact.save(tmp_path / "als")  # an exact source saved over it takes the old index away
    assert not (tmp_path / "als" / "index").exists()
    indexed.save(tmp_path / "old")
    shutil.rmtree(tmp_path / "old" / "index")  # as saved before ALS had an index
    users = everyone(log)
    for directory in ("als", "old"):
        loaded = ALSSource.load(tmp_path / directory)
        assert loaded.index_ is None
        np.testing.assert_array_equal(
            loaded.retrieve(users, 10).item_idx, exact.retrieve(users, 10).item_idx
        )


@pytest.mark.parametrize(("min_items", "indexed"), [(N_ITEMS, True), (N_ITEMS + 1, False)])
def test_auto_indexes_catalogues_from_index_min_items(min_items: int, indexed: bool) -> None:
    config = ALSConfig(**{**vars(ANN), "index": "auto", "index_min_items": min_items})
    source = ALSSource(config).fit(grouped_log())
    assert (source.index_ is not None) == indexed


def test_the_lifted_index_ranks_by_inner_product_and_skips_zero_items() -> None:
    # Against query (1, 0): item 1 has the best cosine, item 3 the best inner product.
    factors = np.array([[0, 0], [1, 0], [0, 0], [3, 3], [2, -0.5]], np.float32)
    index = build_item_index(factors, IndexConfig(kind="flat"))
    assert index is not None and len(index) == 3  # the zero rows are not indexed
    ids, scores = index.search(lift_queries(np.array([[1, 0]], np.float32)), 5)
    np.testing.assert_array_equal(ids[0], [3, 4, 1, -1, -1])
    np.testing.assert_allclose(scores[0, :3], [3.0, 2.0, 1.0], rtol=1e-6)
    assert build_item_index(np.zeros((4, 2), np.float32), IndexConfig(kind="flat")) is None
