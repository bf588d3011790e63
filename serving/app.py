"""The HTTP service (FastAPI): a thin shell over :class:`pipeline.service.RecommenderService`.

Settings come in through :class:`ServiceSettings` (environment ``RECSYS_*`` or arguments), never
read at import time; the bundle is loaded once in the lifespan and injected into the routes.
Contract: ``INTERFACE.md``. Bad input gets a 4xx JSON error; no input makes the service answer 5xx.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import polars as pl
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from data.errors import BundleError, DataError
from pipeline.feedback_log import FeedbackLog, FeedbackLogBusyError, FeedbackLogConfig
from pipeline.funnel import BudgetConfig, RecommendRequest
from pipeline.service import RecommenderService, UnknownItemError
from serving.batcher import RequestBatcher
from serving.explorer import explorer_router
from serving.schemas import (
    MAX_K,
    CatalogItemsIn,
    CatalogItemsOut,
    ErrorOut,
    FeedbackIn,
    FeedbackOut,
    HealthOut,
    ItemOut,
    RecommendIn,
    RecommendOut,
    ReloadIn,
    ReloadOut,
    SimilarOut,
    TimingsOut,
)

logger = logging.getLogger(__name__)


class ServiceSettings(BaseSettings):
    """Service configuration; every field can be set as ``RECSYS_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_")

    bundle: Path
    data: Path | None = None  # dataset directory whose train+valid splits seed user histories
    feedback_db: Path = Path("feedback.sqlite3")
    admin_token: str | None = None  # None disables /admin/* (403)
    # 1 MB holds 1000 feedback events with room to spare; anything larger is refused with 413.
    max_body_bytes: int = 1_000_000
    retrieval_budget_ms: float = 10.0
    ranking_budget_ms: float = 20.0
    reranking_budget_ms: float = 5.0
    # Stages on worker threads: the answer never waits past a budget, for 0.3-3.8 ms more a
    # request (pipeline/funnel.py); the default checks the deadlines on the batch's own thread.
    preemptive_budgets: bool = False
    # Concurrent recommend requests answered by one pipeline call at most (dynamic batching,
    # serving/batcher.py); 1 answers every request alone.
    max_batch: int = Field(default=8, ge=1, le=256)
    # A recommend request the pipeline has not answered within this time (queued behind an
    # overloaded or stuck batch) is answered with the popular fallback, "pipeline:timeout" in
    # `degraded`, and withdrawn from the queue. Default: two full batches at their budgets (the
    # one running, then the request's own): 315 ms with the default budgets and max_batch, far
    # above a loaded request's p99 (~25 ms on the 2-core reference machine).
    request_deadline_ms: float | None = Field(default=None, gt=0)

    def budgets(self) -> BudgetConfig:
        return BudgetConfig(
            retrieval_ms=self.retrieval_budget_ms,
            ranking_ms=self.ranking_budget_ms,
            reranking_ms=self.reranking_budget_ms,
            preemptive=self.preemptive_budgets,
        )

    def request_deadline_s(self) -> float:
        if self.request_deadline_ms is not None:
            return self.request_deadline_ms / 1000
        return 2 * self.budgets().for_call(self.max_batch) / 1000


class Metrics:
    """Prometheus metrics of one app instance (own registry: no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "recsys_http_requests", "HTTP requests", ["route", "status"], registry=self.registry
        )
        self.stage_latency = Histogram(
            "recsys_stage_latency_seconds",
            "Pipeline stage latency",
            ["stage"],
            # 0.5 ms .. 1 s: the budgets sit at 5-20 ms, so resolution is concentrated there.
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.degraded = Counter(
            "recsys_degraded_responses",
            "Responses with a degraded stage",
            ["stage"],
            registry=self.registry,
        )
        self.feedback_events = Counter(
            "recsys_feedback_events", "Feedback events", ["result"], registry=self.registry
        )
        self.feedback_lag = Gauge(
            "recsys_feedback_lag_seconds",
            "Seconds since the newest accepted event",
            registry=self.registry,
        )


class BodySizeLimit:
    """Refuse request bodies over ``limit`` bytes with 413, by header or while streaming."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _too_large(send, self.limit)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLargeError(self.limit)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BodyTooLargeError:
            # Only reached when the body was read outside FastAPI's request parsing.
            await _too_large(send, self.limit)


class RequestCounter:
    """Count every answered request by route and status (a plain ASGI middleware: Starlette's
    ``@app.middleware("http")`` wraps each request in extra tasks and streams, ~0.5 ms apiece)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the server answers if the app raises before starting a response

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            # The router puts the matched route into the (shared) scope on the way in.
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route=path, status=str(status)).inc()


class BodyTooLargeError(StarletteHTTPException):
    """A streamed body (no Content-Length) went past the limit.

    An HTTPException because FastAPI's body parsing turns any other exception raised while it
    reads the body into a 400 "error parsing the body"; this one it re-raises, and the app's
    handler answers 413 like the Content-Length path.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail="request body too large")
        self.limit = limit


def _too_large_error(limit: int) -> ErrorOut:
    return ErrorOut(error="request body too large", detail={"max_bytes": limit})


async def _too_large(send: Send, limit: int) -> None:
    body = _too_large_error(limit).model_dump_json()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})


def freeze_long_lived_objects(*, collect: bool) -> None:
    """Take every object alive now out of the cycle collector's walks (``gc.freeze``).

    A loaded bundle is long-lived: ~220k tracked objects for the 1M-item load bundle, which a full
    collection walks in ~100-150 ms with the GIL held, a stall for every request in flight. Frozen,
    they are skipped (a full collection then took 0.0 ms); reference counting still frees them
    when a reload drops the bundle (which leaves 2 objects in cycles behind). ``collect`` first
    clears today's garbage: start-up only, as it is the 100 ms stall that this avoids later.
    """
    if collect:
        gc.collect()
    gc.freeze()


def create_app(settings: ServiceSettings) -> FastAPI:
    """Build the app; the bundle is loaded when the lifespan starts (``/readyz`` says when)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        feedback = FeedbackLog(FeedbackLogConfig(path=settings.feedback_db))
        service = await run_in_threadpool(
            RecommenderService,
            settings.bundle,
            feedback,
            history=settings.data,
            budgets=settings.budgets(),
        )
        app.state.service = service
        app.state.batcher = RequestBatcher(lambda: service.pipeline, max_batch=settings.max_batch)
        freeze_long_lived_objects(collect=True)
        logger.info("serving bundle %s (%s)", settings.bundle, service.pipeline.model_version)
        try:
            yield
        finally:
            app.state.batcher.close()
            service.close()
            gc.unfreeze()  # the process may go on (tests, an embedding program)

    app = FastAPI(
        title="recsys-funnel",
        description="Multi-stage recommender: retrieval -> ranking -> re-ranking, with budgets.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestCounter, metrics=metrics)  # outermost: it counts 413s too

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"error": "invalid request", "detail": detail})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Framework-raised errors (unknown route 404, 405, undecodable body 400) get the same
        # {"error": ...} shape as ours; Starlette's default would answer {"detail": ...}.
        error = (
            _too_large_error(exc.limit)
            if isinstance(exc, BodyTooLargeError)
            else ErrorOut(error=str(exc.detail))
        )
        return JSONResponse(
            status_code=exc.status_code,
            content=error.model_dump(exclude_none=True),
            headers=exc.headers,
        )

    app.include_router(_api_router(settings, metrics))
    app.include_router(explorer_router())
    return app


def _admin_refusal(settings: ServiceSettings, authorization: str | None) -> JSONResponse | None:
    """The answer to an admin request without a valid bearer token (None: it may proceed)."""
    if settings.admin_token is None:
        return JSONResponse(status_code=403, content={"error": "admin endpoints are disabled"})
    token = (authorization or "").removeprefix("Bearer ").strip()
    if not authorization or not hmac.compare_digest(token, settings.admin_token):
        return JSONResponse(
            status_code=401,
            content={"error": "missing or invalid bearer token"},
            headers={"WWW-Authenticate": "Bearer"},
        )
    return None


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (several workers): settings from ``RECSYS_*``."""
    return create_app(ServiceSettings())  # type: ignore[call-arg]  # filled from the environment


# The dependencies are coroutines although they do no I/O: FastAPI runs a plain-function
# dependency on its thread pool, a thread handoff (~0.1-1 ms under load) on every request.
async def _service(request: Request) -> RecommenderService:
    service: RecommenderService = request.app.state.service
    return service


ServiceDep = Annotated[RecommenderService, Depends(_service)]


async def _batcher(request: Request) -> RequestBatcher:
    batcher: RequestBatcher = request.app.state.batcher
    return batcher


BatcherDep = Annotated[RequestBatcher, Depends(_batcher)]


def _api_router(settings: ServiceSettings, metrics: Metrics) -> APIRouter:
    router = APIRouter()
    errors: dict[int | str, dict[str, Any]] = {422: {"model": ErrorOut}}
    deadline_s = settings.request_deadline_s()

    @router.post("/v1/recommend", response_model=RecommendOut, responses=errors)
    async def recommend(
        body: RecommendIn, batcher: BatcherDep, service: ServiceDep
    ) -> RecommendOut:
        # Answered on the batcher's thread, together with whatever requests arrived meanwhile;
        # the event loop only waits (no worker thread per request).
        request = RecommendRequest(
            user_id=body.user_id,
            k=body.k,
            exclude_item_ids=tuple(body.exclude_item_ids),
            explain=body.explain,
        )
        pending = asyncio.wrap_future(batcher.submit(request))
        try:
            answer = await asyncio.wait_for(pending, deadline_s)
        except TimeoutError:  # the wait's cancellation withdrew the request if still queued
            answer = service.pipeline.fallback([request], "pipeline:timeout")[0]
        else:  # a shed request ran no stage: its zeros would flatter the latency histograms
            for stage in ("retrieval", "ranking", "reranking"):
                metrics.stage_latency.labels(stage=stage).observe(
                    answer.timings_ms.get(stage, 0.0) / 1000
                )
        for flag in answer.degraded:
            metrics.degraded.labels(stage=flag.split(":")[0]).inc()
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

    @router.post("/v1/feedback", status_code=202, response_model=FeedbackOut, responses=errors)
    def feedback(body: FeedbackIn, service: ServiceDep) -> Any:
        try:
            events = [
                service.feedback.make_event(e.event_id, e.user_id, e.item_id, e.type, e.timestamp)
                for e in body.events
            ]
            result = service.record_feedback(events)
        except DataError as exc:
            metrics.feedback_events.labels(result="rejected").inc(len(body.events))
            return JSONResponse(status_code=422, content={"error": str(exc)})
        except FeedbackLogBusyError as exc:
            return JSONResponse(status_code=503, content={"error": str(exc)})
        metrics.feedback_events.labels(result="accepted").inc(result.accepted)
        metrics.feedback_events.labels(result="duplicate").inc(result.duplicates)
        return FeedbackOut(accepted=result.accepted, duplicates=result.duplicates)

    @router.get(
        "/v1/items/{item_id}/similar",
        response_model=SimilarOut,
        responses={404: {"model": ErrorOut}},
    )
    def similar(
        item_id: str,
        service: ServiceDep,
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
    ) -> Any:
        try:
            found = service.similar_items(item_id, k)
        except UnknownItemError as exc:
            return JSONResponse(status_code=404, content={"error": str(exc)})
        return SimilarOut(
            item_id=item_id,
            items=[
                ItemOut(item_id=s.item_id, score=s.score, rank=r + 1, sources=[s.source])
                for r, s in enumerate(found)
            ],
        )

    @router.get("/healthz", response_model=HealthOut)
    def healthz() -> HealthOut:
        return HealthOut(status="ok")

    @router.get("/readyz", response_model=HealthOut, responses={503: {"model": HealthOut}})
    def readyz(request: Request) -> Any:
        service = getattr(request.app.state, "service", None)
        if service is None:
            return JSONResponse(status_code=503, content={"status": "loading"})
        return HealthOut(status="ok", model_version=service.pipeline.model_version)

    @router.get("/metrics", response_class=PlainTextResponse)
    def prometheus(service: ServiceDep) -> Response:
        metrics.feedback_lag.set(service.feedback_lag_seconds())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.post(
        "/admin/reload",
        response_model=ReloadOut,
        responses={401: {"model": ErrorOut}, 403: {"model": ErrorOut}, 409: {"model": ErrorOut}},
    )
    def reload(
        body: ReloadIn,
        service: ServiceDep,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Any:
        refused = _admin_refusal(settings, authorization)
        if refused is not None:
            return refused
        started = time.perf_counter()
        try:
            new, old = service.reload(body.bundle)
        except (BundleError, DataError) as exc:
            logger.error(
                "refused bundle %s: %s (still serving %s)",
                body.bundle,
                exc,
                service.pipeline.model_version,
            )
            return JSONResponse(status_code=409, content={"error": f"bundle refused: {exc}"})
        freeze_long_lived_objects(collect=False)  # no 100 ms collection while serving
        logger.info("reload took %.1f s", time.perf_counter() - started)
        return ReloadOut(model_version=new, previous_model_version=old)

    @router.post(
        "/admin/items",
        response_model=CatalogItemsOut,
        responses={
            401: {"model": ErrorOut},
            403: {"model": ErrorOut},
            422: {"model": ErrorOut},
        },
    )
    def add_items(
        body: CatalogItemsIn,
        service: ServiceDep,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Any:
        """Serve new (or changed) items from the next request on, without a retrain: embedded
        by the item tower into the live index. Not kept across a reload or restart."""
        refused = _admin_refusal(settings, authorization)
        if refused is not None:
            return refused
        frame = pl.DataFrame(
            [item.model_dump() for item in body.items],
            schema={
                "item_id": pl.String,
                "categories": pl.List(pl.String),
                "created_at": pl.Int64,
            },
        )
        try:
            change = service.add_items(frame)
        except DataError as exc:
            return JSONResponse(status_code=422, content={"error": str(exc)})
        return CatalogItemsOut(
            added=change.added, updated=change.updated, sources=list(change.sources)
        )

    return router
