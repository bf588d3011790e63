"""New items served without a retrain or restart (RecommenderService.add_items).

Known answers: an item added live is retrieved by the two-tower with its exact score; once
clicked it is trending and goes through the whole funnel (ranking, rules) with nothing degraded;
feedback on it then reaches histories; a known item is re-read, not duplicated; a bad update is
refused with the problem named and changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from data.errors import DataError
from pipeline.feedback_log import FeedbackLog, FeedbackLogConfig
from pipeline.funnel import Pipeline, RecommendRequest
from pipeline.rules_adapter import RuleReranker
from pipeline.service import RecommenderService
from reranking.config import RerankerConfig

# The wall clock: after every event of the tiny world, and feedback must not be from the future.
NOW = int(time.time())


@pytest.fixture
def service(tiny_bundle: tuple[Path, Path], tmp_path: Path) -> Iterator[RecommenderService]:
    _, bundle = tiny_bundle
    with FeedbackLog(FeedbackLogConfig(path=tmp_path / "feedback.sqlite3")) as log:
        # Offline budgets: the assertions are about the catalogue, not about this host's speed.
        served = RecommenderService(bundle, log, enforce_budgets=False)
        yield served
        served.pipeline.close()


def test_a_new_item_is_embedded_into_the_live_index(service: RecommenderService) -> None:
    """The two-tower retrieves an item added live (the memory-mapped index's overlay), with the
    exact score its ranker feature gives."""
    change = service.add_items(pl.DataFrame({"item_id": ["fresh-0"]}), now=NOW)
    assert (change.added, change.updated, change.sources) == (1, 0, ("two_tower",))
    pipeline = service.pipeline
    tower = pipeline.artifacts.retrieval.sources_["two_tower"]
    new_idx = int(pipeline.artifacts.items.index(["fresh-0"])[0])
    users = pipeline.state.batch(pipeline.state.user_ids()[:5], NOW)
    found = tower.retrieve(users, len(pipeline.artifacts.items))
    rows, columns = np.nonzero(found.item_idx == new_idx)
    assert rows.tolist() == list(range(5))
    expected = tower.score(users, np.full((5, 1), new_idx))[:, 0]
    np.testing.assert_allclose(found.scores[rows, columns], expected, rtol=1e-5)


def test_a_trending_new_item_reaches_the_final_slate(service: RecommenderService) -> None:
    """Through the whole funnel: clicks on a new item make it trending (a candidate for
    everyone), the ranker scores it with nothing degraded (store rows it was not built with),
    and a policy that favours new items puts it in the slate of every user it is a candidate
    for (its release time reached the re-ranker's catalogue)."""
    before = len(service.pipeline.artifacts.items)
    frame = pl.DataFrame(
        {"item_id": ["fresh-1"], "created_at": [NOW - 60]},
        schema_overrides={"created_at": pl.Int64},
    )
    service.add_items(frame, now=NOW)
    clicks = [
        service.feedback.make_event(f"c-{i}", f"crowd-{i}", "fresh-1", "click", NOW - 30)
        for i in range(30)
    ]
    assert service.record_feedback(clicks).accepted == 30
    pipeline = service.pipeline
    assert len(pipeline.artifacts.items) == before + 1
    new_idx = int(pipeline.artifacts.items.index(["fresh-1"])[0])
    fans = pipeline.state.user_ids()[:20]
    users = pipeline.state.batch(fans, NOW)
    merged = pipeline.artifacts.retrieval.retrieve(users, exclude=users.seen_matrix(before + 1))
    # Trending is one of five sources sharing 60 candidates here: it places its top item for
    # part of the users (the others' sources fill the list first).
    retrieved = (merged.item_idx == new_idx).any(axis=1)
    assert retrieved.sum() >= 3, retrieved
    requests = [RecommendRequest(u, k=10, now=NOW) for u in fans]
    answers = pipeline.recommend(requests)
    assert all(a.degraded == [] for a in answers), [a.degraded for a in answers]
    # A new-items-first policy: a freshness boost of the whole score spread.
    rules = RerankerConfig.from_mapping(
        {"rules": [{"name": "filter_seen"}, {"name": "freshness_boost", "bonus": 1.0}]}
    )
    favouring = Pipeline(
        pipeline.artifacts,
        pipeline.state,
        ranker=pipeline.ranker,
        reranker=RuleReranker(rules, pipeline.artifacts.catalog),
        enforce_budgets=False,
    )
    reached = np.array(["fresh-1" in a.item_ids for a in favouring.recommend(requests)])
    np.testing.assert_array_equal(reached, retrieved)


def test_feedback_on_a_new_item_reaches_the_history(service: RecommenderService) -> None:
    frame = pl.DataFrame({"item_id": ["fresh-2"]})
    service.add_items(frame, now=NOW)
    event = service.feedback.make_event("e-1", "clicker", "fresh-2", "click", NOW)
    assert service.record_feedback([event]).accepted == 1
    index = int(service.pipeline.artifacts.items.index(["fresh-2"])[0])
    history = service.pipeline.state.batch(["clicker"], NOW + 1).recent_items[0]
    assert history[0] == index


def test_a_known_item_is_re_read_not_duplicated(service: RecommenderService) -> None:
    artifacts = service.pipeline.artifacts
    item = str(artifacts.items.to_ids(np.array([0])).to_list()[0])
    other = artifacts.catalog.category_names[-1]
    change = service.add_items(pl.DataFrame({"item_id": [item], "categories": [[other]]}), now=NOW)
    assert (change.added, change.updated) == (0, 1)
    catalog = service.pipeline.artifacts.catalog
    assert len(service.pipeline.artifacts.items) == len(artifacts.items)
    assert catalog.category_names[catalog.primary_category[0]] == other


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        (pl.DataFrame({"id": ["x"]}), "item_id"),
        (pl.DataFrame({"item_id": ["x", "x"]}), "distinct"),
        (pl.DataFrame({"item_id": [""]}), "non-empty"),
        (pl.DataFrame({"item_id": ["x"], "price": [3.0]}), "unknown item columns"),
        (pl.DataFrame({"item_id": ["x"], "created_at": ["yesterday"]}), "created_at"),
        (pl.DataFrame({"item_id": [1]}), "string"),
        (pl.DataFrame({"item_id": ["x"], "categories": ["a|b"]}), "lists of strings"),
        (pl.DataFrame({"item_id": []}, schema={"item_id": pl.String}), "no items"),
    ],
)
def test_a_bad_update_is_refused_and_changes_nothing(
    service: RecommenderService, frame: pl.DataFrame, problem: str
) -> None:
    pipeline = service.pipeline
    with pytest.raises(DataError, match=problem):
        service.add_items(frame, now=NOW)
    assert service.pipeline is pipeline


def test_added_items_and_their_feedback_survive_a_restart(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    """Logged before they are served, replayed at start-up before the feedback log: the item is
    served again, with the last values given, and the clicks on it are back in the history."""
    _, bundle = tiny_bundle
    path = tmp_path / "feedback.sqlite3"
    with FeedbackLog(FeedbackLogConfig(path=path)) as log:
        first = RecommenderService(bundle, log, enforce_budgets=False)
        first.add_items(pl.DataFrame({"item_id": ["kept-1"], "created_at": [NOW - 10]}), now=NOW)
        names = first.pipeline.artifacts.catalog.category_names
        first.add_items(pl.DataFrame({"item_id": ["kept-1"], "categories": [[names[0]]]}), now=NOW)
        first.record_feedback([log.make_event("k-1", "keeper", "kept-1", "click", NOW)])
        live_items = first.pipeline.artifacts.items
        first.pipeline.close()
    with FeedbackLog(FeedbackLogConfig(path=path)) as log:
        second = RecommenderService(bundle, log, enforce_budgets=False)
        artifacts = second.pipeline.artifacts
        index = int(artifacts.items.index(["kept-1"])[0])
        assert index == int(live_items.index(["kept-1"])[0])
        assert artifacts.catalog.created_at[index] == NOW - 10  # not overwritten by the null
        assert (
            artifacts.catalog.category_names[artifacts.catalog.primary_category[index]] == names[0]
        )
        assert second.pipeline.state.batch(["keeper"], NOW + 1).recent_items[0, 0] == index
        second.pipeline.close()
