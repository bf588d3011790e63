"""``recsys serve``: run the HTTP service with uvicorn."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pipeline.bundle import verify_bundle

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


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve a bundle over HTTP (FastAPI + uvicorn)")
    serve.add_argument("--bundle", required=True, type=Path)
    serve.add_argument("--data", type=Path, help="dataset whose train+valid seed user histories")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--feedback-db", type=Path, default=Path("feedback.sqlite3"))
    serve.add_argument("--admin-token", help="bearer token for /admin/* (or RECSYS_ADMIN_TOKEN)")
    serve.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="least severe log records shown, for uvicorn and the service (default: info)",
    )
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    run_server(
        args.bundle,
        data=args.data,
        host=args.host,
        port=args.port,
        workers=args.workers,
        feedback_db=args.feedback_db,
        admin_token=args.admin_token,
        log_level=args.log_level,
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
    feedback_db: Path = Path("feedback.sqlite3"),
    admin_token: str | None = None,
    log_level: str = "info",
) -> None:
    """Verify the bundle, then run uvicorn until interrupted."""
    import uvicorn

    verify_bundle(bundle)  # fail fast with a one-line error, before uvicorn starts
    limit_library_threads(workers)
    # Workers are separate processes: they read their settings from the environment.
    os.environ["RECSYS_BUNDLE"] = str(bundle.resolve())
    os.environ["RECSYS_FEEDBACK_DB"] = str(feedback_db.resolve())
    if data is not None:
        os.environ["RECSYS_DATA"] = str(data.resolve())
    if admin_token:
        os.environ["RECSYS_ADMIN_TOKEN"] = admin_token
    print(f"serving {bundle} on http://{host}:{port} (API docs at /docs)", flush=True)
    uvicorn.run(
        "serving.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        log_config=logging_config(log_level),
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_TIMEOUT_S,
    )
