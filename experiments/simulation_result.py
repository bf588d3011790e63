"""The outcome of a simulated A/B experiment, per arm's copy of the population, and its files.

:class:`SimulationResult` is what :func:`experiments.simulator.simulate` returns and what the
analysis (:mod:`experiments.analysis`) reads; :meth:`SimulationResult.save` and
:meth:`SimulationResult.load` keep it on disk (no pickle), so the analysis can be rerun without
simulating again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from data.errors import DataError
from experiments.config import ExperimentConfig

__all__ = ["SimulationResult"]


@dataclass(frozen=True, eq=False)
class SimulationResult:
    """Per-user outcomes of every arm's copy of the population, and what happened on the way.

    Shapes: A arms (config order), U users (world order, ids ``user_ids``), D days.

    sessions: (U, D) int32 sessions (slates) per user and day, the same in every copy.
    clicks: (A, U, D) float32 sampled clicks. expected_clicks: (A, U, D) float32 summed click
        probabilities (the truth, without sampling noise).
    latency_ms: (A, U) summed amortised pipeline time of the user's sessions (batch wall time /
        batch size). diversity: (A, U) summed distinct-categories-per-item of the user's slates.
    long_tail: (A, U) summed share of slate items outside the pre-period head.
    pre_user_clicks: (U,) pre-period clicks (CUPED covariate).
    daily: one row per arm and day (sessions, clicks, expected clicks and what they would have
        been in the world without drift on the same slates, degraded responses,
        distinct items shown, batch latency). monitors: one row per arm, monitor and checked day.
    retrains: one row per retrain (arm, day, reason, seconds).
    planning: the power analysis made before the run. timings: wall seconds per phase.
    """

    config: ExperimentConfig
    user_ids: list[str]
    sessions: npt.NDArray[np.int32]
    clicks: npt.NDArray[np.float32]
    expected_clicks: npt.NDArray[np.float32]
    latency_ms: npt.NDArray[np.float64]
    diversity: npt.NDArray[np.float64]
    long_tail: npt.NDArray[np.float64]
    pre_user_clicks: npt.NDArray[np.float64]
    daily: pl.DataFrame
    monitors: pl.DataFrame
    retrains: pl.DataFrame
    planning: dict[str, Any]
    timings: dict[str, float]
    catalog_coverage: dict[str, float] = field(default_factory=dict)
    # Per arm: the share of the items released during the experiment that it showed anyone.
    new_item_coverage: dict[str, float] = field(default_factory=dict)

    @property
    def arm_names(self) -> tuple[str, ...]:
        return self.config.arm_names

    @property
    def n_days(self) -> int:
        return int(self.sessions.shape[1])

    def save(self, directory: str | Path) -> Path:
        """Write the result (arrays as ``.npz``, frames as parquet, the rest as JSON; no pickle),
        so that the analysis can be rerun without simulating again."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            out / _RESULT_ARRAYS,
            **{name: getattr(self, name) for name in _ARRAY_FIELDS},
        )
        for name in _FRAME_FIELDS:
            getattr(self, name).write_parquet(out / f"{name}.parquet")
        meta = {
            "config": self.config.to_dict(),
            "user_ids": self.user_ids,
            "planning": self.planning,
            "timings": self.timings,
            "catalog_coverage": self.catalog_coverage,
            "new_item_coverage": self.new_item_coverage,
        }
        (out / _RESULT_META).write_text(json.dumps(meta, sort_keys=True, default=float) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path) -> SimulationResult:
        """Read a result written by :meth:`save` (``DataError`` if it is not one)."""
        path = Path(directory)
        if not (path / _RESULT_META).is_file():
            raise DataError(f"{path} holds no simulation result ({_RESULT_META} is missing)")
        meta = json.loads((path / _RESULT_META).read_text())
        with np.load(path / _RESULT_ARRAYS, allow_pickle=False) as arrays:
            values: dict[str, Any] = {name: arrays[name] for name in _ARRAY_FIELDS}
        values |= {name: pl.read_parquet(path / f"{name}.parquet") for name in _FRAME_FIELDS}
        return cls(
            config=ExperimentConfig.from_mapping(meta["config"]),
            user_ids=list(meta["user_ids"]),
            planning=meta["planning"],
            timings=meta["timings"],
            catalog_coverage=meta["catalog_coverage"],
            new_item_coverage=meta.get("new_item_coverage", {}),  # absent in older results
            **values,
        )


_RESULT_META = "simulation.json"
_RESULT_ARRAYS = "arrays.npz"
_ARRAY_FIELDS = (
    "sessions",
    "clicks",
    "expected_clicks",
    "latency_ms",
    "diversity",
    "long_tail",
    "pre_user_clicks",
)
_FRAME_FIELDS = ("daily", "monitors", "retrains")
