"""``POST /v1/feedback``: durable, idempotent events that the next recommendation sees."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from data.errors import DataError
from pipeline.feedback_log import FeedbackLogBusyError
from serving.deps import FeedbackLimiterDep, MetricsDep, ServiceDep
from serving.errors import error_response
from serving.schemas import LOG_SEQ_HEADER, ErrorOut, FeedbackIn, FeedbackOut

router = APIRouter(tags=["feedback"])

RETRY_AFTER_S = "1"


# A plain function: FastAPI runs it on its thread pool, as the log's commit (fsync) blocks.
@router.post(
    "/v1/feedback",
    status_code=202,
    response_model=FeedbackOut,
    responses={422: {"model": ErrorOut}, 429: {"model": ErrorOut}, 503: {"model": ErrorOut}},
)
def feedback(
    body: FeedbackIn,
    request: Request,
    response: Response,
    service: ServiceDep,
    metrics: MetricsDep,
    limiter: FeedbackLimiterDep,
) -> Any:
    if limiter is not None:
        # Charged per event: what a client costs (log rows, online state) grows with events.
        client = request.client.host if request.client is not None else "unknown"
        wait_s = limiter.take(client, len(body.events))
        if wait_s > 0:
            metrics.feedback_events.labels(result="rate_limited").inc(len(body.events))
            return error_response(
                429,
                f"too many feedback events from {client}: at most {limiter.rate_per_s:g} a "
                f"second, bursts of {limiter.burst:g}",
                headers={"Retry-After": limiter.retry_after(wait_s)},
            )
    try:
        events = [
            service.feedback.make_event(e.event_id, e.user_id, e.item_id, e.type, e.timestamp)
            for e in body.events
        ]
        result = service.record_feedback(events)
    except DataError as exc:
        metrics.feedback_events.labels(result="rejected").inc(len(body.events))
        return error_response(422, str(exc))
    except FeedbackLogBusyError as exc:
        # Nothing was acknowledged: the client re-sends the same events (idempotent on
        # event_id) after a second, by which time a restarted database is usually back.
        metrics.feedback_events.labels(result="unavailable").inc(len(body.events))
        return error_response(503, str(exc), headers={"Retry-After": RETRY_AFTER_S})
    metrics.feedback_events.labels(result="accepted").inc(result.accepted)
    metrics.feedback_events.labels(result="duplicate").inc(result.duplicates)
    response.headers[LOG_SEQ_HEADER] = str(result.last_seq)
    return FeedbackOut(accepted=result.accepted, duplicates=result.duplicates)
