"""Always-valid sequential inference: the normal-mixture sequential probability ratio test.

The mSPRT of Johari, Koomen, Pekelis & Walsh (2017, "Peeking at A/B Tests")
(:func:`always_valid_inference`, :func:`sequential_test`), so an experiment can be looked at after
every batch of users and stopped early without inflating the false-positive rate. The
alpha-spending alternative with a fixed number of looks is :mod:`experiments.group_sequential`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from data.errors import ConfigError, DataError
from experiments.conventions import DEFAULT_ALPHA, check_alpha, check_arm_size

__all__ = [
    "SequentialConfig",
    "SequentialResult",
    "always_valid_inference",
    "peek_sizes",
    "sequential_test",
]

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class SequentialConfig:
    """Settings of the normal-mixture SPRT (Johari et al. 2017).

    ``mixture_sd`` (tau, in metric units, no default): spread of the normal prior over true effects
    that the mixture averages over. The test is most powerful for effects around ``tau``; set it
    to the effect you hope to detect (e.g. the MDE of the power analysis). Type-I error is
    controlled whatever the choice. ``alpha``: two-sided level, valid over any number of peeks.
    ``null_difference``: the difference under the null hypothesis (0: no effect).
    """

    mixture_sd: float
    alpha: float = DEFAULT_ALPHA
    null_difference: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mixture_sd) and self.mixture_sd > 0):
            raise ConfigError(f"mixture_sd must be finite and > 0, got {self.mixture_sd}")
        check_alpha(self.alpha)


@dataclass(frozen=True)
class SequentialResult:
    """Inference after each peek; every array is ``(..., n_peeks)`` (leading axes: replicates).

    ``p_value``: always-valid p-value (non-increasing over peeks); stopping the first time it is
    ``<= alpha`` keeps the false-positive rate at most ``alpha``. ``ci_lower``/``ci_upper``: the
    always-valid ``1 - alpha`` confidence sequence (nested over peeks): with probability
    ``>= 1 - alpha`` it holds the true difference at *every* peek simultaneously.
    ``fixed_horizon_p_value``: the ordinary z-test p-value at each peek, valid only if that peek
    were the single, pre-planned analysis; stopping on it inflates false positives.
    """

    difference: FloatArray
    std_error: FloatArray
    p_value: FloatArray
    ci_lower: FloatArray
    ci_upper: FloatArray
    fixed_horizon_p_value: FloatArray
    alpha: float

    @property
    def rejected(self) -> NDArray[np.bool_]:
        """``(..., n_peeks)``: whether the null is rejected at or before each peek."""
        return np.asarray(self.p_value <= self.alpha)

    @property
    def first_rejection(self) -> NDArray[np.int64]:
        """``(...)``: index of the first peek that rejects, ``-1`` where none does."""
        rejected = self.rejected
        return np.where(rejected.any(axis=-1), rejected.argmax(axis=-1), -1).astype(np.int64)


def always_valid_inference(
    difference: ArrayLike, variance: ArrayLike, config: SequentialConfig
) -> SequentialResult:
    """mSPRT p-values and confidence sequence from the estimates at successive peeks.

    ``difference``: ``(..., n_peeks)`` estimated ``treatment - control`` at each peek, computed
    from all users so far; ``variance``: its variance ``s_t^2 / n_t + s_c^2 / n_c`` at the same
    peeks. With the normal approximation ``difference ~ N(theta, V)`` and a ``N(theta0, tau^2)``
    mixture over ``theta``, the mixture likelihood ratio is (Johari et al. 2017, eq. 11)

        ``Lambda = sqrt(V / (V + tau^2)) exp(tau^2 (difference - theta0)^2 / (2 V (V + tau^2)))``

    a martingale under the null, so by Ville's inequality ``P(sup Lambda >= 1/alpha) <= alpha``.
    The always-valid p-value is ``min(1, 1 / max_{m <= n} Lambda_m)``, and the confidence sequence
    is the running intersection of ``{theta: Lambda(theta) < 1/alpha}``, i.e. ``difference +- h``
    with ``h^2 = 2 V (V + tau^2) / tau^2 * (log(1/alpha) + log((V + tau^2) / V) / 2)``.
    Plugging in estimated variances makes this asymptotic, as in the paper.
    """
    d = np.asarray(difference, dtype=np.float64)
    v = np.asarray(variance, dtype=np.float64)
    if d.shape != v.shape or d.ndim == 0:
        raise DataError(
            f"difference {d.shape} and variance {v.shape} must have one shape with a peek axis"
        )
    tau2 = config.mixture_sd**2
    alpha = config.alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        log_shrink = 0.5 * np.log(v / (v + tau2))
        log_lr = log_shrink + tau2 * (d - config.null_difference) ** 2 / (2 * v * (v + tau2))
        half_width = np.sqrt(2 * v * (v + tau2) / tau2 * (math.log(1 / alpha) - log_shrink))
        fixed_p = 2 * stats.norm.sf(np.abs(d - config.null_difference) / np.sqrt(v))
    # fmax/fmin skip NaN (a peek where both arms were still constant) instead of spreading it.
    p_value = np.minimum(1.0, np.exp(-np.fmax.accumulate(log_lr, axis=-1)))
    return SequentialResult(
        difference=d,
        std_error=np.sqrt(v),
        p_value=p_value,
        ci_lower=np.fmax.accumulate(d - half_width, axis=-1),
        ci_upper=np.fmin.accumulate(d + half_width, axis=-1),
        fixed_horizon_p_value=np.asarray(fixed_p, dtype=np.float64),
        alpha=alpha,
    )


def peek_sizes(
    n_control: int, n_treatment: int, peek_every: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Users per arm seen at each peek when looking after every ``peek_every`` users per arm.

    Returns two ``(n_peeks,)`` arrays; peek ``k`` (1-based) sees ``min(k * peek_every, n_arm)``
    users of each arm, and the last peek sees everyone.
    """
    if peek_every < 2:
        raise ConfigError(f"peek_every must be >= 2 (a variance needs two users), got {peek_every}")
    check_arm_size(n_control, "control")
    check_arm_size(n_treatment, "treatment")
    n_peeks = -(-max(n_control, n_treatment) // peek_every)
    seen = np.arange(1, n_peeks + 1, dtype=np.int64) * peek_every
    return np.minimum(seen, n_control), np.minimum(seen, n_treatment)


def sequential_test(
    control: ArrayLike, treatment: ArrayLike, *, peek_every: int, config: SequentialConfig
) -> SequentialResult:
    """Run :func:`always_valid_inference` over per-user values in arrival order.

    ``control``: ``(..., n_control)``, ``treatment``: ``(..., n_treatment)``, users on the last axis
    in the order they entered the experiment (leading axes: replicates of a simulation). Peeks are
    taken every ``peek_every`` users per arm (:func:`peek_sizes`); cumulative means and variances
    come from running sums, so all peeks cost one pass over the data.
    """
    c = np.asarray(control, dtype=np.float64)
    t = np.asarray(treatment, dtype=np.float64)
    if c.ndim == 0 or t.ndim == 0:
        raise DataError("control and treatment need a users axis (the last axis)")
    n_c, n_t = peek_sizes(c.shape[-1], t.shape[-1], peek_every)
    mean_c, var_c = _running_moments(c, n_c)
    mean_t, var_t = _running_moments(t, n_t)
    return always_valid_inference(mean_t - mean_c, var_t / n_t + var_c / n_c, config)


def _running_moments(values: FloatArray, sizes: NDArray[np.int64]) -> tuple[FloatArray, FloatArray]:
    """Mean and sample variance (ddof=1) of the first ``sizes[k]`` users, for every ``k``."""
    # Shifting by the first user's value keeps the running sum of squares from cancelling
    # catastrophically when the mean is large compared with the spread.
    shifted = values - values[..., :1]
    sums = np.cumsum(shifted, axis=-1)[..., sizes - 1]
    squares = np.cumsum(shifted**2, axis=-1)[..., sizes - 1]
    mean = sums / sizes
    variance = np.maximum(squares - sums * mean, 0.0) / (sizes - 1)
    return mean + values[..., :1], variance
