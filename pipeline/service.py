"""The live recommender: the pipeline, its online state, the feedback log, and hot reload. No HTTP.

The FastAPI app (``serving/app.py``) is a thin shell over :class:`RecommenderService`, so the
behaviour that matters (reload with no failed request, feedback reaching the next request) is
testable without a web server.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import polars as pl

from data.dataset import load_dataset
from data.errors import BundleError, DataError
from data.idmap import IdMap
from data.schema import ITEM_ID, TIMESTAMP, USER_ID, WEIGHT
from pipeline.artifacts import Artifacts, load_artifacts, load_history
from pipeline.bundle import MANIFEST_NAME, verify_bundle
from pipeline.bundle_check import BundleChecker, describe, smoke_test
from pipeline.catalog_updates import CatalogChange, check_items_frame, extend_artifacts
from pipeline.factory import make_pipeline
from pipeline.feedback_log import (
    LOG_SCHEMA,
    AppendResult,
    BundleGeneration,
    FeedbackEvent,
    FeedbackLogBusyError,
)
from pipeline.feedback_store import FeedbackStore
from pipeline.funnel import BudgetConfig, Pipeline
from pipeline.online_learning import (
    AlsItemUpdater,
    AlsOnlineTrainer,
    OnlineLearningConfig,
    OnlineTrainer,
    UpdateStats,
)
from pipeline.online_state import OnlineState, RestoredEvents, observe_frame
from retrieval.als import ALSSource
from retrieval.base import PAD_ITEM
from retrieval.two_tower.source import TwoTowerSource

logger = logging.getLogger(__name__)

# The history cut of an empty seed history: below every event time, so every event is new.
_NO_HISTORY = np.iinfo(np.int64).min
# Users held in memory per worker beyond the bundle's own (its history snapshot's users, always
# held): anyone may post feedback under a new user id, so this is what bounds a worker's memory.
# Budget: 2 KiB per held user with the default history_length (measured ~1.5 KB: history, seen
# items and the LRU's bookkeeping; docs/benchmarks.md, online state memory), so at most ~200 MB
# per worker at this cap. An evicted user costs one indexed log read on their next request (~2 ms
# for a batch of 8 on a 1M-item bundle, under the state's lock). The A/B simulator's 50k-user
# world stays under the cap, so simulations never evict.
DEFAULT_MAX_ONLINE_USERS = 100_000


@dataclass(frozen=True)
class SimilarItem:
    item_id: str
    score: float
    source: str


class UnknownItemError(DataError):
    """The item id is not in the served catalogue (HTTP 404)."""


@dataclass
class LogRestore:
    """Reads evicted users' events back from the feedback log (``OnlineState.bound``), by the
    rule the log replay follows (``_usable_events``)."""

    feedback: FeedbackStore
    history_cut: int
    # The served item map: replaced when items are added live, so their events count.
    items: IdMap

    def __call__(self, user_ids: list[str]) -> RestoredEvents:
        watermark = self.feedback.last_seq()
        frame = self.feedback.read_users(user_ids, until=watermark)
        users, items, times, _, _ = _usable_events(frame, self.history_cut, self.items)
        return RestoredEvents(users, items, times, watermark)


@dataclass(frozen=True)
class _Served:
    """The live pipeline and how much of the feedback log its online state holds.

    Swapped as one value, so the pipeline and its bookkeeping never disagree.
    """

    pipeline: Pipeline
    # The newest event time (seconds UTC) of the history the state was seeded from: logged
    # events at or before it belong to that history, not to new feedback (see _seed_state).
    history_cut: int
    # The state holds every new logged event with seq <= replayed_seq (0: none replayed yet).
    replayed_seq: int = 0
    # Rebuilds the users the state evicted (None: the state is not bounded).
    restore: LogRestore | None = None
    # The artifacts hold every logged catalogue update with seq <= items_seq.
    items_seq: int = 0
    # The published bundle generation this pipeline serves (0: not a published one).
    generation: int = 0
    # The bundle directory it was loaded from.
    bundle: Path = Path()
    # Trains the bundle's models on live feedback (None: weights stay as trained).
    trainer: OnlineTrainer | AlsOnlineTrainer | None = None


class RecommenderService:
    """Owns the current :class:`Pipeline` and swaps it atomically on reload.

    history: optional dataset directory whose train + valid splits seed each user's recent history;
    by default the bundle's own history snapshot does. Feedback logged after that history is
    replayed from the log, so the online state is the same whether it was built by live feedback,
    a reload or a restart.
    budgets: the pipeline's per-stage latency budgets; ``enforce_budgets=False`` runs every stage
    inline in the caller's thread and never degrades for time (offline callers such as the
    simulator, whose batches of hundreds of users would overrun any per-request budget). A stage
    that raises still degrades either way.
    max_online_users: users held in memory beyond the bundle's own, least recently used evicted
    first and read back from the feedback log when they return (``pipeline/online_state.py``);
    None holds every user. online_user_ttl_s: also evict users unused this long (None: never).
    check_reloads_in_child: load and smoke-test a reload's candidate bundle in a child process
    before this one loads it (``pipeline/bundle_check.py``): a loader that crashes the process
    (LightGBM on a truncated model) then costs the child, not the service. Off, a reload is
    ~3 s faster the first time, for callers that reload bundles they just trained themselves.

    Several workers (processes, machines) sharing one feedback log behave as one service:
    ``catch_up`` applies what any of them logged (feedback, catalogue updates) in log order, and
    a log follower thread calls it every few milliseconds (``pipeline/log_follower.py``). With
    ``publish_reloads``, a reload also records the bundle in the log as a new generation, which
    every other worker then loads, warms and swaps in (``follow_published``); ``generation`` is
    the published generation ``bundle`` is (0: none).

    online_learning: train the two-tower online from live feedback (``pipeline/online_learning``);
    None keeps the weights as trained. online_checkpoint: a directory where the online weights
    are checkpointed and resumed from at start-up (same bundle only). background_updates: a
    thread takes the update every ``interval_s``; off, the caller calls :meth:`update_model`
    (the simulator does, at the end of each tick). clock: seconds UTC for freshness.
    """

    def __init__(
        self,
        bundle: str | Path,
        feedback: FeedbackStore,
        *,
        history: str | Path | None = None,
        budgets: BudgetConfig | None = None,
        enforce_budgets: bool = True,
        max_online_users: int | None = DEFAULT_MAX_ONLINE_USERS,
        online_user_ttl_s: float | None = None,
        check_reloads_in_child: bool = True,
        publish_reloads: bool = False,
        generation: int = 0,
        online_learning: OnlineLearningConfig | None = None,
        online_checkpoint: str | Path | None = None,
        background_updates: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.feedback = feedback
        self.publish_reloads = publish_reloads
        self.online_learning = online_learning
        self.online_checkpoint = Path(online_checkpoint) if online_checkpoint else None
        self.clock = clock
        self._updates_since_checkpoint = 0
        self.max_online_users = max_online_users
        self.online_user_ttl_s = online_user_ttl_s
        self.history = Path(history) if history is not None else None
        self.budgets = budgets if budgets is not None else BudgetConfig()
        self.enforce_budgets = enforce_budgets
        # One reload at a time (a slow bundle load happens under it, no request waits on it).
        self._reload_lock = threading.Lock()
        # Guards _served for its swap and for each live state update: held for in-memory work
        # and one short log read, never for a bundle load or a log write.
        self._swap_lock = threading.Lock()
        self._checker = BundleChecker() if check_reloads_in_child else None
        # The newest event time (seconds UTC) accepted here or applied from the log.
        self.last_feedback_timestamp: int | None = None
        self._served = replace(self._build(Path(bundle)), generation=generation)
        # A published generation this worker could not load (e.g. its path is missing here):
        # not retried until a newer one is published, so a bad bundle costs one attempt.
        self._refused_generation = 0
        self._stop_updates = threading.Event()
        self._update_thread: threading.Thread | None = None
        if online_learning is not None and background_updates:
            self._update_thread = threading.Thread(
                target=self._update_loop, name="online-updates", daemon=True
            )
            self._update_thread.start()

    @property
    def pipeline(self) -> Pipeline:
        """The pipeline serving now (a request keeps the one it picked up until it finishes)."""
        return self._served.pipeline

    @property
    def applied_seq(self) -> int:
        """The log position the online state holds: every event with seq <= this one."""
        return self._served.replayed_seq

    @property
    def bundle(self) -> Path:
        """The directory of the bundle serving now."""
        return self._served.bundle

    @property
    def generation(self) -> int:
        """The published bundle generation being served (0: not a published one)."""
        return self._served.generation

    # ---------------------------------------------------------------------------- lifecycle
    def _build(self, bundle: Path) -> _Served:
        # Memory-mapped: the uvicorn workers of one machine share the bundle's big arrays and
        # index through the page cache; items added live go to private overlays (add_items).
        # The feedback is replayed up to a bound read before the items (see _catch_up_served).
        bound = self.feedback.last_seq()
        artifacts, items_seq, _ = self._replay_items(load_artifacts(bundle, mmap=True))
        state, cut = self._seed_state(artifacts)
        restore = None
        if self.max_online_users is not None:
            # After the seed, which stays; before the replay, which the cap bounds.
            restore = LogRestore(self.feedback, cut, artifacts.items)
            state.bound(self.max_online_users, restore=restore, ttl_s=self.online_user_ttl_s)
        pipeline = make_pipeline(
            artifacts, state, budgets=self.budgets, enforce_budgets=self.enforce_budgets
        )
        served = self._replay_log(
            _Served(pipeline, cut, restore=restore, items_seq=items_seq, bundle=bundle),
            until=bound,
        )
        served = replace(served, trainer=self._make_trainer(served.pipeline))
        # Before the first request (start-up, or before a reload swaps it in): the snapshot's
        # user vectors in bulk (~1 s for 100k users) instead of one forward pass per request.
        started = time.perf_counter()
        warmed = served.pipeline.warm()
        logger.info("warmed %d users in %.1f s", warmed, time.perf_counter() - started)
        # A stage that raises degrades answers instead of failing them: a bundle that cannot
        # answer one request is refused here, not served degraded.
        smoke_test(served.pipeline)
        return served

    def _make_trainer(self, pipeline: Pipeline) -> OnlineTrainer | AlsOnlineTrainer | None:
        """The online trainer of ``pipeline``'s two-tower (and ALS items), or of its ALS items
        alone in a bundle without a two-tower, resumed from the checkpoint of the same bundle if
        there is one (None: online learning off, or nothing to train)."""
        if self.online_learning is None:
            return None
        sources = pipeline.artifacts.retrieval.sources_
        tower, als = sources.get("two_tower"), sources.get("als")
        updater = AlsItemUpdater(als) if isinstance(als, ALSSource) else None
        trainer: OnlineTrainer | AlsOnlineTrainer
        if isinstance(tower, TwoTowerSource):
            trainer = OnlineTrainer(tower, self.online_learning, clock=self.clock, als=updater)
        elif updater is not None:
            trainer = AlsOnlineTrainer(updater, self.online_learning, clock=self.clock)
        else:
            return None
        if self.online_checkpoint is not None and trainer.load_checkpoint(
            self.online_checkpoint, pipeline.artifacts.model_version
        ):
            logger.info("online weights resumed at step %d", trainer.step)
        return trainer

    def _replay_items(
        self, artifacts: Artifacts, since: int = 0, *, now: int | None = None
    ) -> tuple[Artifacts, int, tuple[str, ...]]:
        """``artifacts`` with the catalogue updates logged after ``since`` applied (the last
        value given for each item), the last update's seq and the retrieval sources that took
        the items. Runs before the feedback of the same read is replayed: events on those items
        then count.

        Updates were checked before they were logged, so none should fail; one that does all
        the same is reported and skipped: start-up never fails on the catalogue.
        """
        updates, items_seq = self.feedback.item_updates_since(since)
        if updates.height == 0:
            return artifacts, items_seq, ()
        latest = updates.group_by(ITEM_ID, maintain_order=True).agg(
            pl.col("categories").drop_nulls().last(), pl.col("created_at").drop_nulls().last()
        )
        try:
            when = int(time.time()) if now is None else now
            extended, change = extend_artifacts(artifacts, latest, now=when)
        except DataError as exc:
            logger.error("logged catalogue updates not applied: %s", exc)
            return artifacts, items_seq, ()
        logger.info("catalogue: %d logged items applied (%d new)", latest.height, change.added)
        return extended, items_seq, change.sources

    def _seed_state(self, artifacts: Artifacts) -> tuple[OnlineState, int]:
        """A state holding the seed history, and that history's newest event time.

        Why replay the log by event time and not by a log sequence number: a bundle is trained
        from a dataset, which carries no sequence numbers of this log, so which logged events the
        bundle has seen can only be told by time. Its history snapshot holds the train + valid
        events, so the snapshot's newest timestamp is the training cut. A logged
        event at or before the cut either is in the snapshot already (a retrain on a dataset
        exported from this log) or predates the data the bundle was trained on: replaying it
        would count it twice, or slot an old event into a history the bundle wrote. Only events
        after the cut are news. What this costs: an event that arrives with a client time at or
        before the cut and was not in the training data stays out of the online state; it is in
        the log, so the next retrain learns it.
        """
        history_length = artifacts.retrieval.config.history_length
        state = OnlineState(artifacts.users, len(artifacts.items), history_length)
        if self.history is not None:
            dataset = load_dataset(self.history)
            frame = pl.concat([dataset.splits["train"], dataset.splits["valid"]])
        else:
            frame = load_history(artifacts)
        observe_frame(state, artifacts.items, frame)
        # An empty seed history holds nothing a logged event could repeat: every event is new.
        cut = int(frame[TIMESTAMP].max()) if frame.height else _NO_HISTORY  # type: ignore[arg-type]
        return state, cut

    def _replay_log(self, served: _Served, until: int | None = None) -> _Served:
        """``served`` with every new logged event after ``served.replayed_seq`` (and up to
        ``until``, when given) observed.

        Reads until the log is exhausted: ``replayed_seq`` is then at least the seq of every
        transaction committed before the last read, and below that of any committed after it.
        """
        replayed = served.replayed_seq
        items = served.pipeline.artifacts.items
        for frame in self.feedback.iter_all(since=replayed):
            if until is not None:
                frame = frame.filter(pl.col("seq") <= until)
                if frame.height == 0:
                    break
            replayed = int(frame["seq"][-1])
            self._apply_frame(served, frame, items)
            if until is not None and replayed >= until:
                break
        return replace(served, replayed_seq=replayed)

    def _apply_frame(self, served: _Served, frame: pl.DataFrame, items: IdMap) -> None:
        """Observe logged events (``LOG_SCHEMA``, seq order) into ``served``'s state."""
        newest = int(frame[TIMESTAMP].max())  # type: ignore[arg-type]
        if self.last_feedback_timestamp is None or newest > self.last_feedback_timestamp:
            self.last_feedback_timestamp = newest
        users, item_idx, times, weights, seqs = _usable_events(frame, served.history_cut, items)
        if served.trainer is not None and users.len():
            # The users' histories before these events: what the model should have predicted from.
            before = served.pipeline.state.batch(users, times)
            served.trainer.submit(before.user_idx, before.recent_items, item_idx, times)
        _observe(served.pipeline, users, item_idx, times, weights, seq=seqs)

    def _catch_up_served(self, served: _Served) -> _Served:
        """``served`` with what was logged since it was built or last caught up: catalogue
        updates first (an event on a new item was logged after the item, so reading the items
        first never drops it), then feedback.

        The feedback is read up to a bound taken before the items: every event below it was
        logged after the items it names, so they are in the items read."""
        bound = self.feedback.last_seq()
        artifacts, items_seq, _ = self._replay_items(served.pipeline.artifacts, served.items_seq)
        if items_seq != served.items_seq:
            if artifacts is not served.pipeline.artifacts:
                served = self._with_artifacts(served, artifacts)
            served = replace(served, items_seq=items_seq)
        return self._replay_log(served, until=bound)

    def _with_artifacts(self, served: _Served, artifacts: Artifacts) -> _Served:
        """``served`` answering from ``artifacts`` (a catalogue extension of its own)."""
        state = served.pipeline.state
        state.n_items = len(artifacts.items)
        if served.restore is not None:
            served.restore.items = artifacts.items
        pipeline = make_pipeline(
            artifacts, state, budgets=self.budgets, enforce_budgets=self.enforce_budgets
        )
        return replace(served, pipeline=pipeline)

    def catch_up(self) -> int:
        """Apply every catalogue update and feedback event logged (by any worker sharing the
        log) since the last call, in log order; returns the log position now held.

        Raises ``FeedbackLogBusyError`` when the log cannot be read (nothing changes; the next
        call resumes from the same position).
        """
        with self._swap_lock:
            self._served = self._catch_up_served(self._served)
            return self._served.replayed_seq

    def reload(self, bundle: str | Path) -> tuple[str, str]:
        """Load, verify, smoke-test and warm a new bundle, then swap it in; the old one serves
        until then.

        Raises ``BundleError`` (the old pipeline keeps serving) for any failure of the candidate:
        missing, unreadable, not matching its manifest, a file a loader cannot read, a stage
        that raises on a smoke request, or a loader that crashes the checking child process.
        ``FeedbackLogBusyError`` (the log, not the bundle) passes through. Returns (new
        model_version, previous model_version).

        With ``publish_reloads``, the bundle is recorded in the log as a new generation once it
        is known good (before this worker's own load), and every worker sharing the log
        follows.
        """
        with self._reload_lock:
            return self._reload_locked(Path(bundle), generation=None)

    def follow_published(self) -> bool:
        """Serve the newest bundle generation published in the log, if this worker does not yet
        (loaded and warmed while the current one serves, then swapped in). Returns whether it
        swapped. A generation that fails to load here is logged and not retried; the worker
        keeps serving what it has. ``FeedbackLogBusyError`` when the log cannot be read."""
        latest = self.feedback.latest_bundle()
        if latest is None or latest.generation <= max(self.generation, self._refused_generation):
            return False
        with self._reload_lock:
            served = self._served
            if latest.generation <= served.generation:
                return False  # adopted meanwhile (this worker published it, or caught up)
            if latest.model_version == served.pipeline.model_version:
                with self._swap_lock:
                    self._served = replace(self._served, generation=latest.generation)
                return False
            try:
                self._reload_locked(Path(latest.bundle), generation=latest)
            except BundleError as exc:
                self._refused_generation = latest.generation
                logger.error(
                    "published bundle generation %d (%r) refused here: %s",
                    latest.generation,
                    latest.bundle,
                    str(exc),
                )
                return False
        return True

    def _reload_locked(self, path: Path, *, generation: BundleGeneration | None) -> tuple[str, str]:
        """``reload`` (generation None: publish it when ``publish_reloads``) or the adoption of
        a published ``generation``. Caller holds the reload lock.

        A reload publishes as soon as the bundle is known good (the child's check, or its
        manifest), before its own slow load: the other workers then load theirs at the same
        time, and the rollout takes one load, not two in a row. They skip the child check the
        publisher ran (the bundle's files are verified against its manifest as they load).
        """
        if generation is None:
            if self._checker is not None:
                self._checker.check(path)
            if self.publish_reloads:
                generation = self.feedback.publish_bundle(
                    str(path.resolve()), _checked_model_version(path, self._checker is None)
                )
        fresh = self._load_candidate(path)  # slow: no request-facing lock held
        if generation is not None:
            fresh = replace(fresh, generation=generation.generation)
        with self._swap_lock:
            # What was logged while the bundle loaded. Under the lock, which every catch-up
            # holds, so an event is applied to the new pipeline exactly once.
            fresh = self._catch_up_served(fresh)
            previous, self._served = self._served, fresh
        # No previous.close(): requests that picked up the old pipeline before the swap are still
        # running on it, and with preemptive budgets closing would shut its stage executor under
        # them (their stages fail and the answer degrades). The last of them drops the last
        # reference; its stage threads exit when the executor is freed.
        old, new = previous.pipeline.model_version, fresh.pipeline.model_version
        # Quoted and escaped: a path is the caller's text, and a control character in it must
        # not reach the log raw (a NUL byte once made the log a binary file).
        logger.info("reloaded bundle %r (%s -> %s)", str(path), old, new)
        return new, old

    def _load_candidate(self, bundle: Path) -> _Served:
        """``_build`` with every failure of the bundle turned into ``BundleError``."""
        try:
            return self._build(bundle)
        except (BundleError, FeedbackLogBusyError):
            raise
        except OSError as exc:
            # A path the OS refuses (name too long, permission denied, I/O error) is a bad
            # bundle like any other, not a server error: the caller gets a 4xx, not a 500.
            raise BundleError(f"bundle {str(bundle)!r} cannot be read: {exc}") from exc
        except Exception as exc:  # a corrupt file fails in its own loader's way
            raise BundleError(
                f"bundle {str(bundle)!r} could not be loaded: {describe(exc)}"
            ) from exc

    def close(self) -> None:
        self._stop_updates.set()
        if self._update_thread is not None:
            self._update_thread.join()
        self._checkpoint()
        self.pipeline.close()
        self.feedback.close()
        if self._checker is not None:
            self._checker.close()

    # ---------------------------------------------------------------------------- catalogue
    def add_items(self, frame: pl.DataFrame, *, now: int | None = None) -> CatalogChange:
        """Serve new (or changed) items from the next request on, without a retrain or restart.

        ``frame``: ``item_id``, optional ``categories`` and ``created_at`` (see
        ``pipeline/catalog_updates.py``); ``DataError`` names what is wrong and changes nothing.
        The update is logged durably first, like feedback, and replayed at start-up and reload
        until a retrain includes the items. The item tower embeds the items into the live index;
        feedback on them then reaches histories and trending like any other.
        """
        check_items_frame(frame)
        self.feedback.append_items(frame)
        with self._swap_lock:
            served = self._served
            ids = frame[ITEM_ID]
            known = served.pipeline.artifacts.items.index(ids, allow_unknown=True) >= 0
            # Applied from the log, in log order with other workers' updates (catch_up).
            artifacts, items_seq, sources = self._replay_items(
                served.pipeline.artifacts, served.items_seq, now=now
            )
            if artifacts is not served.pipeline.artifacts:
                served = self._with_artifacts(served, artifacts)
            self._served = replace(served, items_seq=items_seq)
        change = CatalogChange(added=int((~known).sum()), updated=int(known.sum()), sources=sources)
        logger.info(
            "catalogue: %d items added, %d updated (%s)",
            change.added,
            change.updated,
            ", ".join(change.sources) or "no source embeds items",
        )
        return change

    # ---------------------------------------------------------------------------- feedback
    def record_feedback(self, events: list[FeedbackEvent]) -> AppendResult:
        """Append durably first, then bring the online state up to the log (these events and
        any other worker's before them), so that the next request here sees them.

        Once the append returned, the events are acknowledged: a failure to read the log back
        is logged, not raised, and the log follower applies them at its next tick.
        """
        result = self.feedback.append(events)
        if result.accepted_events:
            try:
                with self._swap_lock:
                    self._served = self._catch_up_after(self._served, result)
            except FeedbackLogBusyError as exc:
                logger.warning("feedback logged, online state not yet updated: %s", exc)
        return result

    def _catch_up_after(self, served: _Served, result: AppendResult) -> _Served:
        """``_catch_up_served`` after this worker's own append, without reading its events back
        when nothing else was logged since the state's position: the append's events then fill
        every number in (replayed_seq, last_seq], in order (each backend draws a transaction's
        numbers above every committed one), and are applied as they are. The usual case of a
        single writer (the simulator, one worker), and one read less on a request's path."""
        accepted = result.accepted_events
        if result.last_seq - len(accepted) != served.replayed_seq:
            return self._catch_up_served(served)
        artifacts, items_seq, _ = self._replay_items(served.pipeline.artifacts, served.items_seq)
        if items_seq != served.items_seq:
            if artifacts is not served.pipeline.artifacts:
                served = self._with_artifacts(served, artifacts)
            served = replace(served, items_seq=items_seq)
        frame = pl.DataFrame(
            {
                "seq": range(served.replayed_seq + 1, result.last_seq + 1),
                "event_id": [e.event_id for e in accepted],
                USER_ID: [e.user_id for e in accepted],
                ITEM_ID: [e.item_id for e in accepted],
                "type": [e.type for e in accepted],
                TIMESTAMP: [e.timestamp for e in accepted],
                WEIGHT: [e.weight for e in accepted],
                "received_at": [0] * len(accepted),
            },
            schema=dict(LOG_SCHEMA),
        )
        self._apply_frame(served, frame, served.pipeline.artifacts.items)
        return replace(served, replayed_seq=result.last_seq)

    # ---------------------------------------------------------------------------- online model
    def update_model(self, *, force: bool = False) -> UpdateStats | None:
        """One online update of the serving model from the feedback queued since the last
        (None: online learning off, switched off, or too little new feedback)."""
        # Under the reload lock: a catalogue change (add_items) edits the same item vectors.
        with self._reload_lock:
            trainer = self._served.trainer
            if trainer is None:
                return None
            stats = trainer.update(force=force)
        if stats is not None:
            self._updates_since_checkpoint += 1
            assert self.online_learning is not None
            if self._updates_since_checkpoint >= self.online_learning.checkpoint_every:
                self._checkpoint()
        return stats

    def set_online_updates(self, enabled: bool) -> None:
        """The kill switch: off, the model keeps its current weights until switched back on."""
        trainer = self._served.trainer
        if trainer is not None:
            trainer.enabled = enabled

    def rollback_model(self) -> str:
        """Serve the bundle's own weights again (online steps undone); returns the version."""
        with self._reload_lock:
            trainer = self._served.trainer
            if trainer is not None:
                trainer.rollback()
                self._checkpoint()
        return self.pipeline.model_version

    def online_status(self) -> dict[str, object]:
        """The online model: version, steps, freshness (``/metrics`` and the API read it)."""
        served = self._served
        status: dict[str, object] = {"model_version": served.pipeline.model_version}
        if served.trainer is not None:
            status |= served.trainer.status()
        return status

    def _checkpoint(self) -> None:
        served = self._served
        if self.online_checkpoint is None or served.trainer is None:
            return
        served.trainer.save_checkpoint(
            self.online_checkpoint, served.pipeline.artifacts.model_version
        )
        self._updates_since_checkpoint = 0

    def _update_loop(self) -> None:
        assert self.online_learning is not None
        while not self._stop_updates.wait(self.online_learning.interval_s):
            try:
                self.update_model()
            except Exception:  # an update that fails leaves the serving model as it was
                logger.exception("online model update failed")

    # ---------------------------------------------------------------------------- similar
    def similar_items(self, item_id: str, k: int) -> list[SimilarItem]:
        """Items closest to ``item_id``: two-tower vector neighbours, else the first of the
        item-to-item sources the bundle has (EASE, item-kNN, co-visitation)."""
        pipeline = self.pipeline
        index = pipeline.artifacts.items.index([item_id], allow_unknown=True)
        if index[0] == PAD_ITEM:
            raise UnknownItemError(f"unknown item_id {item_id!r}")
        sources = pipeline.artifacts.retrieval.sources_
        tower = sources.get("two_tower")
        if isinstance(tower, TwoTowerSource):
            vector = tower.item_vectors(index)
            if np.isfinite(vector).all():
                ids, _ = tower.index_.search(vector, tower.index_.refine_depth(k + 1))
                found = ids[0][(ids[0] >= 0) & (ids[0] != index[0])]
                # Scored from the float32 vectors (the index may hold half precision), best first.
                scores = tower.item_vectors(found) @ vector[0]
                best = np.argsort(-scores, kind="stable")[:k]
                return self._similar(pipeline, found[best], scores[best], "two_tower")
        for name in ("item_item", "item_knn", "covisit"):
            source = sources.get(name)
            if source is not None and hasattr(source, "neighbors"):
                found = source.neighbors(index, k)
                keep = found.item_idx[0] >= 0
                return self._similar(pipeline, found.item_idx[0][keep], found.scores[0][keep], name)
        return []

    @staticmethod
    def _similar(
        pipeline: Pipeline, ids: np.ndarray, scores: np.ndarray, source: str
    ) -> list[SimilarItem]:
        names = pipeline.artifacts.items.id_list(ids)
        return [SimilarItem(n, float(s), source) for n, s in zip(names, scores, strict=True)]

    def feedback_lag_seconds(self) -> float:
        """Seconds since the newest event accepted by this process (0 before any)."""
        if self.last_feedback_timestamp is None:
            return 0.0
        return max(0.0, time.time() - self.last_feedback_timestamp)


def _checked_model_version(bundle: Path, verify: bool) -> str:
    """The bundle's model_version from its manifest, verified first unless a check just did."""
    try:
        if verify:
            manifest = verify_bundle(bundle)
        else:
            manifest = json.loads((bundle / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"bundle {str(bundle)!r} cannot be read: {exc}") from exc
    return str(manifest["model_version"])


def _usable_events(
    frame: pl.DataFrame, history_cut: int, items: IdMap
) -> tuple[
    pl.Series,
    npt.NDArray[np.int32],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
]:
    """(user ids, item indices, timestamps, weights, seqs) of the logged events
    (``LOG_SCHEMA``) that
    reach the online state: positive weights (impressions are logged for training and
    monitoring, not histories), after the seed history's cut (see ``_seed_state``), on items
    the served bundle knows."""
    fresh = frame.filter((pl.col(WEIGHT) > 0) & (pl.col(TIMESTAMP) > history_cut))
    index = items.index(fresh[ITEM_ID], allow_unknown=True)
    known = index != PAD_ITEM
    return (
        fresh[USER_ID].filter(pl.Series(known)),
        index[known],
        fresh[TIMESTAMP].to_numpy()[known],
        fresh[WEIGHT].to_numpy()[known],
        fresh["seq"].to_numpy()[known],
    )


def _observe(
    pipeline: Pipeline,
    user_ids: pl.Series,
    item_idx: npt.NDArray[np.int32],
    timestamps: npt.NDArray[np.int64],
    weights: npt.NDArray[np.float64],
    *,
    seq: npt.NDArray[np.int64] | None = None,
) -> None:
    """Events (known items, positive weights) reach everything that follows the live stream:
    each user's state (history, seen items: what the models read) and the population-level
    sources (trending). Model weights stay as trained. ``seq``: see ``OnlineState.observe``."""
    if item_idx.size == 0:
        return
    pipeline.state.observe(user_ids, item_idx, timestamps, seq=seq)
    pipeline.artifacts.retrieval.observe(item_idx, timestamps, weights)
