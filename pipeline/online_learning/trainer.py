"""The online trainer: micro-batch steps on the two-tower from the live feedback stream.

Between retrains the bundle's weights would stay frozen, and only the history the towers read
would move (``pipeline/online_state.py``). Under concept drift that is not enough: a user's id
embedding still says what they liked before, and the items they now pick have id embeddings
learned from the old population. The trainer closes that gap the way streaming recommenders do:

1. **Examples.** Every positive event the online state observes becomes an example (model user
   row, the user's history before it, the item), queued by :meth:`OnlineTrainer.submit`.
   Events on users or items without a trained id row are left out: their gradient would reach
   the shared "unknown" rows, which serve every new user and item at once.
2. **Steps.** :meth:`OnlineTrainer.update` turns the queue into micro-batches of
   ``batch_size`` examples, at least ``replay_share`` of them replayed from a buffer of recent
   history (against forgetting), and takes one optimiser step per batch with the batch
   training's loss (sampled softmax over in-batch and uniform negatives, accidental hits
   masked). What is trained: the user- and item-id embeddings (``SparseAdam``, so only looked-up
   rows move) and the user tower (Adam). The item tower's layers, category and age embeddings
   stay as trained, so an item the step did not look up keeps exactly its vector: only the
   touched items need re-embedding, not the catalogue.
3. **Publish.** The steps run on a private copy of the model. A frozen copy of it is then
   published: the touched items' vectors are re-embedded into the live index (replacing their
   rows; the overlay of a memory-mapped index), then the source switches to the new weights and
   a new user-vector cache, keyed by nothing older than this version. A request runs on the
   model it picked up; none fails, and none sees a cache entry of another version.

The model's version is the bundle's, plus ``+online.<step>`` once online steps have been
published; :meth:`rollback` returns to the bundle's weights (and its version) and
:attr:`enabled` is the kill switch. :meth:`save_checkpoint` / :meth:`load_checkpoint` keep the
online weights across restarts (no pickle: a ``state_dict`` loaded with ``weights_only``).
Freshness is measured per example: the time from the event to the publication of the first
model version trained on it (``model_freshness_seconds``).
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from data.errors import BundleError
from pipeline.online_learning.als_update import AlsItemUpdater
from pipeline.online_learning.config import OnlineLearningConfig
from pipeline.online_learning.replay import ReplayBuffer
from retrieval.two_tower.model import TwoTowerModel, encode_items, torch_threads
from retrieval.two_tower.source import TwoTowerSource
from retrieval.two_tower.train import accidental_hits, sampled_softmax_loss

__all__ = ["OnlineTrainer", "UpdateStats"]

CHECKPOINT_WEIGHTS = "online_model.pt"
CHECKPOINT_META = "online_state.json"
CHECKPOINT_ALS = "online_als"


@dataclass(frozen=True)
class UpdateStats:
    """What one :meth:`OnlineTrainer.update` did.

    step: the trainer's step count after it (monotonic, never reset, rollbacks included).
    steps: optimiser steps taken now. examples: new examples consumed (replayed ones excluded).
    loss: mean training loss of the steps. touched_items: items re-embedded into the index.
    freshness_s: median seconds from an example's event to this publication.
    als_items: ALS item factors re-solved (0 without an ALS source).
    """

    step: int
    steps: int
    examples: int
    loss: float
    touched_items: int
    freshness_s: float
    als_items: int = 0


class OnlineTrainer:
    """Online updates of one :class:`TwoTowerSource` (see the module docstring).

    clock: seconds UTC (the service: wall time; the simulator: its simulated clock).
    seed: the replay and negative sampling stream.
    als: the bundle's ALS item side, re-solved at every update from the same events
        (:mod:`pipeline.online_learning.als_update`); None: ALS stays as trained.
    """

    def __init__(
        self,
        source: TwoTowerSource,
        config: OnlineLearningConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        seed: int = 0,
        als: AlsItemUpdater | None = None,
    ) -> None:
        self.source = source
        self.als = als
        self.config = config if config is not None else OnlineLearningConfig()
        self.clock = clock
        self.enabled = self.config.enabled
        self._rng = np.random.default_rng(seed)
        features = source.features_
        self._n_users = features.n_users
        self._n_id_items = features.n_id_items
        self._at = source.trained_until_  # every trained item is served aged at this time
        # The bundle's weights, for rollback; the private copy that the steps train.
        self._base_state = {k: v.detach().clone() for k, v in source.model_.state_dict().items()}
        self._model = self._trainable_copy(source.model_)
        self._optimizers = self._make_optimizers(self._model)
        self.replay = ReplayBuffer(self.config.replay_size, source.config.history_length)
        # Items whose id row differs from the bundle's (re-embedded again on a rollback).
        self._changed = np.zeros(self._n_id_items, dtype=bool)
        self._pending: list[tuple[npt.NDArray[np.int64], ...]] = []
        self._pending_count = 0
        self._pending_lock = threading.Lock()
        self._update_lock = threading.Lock()  # one update, rollback or checkpoint at a time
        self.step = 0
        self.published_at: float | None = None
        self.freshness: deque[float] = deque(maxlen=self.config.freshness_window)

    # ---------------------------------------------------------------------------- set-up
    def _trainable_copy(self, model: TwoTowerModel) -> TwoTowerModel:
        trainable = copy.deepcopy(model)
        for name, parameter in trainable.named_parameters():
            # The item tower's own layers stay as trained: untouched items keep their vectors.
            parameter.requires_grad_(
                name.split(".")[0] in ("user_embedding", "item_embedding", "user_mlp", "attention")
            )
        trainable.use_sparse_id_gradients(True)
        # The "unknown" rows serve every user / item without a trained row: never moved here.
        for table, unknown in (
            (trainable.user_embedding, self._n_users),
            (trainable.item_embedding, self._n_id_items),
        ):
            table.weight.register_hook(_drop_row(unknown))
        return trainable

    def _make_optimizers(self, model: TwoTowerModel) -> list[torch.optim.Optimizer]:
        rate = self.config.learning_rate
        dense = [p for n, p in model.named_parameters() if p.requires_grad and "embedding" not in n]
        return [
            torch.optim.SparseAdam(
                [model.user_embedding.weight, model.item_embedding.weight], lr=rate
            ),
            torch.optim.Adam(dense, lr=rate),
        ]

    # ---------------------------------------------------------------------------- stream
    def submit(
        self,
        user_idx: npt.ArrayLike,
        histories: npt.ArrayLike,
        item_idx: npt.ArrayLike,
        timestamps: npt.ArrayLike,
    ) -> int:
        """Queue positive events as examples; returns how many were usable.

        user_idx: (n,) model user rows (-1: unknown); histories: (n, H) the users' recent items
        before the event, most recent first (-1 padding); item_idx: (n,) served item indices;
        timestamps: (n,) event seconds UTC (freshness is measured from them).
        """
        users = np.asarray(user_idx, dtype=np.int64)
        items = np.asarray(item_idx, dtype=np.int64)
        if self.als is not None and self.enabled:
            self.als.submit(users, items)
        history = _fit_width(np.asarray(histories, dtype=np.int64), self.replay.histories.shape[1])
        times = np.asarray(timestamps, dtype=np.int64)
        known = self.source.features_.item_known
        usable = (users >= 0) & (users < self._n_users) & (items >= 0) & (items < self._n_id_items)
        usable[usable] &= known[items[usable]]
        if not usable.any():
            return 0
        batch = (users[usable], history[usable], items[usable], times[usable])
        if not self.enabled:  # off: remembered for replay, never trained on now
            self.replay.add(*batch[:3])
            return int(usable.sum())
        with self._pending_lock:
            self._pending.append(batch)
            self._pending_count += int(usable.sum())
        return int(usable.sum())

    @property
    def pending(self) -> int:
        """Examples waiting for the next update."""
        return self._pending_count

    # ---------------------------------------------------------------------------- updates
    def update(self, *, force: bool = False) -> UpdateStats | None:
        """Train on the queued examples and publish a new version; ``None`` when nothing was
        done (switched off, or fewer than ``min_events`` queued and not ``force``)."""
        with self._update_lock:
            if not self.enabled or self._pending_count == 0:
                return None
            if self._pending_count < self.config.min_events and not force:
                return None
            users, history, items, times = self._take_pending()
            per_step = max(1, round(self.config.batch_size * (1 - self.config.replay_share)))
            n_steps = min(self.config.max_steps_per_update, -(-users.size // per_step))
            used = min(users.size, n_steps * per_step)
            if used < users.size:  # the backlog beyond this update waits for the next one
                self._requeue(users[used:], history[used:], items[used:], times[used:])
            losses, touched = [], []
            with torch_threads(self.source.config.num_threads):
                for lo in range(0, used, per_step):
                    hi = min(lo + per_step, used)
                    loss, items_touched = self._step(users[lo:hi], history[lo:hi], items[lo:hi])
                    losses.append(loss)
                    touched.append(items_touched)
                    self.replay.add(users[lo:hi], history[lo:hi], items[lo:hi])
                changed = np.unique(np.concatenate(touched))
                self.step += len(losses)
                self._changed[changed] = True
                self._publish(changed, self.step)
                als_items = self.als.update() if self.als is not None else 0
            now = self.clock()
            ages = now - times[:used].astype(np.float64)
            self.freshness.extend(ages.tolist())
            return UpdateStats(
                step=self.step,
                steps=len(losses),
                examples=used,
                loss=float(np.mean(losses)),
                touched_items=int(changed.size),
                freshness_s=float(np.median(ages)),
                als_items=als_items,
            )

    def _take_pending(self) -> tuple[npt.NDArray[np.int64], ...]:
        with self._pending_lock:
            pending, self._pending, self._pending_count = self._pending, [], 0
        return tuple(np.concatenate([p[i] for p in pending]) for i in range(4))

    def _requeue(self, *batch: npt.NDArray[np.int64]) -> None:
        with self._pending_lock:
            self._pending.insert(0, batch)
            self._pending_count += int(batch[0].size)

    def _step(
        self,
        users: npt.NDArray[np.int64],
        history: npt.NDArray[np.int64],
        items: npt.NDArray[np.int64],
    ) -> tuple[float, npt.NDArray[np.int64]]:
        """One optimiser step on new examples plus replayed ones; returns (loss, id rows
        looked up on the item side: the items whose vectors may have moved)."""
        n_replay = self.config.batch_size - users.size
        r_users, r_history, r_items = self.replay.sample(n_replay, self._rng)
        users = np.concatenate([users, r_users])
        history = np.concatenate([history, r_history])
        items = np.concatenate([items, r_items])
        negatives = self._uniform_negatives()
        candidates = np.concatenate([items, negatives])
        features, model = self.source.features_, self._model
        model.train()
        user_vectors = model.encode_users(features.user_inputs(users, history))
        item_vectors = model.encode_items(features.item_inputs(candidates, self._at))
        scores = user_vectors @ item_vectors.T
        candidate_users = np.concatenate([users, np.full(negatives.size, -1, dtype=np.int64)])
        hits = accidental_hits(
            torch.from_numpy(items),
            torch.from_numpy(users),
            torch.from_numpy(candidates),
            torch.from_numpy(candidate_users),
        )
        loss = sampled_softmax_loss(scores, hits, self.source.config.temperature)
        for optimizer in self._optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in self._optimizers:
            optimizer.step()
        in_history = history[(history >= 0) & (history < self._n_id_items)]
        looked_up = np.concatenate([candidates, in_history])
        looked_up = looked_up[features.item_known[looked_up]]
        return float(loss.detach()), np.unique(looked_up)

    def _uniform_negatives(self) -> npt.NDArray[np.int64]:
        n = self.config.uniform_negatives
        if n == 0:
            return np.empty(0, dtype=np.int64)
        return self._rng.integers(0, self._n_id_items, n).astype(np.int64)

    def _publish(self, items: npt.NDArray[np.int64], step: int) -> None:
        """A frozen copy of the trained model, its touched items re-embedded, swapped in."""
        frozen = copy.deepcopy(self._model)
        frozen.use_sparse_id_gradients(False)
        frozen.requires_grad_(False)
        frozen.eval()
        vectors = encode_items(
            frozen,
            self.source.features_,
            items,
            self._at,
            batch_size=self.source.config.encode_batch_size,
        )
        self.source.publish_model(frozen, items, vectors, online_step=step)
        self.published_at = self.clock()

    # ---------------------------------------------------------------------------- control
    def rollback(self) -> None:
        """Back to the bundle's weights (and version); queued examples are dropped, the replay
        buffer kept. Online steps start again from the bundle's weights."""
        with self._update_lock:
            with self._pending_lock:
                self._pending, self._pending_count = [], 0
            self._model.load_state_dict(self._base_state)
            self._optimizers = self._make_optimizers(self._model)
            changed = np.flatnonzero(self._changed)
            self._changed[:] = False
            with torch_threads(self.source.config.num_threads):
                self._publish(changed, 0)
            if self.als is not None:
                self.als.rollback()

    def status(self) -> dict[str, Any]:
        """The trainer as the service reports it (JSON-ready)."""
        ages = np.asarray(self.freshness, dtype=np.float64)
        return {
            "enabled": self.enabled,
            "online_step": self.source.online_step_,
            "steps_taken": self.step,
            "pending_events": self._pending_count,
            "replay_examples": len(self.replay),
            "model_freshness_p50_s": float(np.median(ages)) if ages.size else None,
            "model_freshness_p99_s": float(np.percentile(ages, 99)) if ages.size else None,
        }

    # ---------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, directory: str | Path, base_version: str) -> Path:
        """Write the online weights and step (atomically: the metadata file is renamed in last,
        so a crash mid-write leaves the previous checkpoint readable)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        with self._update_lock:
            weights = out / f"{CHECKPOINT_WEIGHTS}.{self.step}"
            state = {k: v.detach().clone() for k, v in self._model.state_dict().items()}
            torch.save(state, weights)
            meta = {
                "base_model_version": base_version,
                "step": self.step,
                "online_step": self.source.online_step_,
                "weights": weights.name,
                "changed_items": np.flatnonzero(self._changed).tolist(),
            }
            if self.als is not None:
                als_items, als_factors = self.als.changed()
                als_file = f"{CHECKPOINT_ALS}.{self.step}.npz"
                np.savez(out / als_file, items=als_items, factors=als_factors)
                meta["als"] = als_file
            temporary = out / f"{CHECKPOINT_META}.tmp"
            temporary.write_text(json.dumps(meta))
            previous = _read_meta(out)
            os.replace(temporary, out / CHECKPOINT_META)
        if previous is not None and previous["weights"] != weights.name:
            (out / previous["weights"]).unlink(missing_ok=True)
            if "als" in previous:
                (out / previous["als"]).unlink(missing_ok=True)
        return out / CHECKPOINT_META

    def load_checkpoint(self, directory: str | Path, base_version: str) -> bool:
        """Resume the online weights saved for the same bundle; False when there are none
        (or they belong to another bundle, whose rows would mean other users and items)."""
        path = Path(directory)
        meta = _read_meta(path)
        if meta is None or meta.get("base_model_version") != base_version:
            return False
        try:
            state = torch.load(path / meta["weights"], map_location="cpu", weights_only=True)
            with self._update_lock:
                self._model.load_state_dict(state)
                self._optimizers = self._make_optimizers(self._model)
                changed = np.asarray(meta["changed_items"], dtype=np.int64)
                self._changed[changed] = True
                self.step = int(meta["step"])
                with torch_threads(self.source.config.num_threads):
                    self._publish(changed, int(meta["online_step"]))
                if self.als is not None and "als" in meta:
                    with np.load(path / meta["als"], allow_pickle=False) as saved:
                        self.als.restore(saved["items"], saved["factors"])
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise BundleError(f"online checkpoint {str(path)!r} is unreadable: {exc}") from exc
        return True


def _fit_width(history: npt.NDArray[np.int64], width: int) -> npt.NDArray[np.int64]:
    """The first ``width`` slots of each history row (what the user tower reads), -1 padded."""
    if history.ndim != 2:
        raise ValueError(f"histories must be (n, H), got shape {history.shape}")
    if history.shape[1] >= width:
        return history[:, :width]
    padded = np.full((history.shape[0], width), -1, dtype=np.int64)
    padded[:, : history.shape[1]] = history
    return padded


def _read_meta(directory: Path) -> dict[str, Any] | None:
    path = directory / CHECKPOINT_META
    if not path.is_file():
        return None
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta


def _drop_row(row: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook that zeroes one embedding row's gradient (sparse or dense)."""

    def hook(gradient: torch.Tensor) -> torch.Tensor:
        if gradient.is_sparse:
            gradient = gradient.coalesce()
            keep = gradient.indices()[0] != row
            return torch.sparse_coo_tensor(
                gradient.indices()[:, keep],
                gradient.values()[keep],
                gradient.shape,
                is_coalesced=True,
                check_invariants=False,
            )
        gradient = gradient.clone()
        gradient[row] = 0
        return gradient

    return hook
