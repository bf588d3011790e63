"""User-level experiment assignment by salted hash.

The user is the unit of randomisation: every request of a user lands in the same arm, so the
per-user metrics that :mod:`experiments.ab_stats` compares are independent across users. The arm is
a pure function of ``(salt, user_id)``:

1. ``u = blake2b(len(salt) || salt || user_id)`` truncated to 64 bits, of which the top 53 become a
   float in ``[0, 1)`` (53 bits is exactly what a float64 mantissa holds, so every value is exact
   and the grid is uniform).
2. ``[0, 1)`` is cut into consecutive intervals whose lengths are the normalised arm weights, in
   the order the weights are given; the user gets the arm whose interval holds ``u``.

Why these choices:

* A cryptographic hash, not Python's ``hash`` (randomised per process) nor polars' ``hash``
  (documented as unstable across versions): an assignment must survive restarts and upgrades.
* The salt is length-prefixed, so ``("ab", "c")`` and ``("a", "bc")`` hash differently; one salt per
  experiment makes assignments of different experiments independent of each other.
* Interval cutting (rather than ``u * n_arms``) supports unequal splits, and makes ramp-ups
  gentle: with weights given as fractions, growing an arm at the expense of the arm laid out
  right after it (``{"control": .5, "treatment": .1, "holdout": .4}`` to ``.5 / .2 / .3``)
  moves users only from that later arm; everyone already in ``treatment`` stays there.

Only the standard library and numpy are used.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl
from numpy.typing import NDArray

from data.errors import ConfigError, DataError

__all__ = ["assign", "assign_indices", "hash_to_unit_interval"]

_DIGEST_BYTES = 8
"""64-bit digests: plenty for uniformity and cheap to decode with one ``np.frombuffer``."""

_MANTISSA_BITS = 53
"""Bits of the digest kept for the float in [0, 1): a float64 represents them all exactly."""

UserIds = pl.Series | Sequence[str] | NDArray[np.str_] | NDArray[np.object_]


def hash_to_unit_interval(user_ids: UserIds, salt: str) -> NDArray[np.float64]:
    """Map each user id to a uniform, reproducible number in ``[0, 1)``.

    ``user_ids``: ``(n_users,)`` strings (a polars Series, list or numpy array); no nulls.
    Returns ``(n_users,)`` float64. The same ``(salt, user_id)`` gives the same value on every
    machine, process and library version.
    """
    ids = _as_id_list(user_ids)
    salt_bytes = salt.encode("utf-8")
    prefix = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    prefix.update(len(salt_bytes).to_bytes(8, "big") + salt_bytes)
    # Hash the salt once and copy the hasher per id: the list comprehension then does one C call
    # per id, and one frombuffer decodes all digests (about 0.1 s per 100k ids).
    digests = b"".join(_digest(prefix, user_id) for user_id in ids)
    words = np.frombuffer(digests, dtype=">u8").astype(np.uint64)
    return (words >> np.uint64(64 - _MANTISSA_BITS)).astype(np.float64) / float(1 << _MANTISSA_BITS)


def assign_indices(user_ids: UserIds, salt: str, weights: Mapping[str, float]) -> NDArray[np.int64]:
    """Return ``(n_users,)`` int64: the position in ``weights`` of each user's arm.

    ``weights`` maps arm name to a non-negative relative weight (they need not sum to 1; an arm
    of weight 0 gets nobody). Arms are laid out on ``[0, 1)`` in the mapping's order, so that
    order is part of the experiment's definition.
    """
    cut_points = _cut_points(weights)
    unit = hash_to_unit_interval(user_ids, salt)
    # side="right": a user exactly on a cut point belongs to the later arm, the intervals are
    # half-open [lo, hi), and a zero-length interval (weight 0) can never be chosen.
    return np.searchsorted(cut_points, unit, side="right").astype(np.int64)


def assign(user_ids: UserIds, salt: str, weights: Mapping[str, float]) -> NDArray[np.str_]:
    """Return ``(n_users,)`` arm names, one per user id, by salted hash (see the module docstring).

    >>> arms = assign(["u1", "u2", "u3"], salt="exp-42", weights={"control": 0.5, "treatment": 0.5})
    >>> arms.shape
    (3,)
    """
    names = np.array(list(weights), dtype=np.str_)
    return names[assign_indices(user_ids, salt, weights)]


def _digest(prefix: hashlib.blake2b, user_id: str) -> bytes:
    hasher = prefix.copy()
    hasher.update(user_id.encode("utf-8"))
    return hasher.digest()


def _as_id_list(user_ids: UserIds) -> list[str]:
    if isinstance(user_ids, pl.Series):
        if user_ids.null_count():
            raise DataError(f"user_ids has {user_ids.null_count()} null values")
        ids = user_ids.cast(pl.String).to_list()
    else:
        ids = list(user_ids)
    bad = [value for value in ids if not isinstance(value, str)]
    if bad:
        raise DataError(
            f"user_ids must be strings; {len(bad)} are not, "
            f"e.g. {bad[0]!r} ({type(bad[0]).__name__})"
        )
    return ids


def _cut_points(weights: Mapping[str, float]) -> NDArray[np.float64]:
    """Right ends of the arms' intervals except the last, as fractions of [0, 1)."""
    if not weights:
        raise ConfigError("weights is empty; an experiment needs at least one arm")
    values = np.array([float(w) for w in weights.values()], dtype=np.float64)
    bad = {arm: w for arm, w in weights.items() if not (math.isfinite(w) and w >= 0)}
    if bad:
        raise ConfigError(f"arm weights must be finite and >= 0, got {bad}")
    total = values.sum()
    if total <= 0:
        raise ConfigError(f"arm weights sum to {total}; at least one arm needs a positive weight")
    # Dividing the running sum (not summing the divided weights) makes the cut point after the
    # last positive weight exactly 1.0, so trailing weight-0 arms really get nobody. The last
    # arm's right end is 1 by definition and is left out: every u < 1 lands in some arm.
    return (np.cumsum(values) / total)[:-1]
