"""Progress of training and evaluation: stage events in order; a quiet CLI off a terminal."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from cli.main import main
from data.progress import StageLog, stage
from evaluation.offline import OfflineConfig, evaluate_offline
from pipeline.artifacts import train_bundle
from tests.conftest import TINY_CONFIG


def test_stages_nest_and_only_the_outermost_are_timed() -> None:
    log = StageLog()
    with stage(log, "outer"), stage(log, "loop", total=3) as steps:
        steps.advance(loss=1.0, recall=None)
        steps.advance()
    with stage(log, "second"):
        pass
    assert log.events == [
        ("started", "outer"),
        ("started", "loop"),
        ("advanced", "loop"),
        ("advanced", "loop"),
        ("finished", "loop"),
        ("finished", "outer"),
        ("started", "second"),
        ("finished", "second"),
    ]
    assert list(log.seconds) == ["outer", "second"]
    with stage(None, "nothing") as steps:  # no reporter: a no-op
        steps.advance(loss=1.0)


def test_a_stage_that_raises_still_finishes() -> None:
    log = StageLog()
    with pytest.raises(ValueError), stage(log, "outer"), stage(log, "broken"):
        raise ValueError("boom")
    with stage(log, "next"):
        pass
    assert log.names("finished") == ["broken", "outer", "next"]
    assert list(log.seconds) == ["outer", "next"]


def test_training_reports_every_stage_in_order(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    data, _ = tiny_bundle
    config = tomllib.loads(TINY_CONFIG)
    log = StageLog()
    train_bundle(data, tmp_path / "bundle", config=config, progress=log)

    sources = [f"fit {kind}" for kind in config["retrieval"]["sources"]]
    ranker = ["ranker training set", "train ranker (lightgbm)", "ranker serving features"]
    retrieval = ["load dataset", *sources, "order sources on validation"]
    outermost = list(log.seconds)
    assert outermost[: len(retrieval)] == retrieval
    assert outermost[-2:] == ["write bundle", "verify bundle"]
    # The ranker's stages in order (the stage may report more between them).
    between = outermost[len(retrieval) : -2]
    assert [name for name in between if name in ranker] == ranker
    started = log.names("started")
    # The two-tower's epochs inside its fit, the boosting rounds inside the ranker's.
    assert started[started.index("fit two_tower") + 1] == "two_tower epochs"
    assert started[started.index("train ranker (lightgbm)") + 1] == "lightgbm rounds"
    epochs = log.names("advanced").count("two_tower epochs")
    rounds = log.names("advanced").count("lightgbm rounds")
    assert 1 <= epochs <= config["retrieval"]["two_tower"]["max_epochs"]
    assert 1 <= rounds <= config["ranking"]["lightgbm"]["max_rounds"]
    assert sorted(started) == sorted(log.names("finished"))


def test_evaluation_reports_its_stages(tiny_bundle: tuple[Path, Path]) -> None:
    data, bundle = tiny_bundle
    log = StageLog()
    config = OfflineConfig(ks=(10,), max_users=120, n_boot=20, batch_size=50)
    report = evaluate_offline(data, bundle, config, progress=log)
    started = log.names("started")
    assert started[0] == "load bundle and data"
    assert "recommend: pipeline" in started and "recommend: each source" in started
    assert [name for name in started if name.startswith("baseline: ")] == [
        f"baseline: {name}" for name in config.baselines
    ]
    assert started[-3:] == ["metrics", "bootstrap", "beyond accuracy and segments"]
    batches = -(-report["n_users"] // config.batch_size)
    assert log.names("advanced").count("recommend: pipeline") == batches
    assert sorted(started) == sorted(log.names("finished"))


def test_the_cli_prints_only_a_summary_line_off_a_terminal(
    tiny_bundle: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, _ = tiny_bundle
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_CONFIG)
    bundle = tmp_path / "bundle"
    assert main(["train", "--data", str(data), "--out", str(bundle), "--config", str(config)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote bundle {bundle} (model_version ")
    # ... with each stage's wall time
    assert "load dataset" in lines[0] and "fit two_tower" in lines[0]


def test_the_cli_shows_progress_when_asked(
    tiny_bundle: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data, bundle = tiny_bundle
    args = ["evaluate", "--data", str(data), "--bundle", str(bundle), "--max-users", "60"]
    assert main([*args, "--n-boot", "10", "--k", "10", "--progress"]) == 0
    err = capsys.readouterr().err
    assert "recommend: pipeline" in err and "bootstrap" in err
