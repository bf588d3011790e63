"""Guardrails: non-inferiority checks on the metrics a treatment must not make worse.

A :class:`Guardrail` names a metric, its good direction and the tolerated relative margin;
:func:`evaluate_guardrails` reads the Welch comparisons (:mod:`experiments.estimators`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from data.errors import ConfigError, DataError
from experiments.estimators import WelchResult

__all__ = ["Guardrail", "GuardrailCheck", "evaluate_guardrails"]


Direction = Literal["higher_is_better", "lower_is_better"]


@dataclass(frozen=True)
class Guardrail:
    """A metric that the treatment must not make worse by more than ``tolerance``.

    ``metric``: key into the results passed to :func:`evaluate_guardrails`.
    ``direction``: which way is good (``"lower_is_better"`` for latency or error rate).
    ``tolerance``: the largest acceptable *relative* degradation, e.g. ``0.01`` for 1 %. No
    default: a tolerance of 0 demands proof of no harm at all, which no finite experiment gives.
    """

    metric: str
    direction: Direction
    tolerance: float

    def __post_init__(self) -> None:
        if self.direction not in ("higher_is_better", "lower_is_better"):
            raise ConfigError(
                f"guardrail {self.metric!r}: direction must be 'higher_is_better' or "
                f"'lower_is_better', got {self.direction!r}"
            )
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise ConfigError(
                f"guardrail {self.metric!r}: tolerance must be finite and >= 0, "
                f"got {self.tolerance}"
            )


@dataclass(frozen=True)
class GuardrailCheck:
    """Outcome of one guardrail: ``passed`` and a one-line ``reason`` for the report.

    ``worst_case``: the bound of the relative-lift CI on the harmful side (the most harm the data
    cannot rule out), signed like the lift.
    """

    guardrail: Guardrail
    relative_lift: float
    relative_ci: tuple[float, float]
    worst_case: float
    passed: bool
    reason: str


def evaluate_guardrails(
    guardrails: Sequence[Guardrail], results: Mapping[str, WelchResult]
) -> list[GuardrailCheck]:
    """Non-inferiority check of every guardrail against its metric's :class:`WelchResult`.

    A guardrail passes when the CI bound on the harmful side stays within ``tolerance``, i.e.
    the data rule out a degradation larger than the tolerance (a one-sided non-inferiority test at
    level ``alpha / 2`` of the result's CI). An underpowered guardrail therefore fails: "no
    significant harm" is not evidence of no harm.
    """
    missing = [g.metric for g in guardrails if g.metric not in results]
    if missing:
        raise DataError(f"no result for guardrail metric(s) {missing}; have {sorted(results)}")
    checks = []
    for guardrail in guardrails:
        result = results[guardrail.metric]
        lower, upper = result.relative_ci
        if guardrail.direction == "higher_is_better":
            worst, harm = lower, -lower
        else:
            worst, harm = upper, upper
        if math.isnan(worst):
            passed, reason = False, "relative lift undefined (control mean 0 or no variance)"
        elif harm <= guardrail.tolerance:
            passed = True
            reason = f"worst case {worst:+.2%} is within the {guardrail.tolerance:.2%} tolerance"
        else:
            passed = False
            reason = (
                f"cannot rule out a {harm:.2%} degradation (tolerance {guardrail.tolerance:.2%}; "
                f"lift {result.relative_lift:+.2%})"
            )
        checks.append(
            GuardrailCheck(
                guardrail=guardrail,
                relative_lift=result.relative_lift,
                relative_ci=result.relative_ci,
                worst_case=worst,
                passed=passed,
                reason=reason,
            )
        )
    return checks
