"""Online learning for a bundle without a two-tower: the ALS item side alone.

Small logs leave the two-tower out of a bundle (``TwoTowerConfig.min_interactions``); the online
trainer then has no towers to step. The ALS items still learn from the stream: this class gives
:class:`~pipeline.online_learning.als_update.AlsItemUpdater` the trainer's interface (micro-batch
cadence, versions, kill switch, rollback, checkpoints, freshness), so the service and the
simulator drive either one the same way.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from data.errors import BundleError
from pipeline.online_learning.als_update import AlsItemUpdater
from pipeline.online_learning.config import OnlineLearningConfig
from pipeline.online_learning.trainer import CHECKPOINT_META, UpdateStats

__all__ = ["AlsOnlineTrainer"]


class AlsOnlineTrainer:
    """The online trainer of an ALS-only bundle (see the module docstring)."""

    def __init__(
        self,
        als: AlsItemUpdater,
        config: OnlineLearningConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.als = als
        self.config = config if config is not None else OnlineLearningConfig()
        self.clock = clock
        self.enabled = self.config.enabled
        self.step = 0
        self._times: list[npt.NDArray[np.int64]] = []
        self._pending = 0
        self._lock = threading.Lock()
        self.freshness: deque[float] = deque(maxlen=self.config.freshness_window)

    @property
    def pending(self) -> int:
        return self._pending

    def submit(
        self,
        user_idx: npt.ArrayLike,
        histories: npt.ArrayLike,
        item_idx: npt.ArrayLike,
        timestamps: npt.ArrayLike,
    ) -> int:
        """Queue positive events (the histories are not used by ALS); returns the usable."""
        if not self.enabled:
            return 0
        usable = self.als.submit(user_idx, item_idx)
        with self._lock:
            self._times.append(np.asarray(timestamps, dtype=np.int64))
            self._pending += usable
        return usable

    def update(self, *, force: bool = False) -> UpdateStats | None:
        """Re-solve the touched items and publish a version (None: nothing to do)."""
        with self._lock:
            if not self.enabled or self._pending == 0:
                return None
            if self._pending < self.config.min_events and not force:
                return None
            examples, self._pending = self._pending, 0
            times, self._times = np.concatenate(self._times), []
        solved = self.als.update()
        self.step += 1
        self.als.source.online_step_ = self.step
        ages = self.clock() - times.astype(np.float64)
        self.freshness.extend(ages.tolist())
        return UpdateStats(
            step=self.step,
            steps=1,
            examples=examples,
            loss=float("nan"),
            touched_items=0,
            freshness_s=float(np.median(ages)),
            als_items=solved,
        )

    def rollback(self) -> None:
        with self._lock:
            self._pending, self._times = 0, []
        self.als.rollback()
        self.als.source.online_step_ = 0

    def status(self) -> dict[str, Any]:
        ages = np.asarray(self.freshness, dtype=np.float64)
        return {
            "enabled": self.enabled,
            "online_step": self.als.source.online_step_,
            "steps_taken": self.step,
            "pending_events": self._pending,
            "replay_examples": 0,
            "model_freshness_p50_s": float(np.median(ages)) if ages.size else None,
            "model_freshness_p99_s": float(np.percentile(ages, 99)) if ages.size else None,
        }

    def save_checkpoint(self, directory: str | Path, base_version: str) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        items, factors = self.als.changed()
        name = f"online_als.{self.step}.npz"
        np.savez(out / name, items=items, factors=factors)
        meta = {
            "base_model_version": base_version,
            "step": self.step,
            "online_step": self.als.source.online_step_,
            "weights": name,
            "changed_items": [],
        }
        temporary = out / f"{CHECKPOINT_META}.tmp"
        temporary.write_text(json.dumps(meta))
        os.replace(temporary, out / CHECKPOINT_META)
        return out / CHECKPOINT_META

    def load_checkpoint(self, directory: str | Path, base_version: str) -> bool:
        path = Path(directory) / CHECKPOINT_META
        if not path.is_file():
            return False
        try:
            meta = json.loads(path.read_text())
            if meta.get("base_model_version") != base_version:
                return False
            with np.load(Path(directory) / meta["weights"], allow_pickle=False) as saved:
                self.als.restore(saved["items"], saved["factors"])
            self.step = int(meta["step"])
            self.als.source.online_step_ = int(meta["online_step"])
        except (OSError, ValueError, KeyError) as exc:
            raise BundleError(f"online checkpoint {str(directory)!r} is unreadable: {exc}") from exc
        return True
