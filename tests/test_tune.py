"""``recsys tune``: the derived dataset never holds a test row, the written TOML trains, studies
resume, the sampler is seeded, and config errors prune a trial instead of ending the search."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

import optuna
import polars as pl
import pytest

from cli.main import main
from cli.tune_command import validation_ndcg
from data.dataset import SPLITS_DIR, load_dataset, read_manifest
from data.errors import ConfigError, DataError
from data.prepare import prepare_dataset
from data.schema import UNTIMED_TIMESTAMP, USER_ID
from data.splits import SplitConfig
from pipeline.artifacts import load_config_file, train_bundle
from pipeline.tuning import (
    DEFAULT_SPACE,
    QUOTA_DECAY,
    ChoiceParam,
    FloatParam,
    IntParam,
    TuneConfig,
    active_space,
    config_from_params,
    derive_tuning_dataset,
    dumps_toml,
    geometric_quotas,
    open_study,
    tune,
)

WORLD = ["--users", "120", "--items", "80", "--days", "10", "--interactions", "3000", "--seed", "1"]
# Everything small and single-threaded; the tiny space below then searches two cheap settings.
TINY_BASE: dict[str, Any] = {
    "retrieval": {
        "n_candidates": 40,
        "history_length": 10,
        "sources": ["two_tower", "als", "popular"],
        "quotas": {"two_tower": 20, "als": 15, "popular": 5},
        "index": {"kind": "flat"},
        "two_tower": {
            "embedding_dim": 8,
            "hidden_dims": [8],
            "output_dim": 8,
            "max_epochs": 1,
            "batch_size": 256,
            "num_threads": 1,
        },
        "als": {"factors": 8, "iterations": 2, "num_threads": 1},
    },
    "ranking": {"lightgbm": {"max_rounds": 10, "num_threads": 1, "min_data_in_leaf": 10}},
}
TINY_SPACE = (
    FloatParam("retrieval.als.regularization", 1e-3, 1.0, 0.01, log=True),
    IntParam("ranking.lightgbm.num_leaves", 3, 15, 7),
)


@pytest.fixture(scope="module")
def timed_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic world, split in time (train / valid / test)."""
    out = tmp_path_factory.mktemp("tune") / "timed"
    assert main(["data", "synth", "--out", str(out), *WORLD]) == 0
    return out


@pytest.fixture(scope="module")
def without_test(timed_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``timed_data`` with its test split file deleted: whatever reads it fails."""
    out = tmp_path_factory.mktemp("tune") / "no-test"
    shutil.copytree(timed_data, out)
    (out / SPLITS_DIR / "test.parquet").unlink()
    return out


def _random_data(timed_data: Path, out: Path, *, timed: bool) -> Path:
    log = load_dataset(timed_data).interactions
    # A distinct weight per event: untimed repeats of a (user, item) pair stay tellable apart.
    log = log.with_columns(pl.int_range(1, log.height + 1).cast(pl.Float64).alias("weight"))
    if not timed:
        log = log.with_columns(pl.lit(UNTIMED_TIMESTAMP, dtype=pl.Int64).alias("timestamp"))
    prepare_dataset(
        out, log, split=SplitConfig(method="random", seed=3), source={"kind": "t"}, timed=timed
    )
    return out


@pytest.mark.parametrize("kind", ["temporal", "random", "untimed"])
def test_derived_dataset_scores_on_valid_and_holds_no_test_row(
    kind: str, timed_data: Path, tmp_path: Path
) -> None:
    data = (
        timed_data
        if kind == "temporal"
        else _random_data(timed_data, tmp_path / "data", timed=kind == "random")
    )
    original = load_dataset(data)
    # Derive from a copy without the test split: the derivation cannot have read it.
    blind = tmp_path / "blind"
    shutil.copytree(data, blind)
    (blind / SPLITS_DIR / "test.parquet").unlink()
    derive_tuning_dataset(blind, tmp_path / "derived")
    derived = load_dataset(tmp_path / "derived")

    key = ["user_id", "item_id", "timestamp", "weight"]
    train, valid, test = (original.splits[name].sort(key) for name in ("train", "valid", "test"))
    assert derived.splits["test"].sort(key).equals(valid)
    inner = pl.concat([derived.splits["train"], derived.splits["valid"]]).sort(key)
    assert inner.equals(train)  # train cut in two, nothing added or lost
    assert derived.interactions.height == train.height + valid.height
    for frame in (derived.interactions, *derived.splits.values()):
        assert frame.join(test, on=key, how="semi").height == 0
    assert derived.timed is (kind != "untimed")
    assert derived.splits["valid"].height > 0
    if kind == "temporal":
        assert derived.meta["split"]["method"] == "tuning+temporal"
        assert (
            derived.splits["train"]["timestamp"].max() < derived.splits["valid"]["timestamp"].min()
        )
    else:
        assert derived.meta["split"]["method"] == "tuning+random"
        # Per user: a user held out in the new valid split keeps events in its train split.
        assert set(derived.splits["valid"][USER_ID]) <= set(derived.splits["train"][USER_ID])


def test_derivation_needs_a_validation_split(tmp_path: Path) -> None:
    out = tmp_path / "no-valid"
    assert main(["data", "synth", "--out", str(out), *WORLD, "--valid-fraction", "0"]) == 0
    with pytest.raises(DataError, match="empty valid split"):
        derive_tuning_dataset(out, tmp_path / "derived")


def test_toml_writer_round_trips() -> None:
    config = {
        "top": 1,
        "retrieval": {
            "n_candidates": 300,
            "sources": ["als", "two_tower"],
            "empty": [],
            "two_tower": {"temperature": 1e-05, "logq": True, "hidden_dims": [64, 32]},
            "index": {},
        },
        "ranking": {"lightgbm": {"learning_rate": 0.05, "big": float("inf")}},
        "reranking": {"rules": [{"kind": "seen", "tag": 'a "quoted"\\ \n\t\x7f é'}]},
        "odd key": {"x.y": -3},
    }
    assert tomllib.loads(dumps_toml(config)) == config


def test_toml_writer_refuses_none() -> None:
    with pytest.raises(ConfigError, match=r"ranking\.min_lift"):
        dumps_toml({"ranking": {"min_lift": None}})


def test_space_leaves_out_pinned_keys_and_unused_stages() -> None:
    base = {
        "retrieval": {"sources": ["als", "popular"], "als": {"factors": 32}, "quotas": {"als": 1}},
        "ranking": {"model": "dnn"},
    }
    paths = {param.path for param in active_space(DEFAULT_SPACE, base)}
    assert "retrieval.als.factors" not in paths  # pinned by the base config
    assert QUOTA_DECAY not in paths  # the base config sets the quotas
    assert "retrieval.als.confidence" in paths
    assert not any(p.startswith(("retrieval.two_tower.", "ranking.lightgbm.")) for p in paths)
    assert {p.path for p in active_space(DEFAULT_SPACE, {})} == {p.path for p in DEFAULT_SPACE}
    assert 8 <= len(DEFAULT_SPACE) <= 14


def test_space_defaults_are_the_built_in_config() -> None:
    # Trial 0 is the untuned `recsys train`: every default equals what an empty config gives.
    from ranking.stage import RankingConfig
    from retrieval.stage import RetrievalConfig

    retrieval, ranking = RetrievalConfig(), RankingConfig()
    for param in DEFAULT_SPACE:
        section, *keys = param.path.split(".")
        if param.path == QUOTA_DECAY:
            continue
        if section == "retrieval" and len(keys) == 2:
            value = getattr(retrieval.source_config(keys[0]), keys[1])
        elif section == "retrieval":
            value = getattr(retrieval, keys[0])
        else:
            value = getattr(getattr(ranking, keys[0]), keys[1])
        assert value == param.default, f"{param.path}: update DEFAULT_SPACE to the new default"


def test_quota_decay_shapes_the_quotas() -> None:
    quotas = geometric_quotas(["a", "b", "c"], 300, 0.5)
    assert list(quotas) == ["a", "b", "c"]
    assert quotas["a"] > quotas["b"] > quotas["c"] >= 1
    assert abs(sum(quotas.values()) - 300) <= 2
    assert len(set(geometric_quotas(["a", "b", "c"], 300, 1.0).values())) == 1
    config = config_from_params(
        {"retrieval": {"sources": ["als", "popular"], "n_candidates": 100}},
        {QUOTA_DECAY: 0.5, "retrieval.als.factors": 16},
    )
    assert config["retrieval"]["quotas"] == {"als": 67, "popular": 33}
    assert config["retrieval"]["als"] == {"factors": 16}


def test_params_check_their_ranges() -> None:
    with pytest.raises(ConfigError, match="outside"):
        FloatParam("a.b", 0.1, 1.0, 2.0)
    with pytest.raises(ConfigError, match="low > 0"):
        FloatParam("a.b", 0.0, 1.0, 0.5, log=True)
    with pytest.raises(ConfigError, match="not one of"):
        ChoiceParam("a.b", ("x", "y"), "z")
    with pytest.raises(ConfigError, match="more than once"):
        TuneConfig(n_trials=1, space=(TINY_SPACE[0], TINY_SPACE[0]))
    with pytest.raises(ConfigError, match="--trials"):
        TuneConfig(n_trials=0)


def _proposals(seed: int, runs: tuple[int, ...]) -> list[dict[str, Any]]:
    """The params a study proposes over ``runs`` (one run of n trials each, resumed between),
    scored by a cheap deterministic function instead of training."""

    def objective(trial: optuna.Trial) -> float:
        params = {param.path: param.suggest(trial) for param in DEFAULT_SPACE}
        return float(params["retrieval.two_tower.temperature"] - params["retrieval.als.factors"])

    storage = optuna.storages.InMemoryStorage()
    for n_trials in runs:
        study = open_study(storage, "s", seed=seed, n_startup_trials=3)
        study.optimize(objective, n_trials=n_trials)
    return [trial.params for trial in study.trials]


def test_sampler_is_seeded_and_resumes_without_replaying() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = _proposals(seed=7, runs=(2, 5))
    again = _proposals(seed=7, runs=(2, 5))
    other = _proposals(seed=8, runs=(2, 5))
    assert len(first) == 7
    assert first == again  # past the 3 start-up trials too: TPE is seeded
    assert first != other
    # A sampler seeded as in the first run would draw trial 0's values again for trial 2.
    assert first[2] != first[0]


def _tune(data: Path, out: Path, n_trials: int, **overrides: Any) -> Any:
    config = TuneConfig(n_trials=n_trials, base=TINY_BASE, space=TINY_SPACE, **overrides)
    return tune(data, out, config, scorer=validation_ndcg)


def test_tune_writes_a_config_that_trains_and_resumes(
    without_test: Path, timed_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tuned.toml"
    first = _tune(without_test, out, 2)  # no test file: the objective never reads it
    assert (first.n_trials, first.n_complete) == (2, 2)
    assert first.default_value is not None and 0.0 <= first.best_value <= 1.0
    text = out.read_text()
    assert f"best validation nDCG@10 (pipeline): {first.best_value:.4f}" in text
    assert str(without_test) in text

    # The TOML is what `recsys train --config` reads, with the base and the best trial's values.
    config = load_config_file(out)
    assert config == first.best_config
    assert config["retrieval"]["two_tower"] == TINY_BASE["retrieval"]["two_tower"]
    assert set(config["ranking"]["lightgbm"]) == {*TINY_BASE["ranking"]["lightgbm"], "num_leaves"}
    manifest = train_bundle(timed_data, tmp_path / "bundle", config=config)
    trained = manifest["config"]["ranking"]["lightgbm"]["num_leaves"]
    assert trained == config["ranking"]["lightgbm"]["num_leaves"]

    # The same call again continues the study (same storage next to out, same name).
    second = _tune(without_test, out, 1)
    assert second.study_name == first.study_name
    assert (second.n_trials, second.n_complete) == (3, 3)
    assert second.best_value >= first.best_value
    assert len(optuna.load_study(study_name=first.study_name, storage=second.storage).trials) == 3


def test_a_config_error_prunes_the_trial_and_no_success_is_an_error(
    timed_data: Path, tmp_path: Path
) -> None:
    broken = (FloatParam("retrieval.fetch_per_quota", 0.1, 0.5, 0.2),)  # must be >= 1
    out = tmp_path / "never.toml"
    config = TuneConfig(n_trials=2, base=TINY_BASE, space=broken, storage=tmp_path / "s.db")
    with pytest.raises(ConfigError, match="no trial .* completed.*fetch_per_quota"):
        tune(timed_data, out, config, scorer=validation_ndcg)
    assert not out.exists()
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{tmp_path / 's.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2


def test_cli_usage_and_one_line_errors(
    timed_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as help_exit:
        main(["tune", "--help"])
    assert help_exit.value.code == 0
    assert "--trials" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        main(["tune", "--data", str(timed_data), "--trials", "2"])  # no --out
    assert usage.value.code == 2
    capsys.readouterr()

    out = str(tmp_path / "t.toml")
    for argv, message in (
        (["--data", str(timed_data), "--trials", "0"], "--trials must be an integer >= 1"),
        (["--data", str(tmp_path / "nope"), "--trials", "1"], "does not exist"),
        (["--data", str(timed_data), "--trials", "1", "--timeout", "-1"], "--timeout"),
    ):
        assert main(["tune", *argv, "--out", out]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_manifest_of_derived_dataset_points_at_its_source(timed_data: Path, tmp_path: Path) -> None:
    manifest = derive_tuning_dataset(timed_data, tmp_path / "derived")
    assert manifest["source"]["fingerprint"] == read_manifest(timed_data)["fingerprint"]
    assert (
        manifest["split"]["counts"]["test"] == read_manifest(timed_data)["split"]["counts"]["valid"]
    )
