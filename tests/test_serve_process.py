"""`recsys serve` as a real uvicorn process: readiness, a request, and SIGKILL durability."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serving.feedback_log import FeedbackLog, FeedbackLogConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(bundle: Path, data: Path, db: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli.main",
            "serve",
            "--bundle",
            str(bundle),
            "--data",
            str(data),
            "--port",
            str(port),
            "--feedback-db",
            str(db),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


@pytest.mark.slow
def test_acknowledged_feedback_survives_sigkill(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    data, bundle = tiny_bundle
    db = tmp_path / "feedback.sqlite3"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start(bundle, data, db, port)
    acknowledged: list[str] = []
    try:
        wait_ready(url, server)
        answer = httpx.post(f"{url}/v1/recommend", json={"user_id": "someone", "k": 3}, timeout=10)
        assert answer.status_code == 200 and len(answer.json()["items"]) == 3
        item = answer.json()["items"][0]["item_id"]
        for i in range(40):
            event = {
                "event_id": f"ev-{i}",
                "user_id": f"user-{i % 7}",
                "item_id": item,
                "type": "click",
            }
            reply = httpx.post(f"{url}/v1/feedback", json={"events": [event]}, timeout=10)
            assert reply.status_code == 202
            acknowledged.append(event["event_id"])
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)

    with FeedbackLog(FeedbackLogConfig(path=db)) as log:
        stored = {event.event_id for event in log.read_since(0)[0]}
    assert set(acknowledged) <= stored

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start(bundle, data, db, port)
    try:
        wait_ready(url, server)
        events = [
            {"event_id": e, "user_id": "user-0", "item_id": item, "type": "click"}
            for e in acknowledged
        ]
        again = httpx.post(f"{url}/v1/feedback", json={"events": events}, timeout=10)
        assert again.json() == {"accepted": 0, "duplicates": len(acknowledged)}
    finally:
        server.terminate()
        server.wait(timeout=10)
