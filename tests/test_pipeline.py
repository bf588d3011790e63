"""The Pipeline: one funnel pass per batch, budgets that degrade instead of failing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data.dataset import load_dataset
from data.errors import ConfigError
from data.interactions import Interactions
from pipeline.artifacts import Artifacts, load_artifacts
from pipeline.funnel import (
    BudgetConfig,
    Pipeline,
    RecommendRequest,
    _source_lists,
    top_k_minus_blocked,
)
from pipeline.online_state import OnlineState
from retrieval.merge import MergedCandidates


@pytest.fixture
def artifacts(tiny_bundle: tuple[Path, Path]) -> Artifacts:
    return load_artifacts(tiny_bundle[1])


@pytest.fixture
def state(tiny_bundle: tuple[Path, Path], artifacts: Artifacts) -> OnlineState:
    train = load_dataset(tiny_bundle[0]).splits["train"]
    log = Interactions.from_frame(train, users=artifacts.users, items=artifacts.items)
    return OnlineState.from_log(log, artifacts.users, artifacts.retrieval.config.history_length)


def users(artifacts: Artifacts, n: int) -> list[str]:
    return artifacts.users.ids.to_list()[:n]


def test_recommend_excludes_seen_and_requested_items(
    artifacts: Artifacts, state: OnlineState
) -> None:
    pipeline = Pipeline(artifacts, state, enforce_budgets=False)
    user = users(artifacts, 1)[0]
    first = pipeline.recommend([RecommendRequest(user, k=10, now=10**9)])[0]
    assert len(first.item_ids) == 10 and len(set(first.item_ids)) == 10
    seen_idx = state.batch([user], 0).recent_items[0]
    seen = set(artifacts.items.to_ids(seen_idx[seen_idx >= 0]).to_list())
    assert not seen & set(first.item_ids)
    assert all(first.sources), "every item says which source produced it"
    assert first.scores == sorted(first.scores, reverse=True)
    excluded = tuple(first.item_ids[:3])
    second = pipeline.recommend(
        [RecommendRequest(user, k=10, now=10**9, exclude_item_ids=excluded)]
    )[0]
    assert not set(excluded) & set(second.item_ids)
    assert second.degraded == [] and set(second.timings_ms) >= {
        "retrieval",
        "ranking",
        "reranking",
        "total",
    }


def test_batch_answers_equal_single_answers(artifacts: Artifacts, state: OnlineState) -> None:
    pipeline = Pipeline(artifacts, state, enforce_budgets=False)
    ids = [*users(artifacts, 4), "someone-new"]
    batch = pipeline.recommend([RecommendRequest(u, k=8, now=10**9) for u in ids])
    for u, answer in zip(ids, batch, strict=True):
        alone = pipeline.recommend([RecommendRequest(u, k=8, now=10**9)])[0]
        assert alone.item_ids == answer.item_ids


def test_unknown_user_gets_the_cold_start_path(artifacts: Artifacts, state: OnlineState) -> None:
    answer = Pipeline(artifacts, state, enforce_budgets=False).recommend(
        [RecommendRequest("never-seen", k=5, now=10**9)]
    )[0]
    assert len(answer.item_ids) == 5


class SlowRanker:
    """Answers correctly, ten times past a 20 ms ranking budget."""

    def warm(self) -> None:
        pass

    def score(self, retrieval: Any, users: Any, merged: Any, now: Any) -> np.ndarray:
        time.sleep(0.2)
        return np.zeros(merged.item_idx.shape, np.float32)


class BrokenRanker:
    def warm(self) -> None:
        pass

    def score(self, *args: Any) -> np.ndarray:
        raise RuntimeError("model file is garbage")


@pytest.mark.parametrize("preemptive", [False, True], ids=["cooperative", "preemptive"])
def test_slow_or_failing_stages_degrade(
    artifacts: Artifacts, state: OnlineState, monkeypatch: pytest.MonkeyPatch, preemptive: bool
) -> None:
    user = users(artifacts, 1)[0]
    request = [RecommendRequest(user, k=10, now=10**9)]
    budgets = BudgetConfig(retrieval_ms=50, ranking_ms=20, reranking_ms=20, preemptive=preemptive)
    slow = Pipeline(artifacts, state, ranker=SlowRanker(), budgets=budgets).recommend(request)[0]
    assert slow.degraded == ["ranking:timeout"] and len(slow.item_ids) == 10
    # Preemptive: the answer stops waiting at the budget. Cooperative: the late scores are
    # still replaced by the fallback (the retrieval order), after the stage returns.
    if preemptive:
        assert slow.timings_ms["ranking"] < 150
    else:
        assert slow.timings_ms["ranking"] >= 200
    broken = Pipeline(artifacts, state, ranker=BrokenRanker(), budgets=budgets).recommend(request)[
        0
    ]
    assert broken.degraded == ["ranking:error"] and len(broken.item_ids) == 10

    def failing_retrieve(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("index shard unreachable")

    monkeypatch.setattr(artifacts.retrieval, "retrieve", failing_retrieve)
    fallback = Pipeline(artifacts, state, budgets=budgets).recommend(request)[0]
    assert fallback.degraded == ["retrieval:error"]
    assert len(fallback.item_ids) == 10
    assert all(s == ["popular"] for s in fallback.sources)
    # The fallback's candidates keep every source's (empty) provenance, so the trained ranker
    # still ranks them: only retrieval degrades.
    assert artifacts.ranking is not None
    ranked = Pipeline(artifacts, state, ranker=artifacts.ranking, budgets=budgets)
    answer = ranked.recommend(request)[0]
    assert answer.degraded == ["retrieval:error"] and len(answer.item_ids) == 10


@pytest.mark.parametrize("preemptive", [False, True], ids=["cooperative", "preemptive"])
def test_abandoned_retrieval_stops_before_its_next_source(
    artifacts: Artifacts, state: OnlineState, monkeypatch: pytest.MonkeyPatch, preemptive: bool
) -> None:
    sources = artifacts.retrieval.sources_
    first, *rest = sources
    slow, calls_after = sources[first], []

    def slow_retrieve(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.15)  # three times the budget
        return type(slow).retrieve(slow, *args, **kwargs)

    def recording(name: str) -> Callable[..., Any]:
        source = sources[name]

        def retrieve(*args: Any, **kwargs: Any) -> Any:
            calls_after.append(name)
            return type(source).retrieve(source, *args, **kwargs)

        return retrieve

    monkeypatch.setattr(slow, "retrieve", slow_retrieve)
    for name in rest:
        monkeypatch.setattr(sources[name], "retrieve", recording(name))
    budgets = BudgetConfig(retrieval_ms=50, preemptive=preemptive)
    pipeline = Pipeline(artifacts, state, budgets=budgets)
    answer = pipeline.recommend([RecommendRequest(users(artifacts, 1)[0], k=5, now=10**9)])[0]
    assert answer.degraded == ["retrieval:timeout"] and len(answer.item_ids) == 5
    time.sleep(0.3)  # the abandoned stage has long finished its slow source
    # The only later call is the fallback's own (popular), made by the request, not the stage.
    assert calls_after == ["popular"]


def test_top_k_minus_blocked_keeps_order() -> None:
    import scipy.sparse as sp

    items = np.array([[5, 3, 9, 1, -1]], dtype=np.int32)
    scores = np.array([[5, 4, 3, 2, -np.inf]], dtype=np.float32)
    blocked = sp.csr_matrix(([1.0], ([0], [3])), shape=(1, 10))
    out, out_scores = top_k_minus_blocked(items, scores, blocked, 3)
    assert out.tolist() == [[5, 9, 1]] and out_scores.tolist() == [[5, 3, 2]]


def test_source_lists_find_each_items_column_in_its_own_row() -> None:
    # Two users; item 7 is in both rows but retrieved by different sources; -1 pads row 1.
    ranks = np.full((2, 3, 2), -1, dtype=np.int32)
    ranks[0, 0] = [0, -1]  # row 0: item 7 from "a"
    ranks[0, 1] = [1, 0]  # row 0: item 3 from both
    ranks[1, 0] = [-1, 2]  # row 1: item 7 from "b"
    ranks[1, 1] = [0, -1]  # row 1: item 9 from "a"
    merged = MergedCandidates(
        item_idx=np.array([[7, 3, 5], [7, 9, -1]], dtype=np.int32),
        source_scores=np.zeros((2, 3, 2), dtype=np.float32),
        source_ranks=ranks,
        sources=("a", "b"),
    )
    rows = np.array([0, 0, 0, 1, 1, 1])
    chosen = np.array([3, 7, 5, 7, 9, 42], dtype=np.int32)  # 42: brought in by a rule (a pin)
    assert _source_lists(merged, rows, chosen) == [["a", "b"], ["a"], [], ["b"], ["a"], []]
    assert _source_lists(merged, rows[:0], chosen[:0]) == []


@pytest.mark.parametrize("preemptive", [False, True], ids=["cooperative", "preemptive"])
def test_stages_run_on_the_callers_thread_unless_preemptive(
    artifacts: Artifacts, state: OnlineState, preemptive: bool
) -> None:
    threads: list[int] = []

    class RecordingRanker:
        def warm(self) -> None:
            pass

        def score(self, retrieval: Any, users: Any, merged: Any, now: Any) -> np.ndarray:
            threads.append(threading.get_ident())
            return np.zeros(merged.item_idx.shape, np.float32)

    # Budgets enforced (the threads depend on it) but wide: this test is about where stages
    # run, and a cold first request on a busy machine can overrun the default 10 ms.
    budgets = BudgetConfig(
        retrieval_ms=5_000.0, ranking_ms=5_000.0, reranking_ms=5_000.0, preemptive=preemptive
    )
    pipeline = Pipeline(artifacts, state, ranker=RecordingRanker(), budgets=budgets)
    answer = pipeline.recommend([RecommendRequest(users(artifacts, 1)[0], k=5, now=10**9)])[0]
    pipeline.close()
    assert answer.degraded == [] and len(answer.item_ids) == 5
    assert (threads == [threading.get_ident()]) is not preemptive


def test_preemptive_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match="preemptive"):
        BudgetConfig(preemptive="yes")  # type: ignore[arg-type]


def test_the_fallback_answer_is_popular_items_minus_seen_and_excluded(
    artifacts: Artifacts, state: OnlineState
) -> None:
    pipeline = Pipeline(artifacts, state, enforce_budgets=False)
    user = users(artifacts, 1)[0]
    first = pipeline.fallback([RecommendRequest(user, k=6, now=10**9)], "pipeline:timeout")[0]
    excluded = first.item_ids[:2]
    request = RecommendRequest(user, k=6, now=10**9, exclude_item_ids=tuple(excluded))
    answer = pipeline.fallback([request], "pipeline:timeout")[0]
    assert answer.degraded == ["pipeline:timeout"] and len(answer.item_ids) == 6
    assert answer.item_ids[:4] == first.item_ids[2:]  # the same order, the excluded removed
    assert all(sources == ["popular"] for sources in answer.sources)
    seen = set(state.batch([user], 10**9).recent_items[0].tolist()) - {-1}
    assert not set(artifacts.items.index(answer.item_ids).tolist()) & seen
