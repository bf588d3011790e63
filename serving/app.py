"""The HTTP service (FastAPI): a thin shell over :class:`pipeline.service.RecommenderService`.

Settings come in through :class:`serving.settings.ServiceSettings` (environment ``RECSYS_*`` or
arguments), never read at import time; the bundle is loaded once in the lifespan and injected into
the routes (``serving/routes/``, one router per resource; ``serving/deps.py``). Bad input gets a
4xx JSON error (``serving/errors.py``); no input makes the service answer 5xx. README, "HTTP API
at a glance", lists the routes.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from data.errors import BundleError
from pipeline.feedback_store import FeedbackStore, describe_location, open_feedback_store
from pipeline.log_follower import FollowerConfig, LogFollower
from pipeline.online_learning import OnlineLearningConfig
from pipeline.service import RecommenderService
from serving.batcher import RequestBatcher
from serving.errors import install_error_handlers
from serving.explorer import explorer_router
from serving.limits import BodySizeLimit, ClientRateLimiter
from serving.memory import freeze_long_lived_objects
from serving.metrics import Metrics, RequestCounter
from serving.routes import ROUTERS
from serving.settings import ServiceSettings

logger = logging.getLogger(__name__)


def create_app(settings: ServiceSettings) -> FastAPI:
    """Build the app; the bundle is loaded when the lifespan starts (``/readyz`` says when)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        feedback = await run_in_threadpool(open_feedback_store, settings.feedback_db)
        service = await run_in_threadpool(_start_service, settings, feedback)
        app.state.service = service
        app.state.batcher = RequestBatcher(lambda: service.pipeline, max_batch=settings.max_batch)
        follower = LogFollower(
            service,
            FollowerConfig(interval_s=settings.follow_interval_ms / 1000),
            on_step=lambda: metrics.observe_service(service),
        ).start()
        freeze_long_lived_objects(collect=True)
        logger.info(
            "serving bundle %s (%s, generation %d), feedback log %s",
            service.bundle,
            service.pipeline.model_version,
            service.generation,
            describe_location(settings.feedback_db),
        )
        try:
            yield
        finally:
            follower.stop()
            app.state.batcher.close()
            service.close()
            metrics.worker_exited()
            gc.unfreeze()  # the process may go on (tests, an embedding program)

    app = FastAPI(
        title="recsys-funnel",
        description="Multi-stage recommender: retrieval -> ranking -> re-ranking, with budgets.",
        version="0.1.0",
        lifespan=lifespan,
    )
    metrics = Metrics()
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.feedback_limiter = (
        ClientRateLimiter(settings.feedback_events_per_s, settings.feedback_burst_events)
        if settings.feedback_events_per_s > 0
        else None
    )
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestCounter, metrics=metrics)  # outermost: it counts 413s too
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(explorer_router())
    return app


def _start_service(settings: ServiceSettings, feedback: FeedbackStore) -> RecommenderService:
    """The service of one worker, on the newest bundle generation published in the log (what
    every worker sharing it serves), or on ``settings.bundle`` before any was published."""

    def start(bundle: Path, generation: int) -> RecommenderService:
        return RecommenderService(
            bundle,
            feedback,
            history=settings.data,
            budgets=settings.budgets(),
            max_online_users=settings.max_online_users,
            online_user_ttl_s=settings.online_user_ttl_s,
            publish_reloads=True,
            generation=generation,
            online_learning=(
                OnlineLearningConfig(interval_s=settings.online_interval_s)
                if settings.online_learning
                else None
            ),
            online_checkpoint=settings.online_checkpoint,
        )

    try:
        latest = feedback.latest_bundle()
        if latest is None or Path(latest.bundle) == settings.bundle.resolve():
            return start(settings.bundle, 0 if latest is None else latest.generation)
        try:
            return start(Path(latest.bundle), latest.generation)
        except (BundleError, OSError) as exc:
            # A generation this worker cannot load (its path missing here, say) must not keep
            # it from starting: it serves its own bundle and logs why.
            logger.error(
                "published bundle generation %d (%r) cannot be served here, serving %s: %s",
                latest.generation,
                latest.bundle,
                settings.bundle,
                exc,
            )
            return start(settings.bundle, 0)
    except BaseException:
        feedback.close()
        raise


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (several workers): settings from ``RECSYS_*``."""
    return create_app(ServiceSettings())  # type: ignore[call-arg]  # filled from the environment
