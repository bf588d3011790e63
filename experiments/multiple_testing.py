"""Multiple testing: adjusted p-values over the comparisons of one experiment.

:func:`holm` controls the family-wise error rate, :func:`benjamini_hochberg` the false discovery
rate.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from data.errors import DataError

__all__ = ["benjamini_hochberg", "holm"]

FloatArray = NDArray[np.float64]


def holm(p_values: ArrayLike) -> FloatArray:
    """Holm-Bonferroni adjusted p-values (family-wise error control), along the last axis.

    With ``m`` tests sorted ascending, ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``;
    reject where ``adj <= alpha``. Returned in the input order.
    """
    p, order, m = _sorted_p_values(p_values)
    ranks = np.arange(1, m + 1)
    adjusted = np.maximum.accumulate(np.minimum(1.0, (m - ranks + 1) * p), axis=-1)
    return _unsort(adjusted, order)


def benjamini_hochberg(p_values: ArrayLike) -> FloatArray:
    """Benjamini-Hochberg adjusted p-values (false-discovery-rate control), along the last axis.

    With ``m`` tests sorted ascending, ``adj_(i) = min_{j >= i} min(1, m p_(j) / j)``; rejecting
    where ``adj <= q`` controls the FDR at ``q`` for independent (or positively dependent) tests.
    """
    p, order, m = _sorted_p_values(p_values)
    ranks = np.arange(1, m + 1)
    scaled = np.minimum(1.0, m * p / ranks)
    adjusted = np.flip(np.minimum.accumulate(np.flip(scaled, axis=-1), axis=-1), axis=-1)
    return _unsort(adjusted, order)


def _sorted_p_values(p_values: ArrayLike) -> tuple[FloatArray, NDArray[np.intp], int]:
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim == 0 or p.shape[-1] == 0:
        raise DataError("p_values must hold at least one p-value on its last axis")
    if not np.all((p >= 0) & (p <= 1)):
        raise DataError(f"p-values must lie in [0, 1], got {p[~((p >= 0) & (p <= 1))][:5]}")
    order = np.argsort(p, axis=-1, kind="stable")
    return np.take_along_axis(p, order, axis=-1), order, p.shape[-1]


def _unsort(values: FloatArray, order: NDArray[np.intp]) -> FloatArray:
    out = np.empty_like(values)
    np.put_along_axis(out, order, values, axis=-1)
    return out
