"""The HTTP edge under hostile input (issue 21): one regression test per finding.

Each test here failed before the fix it names: a lone surrogate that failed its whole batch, an
empty admin token that let anyone in, a non-ASCII Authorization header answered 500, the body
validated before the token, coerced JSON types, control characters and impossible timestamps
accepted, a reload path logged raw, and no rate limit on anonymous feedback.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from serving.app import create_app
from serving.limits import ClientRateLimiter
from serving.settings import MIN_ADMIN_TOKEN_LENGTH, ServiceSettings

TOKEN = "edge-test-admin-token"
POISON = "poisoned-user"


@pytest.fixture(scope="module")
def client(
    tiny_bundle: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    data, bundle = tiny_bundle
    settings = ServiceSettings(
        bundle=bundle,
        data=data,
        feedback_db=tmp_path_factory.mktemp("edge") / "feedback.sqlite3",
        admin_token=TOKEN,
        # Generous budgets: a slow machine must not turn answers into degraded ones.
        retrieval_budget_ms=500,
        ranking_budget_ms=500,
        reranking_budget_ms=500,
        request_deadline_ms=30_000,
    )
    # raise_server_exceptions=False: a crash must show up as the 500 a real client would see.
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def post(
    client: TestClient, path: str, payload: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    """POST ``payload`` as JSON text with every non-ASCII character escaped: a lone surrogate
    travels as ``\\udfff``, valid JSON that the server decodes back into a lone surrogate."""
    return client.post(
        path,
        content=json.dumps(payload).encode("ascii"),
        headers={"content-type": "application/json", **(headers or {})},
    )


def users(client: TestClient, n: int) -> list[str]:
    service = client.app.state.service  # type: ignore[attr-defined]
    return [str(u) for u in service.pipeline.artifacts.users.ids[:n]]


def an_item(client: TestClient) -> str:
    service = client.app.state.service  # type: ignore[attr-defined]
    return str(service.pipeline.artifacts.items.ids[0])


def error_locations(response: httpx.Response) -> list[list[Any]]:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid request"
    return [entry["loc"] for entry in body["detail"]]


# ------------------------------------------------------------- 1. one request fails its batch
def test_a_lone_surrogate_is_refused_and_its_neighbours_are_answered(client: TestClient) -> None:
    innocent = users(client, 8)
    payloads: list[dict[str, Any]] = [{"user_id": u, "k": 5} for u in innocent]
    payloads.insert(3, {"user_id": "x", "exclude_item_ids": ["\udfff"]})
    with ThreadPoolExecutor(len(payloads)) as pool:
        answers = list(pool.map(lambda p: post(client, "/v1/recommend", p), payloads))
    assert error_locations(answers[3]) == [["body", "exclude_item_ids", 0]]
    for answer in answers[:3] + answers[4:]:
        assert answer.status_code == 200, answer.text
        assert answer.json()["degraded"] == [] and len(answer.json()["items"]) == 5


def test_a_request_the_pipeline_fails_on_does_not_fail_its_bursts(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the edge: the re-ranker raises whenever the poisoned user is in the batch. In 20
    bursts of 9 concurrent requests with one poisoned request each, every innocent request gets
    a normal 200 answer and the poisoned one a degraded 200."""
    service = client.app.state.service  # type: ignore[attr-defined]
    pipeline = service.pipeline
    rerank, recommend = pipeline.reranker.rerank, pipeline.recommend
    batches: list[list[str]] = []
    lock = threading.Lock()

    def fails_for_one_user(*args: Any, **kwargs: Any) -> Any:
        if POISON in kwargs["user_ids"]:
            raise RuntimeError("a rule fails on this user's data")
        return rerank(*args, **kwargs)

    def recording_recommend(requests: Any) -> Any:
        with lock:
            batches.append([r.user_id for r in requests])
        return recommend(requests)

    monkeypatch.setattr(pipeline.reranker, "rerank", fails_for_one_user)
    monkeypatch.setattr(pipeline, "recommend", recording_recommend)
    innocent = users(client, 8)
    failures: list[str] = []
    with ThreadPoolExecutor(9) as pool:
        for burst in range(20):
            payloads = [{"user_id": u, "k": 5} for u in innocent]
            payloads.insert(burst % 9, {"user_id": POISON, "k": 5})
            answers = list(pool.map(lambda p: post(client, "/v1/recommend", p), payloads))
            for payload, answer in zip(payloads, answers, strict=True):
                body = answer.json()
                expected = ["reranking:error"] if payload["user_id"] == POISON else []
                if answer.status_code != 200 or body["degraded"] != expected:
                    failures.append(f"burst {burst} {payload['user_id']}: {answer.text[:200]}")
                elif len(body["items"]) != 5:
                    failures.append(f"burst {burst} {payload['user_id']}: {len(body['items'])}")
    assert not failures, failures
    shared = [b for b in batches if POISON in b and len(b) > 1]
    assert shared, "the poisoned request never shared a batch: the test proved nothing"


# ------------------------------------------------------------------------- ids at the edge
BAD_IDS = ["\udfff", "a\x00b", "a\r\nb", "\n", "\x1b[31m", "\u200b", "a" * 257, ""]


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("field", ["event_id", "user_id", "item_id"])
def test_feedback_ids_must_be_printable_and_short(client: TestClient, field: str, bad: str) -> None:
    event = {"event_id": "e-ok", "user_id": "u", "item_id": an_item(client), "type": "click"}
    response = post(client, "/v1/feedback", {"events": [{**event, field: bad}]})
    assert error_locations(response) == [["body", "events", 0, field]]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_recommend_ids_must_be_printable_and_short(client: TestClient, bad: str) -> None:
    assert error_locations(post(client, "/v1/recommend", {"user_id": bad})) == [["body", "user_id"]]
    excluded = post(client, "/v1/recommend", {"user_id": "u", "exclude_item_ids": ["ok", bad]})
    assert error_locations(excluded) == [["body", "exclude_item_ids", 1]]


@pytest.mark.parametrize("bad", ["a%00b", "a%0D%0Ab", "%1B", "a" * 257])
def test_path_ids_must_be_printable_and_short(client: TestClient, bad: str) -> None:
    assert error_locations(client.get(f"/v1/items/{bad}/similar")) == [["path", "item_id"]]
    assert error_locations(client.get(f"/v1/explore/{bad}")) == [["path", "user_id"]]


def test_admin_item_ids_and_categories_must_be_printable(client: TestClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bad_id = post(client, "/admin/items", {"items": [{"item_id": "new\x00"}]}, auth)
    assert error_locations(bad_id) == [["body", "items", 0, "item_id"]]
    bad_category = {"items": [{"item_id": "new", "categories": ["ok", "\udfff"]}]}
    located = error_locations(post(client, "/admin/items", bad_category, auth))
    assert located == [["body", "items", 0, "categories", 1]]


def test_printable_unicode_ids_are_welcome(client: TestClient) -> None:
    user = "utilisatrice-été-東京-🙂 x"
    answer = post(client, "/v1/recommend", {"user_id": user, "exclude_item_ids": ["ü"]})
    assert answer.status_code == 200 and answer.json()["user_id"] == user
    event = {"event_id": "e-ünï", "user_id": user, "item_id": an_item(client), "type": "click"}
    assert post(client, "/v1/feedback", {"events": [event]}).status_code == 202


@pytest.mark.parametrize(
    "payload",
    [
        {"user_id": "u", "unexpected\udfff": 1},  # the field name comes back in the error
        {"user_id": "u", "context": {"\udfff": "\x00"}},  # ignored by the pipeline
    ],
)
def test_unencodable_text_elsewhere_is_never_a_500(client: TestClient, payload: Any) -> None:
    response = post(client, "/v1/recommend", payload)
    assert response.status_code in (200, 422), response.text
    response.json()  # valid JSON whatever came in


# ------------------------------------------------------------------------ 7. strict types
@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"user_id": "u", "k": "10"}, "k"),
        ({"user_id": "u", "k": True}, "k"),
        ({"user_id": "u", "k": 10.0}, "k"),
        ({"user_id": "u", "explain": "yes"}, "explain"),
        ({"user_id": "u", "explain": 1}, "explain"),
        ({"user_id": 42}, "user_id"),
    ],
)
def test_json_types_are_not_coerced(client: TestClient, payload: Any, field: str) -> None:
    assert error_locations(post(client, "/v1/recommend", payload)) == [["body", field]]


def test_feedback_types_are_not_coerced(client: TestClient) -> None:
    event = {"event_id": "e-s", "user_id": "u", "item_id": an_item(client), "type": "click"}
    located = error_locations(
        post(client, "/v1/feedback", {"events": [{**event, "timestamp": "1"}]})
    )
    assert located == [["body", "events", 0, "timestamp"]]


# ----------------------------------------------------------------------- 7. timestamps
@pytest.mark.parametrize(
    "timestamp",
    [0, -1, 946_684_799, 1_700_000_000_000],  # 0, negative, 1999, milliseconds as seconds
)
def test_implausible_feedback_timestamps_are_refused(client: TestClient, timestamp: int) -> None:
    event = {"event_id": "e-t", "user_id": "u", "item_id": an_item(client), "type": "click"}
    response = post(client, "/v1/feedback", {"events": [{**event, "timestamp": timestamp}]})
    assert error_locations(response) == [["body", "events", 0, "timestamp"]]


def test_a_timestamp_in_the_near_future_passes_the_edge_but_not_the_log(client: TestClient) -> None:
    event = {"event_id": "e-f", "user_id": "u", "item_id": an_item(client), "type": "click"}
    future = post(client, "/v1/feedback", {"events": [{**event, "timestamp": 4_000_000_000}]})
    assert future.status_code == 422 and "after the server's clock" in future.json()["error"]
    ok = post(client, "/v1/feedback", {"events": [{**event, "timestamp": 1_700_000_000}]})
    assert ok.status_code == 202, ok.text


# --------------------------------------------------------------------------- 2, 3. admin
@pytest.mark.parametrize("token", ["", " ", "short-token", "x" * (MIN_ADMIN_TOKEN_LENGTH - 1)])
def test_an_empty_or_short_admin_token_is_refused_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    with pytest.raises(ValidationError, match="at least 16 are required") as refused:
        ServiceSettings(bundle=tmp_path, admin_token=token)
    monkeypatch.setenv("RECSYS_BUNDLE", str(tmp_path))
    monkeypatch.setenv("RECSYS_ADMIN_TOKEN", token)
    with pytest.raises(ValidationError, match="at least 16 are required"):
        ServiceSettings()  # type: ignore[call-arg]  # from the environment
    if token.strip():
        assert token not in str(refused.value), "the error must not print the token"


@pytest.mark.parametrize(
    "token", ["with a space inside", "non-ascii-tökén-token", "tab\tinside-token"]
)
def test_an_admin_token_a_header_cannot_carry_is_refused(tmp_path: Path, token: str) -> None:
    with pytest.raises(ValidationError, match="visible ASCII"):
        ServiceSettings(bundle=tmp_path, admin_token=token)


def test_the_admin_token_can_come_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    settings = ServiceSettings(bundle=tmp_path, admin_token_file=path)
    assert settings.admin_token_bytes() == TOKEN.encode()
    assert TOKEN not in repr(settings)
    path.write_text("\n")
    with pytest.raises(ValidationError, match="0 characters"):
        ServiceSettings(bundle=tmp_path, admin_token_file=path)
    with pytest.raises(ValidationError, match="cannot be read"):
        ServiceSettings(bundle=tmp_path, admin_token_file=tmp_path / "missing")
    with pytest.raises(ValidationError, match="set one"):
        ServiceSettings(bundle=tmp_path, admin_token=TOKEN, admin_token_file=path)
    assert ServiceSettings(bundle=tmp_path).admin_token_bytes() is None  # admin routes off


@pytest.mark.parametrize(
    "authorization",
    [
        b"Bearer \xa0",  # stripped, this was once the empty token
        b"Bearer ",
        b"Bearer",
        "Bearer é".encode(),  # UTF-8: compare_digest raised TypeError on non-ASCII str (500)
        b"Bearer \xe9",  # the same in Latin-1
        TOKEN.encode(),  # no scheme: was accepted
        f"Basic {TOKEN}".encode(),
        f"Bearer  {TOKEN}".encode(),  # two spaces: the credentials would start with one
        f"Bearer {TOKEN} ".encode(),
        f"Bearer {TOKEN}\xa0".encode("latin-1"),
        f"Bearer {TOKEN[:-1]}".encode(),
        f"Bearer {TOKEN}x".encode(),
    ],
)
def test_invalid_credentials_are_401(client: TestClient, authorization: bytes) -> None:
    service = client.app.state.service  # type: ignore[attr-defined]
    before = service.pipeline.model_version
    bundle = str(service_bundle(client))
    for path, body in [("/admin/reload", {"bundle": bundle}), ("/admin/items", ITEMS)]:
        response = client.post(path, json=body, headers={"Authorization": authorization})
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json() == {"error": "missing or invalid bearer token"}
    assert service.pipeline.model_version == before


ITEMS = {"items": [{"item_id": "admin-edge-item"}]}


def service_bundle(client: TestClient) -> Path:
    return client.app.state.settings.bundle  # type: ignore[attr-defined, no-any-return]


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_is_case_insensitive(client: TestClient, scheme: str) -> None:
    response = client.post(
        "/admin/items", json=ITEMS, headers={"Authorization": f"{scheme} {TOKEN}"}
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "content",
    [b'{"bundle": 5}', b'{"unexpected": 1}', b"{not json", b'{"bundle": "\xff"}', b""],
)
def test_the_token_is_checked_before_the_body(client: TestClient, content: bytes) -> None:
    for path in ("/admin/reload", "/admin/items"):
        anonymous = client.post(path, content=content, headers={"content-type": "application/json"})
        assert anonymous.status_code == 401, anonymous.text
        assert "schema" not in anonymous.text and "detail" not in anonymous.json()


def test_disabled_admin_routes_are_403_whatever_the_body(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    _, bundle = tiny_bundle
    settings = ServiceSettings(bundle=bundle, feedback_db=tmp_path / "feedback.sqlite3")
    with TestClient(create_app(settings)) as anonymous:
        for content in (b"{not json", json.dumps({"bundle": str(bundle)}).encode()):
            response = anonymous.post(
                "/admin/reload",
                content=content,
                headers={"content-type": "application/json", "Authorization": f"Bearer {TOKEN}"},
            )
            assert response.status_code == 403
            assert response.json() == {"error": "admin endpoints are disabled"}


# ------------------------------------------------------------------- 7. reload path logged
@pytest.mark.parametrize("bundle", ["no-such-bundle\r\nFAKE 200 OK", "no-such\x00bundle\x1b[2J"])
def test_a_refused_reload_path_is_logged_and_answered_escaped(
    client: TestClient, caplog: pytest.LogCaptureFixture, bundle: str
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with caplog.at_level(logging.ERROR, logger="serving.routes.admin"):
        response = post(client, "/admin/reload", {"bundle": bundle}, auth)
    assert response.status_code == 409, response.text
    assert response.json()["error"].startswith("bundle refused")
    messages = [record.getMessage() for record in caplog.records if "refused bundle" in record.msg]
    assert len(messages) == 1 and messages[0].isprintable(), messages
    assert "no-such" in messages[0]
    # A path UTF-8 cannot encode is refused at the edge, before anything logs it.
    surrogate = post(client, "/admin/reload", {"bundle": "no-such-\udfff"}, auth)
    assert error_locations(surrogate) == [["body", "bundle"]]


# --------------------------------------------------------------- 7. feedback rate limit
def test_feedback_past_the_clients_rate_is_429_with_retry_after(client: TestClient) -> None:
    app = client.app
    now = [0.0]
    original = app.state.feedback_limiter  # type: ignore[attr-defined]
    app.state.feedback_limiter = ClientRateLimiter(2.0, 3.0, clock=lambda: now[0])  # type: ignore[attr-defined]
    try:
        event = {"user_id": "flood", "item_id": an_item(client), "type": "click"}
        events = [{**event, "event_id": f"flood-{i}"} for i in range(4)]
        assert post(client, "/v1/feedback", {"events": events[:3]}).status_code == 202
        limited = post(client, "/v1/feedback", {"events": events[3:]})
        assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
        assert "too many feedback events" in limited.json()["error"]
        assert client.post("/v1/recommend", json={"user_id": "flood"}).status_code == 200
        now[0] = 0.5  # one event's worth of tokens again
        assert post(client, "/v1/feedback", {"events": events[3:]}).status_code == 202
    finally:
        app.state.feedback_limiter = original  # type: ignore[attr-defined]
    text = client.get("/metrics").text
    assert 'recsys_feedback_events_total{result="rate_limited"} 1.0' in text


def test_the_feedback_rate_limit_defaults_generous_and_can_be_turned_off(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    _, bundle = tiny_bundle
    default = create_app(ServiceSettings(bundle=bundle, feedback_db=tmp_path / "a.sqlite3"))
    limiter = default.state.feedback_limiter
    assert limiter.rate_per_s >= 1000 and limiter.burst >= 5000
    off = ServiceSettings(
        bundle=bundle, feedback_db=tmp_path / "b.sqlite3", feedback_events_per_s=0
    )
    assert create_app(off).state.feedback_limiter is None
    with pytest.raises(ValidationError, match="feedback_burst_events"):
        ServiceSettings(bundle=bundle, feedback_burst_events=10)  # below one full request


def test_the_rate_limiter_keeps_one_bucket_per_client_and_bounded_memory() -> None:
    now = [0.0]
    limiter = ClientRateLimiter(10.0, 20.0, max_clients=3, clock=lambda: now[0])
    assert limiter.take("a", 20) == 0.0
    assert limiter.take("a", 5) == pytest.approx(0.5)  # 5 tokens at 10 a second
    assert limiter.take("b", 20) == 0.0, "another client has its own bucket"
    now[0] = 1.0
    assert limiter.take("a", 10) == 0.0  # refilled 10 in one second
    assert limiter.take("a", 1) > 0
    assert limiter.take("c", 10_000) == 0.0, "a cost above the burst is charged as the burst"
    for client_id in ("d", "e", "f"):
        limiter.take(client_id, 1)
    assert len(limiter._buckets) == 3 and "a" not in limiter._buckets  # least recently used
    assert ClientRateLimiter.retry_after(0.01) == "1" and ClientRateLimiter.retry_after(2.1) == "3"
