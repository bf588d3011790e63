"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from serving.deps import MetricsDep, ServiceDep
from serving.schemas import HealthOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut)
def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get("/readyz", response_model=HealthOut, responses={503: {"model": HealthOut}})
def readyz(request: Request) -> Any:
    # Not ServiceDep: the service is absent until the lifespan has loaded the bundle.
    service = getattr(request.app.state, "service", None)
    if service is None:
        return JSONResponse(status_code=503, content={"status": "loading"})
    return HealthOut(status="ok", model_version=service.pipeline.model_version)


@router.get("/metrics", response_class=PlainTextResponse)
def prometheus(service: ServiceDep, metrics: MetricsDep) -> Response:
    # This worker's gauges fresh; the others' as their log followers last set them.
    metrics.observe_service(service)
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
