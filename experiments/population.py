"""The simulated population: the world's history before the experiment and the users' choices.

* **History** (:func:`build_history`): the synthetic world (``data.synthetic``) sampled over
  pre-period + experiment, and the pre-period's clicks under the world's logging policy, which
  every arm is trained on and starts from.
* **Choice model**: the world's multinomial logit gives each slot's click probability;
  :func:`apply_fatigue` lowers the utility of re-shown and already-clicked items,
  :func:`draw_choices` picks the click with one uniform per session shared by all arms (common
  random numbers). :func:`repeat_counts` and :func:`slate_diversity` measure the slates.

The loop that serves the users day by day is :mod:`experiments.simulator`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import polars as pl

from data.errors import DataError
from data.synthetic import World, interactions_frame, items_frame, simulate_log, users_frame
from experiments.config import ExperimentConfig

__all__ = [
    "History",
    "apply_fatigue",
    "build_history",
    "draw_choices",
    "oracle_clicks",
    "repeat_counts",
    "slate_diversity",
]


def apply_fatigue(
    probabilities: npt.NDArray[np.floating], penalties: npt.NDArray[np.floating]
) -> npt.NDArray[np.float64]:
    """Click distribution after fatigue: (n, S + 1) float64, rows sum to 1, no-click last.

    ``probabilities``: (n, S + 1) multinomial-logit choice probabilities (no-click last);
    ``penalties``: (n, S) utility penalties (>= 0) of the slots. Lowering a slot's utility by
    ``c`` multiplies its logit weight by ``exp(-c)``; the no-click weight is untouched, so
    fatigue moves probability to the other slots and to "no click".
    """
    p = np.asarray(probabilities, dtype=np.float64)
    n_slots = p.shape[1] - 1
    if np.shape(penalties) != (p.shape[0], n_slots):
        raise DataError(
            f"penalties has shape {np.shape(penalties)}, expected {(p.shape[0], n_slots)}"
        )
    weights = p.copy()
    weights[:, :n_slots] *= np.exp(-np.asarray(penalties, dtype=np.float64))
    return weights / weights.sum(axis=1, keepdims=True)


def draw_choices(
    probabilities: npt.NDArray[np.floating], uniforms: npt.NDArray[np.floating]
) -> npt.NDArray[np.int64]:
    """Chosen slot per row by inverse CDF: (n,) int64, -1 for the last column (no click).

    ``uniforms``: (n,) in [0, 1). The same uniform in two arms picks the same quantile of each
    arm's distribution (common random numbers: identical arms give identical outcomes).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    cumulative = np.cumsum(p, axis=1)
    threshold = np.asarray(uniforms, dtype=np.float64)[:, None] * cumulative[:, -1:]
    # First column whose cumulative weight exceeds the draw; "<=" skips zero-probability slots.
    choice = (cumulative <= threshold).sum(axis=1)
    n_slots = p.shape[1] - 1
    return np.where(choice >= n_slots, -1, choice).astype(np.int64)


def repeat_counts(
    memory: npt.NDArray[np.int32], slates: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """(n, S) earlier impressions of each slate item in ``memory`` (n, M), -1 = empty slot.

    Padding slots of the slate (-1) count 0.
    """
    hits = (slates[:, :, None] == memory[:, None, :]).sum(axis=2)
    return np.where(slates >= 0, hits, 0)


def slate_diversity(
    slates: npt.NDArray[np.int64], item_category: npt.NDArray[np.integer]
) -> npt.NDArray[np.float64]:
    """Distinct categories per shown item of each slate: (n,) in (0, 1], 0 for an empty slate."""
    categories = np.where(slates >= 0, item_category[np.maximum(slates, 0)], -1)
    ordered = np.sort(categories, axis=1)
    # Pads (-1) sort first; count the first valid value and every change after it.
    changes = (ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    distinct = changes.sum(axis=1) + (ordered[:, 0] >= 0)
    shown = (slates >= 0).sum(axis=1)
    return np.divide(distinct, shown, out=np.zeros(len(slates)), where=shown > 0)


@dataclass(frozen=True, eq=False)
class History:
    """The world and its pre-period, everything the arms start from.

    world: the ground truth over pre-period + experiment (``world.config.n_days`` covers both;
        items released during the experiment are the new-item wave).
    clicks: the pre-period's clicks (canonical interaction frame, time-sorted).
    items: every item (``item_id``, ``categories``, ``created_at``); users: every user.
    start: Unix seconds of experiment day 0 (the end of the pre-period).
    pre_user_clicks: (n_users,) pre-period clicks per user (the CUPED covariate).
    pre_item_clicks: (n_items,) pre-period clicks per item (popularity feature, long-tail head).
    click_rate: pre-period clicks per slate under the logging policy (the planning baseline).
    log_user, log_item: (n_clicks,) int32 user and item index of each pre-period click, in
        time order.
    """

    world: World
    clicks: pl.DataFrame
    items: pl.DataFrame
    users: pl.DataFrame
    start: int
    pre_user_clicks: npt.NDArray[np.float64]
    pre_item_clicks: npt.NDArray[np.float64]
    click_rate: float
    log_user: npt.NDArray[np.int32]
    log_item: npt.NDArray[np.int32]

    def catalog_at(self, now: int) -> pl.DataFrame:
        """Items released by ``now``: what a serving catalogue may hold at that time."""
        return self.items.filter(pl.col("created_at") <= now)


def build_history(config: ExperimentConfig, *, workers: int | None = None) -> History:
    """Sample the world and generate the pre-period log (deterministic in the world seed)."""
    world = World.sample(config.world_config())
    # The same arrays with a log that ends where the experiment begins: the generator simulates
    # only the pre-period, while release times and drift keep their full-horizon schedule.
    pre_config = dataclasses.replace(world.config, n_days=config.pre_period_days)
    log = simulate_log(dataclasses.replace(world, config=pre_config), workers=workers)
    return History(
        world=world,
        clicks=interactions_frame(log),
        items=items_frame(world),
        users=users_frame(world),
        start=pre_config.end,
        pre_user_clicks=np.bincount(log.user, minlength=world.n_users).astype(np.float64),
        pre_item_clicks=np.bincount(log.item, minlength=world.n_items).astype(np.float64),
        click_rate=log.user.size / max(log.n_slates, 1),
        log_user=log.user,
        log_item=log.item,
    )


def oracle_clicks(history: History, days: int, now: int) -> pl.DataFrame:
    """A log of ``days`` days ending at ``now``, generated by the world's logging policy from
    every user's *true* preferences once the drift is complete: what a retrain that knew the
    new preferences would learn from (the oracle arm's training data).

    The world's other arrays (items, activity, popularity) are shared; the log's times are
    those of the pre-period shifted to end at ``now``.
    """
    world = history.world
    users = np.arange(world.n_users)
    end = world.config.end + 10 * world.config.n_days * 86_400  # long after any ramp
    drifted = world.preference_vectors(users, end).astype(np.float32)
    config = dataclasses.replace(world.config, drift="none", n_days=days)
    truth = dataclasses.replace(world.without_drift(), config=config, user_vectors=drifted)
    log = simulate_log(truth)
    frame = interactions_frame(log)
    shift = int(now) - int(history.start)
    return frame.with_columns(pl.col("timestamp") + shift).filter(pl.col("timestamp") <= now)
