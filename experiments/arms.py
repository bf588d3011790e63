"""The arms of a simulated A/B experiment at run time: bundles, services, update policies.

An **arm** is a variant of the served system: a bundle (trained from the experiment's training
config, optionally with per-arm overrides) served by a real :class:`RecommenderService`, plus an
update policy, its ``kind`` (:class:`experiments.config.ArmConfig`):

    frozen          the bundle as trained; feedback is logged but never reaches the online state
    online_state    frozen weights + online state updates (``RecommenderService.record_feedback``);
                    ``online`` is its alias
    online_learning online state updates + the online trainer: the two-tower's weights follow
                    the feedback stream, one update at the end of every tick
                    (``pipeline/online_learning``, the service's own trainer)
    retrain_every   online, plus a retrain every ``every_days`` days on the pre-period + its log
    drift_retrain   online, plus a retrain when the arm's drift monitor alerts (``monitor``), at
                    most once every ``cooldown_days``
    popularity      a popularity-only bundle (the baseline every model must beat), online state
    oracle          online state, plus one retrain at the end of the drift day on a log the world's
                    logging policy generates from the users' *true post-drift* preferences: what
                    a perfect retrain could win back, the bound for every other arm's recovery

Every arm keeps its own feedback log (SQLite WAL, as in the service). Its service seeds the users'
state from the pre-period dataset (``history``) and replays the log, which starts with the
pre-period's last clicks (those after the bundle's training data) and then gets the arm's own
feedback; a retrain learns from the pre-period plus that feedback, as a production retrain would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from data.errors import BundleError
from data.prepare import prepare_dataset
from data.schema import ITEM_ID, TIMESTAMP, USER_ID, WEIGHT, empty_interactions
from data.splits import SplitConfig
from experiments.config import ArmConfig
from experiments.organic import ORGANIC_EVENT
from pipeline.artifacts import train_bundle
from pipeline.bundle import verify_bundle
from pipeline.feedback_log import (
    DEFAULT_TYPE_WEIGHTS,
    FeedbackEvent,
    FeedbackLog,
    FeedbackLogConfig,
)
from pipeline.funnel import Recommendation, RecommendRequest
from pipeline.service import RecommenderService

# Written next to a bundle the simulator trained: the exact training config, so a rerun in the same
# work directory reuses the bundle only for the same data *and* the same config.
TRAINING_MARKER = "training.json"


class SimulationClock:
    """The simulated wall clock, injected into the feedback logs (``received_at``, skew check)."""

    def __init__(self, now: int) -> None:
        self.now = int(now)

    def __call__(self) -> float:
        return float(self.now)


@dataclass(frozen=True)
class BundleTrainer:
    """Trains bundles for the arms: ``<workdir>/bundles/<tag>/{data,bundle}`` per training run.

    ``catalog_at(now)`` returns the items frame of the items released by ``now`` (a retrain
    learns the items that appeared since the last one; the serving catalogue never holds items
    from the future).
    """

    workdir: Path
    catalog_at: Callable[[int], pl.DataFrame]
    users: pl.DataFrame | None = None

    def train(self, tag: str, clicks: pl.DataFrame, training: Mapping[str, Any], now: int) -> Path:
        """Split ``clicks`` by time (train/valid/test), train a bundle, return its directory.

        A bundle already in the work directory that was trained on the same dataset (same
        content fingerprint) with the same config is reused: rerunning an experiment in a kept
        work directory skips the training it has already done.
        """
        root = self.workdir / "bundles" / tag
        manifest = prepare_dataset(
            root / "data",
            clicks,
            split=SplitConfig(),
            source={"kind": "ab-simulator", "tag": tag, "until": int(now)},
            items=self.catalog_at(now),
            users=self.users,
        )
        bundle = root / "bundle"
        marker = root / TRAINING_MARKER
        key = training_key(training)
        if not (_is_bundle_of(bundle, manifest["fingerprint"]) and _read(marker) == key):
            marker.unlink(missing_ok=True)
            train_bundle(root / "data", bundle, config=dict(training))
            marker.write_text(key)
        return bundle

    @staticmethod
    def dataset_of(bundle: Path) -> Path:
        """The dataset directory a bundle of :meth:`train` was trained on."""
        return bundle.parent / "data"


def _is_bundle_of(bundle: Path, fingerprint: str) -> bool:
    """Whether ``bundle`` is a valid bundle trained on the dataset with ``fingerprint``."""
    if not (bundle / "manifest.json").is_file():
        return False
    try:
        manifest = verify_bundle(bundle)
    except BundleError:
        return False
    return bool(manifest.get("dataset_fingerprint") == fingerprint)


def _read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def training_key(training: Mapping[str, Any]) -> str:
    """A stable key of a training config: arms with equal configs share one base bundle."""
    return json.dumps(training, sort_keys=True, default=str)


class ArmRunner:
    """One arm at run time: a real ``RecommenderService`` and the arm's update policy.

    ``recommend`` calls the service's pipeline in batches; ``record`` sends feedback down the
    service path (online kinds: ``record_feedback``, i.e. durable append + online state update;
    frozen: the append only); ``wants_retrain`` applies the kind's policy at the end of a day and
    ``retrain`` trains a new bundle and hot-reloads it through ``RecommenderService.reload``,
    exactly as ``POST /admin/reload`` does (the state is rebuilt from the feedback log).
    """

    def __init__(
        self,
        config: ArmConfig,
        service: RecommenderService,
        training: Mapping[str, Any],
        trainer: BundleTrainer,
        pre_period: pl.DataFrame | None = None,
        oracle_log: Callable[[int], pl.DataFrame] | None = None,
    ) -> None:
        self.config = config
        # oracle arms: the clicks of the world's true post-drift preferences, ending at a time.
        self.oracle_log = oracle_log
        self._updates_today: list[tuple[int, float]] = []
        self.service = service
        self.training = dict(training)
        self.trainer = trainer
        # The pre-period's clicks: with the log's clicks after them, what a retrain learns from.
        self.pre_period = pre_period if pre_period is not None else empty_interactions()
        times = self.pre_period[TIMESTAMP].to_numpy()
        self._pre_period_end = int(times.max()) if times.size else -1
        self.retrains: list[dict[str, Any]] = []
        self._last_retrain_day = -1

    @property
    def name(self) -> str:
        return self.config.name

    def recommend(
        self, user_ids: Sequence[str], now: npt.NDArray[np.int64], k: int, batch_size: int
    ) -> tuple[list[Recommendation], list[float]]:
        """Recommendations for ``user_ids`` at times ``now`` (n,), and each batch's wall ms."""
        out: list[Recommendation] = []
        batch_ms: list[float] = []
        pipeline = self.service.pipeline  # one pipeline per call, as a request would see it
        for lo in range(0, len(user_ids), batch_size):
            requests = [
                RecommendRequest(user_id=u, k=k, now=int(t))
                for u, t in zip(
                    user_ids[lo : lo + batch_size], now[lo : lo + batch_size], strict=True
                )
            ]
            start = time.perf_counter()
            out.extend(pipeline.recommend(requests))
            batch_ms.append((time.perf_counter() - start) * 1000)
        return out, batch_ms

    def record(self, events: list[FeedbackEvent]) -> None:
        """Feedback through the service path (frozen arms: logged, never observed)."""
        limit = self.service.feedback.config.max_events_per_append
        for lo in range(0, len(events), limit):
            chunk = events[lo : lo + limit]
            if self.config.updates_online:
                self.service.record_feedback(chunk)
            else:
                self.service.feedback.append(chunk)

    def release(self, items: pl.DataFrame, now: int) -> None:
        """Items the world released since the last call (``item_id``, ``categories``,
        ``created_at``): online kinds serve them from now on through the service's live
        catalogue (``RecommenderService.add_items``); frozen ones only after a retrain."""
        if self.config.updates_online and items.height:
            self.service.add_items(items, now=now)

    def end_tick(self) -> None:
        """The end of a tick: an ``online_learning`` arm's model learns the tick's feedback."""
        if not self.config.learns_online:
            return
        stats = self.service.update_model()
        if stats is not None:
            self._updates_today.append((stats.examples, stats.freshness_s))

    def day_stats(self) -> dict[str, Any]:
        """The day's online learning, for the daily row (then reset): the published online step,
        examples learned, and the examples' median freshness (event to first use, seconds)."""
        updates, self._updates_today = self._updates_today, []
        examples = sum(n for n, _ in updates)
        freshness = float(np.median([f for _, f in updates])) if updates else float("nan")
        step = self.service.pipeline.artifacts.retrieval.online_step
        return {"online_step": step, "online_examples": examples, "model_freshness_s": freshness}

    def wants_oracle_retrain(self, day: int, drift_day: int | None) -> str | None:
        """An oracle arm retrains once, at the end of the drift day."""
        if self.config.kind == "oracle" and drift_day is not None and day == drift_day:
            return "oracle"
        return None

    def wants_retrain(self, day: int, monitor_alert: bool) -> str | None:
        """The reason to retrain at the end of ``day`` (0-based), or ``None``."""
        kind = self.config.kind
        if kind == "retrain_every" and (day + 1) % self.config.every_days == 0:
            return "schedule"
        cooled = day - self._last_retrain_day >= self.config.cooldown_days
        if kind == "drift_retrain" and monitor_alert and cooled:
            return f"{self.config.monitor} alert"
        return None

    def retrain(self, day: int, now: int, reason: str) -> float:
        """Train on the pre-period + this arm's logged clicks, then hot-reload; returns seconds."""
        start = time.perf_counter()
        if self.config.kind == "oracle":
            if self.oracle_log is None:
                raise BundleError(f"arm {self.name!r}: an oracle arm needs the world's truth")
            clicks = self.oracle_log(now)
        else:
            logged = self.service.feedback.to_frame().filter(
                (pl.col(WEIGHT) > 0) & (pl.col(TIMESTAMP) > self._pre_period_end)
            )
            clicks = pl.concat([self.pre_period, logged])
        bundle = self.trainer.train(f"{self.name}-day{day:03d}", clicks, self.training, now)
        self.service.reload(bundle)
        seconds = time.perf_counter() - start
        self._last_retrain_day = day
        self.retrains.append({"arm": self.name, "day": day, "reason": reason, "seconds": seconds})
        return seconds

    def close(self) -> None:
        self.service.close()


def open_feedback_log(path: Path, clock: SimulationClock) -> FeedbackLog:
    """A fresh feedback log for an arm: SQLite WAL with ``synchronous=NORMAL`` (a simulation does
    not need power-loss durability, and NORMAL is several times faster per commit).

    A log left by an earlier run in the same place is deleted first: its event ids would make
    this run's events look like duplicates, and duplicates never reach the online state.
    """
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    # Organic consumption (experiments/organic.py) is a positive of its own type.
    type_weights = {**DEFAULT_TYPE_WEIGHTS, ORGANIC_EVENT: 1.0}
    return FeedbackLog(
        FeedbackLogConfig(path=path, synchronous="NORMAL", type_weights=type_weights), clock=clock
    )


def seed_feedback_log(log: FeedbackLog, clicks: pl.DataFrame, prefix: str = "pre") -> int:
    """Append ``clicks`` (canonical frame) as click events; returns the count.

    The simulator seeds each arm's log with the pre-period clicks that came after the bundle's
    training data (the dataset's test window): a service that had been running since its bundle
    was trained would have logged exactly these.
    """
    weight = log.config.type_weights["click"]
    users = clicks[USER_ID].to_list()
    items = clicks[ITEM_ID].to_list()
    times = clicks[TIMESTAMP].to_list()
    limit = log.config.max_events_per_append
    for lo in range(0, len(users), limit):
        hi = min(lo + limit, len(users))
        log.append(
            FeedbackEvent(f"{prefix}-{i}", users[i], items[i], "click", times[i], weight)
            for i in range(lo, hi)
        )
    return len(users)


def start_arm(
    arm: ArmConfig,
    bundle: Path,
    training: Mapping[str, Any],
    log: FeedbackLog,
    trainer: BundleTrainer,
    history: Path,
    pre_period: pl.DataFrame,
    *,
    clock: SimulationClock | None = None,
    oracle_log: Callable[[int], pl.DataFrame] | None = None,
) -> ArmRunner:
    """A running arm: a ``RecommenderService`` over ``bundle`` and the arm's seeded ``log``.

    ``history``: the pre-period dataset whose train + valid splits seed the users' state (the
    service's ``history``); the log then holds every later event exactly once. Seeding from the
    bundle's own snapshot instead would count the events of a retrained bundle twice, once from
    its snapshot and once from the log it was trained on.
    """
    # No budgets: the simulator calls the pipeline with hundreds of users per batch, which the
    # service's per-request budgets (tens of ms) would degrade every time; stages run inline in
    # the arm's thread (see simulator._Run). A stage that raises still degrades, and it counts.
    # Retrained bundles are the simulator's own, just written: no checker process to vet them.
    # online_learning: the service's own trainer, stepped by the simulator at each tick's end
    # (no background thread: the simulated clock, not the wall clock, paces the updates).
    service = RecommenderService(
        bundle,
        log,
        history=history,
        enforce_budgets=False,
        check_reloads_in_child=False,
        online_learning=arm.online_learning_config() if arm.learns_online else None,
        background_updates=False,
        clock=clock if clock is not None else time.time,
    )
    return ArmRunner(arm, service, training, trainer, pre_period, oracle_log)
