"""Replicate studies: what the statistics do over many re-randomised assignments of one population.

A simulated population can be split again and again through the real assignment code
(:func:`replicate_assignments`, one salt per replicate), which no real experiment can do:

* **A/A** (:func:`aa_study`): re-randomised splits of the control copy; false-positive rates of
  the fixed-horizon test, the alpha-spending test and mSPRT with a look every day, of naive daily
  peeking, and the SRM false-alarm rate.
* **Coverage** (:func:`coverage_study`): bias, RMSE and CI coverage of the A/B estimate against
  the twin copies' true effect.
* **SRM power** (:func:`srm_study`): detection rates of an injected sample loss and of a shifted
  split, next to the formula (:func:`experiments.srm.srm_power`).

:func:`replicate_studies` runs all three for a simulation result, as its analysis configures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from experiments.always_valid import SequentialConfig, always_valid_inference
from experiments.estimators import ArmEstimate, WelchResult, compare
from experiments.group_sequential import group_sequential_test, look_correlation
from experiments.simulation_result import SimulationResult
from experiments.srm import srm_p_values, srm_power
from experiments.user_metrics import METRICS, daily_cumulative
from pipeline.assignment import assign_indices, hash_to_unit_interval

__all__ = [
    "aa_study",
    "coverage_study",
    "group_moments",
    "replicate_assignments",
    "replicate_studies",
    "srm_study",
    "users_for_srm_power",
]

FloatArray = npt.NDArray[np.float64]


def replicate_assignments(
    user_ids: Sequence[str], salt: str, weights: Mapping[str, float], n_replicates: int
) -> npt.NDArray[np.int8]:
    """(R, U) arm indices of ``n_replicates`` re-randomised assignments, salts ``salt/r``.

    Each replicate is a real assignment (:func:`pipeline.assignment.assign_indices`) with its
    own salt, so replicates are independent re-randomisations of one simulated population.
    """
    out = np.empty((n_replicates, len(user_ids)), dtype=np.int8)
    for r in range(n_replicates):
        out[r] = assign_indices(list(user_ids), f"{salt}/{r}", weights)
    return out


def group_moments(
    groups: npt.NDArray[np.integer],
    group: int,
    values: FloatArray,
    present: npt.NDArray[np.bool_],
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Size, mean and sample variance (ddof=1) of ``values`` over each replicate's group.

    ``groups``: (R, U) group index per replicate; ``values``, ``present``: (U,) or (U, D) (a
    column per peek). Returns three (R,) or (R, D) arrays; NaN where a group has < 2 users.
    One matrix product per moment: every replicate and peek at once.
    """
    mask = (groups == group).astype(np.float64)
    weight = present.astype(np.float64)
    x = np.where(present, values, 0.0)
    # Shift by a typical value so the sum of squares does not cancel catastrophically.
    shift = float(np.median(x[present])) if present.any() else 0.0
    centred = np.where(present, x - shift, 0.0)
    n = mask @ weight
    s1 = mask @ centred
    s2 = mask @ centred**2
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s1 / n
        variance = np.where(n > 1, (s2 - s1 * mean) / (n - 1), np.nan)
    return n, mean + shift, np.maximum(variance, 0.0)


def _compare_moments(
    n_c: float, m_c: float, v_c: float, n_t: float, m_t: float, v_t: float, alpha: float
) -> WelchResult:
    return compare(
        ArmEstimate(int(n_c), float(m_c), float(v_c / n_c)),
        ArmEstimate(int(n_t), float(m_t), float(v_t / n_t)),
        alpha=alpha,
    )


def aa_study(
    values: FloatArray,
    present: npt.NDArray[np.bool_],
    groups: npt.NDArray[np.integer],
    *,
    alpha: float,
    srm_alpha: float,
    mixture_sd: float,
    weights: Sequence[float],
) -> dict[str, Any]:
    """False-positive rates of A/A splits of one population (groups 0 vs 1 of ``groups``).

    ``values``, ``present``: (U, D) per-user cumulative metric and presence at each daily peek
    (the last column is the end of the experiment). Returns the rates of: the fixed-horizon Welch
    test at the end, mSPRT with a look every day (always-valid), the O'Brien-Fleming-type
    alpha-spending test with a look every day (:mod:`experiments.group_sequential`), naive daily
    peeking with the fixed-horizon z-test, and the SRM check (at ``srm_alpha``) on the exposed
    users per group.
    """
    n_c, m_c, v_c = group_moments(groups, 0, values, present)
    n_t, m_t, v_t = group_moments(groups, 1, values, present)
    final = [
        _compare_moments(
            n_c[r, -1], m_c[r, -1], v_c[r, -1], n_t[r, -1], m_t[r, -1], v_t[r, -1], alpha
        ).p_value
        for r in range(groups.shape[0])
    ]
    with np.errstate(divide="ignore", invalid="ignore"):
        sequential = always_valid_inference(
            m_t - m_c, v_t / n_t + v_c / n_c, SequentialConfig(mixture_sd=mixture_sd, alpha=alpha)
        )
        # Per-user values change between looks (CTR so far): not independent increments, so
        # the boundaries come from the looks' own correlation, the same for every split.
        spending = group_sequential_test(
            m_t - m_c,
            v_t / n_t + v_c / n_c,
            alpha=alpha,
            correlation=look_correlation((values, present)),
        )
    counts = np.stack([n_c[:, -1], n_t[:, -1]], axis=1)
    srm = srm_p_values(counts, np.asarray(weights[:2], dtype=np.float64))
    replicates = groups.shape[0]
    return {
        "replicates": replicates,
        "peeks": int(values.shape[1]),
        "fpr_fixed_horizon": float(np.mean(np.asarray(final) <= alpha)),
        "fpr_sequential_msprt": float(np.mean(sequential.rejected[:, -1])),
        "fpr_sequential_alpha_spending": float(np.mean(spending.rejected[:, -1])),
        "alpha_spending_looks": int(np.isfinite(spending.critical).sum()),
        "fpr_naive_daily_peeking": float(
            np.mean((sequential.fixed_horizon_p_value <= alpha).any(axis=1))
        ),
        "srm_false_alarm_rate": float(np.mean(srm < srm_alpha)),
        "fpr_standard_error": math.sqrt(alpha * (1 - alpha) / replicates),
        "alpha": alpha,
        "srm_alpha": srm_alpha,
        "mixture_sd": mixture_sd,
    }


def coverage_study(
    control: FloatArray,
    treatment: FloatArray,
    observed: npt.NDArray[np.bool_],
    groups: npt.NDArray[np.integer],
    control_group: int,
    treatment_group: int,
    true_effect: float,
    *,
    alpha: float,
) -> dict[str, Any]:
    """Bias, RMSE and CI coverage of the A/B estimate over re-randomised assignments.

    ``control``, ``treatment``: (U,) per-user metric in the two arms' copies; ``observed``: (U,)
    users that enter the analysis; ``groups``: (R, U) replicate assignments; ``true_effect``: the
    twin difference on the observed population.
    """
    n_c, m_c, v_c = group_moments(groups, control_group, control, observed)
    n_t, m_t, v_t = group_moments(groups, treatment_group, treatment, observed)
    results = [
        _compare_moments(n_c[r], m_c[r], v_c[r], n_t[r], m_t[r], v_t[r], alpha)
        for r in range(groups.shape[0])
    ]
    estimates = np.array([w.difference for w in results])
    lower = np.array([w.ci[0] for w in results])
    upper = np.array([w.ci[1] for w in results])
    return {
        "replicates": len(results),
        "true_effect": true_effect,
        "mean_estimate": float(estimates.mean()),
        "bias": float(estimates.mean() - true_effect),
        "bias_standard_error": float(estimates.std(ddof=1) / math.sqrt(len(results))),
        "rmse": float(np.sqrt(np.mean((estimates - true_effect) ** 2))),
        "mean_ci_width": float(np.mean(upper - lower)),
        "coverage": float(np.mean((lower <= true_effect) & (true_effect <= upper))),
        "nominal_coverage": 1 - alpha,
        "power": float(np.mean([w.p_value <= alpha for w in results])),
    }


def srm_study(
    user_ids: Sequence[str],
    exposed: npt.NDArray[np.bool_],
    groups: npt.NDArray[np.integer],
    weights: Mapping[str, float],
    *,
    salt: str,
    loss_group: int,
    loss_fraction: float,
    shift: float,
    srm_alpha: float,
) -> dict[str, Any]:
    """Detection rates of the SRM check, simulated over replicates and by the formula.

    * loss: ``loss_fraction`` of group ``loss_group``'s users vanish (a per-user hash decides,
      independent of the assignment);
    * shift: the split really runs ``shift`` off (the first arm's share moved to the last arm),
      same per-replicate salts, so the same users are re-cut.
    Also the false-alarm rate with neither.
    """
    names = list(weights)
    expected = np.array([weights[a] for a in names], dtype=np.float64)
    n_arms = expected.size
    n_exposed = int(exposed.sum())

    def counts(assigned: npt.NDArray[np.integer], keep: npt.NDArray[np.bool_]) -> FloatArray:
        one_hot = assigned[:, :, None] == np.arange(n_arms)
        return (one_hot & keep[None, :, None]).sum(axis=1).astype(np.float64)

    clean = srm_p_values(counts(groups, exposed), expected)
    survives = hash_to_unit_interval(list(user_ids), f"{salt}/sample-loss") >= loss_fraction
    kept = exposed[None, :] & ((groups != loss_group) | survives[None, :])
    lossy_counts = np.stack(
        [((groups == g) & kept).sum(axis=1) for g in range(n_arms)], axis=1
    ).astype(np.float64)
    lossy = srm_p_values(lossy_counts, expected)
    shares = expected / expected.sum()
    shifted_shares = shares.copy()
    shifted_shares[0] -= shift
    shifted_shares[-1] += shift
    shifted_weights = dict(zip(names, shifted_shares.tolist(), strict=True))
    shifted_groups = np.stack(
        [
            assign_indices(list(user_ids), f"{salt}/{r}", shifted_weights)
            for r in range(groups.shape[0])
        ]
    )
    shifted = srm_p_values(counts(shifted_groups, exposed), expected)
    lossy_shares = shares.copy()
    lossy_shares[loss_group] *= 1 - loss_fraction
    return {
        "replicates": int(groups.shape[0]),
        "exposed_users": n_exposed,
        "srm_alpha": srm_alpha,
        "false_alarm_rate": float(np.mean(clean < srm_alpha)),
        "loss": {
            "arm": names[loss_group],
            "fraction": loss_fraction,
            "detection_rate": float(np.mean(lossy < srm_alpha)),
            "formula_power": srm_power(
                int(lossy_counts.sum(axis=1).mean()), shares, lossy_shares, alpha=srm_alpha
            ),
            "users_for_95_percent_detection": users_for_srm_power(
                shares, lossy_shares, 0.95, alpha=srm_alpha
            ),
        },
        "shift": {
            "shift": shift,
            "actual_shares": shifted_shares.tolist(),
            "detection_rate": float(np.mean(shifted < srm_alpha)),
            "formula_power": srm_power(n_exposed, shares, shifted_shares, alpha=srm_alpha),
        },
    }


def users_for_srm_power(
    expected_shares: FloatArray, actual_shares: FloatArray, power: float, *, alpha: float
) -> int:
    """Smallest number of users at which :func:`srm_power` reaches ``power`` (bisection)."""
    low, high = 2, 2
    while srm_power(high, expected_shares, actual_shares, alpha=alpha) < power:
        low, high = high, high * 2
        if high > 10**12:  # the shares are (numerically) equal: no size detects it
            return -1
    while high - low > 1:
        middle = (low + high) // 2
        if srm_power(middle, expected_shares, actual_shares, alpha=alpha) >= power:
            high = middle
        else:
            low = middle
    return high


def replicate_studies(
    result: SimulationResult,
    metrics: Mapping[str, FloatArray],
    exposed: npt.NDArray[np.bool_],
    replicates: int,
    mixture_sd: float | None,
) -> dict[str, Any]:
    """A/A false-positive rates, coverage/bias of the estimates and SRM detection rates.

    Replicates study the method, not this run's injected loss: every exposed user counts.
    """
    config = result.config
    analysis = config.analysis
    if replicates == 0:
        return {}
    groups = replicate_assignments(
        result.user_ids, f"{config.salt}/replicate", config.weights, replicates
    )
    out: dict[str, Any] = {}
    weights = list(config.weights.values())
    if analysis.aa_replicates and mixture_sd is not None:
        values, present = daily_cumulative(result, 0, analysis.primary_metric)
        out["aa"] = aa_study(
            values,
            present,
            groups[: analysis.aa_replicates],
            alpha=analysis.alpha,
            srm_alpha=analysis.srm_alpha,
            mixture_sd=mixture_sd,
            weights=weights,
        )
    if analysis.coverage_replicates:
        coverage: dict[str, Any] = {}
        for t, name in enumerate(config.arm_names[1:], start=1):
            coverage[name] = {}
            for metric in METRICS:
                truth = metrics[f"expected_{metric}"]
                coverage[name][metric] = coverage_study(
                    metrics[metric][0],
                    metrics[metric][t],
                    exposed,
                    groups[: analysis.coverage_replicates],
                    0,
                    t,
                    float(np.mean(truth[t, exposed] - truth[0, exposed])),
                    alpha=analysis.alpha,
                )
        out["coverage"] = coverage
    if analysis.srm_replicates:
        loss = config.sample_loss
        loss_arm = config.arm_names.index(loss.arm) if loss.arm else len(weights) - 1
        out["srm_power"] = srm_study(
            result.user_ids,
            exposed,
            groups[: analysis.srm_replicates],
            config.weights,
            salt=f"{config.salt}/replicate",
            loss_group=loss_arm,
            loss_fraction=loss.fraction or 0.02,
            shift=analysis.srm_shift,
            srm_alpha=analysis.srm_alpha,
        )
    return out
