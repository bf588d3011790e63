"""Property-based fuzz of the OpenAPI schema: no input gets a 5xx, every 4xx is a JSON error.

Schemathesis derives request strategies from the app's own OpenAPI schema for every operation:
positive cases (valid by the schema) and negative ones (each violating it somewhere: bodies,
paths, queries, headers). The requests go through Starlette's TestClient, so the lifespan and
the bundle belong to this test alone.

Schemathesis' pytest loader (``schemathesis.pytest.from_fixture``) fails on pytest 9 (it writes
``Node._nodeid``, which pytest 9 no longer has), so each operation's strategy is driven by a
plain ``@given`` here instead.

Schemathesis only generates text that UTF-8 can encode. A hostile client also sends lone
surrogates (``"\\udfff"`` is valid JSON) and control characters, which once failed whole batches
(issue 21): :func:`test_no_string_field_takes_hostile_text_for_a_5xx` finds every string in the
schema (body fields, dict keys, path ids) and the Authorization header, and puts such text
into each in turn.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx2
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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


# ------------------------------------------------------------------ hostile text in every string
# Lone surrogates, controls (NUL, CR, LF, ESC), format characters (zero-width, BOM, bidi
# overrides), separators, private-use and unassigned code points, mixed with ordinary ASCII, up to
# past the 256-character id cap.
HOSTILE_TEXT = st.text(
    st.one_of(
        st.characters(categories=["Cs", "Cc", "Cf", "Zs", "Zl", "Zp", "Co", "Cn"]),
        st.characters(codec="ascii"),
    ),
    max_size=300,
)
HOSTILE_SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
KEY = object()  # a slot that is a key of a free-form object (``context``)
# A valid request per operation; each string of the schema is replaced in it in turn. "{item}"
# stands for a served item id.
BASELINES: dict[str, dict[str, Any]] = {
    "POST /v1/recommend": {
        "body": {"user_id": "u", "exclude_item_ids": ["i"], "context": {"page": "home"}}
    },
    "POST /v1/feedback": {
        "body": {
            "events": [{"event_id": "e", "user_id": "u", "item_id": "{item}", "type": "click"}]
        }
    },
    "GET /v1/items/{item_id}/similar": {"path": {"item_id": "{item}"}, "query": {"k": "3"}},
    "GET /v1/explore/{user_id}": {"path": {"user_id": "u"}, "query": {"k": "3"}},
    "GET /v1/explore/_users": {"query": {"n": "3"}},
    "POST /admin/reload": {"body": {"bundle": "no-such-bundle"}},
    "POST /admin/items": {"body": {"items": [{"item_id": "fuzz-item", "categories": ["c0"]}]}},
}


def string_slots(
    schema: dict[str, Any], spec: dict[str, Any], path: tuple[Any, ...] = ()
) -> Iterator[tuple[Any, ...]]:
    """Paths to every string a request body of ``schema`` can hold (list items at index 0)."""
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    for option in schema.get("anyOf", []):
        yield from string_slots(option, spec, path)
    kind = schema.get("type")
    if kind == "string":
        yield path
    elif kind == "array":
        yield from string_slots(schema["items"], spec, (*path, 0))
    elif kind == "object":
        for name, field in schema.get("properties", {}).items():
            yield from string_slots(field, spec, (*path, name))
        if schema.get("additionalProperties"):
            yield (*path, KEY)


def operation_slots(spec: dict[str, Any], label: str) -> list[tuple[str, tuple[Any, ...]]]:
    """(where, path) of every string input of the operation ``label``: body fields, and path
    and query parameters (query values are text on the wire, whatever their type)."""
    method, route = label.split(" ", 1)
    operation = spec["paths"][route][method.lower()]
    slots = [(p["in"], (p["name"],)) for p in operation.get("parameters", [])]
    body = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if body is not None:
        slots += [("body", path) for path in dict.fromkeys(string_slots(body["schema"], spec))]
    return slots


def with_text(baseline: Any, path: tuple[Any, ...], text: str) -> Any:
    """A copy of ``baseline`` whose string at ``path`` is ``text`` (a key, at a KEY step)."""
    changed = copy.deepcopy(baseline)
    parent = changed
    for step in path[:-1]:
        parent = parent[step]
    if path[-1] is KEY:
        parent[text] = "value"
    else:
        assert isinstance(parent[path[-1]], str), (path, baseline)
        parent[path[-1]] = text
    return changed


def send_hostile(
    client: TestClient, label: str, request: dict[str, Any], headers: dict[str, Any]
) -> httpx2.Response:
    """Send ``request`` as a hostile client would: JSON with every non-ASCII character escaped
    (a lone surrogate travels as ``\\udfff``), path and query text as UTF-8 percent-escapes
    (a surrogate as the bytes UTF-8 would have given it, which are not UTF-8)."""
    method, route = label.split(" ", 1)

    def escaped(text: str) -> str:
        return quote(text.encode("utf-8", "surrogatepass"), safe="")

    url = route.format(**{name: escaped(v) for name, v in request.get("path", {}).items()})
    query = "&".join(f"{escaped(k)}={escaped(v)}" for k, v in request.get("query", {}).items())
    content = json.dumps(request["body"]).encode("ascii") if "body" in request else None
    if content is not None:
        headers = {"content-type": "application/json", **headers}
    return client.request(
        method, f"{url}?{query}" if query else url, content=content, headers=headers
    )


def fuzz_slot(
    client: TestClient, label: str, baseline: dict[str, Any], where: str, path: tuple[Any, ...]
) -> None:
    """Hostile text at ``path`` of the baseline's ``where`` (body, path or query): no 5xx."""
    auth = {"Authorization": f"Bearer {TOKEN}"}

    @HOSTILE_SETTINGS
    @given(text=HOSTILE_TEXT)
    def run(text: str) -> None:
        request = {**baseline, where: with_text(baseline[where], path, text)}
        assert_contract_error_shape(send_hostile(client, label, request, auth))

    run()


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(BASELINES))
def test_no_string_field_takes_hostile_text_for_a_5xx(fuzz_client: TestClient, label: str) -> None:
    spec = fuzz_client.app.openapi()  # type: ignore[attr-defined]
    item = str(fuzz_client.app.state.service.pipeline.artifacts.items.ids[0])  # type: ignore[attr-defined]
    baseline = json.loads(json.dumps(BASELINES[label]).replace("{item}", item))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # The baseline passes the edge (a missing bundle is the reload's own 409).
    assert send_hostile(fuzz_client, label, baseline, auth).status_code in (200, 202, 409)
    slots = operation_slots(spec, label)
    assert slots, f"{label}: no string input found in the schema"
    for where, path in slots:
        fuzz_slot(fuzz_client, label, baseline, where, path)
    if label.startswith("POST /admin/"):
        # The header is a string too: any bytes a header can carry, never a 5xx.
        header_bytes = st.binary(max_size=80).map(
            lambda b: b"Bearer " + b.replace(b"\r", b"").replace(b"\n", b"")
        )

        @HOSTILE_SETTINGS
        @given(authorization=st.one_of(header_bytes, st.binary(max_size=80)))
        def run_header(authorization: bytes) -> None:
            headers = {"Authorization": authorization}
            response = send_hostile(fuzz_client, label, baseline, headers)
            assert_contract_error_shape(response)
            assert response.status_code == 401, response.text

        run_header()


def test_every_operation_has_a_hostile_text_baseline(fuzz_client: TestClient) -> None:
    spec = fuzz_client.app.openapi()  # type: ignore[attr-defined]
    operations = {
        f"{method.upper()} {route}"
        for route, methods in spec["paths"].items()
        for method in methods
    }
    with_inputs = {label for label in operations if label.split(" ", 1)[1] not in NO_INPUTS}
    assert with_inputs == set(BASELINES)


NO_INPUTS = {"/healthz", "/readyz", "/metrics"}
