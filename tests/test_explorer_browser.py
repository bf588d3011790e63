"""The funnel explorer: its JSON endpoints, and the page at ``/`` driven in a real browser.

The endpoint tests run everywhere. The browser test drives Debian's Chromium (``/usr/bin/chromium``,
or ``$RECSYS_CHROMIUM``) headless through Playwright's Python package against a real uvicorn
server, and is skipped, with the reason, where either is missing; it never downloads a browser.
Set ``RECSYS_SCREENSHOT=/path/shot.png`` to keep a full-page screenshot of the explored funnel.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import NoMatchFound

from retrieval.base import PAD_ITEM
from serving.app import create_app
from serving.explorer import explorer_router
from serving.settings import ServiceSettings
from tests.browser.server import running_server

CHROMIUM = Path(os.environ.get("RECSYS_CHROMIUM", "/usr/bin/chromium"))
# Headless, and nothing that reaches out to the network (no updates, sync, QUIC probes).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 15_000  # per browser expectation; a cold first funnel pass can take a second
STAGES = ("retrieval", "ranking", "reranking", "total")


def _app(tiny_bundle: tuple[Path, Path], feedback_db: Path) -> FastAPI:
    data, bundle = tiny_bundle
    # Generous budgets: these tests look at what each stage produced, not at degradation.
    settings = ServiceSettings(
        bundle=bundle,
        data=data,
        feedback_db=feedback_db,
        retrieval_budget_ms=2_000,
        ranking_budget_ms=2_000,
        reranking_budget_ms=2_000,
    )
    app = create_app(settings)
    try:  # create_app mounts the explorer; mount it here only where it does not (yet)
        app.url_path_for("explore_user", user_id="u")
    except NoMatchFound:
        app.include_router(explorer_router())
    return app


# ------------------------------------------------------------------------------ JSON endpoints
@pytest.fixture(scope="module")
def client(
    tiny_bundle: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    db = tmp_path_factory.mktemp("explorer_api") / "feedback.sqlite3"
    with TestClient(_app(tiny_bundle, db)) as test_client:
        yield test_client


def _pipeline(client: TestClient) -> Any:
    return client.app.state.service.pipeline  # type: ignore[attr-defined]


def test_sample_users_are_known_distinct_and_bounded(client: TestClient) -> None:
    users = client.get("/v1/explore/_users", params={"n": 7}).json()["user_ids"]
    known = set(_pipeline(client).artifacts.users.ids.to_list())
    assert len(users) == 7 == len(set(users)) and set(users) <= known
    assert client.get("/v1/explore/_users").json()["user_ids"][:1], "default sample is not empty"
    assert client.get("/v1/explore/_users", params={"n": 0}).status_code == 422
    assert client.get("/v1/explore/_users", params={"n": 10_000}).status_code == 422


def test_explore_matches_recommend_and_shows_every_stage(client: TestClient) -> None:
    pipeline = _pipeline(client)
    user = client.get("/v1/explore/_users", params={"n": 3}).json()["user_ids"][1]
    body = client.get(f"/v1/explore/{user}", params={"k": 6}).json()

    assert body["known_user"] and body["user_id"] == user
    assert body["model_version"] == pipeline.model_version
    assert [s["name"] for s in body["sources"]] == list(pipeline.artifacts.retrieval.sources_)
    history = [h["item_id"] for h in body["history"]]
    assert history, "a training user has a history"
    for source in body["sources"]:
        assert source["error"] is None and len(source["items"]) <= 6
        assert [i["rank"] for i in source["items"]] == list(range(1, len(source["items"]) + 1))
        assert not {i["item_id"] for i in source["items"]} & set(history), "seen items excluded"
    assert 0 < body["merged"]["count"] <= body["merged"]["capacity"]
    # the bundle has a trained ranker (LightGBM over the shared features)
    assert body["ranking"]["ranker"] == "RankingStage" and body["ranking"]["items"]
    # the bundle's default rules: the four filters, each reported (nothing left to filter here)
    assert body["reranking"]["reranker"] == "RuleReranker"
    assert [r["rule"] for r in body["reranking"]["rules"]] == [
        "filter_seen",
        "filter_excluded",
        "filter_unavailable",
        "filter_blocked",
    ]
    assert set(STAGES) <= set(body["timings_ms"]) and body["degraded"] == []

    recommend = client.post("/v1/recommend", json={"user_id": user, "k": 6}).json()
    assert [i["item_id"] for i in body["final"]] == [i["item_id"] for i in recommend["items"]]
    assert [i["sources"] for i in body["final"]] == [i["sources"] for i in recommend["items"]]


def test_categories_come_from_the_catalog(client: TestClient) -> None:
    catalog = _pipeline(client).artifacts.catalog
    user = client.get("/v1/explore/_users", params={"n": 2}).json()["user_ids"][0]
    body = client.get(f"/v1/explore/{user}").json()
    first = body["final"][0]
    index = catalog.items.index([first["item_id"]])[0]
    expected = [catalog.category_names[c] for c in catalog.categories[index].indices]
    assert first["categories"] == expected


def test_unknown_user_gets_the_cold_start_funnel(client: TestClient) -> None:
    body = client.get("/v1/explore/somebody-new", params={"k": 4}).json()
    assert not body["known_user"] and body["history"] == []
    assert len(body["final"]) == 4 and all(item["sources"] for item in body["final"])


def test_bad_input_is_a_4xx(client: TestClient) -> None:
    assert client.get("/v1/explore/u", params={"k": 0}).status_code == 422
    assert client.get("/v1/explore/" + "x" * 300).status_code == 422
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/static/secrets.txt").status_code == 404


def test_page_and_assets_are_served_locally(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        assert client.get(asset).status_code == 200, asset
    assert "http://" not in page.text and "https://" not in page.text, "no external resources"


class _ReverseRanker:
    """Scores the merged candidates in reverse merge order (a known answer)."""

    def score(self, retrieval: Any, users: Any, merged: Any, now: Any) -> np.ndarray:
        m = merged.item_idx.shape[1]
        scores = np.broadcast_to(np.arange(m, dtype=np.float32), merged.item_idx.shape).copy()
        scores[merged.item_idx == PAD_ITEM] = -np.inf
        return scores


class _DropFirstReranker:
    """Removes each user's top item, reporting it the way reranking.engine does."""

    def rerank(
        self, item_idx: np.ndarray, scores: np.ndarray, *, k: int, **_: Any
    ) -> tuple[np.ndarray, np.ndarray, list[list[dict[str, Any]]]]:
        notes = [
            [
                {
                    "step": 0,
                    "rule": "drop_first",
                    "actions": [
                        {"kind": "removed", "item": int(row[0]), "from": 0, "to": -1, "reason": "x"}
                    ],
                }
            ]
            for row in item_idx
        ]
        return item_idx[:, 1 : k + 1], scores[:, 1 : k + 1], notes


def test_attached_ranker_and_reranker_are_shown(client: TestClient) -> None:
    pipeline = _pipeline(client)
    user = client.get("/v1/explore/_users", params={"n": 2}).json()["user_ids"][0]
    pipeline.ranker, pipeline.reranker = _ReverseRanker(), _DropFirstReranker()
    try:
        body = client.get(f"/v1/explore/{user}", params={"k": 5}).json()
    finally:
        pipeline.ranker = pipeline.reranker = None
    ranking = body["ranking"]
    assert ranking["ranker"] == "_ReverseRanker" and ranking["error"] is None
    scores = [item["score"] for item in ranking["items"]]
    assert scores == sorted(scores, reverse=True) and scores[0] == body["merged"]["count"] - 1
    (rule,) = body["reranking"]["rules"]
    assert body["reranking"]["reranker"] == "_DropFirstReranker" and rule["rule"] == "drop_first"
    (action,) = rule["actions"]
    assert action["item_id"] == ranking["items"][0]["item_id"], "item index resolved to its id"
    assert action["item_id"] not in [item["item_id"] for item in body["final"]]
    assert [item["item_id"] for item in body["final"]] == [
        item["item_id"] for item in ranking["items"][1:6]
    ]


class _FailingRanker:
    def score(self, *_: Any) -> np.ndarray:
        raise RuntimeError("ranker exploded")


def test_failing_stages_are_reported_not_raised(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = _pipeline(client)
    source = next(iter(pipeline.artifacts.retrieval.sources_.values()))

    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("source exploded")

    monkeypatch.setattr(source, "retrieve", broken)
    monkeypatch.setattr(pipeline, "ranker", _FailingRanker())
    response = client.get("/v1/explore/someone")
    assert response.status_code == 200
    body = response.json()
    failed = [s for s in body["sources"] if s["error"]]
    assert [s["name"] for s in failed] == [source.name] and "exploded" in failed[0]["error"]
    assert "exploded" in body["merged"]["error"] and body["ranking"]["items"] == []
    assert "retrieval:error" in body["degraded"] and len(body["final"]) == 10, "fallback served"

    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "ranker", _FailingRanker())
    body = client.get("/v1/explore/someone").json()
    assert body["ranking"]["error"] == "RuntimeError: ranker exploded"
    assert "ranking:error" in body["degraded"] and len(body["final"]) == 10


# ------------------------------------------------------------------------------ the browser
def _browser_missing() -> str | None:
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright Python package is not installed (pip install playwright)"
    return None


@pytest.fixture(scope="module")
def server_url(
    tiny_bundle: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    db = tmp_path_factory.mktemp("explorer_browser") / "feedback.sqlite3"
    with running_server(_app(tiny_bundle, db)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = _browser_missing()
    if missing is not None:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.mark.slow
def test_explore_a_user_then_click_an_item(browser: Any, server_url: str) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    outside: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("request", lambda r: None if r.url.startswith(server_url) else outside.append(r.url))
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    page.goto(server_url + "/")
    options = page.get_by_test_id("user-select").locator("option")
    expect(options).to_have_count(21)  # the placeholder and 20 sample users
    user = options.nth(1).get_attribute("value")
    assert user
    page.get_by_label("Sample user").select_option(user)

    funnel = page.get_by_test_id("funnel")
    expect(funnel).to_have_attribute("data-state", "ready")
    expect(page.get_by_test_id("summary-user")).to_have_text(user)
    expect(page.get_by_test_id("summary-path")).to_have_text("known user")
    sources = page.get_by_test_id("source")
    expect(sources).not_to_have_count(0)
    for i in range(sources.count()):
        expect(sources.nth(i).locator("tbody tr").first).to_be_visible()
    expect(page.get_by_test_id("merged-count")).to_have_text(re.compile(r"^[1-9]\d* of \d+$"))
    expect(page.get_by_test_id("ranker-name")).to_contain_text("ranker: RankingStage")
    expect(page.get_by_test_id("ranking").locator("tbody tr").first).to_be_visible()
    for stage in STAGES:
        expect(page.get_by_test_id(f"timing-{stage}")).to_contain_text(re.compile(r"\d ms$"))
    expect(page.get_by_test_id("degraded")).to_have_text("none")
    final = page.get_by_test_id("final-item")
    expect(final).to_have_count(10)
    before = [row.get_attribute("data-item-id") for row in final.all()]
    history = page.get_by_test_id("history-item")
    expect(history.first).to_be_visible()

    clicked = before[0]
    final.first.get_by_role("button", name=f"Send a click on {clicked}").click()
    expect(history.first).to_have_attribute("data-item-id", str(clicked))  # newest first
    expect(page.locator(f'[data-testid="final-item"][data-item-id="{clicked}"]')).to_have_count(0)
    expect(final).to_have_count(10)
    after = [row.get_attribute("data-item-id") for row in final.all()]
    assert after != before and clicked not in after
    expect(page.locator("tr.is-new")).not_to_have_count(0)
    if screenshot := os.environ.get("RECSYS_SCREENSHOT"):
        page.screenshot(path=screenshot, full_page=True)

    page.get_by_label("or any user id").fill("a-brand-new-visitor")
    page.get_by_role("button", name="Explore").click()
    expect(page.get_by_test_id("summary-path")).to_have_text(re.compile("cold start"))
    expect(page.get_by_test_id("final-item")).to_have_count(10)
    assert page.url.endswith("?user=a-brand-new-visitor")

    assert errors == [], f"errors in the page: {errors}"
    assert outside == [], f"the page fetched outside the app: {outside}"
    page.close()
