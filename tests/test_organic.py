"""Organic consumption of the simulated world (experiments/organic.py): its rate, and choices
led by true preference with a popularity bias (issue 17)."""

from __future__ import annotations

import numpy as np
import pytest

from data.synthetic import World, WorldConfig
from experiments.organic import draw_organic, organic_rate


@pytest.fixture(scope="module")
def world() -> World:
    return World.sample(WorldConfig.from_overrides(n_users=400, n_items=300, seed=5))


def test_rate_makes_the_share_of_consumption() -> None:
    rate = organic_rate(0.3, recommended_per_session=0.4)
    assert rate / (rate + 0.4) == pytest.approx(0.3)
    assert organic_rate(0.0, 0.4) == 0.0
    with pytest.raises(ValueError, match="organic_share"):
        organic_rate(1.0, 0.4)


def test_draws_follow_true_preference_and_popularity(world: World) -> None:
    users = np.repeat(np.arange(world.n_users), 25)
    at = int(world.item_release.max()) + 1  # every item released
    times = np.full(users.size, at, dtype=np.int64)
    rng = np.random.default_rng(0)
    events = draw_organic(world, users, times, 0.5, 0.5, rng)
    # About half of the sessions consume organically (binomial: 10k draws, 5 sigma = 250).
    assert abs(events.size - users.size / 2) < 250
    assert np.array_equal(events.times, times[events.rows])
    chosen_users, items = users[events.rows], events.items
    utility = world.utility(chosen_users, items, at)
    # Chosen items beat random items on the user's true utility by a wide margin.
    random_items = np.random.default_rng(1).integers(0, world.n_items, items.size)
    assert utility.mean() > world.utility(chosen_users, random_items, at).mean() + 0.5
    # The popularity bias: with it, popular items are chosen more often than without it.
    plain = draw_organic(world, users, times, 0.5, 0.0, np.random.default_rng(0))
    popularity = world.item_popularity
    assert popularity[items].mean() > popularity[plain.items].mean()


def test_unreleased_items_are_never_consumed_and_same_seed_same_draws(world: World) -> None:
    early = int(np.median(world.item_release))
    users = np.arange(world.n_users, dtype=np.int64)
    times = np.full(users.size, early, dtype=np.int64)
    first = draw_organic(world, users, times, 1.0, 0.5, np.random.default_rng(3))
    assert first.size == users.size  # rate 1: every session
    assert (world.item_release[first.items] <= early).all()
    again = draw_organic(world, users, times, 1.0, 0.5, np.random.default_rng(3))
    assert np.array_equal(first.items, again.items)
