"""The ranker's training set, built the way the funnel sees it.

One request per user at the *cut* (:func:`label_cut`: the first timestamp of the label window,
or, when the label window interleaves with the history as in a random split or an untimed log,
the moment after the last history event):

1. the user's state is their history strictly before the cut (``UserBatch`` with ``now = cut``);
2. the retrieval stage (trained on data before the cut) retrieves the merged candidates, with
   every item the user engaged with before the cut excluded, exactly as at serving time;
3. a candidate the user engages with in the label window is a positive (label 1); a retrieved
   candidate they do not engage with is a *hard negative* (label 0): the confusable items the
   ranker must learn to push down;
4. positives the retrieval missed are added as extra rows, so the ranker also learns from them,
   and ``sampled_negative_ratio`` random items per positive are added as easy negatives
   (uniform or popularity-weighted, never a positive, a seen item or a retrieved candidate,
   never an item released after the cut). Both kinds are appended to the merged list with
   NaN scores and -1 ranks ("no source retrieved it") and go through the same
   :func:`~ranking.features.assemble` as every other row;
5. class imbalance: retrieved negatives are down-sampled to at most ``max_retrieved_negatives``
   per user (seeded), and/or positives are up-weighted per row (``weighting="balanced"``);
6. users whose rows hold no positive are dropped: a LambdaRank group without a positive has no
   pair to order and carries no signal.

Features read only the history and a feature store fitted with ``as_of <= cut``: label-window
events decide labels and which extra rows exist, never a feature value (tested by changing the
label window and comparing features bit for bit).

A group is one user, so splitting by group (:func:`split_groups`) is a user-disjoint split.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from data.catalog import UNKNOWN_TIME, ItemCatalog
from data.errors import DataError
from data.interactions import Interactions
from data.negatives import sample_negatives
from data.validation import fraction, integer, non_negative_int, one_of, positive_int
from ranking.features import FeatureStore, assemble
from retrieval.base import PAD_ITEM, UserBatch
from retrieval.merge import ABSENT_RANK, MergedCandidates
from retrieval.stage import RetrievalStage
from retrieval.topk import concatenated_ranges

NegativeSampling = Literal["popularity", "uniform"]
Weighting = Literal["none", "balanced"]


@dataclass(frozen=True)
class TrainingSetConfig:
    """How the training set is built (see the module docstring).

    sampled_negative_ratio: random (easy) negatives per positive, added next to the retrieved
        hard negatives; 4 is the cheap end of the usual 4:1-10:1 (0: none).
    negative_sampling: ``"popularity"`` draws items in proportion to ``count ** exponent`` in the
        history (harder: popular items the user skipped), ``"uniform"`` over released items.
    popularity_exponent: 0.75, word2vec's smoothing between uniform (0) and raw popularity (1).
    max_retrieved_negatives: hard negatives kept per user, a seeded random subset (``None``:
        all). 100 of ~500 keeps the set five times smaller with the confusable items still in it.
    add_missed_positives: add the positives that retrieval did not return as extra rows.
    weighting: ``"none"`` (every row 1) or ``"balanced"``: positives weighted
        ``n_negatives / n_positives`` of their group, so each group's positives and negatives
        weigh the same (matters for pointwise losses; LambdaRank only orders within a group).
    batch_users: users assembled at once; bounds memory to about
        ``batch_users * n_candidates * n_features * 4`` bytes (1024 x 500 x 50: ~100 MB).
    seed: every random choice (sampled negatives, down-sampling) derives from it.
    """

    sampled_negative_ratio: int = 4
    negative_sampling: NegativeSampling = "popularity"
    popularity_exponent: float = 0.75
    max_retrieved_negatives: int | None = 100
    add_missed_positives: bool = True
    weighting: Weighting = "none"
    batch_users: int = 1_024
    seed: int = 0

    def __post_init__(self) -> None:
        non_negative_int(self.sampled_negative_ratio, "TrainingSetConfig.sampled_negative_ratio")
        one_of(
            self.negative_sampling,
            "TrainingSetConfig.negative_sampling",
            get_args(NegativeSampling),
        )
        fraction(self.popularity_exponent, "TrainingSetConfig.popularity_exponent")
        integer(
            self.max_retrieved_negatives,
            "TrainingSetConfig.max_retrieved_negatives",
            minimum=0,
            none_ok=True,
        )
        one_of(self.weighting, "TrainingSetConfig.weighting", get_args(Weighting))
        positive_int(self.batch_users, "TrainingSetConfig.batch_users")


@dataclass(frozen=True, eq=False)
class TrainingSet:
    """Rows grouped by user (contiguous), ready for a learning-to-rank model.

    values:      (N, F) float32 features (``names``)
    labels:      (N,) float32, 1 = engaged in the label window
    groups:      (G,) int64 rows per group, in row order (LightGBM's ``group``)
    weights:     (N,) float32 row weights
    names:       (F,) feature names
    group_users: (G,) int32 user index of each group
    item_idx:    (N,) int32 item of each row
    retrieved:   (N,) bool, the row is a retrieved candidate (else a missed positive or a
                 sampled negative)
    cut:         seconds UTC, the request time of every group (start of the label window)
    """

    values: npt.NDArray[np.float32]
    labels: npt.NDArray[np.float32]
    groups: npt.NDArray[np.int64]
    weights: npt.NDArray[np.float32]
    names: tuple[str, ...]
    group_users: npt.NDArray[np.int32]
    item_idx: npt.NDArray[np.int32]
    retrieved: npt.NDArray[np.bool_]
    cut: int

    def __post_init__(self) -> None:
        n = self.values.shape[0]
        if self.values.ndim != 2 or self.values.shape[1] != len(self.names):
            raise DataError(f"values {self.values.shape} do not match {len(self.names)} names")
        lengths = {a.shape[0] for a in (self.labels, self.weights, self.item_idx, self.retrieved)}
        if lengths != {n} or int(self.groups.sum()) != n:
            raise DataError(
                f"{n} rows but row arrays of lengths {sorted(lengths)} and groups summing to "
                f"{int(self.groups.sum())}"
            )
        if self.group_users.shape != self.groups.shape:
            raise DataError(f"{self.groups.size} groups but {self.group_users.size} group users")

    @property
    def n_rows(self) -> int:
        return int(self.values.shape[0])

    @property
    def n_groups(self) -> int:
        return int(self.groups.shape[0])

    @property
    def offsets(self) -> npt.NDArray[np.int64]:
        """(G + 1,) int64 first row of each group, then ``n_rows``."""
        return np.concatenate([[0], np.cumsum(self.groups)]).astype(np.int64)

    def retrieved_only(self) -> TrainingSet:
        """The rows retrieval returned (no missed positives, no sampled negatives), groups kept
        in order and emptied ones dropped: the candidates a served request would rank."""
        keep = self.retrieved
        group_of = np.repeat(np.arange(self.n_groups), self.groups)
        sizes = np.bincount(group_of[keep], minlength=self.n_groups).astype(np.int64)
        present = sizes > 0
        return TrainingSet(
            self.values[keep],
            self.labels[keep],
            sizes[present],
            self.weights[keep],
            self.names,
            self.group_users[present],
            self.item_idx[keep],
            self.retrieved[keep],
            self.cut,
        )

    def take_groups(self, group_index: npt.ArrayLike) -> TrainingSet:
        """The sub-set of the given groups, in the given order."""
        index = np.asarray(group_index, dtype=np.int64)
        offsets = self.offsets
        rows = concatenated_ranges(offsets[index], self.groups[index])
        return TrainingSet(
            self.values[rows],
            self.labels[rows],
            self.groups[index],
            self.weights[rows],
            self.names,
            self.group_users[index],
            self.item_idx[rows],
            self.retrieved[rows],
            self.cut,
        )

    def describe(self) -> dict[str, float]:
        """Counts for logs and reports (rows, groups, positives, how many retrieval found)."""
        positives = self.labels > 0
        return {
            "groups": float(self.n_groups),
            "rows": float(self.n_rows),
            "features": float(len(self.names)),
            "positives": float(positives.sum()),
            "positive_rate": float(positives.mean()) if self.n_rows else float("nan"),
            "positives_retrieved_share": (
                float(self.retrieved[positives].mean()) if positives.any() else float("nan")
            ),
            "retrieved_negatives": float((self.retrieved & ~positives).sum()),
            "sampled_negatives": float((~self.retrieved & ~positives).sum()),
        }


def split_groups(
    training: TrainingSet, valid_fraction: float, seed: int
) -> tuple[TrainingSet, TrainingSet | None]:
    """A seeded, user-disjoint (train, valid) split by group; ``None`` valid when too small.

    ``round(n_groups * valid_fraction)`` groups go to validation, at least one group stays in
    training; both keep the original group order.
    """
    fraction(valid_fraction, "valid_fraction", high_open=True)
    n_valid = min(round(training.n_groups * valid_fraction), training.n_groups - 1)
    if n_valid <= 0:
        return training, None
    permutation = np.random.default_rng(seed).permutation(training.n_groups)
    valid = np.sort(permutation[:n_valid])
    train = np.sort(permutation[n_valid:])
    return training.take_groups(train), training.take_groups(valid)


def group_ndcg(
    scores: npt.ArrayLike, labels: npt.ArrayLike, groups: npt.ArrayLike, k: int
) -> npt.NDArray[np.float64]:
    """(G,) NDCG@k of each group's rows ordered by ``scores`` (gain ``2**label - 1``).

    Ties keep row order; NaN scores rank last; a group without a positive gets NaN. Vectorized:
    the groups are padded into one (G, max group size) matrix.
    """
    score = np.asarray(scores, dtype=np.float64)
    label = np.asarray(labels, dtype=np.float64)
    sizes = np.asarray(groups, dtype=np.int64)
    if score.shape != label.shape or int(sizes.sum()) != score.shape[0]:
        raise DataError(
            f"{score.shape[0]} scores, {label.shape[0]} labels, "
            f"groups summing to {int(sizes.sum())}"
        )
    if sizes.size == 0:
        return np.zeros(0, dtype=np.float64)
    group_of = np.repeat(np.arange(sizes.size), sizes)
    position = np.arange(score.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    padded_scores = np.full((sizes.size, int(sizes.max())), -np.inf)
    padded_scores[group_of, position] = np.where(np.isnan(score), -np.inf, score)
    gains = np.zeros_like(padded_scores)
    gains[group_of, position] = 2.0**label - 1.0
    order = np.argsort(-padded_scores, axis=1, kind="stable")[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, order.shape[1] + 2))
    dcg = np.take_along_axis(gains, order, axis=1) @ discounts
    ideal = -np.sort(-gains, axis=1)[:, : order.shape[1]] @ discounts
    return np.divide(dcg, ideal, out=np.full_like(dcg, np.nan), where=ideal > 0)


# ------------------------------------------------------------------------------------ building
def build_training_set(
    retrieval_stage: RetrievalStage,
    feature_store: FeatureStore,
    history_log: Interactions,
    label_log: Interactions,
    catalog: ItemCatalog,
    config: TrainingSetConfig | None = None,
) -> TrainingSet:
    """Build the ranker's training set (see the module docstring).

    history_log: events before the label window (later events are ignored), the id maps of the
        retrieval stage; label_log: the label window, same id maps; ``feature_store`` fitted with
        ``as_of <= cut`` (``cut = label_cut(history_log, label_log)``); ``catalog`` aligned with
        the item map (release times decide which items can be sampled as negatives).
    """
    config = config if config is not None else TrainingSetConfig()
    _check_inputs(feature_store, history_log, label_log, catalog)
    cut = label_cut(history_log, label_log)
    if feature_store.as_of_ > cut:
        raise DataError(
            f"the feature store is as of {feature_store.as_of_}, after the label window starts "
            f"({cut}): its features would read labels; fit it with as_of={cut}"
        )
    history = history_log.before(cut)
    n_items = history.n_items
    seen = _binary(history.matrix)
    relevant = _binary(label_log.matrix)
    relevant = _binary(relevant - relevant.multiply(seen))  # re-engagements cannot be retrieved
    users = np.flatnonzero(np.diff(relevant.indptr) > 0).astype(np.int32)
    if users.size == 0:
        raise DataError(
            f"the label window ({len(label_log)} events from {cut}) holds no item that its user "
            "had not engaged with before: no positive to learn from"
        )
    state = UserBatch.from_interactions(
        history, users, history_length=retrieval_stage.config.history_length, now=cut
    )
    sampling_counts = _sampling_counts(history, catalog, cut, config)
    rng = np.random.default_rng(config.seed)
    parts: list[_Rows] = []
    for start in range(0, users.size, config.batch_users):
        rows = np.arange(start, min(start + config.batch_users, users.size))
        batch_users = users[rows]
        parts.append(
            _batch_rows(
                retrieval_stage,
                feature_store,
                state.take(rows),
                seen[batch_users],
                relevant[batch_users],
                sampling_counts,
                n_items,
                config,
                rng,
            )
        )
    return _finish(parts, users, cut, config)


def label_cut(history_log: Interactions, label_log: Interactions) -> int:
    """The request time of the ranker's training groups, seconds UTC.

    A temporal label window (it starts after the history ends) is asked at its first event, as a
    request at that moment would be. A window whose events interleave with the history (a random
    split, or an untimed log whose events all share one time) has no such moment: cutting the
    history at its first event would drop most of every user's state (all of it on an untimed
    log), so the groups are asked just after the last history event instead. Either way the
    features read only ``history_log``; the label events stay labels.
    """
    if len(label_log) == 0:
        raise DataError("the label window is empty")
    first_label = int(label_log.timestamp[0])  # logs are sorted by time
    last_history = int(history_log.timestamp[-1]) if len(history_log) else first_label - 1
    return first_label if first_label > last_history else last_history + 1


@dataclass(frozen=True)
class _Rows:
    """The selected rows of one batch, user-major; ``user_row`` indexes the batch's users."""

    values: npt.NDArray[np.float32]
    labels: npt.NDArray[np.float32]
    user_row: npt.NDArray[np.int64]
    item_idx: npt.NDArray[np.int32]
    retrieved: npt.NDArray[np.bool_]
    names: tuple[str, ...]
    n_users: int


def _batch_rows(
    stage: RetrievalStage,
    store: FeatureStore,
    users: UserBatch,
    seen: sp.csr_matrix,
    relevant: sp.csr_matrix,
    sampling_counts: npt.NDArray[np.float64] | None,
    n_items: int,
    config: TrainingSetConfig,
    rng: np.random.Generator,
) -> _Rows:
    """Retrieve, label, extend with missed positives and sampled negatives, assemble, select."""
    n = len(users)
    merged = stage.retrieve(users, exclude=seen)
    candidates = merged.item_idx
    is_candidate = candidates != PAD_ITEM
    labels = _lookup(relevant, candidates) & is_candidate

    # Extra rows, appended to the users' candidate lists: (user row, item, label) per kind.
    rel = relevant.tocoo()
    extras: list[tuple[npt.NDArray[np.integer], npt.NDArray[np.integer], bool]] = []
    if config.add_missed_positives:
        retrieved_pairs = _pairs_matrix(candidates, n, n_items)
        missed = ~_lookup(retrieved_pairs, np.c_[rel.row, rel.col], rows=True)
        extras.append((rel.row[missed], rel.col[missed], True))
    if config.sampled_negative_ratio and sampling_counts is not None:
        neg_user, neg_item = _sample(rel, seen, candidates, sampling_counts, n_items, config, rng)
        extras.append((neg_user, neg_item, False))
    extended, extra_labels = _extend(merged, extras)
    features = assemble(store, stage, users, extended, now=users.now)

    m = candidates.shape[1]
    keep = features.valid.copy()
    keep[:, :m] &= labels | _downsample(is_candidate & ~labels, config, rng)
    all_labels = np.concatenate([labels, extra_labels], axis=1)
    retrieved = np.zeros(keep.shape, dtype=bool)
    retrieved[:, :m] = True
    user_row = np.broadcast_to(np.arange(n)[:, None], keep.shape)
    return _Rows(
        values=features.values[keep],
        labels=all_labels[keep].astype(np.float32),
        user_row=user_row[keep].astype(np.int64),
        item_idx=extended.item_idx[keep],
        retrieved=retrieved[keep],
        names=features.names,
        n_users=n,
    )


def _finish(
    parts: list[_Rows], users: npt.NDArray[np.int32], cut: int, config: TrainingSetConfig
) -> TrainingSet:
    """Concatenate the batches, drop groups without a positive, set the row weights."""
    offset = np.cumsum([0] + [p.n_users for p in parts])
    user_row = np.concatenate([p.user_row + o for p, o in zip(parts, offset, strict=False)])
    labels = np.concatenate([p.labels for p in parts])
    n_users = users.size
    sizes = np.bincount(user_row, minlength=n_users)
    positives = np.bincount(user_row, weights=labels, minlength=n_users)
    has_positive = positives > 0
    keep = has_positive[user_row]
    weights = np.ones(labels.size, dtype=np.float32)
    if config.weighting == "balanced":
        ratio = (sizes - positives) / np.maximum(positives, 1)
        weights = np.where(labels > 0, ratio[user_row], 1.0).astype(np.float32)
    return TrainingSet(
        values=np.concatenate([p.values for p in parts])[keep],
        labels=labels[keep],
        groups=sizes[has_positive].astype(np.int64),
        weights=weights[keep],
        names=parts[0].names,
        group_users=users[has_positive],
        item_idx=np.concatenate([p.item_idx for p in parts])[keep],
        retrieved=np.concatenate([p.retrieved for p in parts])[keep],
        cut=cut,
    )


def _extend(
    merged: MergedCandidates,
    extras: list[tuple[npt.NDArray[np.integer], npt.NDArray[np.integer], bool]],
) -> tuple[MergedCandidates, npt.NDArray[np.bool_]]:
    """``merged`` with extra items appended to their user's row (no source: NaN score, -1 rank).

    extras: (user rows, items, label) groups. Returns the extended candidates (n, m + e) and the
    (n, e) labels of the appended columns (padding where a user has fewer than e extras).
    """
    n = merged.item_idx.shape[0]
    nothing = np.zeros(0, dtype=np.int64)
    user_row = np.concatenate([nothing, *(u for u, _, _ in extras)]).astype(np.int64)
    item_idx = np.concatenate([nothing, *(i for _, i, _ in extras)]).astype(np.int32)
    labels = np.concatenate([nothing.astype(bool), *(np.full(u.size, y) for u, _, y in extras)])
    order = np.argsort(user_row, kind="stable")
    user_row, item_idx, labels = user_row[order], item_idx[order], labels[order]
    per_user = np.bincount(user_row, minlength=n)
    width = int(per_user.max(initial=0))
    slot = np.arange(user_row.size) - np.repeat(np.cumsum(per_user) - per_user, per_user)
    items = np.full((n, width), PAD_ITEM, dtype=np.int32)
    items[user_row, slot] = item_idx
    extra_labels = np.zeros((n, width), dtype=bool)
    extra_labels[user_row, slot] = labels
    n_sources = len(merged.sources)
    extended = MergedCandidates(
        np.concatenate([merged.item_idx, items], axis=1),
        np.concatenate(
            [merged.source_scores, np.full((n, width, n_sources), np.nan, np.float32)], axis=1
        ),
        np.concatenate(
            [merged.source_ranks, np.full((n, width, n_sources), ABSENT_RANK, np.int32)], axis=1
        ),
        merged.sources,
    )
    return extended, extra_labels


def _sample(
    relevant: sp.coo_matrix,
    seen: sp.csr_matrix,
    candidates: npt.NDArray[np.int32],
    counts: npt.NDArray[np.float64],
    n_items: int,
    config: TrainingSetConfig,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
    """Sampled negatives (user row, item): ``ratio`` per positive, deduplicated, never a
    positive, a seen item, a retrieved candidate or an item with a zero sampling weight."""
    cand_rows, cand_cols = np.nonzero(candidates != PAD_ITEM)
    seen_coo = seen.tocoo()
    block_users = np.concatenate([seen_coo.row, cand_rows]).astype(np.int64)
    block_items = np.concatenate([seen_coo.col, candidates[cand_rows, cand_cols]]).astype(np.int64)
    # sample_negatives refuses users for whom nothing is drawable (a tiny catalogue fully
    # retrieved or seen); they simply get no sampled negatives.
    drawable = counts > 0
    keys = np.unique(
        np.concatenate([block_users, relevant.row.astype(np.int64)]) * n_items
        + np.concatenate([block_items, relevant.col.astype(np.int64)])
    )
    blocked_drawable = np.bincount(
        (keys // n_items)[drawable[keys % n_items]], minlength=relevant.shape[0]
    )
    ok = blocked_drawable[relevant.row] < int(drawable.sum())
    if not ok.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    exponent = config.popularity_exponent if config.negative_sampling == "popularity" else 0.0
    neg_user, neg_item = sample_negatives(
        relevant.row[ok],
        relevant.col[ok],
        n_items,
        config.sampled_negative_ratio,
        strategy="popularity",  # with exponent 0 and 0/1 counts: uniform over released items
        popularity_exponent=exponent,
        item_counts=counts,
        exclude=(block_users, block_items),
        rng=rng,
    )
    unique = np.unique(neg_user.astype(np.int64) * n_items + neg_item)
    return unique // n_items, (unique % n_items).astype(np.int32)


def _sampling_counts(
    history: Interactions, catalog: ItemCatalog, cut: int, config: TrainingSetConfig
) -> npt.NDArray[np.float64] | None:
    """(n_items,) sampling weights' base: history counts (popularity) or 1 (uniform), zero for
    items released after the cut; ``None`` when nothing can be drawn."""
    released = (catalog.created_at == UNKNOWN_TIME) | (catalog.created_at < cut)
    if config.negative_sampling == "popularity":
        counts = history.item_counts.astype(np.float64) * released
    else:
        counts = released.astype(np.float64)
    return counts if counts.any() else None


def _downsample(
    negatives: npt.NDArray[np.bool_], config: TrainingSetConfig, rng: np.random.Generator
) -> npt.NDArray[np.bool_]:
    """(n, m) bool: a random subset of at most ``max_retrieved_negatives`` per row."""
    cap = config.max_retrieved_negatives
    if cap is None:
        return negatives
    priority = np.where(negatives, rng.random(negatives.shape), np.inf)
    rank = np.argsort(np.argsort(priority, axis=1, kind="stable"), axis=1, kind="stable")
    return negatives & (rank < cap)


def _lookup(
    matrix: sp.csr_matrix, items: npt.NDArray[np.integer], *, rows: bool = False
) -> npt.NDArray[np.bool_]:
    """Whether ``matrix`` has an entry at each queried position.

    ``rows=False``: ``items`` is (n, m) item indices, row ``i`` queried in ``matrix`` row ``i``
    (padding is never found). ``rows=True``: ``items`` is (q, 2) (row, column) pairs.
    """
    n_cols = matrix.shape[1]
    indptr = matrix.indptr
    keys = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(indptr))
    keys = keys * n_cols + matrix.indices
    if rows:
        wanted = items[:, 0].astype(np.int64) * n_cols + items[:, 1]
        valid = np.ones(wanted.shape, dtype=bool)
    else:
        valid = (items >= 0) & (items < n_cols)
        wanted = np.arange(items.shape[0], dtype=np.int64)[:, None] * n_cols + np.where(
            valid, items, 0
        )
    if keys.size == 0:
        return np.zeros(wanted.shape, dtype=bool)
    position = np.searchsorted(keys, wanted).clip(max=keys.size - 1)
    return valid & (keys[position] == wanted)


def _pairs_matrix(items: npt.NDArray[np.int32], n: int, n_items: int) -> sp.csr_matrix:
    """(n, n_items) binary CSR with the non-padding entries of ``items`` (n, m)."""
    rows, cols = np.nonzero(items != PAD_ITEM)
    return _binary(
        sp.csr_matrix(
            (np.ones(rows.size, np.float32), (rows, items[rows, cols])), shape=(n, n_items)
        )
    )


def _binary(matrix: sp.spmatrix | sp.sparray) -> sp.csr_matrix:
    """``matrix`` as a canonical CSR (sorted, no duplicates, no zeros) with every entry 1."""
    out = sp.csr_matrix(matrix, dtype=np.float32)
    out.sum_duplicates()
    out.eliminate_zeros()
    out.data[:] = 1.0
    return out


def _check_inputs(
    store: FeatureStore, history: Interactions, labels: Interactions, catalog: ItemCatalog
) -> None:
    store._check_fitted()
    if len(labels) == 0:
        raise DataError("the label log is empty: there is nothing to learn from")
    if history.users != labels.users or history.items != labels.items:
        raise DataError(
            "history and label logs must share id maps (index the label window with the "
            f"history's maps): users {history.n_users} vs {labels.n_users}, items "
            f"{history.n_items} vs {labels.n_items}"
        )
    if catalog.n_items != history.n_items:
        raise DataError(
            f"catalog has {catalog.n_items} items but the logs' item map has {history.n_items}"
        )


# ------------------------------------------------------------------------------------ curves
CURVES_JSON = "curves.json"
CURVES_PNG = "curves.png"


def write_curves(
    directory: Path,
    panels: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    best: int | None,
    xlabel: str,
) -> tuple[Path, Path]:
    """Write a ranker's learning curves as ``curves.json`` and ``curves.png``.

    panels: {panel title: {series name: values per iteration / epoch}}, e.g.
        ``{"ndcg@10": {"train": [...], "valid": [...]}}``; one subplot per panel.
    best:   the iteration / epoch whose model was kept (1-based; a dotted line), if any.
    """
    directory.mkdir(parents=True, exist_ok=True)
    json_path, png_path = directory / CURVES_JSON, directory / CURVES_PNG
    document = {
        "xlabel": xlabel,
        "best": best,
        "panels": {
            title: {k: list(map(float, v)) for k, v in p.items()} for title, p in panels.items()
        },
    }
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    # The object API with an explicit Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5 * max(len(panels), 1), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, (title, series) in zip(axes, panels.items(), strict=False):
        for name, values in series.items():
            ax.plot(np.arange(1, len(values) + 1), values, label=name)
        if best:
            ax.axvline(best, color="grey", linestyle=":", linewidth=1)
        ax.set(title=title, xlabel=xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.savefig(png_path, dpi=100)
    return json_path, png_path


__all__ = [
    "TrainingSet",
    "TrainingSetConfig",
    "build_training_set",
    "label_cut",
    "group_ndcg",
    "split_groups",
    "write_curves",
]
