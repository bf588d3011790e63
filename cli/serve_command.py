"""``recsys serve``: run the HTTP service with uvicorn."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from serving.bundle import verify_bundle


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve a bundle over HTTP (FastAPI + uvicorn)")
    serve.add_argument("--bundle", required=True, type=Path)
    serve.add_argument("--data", type=Path, help="dataset whose train+valid seed user histories")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--feedback-db", type=Path, default=Path("feedback.sqlite3"))
    serve.add_argument("--admin-token", help="bearer token for /admin/* (or RECSYS_ADMIN_TOKEN)")
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
    )
    return 0


def run_server(
    bundle: Path,
    *,
    data: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    feedback_db: Path = Path("feedback.sqlite3"),
    admin_token: str | None = None,
) -> None:
    """Verify the bundle, then run uvicorn until interrupted."""
    import uvicorn

    verify_bundle(bundle)  # fail fast with a one-line error, before uvicorn starts
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
        log_level="info",
    )
