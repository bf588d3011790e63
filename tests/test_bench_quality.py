"""The quality benchmark's plumbing: a tiny log in lastfm-2k's split layout, never the real data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import bench_quality, run
from benchmarks.bench_quality import LASTFM, NDCG, PIPELINE, RECALL, render_section, summarise
from tests.conftest import TINY_CONFIG


def tiny_lastfm(root: Path, n_users: int = 120, n_items: int = 80, groups: int = 4) -> Path:
    """``root/split/{train,test}.csv`` as in lastfm-2k (user_id,item_id,weight; no time): each
    user played 12 artists of their own group, 9 to train and 3 to test, with play counts."""
    rng = np.random.default_rng(0)
    rows: dict[str, list[str]] = {"train": [], "test": []}
    for user in range(n_users):
        items = rng.choice(np.arange(user % groups, n_items, groups), size=12, replace=False)
        for position, item in enumerate(items):
            split = "train" if position < 9 else "test"
            rows[split].append(f"u{user},a{item},{rng.integers(1, 300)}")
    (root / "split").mkdir(parents=True)
    for split, lines in rows.items():
        (root / "split" / f"{split}.csv").write_text(
            "user_id,item_id,weight\n" + "\n".join(lines) + "\n"
        )
    return root


def ci(mean: float) -> dict[str, float]:
    return {"mean": mean, "low": mean - 0.01, "high": mean + 0.01}


def hand_made_report() -> dict[str, Any]:
    """A ``report.json`` with known means: the best source is item_item (0.25), the best
    baseline ease (0.20), the pipeline 0.30."""
    means = {
        PIPELINE: 0.30,
        "retrieval_order": 0.26,
        "source:item_item": 0.25,
        "source:two_tower": 0.10,
        "popular": 0.08,
        "ease": 0.20,
        "random": 0.0,
    }
    return {
        "ks": [10, 20],
        "n_users": 50,
        "model_version": "abc",
        "systems": {
            name: {NDCG: ci(mean), RECALL: ci(mean / 2), "ndcg@20": ci(mean)}
            for name, mean in means.items()
        },
        "retrieval": {"merged": {"recall@100": 0.5}, "_meta": {"n_users": 50.0}},
        "funnel": {
            "timed": False,
            "merge_order": ["item_item", "two_tower"],
            "source_validation_ndcg@10": {"item_item": 0.2, "two_tower": 0.1},
            "ranker": {"served": True, "valid_ndcg@10": 0.24},
        },
        "skipped": {},
    }


def entry(report: dict[str, Any]) -> dict[str, Any]:
    """What :func:`bench_quality.measure` stores for one dataset, its timings made up."""
    return summarise(report) | {
        "config": "default",
        "train_seconds": 12.0,
        "evaluate_seconds": 3.0,
        "load_average_1min": 1.0,
        "date": "2026-12-07 00:00 UTC",
        "machine": {"cpu": "cpu", "cores": 2, "python": "3", "platform": "Linux"},
        "git": {"commit": "0123456789abcdef", "dirty": False},
        "peers": dict(bench_quality.LASTFM_PEERS),
    }


def test_lift_is_the_pipeline_over_the_best_source_and_the_best_baseline() -> None:
    figures = summarise(hand_made_report())

    assert figures["lift"] == {
        "best_source": "source:item_item",
        "over_best_source": pytest.approx(0.30 / 0.25),
        "best_baseline": "ease",
        "over_best_baseline": pytest.approx(0.30 / 0.20),
    }
    assert figures["systems"]["ease"] == {NDCG: ci(0.20), RECALL: 0.10}
    assert "_meta" not in figures["retrieval_recall"]


def test_benchmark_runs_import_train_evaluate_on_a_log_in_the_lastfm_layout(
    tmp_path: Path,
) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_CONFIG)
    out = tmp_path / "quality.json"
    args = ["--lastfm", str(tiny_lastfm(tmp_path / "lastfm")), "--config", str(config)]

    result = bench_quality.main([*args, "--skip-synthetic", "--out", str(out)])

    assert json.loads(out.read_text()) == result
    assert list(result["datasets"]) == [LASTFM]
    measured = result["datasets"][LASTFM]
    systems = measured["systems"]
    assert {PIPELINE, "retrieval_order", *bench_quality.BASELINES} <= set(systems)
    sources = [name for name in systems if name.startswith("source:")]
    assert sources
    for values in systems.values():
        assert 0 <= values[NDCG]["low"] <= values[NDCG]["mean"] <= values[NDCG]["high"] <= 1
        assert 0 <= values[RECALL] <= 1
    best = max(sources, key=lambda name: systems[name][NDCG]["mean"])
    assert measured["lift"]["best_source"] == best
    assert measured["lift"]["over_best_source"] == pytest.approx(
        systems[PIPELINE][NDCG]["mean"] / systems[best][NDCG]["mean"]
    )
    assert measured["config"] == str(config)
    assert measured["train_seconds"] > 0 and measured["evaluate_seconds"] > 0
    assert measured["machine"]["cores"] >= 1
    assert measured["funnel"]["timed"] is False
    assert measured["peers"] == bench_quality.LASTFM_PEERS


def test_an_absent_log_is_skipped_in_one_line_and_earlier_entries_are_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "quality.json"
    earlier = {"benchmark": "quality", "datasets": {"synthetic": entry(hand_made_report())}}
    out.write_text(json.dumps(earlier))

    result = bench_quality.main(
        ["--lastfm", str(tmp_path / "absent"), "--skip-synthetic", "--out", str(out)]
    )

    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith(LASTFM)]
    assert len(said) == 1
    assert str(tmp_path / "absent") in said[0] and said[0].endswith("skipped")
    assert result == earlier


def test_section_lists_every_system_and_the_peers_best_first() -> None:
    lines = render_section({"datasets": {LASTFM: entry(hand_made_report())}})

    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| system")]
    assert rows[0].startswith("| **pipeline** | funnel | 0.3000 [0.2900, 0.3100] | 0.1500 |")
    assert "| EASE, lambda 100 | peer (README) | 0.286 | - |" in rows
    means = [float(row.split(" | ")[2].split()[0]) for row in rows]
    assert means == sorted(means, reverse=True)
    assert len(rows) == len(hand_made_report()["systems"]) + len(bench_quality.LASTFM_PEERS)
    assert "- pipeline (0.3000) / best single source (source:item_item, 0.2500): 1.200x" in lines
    assert "- pipeline (0.3000) / best baseline (ease, 0.2000): 1.500x" in lines


def test_docs_render_the_section_and_keep_the_hand_written_notes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results, docs = tmp_path / "results", tmp_path / "benchmarks.md"
    results.mkdir()
    result = {"benchmark": "quality", "datasets": {LASTFM: entry(hand_made_report())}}
    (results / "quality.json").write_text(json.dumps(result))
    notes = f"{run.NOTES_HEADING}\n\nWritten by hand.\n"
    docs.write_text(f"# Benchmarks\n\nold figures\n\n{notes}")
    monkeypatch.setattr(run, "RESULTS_DIR", results)
    monkeypatch.setattr(run, "DOCS_PATH", docs)

    rendered = run.render_docs()

    section = rendered[rendered.index("## Recommendation quality") :]
    assert f"Target: {bench_quality.TARGET}." in section
    assert "| EASE, lambda 100 | peer (README) | 0.286 | - |" in section
    assert rendered.endswith(notes)
    assert "old figures" not in rendered
