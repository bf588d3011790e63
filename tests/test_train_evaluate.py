"""`recsys train` -> bundle -> `recsys evaluate`, end to end on a tiny synthetic world."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cli.main import main
from data.dataset import load_dataset
from data.errors import BundleError, ConfigError
from data.schema import TIMESTAMP
from pipeline.artifacts import load_artifacts
from pipeline.bundle import verify_bundle
from ranking.stage import RankingConfig
from retrieval.base import UserBatch
from retrieval.index_config import IndexConfig
from retrieval.stage import RetrievalConfig, RetrievalStage


def test_bundle_is_verified_and_loads(tiny_bundle: tuple[Path, Path]) -> None:
    _, bundle = tiny_bundle
    manifest = verify_bundle(bundle)
    assert manifest["config"]["retrieval"]["n_candidates"] == 60
    artifacts = load_artifacts(bundle)
    # The tiny config pins the merge order; every source is measured on validation.
    names = artifacts.retrieval.source_names
    assert names == ("two_tower", "als", "covisit", "popular", "coldstart", "item_item", "item_knn")
    assert set(artifacts.retrieval.validation_) == set(names)
    assert artifacts.model_version == manifest["model_version"]


def test_served_sources_learn_the_validation_window_and_the_tower_keeps_its_fit(
    tiny_bundle: tuple[Path, Path],
) -> None:
    data, bundle = tiny_bundle
    splits = {name: frame[TIMESTAMP].max() for name, frame in load_dataset(data).splits.items()}
    retrieval = load_artifacts(bundle).retrieval

    # Refitted on train + valid with the validated hyperparameters (refit_after_validation);
    # the two-tower's fit stops at the end of train.
    assert retrieval.sources_["als"].trained_until_ == splits["valid"] > splits["train"]
    assert retrieval.sources_["popular"].t_ref_ == splits["valid"]


def test_evaluate_reports_recall_per_source(
    tiny_bundle: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, bundle = tiny_bundle
    code = main(
        [
            "evaluate",
            "--data",
            str(data),
            "--bundle",
            str(bundle),
            "--cutoffs",
            "10",
            "50",
            "--report",
            str(tmp_path),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    recall = report["retrieval"]
    assert set(recall) == {*RetrievalConfig().sources, "merged", "_meta"}
    for name in ("two_tower", "als", "popular", "merged"):
        assert 0.0 <= recall[name]["recall@10"] <= recall[name]["recall@50"] <= 1.0
    # the synthetic world has real structure: a learned source beats chance by a wide margin
    assert recall["als"]["recall@50"] > 50 / 150
    out = capsys.readouterr().out
    assert "retrieval recall" in out and "ranking on the test split" in out
    # the full report: stages and baselines side by side, intervals, paired tests, oracle, plots
    systems = report["systems"]
    assert {
        "retrieval_order",
        "pipeline",
        "random",
        "popular",
        "recent_popular",
        "als",
        "ease",
        "oracle",
    } <= set(systems)
    ci = systems["pipeline"]["ndcg@10"]
    assert ci["low"] <= ci["mean"] <= ci["high"]
    assert systems["als"]["ndcg@10"]["mean"] > systems["random"]["ndcg@10"]["mean"]
    assert set(report["paired_vs_pipeline"]) >= {"random", "popular", "als", "ease"}
    assert report["oracle_fraction"]["oracle"] == 1.0
    assert report["rules"][0]["after"] == "ranked" and len(report["rules"]) == 5
    for name in ("report.md", "metrics_at_k.png", "funnel.png", "segments.png"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_stage_round_trip_keeps_merge_order_and_output(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    _, bundle = tiny_bundle
    artifacts = load_artifacts(bundle)
    stage = artifacts.retrieval
    stage.save(tmp_path / "stage")
    again = RetrievalStage.load(tmp_path / "stage")
    assert again.source_names == stage.source_names
    from retrieval.base import UserBatch

    users = UserBatch(
        np.array([0, 1, -1], dtype=np.int32),
        np.array([[0, 1, -1], [2, -1, -1], [3, 4, 5]], dtype=np.int32),
        np.zeros((3, 3), dtype=np.int64),
        np.full(3, 10**9, dtype=np.int64),
    )
    np.testing.assert_array_equal(stage.retrieve(users).item_idx, again.retrieve(users).item_idx)


def test_corrupt_bundle_is_refused(tiny_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    _, bundle = tiny_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    target = next(p for p in sorted((copy / "retrieval").rglob("*")) if p.is_file())
    target.write_bytes(target.read_bytes() + b"tampered")
    with pytest.raises(BundleError, match="checksum"):
        load_artifacts(copy)
    code = main(["evaluate", "--data", str(tiny_bundle[0]), "--bundle", str(copy)])
    assert code == 1


def _users() -> UserBatch:
    return UserBatch(
        np.array([0, 1, -1], dtype=np.int32),
        np.array([[0, 1, -1], [2, -1, -1], [3, 4, 5]], dtype=np.int32),
        np.zeros((3, 3), dtype=np.int64),
        np.full(3, 10**9, dtype=np.int64),
    )


def test_each_source_fetches_its_quota_times_fetch_per_quota(
    tiny_bundle: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = load_artifacts(tiny_bundle[1]).retrieval
    config = stage.config
    assert config.fetch_per_quota == 2.0  # the tiny bundle was trained with the default
    asked: dict[str, int] = {}
    for name, source in stage.sources_.items():
        original = source.retrieve

        def recording(
            users: UserBatch, k: int, *, name: str = name, original: Any = original, **kw: Any
        ) -> Any:
            asked[name] = k
            return original(users, k, **kw)

        monkeypatch.setattr(source, "retrieve", recording)
    merged = stage.retrieve(_users())
    expected = {
        name: min(config.n_candidates, math.ceil(2.0 * config.quotas[name]))
        for name in stage.sources_
    }
    assert asked == expected
    assert merged.item_idx.shape == (3, config.n_candidates)


def test_retrieval_config_holds_the_source_and_index_tables() -> None:
    config = RetrievalConfig.from_mapping(
        {"sources": ["als", "popular"], "als": {"factors": 4}, "index": {"kind": "flat"}}
    )
    assert config.source_config("als").factors == 4
    assert config.source_config("popular") == RetrievalConfig().source_config("popular")
    assert config.index.kind == "flat" and set(config.source_configs) == {"als", "popular"}
    with pytest.raises(ConfigError, match="source_configs"):
        RetrievalConfig.from_mapping({"source_configs": {"als": {"factors": 4}}})


def test_the_old_threads_key_still_loads(caplog: pytest.LogCaptureFixture) -> None:
    # `threads` was renamed `num_threads` (the name ALS and LightGBM already used); config files
    # and saved indexes that still say `threads` load, with a logged warning, not an error.
    retrieval = RetrievalConfig.from_mapping({"two_tower": {"threads": 1}, "index": {"threads": 2}})
    assert retrieval.source_config("two_tower").num_threads == 1
    assert retrieval.index.num_threads == 2
    assert RankingConfig.from_mapping({"dnn": {"threads": 3}}).dnn.num_threads == 3
    assert IndexConfig.from_dict({"threads": 4}).num_threads == 4
    assert "'threads' is deprecated, use 'num_threads'" in caplog.text


def test_fetch_per_quota_config() -> None:
    config = RetrievalConfig.from_mapping(
        {"quotas": {"als": 10, "two_tower": 250}, "fetch_per_quota": 3}
    )
    assert config.fetch_depth("als") == 30
    assert config.fetch_depth("two_tower") == config.n_candidates  # 3 x 250 capped at 500
    assert replace(config, fetch_per_quota=None).fetch_depth("als") == config.n_candidates
    for bad in (0.5, "2", True):
        with pytest.raises(ConfigError, match="fetch_per_quota must be >= 1"):
            RetrievalConfig.from_mapping({"fetch_per_quota": bad})


def test_a_bundle_from_before_the_setting_keeps_fetching_n_candidates(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    stage = load_artifacts(tiny_bundle[1]).retrieval
    stage.save(tmp_path / "stage")
    meta_file = tmp_path / "stage" / "stage.json"
    meta = json.loads(meta_file.read_text())
    del meta["config"]["fetch_per_quota"]
    meta_file.write_text(json.dumps(meta))
    old = RetrievalStage.load(tmp_path / "stage")
    assert old.config.fetch_per_quota is None
    assert {old.config.fetch_depth(s) for s in old.sources_} == {old.config.n_candidates}
