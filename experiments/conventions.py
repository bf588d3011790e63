"""Conventions shared by the A/B statistics, with the user as the unit of randomisation.

Users, not events, are randomised (:mod:`pipeline.assignment`), so users are the independent
observations: every test of this package takes one value per user (or per user and day).
Event-level logs are first summed per user with :func:`experiments.estimators.aggregate_per_user`.
Treating events as independent would understate the variance, because one user's events are
correlated.

"control" is the baseline arm and every difference is ``treatment - control``; relative lift is
``treatment / control - 1``; ``alpha`` is two-sided. Degenerate inputs that can arise in a running
experiment (both arms constant, a control mean of zero) give ``NaN`` rather than an exception;
inputs that are plainly wrong (one user in an arm, non-finite values, a mismatched shape) raise
:class:`~data.errors.DataError` naming the input. The checks of this module are shared by the
statistics modules: :mod:`experiments.estimators`, :mod:`experiments.srm`,
:mod:`experiments.power`, :mod:`experiments.always_valid`, :mod:`experiments.multiple_testing`,
:mod:`experiments.guardrails`.
"""

from __future__ import annotations

from data.errors import ConfigError, DataError

__all__ = ["DEFAULT_ALPHA", "check_alpha", "check_arm_size"]


DEFAULT_ALPHA = 0.05
"""Two-sided significance level of the tests: the field's convention for a single primary metric."""


def check_arm_size(n: int, name: str) -> None:
    """``DataError`` unless an arm of ``n`` users can give a variance (``n >= 2``)."""
    if n < 2:
        raise DataError(f"{name} has {n} user(s); a variance needs at least 2")


def check_alpha(alpha: float) -> None:
    """``ConfigError`` unless the level ``alpha`` lies in (0, 1)."""
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
