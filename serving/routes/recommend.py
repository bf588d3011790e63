"""``POST /v1/recommend``: one user's top-k, answered in a batch with concurrent requests."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from data.errors import DataError
from pipeline.funnel import Recommendation, RecommendRequest
from serving.batcher import RequestInputError
from serving.deps import BatcherDep, MetricsDep, ServiceDep, SettingsDep
from serving.errors import error_response
from serving.schemas import (
    LOG_SEQ_HEADER,
    WORKER_HEADER,
    ErrorOut,
    ItemOut,
    RecommendIn,
    RecommendOut,
    TimingsOut,
)

router = APIRouter(tags=["recommend"])


@router.post("/v1/recommend", response_model=RecommendOut, responses={422: {"model": ErrorOut}})
async def recommend(
    body: RecommendIn,
    response: Response,
    batcher: BatcherDep,
    service: ServiceDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> Any:
    # Answered on the batcher's thread, together with whatever requests arrived meanwhile; the
    # event loop only waits (no worker thread per request).
    request = RecommendRequest(
        user_id=body.user_id,
        k=body.k,
        exclude_item_ids=tuple(body.exclude_item_ids),
        explain=body.explain,
    )
    # Read before the pipeline runs: the answer reflects at least this much of the log.
    response.headers[LOG_SEQ_HEADER] = str(service.applied_seq)
    response.headers[WORKER_HEADER] = str(os.getpid())
    pending = asyncio.wrap_future(batcher.submit(request))
    try:
        answer = await asyncio.wait_for(pending, settings.request_deadline_s())
    except TimeoutError:  # the wait's cancellation withdrew the request if still queued
        answer = service.pipeline.fallback([request], "pipeline:timeout")[0]
    except RequestInputError as exc:
        return _refused(exc)
    # A fallback answer ran no stage: its zeros would flatter the latency histograms.
    if not any(flag.startswith("pipeline:") for flag in answer.degraded):
        for stage in ("retrieval", "ranking", "reranking"):
            metrics.stage_latency.labels(stage=stage).observe(
                answer.timings_ms.get(stage, 0.0) / 1000
            )
    for flag in answer.degraded:
        metrics.degraded.labels(stage=flag.split(":")[0]).inc()
    return _response(answer)


def _refused(exc: RequestInputError) -> JSONResponse:
    """422 for a request the pipeline could not answer because of its input (serving/batcher.py).

    A ``DataError``'s message is written for the client; any other error only by its type."""
    reason = str(exc.cause) if isinstance(exc.cause, DataError) else type(exc.cause).__name__
    return error_response(422, f"the request cannot be answered: {reason}")


def _response(answer: Recommendation) -> RecommendOut:
    return RecommendOut(
        user_id=answer.user_id,
        items=[
            ItemOut(item_id=i, score=s, rank=r + 1, sources=src)
            for r, (i, s, src) in enumerate(
                zip(answer.item_ids, answer.scores, answer.sources, strict=True)
            )
        ],
        model_version=answer.model_version,
        degraded=answer.degraded,
        timings_ms=TimingsOut(
            **{k: answer.timings_ms.get(k, 0.0) for k in TimingsOut.model_fields}
        ),
        explanation=answer.explanation,
    )
