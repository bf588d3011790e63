"""Dynamic batching: concurrent requests answered together, each answer to its own request."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from data.errors import ConfigError
from pipeline.artifacts import load_artifacts
from pipeline.factory import make_pipeline, online_state_for
from pipeline.funnel import BudgetConfig, Recommendation, RecommendRequest
from serving.batcher import RequestBatcher


class RecordingPipeline:
    """Answers each request with its own user id; the first call waits until ``release``."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def recommend(self, requests: list[RecommendRequest]) -> list[Recommendation]:
        self.entered.set()
        self.release.wait(timeout=10)
        self.batches.append([r.user_id for r in requests])
        return [Recommendation(r.user_id, [r.user_id], [1.0], [[]], "v") for r in requests]


def test_requests_that_wait_are_answered_together_up_to_max_batch() -> None:
    pipeline = RecordingPipeline()
    batcher = RequestBatcher(lambda: pipeline, max_batch=3)  # type: ignore[arg-type, return-value]
    first = batcher.submit(RecommendRequest("u0"))
    assert pipeline.entered.wait(timeout=10)  # the dispatcher is busy with u0 ...
    waiting = [batcher.submit(RecommendRequest(f"u{i}")) for i in range(1, 6)]  # ... these queue
    pipeline.release.set()
    answers = [f.result(timeout=10) for f in [first, *waiting]]
    batcher.close()
    assert [a.item_ids for a in answers] == [[f"u{i}"] for i in range(6)]  # each its own answer
    assert pipeline.batches == [["u0"], ["u1", "u2", "u3"], ["u4", "u5"]]


def test_a_request_withdrawn_while_queued_is_not_computed() -> None:
    pipeline = RecordingPipeline()
    batcher = RequestBatcher(lambda: pipeline, max_batch=4)  # type: ignore[arg-type, return-value]
    running = batcher.submit(RecommendRequest("u0"))
    assert pipeline.entered.wait(timeout=10)
    withdrawn = batcher.submit(RecommendRequest("gone"))
    kept = batcher.submit(RecommendRequest("u1"))
    assert withdrawn.cancel() and not running.cancel()  # a running request cannot be withdrawn
    pipeline.release.set()
    assert kept.result(timeout=10).item_ids == ["u1"] and running.result(timeout=10)
    batcher.close()
    assert pipeline.batches == [["u0"], ["u1"]]


def test_close_answers_what_is_queued_then_refuses() -> None:
    pipeline = RecordingPipeline()
    pipeline.release.set()
    batcher = RequestBatcher(lambda: pipeline, max_batch=2)  # type: ignore[arg-type, return-value]
    futures = [batcher.submit(RecommendRequest(f"u{i}")) for i in range(5)]
    batcher.close()
    assert all(f.done() for f in futures)
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(RecommendRequest("late"))


def test_a_failing_batch_fails_only_its_own_requests() -> None:
    class Flaky:
        calls = 0

        def recommend(self, requests: list[RecommendRequest]) -> list[Recommendation]:
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("boom")
            return [Recommendation(r.user_id, [], [], [], "v") for r in requests]

    batcher = RequestBatcher(lambda: Flaky(), max_batch=1)  # type: ignore[arg-type, return-value]
    failed: Future[Recommendation] = batcher.submit(RecommendRequest("a"))
    with pytest.raises(RuntimeError, match="boom"):
        failed.result(timeout=10)
    assert batcher.submit(RecommendRequest("b")).result(timeout=10).user_id == "b"
    batcher.close()


def test_batched_answers_equal_answers_alone(tiny_bundle: tuple[Path, Path]) -> None:
    artifacts = load_artifacts(tiny_bundle[1])
    state = online_state_for(artifacts)
    pipeline = make_pipeline(artifacts, state, enforce_budgets=False)
    users = state.user_ids()[:6] + ["someone-new"]
    requests = [RecommendRequest(u, k=5, now=1_700_000_000) for u in users]
    batcher = RequestBatcher(lambda: pipeline, max_batch=4)
    batched = [f.result(timeout=60) for f in [batcher.submit(r) for r in requests]]
    batcher.close()
    alone = [pipeline.recommend([r])[0] for r in requests]
    assert [a.item_ids for a in batched] == [a.item_ids for a in alone]


def test_budgets_grow_with_the_batch_but_less_than_the_requests() -> None:
    budgets = BudgetConfig(retrieval_ms=10, ranking_ms=20, reranking_ms=5, batch_growth=0.5)
    assert budgets.for_stage("retrieval") == 10
    assert budgets.for_stage("retrieval", 3) == 20  # 10 x (1 + 0.5 x 2)
    assert budgets.for_stage("ranking", 2) == 30
    assert BudgetConfig(batch_growth=0).for_stage("reranking", 8) == 5
    with pytest.raises(ConfigError, match="batch_growth"):
        BudgetConfig(batch_growth=1.5)


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        RequestBatcher(lambda: Any, max_batch=0)  # type: ignore[arg-type, return-value]
