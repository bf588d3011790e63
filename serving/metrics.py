"""Prometheus metrics of the HTTP service, and the middleware that counts every answer.

Several workers (``recsys serve --workers N``) are several processes, and a scrape reaches one of
them. So that one scrape reports them all, the server runs them in prometheus_client's
multiprocess mode: ``recsys serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory
before the workers start, each worker writes its values to memory-mapped files there, and
``/metrics`` sums the files of every worker, the exited ones included (their counts happened).
Gauges say how they combine: the feedback lag and the log position are the worst worker's.
Without the variable (one worker, tests, an embedding program), each app has its own registry.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client import multiprocess as prometheus_multiprocess
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.service import RecommenderService

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The directory the workers share their metrics through, or None in single-process mode.

    prometheus_client picks its value store when it is first imported; what counts is that
    choice, not the variable alone (set after the import, it would change nothing)."""
    if values.ValueClass is values.MutexValue:
        return None
    return os.environ.get(MULTIPROC_DIR_ENV)


class Metrics:
    """Prometheus metrics of one app instance (own registry: no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir()
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
            multiprocess_mode="livemax",  # the worker that is most behind
        )
        self.log_position = Gauge(
            "recsys_feedback_applied_seq",
            "Feedback log sequence number the online state holds (the most behind worker)",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        # One sample per live worker (labelled by pid in multiprocess mode): how many serve.
        self.worker_up = Gauge(
            "recsys_worker_up",
            "1 for each worker serving",
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.bundle_generation = Gauge(
            "recsys_bundle_generation",
            "Published bundle generation served (the most behind worker)",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        # Online learning (pipeline/online_learning): the published step, and the time from an
        # event to the first model version trained on it, over the trainer's recent examples.
        self.online_step = Gauge(
            "recsys_model_online_step",
            "Online training steps published on the bundle's weights (0: as trained)",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.model_freshness = Gauge(
            "recsys_model_freshness_seconds",
            "Event time to its first use by the model",
            ["quantile"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )

    def observe_service(self, service: RecommenderService) -> None:
        """Set the gauges that describe ``service`` (at each scrape and each follower tick)."""
        self.feedback_lag.set(service.feedback_lag_seconds())
        self.log_position.set(service.applied_seq)
        self.bundle_generation.set(service.generation)
        self.worker_up.set(1)
        online = service.online_status()
        self.online_step.set(float(online.get("online_step") or 0))  # type: ignore[arg-type]
        for quantile, key in (("0.5", "model_freshness_p50_s"), ("0.99", "model_freshness_p99_s")):
            value = online.get(key)
            if isinstance(value, float):
                self.model_freshness.labels(quantile=quantile).set(value)

    def exposition(self) -> bytes:
        """The Prometheus text of every worker (multiprocess mode) or of this app."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry)

    def worker_exited(self) -> None:
        """Drop this process's live gauges (its counters stay: what it counted happened)."""
        if self.multiprocess_dir is not None:
            prometheus_multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)


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
