"""The online trainer through the real service: steps, publication, kill switch, rollback,
checkpoints and the background cadence (issue 17)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from data.errors import ConfigError
from pipeline.feedback_log import FeedbackEvent, FeedbackLog, FeedbackLogConfig
from pipeline.funnel import RecommendRequest
from pipeline.online_learning import OnlineLearningConfig, ReplayBuffer
from pipeline.service import RecommenderService
from retrieval.als import ALSSource, item_gram
from retrieval.two_tower.model import encode_items
from retrieval.two_tower.source import TwoTowerSource

# A rate well above the default so that a handful of steps moves the scores by a margin no
# float rounding can flip (the default is tuned for a continuous stream, not a test).
FAST = OnlineLearningConfig(min_events=8, learning_rate=0.02, uniform_negatives=64)


def _service(
    bundle: Path, tmp_path: Path, config: OnlineLearningConfig = FAST, **kwargs: object
) -> RecommenderService:
    log = FeedbackLog(FeedbackLogConfig(path=tmp_path / "feedback.db"))
    # No budgets: a loaded test machine would degrade answers for time, which is not what these
    # tests judge; a stage that raises still degrades, and that is what they look for.
    return RecommenderService(
        bundle,
        log,
        enforce_budgets=False,
        online_learning=config,
        background_updates=kwargs.pop("background_updates", False),  # type: ignore[arg-type]
        check_reloads_in_child=False,
        **kwargs,  # type: ignore[arg-type]
    )


def _tower(service: RecommenderService) -> TwoTowerSource:
    tower = service.pipeline.artifacts.retrieval.sources_["two_tower"]
    assert isinstance(tower, TwoTowerSource)
    return tower


def _clicks(
    service: RecommenderService, n: int, prefix: str, *, items: slice = slice(0, 6)
) -> list[FeedbackEvent]:
    """``n`` clicks of 12 known users on a few known items, one second apart, ending now."""
    tower = _tower(service)
    known = np.flatnonzero(tower.features_.item_known)[items]
    ids = service.pipeline.artifacts.items.id_list(known)
    users = service.pipeline.artifacts.users.id_list(np.arange(12))
    now = int(time.time())
    return [
        FeedbackEvent(f"{prefix}-{i}", users[i % 12], ids[i % len(ids)], "click", now - n + i, 1.0)
        for i in range(n)
    ]


@pytest.fixture
def service(tiny_bundle: tuple[Path, Path], tmp_path: Path) -> Iterator[RecommenderService]:
    _, bundle = tiny_bundle
    with_trainer = _service(bundle, tmp_path)
    yield with_trainer
    with_trainer.close()


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="replay_share"):
        OnlineLearningConfig(replay_share=1.0)
    with pytest.raises(ConfigError, match="min_events"):
        OnlineLearningConfig(min_events=0)
    with pytest.raises(ConfigError, match="learning_rate"):
        OnlineLearningConfig(learning_rate=float("nan"))


def test_replay_buffer_keeps_the_most_recent_examples() -> None:
    buffer = ReplayBuffer(capacity=4, history_length=2)
    for start in (0, 3):
        users = np.arange(start, start + 3)
        buffer.add(users, np.full((3, 2), -1), users + 100)
    assert len(buffer) == 4
    assert sorted(buffer.users.tolist()) == [2, 3, 4, 5]  # 0 and 1 were overwritten
    users, _, items = buffer.sample(50, np.random.default_rng(0))
    assert set(users.tolist()) <= {2, 3, 4, 5} and np.array_equal(items, users + 100)


def test_an_update_trains_publishes_and_reembeds_only_touched_items(
    service: RecommenderService,
) -> None:
    tower = _tower(service)
    als = service.pipeline.artifacts.retrieval.sources_["als"]
    assert isinstance(als, ALSSource)
    als_before = als.item_factors_.copy()
    base_version = service.pipeline.model_version
    before = tower.item_vectors_.copy()
    events = _clicks(service, 64, "a")
    users = service.pipeline.state.batch([e.user_id for e in events], np.zeros(len(events)))
    clicked = service.pipeline.artifacts.items.index([e.item_id for e in events])
    score_before = np.diag(tower.score(users, clicked[None, :].repeat(len(events), 0))).mean()

    service.record_feedback(events)
    stats = [service.update_model() for _ in range(3)]
    assert stats[0] is not None and stats[0].examples == 64 and stats[0].steps == 1
    # ALS re-solved exactly the clicked items' factors; its Gram matrix stays Y^T Y.
    clicked_items = np.unique(clicked)
    assert stats[0].als_items == clicked_items.size
    moved = np.flatnonzero((als.item_factors_ != als_before).any(axis=1))
    np.testing.assert_array_equal(moved, clicked_items)
    np.testing.assert_allclose(als._item_gram(), item_gram(als.item_factors_), rtol=1e-6)
    assert stats[1] is None  # nothing new: no step, no new version
    for _ in range(6):  # more of the same stream
        service.record_feedback(_clicks(service, 64, f"b{_}"))
        assert service.update_model() is not None

    version = service.pipeline.model_version
    assert version != base_version and version.startswith(base_version + "+online.")
    # Touched rows were re-embedded by the published model; every other row is bit-identical.
    changed = np.flatnonzero((tower.item_vectors_ != before).any(axis=1))
    assert changed.size > 0
    untouched = np.setdiff1d(np.arange(before.shape[0]), changed)
    np.testing.assert_array_equal(tower.item_vectors_[untouched], before[untouched])
    fresh = encode_items(
        tower.model_, tower.features_, changed, tower.trained_until_, batch_size=256
    )
    np.testing.assert_allclose(tower.item_vectors_[changed], fresh, atol=1e-6)
    # The live index serves the new vectors: searching with an item's vector finds it first.
    ids, _ = tower.index_.search(tower.item_vectors_[changed[:1]], 1)
    assert ids[0, 0] == changed[0]
    # The model learned the stream: its users now score the clicked items higher.
    users = service.pipeline.state.batch([e.user_id for e in events], np.zeros(len(events)))
    score_after = np.diag(tower.score(users, clicked[None, :].repeat(len(events), 0))).mean()
    assert score_after > score_before + 0.05
    # Requests answer with the new version, and every stage still works.
    answer = service.pipeline.recommend([RecommendRequest(user_id=events[0].user_id, k=5)])[0]
    assert answer.model_version == version and not answer.degraded and answer.item_ids
    status = service.online_status()
    assert status["online_step"] == 7 and status["model_freshness_p50_s"] is not None


def test_kill_switch_and_rollback(service: RecommenderService) -> None:
    tower = _tower(service)
    als = service.pipeline.artifacts.retrieval.sources_["als"]
    assert isinstance(als, ALSSource)
    base_version, base_vectors = service.pipeline.model_version, tower.item_vectors_.copy()
    base_factors = als.item_factors_.copy()
    service.record_feedback(_clicks(service, 64, "a"))
    assert service.update_model() is not None
    moved = service.pipeline.model_version

    service.set_online_updates(False)
    service.record_feedback(_clicks(service, 64, "b"))
    assert service.update_model() is None and service.pipeline.model_version == moved
    assert service.online_status()["replay_examples"] == 128  # off: still remembered
    service.set_online_updates(True)

    assert not np.array_equal(als.item_factors_, base_factors)
    assert service.rollback_model() == base_version
    np.testing.assert_array_equal(tower.item_vectors_, base_vectors)
    np.testing.assert_array_equal(als.item_factors_, base_factors)
    service.record_feedback(_clicks(service, 64, "c"))
    stats = service.update_model()
    assert stats is not None
    # Versions never repeat: the steps after a rollback keep counting.
    assert service.pipeline.model_version == f"{base_version}+online.{stats.step}"
    assert service.pipeline.model_version != moved


def test_a_restart_resumes_the_checkpointed_online_weights(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    _, bundle = tiny_bundle
    checkpoint = tmp_path / "online"
    first = _service(bundle, tmp_path, online_checkpoint=checkpoint)
    first.record_feedback(_clicks(first, 64, "a"))
    assert first.update_model() is not None
    version, vectors = first.pipeline.model_version, _tower(first).item_vectors_.copy()
    first_als = first.pipeline.artifacts.retrieval.sources_["als"]
    assert isinstance(first_als, ALSSource)
    factors = first_als.item_factors_.copy()
    first.close()  # checkpoints on the way out

    second = _service(bundle, tmp_path, online_checkpoint=checkpoint)
    try:
        assert second.pipeline.model_version == version
        np.testing.assert_allclose(_tower(second).item_vectors_, vectors, atol=1e-6)
        resumed = second.pipeline.artifacts.retrieval.sources_["als"]
        assert isinstance(resumed, ALSSource)
        np.testing.assert_array_equal(resumed.item_factors_, factors)
        assert second.rollback_model() == version.split("+")[0]
    finally:
        second.close()
    # The rollback was checkpointed too: a third start serves the bundle's weights.
    third = _service(bundle, tmp_path, online_checkpoint=checkpoint)
    try:
        assert third.pipeline.model_version == version.split("+")[0]
    finally:
        third.close()


def test_background_updates_keep_the_model_fresh_under_requests(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    _, bundle = tiny_bundle
    config = OnlineLearningConfig(min_events=4, interval_s=0.05)
    service = _service(bundle, tmp_path, config=config, background_updates=True)
    failures: list[str] = []
    stop = threading.Event()
    users = service.pipeline.artifacts.users.id_list(np.arange(8))

    def requests() -> None:
        while not stop.is_set():
            for answer in service.pipeline.recommend(
                [RecommendRequest(user_id=user, k=5) for user in users]
            ):
                if answer.degraded or not answer.item_ids:
                    failures.append(f"{answer.model_version}: {answer.degraded}")

    reader = threading.Thread(target=requests)
    reader.start()
    try:
        for batch in range(10):
            service.record_feedback(_clicks(service, 16, f"e{batch}"))
            time.sleep(0.05)
        deadline = time.monotonic() + 20
        while service.online_status()["steps_taken"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        reader.join()
        service.close()
    status = service.online_status()
    steps, freshness = status["steps_taken"], status["model_freshness_p50_s"]
    assert isinstance(steps, int) and steps > 0
    assert "+online." in str(status["model_version"])
    assert failures == []
    # Events are a second apart and at most a few cadences old when used.
    assert isinstance(freshness, float) and 0 <= freshness < 30


def test_http_service_reports_the_online_step_and_freshness(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.settings import ServiceSettings

    data, bundle = tiny_bundle
    settings = ServiceSettings(
        bundle=bundle,
        data=data,
        feedback_db=tmp_path / "feedback.sqlite3",
        retrieval_budget_ms=500,
        ranking_budget_ms=500,
        reranking_budget_ms=500,
        online_learning=True,
        online_interval_s=0.05,
        online_checkpoint=tmp_path / "online",
    )
    with TestClient(create_app(settings)) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        events = _clicks(service, 64, "h")
        body = {
            "events": [
                {
                    "event_id": e.event_id,
                    "user_id": e.user_id,
                    "item_id": e.item_id,
                    "type": "click",
                    "timestamp": e.timestamp,
                }
                for e in events
            ]
        }
        assert client.post("/v1/feedback", json=body).status_code == 202
        deadline = time.monotonic() + 20
        while "+online." not in service.pipeline.model_version and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = client.post("/v1/recommend", json={"user_id": events[0].user_id, "k": 3})
        assert answer.status_code == 200
        assert "+online." in answer.json()["model_version"]
        text = client.get("/metrics").text
    assert 'recsys_model_freshness_seconds{quantile="0.5"}' in text
    step = [line for line in text.splitlines() if line.startswith("recsys_model_online_step ")]
    assert step and float(step[0].split()[1]) >= 1
    assert (tmp_path / "online" / "online_state.json").is_file()  # checkpointed at shutdown


def test_als_only_trainer_follows_the_stream(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    # A bundle without a two-tower (small logs): the ALS items alone learn, with the same
    # versions, rollback and checkpoints.
    from pipeline.artifacts import load_artifacts
    from pipeline.online_learning import AlsItemUpdater, AlsOnlineTrainer

    _, bundle = tiny_bundle
    artifacts = load_artifacts(bundle)
    als = artifacts.retrieval.sources_["als"]
    assert isinstance(als, ALSSource)
    trained = als.item_factors_.copy()
    trainer = AlsOnlineTrainer(AlsItemUpdater(als), OnlineLearningConfig(min_events=4))
    users, items = np.arange(8), np.repeat([3, 7], 4)
    assert trainer.submit(users, np.full((8, 2), -1), items, np.full(8, int(time.time()))) == 8
    stats = trainer.update()
    assert stats is not None and stats.als_items == 2 and artifacts.retrieval.online_step == 1
    moved = np.flatnonzero((als.item_factors_ != trained).any(axis=1))
    np.testing.assert_array_equal(moved, [3, 7])
    trainer.save_checkpoint(tmp_path, "v1")
    saved = als.item_factors_.copy()
    trainer.rollback()
    np.testing.assert_array_equal(als.item_factors_, trained)
    assert artifacts.retrieval.online_step == 0
    assert trainer.load_checkpoint(tmp_path, "v1") and not trainer.load_checkpoint(tmp_path, "v2")
    np.testing.assert_array_equal(als.item_factors_, saved)
