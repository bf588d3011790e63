"""``CoVisitationSource``: "people who interacted with this also interacted with ..." candidates.

Two events of the same user form a *pair* when they are at most ``max_gap`` events apart in that
user's time-ordered history and (optionally) at most ``window_seconds`` apart in time. A pair
``(a, b)`` (``a`` first) adds to ``C[a, b]`` (and to ``C[b, a]`` unless ``directional``)

    pair weight = gap_weight(gap) * (w_a + w_b) / 2,   gap_weight(g) = 1 / (1 + gap_decay * (g - 1))

so adjacent events count fully and further ones less (``gap_decay = 0``: plain counts), and a
purchase pair outweighs a click pair when the log's weights say so. Only the ``neighbors``
heaviest entries of each row are kept, as a sparse (n_items, n_items) matrix.

The build is vectorized: sort events by (user, time), pair each event with the one ``g`` places
later through shifted arrays for ``g = 1 .. max_gap``, and sum the pairs with a sparse COO -> CSR
conversion. Memory stays bounded on logs of tens of millions of events: rows are built in blocks
of about ``max_pairs_per_block`` pairs (a sort of the log by item makes each block one slice of
events, so every pair is still visited once), each block pruned to ``neighbors`` per row before
the next starts; a row cut by a block boundary (a very popular item) carries its partial sums,
at most one entry per item, into the next block.

Retrieval reads only the batch's ``recent_items``: a user's score vector is the position-decayed
sum of the neighbour rows of their recent items, so new events change the answer at once, known
user or not. History items themselves are never candidates; a user with no history gets none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from data.catalog import ItemCatalog
from data.configuration import from_mapping, to_mapping
from data.errors import NotFittedError
from data.interactions import Interactions
from data.validation import fraction, integer, non_negative_float, positive_int
from retrieval.base import Candidates, UserBatch
from retrieval.state_io import read_state, write_state
from retrieval.topk import (
    align_exclude,
    check_k,
    concatenated_ranges,
    entries_topk,
    prune_rows,
    sparse_topk,
)


@dataclass(frozen=True)
class CoVisitationConfig:
    """Hyperparameters of :class:`CoVisitationSource`.

    window_seconds: largest time between the two events of a pair; ``None``: no time limit
        (``max_gap`` alone decides). Default one day: events of one visit or of one day's visits
        are related, last month's are not.
    max_gap: pair each event with the next ``max_gap`` events of the same user (5: a short
        browsing context; the build costs one pass over the log per gap).
    gap_decay: pair weight ``1 / (1 + gap_decay * (gap - 1))``; 1.0 halves the weight of a pair
        two events apart relative to adjacent events; 0 counts every pair equally.
    directional: ``True`` keeps only "a, then b" (what comes next); ``False`` (default) counts the
        pair both ways (what goes together).
    neighbors: neighbours kept per item (50: enough to fill a candidate list from a few recent
        items, small enough that retrieval is a cheap sparse product).
    history_decay: weight of the ``p``-th most recent history item in retrieval is
        ``history_decay ** p`` (0.8: the last few events dominate, older ones still count).
    max_pairs_per_block: pairs summed at once while building; about 50 bytes each, so the
        default 2**22 keeps a block near 200 MB whatever the log size.
    """

    window_seconds: int | None = 86_400
    max_gap: int = 5
    gap_decay: float = 1.0
    directional: bool = False
    neighbors: int = 50
    history_decay: float = 0.8
    max_pairs_per_block: int = 1 << 22

    def __post_init__(self) -> None:
        for name in ("max_gap", "neighbors", "max_pairs_per_block"):
            positive_int(getattr(self, name), f"CoVisitationConfig.{name}")
        integer(self.window_seconds, "CoVisitationConfig.window_seconds", minimum=0, none_ok=True)
        non_negative_float(self.gap_decay, "CoVisitationConfig.gap_decay", finite=False)
        fraction(self.history_decay, "CoVisitationConfig.history_decay", low_open=True)


@dataclass(frozen=True)
class _Events:
    """The log sorted by (user, time): parallel (m,) arrays."""

    user: npt.NDArray[np.int32]
    item: npt.NDArray[np.int32]
    time: npt.NDArray[np.int64]
    weight: npt.NDArray[np.float32]


def co_visitation_matrix(log: Interactions, config: CoVisitationConfig) -> sp.csr_matrix:
    """(n_items, n_items) float32 CSR: pair weights, the top ``config.neighbors`` of each row.

    Work: one sort of the log by user and one by item, then each pair is visited once.
    Memory: the log, one byte per event and gap, and one block of ``max_pairs_per_block`` pairs.
    """
    # The log is sorted by time; a stable sort by user gives (user, time) order.
    order = np.argsort(log.user_idx, kind="stable")
    events = _Events(
        log.user_idx[order], log.item_idx[order], log.timestamp[order], log.weight[order]
    )
    n_items = log.n_items
    starts = _pair_starts(events, config)
    # Event positions grouped by item, so a block of source rows is one contiguous slice; blocks
    # are cut by pair count, so one very popular item may span several blocks.
    by_item = np.argsort(events.item, kind="stable")
    pairs_before = np.concatenate([[0], np.cumsum(_pairs_per_event(starts, config)[by_item])])
    if pairs_before[-1] == 0:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    cuts = np.unique(
        np.searchsorted(
            pairs_before, np.arange(0, pairs_before[-1], config.max_pairs_per_block), "right"
        )
        - 1
    )
    bounds = np.append(cuts, by_item.size)
    kept: list[sp.coo_matrix] = []
    # A row cut by a block boundary: its partial sums, carried into the next block (<= n_items).
    carry = sp.coo_matrix((1, n_items), dtype=np.float32)
    for begin, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        positions = by_item[begin:end]
        first = int(events.item[positions[0]])
        source, target, weight = _block_pairs(events, positions, starts, config)
        rows = np.concatenate([np.zeros(carry.nnz, np.int32), events.item[source] - first])
        block = sp.coo_matrix(
            (
                np.concatenate([carry.data, weight]),
                (rows, np.concatenate([carry.col, events.item[target]])),
            ),
            shape=(int(events.item[positions[-1]]) - first + 1, n_items),
        ).tocsr()  # COO -> CSR sums the repeated pairs
        continues = end < by_item.size and events.item[by_item[end]] == events.item[positions[-1]]
        if continues:
            carry = block[-1].tocoo()
            block = block[:-1]
        else:
            carry = sp.coo_matrix((1, n_items), dtype=np.float32)
        top = prune_rows(block, config.neighbors).tocoo()
        kept.append(sp.coo_matrix((top.data, (top.row + first, top.col)), shape=(n_items, n_items)))
    matrix = sp.csr_matrix(
        (
            np.concatenate([m.data for m in kept]),
            (np.concatenate([m.row for m in kept]), np.concatenate([m.col for m in kept])),
        ),
        shape=(n_items, n_items),
        dtype=np.float32,
    )
    matrix.sort_indices()
    return matrix


def _pair_starts(events: _Events, config: CoVisitationConfig) -> dict[int, npt.NDArray[np.bool_]]:
    """For each gap ``g``: (m,) bool, ``True`` at ``p`` when events ``p`` and ``p + g`` pair up.

    A pair: same user, different items, and at most ``window_seconds`` apart.
    """
    m = events.user.shape[0]
    starts = {}
    for gap in range(1, min(config.max_gap, m - 1) + 1):
        first, second = slice(0, m - gap), slice(gap, m)
        valid = np.zeros(m, dtype=bool)
        valid[first] = (events.user[first] == events.user[second]) & (
            events.item[first] != events.item[second]
        )
        if config.window_seconds is not None:
            valid[first] &= events.time[second] - events.time[first] <= config.window_seconds
        starts[gap] = valid
    return starts


def _pairs_per_event(
    starts: dict[int, npt.NDArray[np.bool_]], config: CoVisitationConfig
) -> npt.NDArray[np.int32]:
    """(m,) number of matrix entries whose source (row) is each event."""
    m = next(iter(starts.values())).size if starts else 0
    count = np.zeros(m, dtype=np.int32)
    for gap, valid in starts.items():
        count += valid
        if not config.directional:
            count[gap:] += valid[:-gap]
    return count


def _block_pairs(
    events: _Events,
    positions: npt.NDArray[np.intp],
    starts: dict[int, npt.NDArray[np.bool_]],
    config: CoVisitationConfig,
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """(source position, target position, pair weight) of every entry sourced at ``positions``."""
    sources, targets, weights = [], [], []
    for gap, valid in starts.items():
        gap_weight = np.float32(0.5 / (1.0 + config.gap_decay * (gap - 1)))
        earlier = positions[valid[positions]]  # the block's event is the first of the pair
        pairs = [(earlier, earlier + gap)]
        if not config.directional:  # ... or the second one, pointing back
            later = positions[positions >= gap]
            later = later[valid[later - gap]]
            pairs.append((later, later - gap))
        for source, target in pairs:
            sources.append(source)
            targets.append(target)
            weights.append((events.weight[source] + events.weight[target]) * gap_weight)
    return np.concatenate(sources), np.concatenate(targets), np.concatenate(weights)


class CoVisitationSource:
    """Item-to-item co-visitation candidates (see the module docstring).

    Learned state (after :meth:`fit`):
        neighbors_: (n_items, n_items) float32 CSR, row ``i`` holds the (at most
            ``config.neighbors``) co-visited items of ``i`` and their pair weights.
    """

    neighbors_: sp.csr_matrix

    def __init__(self, config: CoVisitationConfig | None = None, *, name: str = "covisit") -> None:
        self.config = config if config is not None else CoVisitationConfig()
        self.name = name

    @property
    def n_items(self) -> int:
        return int(self.neighbors_.shape[0])

    def fit(self, log: Interactions, catalog: ItemCatalog | None = None) -> Self:
        """Count co-visited pairs in ``log``. ``catalog`` is not used."""
        self.neighbors_ = co_visitation_matrix(log, self.config)
        return self

    def retrieve(
        self, users: UserBatch, k: int, *, exclude: sp.csr_matrix | None = None
    ) -> Candidates:
        """Top-``k`` co-visited items of each user's recent items, minus history and ``exclude``.

        score(u, j) = sum over history positions p of
        ``history_decay ** p * neighbors_[item_p, j]``. Users without (known) recent items get
        all padding.
        """
        self._check_fitted()
        k = check_k(k)
        n = len(users)
        rows, items, weights = self._history(users)
        keys, sums = self._expand(rows, items, weights)
        # A user's own recent items are not candidates for them.
        fresh = ~np.isin(keys, rows.astype(np.int64) * self.n_items + items)
        keys, sums = keys[fresh], sums[fresh]
        mask = align_exclude(exclude, n, self.n_items)
        return entries_topk(keys // self.n_items, keys % self.n_items, sums, n, k, mask)

    def neighbors(self, item_idx: npt.ArrayLike, k: int) -> Candidates:
        """The ``k`` items most co-visited with each of ``item_idx`` (m,): "similar items".

        Returns (m, k) candidates; an item outside the training catalogue gets padding.
        """
        self._check_fitted()
        k = check_k(k)
        items = np.asarray(item_idx, dtype=np.int64).ravel()
        known = (items >= 0) & (items < self.n_items)
        selector = sp.csr_matrix(
            (np.ones(int(known.sum()), np.float32), (np.flatnonzero(known), items[known])),
            shape=(items.size, self.n_items),
        )
        return sparse_topk(selector @ self.neighbors_, k, None)

    def _history(
        self, users: UserBatch
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int32], npt.NDArray[np.float64]]:
        """(row, item, ``history_decay ** position``) of every known recent item."""
        recent = users.recent_items
        rows, positions = np.nonzero((recent >= 0) & (recent < self.n_items))
        return rows, recent[rows, positions], self.config.history_decay ** positions.astype(float)

    def _expand(
        self,
        rows: npt.NDArray[np.intp],
        items: npt.NDArray[np.int32],
        weights: npt.NDArray[np.float64],
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """The weighted history times ``neighbors_`` as sorted ``row * n_items + item`` keys and
        their scores (sum over history entries of ``weight * neighbors_[item, :]``).

        Only the history items' neighbour lists are expanded and summed per (row, item):
        scipy's sparse product allocates a work array as wide as the catalogue on every call
        (milliseconds at 1M items, per request), and the top-k reads the entries as arrays.
        """
        neighbors = self.neighbors_
        starts = neighbors.indptr[items]
        lengths = neighbors.indptr[items + 1] - starts
        entries = concatenated_ranges(starts, lengths)
        owner = np.repeat(np.arange(items.size), lengths)
        keys = rows[owner].astype(np.int64) * self.n_items + neighbors.indices[entries]
        values = neighbors.data[entries].astype(np.float64) * weights[owner]
        unique_keys, slot = np.unique(keys, return_inverse=True)
        sums = np.bincount(slot, weights=values, minlength=unique_keys.size)
        return unique_keys, sums.astype(np.float64, copy=False)  # (float64 already: for typing)

    def _check_fitted(self) -> None:
        if not hasattr(self, "neighbors_"):
            raise NotFittedError(f"{type(self).__name__} {self.name!r}: call fit() first")

    def save(self, directory: Path) -> None:
        """Write ``config.json`` and ``state.npz`` (the CSR arrays of ``neighbors_``)."""
        self._check_fitted()
        meta = {"name": self.name, "config": to_mapping(self.config), "n_items": self.n_items}
        arrays = {
            "data": self.neighbors_.data,
            "indices": self.neighbors_.indices,
            "indptr": self.neighbors_.indptr,
        }
        write_state(directory, type(self).__name__, meta, arrays)

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Read a directory written by :meth:`save`; ``BundleError`` if missing or corrupt."""
        meta, arrays = read_state(directory, cls.__name__)
        config = from_mapping(CoVisitationConfig, meta["config"], cls.__name__)
        source = cls(config, name=meta["name"])
        n_items = int(meta["n_items"])
        source.neighbors_ = sp.csr_matrix(
            (arrays["data"], arrays["indices"], arrays["indptr"]), shape=(n_items, n_items)
        )
        return source
