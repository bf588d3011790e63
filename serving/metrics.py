"""Prometheus metrics of the HTTP service, and the middleware that counts every answer."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
        # Online learning (pipeline/online_learning): the published step, and the time from an
        # event to the first model version trained on it, over the trainer's recent examples.
        self.online_step = Gauge(
            "recsys_model_online_step",
            "Online training steps published on the bundle's weights (0: as trained)",
            registry=self.registry,
        )
        self.model_freshness = Gauge(
            "recsys_model_freshness_seconds",
            "Event time to its first use by the model",
            ["quantile"],
            registry=self.registry,
        )


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
