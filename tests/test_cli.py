"""The `recsys data ...` commands end to end: exit codes, one-line errors, dataset contents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from cli.main import main
from data.dataset import load_dataset

TINY_WORLD = ["--users", "120", "--items", "80", "--days", "10", "--interactions", "3000"]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def info_json(path: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    code, out, _ = run_cli(["data", "info", str(path), "--json"], capsys)
    assert code == 0
    return json.loads(out)


def test_synth_then_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    code, _, err = run_cli(["data", "synth", "--out", str(out), *TINY_WORLD, "--seed", "3"], capsys)
    assert code == 0, err
    summary = info_json(out, capsys)
    assert summary["has_world"] and summary["has_items"]
    assert 0 < summary["users"] <= 120 and 0 < summary["items"] <= 80
    assert (
        summary["splits"]["train"] + summary["splits"]["valid"] + summary["splits"]["test"]
        == (summary["interactions"])
    )
    assert summary["split_method"]["method"] == "temporal"
    # the human-readable table renders too
    code, table, _ = run_cli(["data", "info", str(out)], capsys)
    assert code == 0 and "interactions" in table


def test_synth_is_deterministic_per_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prints = []
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert (
            run_cli(
                ["data", "synth", "--out", str(tmp_path / name), *TINY_WORLD, "--seed", seed],
                capsys,
            )[0]
            == 0
        )
        prints.append(info_json(tmp_path / name, capsys)["fingerprint"])
    assert prints[0] == prints[1] != prints[2]


def test_import_keeps_the_given_test_set_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = pl.DataFrame(
        {
            "user": ["a", "a", "b", "b", "c", "c", "c"],
            "item": ["x", "y", "x", "z", "y", "z", "w"],
            "ts": [1, 2, 3, 4, 5, 6, 7],
        }
    )
    # Deliberately earlier timestamps than train: a given test set is taken as is, never re-split.
    test = pl.DataFrame({"user": ["a", "c", "b"], "item": ["z", "x", "y"], "ts": [0, 9, 1]})
    train.write_csv(tmp_path / "train.csv")
    test.write_csv(tmp_path / "test.csv")
    out = tmp_path / "imported"
    code, _, err = run_cli(
        [
            "data",
            "import",
            "--interactions",
            str(tmp_path / "train.csv"),
            "--test",
            str(tmp_path / "test.csv"),
            "--user-col",
            "user",
            "--item-col",
            "item",
            "--time-col",
            "ts",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    dataset = load_dataset(out)
    got = dataset.splits["test"].select("user_id", "item_id", "timestamp")
    want = test.rename({"user": "user_id", "item": "item_id", "ts": "timestamp"})
    assert got.to_dicts() == want.to_dicts()
    assert dataset.splits["train"].height + dataset.splits["valid"].height == train.height
    assert dataset.interactions.height == train.height + test.height


@pytest.mark.parametrize(
    ("content", "extra", "fragment"),
    [
        (None, [], "does not exist"),
        ("", [], "empty"),
        ("user_id,item_id,timestamp\n", [], "no rows"),
        ("user_id,item,timestamp\nu1,i1,5\n", [], "item_id"),
        ("user_id,item_id,timestamp\nu1,i1,yesterday-ish\n", [], "timestamp"),
    ],
    ids=["bad-path", "zero-bytes", "header-only", "missing-column", "unparsable-timestamp"],
)
def test_import_errors_are_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | None,
    extra: list[str],
    fragment: str,
) -> None:
    path = tmp_path / "log.csv"
    if content is not None:
        path.write_text(content)
    code, _, err = run_cli(
        ["data", "import", "--interactions", str(path), "--out", str(tmp_path / "o"), *extra],
        capsys,
    )
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0]
    assert "Traceback" not in err


def test_info_on_a_directory_that_is_not_a_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["data", "info", str(tmp_path)], capsys)
    assert code == 1 and "dataset.json" in err and len(err.strip().splitlines()) == 1


def test_movielens_100k_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.fixtures_movielens import write_ml100k_full_size

    source = write_ml100k_full_size(tmp_path / "ml-100k")
    out = tmp_path / "ml"
    code, _, err = run_cli(
        ["data", "movielens", "--variant", "100k", "--source", str(source), "--out", str(out)],
        capsys,
    )
    assert code == 0, err
    summary = info_json(out, capsys)
    assert (summary["users"], summary["items"], summary["interactions"]) == (943, 1682, 100_000)


def test_console_script_bad_usage_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "data", "synth"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "--out" in result.stderr


def test_serving_workers_split_the_cores_between_their_library_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cli.serve_command import THREAD_VARIABLES, limit_library_threads

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    for variable in THREAD_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # the operator's choice stays
    assert limit_library_threads(workers=2) == 4
    assert [os.environ[v] for v in THREAD_VARIABLES] == ["4", "4", "3"]
    for variable in THREAD_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    assert limit_library_threads(workers=16) == 1  # never 0 threads
    assert os.environ["OMP_NUM_THREADS"] == "1"
