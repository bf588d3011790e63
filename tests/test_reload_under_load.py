"""Hot reload under load, against a real uvicorn process (``recsys serve``).

Client threads send /v1/recommend and /v1/feedback without pause while the test swaps between
two valid bundles through /admin/reload, then offers a corrupt one. Known answers: every
request succeeds; a request sent after a reload returned is served by that reload's bundle;
the corrupt bundle is refused with a log line that names the bad file, and the last good
bundle keeps serving.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from pipeline.bundle import MANIFEST_NAME, write_manifest
from tests.test_serve_process import free_port, serve_command, wait_ready

TOKEN = "reload-test-token"
N_CLIENT_THREADS = 4
# Requests to let through between two reloads: enough that every swap happens under load.
REQUESTS_BETWEEN_RELOADS = 20
# Every 4th request is feedback, so the log is written while the state is swapped.
FEEDBACK_EVERY = 4
CORRUPTED_FILE = "ranking/model/model.txt"


@dataclass(frozen=True)
class Outcome:
    """One client request: when it was sent and answered (monotonic s) and what came back."""

    path: str
    started: float
    finished: float
    status: int | None  # None: no HTTP answer at all (connection error, timeout)
    model_version: str | None = None
    degraded: tuple[str, ...] = ()
    problem: str = ""


@dataclass(frozen=True)
class Reload:
    started: float
    finished: float
    status: int
    model_version: str | None  # the version serving once it returned


class LoadGenerator:
    """Client threads that send requests back to back until stopped, recording each outcome."""

    def __init__(self, url: str, users: list[str]) -> None:
        self.url = url
        self.users = users
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True)
            for i in range(N_CLIENT_THREADS)
        ]

    def __enter__(self) -> LoadGenerator:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def wait_for_more(self, n: int, timeout: float = 20.0) -> None:
        target = self.count() + n
        deadline = time.monotonic() + timeout
        while self.count() < target:
            assert time.monotonic() < deadline, f"load stalled at {self.count()} requests"
            time.sleep(0.01)

    def _client(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, timeout=10.0) as client:
            clicked: str | None = None  # an item this client was recommended, to click on
            i = 0
            while not self._stop.is_set():
                user = self.users[(worker * 7919 + i) % len(self.users)]
                body: dict[str, Any]
                if clicked is not None and i % FEEDBACK_EVERY == 0:
                    event = {"event_id": f"w{worker}-{i}", "user_id": user, "item_id": clicked}
                    body = {"events": [{**event, "type": "click"}]}
                    outcome, _ = self._send(client, "/v1/feedback", body, 202)
                else:
                    body = {"user_id": user, "k": 5}
                    outcome, answer = self._send(client, "/v1/recommend", body, 200)
                    if answer is not None and answer["items"]:
                        clicked = answer["items"][0]["item_id"]
                with self._lock:
                    self.outcomes.append(outcome)
                i += 1

    @staticmethod
    def _send(
        client: httpx.Client, path: str, body: dict[str, Any], expected: int
    ) -> tuple[Outcome, dict[str, Any] | None]:
        started = time.monotonic()
        try:
            response = client.post(path, json=body)
        except httpx.HTTPError as exc:
            return Outcome(path, started, time.monotonic(), None, problem=repr(exc)), None
        finished = time.monotonic()
        if response.status_code != expected:
            problem = response.text[:300]
            return Outcome(path, started, finished, response.status_code, problem=problem), None
        answer: dict[str, Any] = response.json()
        outcome = Outcome(
            path,
            started,
            finished,
            response.status_code,
            model_version=answer.get("model_version"),
            degraded=tuple(answer.get("degraded", ())),
        )
        return outcome, answer


def resealed_copy(bundle: Path, destination: Path) -> str:
    """A valid bundle with a model_version of its own: a copy with one more (harmless) file,
    sealed with a fresh manifest. Returns its model_version."""
    shutil.copytree(bundle, destination)
    manifest = json.loads((destination / MANIFEST_NAME).read_text())
    (destination / "NOTES.txt").write_text("second copy for the reload test\n")
    resealed = write_manifest(
        destination,
        config=manifest["config"],
        dataset_fingerprint=manifest["dataset_fingerprint"],
    )
    return str(resealed["model_version"])


def corrupt_copy(bundle: Path, destination: Path) -> None:
    """A copy with one byte of a model file flipped; its manifest still vouches for the old."""
    shutil.copytree(bundle, destination)
    target = destination / CORRUPTED_FILE
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))


def start_server(bundle: Path, data: Path, tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        # Generous stage budgets: two CPU cores under load must not degrade answers by timeout,
        # so any degraded flag below means a reload broke a request.
        "RECSYS_RETRIEVAL_BUDGET_MS": "5000",
        "RECSYS_RANKING_BUDGET_MS": "5000",
        "RECSYS_RERANKING_BUDGET_MS": "5000",
        "RECSYS_ADMIN_TOKEN": TOKEN,
    }
    command = serve_command(bundle, data, tmp_path / "feedback.sqlite3", port)
    # Files, not pipes: nobody drains a pipe while the test runs. Popen keeps its own copies.
    with (tmp_path / "server.out").open("wb") as out, (tmp_path / "server.err").open("wb") as err:
        return subprocess.Popen(command, stdout=out, stderr=err, env=env)


def reload(url: str, bundle: Path) -> tuple[Reload, httpx.Response]:
    started = time.monotonic()
    response = httpx.post(
        f"{url}/admin/reload",
        json={"bundle": str(bundle)},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    finished = time.monotonic()
    serving = httpx.get(f"{url}/readyz", timeout=10).json()["model_version"]
    return Reload(started, finished, response.status_code, serving), response


def expected_version(outcome: Outcome, initial: str, reloads: list[Reload]) -> str | None:
    """The version that must answer a request, or None when it overlapped a reload (either)."""
    version = initial
    for done in reloads:
        if outcome.finished > done.started and outcome.started < done.finished:
            return None
        if done.finished <= outcome.started and done.model_version is not None:
            version = done.model_version
    return version


@pytest.mark.slow
def test_reload_under_load_fails_no_request(tiny_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    data, bundle = tiny_bundle
    first = tmp_path / "bundle-a"
    shutil.copytree(bundle, first)
    version_a = json.loads((first / MANIFEST_NAME).read_text())["model_version"]
    second = tmp_path / "bundle-b"
    version_b = resealed_copy(bundle, second)
    assert version_a != version_b
    corrupt = tmp_path / "bundle-corrupt"
    corrupt_copy(second, corrupt)
    users = pl.read_parquet(first / "ids" / "users.parquet")["id"].head(50).to_list()
    users.append("a-user-nobody-has-seen")  # the cold-start path is served too

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(first, data, tmp_path, port)
    reloads: list[Reload] = []
    try:
        wait_ready(url, server)
        with LoadGenerator(url, users) as load:
            load.wait_for_more(REQUESTS_BETWEEN_RELOADS)
            for target, version in [(second, version_b), (first, version_a), (second, version_b)]:
                done, response = reload(url, target)
                assert response.status_code == 200, response.text
                assert response.json()["model_version"] == version == done.model_version
                reloads.append(done)
                load.wait_for_more(REQUESTS_BETWEEN_RELOADS)
            refused, refusal = reload(url, corrupt)
            reloads.append(refused)
            load.wait_for_more(REQUESTS_BETWEEN_RELOADS)
        outcomes = list(load.outcomes)
    finally:
        server.terminate()
        server.wait(timeout=20)
    log = (tmp_path / "server.err").read_text()

    failed = [o for o in outcomes if o.problem or o.degraded]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed, e.g. {failed[:3]}"
    for done in reloads:  # a reload with no request in flight would prove nothing
        assert any(o.started < done.finished and o.finished > done.started for o in outcomes)
    assert sum(o.path == "/v1/feedback" for o in outcomes) >= REQUESTS_BETWEEN_RELOADS // 2

    # The corrupt bundle: refused with 4xx, named in the log, and the last good one serves.
    assert 400 <= refused.status < 500 and "checksum" in refusal.json()["error"]
    assert refused.model_version == version_b
    logged = [line for line in log.splitlines() if "refused bundle" in line]
    assert len(logged) == 1, log[-2000:]
    assert str(corrupt) in logged[0] and CORRUPTED_FILE in logged[0]
    assert "checksum" in logged[0] and version_b in logged[0]

    # Each request sent after a reload returned is answered by that reload's bundle.
    answered = [o for o in outcomes if o.model_version is not None]
    checked = 0
    for outcome in answered:
        expected = expected_version(outcome, version_a, reloads)
        if expected is not None:
            assert outcome.model_version == expected, (outcome, reloads)
            checked += 1
    assert checked >= len(reloads) * REQUESTS_BETWEEN_RELOADS // 2
    assert {o.model_version for o in answered} == {version_a, version_b}
    after_refusal = [o for o in answered if o.started >= refused.finished]
    assert after_refusal and {o.model_version for o in after_refusal} == {version_b}
