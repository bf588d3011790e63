"""The live recommender: the pipeline, its online state, the feedback log, and hot reload. No HTTP.

The FastAPI app (``serving/app.py``) is a thin shell over :class:`RecommenderService`, so the
behaviour that matters (reload with no failed request, feedback reaching the next request) is
testable without a web server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
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
from pipeline.bundle_check import BundleChecker, describe, smoke_test
from pipeline.catalog_updates import CatalogChange, check_items_frame, extend_artifacts
from pipeline.factory import make_pipeline
from pipeline.feedback_log import AppendResult, FeedbackEvent, FeedbackLog, FeedbackLogBusyError
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

    feedback: FeedbackLog
    history_cut: int
    # The served item map: replaced when items are added live, so their events count.
    items: IdMap

    def __call__(self, user_ids: list[str]) -> RestoredEvents:
        watermark = self.feedback.last_seq()
        frame = self.feedback.read_users(user_ids, until=watermark)
        users, items, times, _ = _usable_events(frame, self.history_cut, self.items)
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
    online_learning: train the two-tower online from live feedback (``pipeline/online_learning``);
    None keeps the weights as trained. online_checkpoint: a directory where the online weights
    are checkpointed and resumed from at start-up (same bundle only). background_updates: a
    thread takes the update every ``interval_s``; off, the caller calls :meth:`update_model`
    (the simulator does, at the end of each tick). clock: seconds UTC for freshness.
    """

    def __init__(
        self,
        bundle: str | Path,
        feedback: FeedbackLog,
        *,
        history: str | Path | None = None,
        budgets: BudgetConfig | None = None,
        enforce_budgets: bool = True,
        max_online_users: int | None = DEFAULT_MAX_ONLINE_USERS,
        online_user_ttl_s: float | None = None,
        check_reloads_in_child: bool = True,
        online_learning: OnlineLearningConfig | None = None,
        online_checkpoint: str | Path | None = None,
        background_updates: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.feedback = feedback
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
        self._served = self._build(Path(bundle))
        self.last_feedback_timestamp: int | None = None
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

    # ---------------------------------------------------------------------------- lifecycle
    def _build(self, bundle: Path) -> _Served:
        # Memory-mapped: the uvicorn workers of one machine share the bundle's big arrays and
        # index through the page cache; items added live go to private overlays (add_items).
        artifacts = self._replay_items(load_artifacts(bundle, mmap=True))
        state, cut = self._seed_state(artifacts)
        restore = None
        if self.max_online_users is not None:
            # After the seed, which stays; before the replay, which the cap bounds.
            restore = LogRestore(self.feedback, cut, artifacts.items)
            state.bound(self.max_online_users, restore=restore, ttl_s=self.online_user_ttl_s)
        pipeline = make_pipeline(
            artifacts, state, budgets=self.budgets, enforce_budgets=self.enforce_budgets
        )
        served = self._replay_log(_Served(pipeline, cut, restore=restore))
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

    def _replay_items(self, artifacts: Artifacts) -> Artifacts:
        """``artifacts`` with the logged catalogue updates applied (the last value given for
        each item), before any feedback is replayed: events on those items then count.

        Updates were checked before they were logged, so none should fail; one that does all
        the same is reported and skipped: start-up never fails on the catalogue.
        """
        updates = self.feedback.item_updates()
        if updates.height == 0:
            return artifacts
        latest = updates.group_by(ITEM_ID, maintain_order=True).agg(
            pl.col("categories").drop_nulls().last(), pl.col("created_at").drop_nulls().last()
        )
        try:
            extended, change = extend_artifacts(artifacts, latest, now=int(time.time()))
        except DataError as exc:
            logger.error("logged catalogue updates not applied: %s", exc)
            return artifacts
        logger.info("catalogue: %d logged items replayed (%d new)", latest.height, change.added)
        return extended

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

    def _replay_log(self, served: _Served) -> _Served:
        """``served`` with every new logged event after ``served.replayed_seq`` observed.

        Reads until the log is exhausted: ``replayed_seq`` is then at least the seq of every
        transaction committed before the last read, and below that of any committed after it.
        """
        replayed = served.replayed_seq
        items = served.pipeline.artifacts.items
        for frame in self.feedback.iter_all(since=replayed):
            replayed = int(frame["seq"][-1])
            _observe(served.pipeline, *_usable_events(frame, served.history_cut, items))
        return replace(served, replayed_seq=replayed)

    def reload(self, bundle: str | Path) -> tuple[str, str]:
        """Load, verify, smoke-test and warm a new bundle, then swap it in; the old one serves
        until then.

        Raises ``BundleError`` (the old pipeline keeps serving) for any failure of the candidate:
        missing, unreadable, not matching its manifest, a file a loader cannot read, a stage
        that raises on a smoke request, or a loader that crashes the checking child process.
        ``FeedbackLogBusyError`` (the log, not the bundle) passes through. Returns (new
        model_version, previous model_version).
        """
        path = Path(bundle)
        with self._reload_lock:
            if self._checker is not None:
                self._checker.check(path)
            fresh = self._load_candidate(path)  # slow: no request-facing lock held
            with self._swap_lock:
                # Feedback committed while the bundle loaded. Under the lock, so an event is
                # either read here or observed live into the new pipeline, never neither nor
                # both (record_feedback compares its seq with replayed_seq under this lock).
                fresh = self._replay_log(fresh)
                previous, self._served = self._served, fresh
        # No previous.close(): requests that picked up the old pipeline before the swap are still
        # running on it, and with preemptive budgets closing would shut its stage executor under
        # them (their stages fail and the answer degrades). The last of them drops the last
        # reference; its stage threads exit when the executor is freed.
        old, new = previous.pipeline.model_version, fresh.pipeline.model_version
        # Quoted and escaped: a path is the caller's text, and a control character in it must
        # not reach the log raw (a NUL byte once made the log a binary file).
        logger.info("reloaded bundle %r (%s -> %s)", str(bundle), old, new)
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
        with self._reload_lock:  # one catalogue change or reload at a time
            self.feedback.append_items(frame)
            served = self._served
            artifacts, change = extend_artifacts(
                served.pipeline.artifacts, frame, now=int(time.time()) if now is None else now
            )
            state = served.pipeline.state
            state.n_items = len(artifacts.items)
            if served.restore is not None:
                served.restore.items = artifacts.items
            pipeline = make_pipeline(
                artifacts, state, budgets=self.budgets, enforce_budgets=self.enforce_budgets
            )
            with self._swap_lock:
                self._served = replace(self._served, pipeline=pipeline)
        logger.info(
            "catalogue: %d items added, %d updated (%s)",
            change.added,
            change.updated,
            ", ".join(change.sources) or "no source embeds items",
        )
        return change

    # ---------------------------------------------------------------------------- feedback
    def record_feedback(self, events: list[FeedbackEvent]) -> AppendResult:
        """Append durably first, then update the online state used by the next request."""
        result = self.feedback.append(events)
        if result.accepted_events:
            with self._swap_lock:
                served = self._served
                # One append is one transaction, so its events' seqs are all <= last_seq: if a
                # reload that swapped in after the commit read them from the log, they are in
                # its state already; otherwise none of them is.
                if result.last_seq > served.replayed_seq:
                    self._observe_events(served, result.accepted_events, result.last_seq)
            self.last_feedback_timestamp = max(e.timestamp for e in result.accepted_events)
        return result

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

    @staticmethod
    def _observe_events(served: _Served, events: Sequence[FeedbackEvent], seq: int) -> None:
        """Add live events (committed by the append that ended at ``seq``) to the state, by the
        rule the log replay follows (``_usable_events``)."""
        times = np.array([e.timestamp for e in events], dtype=np.int64)
        weights = np.array([e.weight for e in events], dtype=np.float64)
        keep = (weights > 0) & (times > served.history_cut)
        if not keep.any():
            return
        kept = [e for e, k in zip(events, keep, strict=True) if k]
        items = served.pipeline.artifacts.items.index([e.item_id for e in kept], allow_unknown=True)
        known = items != PAD_ITEM
        user_ids = pl.Series(
            [e.user_id for e, k in zip(kept, known, strict=True) if k], dtype=pl.String
        )
        if served.trainer is not None and user_ids.len():
            # The users' histories before these events: what the model should have predicted from.
            before = served.pipeline.state.batch(user_ids, times[keep][known])
            served.trainer.submit(
                before.user_idx, before.recent_items, items[known], times[keep][known]
            )
        _observe(
            served.pipeline,
            user_ids,
            items[known],
            times[keep][known],
            weights[keep][known],
            seq=seq,
        )

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


def _usable_events(
    frame: pl.DataFrame, history_cut: int, items: IdMap
) -> tuple[pl.Series, npt.NDArray[np.int32], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """(user ids, item indices, timestamps, weights) of the logged events (``LOG_SCHEMA``) that
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
    )


def _observe(
    pipeline: Pipeline,
    user_ids: pl.Series,
    item_idx: npt.NDArray[np.int32],
    timestamps: npt.NDArray[np.int64],
    weights: npt.NDArray[np.float64],
    *,
    seq: int | None = None,
) -> None:
    """Events (known items, positive weights) reach everything that follows the live stream:
    each user's state (history, seen items: what the models read) and the population-level
    sources (trending). Model weights stay as trained. ``seq``: see ``OnlineState.observe``."""
    if item_idx.size == 0:
        return
    pipeline.state.observe(user_ids, item_idx, timestamps, seq=seq)
    pipeline.artifacts.retrieval.observe(item_idx, timestamps, weights)
