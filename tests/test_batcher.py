"""Dynamic batching: concurrent requests answered together, each answer to its own request."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from data.errors import ConfigError, DataError
from pipeline.artifacts import load_artifacts
from pipeline.factory import make_pipeline, online_state_for
from pipeline.funnel import BudgetConfig, Recommendation, RecommendRequest
from serving.batcher import PIPELINE_ERROR, RequestBatcher, RequestInputError


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


def test_a_failing_request_alone_gets_the_fallback_or_its_error() -> None:
    """A batch of one that raises: a degraded fallback answer (200 over HTTP); if the fallback
    fails too, the original error."""

    class Flaky:
        calls = 0
        fallback_works = True

        def recommend(self, requests: list[RecommendRequest]) -> list[Recommendation]:
            Flaky.calls += 1
            if Flaky.calls <= 2:
                raise RuntimeError("boom")
            return [Recommendation(r.user_id, [], [], [], "v") for r in requests]

        def fallback(self, requests: list[RecommendRequest], reason: str) -> list[Recommendation]:
            if not Flaky.fallback_works:
                raise RuntimeError("no fallback either")
            return [
                Recommendation(r.user_id, ["popular"], [0.0], [[]], "v", [reason]) for r in requests
            ]

    batcher = RequestBatcher(lambda: Flaky(), max_batch=1)  # type: ignore[arg-type, return-value]
    degraded = batcher.submit(RecommendRequest("a")).result(timeout=10)
    assert degraded.degraded == [PIPELINE_ERROR] and degraded.item_ids == ["popular"]
    Flaky.fallback_works = False
    failed: Future[Recommendation] = batcher.submit(RecommendRequest("b"))
    with pytest.raises(RuntimeError, match="boom"):
        failed.result(timeout=10)
    assert batcher.submit(RecommendRequest("c")).result(timeout=10).degraded == []
    batcher.close()


POISON = "poisoned-user"
GATE = "gate"


class PoisonablePipeline:
    """Answers each request with its own user id, unless the batch holds a ``POISON`` user: then
    it raises ``error`` or, without one, answers every request with a stage error, as the
    Pipeline does when a stage raises for the whole batch. A ``GATE`` request holds the
    dispatcher until ``release``, so that the requests submitted meanwhile form one batch."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.batches: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def recommend(self, requests: list[RecommendRequest]) -> list[Recommendation]:
        users = [r.user_id for r in requests]
        if users == [GATE]:
            self.entered.set()
            self.release.wait(timeout=10)
        else:
            self.batches.append(users)
        poisoned = any(u.startswith(POISON) for u in users)
        if poisoned and self.error is not None:
            raise self.error
        flags = ["ranking:error"] if poisoned else []
        return [Recommendation(u, [u], [1.0], [[]], "v", list(flags)) for u in users]

    def fallback(self, requests: list[RecommendRequest], reason: str) -> list[Recommendation]:
        return [Recommendation(r.user_id, [], [], [], "v", [reason]) for r in requests]


def submit_together(
    batcher: RequestBatcher, pipeline: PoisonablePipeline, users: list[str]
) -> list[Future[Recommendation]]:
    """Submit ``users`` while a gate request holds the dispatcher: they form one batch."""
    pipeline.entered.clear()
    pipeline.release.clear()
    gate = batcher.submit(RecommendRequest(GATE))
    assert pipeline.entered.wait(timeout=10)
    futures = [batcher.submit(RecommendRequest(u)) for u in users]
    pipeline.release.set()
    gate.result(timeout=10)
    for future in futures:
        future.exception(timeout=10)  # wait for the answer, whatever it is
    return futures


@pytest.mark.parametrize(
    ("error", "poisoned_outcome"),
    [
        (None, "ranking:error"),  # a stage failed for the batch: degraded alone, a 200
        (RuntimeError("bug"), PIPELINE_ERROR),  # the call raised: the fallback, a 200
        (DataError("bad input"), RequestInputError),  # its input's fault: a 422
        (UnicodeEncodeError("utf-8", "\udfff", 0, 1, "surrogates"), RequestInputError),
    ],
)
def test_one_failing_request_does_not_fail_its_batch(
    error: Exception | None, poisoned_outcome: object
) -> None:
    pipeline = PoisonablePipeline(error)
    batcher = RequestBatcher(lambda: pipeline, max_batch=8)  # type: ignore[arg-type, return-value]
    users = ["u0", "u1", POISON, "u2"]
    futures = submit_together(batcher, pipeline, users)
    batcher.close()
    # Together first, then each request alone.
    assert pipeline.batches == [users, *[[u] for u in users]]
    for user, future in zip(users, futures, strict=True):
        if user != POISON:
            answer = future.result()
            assert answer.item_ids == [user] and answer.degraded == []
        elif poisoned_outcome is RequestInputError:
            refused = future.exception()
            assert isinstance(refused, RequestInputError) and refused.cause is error
        else:
            assert future.result().degraded == [poisoned_outcome]


def test_a_batch_that_fails_for_everyone_pauses_the_retries_alone() -> None:
    """A fault that is no request's (every request fails alone too) is not retried alone again
    for isolation_pause_s: a degraded service does not also do each batch's work n times."""
    pipeline = PoisonablePipeline()
    now = [0.0]
    batcher = RequestBatcher(
        lambda: pipeline,  # type: ignore[arg-type, return-value]
        max_batch=8,
        isolation_pause_s=5.0,
        clock=lambda: now[0],
    )

    def together(users: list[str]) -> list[list[str]]:
        pipeline.batches.clear()
        answers = [f.result() for f in submit_together(batcher, pipeline, users)]
        assert [a.item_ids for a in answers] == [[u] for u in users]
        return [a.degraded for a in answers]

    everyone = [f"{POISON}-{i}" for i in range(3)]
    assert together(everyone) == [["ranking:error"]] * 3
    assert pipeline.batches == [everyone, *[[u] for u in everyone]]
    mixed = ["u0", POISON, "u1"]
    assert together(mixed) == [["ranking:error"]] * 3  # paused: the batch's answers as they are
    assert pipeline.batches == [mixed]
    now[0] = 6.0  # the pause is over
    assert together(mixed) == [[], ["ranking:error"], []]
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


def test_a_request_the_pipeline_cannot_answer_does_not_fail_its_batch(
    tiny_bundle: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real pipeline, past the HTTP edge: a lone surrogate in the exclusions (the id list
    cannot become a polars series) once failed every request batched with it; a re-ranker that
    raises for one user once degraded them all. Now each neighbour gets its answer alone."""
    artifacts = load_artifacts(tiny_bundle[1])
    state = online_state_for(artifacts)
    pipeline = make_pipeline(artifacts, state, enforce_budgets=False)
    users = state.user_ids()[:8]
    requests = [RecommendRequest(u, k=5, now=1_700_000_000) for u in users]
    alone = {r.user_id: pipeline.recommend([r])[0].item_ids for r in requests}
    surrogate = RecommendRequest(users[0], k=5, exclude_item_ids=("\udfff",), now=1_700_000_000)
    assert pipeline.reranker is not None
    rerank = pipeline.reranker.rerank

    def fails_for_one_user(*args: Any, **kwargs: Any) -> Any:
        if "poisoned-user" in kwargs["user_ids"]:
            raise RuntimeError("a rule fails on this user's data")
        return rerank(*args, **kwargs)

    monkeypatch.setattr(pipeline.reranker, "rerank", fails_for_one_user)
    poisoned = RecommendRequest("poisoned-user", k=5, now=1_700_000_000)
    gate = threading.Event()
    batcher = RequestBatcher(lambda: (gate.wait(timeout=10), pipeline)[1], max_batch=10)
    futures = [batcher.submit(r) for r in [*requests[:4], surrogate, poisoned, *requests[4:]]]
    gate.set()
    batcher.close()
    refused = futures[4].exception(timeout=60)
    assert isinstance(refused, RequestInputError) and isinstance(refused.cause, UnicodeError)
    assert futures[5].result().degraded == ["reranking:error"]
    for request, future in zip(requests, futures[:4] + futures[6:], strict=True):
        answer = future.result()
        assert answer.degraded == [] and answer.item_ids == alone[request.user_id]


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
