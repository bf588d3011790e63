"""Where does a system win or lose? Metrics by user segment and by item-popularity bucket.

An average hides who pays for it: a model can gain NDCG on heavy users while cold-start users get
worse, or gain recall only on blockbusters. This module defines the usual segments and
summarises per-user metrics within each:

* **cold start** (:func:`cold_start_segments`): users with no / few / enough training events;
* **activity** (:func:`activity_segments`): light / medium / heavy users by activity quantiles;
* **item popularity** (:func:`item_popularity_buckets`): head / mid / tail items by their share of
  training interactions (Abdollahpouri et al. 2019, "The unfairness of popularity bias in
  recommendation": head = the most popular items holding the first 20 % of interactions, tail =
  the least popular holding the last 20 %); :func:`bucket_metrics` measures recall and hit rate
  against each bucket's relevant items only, and how much of the lists each bucket fills.

A :class:`Segmentation` is a partition: every user (or item) has exactly one segment.
:func:`segment_metrics` turns ``(n_users,)`` per-user metric arrays into per-segment means with
bootstrap confidence intervals (:mod:`evaluation.bootstrap`), JSON-ready.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from numpy.typing import ArrayLike, NDArray

from data.errors import ConfigError, DataError
from data.interactions import Interactions
from data.validation import fraction, non_negative_int
from evaluation.bootstrap import DEFAULT_CONFIDENCE, DEFAULT_N_BOOT, bootstrap_ci
from evaluation.metrics import PADDING, hit_rate_at_k, recall_at_k

__all__ = [
    "ACTIVITY_SEGMENTS",
    "COLD_START_SEGMENTS",
    "DEFAULT_FEW_EVENTS",
    "DEFAULT_HEAD_SHARE",
    "DEFAULT_HEAVY_QUANTILE",
    "DEFAULT_LIGHT_QUANTILE",
    "DEFAULT_TAIL_SHARE",
    "POPULARITY_BUCKETS",
    "Segmentation",
    "activity_segments",
    "bucket_metrics",
    "cold_start_segments",
    "item_popularity_buckets",
    "segment_metrics",
    "training_event_counts",
]

COLD_START_SEGMENTS: tuple[str, ...] = ("cold", "few", "warm")
ACTIVITY_SEGMENTS: tuple[str, ...] = ("light", "medium", "heavy")
POPULARITY_BUCKETS: tuple[str, ...] = ("head", "mid", "tail")

DEFAULT_FEW_EVENTS = 5
"""Users with 1..5 training events are "few": below the 5-core threshold that most published
benchmarks filter away, so this is the population those benchmarks never measure."""

DEFAULT_LIGHT_QUANTILE = 0.25
DEFAULT_HEAVY_QUANTILE = 0.75
"""Activity quartiles: the least active quarter is "light", the most active quarter "heavy", the
middle half "medium", so the two ends are compared without the bulk blurring them."""

DEFAULT_HEAD_SHARE = 0.2
DEFAULT_TAIL_SHARE = 0.2
"""Shares of training interactions held by the head and the tail buckets (Abdollahpouri et al.
2019): the head is the few blockbusters, the tail the many niche items, each 20 % of the events."""


@dataclass(frozen=True)
class Segmentation:
    """A partition of ``n`` users (or items) into named segments.

    kind:  what is segmented, e.g. ``"cold_start"`` (a report heading).
    names: the segments, in display order.
    codes: (n,) int64, ``codes[u]`` indexes ``names``: the segment of entity ``u``.
    """

    kind: str
    names: tuple[str, ...]
    codes: NDArray[np.int64]

    def __post_init__(self) -> None:
        if self.codes.ndim != 1:
            raise DataError(f"segment codes must be 1-D, got shape {self.codes.shape}")
        if self.codes.size and (self.codes.min() < 0 or self.codes.max() >= len(self.names)):
            raise DataError(
                f"segment codes span {self.codes.min()}..{self.codes.max()} but there are "
                f"{len(self.names)} segments {list(self.names)}"
            )

    def __len__(self) -> int:
        return int(self.codes.size)

    @property
    def labels(self) -> NDArray[np.str_]:
        """(n,) the segment name of each entity."""
        return np.asarray(self.names, dtype=np.str_)[self.codes]

    def mask(self, name: str) -> NDArray[np.bool_]:
        """(n,) bool: the entities in segment ``name``."""
        if name not in self.names:
            raise DataError(f"no segment {name!r} in {self.kind}; segments: {list(self.names)}")
        return self.codes == self.names.index(name)

    def sizes(self) -> dict[str, int]:
        """Entities per segment, in display order (empty segments included)."""
        counts = np.bincount(self.codes, minlength=len(self.names))
        return {name: int(count) for name, count in zip(self.names, counts, strict=True)}


# --------------------------------------------------------------------------------------------
# Segment definitions
# --------------------------------------------------------------------------------------------


def training_event_counts(log: Interactions, user_rows: ArrayLike) -> NDArray[np.int64]:
    """(n,) training events of each user; ``-1`` or an index past the log's users counts 0."""
    rows = np.asarray(user_rows)
    if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
        raise DataError(f"user_rows must be 1-D integer indices, got shape {rows.shape}")
    rows = rows.astype(np.int64)
    known = (rows >= 0) & (rows < log.n_users)
    return np.where(known, log.user_counts[np.where(known, rows, 0)], 0).astype(np.int64)


def cold_start_segments(
    user_counts: ArrayLike, *, few_events: int = DEFAULT_FEW_EVENTS
) -> Segmentation:
    """``cold`` (0 training events), ``few`` (1..``few_events``), ``warm`` (more)."""
    counts = _counts(user_counts, "user_counts")
    few_events = non_negative_int(few_events, "few_events")
    codes = np.where(counts == 0, 0, np.where(counts <= few_events, 1, 2))
    return Segmentation("cold_start", COLD_START_SEGMENTS, codes.astype(np.int64))


def activity_segments(
    user_counts: ArrayLike,
    *,
    reference: ArrayLike | None = None,
    light_quantile: float = DEFAULT_LIGHT_QUANTILE,
    heavy_quantile: float = DEFAULT_HEAVY_QUANTILE,
) -> Segmentation:
    """``light`` / ``medium`` / ``heavy`` users by training activity.

    The thresholds are the ``light_quantile`` and ``heavy_quantile`` quantiles of ``reference``
    (e.g. every training user's event count, so "heavy" means heavy among all users; default:
    ``user_counts`` itself). ``light``: count <= the light threshold; ``heavy``: count > the heavy
    threshold; ``medium``: between. Users tied at a threshold share a segment, so the segment
    sizes follow the quantiles only approximately on discrete counts.
    """
    counts = _counts(user_counts, "user_counts")
    if not 0 <= light_quantile <= heavy_quantile <= 1:
        raise ConfigError(
            f"need 0 <= light_quantile <= heavy_quantile <= 1, got {light_quantile!r} and "
            f"{heavy_quantile!r}"
        )
    population = counts if reference is None else _counts(reference, "reference")
    codes = np.ones(counts.size, dtype=np.int64)
    if population.size:
        light, heavy = np.quantile(population, [light_quantile, heavy_quantile])
        codes[counts <= light] = 0
        codes[counts > heavy] = 2
    return Segmentation("activity", ACTIVITY_SEGMENTS, codes)


def item_popularity_buckets(
    item_counts: ArrayLike,
    *,
    n_items: int | None = None,
    head_share: float = DEFAULT_HEAD_SHARE,
    tail_share: float = DEFAULT_TAIL_SHARE,
) -> Segmentation:
    """``head`` / ``mid`` / ``tail`` items by their share of training interactions.

    head: the most popular items needed to reach ``head_share`` of all events (an item is head
        if the items strictly more popular hold less than ``head_share``).
    tail: the least popular items that together hold at most ``tail_share`` (an item is tail if
        it and every item no more popular hold at most ``tail_share``); items without events
        are always tail.
    mid:  the rest. Items with equal counts always share a bucket; head wins an overlap.
    ``n_items`` (>= ``len(item_counts)``) extends the space with items unknown to training (e.g.
    the extra columns of a relevance matrix): they have no events, so they are tail.
    """
    counts = _counts(item_counts, "item_counts").astype(np.float64)
    if n_items is not None:
        n_items = non_negative_int(n_items, "n_items")
        if n_items < counts.size:
            raise DataError(f"n_items={n_items} is smaller than the {counts.size} item_counts")
        counts = np.concatenate([counts, np.zeros(n_items - counts.size)])
    for name, share in (("head_share", head_share), ("tail_share", tail_share)):
        fraction(share, name)
    if head_share + tail_share > 1:
        raise ConfigError(f"head_share + tail_share = {head_share + tail_share} exceeds 1")
    total = counts.sum()
    codes = np.ones(counts.size, dtype=np.int64)
    if total > 0:
        # Events held by items with a count up to each item's own (its whole tie level).
        ordered = np.sort(counts)
        cumulative = np.concatenate(([0.0], np.cumsum(ordered)))
        up_to = cumulative[np.searchsorted(ordered, counts, side="right")]
        codes[up_to <= tail_share * total] = 2
        codes[(total - up_to) < head_share * total] = 0  # strictly more popular items' events
    else:
        codes[:] = 2
    return Segmentation("item_popularity", POPULARITY_BUCKETS, codes)


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def segment_metrics(
    per_user: Mapping[str, ArrayLike],
    segmentation: Segmentation,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per-segment means of ``(n_users,)`` per-user metrics, with bootstrap CIs.

    per_user: ``{metric name: (n_users,) values}`` (``NaN``: undefined for that user), rows
        aligned with ``segmentation``.
    Returns ``{segment: {"n_users": int, "metrics": {metric: BootstrapCI.to_dict()}}}`` in the
    segmentation's order; an empty segment has ``NaN`` means and ``n_users`` 0. Each CI's
    ``n_users`` counts the users the metric is defined for.
    """
    arrays = {name: _aligned(values, len(segmentation), name) for name, values in per_user.items()}
    sizes = segmentation.sizes()
    out: dict[str, dict[str, Any]] = {}
    for segment in segmentation.names:
        mask = segmentation.mask(segment)
        out[segment] = {
            "n_users": sizes[segment],
            "metrics": {
                name: bootstrap_ci(
                    values[mask], n_boot=n_boot, confidence=confidence, seed=seed
                ).to_dict()
                for name, values in arrays.items()
            },
        }
    return out


def bucket_metrics(
    recommended: ArrayLike,
    relevant: sp.spmatrix | sp.sparray,
    buckets: Segmentation,
    ks: Sequence[int] = (10,),
    *,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Recall and hit rate against each popularity bucket's relevant items, and list share.

    recommended: (n_users, K) item indices, ``-1`` padded; relevant: (n_users, n_items) sparse;
    buckets: an item :class:`Segmentation` over those ``n_items`` (see
    :func:`item_popularity_buckets`).
    For bucket ``b``, ``recall@k`` and ``hit_rate@k`` use only the relevant items in ``b`` (users
    with none are left out: their ``n_users`` in the CI says how many remain), and
    ``exposure_share@k`` is the share of the filled top-``k`` slots that hold items of ``b``.
    Returns ``{bucket: {"n_users": users with a relevant item in b, "exposure_share@k": float,
    "metrics": {"recall@k" | "hit_rate@k": BootstrapCI.to_dict()}}}``.
    """
    if len(buckets) != relevant.shape[1]:
        raise DataError(
            f"buckets cover {len(buckets)} items but relevant has {relevant.shape[1]} columns"
        )
    rec = np.asarray(recommended)
    if rec.ndim != 2:
        raise DataError(f"recommended must be 2-D (n_users, K), got shape {rec.shape}")
    if isinstance(ks, int) or len(ks) == 0:
        raise DataError(f"ks must be a non-empty sequence of cutoffs, got {ks!r}")
    cutoffs = sorted({int(k) for k in ks})
    if cutoffs[0] < 1 or cutoffs[-1] > rec.shape[1]:
        raise DataError(f"cutoffs {cutoffs} must lie in 1..{rec.shape[1]} (columns of recommended)")
    if rec.size and (rec.min() < PADDING or rec.max() >= len(buckets)):
        raise DataError(
            f"recommended holds items {rec.min()}..{rec.max()}, outside the {len(buckets)} "
            f"bucketed items (or {PADDING} for padding)"
        )
    rel = sp.csr_matrix(relevant)
    # The bucket of every slot; padding gets -1 and belongs to no bucket.
    slot_bucket = np.where(rec == PADDING, -1, buckets.codes[np.where(rec == PADDING, 0, rec)])
    out: dict[str, dict[str, Any]] = {}
    for code, bucket in enumerate(buckets.names):
        in_bucket = (buckets.codes == code).astype(np.float32)
        rel_bucket = sp.csr_matrix(rel @ sp.diags(in_bucket))
        rel_bucket.eliminate_zeros()
        entry: dict[str, Any] = {"n_users": int(np.count_nonzero(np.diff(rel_bucket.indptr)))}
        per_user: dict[str, npt.NDArray[np.float64]] = {}
        for k in cutoffs:
            filled = slot_bucket[:, :k] >= 0
            n_filled = int(filled.sum())
            in_slots = int((slot_bucket[:, :k] == code).sum())
            entry[f"exposure_share@{k}"] = in_slots / n_filled if n_filled else float("nan")
            per_user[f"recall@{k}"] = recall_at_k(rec, rel_bucket, k)
            per_user[f"hit_rate@{k}"] = hit_rate_at_k(rec, rel_bucket, k)
        entry["metrics"] = {
            name: bootstrap_ci(values, n_boot=n_boot, confidence=confidence, seed=seed).to_dict()
            for name, values in per_user.items()
        }
        out[bucket] = entry
    return out


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _counts(values: ArrayLike, name: str) -> NDArray[np.float64]:
    counts = np.asarray(values, dtype=np.float64)
    if counts.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {counts.shape}")
    if counts.size and (not np.isfinite(counts).all() or counts.min() < 0):
        raise DataError(f"{name} must be finite and >= 0, got min {counts.min()}")
    return counts


def _aligned(values: ArrayLike, n: int, name: str) -> NDArray[np.float64]:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (n,):
        raise DataError(f"metric {name!r} has shape {array.shape}; the segmentation has {n} users")
    return array
