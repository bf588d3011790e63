"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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
    metrics.feedback_lag.set(service.feedback_lag_seconds())
    online = service.online_status()
    metrics.online_step.set(float(online.get("online_step") or 0))  # type: ignore[arg-type]
    for quantile, key in (("0.5", "model_freshness_p50_s"), ("0.99", "model_freshness_p99_s")):
        value = online.get(key)
        if isinstance(value, float):
            metrics.model_freshness.labels(quantile=quantile).set(value)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
