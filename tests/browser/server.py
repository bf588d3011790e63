"""Run an ASGI app with a real uvicorn server in a background thread, for browser tests.

A thread (not a subprocess) keeps the app's state inspectable from the test and starts in well
under a second once the bundle is loaded. The listening socket is bound before the server starts,
so there is no window in which another process can take the port.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp

HOST = "127.0.0.1"
# Loading a tiny bundle takes about a second; a loaded CI machine may take far longer.
STARTUP_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 10.0
_POLL_S = 0.05


@contextmanager
def running_server(app: ASGIApp) -> Iterator[str]:
    """Serve ``app`` on a free ``127.0.0.1`` port until the block ends; yields the base URL.

    The lifespan runs (the bundle is loaded) before this yields. Raises ``RuntimeError`` when the
    server stops or does not start within ``STARTUP_TIMEOUT_S``.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        log_config=None,  # leave the test process's logging configuration alone
        ws="none",  # no websockets here; importing them can emit deprecation warnings
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the test server stopped during start-up (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test server did not start in {STARTUP_TIMEOUT_S:.0f} s")
            time.sleep(_POLL_S)
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=SHUTDOWN_TIMEOUT_S)
        sock.close()
