"""The power analysis of a simulated A/B experiment, made before the run (:func:`plan_power`).

It plans from what is known before the experiment starts: the pre-period's click rate and
per-user variation, and the arrival model's expected sessions per user. The report puts the
observed variance next to the plan (:mod:`experiments.analysis`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from data.synthetic.config import SECONDS_PER_DAY
from experiments.config import ExperimentConfig
from experiments.population import History
from experiments.power import minimum_detectable_effect, required_sample_size

__all__ = ["plan_power"]


def plan_power(
    config: ExperimentConfig, history: History, tick_share: npt.NDArray[np.float64]
) -> dict[str, Any]:
    """The power analysis made *before* the run, from the pre-period and the arrival model.

    Exposure: user ``u`` has ``Lambda_u = sum over ticks of lambda_u(t)`` expected sessions (at
    most one per tick, so ``sum 1 - exp(-lambda)``) and is exposed with ``1 - exp(-Lambda_u)``.
    Variance of the per-user metric under the control, assumed for planning:

    - ``ctr``: ``E[p (1 - p) / s | s >= 1] + v_b``, the binomial noise of ``s`` sessions at the
      pre-period click rate ``p`` plus the between-user variance ``v_b`` of the users' click
      rates, estimated from the pre-period (variance of per-user click rates minus its binomial
      part, method of moments).
    - ``engagement``: the variance of ``Binomial(s, p_u)`` clicks with ``s`` sessions.

    The pre-period rate is the logging policy's, not the arms', so this is a plan, not a promise:
    the report puts the observed variance next to it.
    """
    world, behaviour, analysis = history.world, config.behaviour, config.analysis
    tick_seconds = SECONDS_PER_DAY // behaviour.ticks_per_day
    expected_sessions = np.zeros(world.n_users)
    for day in range(config.n_days):
        for tick in range(behaviour.ticks_per_day):
            t = history.start + day * SECONDS_PER_DAY + tick * tick_seconds + tick_seconds // 2
            lam = behaviour.sessions_per_user_day * tick_share[tick] * world.session_rates(t)
            expected_sessions += -np.expm1(-lam)
    p = history.click_rate
    # Pre-period slates per user are not logged; activity shares them out (the log's sessions
    # are Poisson in activity), which is exact in expectation.
    activity = world.user_activity.astype(np.float64)
    pre_slates = history.clicks.height / max(p, 1e-12) * activity / activity.sum()
    keep = pre_slates >= 1
    rates = history.pre_user_clicks[keep] / pre_slates[keep]
    between = max(0.0, float(rates.var() - np.mean(p * (1 - p) / pre_slates[keep])))

    draws = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(99,)))
    sessions = draws.poisson(expected_sessions)
    exposed = sessions[sessions > 0].astype(np.float64)
    n_exposed = float((-np.expm1(-expected_sessions)).sum())
    if exposed.size < 2:
        return {"expected_exposed_users": n_exposed, "note": "too few exposed users to plan"}
    if analysis.primary_metric == "ctr":
        baseline = p
        variance = float(np.mean(p * (1 - p) / exposed)) + between
    else:
        baseline = p * float(exposed.mean())
        variance = float(
            np.mean(exposed * p * (1 - p)) + p**2 * exposed.var() + between * np.mean(exposed**2)
        )
    weights = np.array(list(config.weights.values()))
    shares = weights / weights.sum()
    n_per_arm = int(n_exposed * min(shares[0], shares[1:].min()))
    mde_abs = float(analysis.mde_relative * baseline)
    return {
        "metric": analysis.primary_metric,
        "baseline": baseline,
        "variance": variance,
        "between_user_variance": between,
        "expected_exposed_users": n_exposed,
        "expected_sessions": float(expected_sessions.sum()),
        "expected_users_per_arm": n_per_arm,
        "mde_relative_target": analysis.mde_relative,
        "mde_absolute_target": mde_abs,
        "required_users_per_arm": required_sample_size(
            mde_abs, variance, alpha=analysis.alpha, power=analysis.power
        ),
        "mde_absolute_at_expected_n": minimum_detectable_effect(
            max(n_per_arm, 2), variance, alpha=analysis.alpha, power=analysis.power
        ),
        "alpha": analysis.alpha,
        "power": analysis.power,
    }
