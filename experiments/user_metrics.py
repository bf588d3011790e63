"""Per-user metrics of a simulated A/B experiment: the values every analysis compares.

The unit of randomisation is the user; only users with at least one session, the exposed users,
enter the analysis. ``ctr`` = clicks / sessions, ``engagement`` = clicks, ``latency_ms`` = mean
amortised pipeline time per session, ``diversity`` = mean distinct categories per slate item,
``long_tail_share`` = mean share of slate items outside the head. ``METRICS`` are the tested
metrics, ``GUARDRAIL_METRICS`` the ones the guardrails check.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from experiments.simulation_result import SimulationResult

__all__ = ["GUARDRAIL_METRICS", "METRICS", "daily_cumulative", "per_user_metrics"]


METRICS = ("ctr", "engagement")
GUARDRAIL_METRICS = ("latency_ms", "diversity", "long_tail_share")

FloatArray = npt.NDArray[np.float64]


def per_user_metrics(
    result: SimulationResult, days: slice | None = None
) -> tuple[npt.NDArray[np.bool_], dict[str, FloatArray]]:
    """Exposed users and every per-user metric of every arm's copy over ``days`` (default all).

    Returns ``(exposed, metrics)``: ``exposed`` (U,) bool, users with a session in ``days``;
    ``metrics[name]`` (A, U) float64, NaN for unexposed users. ``expected_ctr`` and
    ``expected_engagement`` are the truth (click probabilities instead of sampled clicks).
    """
    window = days if days is not None else slice(None)
    sessions = result.sessions[:, window].sum(axis=1).astype(np.float64)
    exposed = sessions > 0
    clicks = result.clicks[:, :, window].sum(axis=2, dtype=np.float64)
    expected = result.expected_clicks[:, :, window].sum(axis=2, dtype=np.float64)
    per_session = np.where(exposed, sessions, np.nan)
    metrics = {
        "ctr": clicks / per_session,
        "engagement": np.where(exposed, clicks, np.nan),
        "expected_ctr": expected / per_session,
        "expected_engagement": np.where(exposed, expected, np.nan),
    }
    if days is None:  # the serving-side sums are kept for the whole run only
        metrics["latency_ms"] = result.latency_ms / per_session
        metrics["diversity"] = result.diversity / per_session
        metrics["long_tail_share"] = result.long_tail / per_session
    return exposed, metrics


def daily_cumulative(
    result: SimulationResult, arm: int, metric: str, *, expected: bool = False
) -> tuple[FloatArray, npt.NDArray[np.bool_]]:
    """Per-user metric through each day: (U, D) values (0 where absent) and (U, D) presence.

    ``metric``: ``"ctr"`` or ``"engagement"``; ``expected`` uses click probabilities.
    """
    source = result.expected_clicks if expected else result.clicks
    clicks = np.cumsum(source[arm], axis=1, dtype=np.float64)
    sessions = np.cumsum(result.sessions, axis=1, dtype=np.float64)
    present = sessions > 0
    if metric == "ctr":
        values = np.divide(clicks, sessions, out=np.zeros_like(clicks), where=present)
    elif metric == "engagement":
        values = np.where(present, clicks, 0.0)
    else:
        raise ValueError(f"unknown metric {metric!r}; known: {list(METRICS)}")
    return values, present
