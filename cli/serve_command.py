"""``recsys serve``: run the HTTP service with uvicorn.

Settings reach the worker processes through the environment (``RECSYS_*``, read by
``serving.settings.ServiceSettings``); connection limits go to uvicorn itself
(``cli/connection_limits.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from cli.connection_limits import ConnectionLimits, GuardedHttpToolsProtocol, raise_open_file_limit
from data.errors import ConfigError
from pipeline.bundle import verify_bundle
from pipeline.feedback_log import FeedbackLogBusyError
from pipeline.feedback_pg import is_postgres_url

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# One line per record, the same for uvicorn's own loggers and the project's (serving.*, ...):
# when, how bad, who said it. uvicorn's default has neither the time nor the logger name.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOG_FORMAT = (
    '%(asctime)s %(levelname)s %(name)s: %(client_addr)s - "%(request_line)s" %(status_code)s'
)
# Seconds a worker may take to answer uvicorn's health check. A worker starts answering only once
# it has imported the app's dependencies (torch, FAISS, LightGBM): several seconds on a busy
# machine, past uvicorn's default of 5, after which it is killed as hung and restarted, forever
# (seen with --workers 2 on two loaded cores). A worker that is truly hung is still replaced.
WORKER_HEALTHCHECK_TIMEOUT_S = 30
# Where the workers read the feedback log's location (serving/settings.py, feedback_db).
FEEDBACK_DB_ENV = "RECSYS_FEEDBACK_DB"
DEFAULT_FEEDBACK_DB = "feedback.sqlite3"
# prometheus_client's switch to multiprocess mode (serving/metrics.py).
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve a bundle over HTTP (FastAPI + uvicorn)")
    serve.add_argument("--bundle", required=True, type=Path)
    serve.add_argument("--data", type=Path, help="dataset whose train+valid seed user histories")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument(
        "--feedback-db",
        help="the feedback log every worker shares: a SQLite file (one machine) or a "
        "postgresql://user@host/db URL (replicas on several machines; put a password in "
        "RECSYS_FEEDBACK_DB, not here: a command line is visible to every user). Default: "
        "RECSYS_FEEDBACK_DB, else feedback.sqlite3",
    )
    token = serve.add_mutually_exclusive_group()
    token.add_argument(
        "--admin-token-file",
        type=Path,
        help="file holding the bearer token for /admin/* (or set RECSYS_ADMIN_TOKEN_FILE, or "
        "RECSYS_ADMIN_TOKEN to the token); without one, /admin/* is off",
    )
    token.add_argument(
        "--admin-token",
        help="deprecated: a command line is visible to every user of the machine (ps); use "
        "--admin-token-file or RECSYS_ADMIN_TOKEN",
    )
    serve.add_argument(
        "--max-online-users",
        type=int,
        help="users held in memory per worker beyond the bundle's own, the least recently used "
        "read back from the feedback log when they return (default: the service's, 100,000)",
    )
    serve.add_argument(
        "--online-learning",
        action="store_true",
        help="train the two-tower online from the feedback each worker receives (one update "
        "every 5 s; RECSYS_ONLINE_INTERVAL_S, RECSYS_ONLINE_CHECKPOINT tune it)",
    )
    serve.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="least severe log records shown, for uvicorn and the service (default: info)",
    )
    defaults = ConnectionLimits()
    limits = serve.add_argument_group(
        "connection limits", "per worker; see cli/connection_limits.py for the defaults' reasons"
    )
    limits.add_argument(
        "--timeout-header",
        type=float,
        default=defaults.header_timeout_s,
        metavar="SECONDS",
        help="a request head must arrive within this; idle new connections are closed after it "
        f"(default: {defaults.header_timeout_s:g})",
    )
    limits.add_argument(
        "--timeout-body",
        type=float,
        default=defaults.body_timeout_s,
        metavar="SECONDS",
        help=f"a request body must arrive within this (default: {defaults.body_timeout_s:g})",
    )
    limits.add_argument(
        "--timeout-keep-alive",
        type=int,
        default=defaults.keep_alive_s,
        metavar="SECONDS",
        help="idle time allowed between requests on one connection "
        f"(default: {defaults.keep_alive_s})",
    )
    limits.add_argument(
        "--limit-connections",
        type=int,
        default=defaults.max_connections,
        metavar="N",
        help=f"open connections per worker; more are answered 503 (default: "
        f"{defaults.max_connections})",
    )
    limits.add_argument(
        "--limit-header-bytes",
        type=int,
        default=defaults.max_header_bytes,
        metavar="BYTES",
        help=f"largest request head; larger: 431 (default: {defaults.max_header_bytes})",
    )
    limits.add_argument(
        "--limit-header-count",
        type=int,
        default=defaults.max_header_count,
        metavar="N",
        help=f"most header lines in a request; more: 431 (default: {defaults.max_header_count})",
    )
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    if args.admin_token is not None:
        print(
            "warning: --admin-token is deprecated: every user of this machine can read it in "
            "the process list; use --admin-token-file or RECSYS_ADMIN_TOKEN",
            file=sys.stderr,
        )
    if args.max_online_users is not None and args.max_online_users < 1:
        raise ConfigError(f"--max-online-users must be >= 1, got {args.max_online_users}")
    try:
        limits = ConnectionLimits(
            header_timeout_s=args.timeout_header,
            body_timeout_s=args.timeout_body,
            keep_alive_s=args.timeout_keep_alive,
            max_connections=args.limit_connections,
            max_header_bytes=args.limit_header_bytes,
            max_header_count=args.limit_header_count,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    run_server(
        args.bundle,
        data=args.data,
        host=args.host,
        port=args.port,
        workers=args.workers,
        feedback_db=args.feedback_db or os.environ.get(FEEDBACK_DB_ENV) or DEFAULT_FEEDBACK_DB,
        admin_token=args.admin_token,
        admin_token_file=args.admin_token_file,
        max_online_users=args.max_online_users,
        online_learning=args.online_learning,
        log_level=args.log_level,
        limits=limits,
    )
    return 0


def logging_config(level: str) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` of a server process (uvicorn applies it in each worker).

    uvicorn's loggers keep their destinations (access lines on stdout, the rest on stderr); the
    root logger gets the stderr handler, so ``serving.*`` and every other logger of the project
    print through it at ``level`` instead of being dropped (INFO) or printed bare (WARNING+).
    """
    level_name = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "default": {
                "()": "uvicorn.logging.DefaultFormatter",
                "fmt": LOG_FORMAT,
                "use_colors": False,
            },
            "access": {
                "()": "uvicorn.logging.AccessFormatter",
                "fmt": ACCESS_LOG_FORMAT,
                "use_colors": False,
            },
        },
        "handlers": {
            "default": {
                "formatter": "default",
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
            },
            "access": {
                "formatter": "access",
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
            },
        },
        "root": {"handlers": ["default"], "level": level_name},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level_name, "propagate": False},
            "uvicorn.error": {"level": level_name},
            "uvicorn.access": {"handlers": ["access"], "level": level_name, "propagate": False},
        },
    }


# The thread pools of the numeric libraries a worker loads (OpenMP: FAISS, LightGBM, torch;
# BLAS: numpy, scipy). They read these when they load, so they must be set before a worker starts.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def limit_library_threads(workers: int) -> int:
    """Give each worker's numeric libraries ``cores // workers`` threads (at least 1); returns it.

    Left at their defaults, every worker's libraries start one thread per core: N workers on N
    cores then run N^2 threads that take turns and spin-wait on each other, while a single
    request is too small to gain from a parallel region anyway. A value the operator already
    set in the environment wins.
    """
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    for variable in THREAD_VARIABLES:
        os.environ.setdefault(variable, str(threads))
    return threads


def run_server(
    bundle: Path,
    *,
    data: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    feedback_db: str | Path = DEFAULT_FEEDBACK_DB,
    admin_token: str | None = None,
    admin_token_file: Path | None = None,
    max_online_users: int | None = None,
    online_learning: bool = False,
    log_level: str = "info",
    limits: ConnectionLimits | None = None,
) -> None:
    """Verify the bundle and the settings, then run uvicorn until interrupted.

    admin_token is deprecated (visible in the process list): prefer admin_token_file, or
    ``RECSYS_ADMIN_TOKEN`` in the environment.
    """
    import uvicorn

    limits = limits if limits is not None else ConnectionLimits()
    manifest = verify_bundle(bundle)  # fail fast with a one-line error, before uvicorn starts
    limit_library_threads(workers)
    # Workers are separate processes: they read their settings from the environment.
    os.environ["RECSYS_BUNDLE"] = str(bundle.resolve())
    is_url = is_postgres_url(feedback_db)
    location = str(feedback_db) if is_url else str(Path(feedback_db).resolve())
    os.environ[FEEDBACK_DB_ENV] = location
    if data is not None:
        os.environ["RECSYS_DATA"] = str(data.resolve())
    if admin_token:
        os.environ["RECSYS_ADMIN_TOKEN"] = admin_token
    if admin_token_file is not None:
        os.environ["RECSYS_ADMIN_TOKEN_FILE"] = str(admin_token_file.resolve())
    if max_online_users is not None:
        os.environ["RECSYS_MAX_ONLINE_USERS"] = str(max_online_users)
    if online_learning:
        os.environ["RECSYS_ONLINE_LEARNING"] = "true"
    check_settings()
    max_connections = raise_open_file_limit(limits.max_connections)
    if max_connections != limits.max_connections:
        limits = dataclasses.replace(limits, max_connections=max_connections)
    publish_startup_bundle(bundle, str(manifest["model_version"]), location)
    metrics_dir = share_metrics(workers)
    print(f"serving {bundle} on http://{host}:{port} (API docs at /docs)", flush=True)
    try:
        _run_uvicorn(uvicorn, host, port, workers, log_level, limits)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _run_uvicorn(
    uvicorn: Any, host: str, port: int, workers: int, log_level: str, limits: ConnectionLimits
) -> None:
    uvicorn.run(
        "serving.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        log_config=logging_config(log_level),
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_TIMEOUT_S,
        # The service has no WebSocket route; an upgraded connection would also leave the
        # limits' protocol (and its body deadline would close it).
        ws="none",
        http=functools.partial(GuardedHttpToolsProtocol, limits=limits),
        timeout_keep_alive=limits.keep_alive_s,
    )


def publish_startup_bundle(bundle: Path, model_version: str, feedback_db: str) -> None:
    """Make ``bundle`` the one every worker and replica sharing ``feedback_db`` serves, unless
    it is already the newest published generation (a second replica starting on the same
    bundle publishes nothing; one started on another bundle rolls it out to all)."""
    from pipeline.feedback_store import open_feedback_store

    path = str(bundle.resolve())
    try:
        store = open_feedback_store(feedback_db)
        try:
            latest = store.latest_bundle()
            if latest is None or (latest.bundle, latest.model_version) != (path, model_version):
                store.publish_bundle(path, model_version)
        finally:
            store.close()
    except FeedbackLogBusyError as exc:
        raise ConfigError(f"feedback log: {exc}") from exc


def share_metrics(workers: int) -> str | None:
    """With several workers, a fresh directory for their Prometheus metrics (multiprocess mode,
    ``serving/metrics.py``), set in the environment they inherit; None with one worker (its
    own registry holds everything) or when ``PROMETHEUS_MULTIPROC_DIR`` is already set by the
    operator (theirs is used, and left in place)."""
    if workers <= 1 or os.environ.get(MULTIPROC_DIR_ENV):
        return None
    directory = tempfile.mkdtemp(prefix="recsys-metrics-")
    os.environ[MULTIPROC_DIR_ENV] = directory
    return directory


def check_settings() -> None:
    """Read the service settings from the environment as each worker will, so that a bad one
    (an admin token file that cannot be read, a token too short) fails here, in one line,
    instead of in every worker."""
    from serving.settings import ServiceSettings

    try:
        ServiceSettings()  # type: ignore[call-arg]  # filled from the environment
    except ValueError as exc:  # pydantic's ValidationError; secrets are not echoed
        raise ConfigError(f"service settings: {exc}") from exc
