"""`recsys serve` as a real uvicorn process: readiness, a request, SIGKILL durability, its log
lines, and a one-line refusal of a bundle path the OS cannot read."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cli.main import build_parser, main
from data.errors import BundleError
from pipeline import bundle as bundle_module
from pipeline.bundle import verify_bundle
from pipeline.feedback_log import FeedbackLog, FeedbackLogConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_command(bundle: Path, data: Path, db: Path, port: int) -> list[str]:
    """The ``recsys serve`` command line of these tests (the real CLI, in a child process)."""
    return [
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
    ]


def start(bundle: Path, data: Path, db: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        serve_command(bundle, data, db, port),
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


# "2025-01-31 12:00:00,123 INFO pipeline.service: reloaded bundle ...": time, level, logger name.
LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: "
)


@pytest.mark.slow
def test_server_log_lines_have_time_level_and_logger(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    data, bundle = tiny_bundle
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    token = "log-test-admin-token"  # admin tokens have at least 16 characters
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RECSYS_ADMIN_TOKEN": token}
    command = serve_command(bundle, data, tmp_path / "feedback.sqlite3", port)
    with (tmp_path / "server.err").open("wb") as err:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        wait_ready(url, server)
        headers = {"Authorization": f"Bearer {token}"}
        for target, status in [(bundle, 200), (tmp_path / "no-such-bundle", 409)]:
            reply = httpx.post(
                f"{url}/admin/reload", json={"bundle": str(target)}, headers=headers, timeout=60
            )
            assert reply.status_code == status, reply.text
    finally:
        server.terminate()
        server.wait(timeout=20)
    lines = (tmp_path / "server.err").read_text().splitlines()

    def logged(logger: str, level: str, text: str) -> list[str]:
        return [line for line in lines if f" {level} {logger}: " in line and text in line]

    # uvicorn's own lines and the service's (INFO, formerly dropped) share one format.
    assert logged("uvicorn.error", "INFO", "Application startup complete"), lines
    assert logged("serving.app", "INFO", "serving bundle"), lines
    assert logged("pipeline.service", "INFO", "reloaded bundle"), lines
    refused = logged("serving.routes.admin", "ERROR", "refused bundle")
    assert len(refused) == 1 and "no-such-bundle" in refused[0], lines
    assert all(LOG_LINE.match(line) for line in lines if "bundle" in line), lines


def test_serve_log_level_option() -> None:
    parse = build_parser().parse_args
    assert parse(["serve", "--bundle", "b"]).log_level == "info"
    assert parse(["serve", "--bundle", "b", "--log-level", "warning"]).log_level == "warning"
    with pytest.raises(SystemExit):
        parse(["serve", "--bundle", "b", "--log-level", "chatty"])


def test_a_path_the_os_refuses_is_a_bundle_error_naming_it(
    tiny_bundle: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    too_long = tmp_path / ("b" * 300)  # one component past NAME_MAX: ENAMETOOLONG
    with pytest.raises(BundleError, match="cannot be read: File name too long") as caught:
        verify_bundle(too_long)
    assert str(too_long) in str(caught.value)

    # A file the process may not read (chmod cannot show it: the tests may run as root).
    _, bundle = tiny_bundle

    def refuse(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(bundle_module, "sha256_file", refuse)
    with pytest.raises(BundleError, match="cannot be read: Permission denied") as caught:
        verify_bundle(bundle)
    assert f"bundle '{bundle}'" in str(caught.value)
    assert f"({bundle}/" in str(caught.value), "the message names the unreadable file"


def test_serve_refuses_an_unreadable_bundle_path_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    too_long = tmp_path / ("b" * 300)
    assert main(["serve", "--bundle", str(too_long)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: bundle '{too_long}' cannot be read: File name too long")
    assert err.count("\n") == 1 and "Traceback" not in err


def worker_pids(parent: int) -> list[int]:
    """The uvicorn worker processes of a ``--workers N`` server (its children that run Python
    code of ours, not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [
        int(pid)
        for pid in children
        if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text()
    ]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/maps")
def test_workers_map_one_copy_of_the_bundle(tiny_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    """With --workers 2 both workers serve, and each maps the bundle's index, vectors and weights
    from the same files: the page cache holds one copy for both."""
    data, bundle = tiny_bundle
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "cli.main", "serve", "--bundle", str(bundle), "--data"]
    command += [str(data), "--port", str(port), "--feedback-db", str(tmp_path / "fb.sqlite3")]
    with (tmp_path / "server.err").open("wb") as err:
        server = subprocess.Popen(
            [*command, "--workers", "2"], stdout=subprocess.DEVNULL, stderr=err
        )
    shared = [
        bundle / "retrieval" / "two_tower" / "index" / "index.faiss",
        bundle / "retrieval" / "two_tower" / "arrays" / "item_vectors.npy",
        bundle / "retrieval" / "two_tower" / "model.pt",
        bundle / "retrieval" / "als" / "arrays" / "item_factors.npy",
    ]
    try:
        wait_ready(url, server, timeout=120)
        deadline = time.monotonic() + 120
        while True:  # readyz answered by one worker; wait for both to have loaded the bundle
            workers = worker_pids(server.pid)
            maps = [Path(f"/proc/{pid}/maps").read_text() for pid in workers]
            if len(workers) == 2 and all(str(shared[0]) in m for m in maps):
                break
            assert time.monotonic() < deadline, (workers, (tmp_path / "server.err").read_text())
            time.sleep(0.5)
        for worker_maps in maps:
            assert all(str(path) in worker_maps for path in shared), worker_maps
        for _ in range(10):
            answer = httpx.post(f"{url}/v1/recommend", json={"user_id": "u", "k": 3}, timeout=10)
            assert answer.status_code == 200 and len(answer.json()["items"]) == 3
    finally:
        server.terminate()
        server.wait(timeout=30)
