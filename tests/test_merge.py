"""Candidate merging: quotas, dedup, provenance."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.errors import ConfigError
from retrieval.base import PAD_ITEM, Candidates
from retrieval.merge import ABSENT_RANK, merge_candidates


def cands(rows: list[list[int]]) -> Candidates:
    k = max(len(r) for r in rows)
    items = np.full((len(rows), k), PAD_ITEM, dtype=np.int32)
    scores = np.full((len(rows), k), -np.inf, dtype=np.float32)
    for i, row in enumerate(rows):
        items[i, : len(row)] = row
        scores[i, : len(row)] = np.arange(len(row), 0, -1)
    return Candidates(items, scores)


def test_known_answer_quotas_then_fill() -> None:
    results = {"a": cands([[1, 2, 3, 4]]), "b": cands([[2, 5, 6, 7]])}
    merged = merge_candidates(results, {"a": 2, "b": 2}, n_candidates=6)
    # a's quota: 1, 2; b's quota: 2 (dup), 5; then fill by rank round-robin: a3 (rank2), b6 (rank2),
    # a4 (rank3), b7 (rank3) -> only 6 slots
    assert merged.item_idx[0].tolist() == [1, 2, 5, 3, 6, 4]
    # provenance: item 2 came from a (rank 1, score 3) and b (rank 0, score 4)
    assert merged.source_ranks[0, 1].tolist() == [1, 0]
    assert merged.source_scores[0, 1].tolist() == [3.0, 4.0]
    assert merged.source_names(0, 1) == ["a", "b"]
    assert merged.source_ranks[0, 0].tolist() == [0, ABSENT_RANK]
    assert np.isnan(merged.source_scores[0, 0, 1])


def test_padding_when_sources_run_dry() -> None:
    merged = merge_candidates({"a": cands([[3], [PAD_ITEM]])}, {"a": 5}, n_candidates=4)
    assert merged.item_idx.tolist() == [[3, -1, -1, -1], [-1, -1, -1, -1]]


def test_unknown_quota_source_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nope"):
        merge_candidates({"a": cands([[1]])}, {"nope": 1}, n_candidates=2)


@st.composite
def source_results(draw: st.DrawFn) -> tuple[dict[str, Candidates], dict[str, int], int]:
    n_users = draw(st.integers(1, 5))
    n_sources = draw(st.integers(1, 4))
    results, quotas = {}, {}
    for s in range(n_sources):
        k = draw(st.integers(1, 8))
        rows = []
        for _ in range(n_users):
            row = draw(st.lists(st.integers(0, 15), max_size=k, unique=True))
            rows.append(row + [PAD_ITEM] * (k - len(row)))
        results[f"s{s}"] = cands(rows)
        quotas[f"s{s}"] = draw(st.integers(0, 8))
    return results, quotas, draw(st.integers(1, 20))


@settings(max_examples=200, deadline=None)
@given(source_results())
def test_merge_invariants(case: tuple[dict[str, Candidates], dict[str, int], int]) -> None:
    results, quotas, m = case
    merged = merge_candidates(results, quotas, m)
    for u in range(merged.item_idx.shape[0]):
        row = merged.item_idx[u]
        kept = row[row != PAD_ITEM].tolist()
        assert len(kept) == len(set(kept)), "duplicates"
        assert (row[len(kept) :] == PAD_ITEM).all(), "padding only at the end"
        union = set()
        for s, name in enumerate(merged.sources):
            items = results[name].item_idx[u]
            items = items[items != PAD_ITEM].tolist()
            union |= set(items)
            for pos, item in enumerate(kept):
                r = merged.source_ranks[u, pos, s]
                assert (r != ABSENT_RANK) == (item in items)
                if r != ABSENT_RANK:
                    assert items[r] == item
        assert set(kept) <= union
        assert len(kept) == min(m, len(union)), "fills every slot it can"
        # every source's quota of its own top items is honoured when room allows
        taken: set[int] = set()
        for name in merged.sources:
            items = results[name].item_idx[u]
            items = items[items != PAD_ITEM][: quotas[name]].tolist()
            taken |= set(items)
        if len(taken) <= m:
            assert taken <= set(kept)


def reference_merge(
    results: dict[str, Candidates], quotas: dict[str, int], m: int
) -> list[list[int]]:
    """The documented merge order, one user at a time in plain Python."""
    n_users = next(iter(results.values())).item_idx.shape[0]
    deepest = max(c.k for c in results.values())
    merged = []
    for u in range(n_users):
        rows = {name: results[name].item_idx[u].tolist() for name in quotas}
        quota_slots = [item for name in quotas for item in rows[name][: quotas[name]]]
        fill_slots = [
            rows[name][rank]
            for rank in range(deepest)
            for name in quotas
            if quotas[name] <= rank < len(rows[name])
        ]
        kept: list[int] = []
        for item in quota_slots + fill_slots:
            if item != PAD_ITEM and item not in kept:
                kept.append(item)
        merged.append(kept[:m])
    return merged


@settings(max_examples=200, deadline=None)
@given(source_results())
def test_merge_order_equals_the_reference(
    case: tuple[dict[str, Candidates], dict[str, int], int],
) -> None:
    results, quotas, m = case
    merged = merge_candidates(results, quotas, m)
    for u, expected in enumerate(reference_merge(results, quotas, m)):
        row = merged.item_idx[u]
        assert row[row != PAD_ITEM].tolist() == expected


def test_batch_invariance() -> None:
    rng = np.random.default_rng(0)
    results = {
        name: cands([rng.choice(50, 10, replace=False).tolist() for _ in range(6)])
        for name in "abc"
    }
    quotas = {"a": 4, "b": 3, "c": 3}
    full = merge_candidates(results, quotas, 12)
    for u in range(6):
        alone = merge_candidates(
            {k: Candidates(v.item_idx[u : u + 1], v.scores[u : u + 1]) for k, v in results.items()},
            quotas,
            12,
        )
        np.testing.assert_array_equal(alone.item_idx[0], full.item_idx[u])
        np.testing.assert_array_equal(alone.source_ranks[0], full.source_ranks[u])
