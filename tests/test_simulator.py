"""The A/B simulator: the choice model, the config, the statistics over replicates, and a tiny
end-to-end experiment through the real services (frozen, online and retraining arms)."""

from __future__ import annotations

import argparse
import json
import math
import tomllib
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cli.simulate_command import register, run_simulation
from data.dataset import load_dataset
from data.errors import ConfigError, DataError
from experiments.analysis import analyse
from experiments.arms import ArmRunner, BundleTrainer
from experiments.config import ArmConfig, ExperimentConfig, load_experiment_config
from experiments.population import apply_fatigue, draw_choices, repeat_counts, slate_diversity
from experiments.report import write_report
from experiments.simulation_result import SimulationResult
from experiments.simulator import _Rings, simulate, slate_matrix
from experiments.srm import srm_power
from experiments.studies import (
    aa_study,
    coverage_study,
    group_moments,
    replicate_assignments,
    srm_study,
    users_for_srm_power,
)
from experiments.user_metrics import daily_cumulative, per_user_metrics
from pipeline.feedback_log import FeedbackLog, FeedbackLogConfig
from pipeline.funnel import Recommendation
from pipeline.service import RecommenderService
from tests.conftest import TINY_CONFIG

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ab_concept_drift.toml"


# ------------------------------------------------------------------------------ choice model


def test_draw_choices_matches_probabilities_on_a_uniform_grid() -> None:
    # Known answer: evenly spaced uniforms hit each option in proportion to its probability.
    probabilities = np.tile([0.2, 0.0, 0.3, 0.5], (10_000, 1))  # slot 1 has probability 0
    uniforms = (np.arange(10_000) + 0.5) / 10_000
    choice = draw_choices(probabilities, uniforms)
    counts = {c: int((choice == c).sum()) for c in (-1, 0, 1, 2)}
    assert counts == {-1: 5_000, 0: 2_000, 1: 0, 2: 3_000}
    assert draw_choices(np.array([[0.0, 1.0, 0.0]]), np.array([0.0]))[0] == 1  # u = 0 edge


@settings(max_examples=50, deadline=None)
@given(
    logits=arrays(np.float64, (6, 5), elements=st.floats(-5, 5)),
    penalties=arrays(np.float64, (6, 4), elements=st.floats(0, 4)),
)
def test_fatigue_keeps_a_distribution_and_only_lowers_penalised_slots(
    logits: np.ndarray, penalties: np.ndarray
) -> None:
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    after = apply_fatigue(probabilities, penalties)
    np.testing.assert_allclose(after.sum(axis=1), 1.0)
    np.testing.assert_allclose(apply_fatigue(probabilities, np.zeros((6, 4))), probabilities)
    # The no-click option never loses probability; an unpenalised slot never loses either.
    assert np.all(after[:, -1] >= probabilities[:, -1] - 1e-12)
    free = np.concatenate([penalties == 0, np.ones((6, 1), dtype=bool)], axis=1)
    assert np.all(after[free] >= probabilities[free] - 1e-12)
    # A penalty c multiplies a slot's odds against no-click by exactly exp(-c).
    odds_before = probabilities[:, :-1] / probabilities[:, -1:]
    odds_after = after[:, :-1] / after[:, -1:]
    np.testing.assert_allclose(odds_after, odds_before * np.exp(-penalties), rtol=1e-9)


def test_fatigue_rejects_mismatched_penalties() -> None:
    with pytest.raises(DataError, match="penalties has shape"):
        apply_fatigue(np.full((2, 3), 1 / 3), np.zeros((2, 3)))


def test_repeat_counts_and_diversity_known_answers() -> None:
    memory = np.array([[5, 5, 7, -1], [-1, -1, -1, -1]], dtype=np.int32)
    slates = np.array([[5, 7, 9, -1], [5, 7, 9, -1]], dtype=np.int64)
    np.testing.assert_array_equal(repeat_counts(memory, slates), [[2, 1, 0, 0], [0, 0, 0, 0]])
    category = np.array([0, 0, 0, 0, 0, 1, 0, 1, 0, 2])
    diversity = slate_diversity(np.array([[5, 7, 9, -1], [-1, -1, -1, -1], [0, 1, 2, 3]]), category)
    np.testing.assert_allclose(diversity, [2 / 3, 0.0, 1 / 4])


def test_impression_rings_keep_each_users_latest_items() -> None:
    rings = _Rings.empty(3, 2)
    # A time-ordered log: user 0 clicked 10, 12, 13 (keeps the latest two), user 1 and 2 once.
    rings.fill(np.array([0, 1, 0, 0, 2]), np.array([10, 11, 12, 13, 14]))
    assert [sorted(set(row) - {-1}) for row in rings.items.tolist()] == [[12, 13], [11], [14]]
    rings.write(np.array([1, 0]), np.array([[15], [16]]))
    assert sorted(rings.items[1].tolist()) == [11, 15]  # the free slot is used first
    assert 16 in rings.items[0] and 13 in rings.items[0]  # the oldest (12) is overwritten


def test_slate_matrix_pads_short_slates_and_rejects_foreign_ids() -> None:
    recs = [
        Recommendation("u1", ["i3", "i10"], [1.0, 0.5], [[], []], "v"),
        Recommendation("u2", [], [], [], "v"),
    ]
    np.testing.assert_array_equal(slate_matrix(recs, 3), [[3, 10, -1], [-1, -1, -1]])
    with pytest.raises(DataError, match="not a synthetic-world id"):
        slate_matrix([Recommendation("u1", ["movie-7"], [1.0], [[]], "v")], 2)


# ------------------------------------------------------------------------------------ config


def _config(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "n_days": 10,
        "world": {"n_users": 100, "n_items": 60, "drift": "concept", "drift_day": 5},
        "arms": [{"name": "a", "kind": "frozen"}, {"name": "b", "kind": "online"}],
    }
    values.update(overrides)
    return values


def test_example_config_parses_and_describes_the_issue_scenario() -> None:
    config = load_experiment_config(EXAMPLE)
    assert [arm.kind for arm in config.arms] == ["frozen", "online_state", "online_learning"]
    assert config.analysis.comparisons == (("online", "online_learning"),)
    assert config.behaviour.organic_share == 0.3
    assert config.drift_day == 10 and config.n_days == 30
    world = config.world_config()
    # The world spans pre-period + experiment; its drift day counts from the log's start.
    assert world.n_days == config.pre_period_days + 30
    assert world.drift_day == config.pre_period_days + 10


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"typo": 1}, "unknown key"),
        ({"arms": [{"name": "a", "kind": "frozen"}]}, "at least 2 arms"),
        ({"arms": [{"name": "a", "kind": "frozen"}, {"name": "a", "kind": "online"}]}, "unique"),
        ({"arms": [{"name": "a", "kind": "magic"}, {"name": "b", "kind": "online"}]}, "kind"),
        (
            {
                "arms": [
                    {"name": "a", "kind": "online", "params": {"every_days": 2}},
                    {"name": "b", "kind": "frozen"},
                ]
            },
            "do not apply",
        ),
        ({"world": {"n_days": 3}}, "n_days is set by the simulator"),
        ({"world": {"drift": "concept", "drift_day": 12}}, "drift_day"),
        ({"behaviour": {"ticks_per_day": 5}}, "divide 24"),
        ({"sample_loss": {"arm": "zzz", "fraction": 0.1}}, "not one of the arms"),
        ({"world": {"n_users": -3}}, "n_users"),
        ({"behaviour": {"organic_share": 1.0}}, "organic_share"),
        ({"analysis": {"comparisons": [["a", "zzz"]]}}, "not among the arms"),
        ({"analysis": {"comparisons": [["a"]]}}, "pairs of two arm names"),
        (
            {
                "arms": [
                    {"name": "a", "kind": "frozen"},
                    {
                        "name": "b",
                        "kind": "online_learning",
                        "params": {"online_learning": {"learning_rate": -1}},
                    },
                ]
            },
            "learning_rate",
        ),
    ],
)
def test_bad_configs_name_the_problem(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_mapping(_config(**overrides))


def test_arm_training_merges_overrides_and_popularity(tmp_path: Path) -> None:
    (tmp_path / "train.toml").write_text("[retrieval]\nn_candidates = 40\n")
    override = {"training": {"retrieval": {"history_length": 5}}}
    values = _config(
        training="train.toml",
        arms=[
            {"name": "a", "kind": "frozen", "params": override},
            {"name": "p", "kind": "popularity"},
        ],
    )
    config = ExperimentConfig.from_mapping(values, base_dir=tmp_path)
    assert config.arm_training(config.arms[0])["retrieval"] == {
        "n_candidates": 40,
        "history_length": 5,
    }
    assert config.arm_training(config.arms[1])["retrieval"]["sources"] == ["popular"]


@pytest.mark.parametrize(
    ("arm", "alerts", "expected"),
    [
        # (day, monitor alert) per end of day -> the days on which the policy retrains.
        ({"kind": "frozen"}, [True] * 6, []),
        ({"kind": "online"}, [True] * 6, []),
        ({"kind": "online_state"}, [True] * 6, []),
        ({"kind": "online_learning"}, [True] * 6, []),
        ({"kind": "oracle"}, [True] * 6, []),
        ({"kind": "retrain_every", "params": {"every_days": 2}}, [False] * 6, [1, 3, 5]),
        (
            {"kind": "drift_retrain", "params": {"cooldown_days": 2}},
            [False, True, True, True, False, True],
            [1, 3, 5],
        ),
    ],
)
def test_update_policies_retrain_when_they_should(
    arm: dict[str, Any], alerts: list[bool], expected: list[int]
) -> None:
    config = ArmConfig.from_table({"name": "x", **arm}, "arms.0")
    runner = ArmRunner(config, cast(RecommenderService, None), {}, cast(BundleTrainer, None))
    retrained = []
    for day, alert in enumerate(alerts):
        if runner.wants_retrain(day, alert) is not None:
            retrained.append(day)
            runner._last_retrain_day = day  # what retrain() records, without training
    assert retrained == expected
    assert config.updates_online == (arm["kind"] != "frozen")


# ------------------------------------------------------------------------ replicate statistics


def _population(n_users: int, n_days: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative per-user CTR and presence of a heterogeneous population (no pipeline)."""
    rng = np.random.default_rng(seed)
    rate = rng.beta(2, 5, n_users)
    sessions = rng.poisson(rng.lognormal(-0.5, 0.8, n_users)[:, None], (n_users, n_days))
    clicks = rng.binomial(sessions, rate[:, None])
    cum_s, cum_c = sessions.cumsum(axis=1), clicks.cumsum(axis=1)
    present = cum_s > 0
    return np.divide(cum_c, cum_s, out=np.zeros(cum_s.shape), where=present), present


def _random_groups(n_replicates: int, n_users: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, (n_replicates, n_users)).astype(np.int8)


def test_per_user_metrics_known_answer() -> None:
    table = _config(n_days=2, world={"n_users": 3, "n_items": 60})
    config = ExperimentConfig.from_mapping({**table, "monitors": {"reference_days": 1}})
    sessions = np.array([[1, 1], [0, 2], [0, 0]], dtype=np.int32)  # user 2 never comes
    clicks = np.array([[[1, 0], [0, 1], [0, 0]], [[1, 1], [0, 2], [0, 0]]], dtype=np.float32)
    expected = clicks * 0.5
    zeros = np.zeros((2, 3))
    result = SimulationResult(
        config=config,
        user_ids=["u0", "u1", "u2"],
        sessions=sessions,
        clicks=clicks,
        expected_clicks=expected,
        latency_ms=zeros,
        diversity=zeros,
        long_tail=zeros,
        pre_user_clicks=np.zeros(3),
        daily=pl.DataFrame(),
        monitors=pl.DataFrame(),
        retrains=pl.DataFrame(),
        planning={},
        timings={},
    )
    exposed, metrics = per_user_metrics(result)
    np.testing.assert_array_equal(exposed, [True, True, False])
    np.testing.assert_allclose(metrics["ctr"][:, :2], [[0.5, 0.5], [1.0, 1.0]])
    np.testing.assert_allclose(metrics["engagement"][:, :2], [[1, 1], [2, 2]])
    np.testing.assert_allclose(metrics["expected_ctr"][:, :2], [[0.25, 0.25], [0.5, 0.5]])
    assert np.isnan(metrics["ctr"][:, 2]).all()
    values, present = daily_cumulative(result, 1, "ctr")
    np.testing.assert_array_equal(present, [[True, True], [False, True], [False, False]])
    np.testing.assert_allclose(values, [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])


def test_group_moments_match_numpy() -> None:
    values, present = _population(500, 4, seed=1)
    groups = _random_groups(3, 500, seed=2)
    n, mean, var = group_moments(groups, 1, values, present)
    for r in range(3):
        for d in range(4):
            x = values[(groups[r] == 1) & present[:, d], d]
            assert n[r, d] == x.size
            assert mean[r, d] == pytest.approx(x.mean())
            assert var[r, d] == pytest.approx(x.var(ddof=1))


def test_aa_false_positive_rates_are_nominal_and_peeking_inflates_them() -> None:
    values, present = _population(3_000, 10, seed=3)
    groups = _random_groups(400, 3_000, seed=4)
    rates = aa_study(
        values, present, groups, alpha=0.05, srm_alpha=0.001, mixture_sd=0.02, weights=[1, 1]
    )
    assert 0.02 <= rates["fpr_fixed_horizon"] <= 0.085
    assert rates["fpr_sequential_msprt"] <= 0.07  # always valid: at most alpha over all peeks
    assert 0.02 <= rates["fpr_sequential_alpha_spending"] <= 0.085  # alpha spent, none wasted
    assert rates["fpr_naive_daily_peeking"] > rates["fpr_fixed_horizon"]
    assert rates["srm_false_alarm_rate"] <= 0.01


def test_coverage_study_is_unbiased_and_covers_a_known_effect() -> None:
    rng = np.random.default_rng(5)
    control = rng.beta(2, 5, 4_000)
    treatment = control + 0.03 + rng.normal(0, 0.05, 4_000)  # twin copies: known true effect
    observed = np.ones(4_000, dtype=bool)
    truth = float(np.mean(treatment - control))
    study = coverage_study(
        control, treatment, observed, _random_groups(300, 4_000, 6), 0, 1, truth, alpha=0.05
    )
    assert 0.90 <= study["coverage"] <= 0.99
    assert abs(study["bias"]) < 4 * study["bias_standard_error"] + 1e-4
    assert study["power"] > 0.9


def test_srm_study_detection_rates_follow_the_formula() -> None:
    ids = [f"u{i}" for i in range(10_000)]
    exposed = np.ones(10_000, dtype=bool)
    weights = {"control": 0.5, "treatment": 0.5}
    groups = replicate_assignments(ids, "srm-test", weights, 60)
    study = srm_study(
        ids,
        exposed,
        groups,
        weights,
        salt="srm-test",
        loss_group=1,
        loss_fraction=0.12,
        shift=0.03,
        srm_alpha=0.001,
    )
    assert study["false_alarm_rate"] <= 0.05
    for case in ("loss", "shift"):
        assert study[case]["detection_rate"] == pytest.approx(
            study[case]["formula_power"], abs=0.1
        ), case
    # The note of the issue: 2 % loss of one arm at 100k users is caught about half the time.
    assert srm_power(100_000, [0.5, 0.5], [0.5, 0.49]) == pytest.approx(0.46, abs=0.05)
    needed = users_for_srm_power(np.array([0.5, 0.5]), np.array([0.5, 0.49]), 0.95, alpha=0.001)
    assert (
        srm_power(needed, [0.5, 0.5], [0.5, 0.49])
        >= 0.95
        > srm_power(needed - 1, [0.5, 0.5], [0.5, 0.49])
    )


# ------------------------------------------------------------------------- end to end (tiny)


def _tiny_experiment(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "seed": 3,
        "salt": "tiny",
        "n_days": 4,
        "pre_period_days": 8,
        "world": {"n_users": 300, "n_items": 150, "seed": 2, "drift": "concept", "drift_day": 2},
        "training": tomllib.loads(TINY_CONFIG),
        "behaviour": {"sessions_per_user_day": 1.0, "ticks_per_day": 4, "batch_size": 128},
        "analysis": {
            "aa_replicates": 200,
            "coverage_replicates": 50,
            "srm_replicates": 20,
            "comparisons": [["online", "learning"]],
        },
        "monitors": {"reference_days": 1, "drift": {"min_window_size": 20}},
        "arms": [
            {"name": "frozen", "kind": "frozen"},
            {"name": "online", "kind": "online"},
            {"name": "retrain", "kind": "retrain_every", "params": {"every_days": 2}},
            {"name": "popular", "kind": "popularity"},
            {
                "name": "learning",
                "kind": "online_learning",
                "params": {"online_learning": {"min_events": 8}},
            },
            {"name": "oracle", "kind": "oracle"},
        ],
    }
    values.update(overrides)
    return values


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulationResult, Path]:
    work = tmp_path_factory.mktemp("simulate")
    config = ExperimentConfig.from_mapping(_tiny_experiment())
    return simulate(config, work), work


def test_twin_copies_share_arrivals_and_record_consistent_outcomes(
    tiny_run: tuple[SimulationResult, Path],
) -> None:
    result, _ = tiny_run
    n_arms, n_users, n_days = 6, 300, 4
    assert result.sessions.shape == (n_users, n_days)
    assert result.clicks.shape == result.expected_clicks.shape == (n_arms, n_users, n_days)
    assert result.sessions.sum() > 0
    # At most one click per session; expected clicks are probabilities summed over sessions.
    assert np.all(result.clicks <= result.sessions[None])
    assert np.all(result.expected_clicks <= result.sessions[None] + 1e-5)
    assert np.all((result.sessions[None] > 0) | (result.expected_clicks == 0))
    assert result.daily.height == n_arms * n_days
    assert result.daily["degraded"].sum() == 0


def test_arms_served_in_parallel_threads_give_the_sequential_result(tmp_path: Path) -> None:
    # Each arm's copy shares no state with the others and every draw is made before the arms
    # run, so serving them at once must not change a single outcome. (No retrain arm: a
    # retrain's training is only deterministic up to float rounding.) The second run reuses the
    # first one's bundle from the work directory.
    arms = [{"name": "frozen", "kind": "frozen"}, {"name": "online", "kind": "online"}]
    results = {}
    for parallel in (False, True):
        values = _tiny_experiment(arms=arms, analysis={"aa_replicates": 0})
        values["behaviour"] = {**values["behaviour"], "parallel_arms": parallel}
        results[parallel] = simulate(ExperimentConfig.from_mapping(values), tmp_path)
    sequential, threaded = results[False], results[True]
    assert sequential.clicks.sum() > 0
    np.testing.assert_array_equal(sequential.sessions, threaded.sessions)
    np.testing.assert_array_equal(sequential.clicks, threaded.clicks)
    np.testing.assert_array_equal(sequential.expected_clicks, threaded.expected_clicks)
    timings = ("batch_ms_p50", "batch_ms_p99", "ms_per_session")
    assert sequential.daily.drop(timings).equals(threaded.daily.drop(timings))


def test_feedback_went_down_the_service_path(tiny_run: tuple[SimulationResult, Path]) -> None:
    result, work = tiny_run
    # The logs start with the pre-period's test window (after the bundles' training data).
    seeded = load_dataset(work / "bundles" / "base-0" / "data").splits["test"].height
    assert seeded > 0
    per_day = result.daily.group_by("day").agg(pl.col("organic_events").n_unique())
    assert (per_day["organic_events"] == 1).all()  # exogenous: the same count in every arm
    organic = int(result.daily.filter(pl.col("arm") == "frozen")["organic_events"].sum())
    assert organic > 0
    for a, name in enumerate(result.arm_names):
        with FeedbackLog(FeedbackLogConfig(path=work / "arms" / name / "feedback.db")) as log:
            # Every arm's log = that window + the arm's own simulated clicks + the organic
            # consumption (the same in every arm), each once.
            assert log.count() == seeded + int(result.clicks[a].sum()) + organic, name
    # The scheduled arm retrained once (end of day 1); a retrain after the last day is skipped.
    # The oracle retrained once, at the end of the drift day.
    assert result.retrains.select("arm", "day", "reason").to_dicts() == [
        {"arm": "retrain", "day": 1, "reason": "schedule"},
        {"arm": "oracle", "day": 2, "reason": "oracle"},
    ]
    retrained = work / "bundles" / "retrain-day001"
    assert (retrained / "bundle" / "manifest.json").is_file()
    # It learned from the pre-period and the arm's clicks of days 0-1, nothing else.
    interactions = load_dataset(retrained / "data").interactions.height
    organic_early = result.daily.filter((pl.col("arm") == "retrain") & (pl.col("day") < 2))
    assert interactions == (
        result.pre_user_clicks.sum()
        + result.clicks[2, :, :2].sum()
        + organic_early["organic_events"].sum()
    )


def test_online_arms_serve_items_released_during_the_experiment(
    tiny_run: tuple[SimulationResult, Path],
) -> None:
    """Items the world releases after the bundles were trained: online kinds add them to their
    live catalogue and show them; the frozen arm cannot (its clicks never name one)."""
    result, work = tiny_run
    assert result.new_item_coverage["frozen"] == 0.0
    assert result.new_item_coverage["online"] > 0.0
    trained = set(load_dataset(work / "bundles" / "base-0" / "data").items["item_id"].to_list())
    with FeedbackLog(FeedbackLogConfig(path=work / "arms" / "frozen" / "feedback.db")) as log:
        logged = pl.concat(log.iter_all())
    # Its clicks are on trained items only; organic consumption (outside the recommender)
    # reaches new items in every arm.
    clicked = logged.filter(pl.col("type") == "click")["item_id"].to_list()
    assert set(clicked) <= trained
    assert not set(logged.filter(pl.col("type") == "organic")["item_id"].to_list()) <= trained


def test_result_round_trip(tiny_run: tuple[SimulationResult, Path], tmp_path: Path) -> None:
    result, _ = tiny_run
    loaded = SimulationResult.load(result.save(tmp_path / "raw"))
    assert loaded.config == result.config
    for name in ("sessions", "clicks", "expected_clicks", "latency_ms", "pre_user_clicks"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(result, name))
    assert loaded.monitors.equals(result.monitors) and loaded.retrains.equals(result.retrains)
    with pytest.raises(DataError, match="no simulation result"):
        SimulationResult.load(tmp_path)


def test_analysis_report_and_files(tiny_run: tuple[SimulationResult, Path], tmp_path: Path) -> None:
    result, _ = tiny_run
    analysis = analyse(result)
    assert set(analysis["comparisons"]) == {"online", "retrain", "popular", "learning", "oracle"}
    online = analysis["comparisons"]["online"]["metrics"]["ctr"]
    assert online["n_control"] + analysis["users"]["per_arm"]["online"] > 0
    assert math.isfinite(online["true_effect"])
    assert len(analysis["multiple_testing"]["holm"]) == 10
    aa = analysis["aa"]
    assert aa["replicates"] == 200
    assert 0.0 <= aa["fpr_fixed_horizon"] <= 0.12
    assert aa["fpr_sequential_msprt"] <= 0.12
    assert analysis["drift"]["drift_day"] == 2
    assert set(analysis["drift"]["arms"]) == {
        "frozen",
        "online",
        "retrain",
        "popular",
        "learning",
        "oracle",
    }
    for arm in analysis["drift"]["arms"].values():
        # Before the drift the world and its no-drift twin are one world: the share is exactly 1.
        assert arm["no_drift_share"][:2] == [pytest.approx(1.0, abs=1e-6)] * 2
        assert 0 < arm["share_lowest"] < 1  # concept drift costs every arm something
    recovery = analysis["drift"]["recovery_vs_oracle"]
    assert recovery["oracle"]["cost_recovered_vs_oracle"] == 1.0
    assert set(recovery) == {"oracle", *analysis["drift"]["arms"]}
    pair = analysis["pairwise"]["learning_vs_online"]
    assert (pair["baseline"], pair["candidate"]) == ("online", "learning")
    assert math.isfinite(pair["post_drift_ctr"]["true_effect"])
    # The learning arm's model moved: online steps were published, with their freshness.
    learning = result.daily.filter(pl.col("arm") == "learning")
    assert learning["online_step"][-1] > 0 and learning["online_examples"].sum() > 0
    assert result.daily.filter(pl.col("arm") == "online")["online_step"].max() == 0
    # Every bundle has a ranker now, so every arm's prediction scores are monitored.
    assert set(analysis["monitors"]["popular"]) == {"clicked_popularity", "score"}
    paths = write_report(result, analysis, tmp_path / "report")
    assert json.loads(paths["result"].read_text())["control"] == "frozen"
    text = paths["report"].read_text()
    assert "## Results" in text and "A/A false-positive rates" in text
    assert "Drift cost" in text and "alpha spending" in text
    assert "## Pairwise comparisons" in text and "oracle's" in text
    for key in ("daily_ctr", "cumulative_effect", "drift"):
        assert paths[key].stat().st_size > 1_000


AA_TOML = """
seed = 3
salt = "aa"
n_days = 2
pre_period_days = 8
training = "tiny.toml"

[world]
n_users = 200
n_items = 100
seed = 4

[behaviour]
sessions_per_user_day = 1.0
ticks_per_day = 4

[analysis]
aa_replicates = 0
coverage_replicates = 0
srm_replicates = 0

[monitors]
reference_days = 1

[[arms]]
name = "a"
kind = "frozen"

[[arms]]
name = "b"
kind = "frozen"
"""


def test_cli_aa_twins_are_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Two frozen arms share one bundle and, with common random numbers, every outcome: the
    # twin difference (the true effect) is exactly zero and the A/B estimate is pure noise.
    (tmp_path / "tiny.toml").write_text(TINY_CONFIG)
    config = tmp_path / "aa.toml"
    config.write_text(AA_TOML)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["simulate-ab", "--config", str(config), "--out", str(out), "--workdir", str(work)]
    args = parser.parse_args([*argv, "--quiet"])
    assert args.handler(args) == 0
    assert "b vs a: ctr" in capsys.readouterr().out
    written = json.loads((out / "result.json").read_text())
    assert written["comparisons"]["b"]["metrics"]["ctr"]["true_effect"] == 0.0
    assert (out / "report.md").is_file() and (out / "daily_ctr.png").is_file()

    # A rerun in the kept work directory reuses the bundle (same data, same config) and starts
    # from fresh feedback logs, so it reproduces the run exactly.
    manifest = work / "bundles" / "base-0" / "bundle" / "manifest.json"
    version = json.loads(manifest.read_text())["model_version"]
    result, again, _ = run_simulation(config, tmp_path / "out2", workdir=work)
    assert json.loads(manifest.read_text())["model_version"] == version
    assert (
        again["comparisons"]["b"]["metrics"]["ctr"] == written["comparisons"]["b"]["metrics"]["ctr"]
    )
    seeded = load_dataset(work / "bundles" / "base-0" / "data").splits["test"].height
    with FeedbackLog(FeedbackLogConfig(path=work / "arms" / "a" / "feedback.db")) as log:
        organic = result.daily.filter(pl.col("arm") == "a")["organic_events"].sum()
        assert log.count() == seeded + result.clicks[0].sum() + organic
