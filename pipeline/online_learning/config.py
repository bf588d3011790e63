"""The online trainer's settings (``[online_learning]`` of a service or an experiment arm)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from data.errors import ConfigError


@dataclass(frozen=True)
class OnlineLearningConfig:
    """How the two-tower follows the feedback stream between retrains.

    enabled: take optimiser steps (the kill switch; off, events are still buffered so a switch
        back on learns from recent history at once).
    min_events: new examples that make a micro-batch worth a step. Default 32: below it a step
        mostly replays old examples, and the per-step cost (one forward/backward, one re-embed,
        one publish) is paid for little news.
    interval_s: the service's cadence: seconds between two checks for a micro-batch (the
        simulator steps at the end of every tick instead). Default 5 s: well inside the 60 s
        freshness target, cheap at 50 events/s.
    batch_size: examples per optimiser step; new examples first, the rest from the replay buffer.
    replay_share: the least share of each step's examples drawn from the replay buffer (recent
        history, against forgetting what the micro-batch does not show). Default 0.5.
    replay_size: examples the replay buffer keeps (the most recent ones).
    max_steps_per_update: bounds one update's work when a backlog built up (a burst, or a
        switch back on): the rest waits for the next update.
    learning_rate: SparseAdam on the id embeddings, Adam on the user tower. Default 1e-3, a
        third of the batch training's rate: each step sees few examples, and a big step on a
        few users' rows would overshoot.
    uniform_negatives: items drawn uniformly from the trained catalogue as extra negatives of
        every example (the in-batch positives are the others).
    freshness_window: freshness samples kept for the percentiles the service reports.
    checkpoint_every: the service writes its online checkpoint (when it has a directory for
        one) every this many updates, and at shutdown. Default 12: once a minute at the default
        cadence, so a crash loses at most a minute of online learning (the log still holds it).
    """

    enabled: bool = True
    min_events: int = 32
    interval_s: float = 5.0
    batch_size: int = 512
    replay_share: float = 0.5
    replay_size: int = 50_000
    max_steps_per_update: int = 8
    learning_rate: float = 1e-3
    uniform_negatives: int = 256
    freshness_window: int = 10_000
    checkpoint_every: int = 12

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(
                f"[online_learning] enabled must be true or false, got {self.enabled!r}"
            )
        for name in (
            "min_events",
            "batch_size",
            "replay_size",
            "max_steps_per_update",
            "freshness_window",
            "checkpoint_every",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"[online_learning] {name} must be a positive integer, got {value!r}"
                )
        if (
            isinstance(self.uniform_negatives, bool)
            or not isinstance(self.uniform_negatives, int)
            or self.uniform_negatives < 0
        ):
            raise ConfigError(
                "[online_learning] uniform_negatives must be an integer >= 0, "
                f"got {self.uniform_negatives!r}"
            )
        if not 0 <= self.replay_share < 1:
            raise ConfigError(
                f"[online_learning] replay_share must be in [0, 1), got {self.replay_share!r}"
            )
        for name in ("interval_s", "learning_rate"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(
                    f"[online_learning] {name} must be a finite number > 0, got {value!r}"
                )

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None) -> OnlineLearningConfig:
        from data.configuration import from_mapping

        return from_mapping(cls, dict(values or {}), "online_learning")
