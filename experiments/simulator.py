"""The A/B simulator: simulated users meet the real serving stack in a world whose truth is known.

One run, day by day over ``n_days`` after a ``pre_period_days`` history:

1. **History.** The synthetic world (``data.synthetic``) is sampled over pre-period + experiment
   and its logging policy generates the pre-period's clicks. Each arm's bundle is trained on them
   (``pipeline.artifacts.train_bundle``); every user's state starts from all of them.
2. **Arrivals.** In each of ``ticks_per_day`` micro-batches, every user arrives with probability
   ``1 - exp(-lambda)``, ``lambda`` from the world's session rates (activity, covariate drift)
   and the hour-of-day profile. Arrivals are exogenous: the same users arrive whatever the arm.
3. **Slates.** Every arm serves *every* arriving user (twin copies of the population, one per
   arm) through its own :class:`RecommenderService` pipeline, in batches.
4. **Choices.** The world's multinomial logit gives each slot's click probability at the
   session's time (so concept drift bites on the drift day), with position bias and a no-click
   option. **Fatigue**: every earlier impression of the same item among the user's last
   ``fatigue_memory`` impressions (in that arm) lowers its utility by ``fatigue_per_repeat``,
   and an item the user already clicked (among their last ``consumed_memory`` clicks, the
   pre-period's included) by ``consumed_penalty``; in the logit a utility penalty multiplies the
   slot's weight by ``exp(-penalty)`` before renormalising.
   One uniform per session, shared by all arms (common random numbers), picks the click.
5. **Feedback.** Clicks go down the service path: ``record_feedback`` (durable append + online
   state update) for online kinds, the append alone for the frozen arm. Retrain arms retrain at
   the end of a day and hot-reload through ``RecommenderService.reload``.
6. **Monitors.** PSI/KS monitors per arm and day on a feature (pre-period popularity of the
   clicked items) and on the prediction scores of the served items.

New items: the world keeps releasing items during the experiment (a wave of new items). A bundle
knows the catalogue of its training time. Online kinds add each tick's releases through the
service's live catalogue (``RecommenderService.add_items``: embedded by the item tower into the
live index); a frozen arm serves them only after a retrain.

The A/B test is then read off the twins: a user assigned to arm ``a`` (salted hash) is observed in
``a``'s copy. Because every user also lives in every other arm's copy, the *true* effect on the
experiment's population is known: the difference of expected clicks (click probabilities, no
sampling noise) between the copies. Each copy models an arm deployed to everyone: per-user state
never crosses users, but a retrain learns from the whole copy's log, not from half of the traffic
(no interference between arms through shared training data, so SUTVA holds by construction).

Where the parts live: the history and the choice model in :mod:`experiments.population`, the
arms in :mod:`experiments.arms`, the power plan in :mod:`experiments.power_plan`, the outcome
in :mod:`experiments.simulation_result`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl
from threadpoolctl import ThreadpoolController
from tqdm.auto import tqdm

from data.dataset import load_dataset
from data.errors import DataError
from data.synthetic import World
from data.synthetic.config import HOURS_PER_DAY, SECONDS_PER_DAY
from experiments.arms import (
    ArmRunner,
    BundleTrainer,
    SimulationClock,
    open_feedback_log,
    seed_feedback_log,
    start_arm,
    training_key,
)
from experiments.config import BehaviourConfig, ExperimentConfig, MonitorConfig
from experiments.drift import DriftMonitor, WindowDrift
from experiments.organic import ORGANIC_EVENT, OrganicEvents, draw_organic, organic_rate
from experiments.population import (
    History,
    apply_fatigue,
    build_history,
    draw_choices,
    oracle_clicks,
    repeat_counts,
    slate_diversity,
)
from experiments.power_plan import plan_power
from experiments.simulation_result import SimulationResult
from pipeline.feedback_log import FeedbackEvent
from pipeline.funnel import Pipeline, Recommendation
from retrieval.two_tower.source import TwoTowerSource

__all__ = ["simulate", "slate_matrix"]


# Independent random streams of the simulation (SeedSequence spawn keys), so adding draws to one
# never changes another: who arrives, when in the tick, which option is chosen, monitor samples.
STREAM_ARRIVALS, STREAM_TIMES, STREAM_CHOICES, STREAM_MONITOR, STREAM_ORGANIC = 0, 1, 2, 3, 4
MONITORS = ("clicked_popularity", "score")


class _MonitorTrack:
    """One monitored quantity of one arm: reference days, then one PSI/KS check per day."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self._today: list[npt.NDArray[np.float64]] = []
        self._reference: list[npt.NDArray[np.float64]] = []
        self._reference_days = 0
        self._monitor: DriftMonitor | None = None

    def add(self, values: npt.NDArray[np.floating]) -> None:
        if values.size:
            self._today.append(np.asarray(values, dtype=np.float64))

    def close_day(self, day: int) -> WindowDrift | None:
        """Check the day's sample against the reference, or add it to the reference.

        The window's ``time`` is the day's end, ``day + 1`` (the moment its data are complete).
        """
        sample = np.concatenate(self._today) if self._today else np.empty(0)
        self._today = []
        if self._monitor is None:
            self._reference.append(sample)
            self._reference_days += 1
            reference = np.concatenate(self._reference)
            if self._reference_days >= self.config.reference_days and reference.size:
                self._monitor = DriftMonitor(self.config.drift).fit(reference)
            return None
        if sample.size == 0:
            return None
        return self._monitor.check(sample, time=float(day + 1))

    def reset(self) -> None:
        """A new model: the next ``reference_days`` become the new reference."""
        self._reference, self._reference_days, self._monitor = [], 0, None


@dataclass
class _Rings:
    """A fixed-size ring of recent item indices per user: (U, M) items (-1 = empty) + pointers."""

    items: npt.NDArray[np.int32]
    pointer: npt.NDArray[np.int64]

    @classmethod
    def empty(cls, n_users: int, size: int) -> _Rings:
        return cls(np.full((n_users, size), -1, dtype=np.int32), np.zeros(n_users, dtype=np.int64))

    def write(self, users: npt.NDArray[np.int64], items: npt.NDArray[np.int64]) -> None:
        """Append ``items`` (n, m) to the rings of distinct ``users`` (n,)."""
        size = self.items.shape[1]
        columns = (self.pointer[users, None] + np.arange(items.shape[1])) % size
        self.items[users[:, None], columns] = items
        self.pointer[users] = (self.pointer[users] + items.shape[1]) % size

    def fill(self, users: npt.NDArray[np.integer], items: npt.NDArray[np.integer]) -> None:
        """Start from a time-ordered event log: each user's latest events (vectorised)."""
        order = np.argsort(users, kind="stable")  # by user, time order kept within a user
        users, items = users[order].astype(np.int64), items[order]
        starts = np.searchsorted(users, users, side="left")
        counts = np.bincount(users, minlength=self.items.shape[0])
        from_end = counts[users] - 1 - (np.arange(users.size) - starts)
        size = self.items.shape[1]
        keep = from_end < size
        column = (np.minimum(counts[users], size) - 1 - from_end)[keep]
        self.items[users[keep], column] = items[keep]
        self.pointer[:] = np.minimum(counts, size) % size


@dataclass
class _Universe:
    """One arm's copy of the population: the running arm and its users' fatigue memory."""

    runner: ArmRunner
    memory: _Rings  # each user's latest impressions
    consumed: _Rings  # each user's latest clicks
    shown: npt.NDArray[np.bool_]  # (n_items,) items shown since the start
    tracks: dict[str, _MonitorTrack]
    # Today's serving counters, cleared by the daily row.
    degraded_today: int = 0
    batch_ms: list[float] = field(default_factory=list)
    shown_today: set[int] = field(default_factory=set)


def simulate(
    config: ExperimentConfig, workdir: str | Path, *, progress: bool = False
) -> SimulationResult:
    """Run the experiment of ``config``; bundles, datasets and feedback logs go to ``workdir``.

    Deterministic in ``config.seed`` and the world seed, up to the floating-point
    non-determinism of the models' training.
    """
    root = Path(workdir)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    history = build_history(config)
    timings["history_seconds"] = time.perf_counter() - started
    tick_share = _tick_shares(history.world, config.behaviour.ticks_per_day)
    planning = plan_power(config, history, tick_share)

    clock = SimulationClock(history.start)
    trainer = BundleTrainer(root, history.catalog_at, history.users)
    started = time.perf_counter()
    universes = _start_universes(config, history, trainer, clock, root)
    timings["training_seconds"] = time.perf_counter() - started

    run = _Run(config, history, universes, clock, tick_share)
    started = time.perf_counter()
    try:
        with _one_blas_thread(run.arm_threads is not None):
            days = tqdm(range(config.n_days), desc="simulate-ab", unit="day", disable=not progress)
            for day in days:
                for tick in range(config.behaviour.ticks_per_day):
                    run.tick(day, tick)
                run.close_day(day)
    finally:
        run.close()
        for universe in universes:
            universe.runner.close()
    timings["simulation_seconds"] = time.perf_counter() - started
    return run.result(planning, timings)


class _Run:
    """The state of one simulation between ticks: the arms' copies and everything recorded."""

    def __init__(
        self,
        config: ExperimentConfig,
        history: History,
        universes: list[_Universe],
        clock: SimulationClock,
        tick_share: npt.NDArray[np.float64],
    ) -> None:
        self.config = config
        self.history = history
        self.world = history.world
        self.undrifted_world = history.world.without_drift()
        self.universes = universes
        self.clock = clock
        self.tick_share = tick_share
        self.tick_seconds = SECONDS_PER_DAY // config.behaviour.ticks_per_day
        # Every bundle starts with the catalogue released by the experiment's start.
        self.released_until = history.start
        n_arms, n_users, n_days = len(universes), self.world.n_users, config.n_days
        self.user_ids = [f"u{i}" for i in range(n_users)]
        self.sessions = np.zeros((n_users, n_days), dtype=np.int32)
        self.clicks = np.zeros((n_arms, n_users, n_days), dtype=np.float32)
        self.expected = np.zeros((n_arms, n_users, n_days), dtype=np.float32)
        self.undrifted_expected = np.zeros((n_arms, n_days))
        self.latency = np.zeros((n_arms, n_users))
        self.diversity = np.zeros((n_arms, n_users))
        self.long_tail = np.zeros((n_arms, n_users))
        self.head = _head_items(history.pre_item_clicks, config.analysis.head_share)
        self.popularity_feature = np.log1p(history.pre_item_clicks)
        self.daily_rows: list[dict[str, Any]] = []
        # Organic events per session: organic_share of the consumption under the logging policy.
        self.organic_rate = organic_rate(config.behaviour.organic_share, history.click_rate)
        self.organic_today = 0
        self.monitor_rows: list[dict[str, Any]] = []
        self.arm_threads = (
            ThreadPoolExecutor(
                len(universes), thread_name_prefix="arm", initializer=_one_openmp_thread
            )
            if config.behaviour.parallel_arms and len(universes) > 1
            else None
        )

    def close(self) -> None:
        if self.arm_threads is not None:
            self.arm_threads.shutdown()

    def tick(self, day: int, tick: int) -> None:
        """Arrivals of one tick, served and answered in every arm's copy."""
        config, behaviour = self.config, self.config.behaviour
        tick_start = self.history.start + day * SECONDS_PER_DAY + tick * self.tick_seconds
        rates = self.world.session_rates(tick_start + self.tick_seconds // 2)
        lam = behaviour.sessions_per_user_day * self.tick_share[tick] * rates
        arrivals = _rng(config.seed, STREAM_ARRIVALS, day, tick).random(rates.size)
        users = np.flatnonzero(arrivals < -np.expm1(-lam))  # at most one session per tick
        if users.size == 0:
            return
        offsets = _rng(config.seed, STREAM_TIMES, day, tick).integers(
            0, self.tick_seconds, users.size
        )
        times = tick_start + offsets
        uniforms = _rng(config.seed, STREAM_CHOICES, day, tick).random(users.size)
        sample = _rng(config.seed, STREAM_MONITOR, day, tick).permutation(users.size)[
            : config.monitors.score_sample_per_tick
        ]
        organic = draw_organic(
            self.world,
            users,
            times,
            self.organic_rate,
            behaviour.organic_popularity_bias,
            _rng(config.seed, STREAM_ORGANIC, day, tick),
        )
        self.organic_today += organic.size
        self._release(tick_start)
        self.sessions[users, day] += 1
        # Feedback of this tick is delivered at its end: the logs' clock says so.
        self.clock.now = tick_start + self.tick_seconds
        ids = [self.user_ids[u] for u in users]

        def run_arm(universe: _Universe) -> tuple[_Outcome, npt.NDArray[np.float64]]:
            # Touches only this arm's copy (its service, log, memories) and read-only shared data.
            outcome = _serve(
                universe, self.world, self.undrifted_world, ids, users, times, uniforms, behaviour
            )
            pipeline = universe.runner.service.pipeline
            scores = _prediction_scores(pipeline, ids, times, outcome, sample)
            # Found outside the slate: consumed (fatigue) and logged, never a click on a slate.
            universe.consumed.write(users[organic.rows], organic.items[:, None])
            events = _click_events(universe, ids, times, outcome, day, tick)
            events += _organic_events(universe, ids, organic, day, tick)
            universe.runner.record(events)
            universe.runner.end_tick()
            return outcome, scores

        answers = (
            self.arm_threads.map(run_arm, self.universes)
            if self.arm_threads is not None
            else map(run_arm, self.universes)
        )
        for a, (universe, (outcome, scores)) in enumerate(
            zip(self.universes, answers, strict=True)
        ):
            self._record(a, users, day, outcome)
            universe.tracks["score"].add(scores)

    def _release(self, now: int) -> None:
        """Hand the items released since the last tick to every arm (online kinds add them)."""
        released = self.history.items.filter(
            (pl.col("created_at") > self.released_until) & (pl.col("created_at") <= now)
        ).select("item_id", "categories", "created_at")
        self.released_until = now
        for universe in self.universes:
            universe.runner.release(released, now)

    def _record(self, arm: int, users: npt.NDArray[np.int64], day: int, outcome: _Outcome) -> None:
        clicked = outcome.clicked >= 0
        self.clicks[arm, users, day] += clicked
        self.expected[arm, users, day] += outcome.expected
        self.undrifted_expected[arm, day] += outcome.undrifted_expected.sum()
        self.latency[arm, users] += outcome.latency_ms
        self.diversity[arm, users] += slate_diversity(outcome.slates, self.world.item_category)
        self.long_tail[arm, users] += _tail_share(outcome.slates, self.head)
        chosen = outcome.slates[clicked, outcome.clicked[clicked]]
        self.universes[arm].tracks["clicked_popularity"].add(self.popularity_feature[chosen])

    def close_day(self, day: int) -> None:
        """Daily rows, monitor checks, and the retrains the arms' policies ask for."""
        end_of_day = self.history.start + (day + 1) * SECONDS_PER_DAY
        self.clock.now = end_of_day
        for a, universe in enumerate(self.universes):
            self.daily_rows.append(
                _daily_row(universe, day, self.sessions, self.clicks[a], self.expected[a])
                | {
                    "undrifted_expected_clicks": float(self.undrifted_expected[a, day]),
                    "organic_events": self.organic_today,
                }
                | universe.runner.day_stats()
            )
            alerts = {}
            for name, track in universe.tracks.items():
                check = track.close_day(day)
                alerts[name] = check is not None and check.alert
                if check is not None:
                    self.monitor_rows.append(
                        {"arm": universe.runner.name, "monitor": name, "day": day}
                        | _window_row(check)
                    )
            runner = universe.runner
            reason = runner.wants_retrain(day, alerts[runner.config.monitor])
            if reason is None:
                reason = runner.wants_oracle_retrain(day, self.config.drift_day)
            if reason is not None and day + 1 < self.config.n_days:  # no retrain after the end
                runner.retrain(day, end_of_day, reason)
                for track in universe.tracks.values():
                    track.reset()
        self.organic_today = 0

    def result(self, planning: dict[str, Any], timings: dict[str, float]) -> SimulationResult:
        retrains = [row for u in self.universes for row in u.runner.retrains]
        n_sessions = int(self.sessions.sum())
        loop = timings["simulation_seconds"]
        timings |= {
            "retrain_seconds": float(sum(row["seconds"] for row in retrains)),
            "sessions": float(n_sessions),
            "sessions_per_second": n_sessions / loop if loop > 0 else math.nan,
            "arm_sessions_per_second": len(self.universes) * n_sessions / loop
            if loop > 0
            else math.nan,
        }
        end = self.history.start + self.config.n_days * SECONDS_PER_DAY
        released = int((self.world.item_release < end).sum())
        new = (self.world.item_release > self.history.start) & (self.world.item_release < end)
        return SimulationResult(
            config=self.config,
            user_ids=self.user_ids,
            sessions=self.sessions,
            clicks=self.clicks,
            expected_clicks=self.expected,
            latency_ms=self.latency,
            diversity=self.diversity,
            long_tail=self.long_tail,
            pre_user_clicks=self.history.pre_user_clicks,
            daily=pl.DataFrame(self.daily_rows),
            monitors=_monitor_frame(self.monitor_rows),
            retrains=pl.DataFrame(
                retrains,
                schema={
                    "arm": pl.String,
                    "day": pl.Int64,
                    "reason": pl.String,
                    "seconds": pl.Float64,
                },
            ),
            planning=planning,
            timings=timings,
            catalog_coverage={
                u.runner.name: float(u.shown.sum() / released) for u in self.universes
            },
            new_item_coverage={
                u.runner.name: float(u.shown[new].sum() / new.sum()) if new.any() else math.nan
                for u in self.universes
            },
        )


@dataclass(frozen=True)
class _Outcome:
    """One arm's answer to one tick: (n, S) world item slates, clicked slot (-1 none), expected
    clicks (n,) and what they would have been without the drift (n,), amortised latency (n,)
    ms, and the responses."""

    slates: npt.NDArray[np.int64]
    clicked: npt.NDArray[np.int64]
    expected: npt.NDArray[np.float64]
    undrifted_expected: npt.NDArray[np.float64]
    latency_ms: npt.NDArray[np.float64]
    recommendations: list[Recommendation]


def _serve(
    universe: _Universe,
    world: World,
    undrifted_world: World,
    ids: list[str],
    users: npt.NDArray[np.int64],
    times: npt.NDArray[np.int64],
    uniforms: npt.NDArray[np.float64],
    behaviour: BehaviourConfig,
) -> _Outcome:
    """Serve one tick's sessions in one arm's copy and draw the users' choices."""
    k = behaviour.slate_size
    recs, batch_ms = universe.runner.recommend(ids, times, k, behaviour.batch_size)
    slates = slate_matrix(recs, k)
    probabilities = world.click_probabilities(users, slates, times)
    penalties = behaviour.fatigue_per_repeat * repeat_counts(universe.memory.items[users], slates)
    consumed = repeat_counts(universe.consumed.items[users], slates) > 0
    penalties = penalties + behaviour.consumed_penalty * consumed
    probabilities = apply_fatigue(probabilities, penalties)
    clicked = draw_choices(probabilities, uniforms)
    # The same slates, fatigue and times in the world without drift: the drift's own cost.
    undrifted = (
        probabilities  # a world without drift is its own counterfactual: nothing to recompute
        if world.config.drift == "none"
        else apply_fatigue(undrifted_world.click_probabilities(users, slates, times), penalties)
    )
    universe.memory.write(users, slates)
    hit = np.flatnonzero(clicked >= 0)
    universe.consumed.write(users[hit], slates[hit, clicked[hit]][:, None])
    sizes = np.diff(np.append(np.arange(0, len(ids), behaviour.batch_size), len(ids)))
    latency = np.repeat(np.asarray(batch_ms) / sizes, sizes)
    universe.batch_ms.extend(batch_ms)
    universe.degraded_today += sum(1 for r in recs if r.degraded)
    valid = slates[slates >= 0]
    universe.shown[valid] = True
    universe.shown_today.update(np.unique(valid).tolist())
    return _Outcome(
        slates, clicked, 1.0 - probabilities[:, -1], 1.0 - undrifted[:, -1], latency, recs
    )


def slate_matrix(recommendations: list[Recommendation], k: int) -> npt.NDArray[np.int64]:
    """(n, k) world item indices of the recommended ids (``"i<idx>"``); -1 pads short slates."""
    lengths = np.array([len(r.item_ids) for r in recommendations], dtype=np.int64)
    slates = np.full((len(recommendations), k), -1, dtype=np.int64)
    if lengths.sum() == 0:
        return slates
    flat = pl.Series([i for r in recommendations for i in r.item_ids], dtype=pl.String)
    index = flat.str.strip_prefix("i").cast(pl.Int64, strict=False)
    if index.null_count() or not flat.str.starts_with("i").all():
        bad = flat.filter(index.is_null() | ~flat.str.starts_with("i"))[0]
        raise DataError(f"recommended item id {bad!r} is not a synthetic-world id ('i<index>')")
    rows = np.repeat(np.arange(lengths.size), lengths)
    columns = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    slates[rows, columns] = index.to_numpy()
    return slates


def _click_events(
    universe: _Universe,
    ids: list[str],
    times: npt.NDArray[np.int64],
    outcome: _Outcome,
    day: int,
    tick: int,
) -> list[FeedbackEvent]:
    """One click event per clicked session, ids unique within the arm's log."""
    rows = np.flatnonzero(outcome.clicked >= 0)
    weight = universe.runner.service.feedback.config.type_weights["click"]
    return [
        FeedbackEvent(
            f"{day}-{tick}-{row}",
            ids[row],
            outcome.recommendations[row].item_ids[outcome.clicked[row]],
            "click",
            int(times[row]),
            weight,
        )
        for row in rows.tolist()
    ]


def _organic_events(
    universe: _Universe, ids: list[str], organic: OrganicEvents, day: int, tick: int
) -> list[FeedbackEvent]:
    """One ``organic`` event per organic consumption of the tick (ids unique within the log)."""
    weight = universe.runner.service.feedback.config.type_weights[ORGANIC_EVENT]
    return [
        FeedbackEvent(f"o{day}-{tick}-{row}", ids[row], f"i{item}", ORGANIC_EVENT, time, weight)
        for row, item, time in zip(
            organic.rows.tolist(), organic.items.tolist(), organic.times.tolist(), strict=True
        )
    ]


def _prediction_scores(
    pipeline: Pipeline,
    ids: list[str],
    times: npt.NDArray[np.int64],
    outcome: _Outcome,
    sample: npt.NDArray[np.int64],
) -> npt.NDArray[np.float64]:
    """The model's score of the top item shown to the sampled sessions (the prediction monitor).

    With a ranker in the pipeline, its score; without one (retrieval order), the two-tower
    model's score of that item for the user's current state. Empty when neither exists.
    """
    rows = [int(r) for r in sample if outcome.recommendations[r].item_ids]
    if not rows:
        return np.empty(0)
    if pipeline.ranker is not None:
        return np.array([outcome.recommendations[r].scores[0] for r in rows], dtype=np.float64)
    tower = pipeline.artifacts.retrieval.sources_.get("two_tower")
    if not isinstance(tower, TwoTowerSource):
        return np.empty(0)
    top = [outcome.recommendations[r].item_ids[0] for r in rows]
    items = pipeline.artifacts.items.index(pl.Series(top, dtype=pl.String), allow_unknown=True)
    users = pipeline.state.batch([ids[r] for r in rows], times[rows])
    scores = tower.score(users, items[:, None].astype(np.int64))[:, 0].astype(np.float64)
    return scores[np.isfinite(scores)]


def _daily_row(
    universe: _Universe,
    day: int,
    sessions: npt.NDArray[np.int32],
    clicks: npt.NDArray[np.float32],
    expected: npt.NDArray[np.float32],
) -> dict[str, Any]:
    batch = np.asarray(universe.batch_ms) if universe.batch_ms else np.full(1, np.nan)
    n_sessions = int(sessions[:, day].sum())
    row = {
        "arm": universe.runner.name,
        "day": day,
        "sessions": n_sessions,
        "clicks": float(clicks[:, day].sum()),
        "expected_clicks": float(expected[:, day].sum()),
        "degraded": universe.degraded_today,
        "distinct_items": len(universe.shown_today),
        "batch_ms_p50": float(np.percentile(batch, 50)),
        "batch_ms_p99": float(np.percentile(batch, 99)),
        "ms_per_session": float(batch.sum() / n_sessions) if n_sessions else float("nan"),
    }
    universe.degraded_today = 0
    universe.batch_ms.clear()
    universe.shown_today.clear()
    return row


def _window_row(check: WindowDrift) -> dict[str, Any]:
    return {
        "time": check.time,
        "n": check.n,
        "psi": check.psi,
        "ks_statistic": check.ks_statistic,
        "ks_p_value": check.ks_p_value,
        "alert": check.alert,
    }


def _monitor_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    schema = {
        "arm": pl.String,
        "monitor": pl.String,
        "day": pl.Int64,
        "time": pl.Float64,
        "n": pl.Int64,
        "psi": pl.Float64,
        "ks_statistic": pl.Float64,
        "ks_p_value": pl.Float64,
        "alert": pl.Boolean,
    }
    return pl.DataFrame(rows, schema=schema)


def _start_universes(
    config: ExperimentConfig,
    history: History,
    trainer: BundleTrainer,
    clock: SimulationClock,
    root: Path,
) -> list[_Universe]:
    """Train one base bundle per distinct training config, then start every arm's service.

    Every arm's service starts from the same state: the pre-period dataset's train + valid
    splits (the service's ``history``) plus its feedback log, seeded with the rest of the
    pre-period (the test window, logged after the bundles' training data ended).
    """
    bundles: dict[str, Path] = {}
    universes = []
    n_users, n_items = history.world.n_users, history.world.n_items
    for index, arm in enumerate(config.arms):
        training = config.arm_training(arm)
        key = training_key(training)
        if key not in bundles:
            bundles[key] = trainer.train(f"base-{index}", history.clicks, training, history.start)
        dataset = BundleTrainer.dataset_of(next(iter(bundles.values())))
        log = open_feedback_log(root / "arms" / arm.name / "feedback.db", clock)
        seed_feedback_log(log, load_dataset(dataset).splits["test"])
        runner = start_arm(
            arm,
            bundles[key],
            training,
            log,
            trainer,
            dataset,
            history.clicks,
            clock=clock,
            oracle_log=partial(oracle_clicks, history, config.pre_period_days),
        )
        consumed = _Rings.empty(n_users, config.behaviour.consumed_memory)
        consumed.fill(history.log_user, history.log_item)
        universes.append(
            _Universe(
                runner=runner,
                memory=_Rings.empty(n_users, config.behaviour.fatigue_memory),
                consumed=consumed,
                shown=np.zeros(n_items, dtype=bool),
                tracks={name: _MonitorTrack(config.monitors) for name in MONITORS},
            )
        )
    return universes


def _one_openmp_thread() -> None:
    """Arm-thread initializer: OpenMP (FAISS, LightGBM) runs on this thread alone.

    OpenMP's thread count is a per-thread setting, so each arm thread sets its own; with the arms
    already one per core, a second OpenMP thread per arm would only wait for a busy core.
    """
    ThreadpoolController().limit(limits=1, user_api="openmp")


@contextmanager
def _one_blas_thread(active: bool) -> Iterator[None]:
    """BLAS on one thread while ``active`` (its thread count is process-wide: set once, here)."""
    if not active:
        yield
        return
    with ThreadpoolController().limit(limits=1, user_api="blas"):
        yield


def _tick_shares(world: World, ticks_per_day: int) -> npt.NDArray[np.float64]:
    """(ticks_per_day,) share of a day's sessions in each tick, from the world's hour profile."""
    profile = np.asarray(world.config.hour_profile, dtype=np.float64)
    hours = HOURS_PER_DAY // ticks_per_day
    shares = profile.reshape(ticks_per_day, hours).sum(axis=1)
    return shares / shares.sum()


def _head_items(
    pre_item_clicks: npt.NDArray[np.float64], head_share: float
) -> npt.NDArray[np.bool_]:
    """(n_items,) True for the most-clicked ``head_share`` of the catalogue in the pre-period."""
    n_head = max(1, round(head_share * pre_item_clicks.size))
    head = np.zeros(pre_item_clicks.size, dtype=bool)
    head[np.argsort(-pre_item_clicks, kind="stable")[:n_head]] = True
    return head


def _tail_share(
    slates: npt.NDArray[np.int64], head: npt.NDArray[np.bool_]
) -> npt.NDArray[np.float64]:
    """(n,) share of each slate's items outside the head (0 for an empty slate)."""
    valid = slates >= 0
    tail = valid & ~head[np.maximum(slates, 0)]
    shown = valid.sum(axis=1)
    return np.divide(tail.sum(axis=1), shown, out=np.zeros(len(slates)), where=shown > 0)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))
