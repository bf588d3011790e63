"""The HTTP contract (README, "HTTP API"), through FastAPI's TestClient (lifespan included)."""

from __future__ import annotations

import gc
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.settings import ServiceSettings

TOKEN = "s3cret-admin-token"  # admin tokens have at least 16 characters


@pytest.fixture
def client(tiny_bundle: tuple[Path, Path], tmp_path: Path) -> Iterator[TestClient]:
    data, bundle = tiny_bundle
    settings = ServiceSettings(
        bundle=bundle,
        data=data,
        feedback_db=tmp_path / "feedback.sqlite3",
        admin_token=TOKEN,
        max_body_bytes=20_000,
        retrieval_budget_ms=500,
        ranking_budget_ms=500,
        reranking_budget_ms=500,
        request_deadline_ms=10_000,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def a_user(client: TestClient) -> str:
    service = client.app.state.service  # type: ignore[attr-defined]
    return str(service.pipeline.artifacts.users.ids[0])


def test_recommend_contract(client: TestClient) -> None:
    user = a_user(client)
    response = client.post("/v1/recommend", json={"user_id": user, "k": 7, "explain": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user_id"] == user and len(body["items"]) == 7
    assert [item["rank"] for item in body["items"]] == list(range(1, 8))
    assert all(item["sources"] for item in body["items"])
    assert set(body["timings_ms"]) == {"retrieval", "ranking", "reranking", "total"}
    assert body["degraded"] == [] and body["model_version"]
    assert body["explanation"]["candidates"] > 0
    unknown = client.post("/v1/recommend", json={"user_id": "nobody-knows-me"})
    assert unknown.status_code == 200 and len(unknown.json()["items"]) == 10


def test_feedback_is_idempotent_and_reaches_the_next_request(client: TestClient) -> None:
    user = a_user(client)
    before = client.post("/v1/recommend", json={"user_id": user, "k": 5}).json()["items"]
    clicked = before[0]["item_id"]
    event = {"event_id": "e-1", "user_id": user, "item_id": clicked, "type": "click"}
    first = client.post("/v1/feedback", json={"events": [event, event]})
    assert first.status_code == 202 and first.json() == {"accepted": 1, "duplicates": 1}
    again = client.post("/v1/feedback", json={"events": [event]})
    assert again.json() == {"accepted": 0, "duplicates": 1}
    after = client.post("/v1/recommend", json={"user_id": user, "k": 5}).json()["items"]
    assert clicked not in [item["item_id"] for item in after], "a clicked item counts as seen"


def test_similar_items(client: TestClient) -> None:
    service = client.app.state.service  # type: ignore[attr-defined]
    item = str(service.pipeline.artifacts.items.ids[0])
    response = client.get(f"/v1/items/{item}/similar", params={"k": 4})
    assert response.status_code == 200
    items = response.json()["items"]
    assert len(items) == 4 and item not in [i["item_id"] for i in items]
    missing = client.get("/v1/items/no-such-item/similar")
    assert missing.status_code == 404 and "no-such-item" in missing.json()["error"]


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"user_id": ""},
        {"user_id": "u", "k": 0},
        {"user_id": "u", "k": 100000},
        {"user_id": "u", "unexpected": 1},
        {"user_id": 5},
        {"user_id": "u", "exclude_item_ids": "not-a-list"},
    ],
)
def test_bad_recommend_input_is_422(client: TestClient, payload: dict) -> None:
    response = client.post("/v1/recommend", json=payload)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid request"


def test_bad_feedback_is_4xx(client: TestClient) -> None:
    bad_type = {"events": [{"event_id": "x", "user_id": "u", "item_id": "i", "type": "teleport"}]}
    response = client.post("/v1/feedback", json=bad_type)
    assert response.status_code == 422 and "teleport" in response.json()["error"]
    assert client.post("/v1/feedback", json={"events": []}).status_code == 422
    assert (
        client.post(
            "/v1/feedback", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )


def test_oversized_body_is_413(client: TestClient) -> None:
    response = client.post(
        "/v1/recommend", content=b"x" * 30_000, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


def test_health_readiness_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "model_version": None}
    assert client.get("/readyz").json()["status"] == "ok"
    client.post("/v1/recommend", json={"user_id": "someone"})
    text = client.get("/metrics").text
    assert "recsys_http_requests_total" in text and "recsys_stage_latency_seconds_bucket" in text
    assert client.get("/openapi.json").status_code == 200


def test_slow_or_failing_stages_answer_200_degraded(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault contract over HTTP: a stage past its budget (500 ms here) or raising gives a
    full 200 answer from its fallback, flagged in ``degraded`` and counted in the metrics."""
    pipeline = client.app.state.service.pipeline  # type: ignore[attr-defined]
    retrieve, ranker = pipeline.artifacts.retrieval.retrieve, pipeline.ranker

    def slow_retrieve(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.6)
        return retrieve(*args, **kwargs)

    def failing_score(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("ranker shard unreachable")

    monkeypatch.setattr(pipeline.artifacts.retrieval, "retrieve", slow_retrieve)
    monkeypatch.setattr(ranker, "score", failing_score)
    answer = client.post("/v1/recommend", json={"user_id": a_user(client), "k": 6})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["degraded"] == ["retrieval:timeout", "ranking:error"]
    assert len(body["items"]) == 6 and all(item["sources"] == ["popular"] for item in body["items"])
    text = client.get("/metrics").text
    for stage in ("retrieval", "ranking"):
        assert f'recsys_degraded_responses_total{{stage="{stage}"}} 1.0' in text


def test_a_request_past_its_deadline_gets_the_fallback(
    tiny_bundle: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch stuck inside a step (cooperative budgets cannot stop it) does not hold the
    requests: past the deadline each gets popular items minus its seen ones, a 200."""
    data, bundle = tiny_bundle
    settings = ServiceSettings(
        bundle=bundle, data=data, feedback_db=tmp_path / "fb.sqlite3", request_deadline_ms=100
    )
    with TestClient(create_app(settings)) as client:
        pipeline = client.app.state.service.pipeline  # type: ignore[attr-defined]
        unstuck = threading.Event()
        score = pipeline.ranker.score

        def stuck_score(*args: Any, **kwargs: Any) -> Any:
            unstuck.wait(timeout=30)
            return score(*args, **kwargs)

        monkeypatch.setattr(pipeline.ranker, "score", stuck_score)
        user = a_user(client)
        seen = set(pipeline.state.batch([user], 10**9).recent_items[0].tolist())
        try:
            started = time.perf_counter()
            answer = client.post("/v1/recommend", json={"user_id": user, "k": 5})
            waited = time.perf_counter() - started
        finally:
            unstuck.set()
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["degraded"] == ["pipeline:timeout"] and waited < 5
        items = [item["item_id"] for item in body["items"]]
        assert len(items) == 5 and all(item["sources"] == ["popular"] for item in body["items"])
        assert not {pipeline.artifacts.items.index([i])[0] for i in items} & seen


def request_count(client: TestClient, route: str, status: int) -> float:
    prefix = f'recsys_http_requests_total{{route="{route}",status="{status}"}} '
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


def test_requests_are_counted_by_route_and_status(client: TestClient) -> None:
    before = {
        key: request_count(client, *key)
        for key in (("/v1/recommend", 200), ("/v1/recommend", 422), ("unmatched", 404))
    }
    client.post("/v1/recommend", json={"user_id": "someone"})
    client.post("/v1/recommend", json={"user_id": "someone"})
    client.post("/v1/recommend", json={"k": 3})  # no user_id
    client.get("/no/such/route")
    after = {key: request_count(client, *key) for key in before}
    assert {key: after[key] - before[key] for key in before} == {
        ("/v1/recommend", 200): 2,
        ("/v1/recommend", 422): 1,
        ("unmatched", 404): 1,
    }


def test_admin_reload(client: TestClient, tiny_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    _, bundle = tiny_bundle
    body = {"bundle": str(bundle)}
    assert client.post("/admin/reload", json=body).status_code == 401
    wrong = client.post("/admin/reload", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ok = client.post("/admin/reload", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200, ok.text
    corrupt = tmp_path / "corrupt"
    shutil.copytree(bundle, corrupt)
    (corrupt / "ids" / "items.parquet").write_bytes(b"garbage")
    refused = client.post(
        "/admin/reload", json={"bundle": str(corrupt)}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert refused.status_code == 409 and "checksum" in refused.json()["error"]
    assert client.post("/v1/recommend", json={"user_id": "u"}).status_code == 200


def test_the_loaded_bundle_is_kept_out_of_garbage_collections(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    _, bundle = tiny_bundle
    settings = ServiceSettings(
        bundle=bundle, feedback_db=tmp_path / "feedback.sqlite3", admin_token=TOKEN
    )
    with TestClient(create_app(settings)) as client:
        service = client.app.state.service  # type: ignore[attr-defined]

        def collected(obj: object) -> bool:  # get_objects() lists all but the frozen ones
            return any(tracked is obj for tracked in gc.get_objects())

        assert gc.get_freeze_count() > 0 and not collected(service.pipeline)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        reload = client.post("/admin/reload", json={"bundle": str(bundle)}, headers=auth)
        assert reload.status_code == 200, reload.text
        assert not collected(service.pipeline)  # the reloaded bundle's pipeline is frozen too
    assert gc.get_freeze_count() == 0


def test_admin_items(client: TestClient) -> None:
    """New items over HTTP: token required, bad items a 422 naming the problem, then served."""
    body = {"items": [{"item_id": "live-1", "categories": ["c0"], "created_at": 1}]}
    assert client.post("/admin/items", json=body).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    twice = {"items": [{"item_id": "x"}, {"item_id": "x"}]}
    refused = client.post("/admin/items", json=twice, headers=auth)
    assert refused.status_code == 422 and "distinct" in refused.json()["error"]
    assert client.post("/admin/items", json={"items": []}, headers=auth).status_code == 422
    added = client.post("/admin/items", json=body, headers=auth)
    assert added.status_code == 200, added.text
    assert added.json() == {"added": 1, "updated": 0, "sources": ["two_tower"]}
    again = client.post("/admin/items", json=body, headers=auth)
    assert again.json()["added"] == 0 and again.json()["updated"] == 1
    similar = client.get("/v1/items/live-1/similar", params={"k": 3})
    assert similar.status_code == 200 and len(similar.json()["items"]) == 3
    click = {"event_id": "e1", "user_id": "newcomer", "item_id": "live-1", "type": "click"}
    assert client.post("/v1/feedback", json={"events": [click]}).status_code == 202
    answer = client.post("/v1/recommend", json={"user_id": "newcomer", "k": 5})
    assert answer.status_code == 200 and answer.json()["degraded"] == []
    assert "live-1" not in [item["item_id"] for item in answer.json()["items"]]  # seen


def test_the_request_deadline_defaults_to_two_full_batches_at_their_budgets(
    tmp_path: Path,
) -> None:
    # The batch running when a request arrives, then the request's own, every stage at its
    # budget (x 4.5 for 8 requests): only a stuck or overloaded service gets past it.
    assert ServiceSettings(bundle=tmp_path).request_deadline_s() == pytest.approx(2 * 35 * 4.5e-3)
    slow = ServiceSettings(bundle=tmp_path, retrieval_budget_ms=100, max_batch=1)
    assert slow.request_deadline_s() == pytest.approx(2 * 125e-3)
    assert ServiceSettings(bundle=tmp_path, request_deadline_ms=40).request_deadline_s() == 0.04
