"""The serving context: the live pipeline, the feedback log, and hot reload. No HTTP in here.

The FastAPI app (``serving/app.py``) is a thin shell over :class:`RecommenderService`, so the
behaviour that matters (reload with no failed request, feedback reaching the next request) is
testable without a web server.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from data.dataset import load_dataset
from data.errors import BundleError, DataError
from retrieval.base import PAD_ITEM
from retrieval.two_tower.source import TwoTowerSource
from serving.artifacts import Artifacts, load_artifacts, load_history
from serving.factory import make_pipeline
from serving.feedback_log import AppendResult, FeedbackEvent, FeedbackLog
from serving.online_state import OnlineState, observe_frame
from serving.pipeline import BudgetConfig, Pipeline

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimilarItem:
    item_id: str
    score: float
    source: str


class UnknownItemError(DataError):
    """The item id is not in the served catalogue (HTTP 404)."""


class RecommenderService:
    """Owns the current :class:`Pipeline` and swaps it atomically on reload.

    history: optional dataset directory whose train + valid splits seed each user's recent history;
    by default the bundle's own history snapshot does. Feedback since then is replayed from the log.
    """

    def __init__(
        self,
        bundle: str | Path,
        feedback: FeedbackLog,
        *,
        history: str | Path | None = None,
        budgets: BudgetConfig | None = None,
    ) -> None:
        self.feedback = feedback
        self.history = Path(history) if history is not None else None
        self.budgets = budgets if budgets is not None else BudgetConfig()
        self._reload_lock = threading.Lock()
        self.pipeline = self._build(Path(bundle))
        self.last_feedback_timestamp: int | None = None

    # ---------------------------------------------------------------------------- lifecycle
    def _build(self, bundle: Path) -> Pipeline:
        artifacts = load_artifacts(bundle)
        state = self._seed_state(artifacts)
        return make_pipeline(artifacts, state, budgets=self.budgets)

    def _seed_state(self, artifacts: Artifacts) -> OnlineState:
        history_length = artifacts.retrieval.config.history_length
        state = OnlineState(artifacts.users, len(artifacts.items), history_length)
        if self.history is not None:
            dataset = load_dataset(self.history)
            frame = pl.concat([dataset.splits["train"], dataset.splits["valid"]])
        else:
            frame = load_history(artifacts)
        observe_frame(state, artifacts.items, frame)
        observe_frame(state, artifacts.items, self.feedback.to_frame().filter(pl.col("weight") > 0))
        return state

    def reload(self, bundle: str | Path) -> tuple[str, str]:
        """Load, verify and warm a new bundle, then swap it in; the old one serves until then.

        Raises ``BundleError`` (the old pipeline keeps serving) if the bundle is missing, corrupt
        or unreadable. Returns (new model_version, previous model_version).
        """
        with self._reload_lock:
            since = self.feedback.last_seq()
            try:
                fresh = self._build(Path(bundle))
            except OSError as exc:
                # A path the OS refuses (name too long, permission denied, I/O error) is a bad
                # bundle like any other, not a server error: the caller gets a 4xx, not a 500.
                raise BundleError(f"bundle {str(bundle)!r} cannot be read: {exc}") from exc
            # Feedback that arrived while the new state was being built.
            events, _ = self.feedback.read_since(since)
            self._observe_events(fresh, events)
            previous, self.pipeline = self.pipeline, fresh
        # No previous.close(): requests that picked up the old pipeline before the swap are still
        # running on it, and closing shuts its stage executor under them (their stages fail and
        # the answer degrades). The last of them drops the last reference; its stage threads
        # exit when the executor is garbage-collected.
        logger.info(
            "reloaded bundle %s (%s -> %s)", bundle, previous.model_version, fresh.model_version
        )
        return fresh.model_version, previous.model_version

    def close(self) -> None:
        self.pipeline.close()
        self.feedback.close()

    # ---------------------------------------------------------------------------- feedback
    def record_feedback(self, events: list[FeedbackEvent]) -> AppendResult:
        """Append durably first, then update the online state used by the next request."""
        result = self.feedback.append(events)
        self._observe_events(self.pipeline, list(result.accepted_events))
        if result.accepted_events:
            self.last_feedback_timestamp = max(e.timestamp for e in result.accepted_events)
        return result

    @staticmethod
    def _observe_events(pipeline: Pipeline, events: list[FeedbackEvent]) -> None:
        # Impressions (weight 0) are logged for training and monitoring, not added to histories.
        positive = [e for e in events if e.weight > 0]
        if not positive:
            return
        items = pipeline.artifacts.items.index([e.item_id for e in positive], allow_unknown=True)
        known = items != PAD_ITEM
        if known.any():
            pipeline.state.observe(
                [e.user_id for e, k in zip(positive, known, strict=True) if k],
                items[known],
                np.array([e.timestamp for e in positive], dtype=np.int64)[known],
            )

    # ---------------------------------------------------------------------------- similar
    def similar_items(self, item_id: str, k: int) -> list[SimilarItem]:
        """Items closest to ``item_id``: two-tower vector neighbours, else co-visitation."""
        pipeline = self.pipeline
        index = pipeline.artifacts.items.index([item_id], allow_unknown=True)
        if index[0] == PAD_ITEM:
            raise UnknownItemError(f"unknown item_id {item_id!r}")
        sources = pipeline.artifacts.retrieval.sources_
        tower = sources.get("two_tower")
        if isinstance(tower, TwoTowerSource):
            vector = tower.item_vectors(index)
            if np.isfinite(vector).all():
                ids, scores = tower.index_.search(vector, k + 1)
                keep = (ids[0] >= 0) & (ids[0] != index[0])
                return self._similar(pipeline, ids[0][keep][:k], scores[0][keep][:k], "two_tower")
        covisit = sources.get("covisit")
        if covisit is not None and hasattr(covisit, "neighbors"):
            found = covisit.neighbors(index, k)
            keep = found.item_idx[0] >= 0
            return self._similar(
                pipeline, found.item_idx[0][keep], found.scores[0][keep], "covisit"
            )
        return []

    @staticmethod
    def _similar(
        pipeline: Pipeline, ids: np.ndarray, scores: np.ndarray, source: str
    ) -> list[SimilarItem]:
        names = pipeline.artifacts.items.to_ids(ids).to_list() if ids.size else []
        return [SimilarItem(n, float(s), source) for n, s in zip(names, scores, strict=True)]

    def feedback_lag_seconds(self) -> float:
        """Seconds since the newest event accepted by this process (0 before any)."""
        if self.last_feedback_timestamp is None:
            return 0.0
        return max(0.0, time.time() - self.last_feedback_timestamp)
