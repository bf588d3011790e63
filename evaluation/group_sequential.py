"""Group-sequential tests with alpha spending: peek at planned looks without inflating errors.

Daily peeking with a fixed-horizon z-test rejects a true null far more often than ``alpha`` (30
looks: about 0.3). Two remedies live in this package:

* the mixture SPRT (:func:`evaluation.ab_stats.always_valid_inference`): valid at *any* stopping
  time, even unplanned, at the price of conservatism: with 30 daily looks its real false-positive
  rate is about half of ``alpha``;
* this module's group-sequential test (Lan & DeMets 1983): the looks are the experiment's days,
  and a *spending function* says how much of ``alpha`` may be used up by information fraction
  ``t``. The boundary of each look is solved so that the probability of crossing it first, under
  the null, is exactly the alpha spent there; the overall false-positive rate is ``alpha``, with
  no conservatism left over. Repeated confidence intervals (estimate +- boundary x standard
  error) cover the effect at every look simultaneously.

The boundary recursion follows Armitage, McPherson & Rowe (1969): the B-value
``B(t) = Z(t) sqrt(t)`` is a Brownian motion in the information fraction, so the density of the
paths that have not yet stopped is carried from look to look on a grid, convolved with the
Gaussian increment and cut at the boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import optimize, stats

from data.errors import ConfigError, DataError

FloatArray = npt.NDArray[np.float64]
SpendingKind = Literal["obrien_fleming", "pocock"]
GRID_POINTS = 801  # trapezoid grid of the continuation region: boundaries to ~1e-4
MIN_LOOK_GAIN = 0.01  # a look must add 1 % of the information to be tested


def spent_alpha(fraction: npt.ArrayLike, alpha: float, kind: SpendingKind) -> FloatArray:
    """Cumulative two-sided alpha spent by information fraction ``fraction`` (clipped to [0, 1]).

    ``obrien_fleming``: ``2 - 2 Phi(z_{1-alpha/2} / sqrt(t))``, spends almost nothing early (early
    stops need overwhelming evidence; the final look is nearly a fixed-horizon test).
    ``pocock``: ``alpha ln(1 + (e - 1) t)``, spends evenly (early stops easier, final look harder).
    """
    t = np.clip(np.asarray(fraction, dtype=np.float64), 0.0, 1.0)
    if kind == "obrien_fleming":
        z = stats.norm.isf(alpha / 2)
        with np.errstate(divide="ignore"):
            return np.where(t > 0, 2 * stats.norm.sf(z / np.sqrt(t)), 0.0)
    if kind == "pocock":
        return alpha * np.log1p((math.e - 1) * t)
    raise ConfigError(f"unknown spending function {kind!r}; use 'obrien_fleming' or 'pocock'")


def boundaries(
    fractions: npt.ArrayLike, alpha: float = 0.05, kind: SpendingKind = "obrien_fleming"
) -> FloatArray:
    """Two-sided z boundaries ``c_k`` of looks at increasing information ``fractions`` in (0, 1].

    Under the null, P(first |Z_k| >= c_k happens at look k) = alpha spent between looks k-1 and
    k, so the overall false-positive rate is ``spent_alpha(fractions[-1])`` (``alpha`` when the
    last look is at fraction 1). A look that spends nothing gets an infinite boundary.
    """
    t = np.asarray(fractions, dtype=np.float64)
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must lie in (0, 1), got {alpha}")
    if t.ndim != 1 or t.size == 0:
        raise DataError("fractions must be a non-empty 1-d array")
    if not (np.all(np.isfinite(t)) and t[0] > 0 and np.all(np.diff(t) > 0) and t[-1] <= 1 + 1e-9):
        raise DataError(f"fractions must increase strictly within (0, 1], got {t.tolist()}")
    spend = np.diff(spent_alpha(np.concatenate([[0.0], t]), alpha, kind))
    out = np.empty(t.size)
    grid, density, previous = np.zeros(1), np.ones(1), 0.0  # B(0) = 0 with probability one
    for k, (time, budget) in enumerate(zip(t, spend, strict=True)):
        sigma = math.sqrt(time - previous)
        mass = _trapezoid_weights(grid) * density
        bound = math.inf if budget <= 1e-15 else _solve_bound(grid, mass, sigma, budget)
        out[k] = bound / math.sqrt(time)
        # Carry the not-yet-stopped paths to this look, cut at the boundary.
        reach = min(bound, 9.0 * math.sqrt(time))
        new_grid = np.linspace(-reach, reach, GRID_POINTS)
        gap = (new_grid[:, None] - grid[None, :]) / sigma
        kernel = np.exp(-0.5 * gap * gap) / (sigma * math.sqrt(2 * math.pi))
        grid, density, previous = new_grid, kernel @ mass, time
    return out


def _trapezoid_weights(grid: FloatArray) -> FloatArray:
    if grid.size == 1:
        return np.ones(1)  # a point mass
    step = grid[1] - grid[0]
    weights = np.full(grid.size, step)
    weights[[0, -1]] = step / 2
    return weights


def _solve_bound(grid: FloatArray, mass: FloatArray, sigma: float, budget: float) -> float:
    """The B-value boundary ``b`` whose first-crossing probability equals ``budget``."""

    def crossing(bound: float) -> float:
        upper = stats.norm.sf((bound - grid) / sigma)
        lower = stats.norm.cdf((-bound - grid) / sigma)
        return float(mass @ (upper + lower)) - budget

    high = 1.0
    while crossing(high) > 0:
        high *= 2
    return float(optimize.brentq(crossing, 0.0, high, xtol=1e-10))


@dataclass(frozen=True)
class GroupSequentialResult:
    """A group-sequential test over looks (last axis; leading axes: replicates).

    z: the z statistic per look; critical: the boundary per look (shared by replicates);
    crossed: |z| >= boundary at that look; rejected: crossed at this look or any earlier one;
    ci_lower / ci_upper: repeated confidence intervals, simultaneous over the looks.
    """

    difference: FloatArray
    std_error: FloatArray
    z: FloatArray
    critical: FloatArray
    crossed: npt.NDArray[np.bool_]
    rejected: npt.NDArray[np.bool_]
    ci_lower: FloatArray
    ci_upper: FloatArray

    @property
    def first_rejection(self) -> npt.NDArray[np.int64]:
        """Index of the first look that rejects, -1 where none does."""
        return np.where(self.rejected.any(axis=-1), self.rejected.argmax(axis=-1), -1)


def group_sequential_test(
    difference: npt.ArrayLike,
    variance: npt.ArrayLike,
    *,
    alpha: float = 0.05,
    kind: SpendingKind = "obrien_fleming",
    fractions: npt.ArrayLike | None = None,
) -> GroupSequentialResult:
    """Test ``difference`` (treatment - control, ``(..., looks)``) with its ``variance`` per look.

    ``fractions``: information fraction of each look, increasing to 1 at the last. By default the
    observed one: information is inverse variance, averaged over replicates, made monotone (a
    noisy variance must not move information backwards) and scaled so the last look is at 1. A
    look that adds less than ``MIN_LOOK_GAIN`` of the information is not a look (a boundary for
    it would be solved from a degenerate increment); neither is a look with a non-finite or
    non-positive variance (too few users yet). Such looks never reject; their intervals are NaN.
    """
    d = np.asarray(difference, dtype=np.float64)
    v = np.asarray(variance, dtype=np.float64)
    if d.shape != v.shape or d.ndim == 0:
        raise DataError(f"difference {d.shape} and variance {v.shape} must share a looks axis")
    finite = np.all(np.isfinite(v) & (v > 0), axis=tuple(range(v.ndim - 1)))
    if not finite.any():
        raise DataError("no look has a finite positive variance")
    if fractions is None:
        with np.errstate(divide="ignore"):
            information = np.mean(1.0 / np.where(finite, v, np.inf), axis=tuple(range(v.ndim - 1)))
        information = np.maximum.accumulate(information)
        observed = information / information[-1]
    else:
        observed = np.asarray(fractions, dtype=np.float64)
    usable = _distinct_looks(observed, finite)
    critical = np.full(d.shape[-1], np.inf)
    critical[usable] = boundaries(observed[usable], alpha, kind)
    std_error = np.sqrt(np.where(usable, v, np.nan))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = d / std_error
    crossed = np.abs(np.nan_to_num(z)) >= critical
    half = np.where(np.isfinite(critical), critical, np.nan) * std_error
    return GroupSequentialResult(
        difference=d,
        std_error=std_error,
        z=z,
        critical=critical,
        crossed=crossed,
        rejected=np.logical_or.accumulate(crossed, axis=-1),
        ci_lower=d - half,
        ci_upper=d + half,
    )


def _distinct_looks(fractions: FloatArray, finite: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The looks to test: finite ones, each ``MIN_LOOK_GAIN`` past the previous; the last finite
    look always (it spends what is left of alpha), displacing a kept look too close before it."""
    keep = np.zeros(fractions.size, dtype=bool)
    candidates = np.flatnonzero(finite)
    reached = 0.0
    for look in candidates:
        if fractions[look] - reached >= MIN_LOOK_GAIN:
            keep[look] = True
            reached = fractions[look]
    last = candidates[-1]
    if not keep[last]:
        kept = np.flatnonzero(keep)
        if kept.size and fractions[last] - fractions[kept[-1]] < MIN_LOOK_GAIN:
            keep[kept[-1]] = False
        keep[last] = True
    return keep
