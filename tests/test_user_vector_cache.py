"""The two-tower user-vector cache: content-keyed, so never stale, and equal to a fresh encode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.artifacts import load_artifacts
from pipeline.factory import make_pipeline, online_state_for
from retrieval.als import ALSSource
from retrieval.base import PAD_ITEM, UserBatch
from retrieval.two_tower.model import encode_users
from retrieval.two_tower.source import TwoTowerSource
from retrieval.user_cache import UserVectorCache, history_digest

HISTORIES = arrays(
    np.int32, st.tuples(st.integers(1, 6), st.integers(1, 8)), elements=st.integers(-1, 50)
)


@given(HISTORIES)
def test_equal_rows_have_equal_digests_whatever_the_integer_type(history: np.ndarray) -> None:
    digests = history_digest(history)
    np.testing.assert_array_equal(digests, history_digest(history.astype(np.int64)))
    np.testing.assert_array_equal(
        history_digest(np.concatenate([history, history])), np.tile(digests, 2)
    )


def test_digest_sees_every_slot_and_the_order() -> None:
    base = np.array([[3, 1, 4, 1, 5, PAD_ITEM]], dtype=np.int32)
    variants = [base]
    for slot in range(base.shape[1]):
        changed = base.copy()
        changed[0, slot] += 7
        variants.append(changed)
    variants.append(base[:, [1, 0, 2, 3, 4, 5]])  # two items swapped
    variants.append(np.zeros_like(base))
    digests = history_digest(np.concatenate(variants))
    assert np.unique(digests).size == len(variants)


def test_cache_hits_only_the_stored_history_of_a_known_user() -> None:
    cache = UserVectorCache(n_users=3, dim=2)
    users = np.array([0, 2, -1, 3])  # -1 and 3 are outside the model's user rows
    digests = np.array([11, 12, 13, 14], dtype=np.uint64)
    vectors = np.arange(8, dtype=np.float32).reshape(4, 2)

    _, hit = cache.lookup(users, digests)
    assert not hit.any()
    cache.store(users, digests, vectors)
    assert len(cache) == 2

    found, hit = cache.lookup(users, digests)
    np.testing.assert_array_equal(hit, [True, True, False, False])
    np.testing.assert_array_equal(found[:2], vectors[:2])
    np.testing.assert_array_equal(found[2:], 0)
    # the same user with another history (feedback arrived) misses
    _, hit = cache.lookup(np.array([0]), np.array([99], dtype=np.uint64))
    assert not hit.any()
    cache.clear()
    assert len(cache) == 0 and not cache.lookup(users, digests)[1].any()


@pytest.fixture(scope="module")
def two_tower(tiny_bundle: tuple[Path, Path]) -> tuple[TwoTowerSource, UserBatch]:
    artifacts = load_artifacts(tiny_bundle[1])
    state = online_state_for(artifacts)
    source = artifacts.retrieval.sources_["two_tower"]
    assert isinstance(source, TwoTowerSource)
    return source, state.batch(state.user_ids()[:40], 1_700_000_000)


def fresh_encode(source: TwoTowerSource, users: UserBatch) -> np.ndarray:
    history = users.recent_items[:, : source.config.history_length]
    return encode_users(source.model_, source.features_, users.user_idx, history, batch_size=64)


def test_cached_vectors_equal_a_fresh_forward_pass(
    two_tower: tuple[TwoTowerSource, UserBatch],
) -> None:
    source, users = two_tower
    first = source.user_vectors(users)
    np.testing.assert_array_equal(first, fresh_encode(source, users))
    # a new batch object (the per-batch memo cannot answer): served from the cache, same values
    again = UserBatch(users.user_idx, users.recent_items, users.recent_times, users.now)
    np.testing.assert_array_equal(source.user_vectors(again), first)


def test_a_changed_history_is_encoded_again(two_tower: tuple[TwoTowerSource, UserBatch]) -> None:
    source, users = two_tower
    source.user_vectors(users)  # cache every user's current history
    moved = users.recent_items.copy()
    moved[:, 1:] = moved[:, :-1]
    moved[:, 0] = (users.recent_items[:, 0] + 1) % source.n_items  # one new, different click
    after = UserBatch(users.user_idx, moved, users.recent_times, users.now)
    vectors = source.user_vectors(after)
    np.testing.assert_allclose(vectors, fresh_encode(source, after), rtol=0, atol=0)
    assert not np.allclose(vectors, source.user_vectors(users))


def test_pipeline_warm_caches_every_user_and_the_als_gram(tiny_bundle: tuple[Path, Path]) -> None:
    artifacts = load_artifacts(tiny_bundle[1])
    state = online_state_for(artifacts)
    pipeline = make_pipeline(artifacts, state, enforce_budgets=False)
    assert pipeline.warm(batch_size=50) == len(state)
    source = artifacts.retrieval.sources_["two_tower"]
    assert isinstance(source, TwoTowerSource)
    users = state.batch(state.user_ids(), 1_700_000_000)
    known = int(((users.user_idx >= 0) & (users.user_idx < source.features_.n_users)).sum())
    assert known > 0 and len(source._vector_cache()) == known
    als = artifacts.retrieval.sources_["als"]
    assert isinstance(als, ALSSource) and als._gram is not None  # no request sums it
