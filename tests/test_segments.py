"""Segments partition users and items; per-segment summaries on hand examples; their plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from data.errors import ConfigError, DataError
from evaluation.plots import (
    plot_funnel,
    plot_metric_curves,
    plot_segment_bars,
    plot_training_curves,
)
from evaluation.segments import (
    Segmentation,
    activity_segments,
    bucket_metrics,
    cold_start_segments,
    item_popularity_buckets,
    segment_metrics,
    training_event_counts,
)
from tests.retrieval_contract import clustered_log


def test_cold_start_segments_by_event_count() -> None:
    segments = cold_start_segments([0, 1, 5, 6, 40], few_events=5)
    assert segments.labels.tolist() == ["cold", "few", "few", "warm", "warm"]
    assert segments.sizes() == {"cold": 1, "few": 2, "warm": 2}
    assert cold_start_segments([0, 1, 2], few_events=0).labels.tolist() == ["cold", "warm", "warm"]


def test_activity_segments_by_quartiles() -> None:
    counts = np.arange(1, 9)  # quartiles 2.75 and 6.25
    segments = activity_segments(counts)
    assert segments.labels.tolist() == ["light"] * 2 + ["medium"] * 4 + ["heavy"] * 2
    # Against a reference population (say every training user), test users shift segments.
    against_all = activity_segments([1, 4, 100], reference=np.arange(1, 101))
    assert against_all.labels.tolist() == ["light", "light", "heavy"]


def test_training_event_counts_treat_unknown_users_as_cold() -> None:
    log, _ = clustered_log()  # every user has six events
    counts = training_event_counts(log, np.array([0, -1, log.n_users, 3]))
    np.testing.assert_array_equal(counts, [6, 0, 0, 6])


# Events per item: 50, 20, 10, 10, 5, 3, 2, 0 (100 in all), and two items unknown to training.
# head: item 0 alone reaches 20 %. tail: items holding at most 20 % together, from the bottom:
# 0 + 2 + 3 + 5 = 10 %; adding the two 10s (a tie level) would make 30 %, so they are mid.
ITEM_COUNTS = [50, 20, 10, 10, 5, 3, 2, 0]


def test_item_buckets_by_share_of_interactions() -> None:
    buckets = item_popularity_buckets(ITEM_COUNTS, n_items=10)
    assert buckets.labels.tolist() == ["head"] + ["mid"] * 3 + ["tail"] * 6
    assert buckets.kind == "item_popularity"


def test_item_bucket_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="exceeds 1"):
        item_popularity_buckets(ITEM_COUNTS, head_share=0.6, tail_share=0.6)
    with pytest.raises(DataError, match="smaller than"):
        item_popularity_buckets(ITEM_COUNTS, n_items=3)
    with pytest.raises(ConfigError, match="light_quantile"):
        activity_segments([1, 2], light_quantile=0.9, heavy_quantile=0.1)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 50), min_size=1, max_size=40),
    head=st.floats(0, 0.5),
    tail=st.floats(0, 0.5),
)
def test_item_buckets_partition_and_respect_popularity(
    counts: list[int], head: float, tail: float
) -> None:
    buckets = item_popularity_buckets(counts, head_share=head, tail_share=tail)
    c = np.array(counts)
    assert len(buckets) == c.size and sum(buckets.sizes().values()) == c.size
    # Popularity order: a more popular item is never in a less popular bucket, ties agree.
    order = np.argsort(-c, kind="stable")
    assert (np.diff(buckets.codes[order]) >= 0).all()
    assert all(np.unique(buckets.codes[c == value]).size == 1 for value in np.unique(c))
    if c.sum():
        tail_events = c[buckets.mask("tail")].sum() / c.sum()
        head_events = c[buckets.mask("head")].sum() / c.sum()
        assert tail_events <= tail + 1e-12  # the tail holds at most its share ...
        assert head_events >= head - 1e-12  # ... and the head at least its own


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 30), min_size=0, max_size=40),
    few=st.integers(0, 10),
)
def test_user_segments_partition_users(counts: list[int], few: int) -> None:
    for segments in (cold_start_segments(counts, few_events=few), activity_segments(counts)):
        assert len(segments) == len(counts)
        assert sum(segments.sizes().values()) == len(counts)
        masks = np.array([segments.mask(name) for name in segments.names]).reshape(
            len(segments.names), len(counts)
        )
        assert (masks.sum(axis=0) == 1).all()  # each user in exactly one segment
        c = np.array(counts)
        order = np.argsort(c, kind="stable")
        assert (np.diff(segments.codes[order]) >= 0).all()  # more events, never a lower segment


def test_segmentation_rejects_codes_out_of_range() -> None:
    with pytest.raises(DataError, match="2 segments"):
        Segmentation("x", ("a", "b"), np.array([0, 2]))
    with pytest.raises(DataError, match="no segment 'c'"):
        Segmentation("x", ("a", "b"), np.array([0, 1])).mask("c")


def test_segment_metrics_are_the_means_within_each_segment() -> None:
    segments = cold_start_segments([0, 0, 3, 3, 3, 10])
    ndcg = np.array([0.0, 1.0, 0.5, np.nan, 0.7, 0.2])
    summary = segment_metrics({"ndcg@10": ndcg, "recall@10": ndcg * 2}, segments, n_boot=50)
    assert list(summary) == ["cold", "few", "warm"]
    assert summary["few"]["n_users"] == 3
    few = summary["few"]["metrics"]["ndcg@10"]
    assert few["mean"] == pytest.approx(0.6) and few["n_users"] == 2
    assert few["low"] <= few["mean"] <= few["high"]
    assert summary["cold"]["metrics"]["recall@10"]["mean"] == pytest.approx(1.0)
    assert summary["warm"]["metrics"]["ndcg@10"] == pytest.approx(
        {"mean": 0.2, "low": 0.2, "high": 0.2, "std_error": 0.0, "confidence": 0.95,
         "n_users": 1, "n_boot": 50}
    )  # fmt: skip
    empty = segment_metrics({"ndcg@10": [0.5]}, cold_start_segments([3]), n_boot=10)["cold"]
    assert empty["n_users"] == 0 and math.isnan(empty["metrics"]["ndcg@10"]["mean"])
    with pytest.raises(DataError, match="segmentation has 6 users"):
        segment_metrics({"ndcg@10": [0.5]}, segments)


def test_bucket_metrics_restrict_relevance_to_each_bucket() -> None:
    buckets = Segmentation("item_popularity", ("head", "mid", "tail"), np.array([0, 0, 1, 2]))
    relevant = sp.csr_matrix(np.array([[1, 0, 0, 1], [0, 0, 1, 0]], dtype=np.float32))
    lists = np.array([[0, 1], [3, 2]])
    summary = bucket_metrics(lists, relevant, buckets, ks=(1, 2), n_boot=20)
    head, mid, tail = summary["head"], summary["mid"], summary["tail"]
    # head: only user 0 has a relevant head item (0), found at rank 1.
    assert head["n_users"] == 1 and head["metrics"]["recall@1"]["mean"] == 1.0
    # mid: user 1's item 2 sits at rank 2: missed at 1, found at 2.
    assert mid["metrics"]["hit_rate@1"]["mean"] == 0.0
    assert mid["metrics"]["hit_rate@2"]["mean"] == 1.0
    # tail: user 0's item 3 is never listed for them.
    assert tail["metrics"]["recall@2"]["mean"] == 0.0
    # Slots of the top 2: items 0, 1, 3, 2 -> half head, a quarter each mid and tail.
    assert (head["exposure_share@2"], mid["exposure_share@2"], tail["exposure_share@2"]) == (
        0.5,
        0.25,
        0.25,
    )
    assert (head["exposure_share@1"], mid["exposure_share@1"]) == (0.5, 0.0)


def test_bucket_metrics_check_their_inputs() -> None:
    buckets = Segmentation("item_popularity", ("head", "mid", "tail"), np.array([0, 1, 2]))
    relevant = sp.csr_matrix((1, 3))
    with pytest.raises(DataError, match="3 items but relevant has 4"):
        bucket_metrics(np.array([[0]]), sp.csr_matrix((1, 4)), buckets)
    with pytest.raises(DataError, match="cutoffs"):
        bucket_metrics(np.array([[0]]), relevant, buckets, ks=(2,))
    with pytest.raises(DataError, match="outside the 3 bucketed items"):
        bucket_metrics(np.array([[5]]), relevant, buckets, ks=(1,))


# --------------------------------------------------------------------------------------------
# Plots of these summaries (evaluation.plots): each writes a real PNG
# --------------------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2_000


def test_segment_bars_with_whiskers(tmp_path: Path) -> None:
    segments = cold_start_segments([0, 0, 3, 3, 3, 10])
    by_system = {
        system: segment_metrics({"ndcg@10": values}, segments, n_boot=50)
        for system, values in {
            "pipeline": np.array([0.0, 1.0, 0.5, np.nan, 0.7, 0.2]),
            "popular": np.array([0.0, 0.5, 0.1, 0.2, np.nan, np.nan]),  # no warm value: no bar
        }.items()
    }
    out = plot_segment_bars(by_system, "ndcg@10", tmp_path / "report" / "segments.png")
    assert out == tmp_path / "report" / "segments.png"
    assert_png(out)
    with pytest.raises(DataError, match="'mrr@10'"):
        plot_segment_bars(by_system, "mrr@10", tmp_path / "missing.png")


def test_metric_curves_and_funnel(tmp_path: Path) -> None:
    results = {
        "pipeline": {"ndcg@5": 0.2, "ndcg@10": 0.25, "recall@5": 0.1, "recall@10": 0.2},
        "ease": {"ndcg@10": 0.22, "ndcg@5": 0.18, "n_users": 100.0},
    }
    assert_png(plot_metric_curves(results, ("ndcg", "recall"), tmp_path / "curves.png"))
    with pytest.raises(DataError, match="'map'"):
        plot_metric_curves(results, ("map",), tmp_path / "none.png")
    stages = {"retrieval@500": 0.61, "ranking@100": 0.44, "reranking@10": float("nan")}
    assert_png(plot_funnel(stages, tmp_path / "funnel.png"))


def test_training_curves_from_either_json_layout(tmp_path: Path) -> None:
    two_tower = {
        "eval_k": 50,
        "best_epoch": 2,
        "stopped_early": False,
        "epochs": [
            {"epoch": e, "train_loss": 3.0 / e, "valid_loss": 3.2 / e, "valid_recall": 0.1 * e}
            for e in (1, 2, 3)
        ],
    }
    ranker = {"xlabel": "round", "best": 3, "panels": {"ndcg@10": {"train": [0.3, 0.4, 0.5]}}}
    for name, document in (("two_tower", two_tower), ("ranker", ranker)):
        source = tmp_path / f"{name}.json"
        source.write_text(json.dumps(document))
        assert_png(plot_training_curves(source, tmp_path / f"{name}.png"))
    assert_png(plot_training_curves(ranker, tmp_path / "from_mapping.png"))
    with pytest.raises(DataError, match="unrecognised"):
        plot_training_curves({"loss": [1.0]}, tmp_path / "bad.png")
    with pytest.raises(DataError, match="cannot read"):
        plot_training_curves(tmp_path / "absent.json", tmp_path / "bad.png")
