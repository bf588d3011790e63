"""Distribution-drift monitors: PSI and two-sample KS on features and prediction scores.

A monitor compares each time window of a 1-D quantity (a feature, or the model's scores) with a
reference sample (typically the training period):

* **PSI**, the population stability index, ``sum_i (q_i - p_i) ln(q_i / p_i)`` over bins with
  reference proportions ``p`` and window proportions ``q`` (the symmetrised KL divergence of the
  binned distributions). Bins are the reference's quantiles, so each holds about ``1 / n_bins`` of
  the reference and PSI weighs every part of the distribution alike. The usual reading (Siddiqi
  2006, "Credit Risk Scorecards"): < 0.1 stable, 0.1-0.2 moderate shift, > 0.2 significant shift.
  PSI is a size of shift, not a test: it does not grow with the sample size, but small windows
  inflate it (about ``(n_bins - 1)(1/n_reference + 1/n_window)`` with no drift at all).
* **KS**, the two-sample Kolmogorov-Smirnov test (:func:`scipy.stats.ks_2samp`): the largest gap
  between the two empirical CDFs, with a p-value. It is a test: with large windows it flags shifts
  too small to matter, which is why PSI is the primary alert and the KS threshold is strict.

:class:`DriftMonitor` runs both over a series of ``(time, sample)`` windows and reports the first
alert; :func:`detection_delay` scores a monitor against a known drift time (the synthetic world's
drift day).

Only numpy, scipy and polars are used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Self

import numpy as np
import polars as pl
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from data.errors import ConfigError, DataError, NotFittedError

__all__ = [
    "DetectionDelay",
    "DriftConfig",
    "DriftMonitor",
    "DriftReport",
    "KSResult",
    "WindowDrift",
    "bin_proportions",
    "detection_delay",
    "ks_test",
    "psi",
    "psi_from_proportions",
    "quantile_bin_edges",
]

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class DriftConfig:
    """Settings of :class:`DriftMonitor` and of :func:`psi`.

    n_bins: PSI bins, cut at the reference's quantiles. Default 10 (deciles), the convention PSI
        thresholds were calibrated with; ties in the reference (say 60 % zeros) merge bins, so
        the effective number can be smaller.
    epsilon: smoothing added to every bin proportion before the logarithm (then renormalised),
        so a bin that is empty on one side gives a large but finite term instead of ``inf``.
        Default 1e-4: far below the 0.1 of a decile bin, so it only matters for empty bins.
    psi_threshold: alert when PSI exceeds it. Default 0.2, the conventional "significant shift".
    ks_p_value_threshold: alert when the KS p-value falls below it; ``None`` turns the KS alert
        off. Default 0.001, not 0.05: a monitor tests many windows (and features), and at 0.05 it
        would raise a false alarm on one undrifted window in twenty.
    min_window_size: windows with fewer values are reported but never alert. Default 200: with
        10 bins an undrifted window of 200 already has an expected PSI of about 0.045 (a quarter
        of the threshold) from sampling noise alone, and smaller windows quickly get noisier.
    """

    n_bins: int = 10
    epsilon: float = 1e-4
    psi_threshold: float = 0.2
    ks_p_value_threshold: float | None = 1e-3
    min_window_size: int = 200

    def __post_init__(self) -> None:
        if self.n_bins < 2:
            raise ConfigError(f"n_bins must be >= 2, got {self.n_bins}")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError(f"epsilon must be finite and > 0, got {self.epsilon}")
        if not (math.isfinite(self.psi_threshold) and self.psi_threshold > 0):
            raise ConfigError(f"psi_threshold must be finite and > 0, got {self.psi_threshold}")
        threshold = self.ks_p_value_threshold
        if threshold is not None and not 0 < threshold < 1:
            raise ConfigError(f"ks_p_value_threshold must be in (0, 1) or None, got {threshold}")
        if self.min_window_size < 1:
            raise ConfigError(f"min_window_size must be >= 1, got {self.min_window_size}")


# --------------------------------------------------------------------------------------------
# PSI
# --------------------------------------------------------------------------------------------


def quantile_bin_edges(reference: ArrayLike, n_bins: int) -> FloatArray:
    """Interior bin edges at the reference's ``1/n_bins, ..., (n_bins-1)/n_bins`` quantiles.

    Returns ``(n_edges,)`` increasing edges, ``n_edges <= n_bins - 1``; bin ``i`` is
    ``(edges[i-1], edges[i]]`` with open outer ends, so values outside the reference's range
    fall into the end bins. The quantiles are actual reference values (inverted CDF: the smallest
    value whose CDF reaches the level), deduplicated, and below the reference maximum. Every bin
    then holds at least one reference value (its upper edge), and a tied value gets a bin of its
    own: with 60 % zeros the first bin is exactly the zeros, holding 0.6 of the reference.
    """
    ref = _sample(reference, "reference")
    if n_bins < 2:
        raise ConfigError(f"n_bins must be >= 2, got {n_bins}")
    levels = np.arange(1, n_bins) / n_bins
    edges = np.unique(np.quantile(ref, levels, method="inverted_cdf"))
    return edges[edges < ref.max()]


def bin_proportions(sample: ArrayLike, edges: ArrayLike, epsilon: float) -> FloatArray:
    """Smoothed share of ``sample`` in each bin of ``edges``: ``(len(edges) + 1,)``, sums to 1.

    ``p_i = (c_i / n + epsilon) / (1 + n_bins * epsilon)`` with ``c_i`` the count in bin ``i``.
    """
    x = _sample(sample, "sample")
    cuts = np.asarray(edges, dtype=np.float64)
    # side="left": a value equal to an edge belongs to the bin that ends there ((lo, hi]), so an
    # edge at a tied value keeps all of its ties in one bin.
    counts = np.bincount(np.searchsorted(cuts, x, side="left"), minlength=cuts.size + 1)
    n_bins = cuts.size + 1
    return (counts / x.size + epsilon) / (1 + n_bins * epsilon)


def psi_from_proportions(expected: ArrayLike, actual: ArrayLike) -> FloatArray:
    """PSI ``sum_i (actual_i - expected_i) ln(actual_i / expected_i)`` along the last axis.

    ``expected`` (reference) and ``actual`` (window): ``(..., n_bins)`` strictly positive bin
    proportions (smooth them first, see :func:`bin_proportions`). Returns ``(...)``, always >= 0.
    """
    p = np.asarray(expected, dtype=np.float64)
    q = np.asarray(actual, dtype=np.float64)
    if p.shape[-1:] != q.shape[-1:]:
        raise DataError(f"expected has {p.shape[-1:]} bins but actual has {q.shape[-1:]}")
    if np.any(p <= 0) or np.any(q <= 0):
        raise DataError("bin proportions must be > 0; smooth empty bins with epsilon first")
    return np.asarray(((q - p) * np.log(q / p)).sum(axis=-1), dtype=np.float64)


def psi(
    reference: ArrayLike,
    current: ArrayLike,
    *,
    n_bins: int = DriftConfig.n_bins,
    epsilon: float = DriftConfig.epsilon,
) -> float:
    """Population stability index of ``current`` against ``reference`` (1-D samples).

    Bins come from the reference's quantiles (:func:`quantile_bin_edges`); both sides are
    epsilon-smoothed (:func:`bin_proportions`). Identical samples give exactly 0.
    """
    edges = quantile_bin_edges(reference, n_bins)
    expected = bin_proportions(reference, edges, epsilon)
    actual = bin_proportions(current, edges, epsilon)
    return float(psi_from_proportions(expected, actual))


# --------------------------------------------------------------------------------------------
# KS
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KSResult:
    """Two-sample Kolmogorov-Smirnov: ``statistic`` is ``sup |F_ref - F_cur|`` in [0, 1]."""

    statistic: float
    p_value: float


def ks_test(reference: ArrayLike, current: ArrayLike) -> KSResult:
    """Two-sided two-sample KS test (:func:`scipy.stats.ks_2samp`, its automatic exact/asymptotic
    choice) of ``current`` against ``reference``."""
    result = stats.ks_2samp(_sample(reference, "reference"), _sample(current, "current"))
    return KSResult(statistic=float(result.statistic), p_value=float(result.pvalue))


# --------------------------------------------------------------------------------------------
# Monitor
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowDrift:
    """Drift statistics of one window. ``time``: the caller's window label (use its end time, the
    moment its data are complete, so detection delays are honest)."""

    time: float
    n: int
    psi: float
    ks_statistic: float
    ks_p_value: float
    psi_alert: bool
    ks_alert: bool
    enough_data: bool

    @property
    def alert(self) -> bool:
        return self.psi_alert or self.ks_alert


@dataclass(frozen=True)
class DriftReport:
    """Per-window statistics, in the order given, and the time of the first alerting window.

    ``windows`` columns: ``time, n, psi, ks_statistic, ks_p_value, psi_alert, ks_alert,
    enough_data, alert``.
    """

    windows: pl.DataFrame
    first_alert_time: float | None


class DriftMonitor:
    """PSI + KS drift monitor for one 1-D quantity (see the module docstring).

    Learned state (after :meth:`fit`):
        edges_: ``(n_bins_effective - 1,)`` PSI bin edges from the reference quantiles.
        reference_proportions_: ``(n_bins_effective,)`` smoothed reference bin shares.
        reference_: ``(n_reference,)`` float64 reference sample, for KS.
    """

    edges_: FloatArray
    reference_proportions_: FloatArray
    reference_: FloatArray

    def __init__(self, config: DriftConfig | None = None) -> None:
        self.config = config if config is not None else DriftConfig()

    def fit(self, reference: ArrayLike) -> Self:
        """Take ``reference``, ``(n_reference,)`` finite values, as the undrifted distribution."""
        ref = _sample(reference, "reference")
        self.edges_ = quantile_bin_edges(ref, self.config.n_bins)
        self.reference_proportions_ = bin_proportions(ref, self.edges_, self.config.epsilon)
        self.reference_ = ref
        return self

    def check(self, sample: ArrayLike, time: float = math.nan) -> WindowDrift:
        """Statistics and alerts of one window: ``sample`` ``(n_window,)`` finite values."""
        self._check_fitted()
        x = _sample(sample, "sample")
        actual = bin_proportions(x, self.edges_, self.config.epsilon)
        value = float(psi_from_proportions(self.reference_proportions_, actual))
        ks = stats.ks_2samp(self.reference_, x)
        enough = x.size >= self.config.min_window_size
        threshold = self.config.ks_p_value_threshold
        return WindowDrift(
            time=time,
            n=int(x.size),
            psi=value,
            ks_statistic=float(ks.statistic),
            ks_p_value=float(ks.pvalue),
            psi_alert=enough and value > self.config.psi_threshold,
            ks_alert=enough and threshold is not None and float(ks.pvalue) < threshold,
            enough_data=enough,
        )

    def evaluate(self, windows: Iterable[tuple[float, ArrayLike]]) -> DriftReport:
        """Check every ``(time, sample)`` window; times should increase.

        Windows are independent checks against the fixed reference (no state carries over), so
        the order only matters for which alert is "first".
        """
        self._check_fitted()
        checks = [self.check(sample, time) for time, sample in windows]
        if not checks:
            raise DataError("no windows to evaluate")
        frame = pl.DataFrame(
            {
                "time": [c.time for c in checks],
                "n": [c.n for c in checks],
                "psi": [c.psi for c in checks],
                "ks_statistic": [c.ks_statistic for c in checks],
                "ks_p_value": [c.ks_p_value for c in checks],
                "psi_alert": [c.psi_alert for c in checks],
                "ks_alert": [c.ks_alert for c in checks],
                "enough_data": [c.enough_data for c in checks],
                "alert": [c.alert for c in checks],
            },
            schema_overrides={"n": pl.Int64},
        )
        first = next((c.time for c in checks if c.alert), None)
        return DriftReport(windows=frame, first_alert_time=first)

    def _check_fitted(self) -> None:
        if not hasattr(self, "reference_"):
            raise NotFittedError("DriftMonitor.fit(reference) must be called before checking")


# --------------------------------------------------------------------------------------------
# Detection delay
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectionDelay:
    """How a monitor did against a drift that really started at ``drift_time``.

    ``first_alert_time``: first alerting window at or after ``drift_time`` (``None``: missed).
    ``delay``: ``first_alert_time - drift_time`` in the unit of the window times (``None``:
    missed). ``false_alarms``: alerting windows before ``drift_time``.
    """

    drift_time: float
    first_alert_time: float | None
    delay: float | None
    false_alarms: int


def detection_delay(report: DriftReport, drift_time: float) -> DetectionDelay:
    """Score ``report`` against a known drift start (e.g. the synthetic world's drift day)."""
    frame = report.windows
    after = frame.filter(pl.col("alert") & (pl.col("time") >= drift_time))
    false_alarms = frame.filter(pl.col("alert") & (pl.col("time") < drift_time)).height
    if after.height == 0:
        return DetectionDelay(drift_time, None, None, false_alarms)
    first = min(after["time"].to_list())
    return DetectionDelay(drift_time, first, first - drift_time, false_alarms)


def _sample(values: ArrayLike, name: str) -> FloatArray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise DataError(f"{name} must be a non-empty 1-D sample, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{name} has {int((~np.isfinite(x)).sum())} non-finite values")
    return x
