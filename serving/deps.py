"""What the routes are given (FastAPI dependencies): everything lives on ``app.state``, set up
once by the app factory and its lifespan (``serving/app.py``), never at import time."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from pipeline.service import RecommenderService
from serving.batcher import RequestBatcher
from serving.limits import ClientRateLimiter
from serving.metrics import Metrics
from serving.settings import ServiceSettings


# The dependencies are coroutines although they do no I/O: FastAPI runs a plain-function
# dependency on its thread pool, a thread handoff (~0.1-1 ms under load) on every request.
async def _service(request: Request) -> RecommenderService:
    service: RecommenderService = request.app.state.service
    return service


async def _batcher(request: Request) -> RequestBatcher:
    batcher: RequestBatcher = request.app.state.batcher
    return batcher


async def _settings(request: Request) -> ServiceSettings:
    settings: ServiceSettings = request.app.state.settings
    return settings


async def _metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def _feedback_limiter(request: Request) -> ClientRateLimiter | None:
    limiter: ClientRateLimiter | None = request.app.state.feedback_limiter
    return limiter


ServiceDep = Annotated[RecommenderService, Depends(_service)]
BatcherDep = Annotated[RequestBatcher, Depends(_batcher)]
SettingsDep = Annotated[ServiceSettings, Depends(_settings)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
FeedbackLimiterDep = Annotated[ClientRateLimiter | None, Depends(_feedback_limiter)]
