"""Tests of the ANN index layer: every kind against exact search, live updates, persistence."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.errors import BundleError, ConfigError, DataError
from retrieval.index import VectorIndex, ann_recall, exact_search, recall_at_k
from retrieval.index_config import IndexConfig, IndexKind

KINDS: tuple[IndexKind, ...] = ("flat", "ivf_flat", "ivf_fp16", "hnsw", "ivf_pq", "sq8")
N, DIM, CLUSTERS = 5000, 16, 50
# Generous search knobs (small data, cheap to over-probe); 6-bit PQ needs only 64 training
# points per sub-quantizer centroid set, so 5000 vectors train it without FAISS's warning.
SMALL = IndexConfig(
    nprobe=32, ef_search=128, pq_nbits=6, hnsw_m=16, train_sample=2500, num_threads=1
)


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    noise = rng.standard_normal((n, centers.shape[1])) / np.sqrt(centers.shape[1])
    return unit_rows(centers[rng.integers(0, centers.shape[0], n)] + noise)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors (N, DIM), ids (N,), queries (50, DIM)): clustered unit vectors, sparse ids."""
    rng = np.random.default_rng(0)
    centers = unit_rows(rng.standard_normal((CLUSTERS, DIM)))
    ids = np.arange(N, dtype=np.int64) * 7 + 3  # not positions: the mapping must be real
    return clustered(N, rng, centers), ids, clustered(50, rng, centers)


@pytest.fixture(scope="module")
def built(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, VectorIndex]:
    """One read-only-by-convention index per kind (tests that modify build their own)."""
    vectors, ids, _ = data
    return {kind: VectorIndex.build(replace(SMALL, kind=kind), vectors, ids) for kind in KINDS}


def fresh(kind: IndexKind, data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> VectorIndex:
    vectors, ids, _ = data
    return VectorIndex.build(replace(SMALL, kind=kind), vectors, ids)


def assert_valid_result(ids: np.ndarray, scores: np.ndarray, m: int, k: int) -> None:
    """The search contract: shapes, dtypes, padding at the end, order, no duplicates."""
    assert ids.shape == scores.shape == (m, k)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    valid = ids >= 0
    assert np.array_equal(valid, np.sort(valid, axis=1)[:, ::-1]), "padding must come last"
    assert np.all(np.isneginf(scores[~valid]))
    assert np.all(np.isfinite(scores[valid]))
    assert np.all(scores[:, 1:] <= scores[:, :-1]), "scores must not increase along a row"
    for row, mask in zip(ids, valid, strict=True):
        assert np.unique(row[mask]).size == mask.sum()


# ---------------------------------------------------------------------- config


def test_config_defaults_and_auto_sizes() -> None:
    config = IndexConfig()
    assert config.kind == "ivf_fp16" and config.num_threads is None
    assert config.resolved_nlist(1_000_000) == 4000  # 4 * sqrt(n)
    assert config.resolved_nlist(5000) == 128  # capped: 39 training points per centroid
    assert config.resolved_nlist(10) == 1
    assert replace(config, nlist=77).resolved_nlist(1_000_000) == 77
    assert config.resolved_pq_m(64) == 16
    assert config.resolved_pq_m(50) == 10  # largest divisor of 50 with >= 4 dims per code


def test_config_round_trips_through_a_dict() -> None:
    config = IndexConfig(kind="hnsw", nlist=10, num_threads=2)
    assert IndexConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"kind": "annoy"}, "kind"),
        ({"nprobe": 0}, "nprobe"),
        ({"nlist": -1}, "nlist"),
        ({"ef_search": True}, "ef_search"),
        ({"hnsw_m": 1}, "hnsw_m"),
        ({"pq_nbits": 17}, "pq_nbits"),
        ({"num_threads": 0}, "num_threads"),
        ({"train_sample": 2.5}, "train_sample"),
    ],
)
def test_config_rejects_bad_values(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        IndexConfig(**changes)  # type: ignore[arg-type]


def test_config_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="nprobes"):
        IndexConfig.from_dict({"nprobes": 4})


# ---------------------------------------------------------------------- search


@pytest.mark.parametrize("kind", KINDS)
def test_search_returns_the_contract_shapes(kind: str, built, data) -> None:
    _, ids, queries = data
    found, scores = built[kind].search(queries, 20)
    assert_valid_result(found, scores, queries.shape[0], 20)
    assert np.isin(found[found >= 0], ids).all()
    assert (found >= 0).all()  # 5000 items: every row is full
    index = built[kind]
    assert (index.kind, index.dim, len(index)) == (kind, DIM, N)


def test_compressed_kinds_are_smaller(built) -> None:
    size = {kind: index.serialized_bytes() for kind, index in built.items()}
    assert size["ivf_pq"] < size["sq8"] < size["ivf_fp16"] < size["ivf_flat"] < size["hnsw"]
    assert size["flat"] >= N * (4 * DIM + 8)  # float32 vectors + int64 ids


def test_half_precision_lists_find_what_float32_lists_find(built, data) -> None:
    _, _, queries = data
    found16, scores16 = built["ivf_fp16"].search(queries, 50)
    found32, scores32 = built["ivf_flat"].search(queries, 50)
    overlap = np.mean([len(set(a) & set(b)) / 50 for a, b in zip(found16, found32, strict=True)])
    assert overlap >= 0.98
    np.testing.assert_allclose(scores16[:, 0], scores32[:, 0], atol=2e-3)  # fp16: ~3 digits


def test_flat_equals_brute_force(built, data) -> None:
    vectors, ids, queries = data
    found, scores = built["flat"].search(queries, 10)
    dense = queries @ vectors.T
    expected = np.argsort(-dense, axis=1, kind="stable")[:, :10]
    assert np.array_equal(found, ids[expected])
    np.testing.assert_allclose(scores, np.take_along_axis(dense, expected, axis=1), rtol=1e-5)
    exact_ids, exact_scores = exact_search(vectors, ids, queries, 10)
    assert np.array_equal(exact_ids, found)
    np.testing.assert_allclose(exact_scores, scores, rtol=1e-5)


@pytest.mark.parametrize(
    ("kind", "floor"),
    [("ivf_flat", 0.9), ("ivf_fp16", 0.9), ("sq8", 0.9), ("hnsw", 0.9), ("ivf_pq", 0.5)],
)
def test_ann_recall_on_clustered_data(kind: str, floor: float, built, data) -> None:
    vectors, ids, queries = data
    recall = ann_recall(built[kind], vectors, ids, queries, 50)
    assert floor <= recall <= 1.0
    assert ann_recall(built["flat"], vectors, ids, queries, 50) == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_k_larger_than_the_index_pads(kind: str, built, data) -> None:
    _, _, queries = data
    found, scores = built[kind].search(queries[:3], N + 10, nprobe=10_000)
    assert_valid_result(found, scores, 3, N + 10)
    assert (found[:, N:] == -1).all()
    if kind == "flat":
        assert (found[:, :N] >= 0).all()


def test_tiny_index_pads_past_its_size() -> None:
    vectors = unit_rows(np.eye(3, 4) + 0.1)
    index = VectorIndex.build(IndexConfig(kind="ivf_flat"), vectors, np.array([10, 11, 12]))
    found, scores = index.search(vectors[:1], 5)
    assert found[0, 0] == 10 and sorted(found[0, 1:3]) == [11, 12]  # 11 and 12 tie
    assert found[0, 3:].tolist() == [-1, -1] and np.isneginf(scores[0, 3:]).all()


def test_hnsw_beam_narrower_than_k_still_returns_k(built, data) -> None:
    # FAISS alone returns ~ef_search results when ef_search < k; the index widens the beam.
    _, _, queries = data
    found, _ = built["hnsw"].search(queries, 300, ef_search=16)
    assert (found >= 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_a_request_is_a_batch_of_one(kind: str, built, data) -> None:
    _, _, queries = data
    alone = built[kind].search(queries[:1], 10)
    batched = built[kind].search(queries[:5], 10)
    assert np.array_equal(alone[0][0], batched[0][0])
    np.testing.assert_allclose(alone[1][0], batched[1][0], rtol=1e-6)


def test_empty_queries_and_empty_index(data) -> None:
    _, _, queries = data
    empty = VectorIndex.build(IndexConfig(kind="flat"), np.zeros((0, DIM), np.float32), [])
    found, scores = empty.search(queries[:2], 3)
    assert (found == -1).all() and np.isneginf(scores).all() and len(empty) == 0
    found, _ = empty.search(np.zeros((0, DIM), np.float32), 3)
    assert found.shape == (0, 3)


def test_ivf_builds_are_reproducible(data) -> None:
    vectors, ids, queries = data
    config = replace(SMALL, kind="ivf_flat", nlist=32, train_sample=2000, seed=5)
    first = VectorIndex.build(config, vectors, ids).search(queries, 10, nprobe=2)
    second = VectorIndex.build(config, vectors, ids).search(queries, 10, nprobe=2)
    assert np.array_equal(first[0], second[0])


def test_thread_setting_is_restored(data) -> None:
    vectors, ids, queries = data
    before = faiss.omp_get_max_threads()
    index = VectorIndex.build(IndexConfig(kind="flat", num_threads=1), vectors, ids)
    index.search(queries, 5)
    assert faiss.omp_get_max_threads() == before


# ---------------------------------------------------------------------- live updates


@pytest.mark.parametrize("kind", KINDS)
def test_added_item_is_found_by_its_own_vector(kind: IndexKind, data) -> None:
    index = fresh(kind, data)
    rng = np.random.default_rng(1)
    new = unit_rows(rng.standard_normal((3, DIM)))
    index.add(new, [100_000, 100_001, 100_002])
    assert len(index) == N + 3
    found, _ = index.search(new, 1)
    assert found[:, 0].tolist() == [100_000, 100_001, 100_002]


@pytest.mark.parametrize("kind", KINDS)
def test_add_replaces_an_existing_id(kind: IndexKind, data) -> None:
    vectors, ids, _ = data
    index = fresh(kind, data)
    moved = unit_rows(-vectors[:1])  # the opposite direction: far from the old vector
    index.add(moved, ids[:1])
    assert len(index) == N
    found, _ = index.search(moved, 1)
    assert found[0, 0] == ids[0]
    found, _ = index.search(vectors[:1], 50)
    assert ids[0] not in found[0]
    assert index.n_tombstones == (1 if kind == "hnsw" else 0)


@pytest.mark.parametrize("kind", KINDS)
def test_removed_items_are_never_returned(kind: IndexKind, data) -> None:
    vectors, ids, queries = data
    index = fresh(kind, data)
    top, _ = index.search(queries, 5)
    retired = np.unique(np.concatenate([top[:, 0], ids[:200]]))
    assert index.remove(np.concatenate([retired, [999_999_999]])) == retired.size
    assert len(index) == N - retired.size
    assert index.remove(retired) == 0  # idempotent
    found, _ = index.search(np.concatenate([queries, vectors[:200]]), 100)
    assert not np.isin(found, retired).any()
    assert (found[:, :90] >= 0).all()  # the removed are replaced, not left as holes


def test_hnsw_compact_drops_tombstones(data) -> None:
    vectors, ids, queries = data
    index = fresh("hnsw", data)
    retired = ids[::10]
    index.remove(retired)
    assert index.n_tombstones == retired.size
    index.compact()
    assert index.n_tombstones == 0 and len(index) == N - retired.size
    keep = ~np.isin(ids, retired)
    assert ann_recall(index, vectors[keep], ids[keep], queries, 50) >= 0.9
    found, _ = index.search(vectors[:50], 20)
    assert not np.isin(found, retired).any()


OPERATIONS = st.lists(
    st.tuples(st.sampled_from(["add", "remove"]), st.sets(st.integers(0, 39), max_size=8)),
    max_size=6,
)


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["flat", "ivf_flat", "hnsw"]), mapped=st.booleans(), operations=OPERATIONS
)
def test_live_updates_match_exact_search_over_the_live_set(
    kind: IndexKind, mapped: bool, operations: list[tuple[str, set[int]]]
) -> None:
    """Model-based: after any add/remove sequence, search == exact search over a plain dict,
    on an index in memory or memory-mapped from a file (changes in its overlay).

    ivf_flat probes every cell here (nprobe >= nlist) and hnsw searches a 20-node graph with a
    wide beam, which makes them exact too.
    """
    rng = np.random.default_rng(7)
    live = {item: unit_rows(rng.standard_normal((1, 8)))[0] for item in range(20)}
    items = np.array(sorted(live))
    config = IndexConfig(kind=kind, nlist=2, nprobe=2, hnsw_m=8, ef_search=64)
    index = VectorIndex.build(config, np.stack([live[i] for i in items]), items)
    if mapped:
        with tempfile.TemporaryDirectory() as directory:
            index.save(directory)
            index = VectorIndex.load(directory, mmap=True)
    for operation, chosen in operations:
        ids = np.array(sorted(chosen), dtype=np.int64)
        if operation == "add":
            vectors = unit_rows(rng.standard_normal((ids.size, 8)))
            index.add(vectors, ids)
            live.update(zip(ids.tolist(), vectors, strict=True))
        else:
            assert index.remove(ids) == len(chosen & live.keys())
            for item in chosen:
                live.pop(item, None)
    assert len(index) == len(live)
    queries = unit_rows(rng.standard_normal((4, 8)))
    found, _ = index.search(queries, 5)
    if live:
        items = np.array(sorted(live))
        expected, _ = exact_search(np.stack([live[i] for i in items]), items, queries, 5)
        assert np.array_equal(found, expected)
    else:
        assert (found == -1).all()


# ---------------------------------------------------------------------- persistence


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(kind: IndexKind, mmap: bool, data, tmp_path: Path) -> None:
    _, ids, queries = data
    index = fresh(kind, data)
    index.remove(ids[:10])  # hnsw tombstones must survive the round trip too
    index.save(tmp_path)
    loaded = VectorIndex.load(tmp_path, mmap=mmap)
    expected, got = index.search(queries, 30), loaded.search(queries, 30)
    assert np.array_equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert (loaded.config, len(loaded), loaded.read_only) == (index.config, len(index), mmap)
    # Mapped or not, the index takes live changes (a mapped one in its private overlay).
    loaded.add(queries[:1], [123_456])
    assert loaded.search(queries[:1], 1)[0][0, 0] == 123_456
    assert loaded.remove([123_456, int(ids[20])]) == 2
    assert len(loaded) == len(index) - 1
    assert not np.isin([123_456, ids[20]], loaded.search(queries, 60)[0]).any()
    if mmap:
        with pytest.raises(ConfigError, match="live changes"):
            loaded.save(tmp_path / "again")
        with pytest.raises(ConfigError, match="read-only"):
            loaded.compact()


def test_load_rejects_missing_or_foreign_files(data, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"index\.json"):
        VectorIndex.load(tmp_path)
    fresh("flat", data).save(tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(BundleError, match="format_version 99"):
        VectorIndex.load(tmp_path)


# ---------------------------------------------------------------------- bad input


def test_bad_inputs_raise_data_error_with_values(built, data) -> None:
    vectors, ids, queries = data
    index = built["flat"]
    with pytest.raises(DataError, match="3 dimensions, the index has 16"):
        index.search(np.zeros((2, 3), np.float32), 5)
    with pytest.raises(DataError, match=r"shape \(16,\).*reshape"):
        index.search(queries[0], 5)
    with pytest.raises(DataError, match="k must be a positive integer, got 0"):
        index.search(queries, 0)
    bad = vectors[:10].copy()
    bad[7, 2] = np.nan
    with pytest.raises(DataError, match="1 row.*first at row 7"):
        VectorIndex.build(IndexConfig(kind="flat"), bad, ids[:10])
    with pytest.raises(DataError, match="NaN"):
        index.search(bad, 5)
    with pytest.raises(DataError, match="9 ids for 10 vectors"):
        VectorIndex.build(IndexConfig(kind="flat"), vectors[:10], ids[:9])
    with pytest.raises(DataError, match=r"unique, \[3\] repeat"):
        VectorIndex.build(IndexConfig(kind="flat"), vectors[:2], [3, 3])
    with pytest.raises(DataError, match=">= 0"):
        VectorIndex.build(IndexConfig(kind="flat"), vectors[:2], [0, -1])
    with pytest.raises(DataError, match="dtype int64"):
        VectorIndex.build(IndexConfig(kind="flat"), np.ones((2, 4), np.int64), [0, 1])
    with pytest.raises(DataError, match="integers"):
        VectorIndex.build(IndexConfig(kind="flat"), vectors[:2], [0.0, 1.0])
    with pytest.raises(DataError, match="at least 100 training vectors, got 50"):
        VectorIndex.build(IndexConfig(kind="ivf_flat", nlist=100), vectors[:50], ids[:50])
    with pytest.raises(DataError, match="at least 64 training vectors, got 50"):
        VectorIndex.build(replace(SMALL, kind="ivf_pq", nlist=1), vectors[:50], ids[:50])
    with pytest.raises(DataError, match="3 dimensions, the index has 16"):
        fresh("ivf_flat", data).add(np.ones((1, 3), np.float32), [1])


# ---------------------------------------------------------------------- recall


def test_recall_at_k_known_answers() -> None:
    exact = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    approx = np.array([[4, 9, 1, -1], [6, 7, 8, -1]])
    # row 0: {1, 4} of 4; row 1: {6} of the 2 that exist
    assert recall_at_k(approx, exact) == pytest.approx((2 / 4 + 1 / 2) / 2)
    with pytest.raises(DataError, match="must be equal"):
        recall_at_k(approx[:, :3], exact)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda k: st.tuples(
            st.lists(st.permutations(range(12)), min_size=1, max_size=5),
            st.lists(st.permutations(range(12)), min_size=1, max_size=5),
            st.just(k),
        )
    )
)
def test_recall_at_k_matches_set_arithmetic(case: tuple[list, list, int]) -> None:
    first, second, k = case
    rows = min(len(first), len(second))
    approx = np.array([p[:k] for p in first[:rows]])
    exact = np.array([p[:k] for p in second[:rows]])
    expected = np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact, strict=True)])
    recall = recall_at_k(approx, exact)
    assert recall == pytest.approx(expected)
    assert 0.0 <= recall <= 1.0
    assert recall_at_k(exact, exact) == 1.0
