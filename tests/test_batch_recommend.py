"""`recsys recommend`: batch answers through the serving Pipeline."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from cli.main import main
from pipeline.artifacts import load_artifacts, load_history


def test_recommend_all_and_unknown_users(tiny_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    _, bundle = tiny_bundle
    out = tmp_path / "recs.csv"
    assert main(["recommend", "--bundle", str(bundle), "--all", "--k", "5", "--out", str(out)]) == 0
    rows = pl.read_csv(out, schema_overrides={"user_id": pl.String, "item_id": pl.String})
    artifacts = load_artifacts(bundle)
    assert rows["user_id"].n_unique() == len(artifacts.users)
    per_user = rows.group_by("user_id").agg(pl.col("rank"), pl.col("item_id").n_unique().alias("n"))
    assert (per_user["n"] == 5).all()
    assert all(sorted(r) == [1, 2, 3, 4, 5] for r in per_user["rank"].to_list())
    # seen items (the bundle's history snapshot) are never recommended
    seen = load_history(artifacts).select("user_id", "item_id").unique()
    assert rows.join(seen, on=["user_id", "item_id"], how="inner").height == 0

    users = tmp_path / "users.parquet"
    pl.DataFrame({"user_id": ["ghost-1", "ghost-2"]}).write_parquet(users)
    out2 = tmp_path / "recs.parquet"
    assert (
        main(["recommend", "--bundle", str(bundle), "--users", str(users), "--out", str(out2)]) == 0
    )
    cold = pl.read_parquet(out2)
    assert cold.group_by("user_id").len()["len"].to_list() == [10, 10]


def test_recommend_bad_output_suffix(
    tiny_bundle: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["recommend", "--bundle", str(tiny_bundle[1]), "--all", "--out", "recs.txt"])
    assert code == 1 and ".csv or .parquet" in capsys.readouterr().err
