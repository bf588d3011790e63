"""Logs without event times (play counts, rating dumps): imported untimed, split per user."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from cli.main import main
from data.dataset import load_dataset
from data.importer import import_interactions
from data.schema import INTERACTION_SCHEMA, UNTIMED_TIMESTAMP


def play_counts(path: Path, n_users: int = 30, n_items: int = 12) -> Path:
    """Every user played 8 artists; counts padded with spaces as some real exports do."""
    rows = [
        f"u{u},a{(u + j) % n_items},{' ' if j % 3 == 0 else ''}{(u * 7 + j) % 50 + 1}"
        for u in range(n_users)
        for j in range(8)
    ]
    path.write_text("user_id,item_id,weight\n" + "\n".join(rows) + "\n")
    return path


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_untimed_import_stamps_every_event_with_the_untimed_constant(tmp_path: Path) -> None:
    path = tmp_path / "plays.csv"
    path.write_text("user_id,item_id,weight\nu1,a1, 316\nu2,a1,4\n")

    frame = import_interactions(path, time_col=None, weight_col="weight")

    expected = pl.DataFrame(
        [("u1", "a1", UNTIMED_TIMESTAMP, 316.0), ("u2", "a1", UNTIMED_TIMESTAMP, 4.0)],
        schema=INTERACTION_SCHEMA,
        orient="row",
    )
    assert_frame_equal(frame, expected)


def test_cli_imports_a_log_without_a_time_column_split_per_user_at_random(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = play_counts(tmp_path / "plays.csv")
    out = tmp_path / "ds"

    code, stdout, err = run_cli(
        ["data", "import", "--interactions", str(log), "--weight-col", "weight", "--out", str(out)],
        capsys,
    )

    assert code == 0, err
    assert "untimed" in stdout
    dataset = load_dataset(out)
    assert dataset.timed is False
    assert dataset.meta["split"]["method"] == "random"
    assert dataset.interactions["timestamp"].unique().to_list() == [UNTIMED_TIMESTAMP]
    # Per-user random: every user keeps training rows, and the splits partition the log.
    sizes = {name: frame.height for name, frame in dataset.splits.items()}
    assert sum(sizes.values()) == 30 * 8
    assert dataset.splits["train"]["user_id"].n_unique() == 30
    code, stdout, _ = run_cli(["data", "info", str(out), "--json"], capsys)
    assert json.loads(stdout)["timed"] is False


def test_given_test_set_on_an_untimed_log_carves_validation_at_random(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = play_counts(tmp_path / "train.csv")
    test = tmp_path / "test.csv"
    test.write_text("user_id,item_id,weight\nu1,a11,3\nu2,a0,1\n")
    out = tmp_path / "ds"

    code, _, err = run_cli(
        ["data", "import", "--interactions", str(train), "--test", str(test)]
        + ["--weight-col", "weight", "--out", str(out)],
        capsys,
    )

    assert code == 0, err
    dataset = load_dataset(out)
    assert dataset.meta["split"]["method"] == "given_test+random"
    assert dataset.splits["test"].height == 2
    assert dataset.splits["valid"].height > 0
    assert dataset.splits["train"].height + dataset.splits["valid"].height == 30 * 8


@pytest.mark.parametrize("method", ["temporal", "leave_last_n"])
def test_splits_that_need_time_are_refused_on_an_untimed_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str
) -> None:
    log = play_counts(tmp_path / "plays.csv")

    code, _, err = run_cli(
        ["data", "import", "--interactions", str(log), "--split", method]
        + ["--out", str(tmp_path / "ds")],
        capsys,
    )

    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert method in lines[0] and "needs event times" in lines[0]


def test_a_named_time_column_that_is_missing_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = play_counts(tmp_path / "plays.csv")

    code, _, err = run_cli(
        ["data", "import", "--interactions", str(log), "--time-col", "ts"]
        + ["--out", str(tmp_path / "ds")],
        capsys,
    )

    assert code == 1 and "'ts'" in err


def test_k_core_on_import_keeps_only_the_core(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [f"u{u},core{i}" for u in range(6) for i in range(6)]  # a 6x6 block: the 5-core
    rows += ["lonely,core0", "u0,rare"]  # a user with 1 item, an item with 1 user
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id\n" + "\n".join(rows) + "\n")
    out = tmp_path / "ds"

    code, _, err = run_cli(
        ["data", "import", "--interactions", str(log), "--k-core", "5", "--out", str(out)], capsys
    )

    assert code == 0, err
    dataset = load_dataset(out)
    assert dataset.interactions.height == 36
    assert "lonely" not in dataset.interactions["user_id"].to_list()
    assert "rare" not in dataset.interactions["item_id"].to_list()
    assert dataset.meta["source"]["k_core"] == 5
