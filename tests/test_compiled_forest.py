"""The compiled ranker: the same scores as LightGBM, a cache that cannot serve stale code, and
LightGBM whenever compiling fails or disagrees."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from data.errors import ConfigError
from ranking import compiled_forest
from ranking.compiled_forest import (
    CACHE_ENTRIES,
    CompiledForest,
    compile_forest,
    probe_rows,
    prune_cache,
    split_thresholds,
)
from ranking.lgbm import LightGBMConfig, LightGBMRanker
from ranking.stage import RankingConfig
from ranking.training_set import TrainingSet

N_FEATURES = 6


def _groups(seed: int, n_groups: int = 60, size: int = 20) -> TrainingSet:
    """Query groups whose relevance depends on the features, with missing values."""
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(n_groups * size, N_FEATURES)).astype(np.float32)
    values[rng.random(values.shape) < 0.15] = np.nan
    signal = np.nan_to_num(values[:, 0]) + 0.5 * np.nan_to_num(values[:, 1])
    labels = (signal + rng.normal(0, 0.5, len(signal)) > 1.0).astype(np.float32)
    return TrainingSet(
        values=values,
        labels=labels,
        weights=np.ones(len(labels), dtype=np.float32),
        groups=np.full(n_groups, size, dtype=np.int64),
        names=tuple(f"f{j}" for j in range(N_FEATURES)),
        group_users=np.arange(n_groups, dtype=np.int32),
        item_idx=np.tile(np.arange(size, dtype=np.int32), n_groups),
        retrieved=np.ones(len(labels), dtype=bool),
        cut=0,
    )


CONFIG = LightGBMConfig(num_threads=1, min_data_in_leaf=5, max_rounds=25, num_leaves=7)


@pytest.fixture(scope="module")
def ranker() -> LightGBMRanker:
    return LightGBMRanker(CONFIG).fit(_groups(0), _groups(1))


@pytest.fixture(scope="module")
def forest(ranker: LightGBMRanker, tmp_path_factory: pytest.TempPathFactory) -> CompiledForest:
    compiled = compile_forest(ranker.booster_, cache_dir=tmp_path_factory.mktemp("forest"))
    assert compiled is not None
    return compiled


def test_probe_rows_sit_on_every_split_threshold(ranker: LightGBMRanker) -> None:
    thresholds = split_thresholds(ranker.booster_)
    assert thresholds  # the model splits on something
    rows = probe_rows(ranker.booster_, 256)
    for feature, values in thresholds.items():
        at = np.isin(rows[:, feature], np.asarray(values, dtype=np.float32))
        assert at.any(), f"no probe row on a threshold of feature {feature}"
        assert np.isnan(rows[:, feature]).any()


def test_compiled_scores_equal_lightgbm_on_the_branch_edges(
    ranker: LightGBMRanker, forest: CompiledForest
) -> None:
    rows = probe_rows(ranker.booster_, 2_000, seed=3)
    expected = ranker.booster_.predict(rows, num_threads=1)
    np.testing.assert_allclose(forest.predict(rows), expected, rtol=0, atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    rows=arrays(
        np.float32,
        st.tuples(st.integers(1, 40), st.just(N_FEATURES)),
        elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
    )
)
def test_compiled_scores_equal_lightgbm_on_any_rows(
    ranker: LightGBMRanker, forest: CompiledForest, rows: np.ndarray
) -> None:
    expected = ranker.booster_.predict(rows, num_threads=1)
    np.testing.assert_allclose(forest.predict(rows), expected, rtol=0, atol=1e-9)


def test_the_cache_is_written_once_and_reused(ranker: LightGBMRanker, tmp_path: Path) -> None:
    first = compile_forest(ranker.booster_, cache_dir=tmp_path)
    cached = sorted(os.listdir(tmp_path))
    assert first is not None
    assert [Path(name).suffix for name in cached] == [".lock", ".o", ".sha256"]
    again = compile_forest(ranker.booster_, cache_dir=tmp_path)
    assert again is not None and sorted(os.listdir(tmp_path)) == cached
    rows = probe_rows(ranker.booster_, 100, seed=5)
    np.testing.assert_array_equal(again.predict(rows), first.predict(rows))
    # Another model gets its own entry: never the first model's code.
    other = LightGBMRanker(replace(CONFIG, seed=3, feature_fraction=0.5)).fit(_groups(2))
    assert compile_forest(other.booster_, cache_dir=tmp_path) is not None
    assert len(list(tmp_path.glob("*.o"))) == 2


@pytest.mark.parametrize("damage", ["truncated", "garbage", "digest lost"])
def test_a_damaged_cache_entry_is_compiled_again(
    ranker: LightGBMRanker, tmp_path: Path, damage: str
) -> None:
    # LLVM aborts the process on a damaged object file: it must never be handed one.
    assert compile_forest(ranker.booster_, cache_dir=tmp_path) is not None
    (entry,) = tmp_path.glob("*.o")
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:100])
    elif damage == "garbage":
        entry.write_bytes(b"garbage" * 100)
    else:
        entry.with_suffix(".sha256").unlink()
    forest = compile_forest(ranker.booster_, cache_dir=tmp_path)
    assert forest is not None
    rows = probe_rows(ranker.booster_, 200, seed=9)
    np.testing.assert_allclose(
        forest.predict(rows), ranker.booster_.predict(rows, num_threads=1), rtol=0, atol=1e-9
    )
    assert compile_forest(ranker.booster_, cache_dir=tmp_path) is not None  # repaired entry


def test_the_cache_keeps_the_most_recently_used_models(
    ranker: LightGBMRanker, tmp_path: Path
) -> None:
    old = []
    for n in range(CACHE_ENTRIES + 5):  # older entries, oldest first
        path = tmp_path / f"{n:032x}.o"
        path.write_bytes(b"stale")
        os.utime(path, (1_000_000 + n, 1_000_000 + n))
        old.append(path)
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("not ours")
    assert compile_forest(ranker.booster_, cache_dir=tmp_path) is not None
    kept = {p.name for p in tmp_path.iterdir() if p.suffix not in (".sha256", ".lock")}
    assert len(kept) == CACHE_ENTRIES + 1  # the entries plus the file that is not ours
    assert "notes.txt" in kept
    # The new model and the most recent old entries stay; the oldest six go.
    assert {p.name for p in old[:6]}.isdisjoint(kept)
    assert {p.name for p in old[6:]} <= kept
    # A cache hit makes its entry the most recent: it survives the next prune.
    (newest,) = kept - {p.name for p in old} - {"notes.txt"}
    os.utime(tmp_path / newest, (1, 1))
    assert compile_forest(ranker.booster_, cache_dir=tmp_path) is not None
    assert prune_cache(tmp_path, 1)
    assert {p.name for p in tmp_path.iterdir()} == {
        newest,
        Path(newest).with_suffix(".sha256").name,
        Path(newest).with_suffix(".lock").name,
        "notes.txt",
    }


def test_an_unwritable_cache_only_costs_the_cache(ranker: LightGBMRanker, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert compile_forest(ranker.booster_, cache_dir=blocker / "cache") is not None


def test_a_failed_compile_leaves_lightgbm_scoring(
    ranker: LightGBMRanker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object) -> CompiledForest:
        raise RuntimeError("no LLVM here")

    monkeypatch.setattr(compiled_forest, "_compile", broken)
    fresh = LightGBMRanker(CONFIG).fit(_groups(0), _groups(1))
    with caplog.at_level(logging.WARNING):
        fresh.warm()
    assert fresh.compiled_ is None and "no LLVM here" in caplog.text
    rows = _groups(4).values
    np.testing.assert_array_equal(fresh.predict(rows), ranker.predict(rows))


def test_a_compiled_forest_that_disagrees_is_not_used(
    ranker: LightGBMRanker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    honest = CompiledForest.predict
    monkeypatch.setattr(CompiledForest, "predict", lambda self, rows: honest(self, rows) + 1e-4)
    with caplog.at_level(logging.WARNING):
        assert compile_forest(ranker.booster_, cache_dir=tmp_path) is None
    assert "differs from LightGBM" in caplog.text
    monkeypatch.setattr(CompiledForest, "predict", lambda self, rows: honest(self, rows) * np.nan)
    assert compile_forest(ranker.booster_, cache_dir=tmp_path) is None


def test_warm_compiles_once_and_predictions_do_not_change(tmp_path: Path) -> None:
    ranker = LightGBMRanker(CONFIG).fit(_groups(0), _groups(1))
    rows = _groups(6).values
    before = ranker.predict(rows)
    ranker.warm()
    assert ranker.compiled_ is not None
    compiled = ranker.compiled_
    ranker.warm()
    assert ranker.compiled_ is compiled
    np.testing.assert_allclose(ranker.predict(rows), before, rtol=1e-6, atol=1e-7)
    ranker.fit(_groups(2))  # a refit drops the old model's code
    assert ranker.compiled_ is None


def test_compiled_false_keeps_lightgbm() -> None:
    ranker = LightGBMRanker(replace(CONFIG, compiled=False)).fit(_groups(0))
    ranker.warm()
    assert ranker.compiled_ is None


def test_the_setting_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match="compiled must be true or false"):
        RankingConfig.from_mapping({"lightgbm": {"compiled": "yes"}})
    assert RankingConfig.from_mapping({"lightgbm": {"compiled": False}}).lightgbm.compiled is False


def test_save_load_keeps_the_setting_and_load_does_not_compile(tmp_path: Path) -> None:
    ranker = LightGBMRanker(replace(CONFIG, compiled=False)).fit(_groups(0))
    ranker.save(tmp_path)
    loaded = LightGBMRanker.load(tmp_path)
    assert loaded.config.compiled is False and loaded.compiled_ is None
    assert isinstance(loaded.booster_, lgb.Booster)
