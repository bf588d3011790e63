"""The synthetic world: determinism, schema, realism (heavy tails, position bias, preferences),
drift, the click model's known answers, the oracle ranking, and save/load."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.errors import ConfigError, DataError
from data.schema import INTERACTION_SCHEMA, conform_interactions
from data.synthetic import World, WorldConfig, generate
from data.synthetic.config import SECONDS_PER_DAY
from data.synthetic.world import _shared_category_map

# Small enough to generate in a fraction of a second, large enough for the statistics below.
TINY = WorldConfig(
    n_users=400, n_items=300, n_days=10, target_interactions=20_000, n_categories=8, seed=3
)


def indices(ids: pl.Series) -> np.ndarray:
    """``"u12"`` / ``"i7"`` ids back to integer indices."""
    return ids.str.slice(1).cast(pl.Int64).to_numpy()


def top_share(counts: np.ndarray, fraction: float) -> float:
    ordered = np.sort(counts)[::-1]
    return float(ordered[: max(1, int(fraction * ordered.size))].sum() / ordered.sum())


@pytest.fixture(scope="module")
def tiny():
    return generate(TINY)


# ---------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_data(tiny):
    again = generate(TINY)
    assert again.interactions.equals(tiny.interactions)
    assert again.items.equals(tiny.items)
    assert again.users.equals(tiny.users)
    np.testing.assert_array_equal(again.positions, tiny.positions)
    for name in World._ARRAYS:
        np.testing.assert_array_equal(getattr(again.world, name), getattr(tiny.world, name))


def test_different_seed_gives_different_data(tiny):
    other = generate(replace(TINY, seed=4))
    assert not other.interactions.equals(tiny.interactions)
    assert not np.array_equal(other.world.user_vectors, tiny.world.user_vectors)


def test_result_does_not_depend_on_worker_threads():
    config = replace(TINY, chunk_slates=500)  # many chunks
    one = generate(config, workers=1)
    three = generate(config, workers=3)
    assert one.interactions.equals(three.interactions)
    np.testing.assert_array_equal(one.positions, three.positions)


# ---------------------------------------------------------------------- schema


def test_frames_follow_the_schema(tiny):
    frame = tiny.interactions
    assert dict(frame.schema) == INTERACTION_SCHEMA
    assert conform_interactions(frame, "synthetic").equals(frame)
    assert frame["timestamp"].is_sorted()
    assert (frame["weight"] == 1.0).all()
    assert frame["user_id"].str.starts_with("u").all()
    assert frame["item_id"].str.starts_with("i").all()
    assert frame["timestamp"].min() >= TINY.start
    # Sessions start inside the window; a session's later slates may run a little past its end.
    assert frame["timestamp"].max() < TINY.end + SECONDS_PER_DAY
    assert tiny.positions.shape == (frame.height,)
    assert tiny.positions.dtype == np.int16

    assert tiny.items.schema == pl.Schema(
        {"item_id": pl.String, "categories": pl.List(pl.String), "created_at": pl.Int64}
    )
    assert tiny.items.height == TINY.n_items
    assert tiny.items["categories"].list.len().eq(1).all()
    assert tiny.users.schema == pl.Schema({"user_id": pl.String, "home_category": pl.String})
    assert tiny.users.height == TINY.n_users


def test_item_ids_match_the_world(tiny):
    items = tiny.items.with_columns(idx=indices(tiny.items["item_id"]))
    category = items["categories"].list.first().str.slice(1).cast(pl.Int32).to_numpy()
    np.testing.assert_array_equal(category[items["idx"]], tiny.world.item_category)
    np.testing.assert_array_equal(items["created_at"].to_numpy(), tiny.world.item_release)


def test_click_count_is_close_to_the_target(tiny):
    assert abs(tiny.interactions.height / TINY.target_interactions - 1) < 0.05


# ---------------------------------------------------------------------- realism


def test_item_popularity_is_heavy_tailed(tiny):
    counts = np.bincount(indices(tiny.interactions["item_id"]), minlength=TINY.n_items)
    assert top_share(counts, 0.10) > 0.4  # uniform would give 0.1


def test_user_activity_is_heavy_tailed(tiny):
    counts = np.bincount(indices(tiny.interactions["user_id"]), minlength=TINY.n_users)
    assert top_share(counts, 0.10) > 0.25


def test_no_click_on_an_item_before_its_release():
    data = generate(replace(TINY, initial_item_fraction=0.3))  # most items released during the log
    joined = data.interactions.join(data.items, on="item_id")
    assert (joined["timestamp"] >= joined["created_at"]).all()
    late = joined.filter(pl.col("created_at") >= TINY.start)
    assert late.height > 0.1 * joined.height  # the check above is not vacuous


def test_clicked_items_have_high_true_utility(tiny):
    users = indices(tiny.interactions["user_id"])
    items = indices(tiny.interactions["item_id"])
    times = tiny.interactions["timestamp"].to_numpy()
    random_items = np.random.default_rng(0).integers(0, TINY.n_items, users.size)
    clicked = tiny.world.utility(users, items, times).mean()
    baseline = tiny.world.utility(users, random_items, times).mean()
    assert clicked > baseline + 1.0


def test_position_bias_is_visible_in_clicks(tiny):
    per_slot = np.bincount(tiny.positions, minlength=TINY.slate_size)
    assert per_slot[0] > 3 * per_slot[-1]
    assert np.all(np.diff(per_slot) < 0)


# ---------------------------------------------------------------------- the click model


def test_click_probabilities_known_answer(tiny):
    world = tiny.world
    users = np.array([0, 1])
    slates = np.array([[5, 6, 7], [8, -1, 9]])
    t = TINY.end
    got = world.click_probabilities(users, slates, t)

    utility = world.utility(users, np.where(slates < 0, 0, slates), t).astype(np.float64)
    weights = np.exp(utility) * (np.arange(3) + 1.0) ** -TINY.position_bias_eta
    weights[slates < 0] = 0.0
    expected = np.concatenate([weights, np.full((2, 1), np.exp(TINY.no_click_utility))], axis=1)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_same_item_at_every_slot_shows_the_position_curve(tiny):
    probs = tiny.world.click_probabilities(np.array([3]), np.full((1, 5), 11), TINY.end)
    ratio = probs[0, :5] / probs[0, 0]
    np.testing.assert_allclose(ratio, (np.arange(5) + 1.0) ** -TINY.position_bias_eta, rtol=1e-5)
    np.testing.assert_allclose(tiny.world.position_bias(np.arange(5)), ratio, rtol=1e-5)


def test_unreleased_items_cannot_be_clicked(tiny):
    world = tiny.world
    late = int(np.argmax(world.item_release))
    early = int(np.argmin(world.item_release))
    before = int(world.item_release[late]) - 1
    probs = world.click_probabilities(np.array([0]), np.array([[late, early]]), before)
    assert probs[0, 0] == 0.0 and probs[0, 1] > 0.0
    after = world.click_probabilities(np.array([0]), np.array([[late, early]]), before + 1)
    assert after[0, 0] > 0.0


def test_sampled_clicks_follow_the_probabilities(tiny):
    n = 40_000
    users = np.zeros(n, dtype=np.int64)
    slates = np.tile([3, 1, 4, 1 + 5], (n, 1))
    probs = tiny.world.click_probabilities(users[:1], slates[:1], TINY.end)[0]
    clicks = tiny.world.sample_clicks(users, slates, TINY.end, np.random.default_rng(0))
    observed = np.bincount(np.where(clicks < 0, 4, clicks), minlength=5) / n
    np.testing.assert_allclose(observed, probs, atol=0.01)


def test_click_model_is_batch_consistent(tiny):
    world = tiny.world
    slates = np.array([[1, 2, 3], [4, 5, 6]])
    both = world.click_probabilities(np.array([7, 8]), slates, TINY.end)
    alone = world.click_probabilities(np.array([7]), slates[:1], TINY.end)
    np.testing.assert_allclose(both[:1], alone, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    slates=st.lists(
        st.lists(st.integers(-1, TINY.n_items - 1), min_size=4, max_size=4), min_size=1, max_size=6
    ),
    t=st.integers(TINY.start - SECONDS_PER_DAY, TINY.end),
)
def test_click_probabilities_are_a_distribution(slates, t):
    world = _tiny_world()
    slate = np.array(slates)
    probs = world.click_probabilities(np.arange(len(slates)), slate, t)
    assert probs.shape == (len(slates), 5)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(probs[:, :4][slate < 0] == 0)


_WORLD_CACHE: dict[str, World] = {}


def _tiny_world() -> World:
    if "tiny" not in _WORLD_CACHE:
        _WORLD_CACHE["tiny"] = World.sample(TINY)
    return _WORLD_CACHE["tiny"]


# ---------------------------------------------------------------------- the oracle


def test_true_top_k_matches_brute_force(tiny):
    world = tiny.world
    users = np.array([0, 5, 9])
    t = TINY.start + 3 * SECONDS_PER_DAY
    items, scores = world.true_top_k(users, 10, t)
    all_items = np.tile(np.arange(TINY.n_items), (3, 1))
    utility = world.utility(users, all_items, t)
    utility[:, world.item_release > t] = -np.inf
    expected = np.argsort(-utility, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(items, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(utility, expected, axis=1), rtol=1e-5)
    assert np.all(world.item_release[items] <= t)


def test_true_top_k_excludes_and_is_batch_consistent(tiny):
    world = tiny.world
    first, _ = world.true_top_k(np.array([2, 3]), 5, TINY.end)
    excluded, _ = world.true_top_k(np.array([2, 3]), 5, TINY.end, exclude=[first[0, :2], []])
    assert not set(first[0, :2]) & set(excluded[0])
    np.testing.assert_array_equal(excluded[0, :3], first[0, 2:])
    np.testing.assert_array_equal(excluded[1], first[1])
    alone, _ = world.true_top_k(np.array([2]), 5, TINY.end)
    np.testing.assert_array_equal(alone[0], first[0])


def test_true_top_k_pads_when_too_few_items_are_eligible(tiny):
    world = tiny.world
    n_released = int((world.item_release <= TINY.start).sum())
    everything = np.arange(TINY.n_items)
    items, scores = world.true_top_k(np.array([0]), TINY.n_items, TINY.start)
    assert (items[0] >= 0).sum() == n_released
    assert np.all(items[0, n_released:] == -1) and np.all(np.isneginf(scores[0, n_released:]))
    assert set(items[0, :n_released]) == set(everything[world.item_release <= TINY.start])


# ---------------------------------------------------------------------- drift

DRIFT = replace(TINY, n_days=12, drift_day=6, drift_ramp_days=0.0, target_interactions=24_000)


def _halves(data) -> tuple[pl.DataFrame, pl.DataFrame]:
    cut = DRIFT.start + DRIFT.drift_day * SECONDS_PER_DAY
    frame = data.interactions
    return frame.filter(pl.col("timestamp") < cut), frame.filter(pl.col("timestamp") >= cut)


def test_concept_drift_moves_clicks_to_the_alternative_preferences():
    data = generate(replace(DRIFT, drift="concept", drift_strength=1.0))
    world = data.world

    def alignment(frame: pl.DataFrame, vectors: np.ndarray) -> float:
        users, items = indices(frame["user_id"]), indices(frame["item_id"])
        return float(np.einsum("nd,nd->n", vectors[users], world.item_vectors[items]).mean())

    before, after = _halves(data)
    assert (
        alignment(after, world.alt_user_vectors) > alignment(before, world.alt_user_vectors) + 0.5
    )
    assert alignment(after, world.user_vectors) < alignment(before, world.user_vectors) - 0.5


def test_concept_drift_preference_vectors_known_answer():
    world = World.sample(replace(DRIFT, drift="concept", drift_strength=1.0))
    users = np.arange(10)
    cut = DRIFT.start + DRIFT.drift_day * SECONDS_PER_DAY
    np.testing.assert_array_equal(world.preference_vectors(users, cut - 1), world.user_vectors[:10])
    np.testing.assert_allclose(
        world.preference_vectors(users, cut), world.alt_user_vectors[:10], rtol=1e-5, atol=1e-6
    )
    half = World.sample(replace(DRIFT, drift="concept", drift_strength=0.5))
    mixed = half.preference_vectors(users, cut)
    expected = 0.5 * (half.user_vectors[:10] + half.alt_user_vectors[:10])
    cosine = np.einsum("nd,nd->n", mixed, expected) / (
        np.linalg.norm(mixed, axis=1) * np.linalg.norm(expected, axis=1)
    )
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)


def test_shared_concept_drift_moves_every_fan_of_a_category_to_the_same_new_one():
    config = replace(DRIFT, drift="concept", user_noise=0.0)
    shared = World.sample(replace(config, concept_shift="shared"))
    individual = World.sample(config)
    # Without user noise a preference vector is exactly its interest mixture, so the moved
    # vectors must be the base mixture over the mapped categories, the same map for everyone.
    mapping = _shared_category_map(shared.config)
    assert sorted(mapping.tolist()) == list(range(config.n_categories))  # a permutation...
    assert not np.any(mapping == np.arange(config.n_categories))  # ...that moves every category
    mixture = np.einsum(
        "uk,ukd->ud",
        shared.user_interest_weights,
        shared.category_centroids[mapping[shared.user_interests]],
    )
    np.testing.assert_allclose(
        shared.alt_user_vectors, config.affinity_scale * mixture, rtol=1e-4, atol=1e-5
    )
    # Only the moved preferences differ from the individual-drift world of the same seed.
    for name in ("user_vectors", "item_vectors", "user_interests", "user_activity"):
        np.testing.assert_array_equal(getattr(shared, name), getattr(individual, name))
    assert not np.allclose(shared.alt_user_vectors, individual.alt_user_vectors)


def test_unknown_concept_shift_is_a_config_error():
    with pytest.raises(ConfigError, match="concept_shift must be one of"):
        WorldConfig.from_overrides(concept_shift="sideways")


def test_prior_drift_changes_the_click_rate():
    data = generate(replace(DRIFT, drift="prior", drift_strength=1.5))
    before, after = _halves(data)
    # Same session rate on both sides of the cut (equal lengths), so fewer clicks = less engagement.
    assert after.height < 0.8 * before.height
    world = data.world
    cut = DRIFT.start + DRIFT.drift_day * SECONDS_PER_DAY
    np.testing.assert_allclose(
        world.no_click_utility(np.array([cut - 1, cut])),
        [DRIFT.no_click_utility, DRIFT.no_click_utility + 1.5],
    )


def test_no_drift_keeps_the_click_rate():
    before, after = _halves(generate(DRIFT))
    assert abs(after.height / before.height - 1) < 0.1


def test_covariate_drift_changes_who_is_active():
    data = generate(replace(DRIFT, drift="covariate", drift_strength=1.0))
    rising = data.world.drift_activity_multiplier > 1

    def rising_share(frame: pl.DataFrame) -> float:
        return float(rising[indices(frame["user_id"])].mean())

    before, after = _halves(data)
    assert 0.05 < rising.mean() < 0.5
    assert rising_share(after) > rising_share(before) + 0.2


def test_drift_ramps_linearly():
    world = World.sample(replace(DRIFT, drift="prior", drift_ramp_days=2.0))
    begin = DRIFT.start + DRIFT.drift_day * SECONDS_PER_DAY
    t = begin + np.array([-1, 0, SECONDS_PER_DAY, 2 * SECONDS_PER_DAY, 5 * SECONDS_PER_DAY])
    np.testing.assert_allclose(world.drift_progress(t), [0, 0, 0.5, 1, 1])


# ---------------------------------------------------------------------- persistence


def test_save_load_round_trip(tiny, tmp_path: Path):
    path = tiny.world.save(tmp_path / "world")
    loaded = World.load(path)
    assert loaded.config == tiny.world.config
    for name in World._ARRAYS:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(tiny.world, name))
    users, items = np.arange(20), np.arange(20)
    np.testing.assert_array_equal(
        loaded.utility(users, items, TINY.end), tiny.world.utility(users, items, TINY.end)
    )
    assert json.loads((path / "world.json").read_text())["config"]["seed"] == TINY.seed


def test_load_rejects_missing_or_corrupt_worlds(tiny, tmp_path: Path):
    with pytest.raises(DataError, match="world.json"):
        World.load(tmp_path / "nothing")
    path = tiny.world.save(tmp_path / "world")
    (path / "item_quality.npy").unlink()
    with pytest.raises(DataError, match="item_quality"):
        World.load(path)
    (path / "world.json").write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON"):
        World.load(path)


def test_world_arrays_are_read_only(tiny):
    with pytest.raises(ValueError, match="read-only"):
        tiny.world.user_vectors[0, 0] = 1.0


# ---------------------------------------------------------------------- config and input checks


def test_config_round_trips_through_a_dict():
    config = replace(TINY, drift="covariate", hour_profile=tuple(range(1, 25)))
    assert WorldConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_from_overrides_keeps_clicks_per_user():
    default = WorldConfig()
    small = WorldConfig.from_overrides(n_users=500)
    assert small.target_interactions / 500 == default.target_interactions / default.n_users
    assert WorldConfig.from_overrides(n_users=500, target_interactions=7).target_interactions == 7
    with pytest.raises(ConfigError, match="unknown"):
        WorldConfig.from_overrides(n_user=5)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("n_users", 0, "n_users"),
        ("slate_size", 2.5, "slate_size"),
        ("personalized_share", 1.5, "personalized_share"),
        ("initial_item_fraction", 0.0, "initial_item_fraction"),
        ("drift", "sudden", "drift"),
        ("hour_profile", (1.0,) * 23, "hour_profile"),
        ("max_interests", 99, "max_interests"),
        ("mean_slates_per_session", 0.5, "mean_slates_per_session"),
        ("no_click_utility", float("nan"), "no_click_utility"),
        ("seed", -1, "seed"),
    ],
)
def test_invalid_config_names_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        replace(TINY, **{field: value})


def test_concept_drift_strength_above_one_is_rejected():
    with pytest.raises(ConfigError, match="drift_strength"):
        replace(TINY, drift="concept", drift_strength=1.5)


def test_bad_indices_are_rejected(tiny):
    world = tiny.world
    with pytest.raises(DataError, match="user_idx"):
        world.utility(np.array([TINY.n_users]), np.array([0]), TINY.end)
    with pytest.raises(DataError, match="item indices"):
        world.utility(np.array([0]), np.array([-1]), TINY.end)
    with pytest.raises(DataError, match="rows"):
        world.click_probabilities(np.array([0, 1]), np.array([[1, 2]]), TINY.end)
    with pytest.raises(DataError, match="shape"):
        world.utility(np.array([0, 1]), np.array([1, 2]), np.array([TINY.end]))
    with pytest.raises(DataError, match="k must"):
        world.true_top_k(np.array([0]), 0, TINY.end)


# ---------------------------------------------------------------------- invariants (hypothesis)


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    n_users=st.integers(1, 60),
    n_items=st.integers(3, 80),
    slate_size=st.integers(1, 6),
    initial=st.floats(0.05, 1.0),
    drift=st.sampled_from(["none", "concept", "covariate", "prior"]),
)
def test_generated_logs_hold_their_invariants(seed, n_users, n_items, slate_size, initial, drift):
    config = WorldConfig(
        n_users=n_users,
        n_items=n_items,
        n_days=3,
        target_interactions=n_users * 10,
        n_categories=min(3, n_items),
        max_interests=1,
        slate_size=slate_size,
        initial_item_fraction=initial,
        drift=drift,
        drift_day=1,
        seed=seed,
        calibration_slates=500,
    )
    data = generate(config, workers=1)
    frame = data.interactions
    assert frame["timestamp"].is_sorted()
    users, items = indices(frame["user_id"]), indices(frame["item_id"])
    assert np.all((users >= 0) & (users < n_users)) and np.all((items >= 0) & (items < n_items))
    assert np.all(frame["timestamp"].to_numpy() >= data.world.item_release[items])
    assert np.all((data.positions >= 0) & (data.positions < slate_size))
