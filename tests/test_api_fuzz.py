"""Property-based fuzz of the OpenAPI schema: no input gets a 5xx, every 4xx is a JSON error.

Schemathesis derives request strategies from the app's own OpenAPI schema for every operation:
positive cases (valid by the schema) and negative ones (each violating it somewhere: bodies,
paths, queries, headers). The requests go through Starlette's TestClient, so the lifespan and
the bundle belong to this test alone.

Schemathesis' pytest loader (``schemathesis.pytest.from_fixture``) fails on pytest 9 (it writes
``Node._nodeid``, which pytest 9 no longer has), so each operation's strategy is driven by a
plain ``@given`` here instead.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import APIOperation, Case, GenerationMode

from serving.app import create_app
from serving.settings import ServiceSettings

TOKEN = "fuzz-admin-token"
MAX_BODY_BYTES = 20_000
# Every operation of the HTTP contract (README, "HTTP API"); the fuzz fails if one goes missing from
# the schema, so it can never pass by testing nothing.
CONTRACT_OPERATIONS = {
    "POST /v1/recommend",
    "POST /v1/feedback",
    "GET /v1/items/{item_id}/similar",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "POST /admin/reload",
}
# 30 cases per operation and mode: both modes take ~15 s on two shared CPU cores.
FUZZ_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    # Generation speed is not under test, and the CPUs are shared with other test workers.
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture
def fuzz_client(tiny_bundle: tuple[Path, Path], tmp_path: Path) -> Iterator[TestClient]:
    """An app of its own: a private bundle copy and feedback log, so no fuzzed event or reload
    can reach another test's state."""
    data, bundle = tiny_bundle
    private_bundle = tmp_path / "bundle"
    shutil.copytree(bundle, private_bundle)
    service_settings = ServiceSettings(
        bundle=private_bundle,
        data=data,
        feedback_db=tmp_path / "feedback.sqlite3",
        admin_token=TOKEN,
        max_body_bytes=MAX_BODY_BYTES,
        # Generous budgets: a slow CI machine must not turn answers into degraded ones.
        retrieval_budget_ms=500,
        ranking_budget_ms=500,
        reranking_budget_ms=500,
    )
    # raise_server_exceptions=False: a crash must show up as the 500 a real client would see.
    with TestClient(create_app(service_settings), raise_server_exceptions=False) as client:
        yield client


def send(client: TestClient, case: Case, headers: dict[str, str] | None = None) -> httpx2.Response:
    """Send a generated case through the TestClient (requests-style kwargs -> httpx-style)."""
    kwargs = case.as_transport_kwargs(base_url=str(client.base_url), headers=headers)
    # The API declares no cookie parameters (and httpx deprecates per-request cookies).
    assert not kwargs.get("cookies"), kwargs["cookies"]
    return client.request(
        kwargs["method"],
        kwargs["url"],
        headers=kwargs.get("headers"),
        params=kwargs.get("params"),
        json=kwargs.get("json"),
        content=kwargs.get("data"),
    )


def assert_contract_error_shape(response: httpx2.Response) -> None:
    """No 5xx; a 4xx is JSON with a non-empty ``error`` string (README, "HTTP API")."""
    where = f"{response.request.method} {response.request.url} -> {response.status_code}: "
    where += response.text[:300]
    assert response.status_code < 500, where
    if 400 <= response.status_code < 500:
        assert response.headers["content-type"].startswith("application/json"), where
        error = response.json().get("error")
        assert isinstance(error, str) and error, where


def has_inputs(operation: APIOperation) -> bool:
    """Negative cases need something to violate: a parameter or a body."""
    return any(operation.iter_parameters()) or any(True for _ in operation.body)


def fuzz(client: TestClient, operation: APIOperation, mode: GenerationMode) -> None:
    @FUZZ_SETTINGS
    @given(case=operation.as_strategy(mode))
    def run(case: Case) -> None:
        assert_contract_error_shape(send(client, case))
        if operation.path.startswith("/admin/"):
            # Again with the valid token, so the handler behind the token check is fuzzed too.
            authorized = send(client, case, headers={"Authorization": f"Bearer {TOKEN}"})
            assert_contract_error_shape(authorized)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_gets_a_5xx(fuzz_client: TestClient, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_dict(fuzz_client.app.openapi())  # type: ignore[attr-defined]
    operations = [operation for methods in schema.values() for operation in methods.values()]
    assert {op.label for op in operations} >= CONTRACT_OPERATIONS
    for operation in operations:
        if mode is GenerationMode.POSITIVE or has_inputs(operation):
            fuzz(fuzz_client, operation, mode)
    served = fuzz_client.get("/readyz").json()["model_version"]
    assert served, "the fuzz must leave the service ready"


# Regression examples. The fuzz found undecodable bodies answered in Starlette's {"detail": ...}
# shape, not the contract's {"error": ...}; unknown routes and methods had the same shape.
@pytest.mark.parametrize(
    ("method", "path", "content", "status"),
    [
        ("POST", "/v1/recommend", b'{"user_id": "\xff"}', 400),  # not UTF-8: unparseable
        ("POST", "/admin/reload", b'{"bundle": "\xff"}', 400),
        ("GET", "/v1/no-such-route", None, 404),
        ("DELETE", "/v1/recommend", None, 405),
    ],
)
def test_framework_errors_have_the_contract_shape(
    fuzz_client: TestClient, method: str, path: str, content: bytes | None, status: int
) -> None:
    headers = {"content-type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    response = fuzz_client.request(method, path, content=content, headers=headers)
    assert response.status_code == status
    assert_contract_error_shape(response)


def test_streamed_oversized_body_is_413(fuzz_client: TestClient) -> None:
    # Regression: without Content-Length (chunked), the limit is enforced while the body streams
    # in; FastAPI's body parser used to turn that into a 400 "error parsing the body".
    chunk = b" " * 4096
    n_chunks = MAX_BODY_BYTES // len(chunk) + 2

    def body() -> Iterator[bytes]:
        yield from [chunk] * n_chunks

    response = fuzz_client.post(
        "/v1/recommend", content=body(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json() == {
        "error": "request body too large",
        "detail": {"max_bytes": MAX_BODY_BYTES},
    }


@pytest.mark.parametrize(
    "bundle",
    [
        # Regression: one path component past NAME_MAX makes the OS raise ENAMETOOLONG (an
        # OSError that Path.is_dir does not swallow), which used to escape as a 500.
        "b" * 300,
        "bundle\x00",  # an embedded NUL byte: refused like a missing directory
    ],
)
def test_reload_of_an_unreadable_path_is_refused(fuzz_client: TestClient, bundle: str) -> None:
    before = fuzz_client.get("/readyz").json()["model_version"]
    response = fuzz_client.post(
        "/admin/reload", json={"bundle": bundle}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 409, response.text
    assert response.json()["error"].startswith("bundle refused")
    assert fuzz_client.get("/readyz").json()["model_version"] == before
