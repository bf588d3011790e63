"""The re-ranking rules, and the working list they act on.

A rule has one job and a frozen config (:mod:`reranking.config`). It takes the batch's
:class:`Slate` and returns a new one; rules only **remove** entries or **reorder** them (pins with
``insert_if_absent`` are the one documented exception). The engine (:mod:`reranking.engine`) runs
them in the configured order and turns the difference between consecutive slates into the
per-rule explanation.

Vocabulary:

* **Slate**: ``n`` rows (users) of ``w`` columns; column ``j`` of a row *is* position ``j`` of the
  user's list. Valid entries come first, ``PAD_ITEM`` (-1) fills the rest.
* **Locked entries**: a positional rule (pins, exploration) locks the entry it places. Later
  rules reorder only the *free* entries around locked ones, which keep their position (a filter
  still removes a locked entry: a blocked item is never shown, pinned or not). When removals
  leave a row shorter than a lock's position, the lock moves up just enough to keep the row free
  of holes.

Filters are numpy masks over the whole batch; caps, boosts and freshness are vectorized too.
MMR's greedy selection runs for every user at once, one step per slot of the top ``k``.
Exploration alone loops over users, for their own seeded random generators.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from data.catalog import UNKNOWN_TIME, ItemCatalog
from data.errors import ConfigError, DataError
from data.idmap import UNKNOWN_INDEX, IdMap
from reranking.config import (
    BoostConfig,
    CategoryCapConfig,
    ExplorationConfig,
    FilterBlockedConfig,
    FilterExcludedConfig,
    FilterSeenConfig,
    FilterUnavailableConfig,
    FreshnessBoostConfig,
    MMRConfig,
    PinsConfig,
    RuleConfig,
)

PAD_ITEM = -1
"""Item index of an empty slot (the end of a short row)."""
PAD_SCORE = -np.inf
"""Score of an empty slot."""
SECONDS_PER_DAY = 86_400
_UINT64 = 2**64  # SeedSequence takes non-negative entropy: keys are taken modulo 2**64.
# MMR works on (rows, n_candidates, d) arrays; a chunk of 1024 rows bounds them (1024 x 100 x 64
# float32 is 26 MB) while a serving batch, and most offline batches, run in one piece.
_MMR_ROWS_PER_CHUNK = 1024

IntArray = npt.NDArray[np.int32]
FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]
PerRowItems: TypeAlias = sp.csr_matrix | sp.csr_array | Sequence[npt.ArrayLike]
"""Items per user: an (n, n_items) sparse matrix (any stored entry counts) or n index arrays."""


# ------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class ItemSideInfo:
    """What the rules know about every item, indexed by item index.

    primary_category: (n_items,) int32, -1 for no category.
    created_at:       (n_items,) int64 seconds UTC, ``UNKNOWN_TIME`` (0) when not known.
    available:        (n_items,) bool, or ``None`` for "every item is available".
    embeddings:       (n_items, d) float32 for MMR's cosine similarity, or ``None``.
    """

    primary_category: IntArray
    created_at: npt.NDArray[np.int64]
    available: BoolArray | None = None
    embeddings: FloatArray | None = None

    def __post_init__(self) -> None:
        n = self.primary_category.shape[0]
        if self.primary_category.ndim != 1 or self.created_at.shape != (n,):
            raise DataError(
                f"primary_category {self.primary_category.shape} and created_at "
                f"{self.created_at.shape} must be equal 1-d shapes (n_items,)"
            )
        if self.available is not None and self.available.shape != (n,):
            raise DataError(f"available has shape {self.available.shape}, expected ({n},)")
        if self.embeddings is not None and (
            self.embeddings.ndim != 2 or self.embeddings.shape[0] != n
        ):
            raise DataError(f"embeddings have shape {self.embeddings.shape}, expected ({n}, d)")

    @property
    def n_items(self) -> int:
        return int(self.primary_category.shape[0])

    @classmethod
    def from_catalog(
        cls,
        catalog: ItemCatalog,
        *,
        available: npt.ArrayLike | None = None,
        embeddings: npt.ArrayLike | None = None,
    ) -> ItemSideInfo:
        """The side info of ``catalog`` (categories, release times) plus optional extras."""
        return cls(
            catalog.primary_category,
            catalog.created_at,
            None if available is None else np.asarray(available, dtype=bool),
            None if embeddings is None else np.asarray(embeddings, dtype=np.float32),
        )


@dataclass(frozen=True)
class RerankRequest:
    """What is particular to the ``n`` requests of a batch.

    now:          (n,) int64 seconds UTC, the time of each request (freshness).
    seen:         items each user already interacted with (:data:`PerRowItems`), or ``None``.
    exclude:      items each request asks to leave out (:data:`PerRowItems`), or ``None``.
    user_keys:    (n,) int64, a stable integer per user (the user index, or a hash of the id of a
                  user unknown at training). Exploration needs it: with ``request_keys`` and
                  ``seed`` it seeds the user's draw, so the draw is the same whichever batch the
                  user is in.
    request_keys: (n,) int64 telling apart requests of one user (``None``: all 0, so a user gets
                  the same exploration items until the seed changes).
    seed:         non-negative int, the exploration seed.
    """

    now: npt.NDArray[np.int64]
    seen: PerRowItems | None = None
    exclude: PerRowItems | None = None
    user_keys: npt.NDArray[np.int64] | None = None
    request_keys: npt.NDArray[np.int64] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        now = np.asarray(self.now)
        if now.ndim != 1 or not np.issubdtype(now.dtype, np.integer):
            raise DataError(f"now must be (n,) integer seconds, got {now.dtype} {now.shape}")
        object.__setattr__(self, "now", now.astype(np.int64, copy=False))
        n = now.shape[0]
        for name in ("user_keys", "request_keys"):
            keys = getattr(self, name)
            if keys is None:
                continue
            keys = np.asarray(keys)
            if keys.shape != (n,) or not np.issubdtype(keys.dtype, np.integer):
                raise DataError(f"{name} must be ({n},) integers, got {keys.dtype} {keys.shape}")
            object.__setattr__(self, name, keys.astype(np.int64, copy=False))
        for name in ("seen", "exclude"):
            _check_per_row(getattr(self, name), n, name)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer):
            raise DataError(f"seed must be an integer, got {self.seed!r}")
        if self.seed < 0:
            raise DataError(f"seed must be non-negative, got {self.seed}")

    def __len__(self) -> int:
        return int(self.now.shape[0])

    def take(self, rows: npt.ArrayLike) -> RerankRequest:
        """The requests of the given rows (same order)."""
        index = np.asarray(rows, dtype=np.intp)
        return RerankRequest(
            self.now[index],
            _take_per_row(self.seen, index),
            _take_per_row(self.exclude, index),
            None if self.user_keys is None else self.user_keys[index],
            None if self.request_keys is None else self.request_keys[index],
            self.seed,
        )


def _check_per_row(value: PerRowItems | None, n: int, name: str) -> None:
    if value is None:
        return
    if sp.issparse(value):
        rows = value.shape[0]  # type: ignore[union-attr]  # issparse narrows at run time only
        if rows != n:
            raise DataError(f"{name} has {rows} rows for {n} requests")
    elif len(value) != n:
        raise DataError(f"{name} has {len(value)} item lists for {n} requests")


def _take_per_row(value: PerRowItems | None, rows: npt.NDArray[np.intp]) -> PerRowItems | None:
    if value is None:
        return None
    if sp.issparse(value):
        return sp.csr_matrix(value)[rows]
    return [value[int(r)] for r in rows]


def per_row_mask(items: IntArray, per_row: PerRowItems | None) -> BoolArray:
    """(n, w) bool: which entries of ``items`` (n, w) appear in their row of ``per_row``.

    One membership test over (row, item) keys for the whole batch; padding never matches.
    """
    if per_row is None:
        return np.zeros(items.shape, dtype=bool)
    if isinstance(per_row, sp.csr_matrix | sp.csr_array):
        # Read straight from the CSR arrays: scipy's COO conversion costs ~0.25 ms a request.
        stored = np.diff(per_row.indptr)
        rows = np.repeat(np.arange(stored.size, dtype=np.int64), stored)
        cols = per_row.indices[: rows.size].astype(np.int64)
    elif sp.issparse(per_row):
        coo = sp.coo_matrix(per_row)
        rows, cols = coo.row.astype(np.int64), coo.col.astype(np.int64)
    else:
        arrays = [np.asarray(a, dtype=np.int64).reshape(-1) for a in per_row]
        rows = np.repeat(np.arange(len(arrays), dtype=np.int64), [a.size for a in arrays])
        cols = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    listed = cols >= 0
    if not listed.any() or items.size == 0:
        return np.zeros(items.shape, dtype=bool)
    rows, cols = rows[listed], cols[listed]
    base = max(int(items.max()), int(cols.max())) + 1
    keys = np.sort(rows * base + cols)
    candidates = np.arange(items.shape[0], dtype=np.int64)[:, None] * base + items
    at = np.minimum(np.searchsorted(keys, candidates), keys.size - 1)
    return (keys[at] == candidates) & (items >= 0)


# ------------------------------------------------------------------------------ the slate


@dataclass(frozen=True)
class Slate:
    """The working lists of ``n`` users (see the module docstring for columns and locks).

    items:    (n, w) int32, valid entries first, ``PAD_ITEM`` after.
    scores:   (n, w) float32, the current score of each entry (rules that boost change it);
              ``PAD_SCORE`` at padding, NaN for a pinned item inserted without a score.
    pinned:   (n, w) bool, locked by a pin.
    explored: (n, w) bool, locked by an exploration slot.
    """

    items: IntArray
    scores: FloatArray
    pinned: BoolArray
    explored: BoolArray

    @classmethod
    def start(cls, item_idx: IntArray, scores: FloatArray) -> Slate:
        """A slate of unlocked entries, as given (the engine compacts and deduplicates it)."""
        return cls(
            item_idx.astype(np.int32, copy=True),
            np.where(item_idx >= 0, scores, PAD_SCORE).astype(np.float32),
            np.zeros(item_idx.shape, dtype=bool),
            np.zeros(item_idx.shape, dtype=bool),
        )

    @property
    def shape(self) -> tuple[int, int]:
        n, w = self.items.shape
        return n, w

    @property
    def valid(self) -> BoolArray:
        return self.items != PAD_ITEM

    @property
    def locked(self) -> BoolArray:
        return self.pinned | self.explored

    @property
    def free(self) -> BoolArray:
        """Valid entries that reordering rules may move."""
        return self.valid & ~self.locked

    @property
    def lengths(self) -> npt.NDArray[np.intp]:
        """(n,) number of valid entries per row."""
        return self.valid.sum(axis=1)

    def head(self, k: int) -> Slate:
        """The first ``k`` positions, padded when the slate is narrower."""
        n, w = self.shape
        if k <= w:
            return Slate(
                self.items[:, :k], self.scores[:, :k], self.pinned[:, :k], self.explored[:, :k]
            )
        return self.widen(k - w)

    def take_rows(self, rows: slice) -> Slate:
        """The slate of a range of rows."""
        return Slate(self.items[rows], self.scores[rows], self.pinned[rows], self.explored[rows])

    def widen(self, extra: int) -> Slate:
        """The slate with ``extra`` empty columns appended (room for inserted pins)."""
        n = self.shape[0]
        return Slate(
            np.hstack([self.items, np.full((n, extra), PAD_ITEM, dtype=np.int32)]),
            np.hstack([self.scores, np.full((n, extra), PAD_SCORE, dtype=np.float32)]),
            np.hstack([self.pinned, np.zeros((n, extra), dtype=bool)]),
            np.hstack([self.explored, np.zeros((n, extra), dtype=bool)]),
        )

    def with_scores(self, scores: FloatArray) -> Slate:
        return replace(self, scores=np.where(self.valid, scores, PAD_SCORE).astype(np.float32))

    # The three operations every rule is written with; all go through `_layout`.
    def remove(self, mask: BoolArray) -> Slate:
        """Drop the entries where ``mask`` (n, w) is true; the others keep their order."""
        return self._layout(self.valid & ~mask, self._lock_targets(), None)

    def reorder_free(self, key: npt.NDArray[np.floating] | npt.NDArray[np.integer]) -> Slate:
        """Sort the free entries of each row by ``key`` (n, w), ascending, ties by position.

        The free entries stay on the positions free entries held before; locked ones stay put.
        """
        return self._layout(self.valid, self._lock_targets(), key)

    def place(
        self,
        rows: npt.NDArray[np.intp],
        cols: npt.NDArray[np.intp],
        positions: npt.NDArray[np.intp],
        *,
        pin: bool,
    ) -> Slate:
        """Move entry ``(rows[i], cols[i])`` to ``positions[i]`` and lock it (as a pin if ``pin``,
        else as exploration). The caller keeps positions distinct and off locked positions."""
        target = self._lock_targets()
        target[rows, cols] = positions
        flagged = replace(self, pinned=self.pinned.copy(), explored=self.explored.copy())
        (flagged.pinned if pin else flagged.explored)[rows, cols] = True
        return flagged._layout(self.valid, target, None)

    def _lock_targets(self) -> npt.NDArray[np.int64]:
        """(n, w) int64: each locked entry's position (its column), -1 for the others."""
        columns = np.arange(self.shape[1], dtype=np.int64)
        return np.where(self.locked, columns[None, :], -1)

    def _layout(
        self,
        keep: BoolArray,
        target: npt.NDArray[np.int64],
        free_key: npt.NDArray[np.floating] | npt.NDArray[np.integer] | None,
    ) -> Slate:
        """The slate holding the ``keep`` entries: those with ``target >= 0`` at that position
        (clamped into the row), the others, ordered by ``free_key`` (default: current
        position), on the remaining positions. Vectorized over the batch: a few row-wise sorts.
        """
        n, w = self.shape
        if w == 0:
            return self
        position = np.arange(w)
        length = keep.sum(axis=1)
        locked = keep & (target >= 0)
        free = keep & ~locked
        source = np.full((n, w), -1, dtype=np.intp)  # destination position -> source column
        n_locked = locked.sum(axis=1)
        if n_locked.any():
            wanted_by = np.where(locked, target, np.iinfo(np.int64).max)
            lock_src = np.argsort(wanted_by, axis=1, kind="stable")
            wanted = np.take_along_axis(wanted_by, lock_src, axis=1)
            # The j-th of a row's t locks sits no later than length - t + j, so the locks after
            # it still fit: a row that filters shortened pulls its locks in, never leaves a hole.
            placed = np.minimum(wanted, (length - n_locked)[:, None] + position[None, :])
            in_use = position[None, :] < n_locked[:, None]
            source[np.nonzero(in_use)[0], placed[in_use]] = lock_src[in_use]
        open_slot = (source < 0) & (position[None, :] < length[:, None])
        if free_key is None:  # keep the order: a stable sort of a bool (radix) is enough
            free_src = np.argsort(~free, axis=1, kind="stable")
        else:
            free_src = np.argsort(np.where(free, free_key, np.inf), axis=1, kind="stable")
        slots = np.argsort(~open_slot, axis=1, kind="stable")
        in_use = position[None, :] < free.sum(axis=1)[:, None]
        source[np.nonzero(in_use)[0], slots[in_use]] = free_src[in_use]
        return self._gather(source)

    def _gather(self, source: npt.NDArray[np.intp]) -> Slate:
        filled = source >= 0
        src = np.where(filled, source, 0)

        def take(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
            return np.take_along_axis(array, src, axis=1)

        return Slate(
            np.where(filled, take(self.items), PAD_ITEM).astype(np.int32),
            np.where(filled, take(self.scores), PAD_SCORE).astype(np.float32),
            filled & take(self.pinned),
            filled & take(self.explored),
        )


# ------------------------------------------------------------------------------ rule protocol


@dataclass(frozen=True)
class RuleContext:
    """What a rule may read besides the slate, for one call of the engine.

    k:           the slate length the caller will keep.
    item_info:   per-item side information.
    request:     per-request data (seen, exclusions, time, exploration keys).
    input_items: (n, m) int32, the candidate lists as they entered the engine (deduplicated);
                 pins use it to tell "never a candidate" from "removed by an earlier rule".
    step:        this rule's place in the configured order (keeps two exploration rules' random
                 draws apart).
    explain:     whether to return notes (they cost time, so only when someone will read them).
    filters:     the filters that ran before this rule: an item a pin inserts must pass them.
    """

    k: int
    item_info: ItemSideInfo
    request: RerankRequest
    input_items: IntArray
    step: int = 0
    explain: bool = False
    filters: tuple[Filter, ...] = ()


@dataclass(frozen=True)
class Note:
    """Something a rule did to one user's list that the slates alone do not say.

    kind: ``"capped"``, ``"explored"``, ``"pinned"`` or ``"skipped"``; reason: for people.
    """

    row: int
    kind: str
    item: int
    reason: str


class Rule(Protocol):
    """A re-ranking rule: ``apply`` returns the new slate and, when explaining, its notes.

    ``name`` is the config name; ``reason`` labels the entries the rule removes.
    """

    name: str
    reason: str

    def apply(self, slate: Slate, ctx: RuleContext) -> tuple[Slate, list[Note]]: ...


@dataclass(frozen=True)
class RuleResources:
    """What rules may need at construction: names to resolve, extra blocked items.

    item_ids:       the item id map (ids in configs -> indices), or ``None``.
    category_names: category index -> name, as in ``ItemCatalog.category_names``.
    blocked_items:  item indices blocked on top of ``filter_blocked``'s configured ids.
    """

    item_ids: IdMap | None = None
    category_names: tuple[str, ...] = ()
    blocked_items: npt.NDArray[np.int64] = field(
        default_factory=lambda: np.zeros(0, dtype=np.int64)
    )

    def items(self, rule: str, table: str, ids: Sequence[str], *, strict: bool) -> IntArray:
        """Indices of ``ids``; unknown ids raise ``ConfigError`` if ``strict``, else map to -1."""
        if not ids:
            return np.zeros(0, dtype=np.int32)
        if self.item_ids is None:
            raise ConfigError(f"{rule}.{table} names items, but the re-ranker has no item id map")
        index = self.item_ids.index(list(ids), allow_unknown=True)
        unknown = [i for i, x in zip(ids, index, strict=True) if x == UNKNOWN_INDEX]
        if strict and unknown:
            raise ConfigError(f"{rule}.{table}: unknown item id(s) {unknown[:5]}")
        return index

    def categories(self, rule: str, names: Sequence[str]) -> IntArray:
        """Indices of category ``names``; an unknown name raises ``ConfigError``."""
        lookup = {name: i for i, name in enumerate(self.category_names)}
        unknown = [name for name in names if name not in lookup]
        if unknown:
            raise ConfigError(
                f"{rule}.categories: unknown category name(s) {unknown[:5]}; "
                f"known: {list(self.category_names)[:10]}"
            )
        return np.array([lookup[name] for name in names], dtype=np.int32)


def _category_of(items: IntArray, info: ItemSideInfo) -> IntArray:
    """(n, w) primary category of each entry, -1 at padding and for uncategorised items."""
    return np.where(items >= 0, info.primary_category[np.maximum(items, 0)], -1)


# ------------------------------------------------------------------------------ filters


class Filter:
    """A rule that removes the entries of a (n, w) mask; subclasses say which."""

    name: ClassVar[str]
    reason: ClassVar[str]

    def mask(self, slate: Slate, ctx: RuleContext) -> BoolArray:
        raise NotImplementedError

    def apply(self, slate: Slate, ctx: RuleContext) -> tuple[Slate, list[Note]]:
        mask = self.mask(slate, ctx) & slate.valid
        return (slate.remove(mask) if mask.any() else slate), []


class FilterSeen(Filter):
    """Remove what the user already interacted with."""

    name = "filter_seen"
    reason = "seen"

    def __init__(self, config: FilterSeenConfig, resources: RuleResources) -> None:
        self.config = config

    def mask(self, slate: Slate, ctx: RuleContext) -> BoolArray:
        return per_row_mask(slate.items, ctx.request.seen)


class FilterExcluded(Filter):
    """Remove the items the request excludes."""

    name = "filter_excluded"
    reason = "excluded by the request"

    def __init__(self, config: FilterExcludedConfig, resources: RuleResources) -> None:
        self.config = config

    def mask(self, slate: Slate, ctx: RuleContext) -> BoolArray:
        return per_row_mask(slate.items, ctx.request.exclude)


class FilterUnavailable(Filter):
    """Remove items the side info marks unavailable."""

    name = "filter_unavailable"
    reason = "unavailable"

    def __init__(self, config: FilterUnavailableConfig, resources: RuleResources) -> None:
        self.config = config

    def mask(self, slate: Slate, ctx: RuleContext) -> BoolArray:
        available = ctx.item_info.available
        if available is None:
            return np.zeros(slate.shape, dtype=bool)
        return ~available[np.maximum(slate.items, 0)]


class FilterBlocked(Filter):
    """Remove the globally blocked items (configured ids plus the engine's blocked indices)."""

    name = "filter_blocked"
    reason = "blocked"

    def __init__(self, config: FilterBlockedConfig, resources: RuleResources) -> None:
        self.config = config
        configured = resources.items(self.name, "item_ids", config.item_ids, strict=False)
        blocked = np.concatenate([configured.astype(np.int64), resources.blocked_items])
        self.blocked_ = np.unique(blocked[blocked >= 0])

    def mask(self, slate: Slate, ctx: RuleContext) -> BoolArray:
        return np.isin(slate.items, self.blocked_)


# ------------------------------------------------------------------------------ reordering


class CategoryCap:
    """At most ``max_per_category`` items per primary category in the first ``k`` positions.

    Going down the list, an item is kept in place while its category has room (locked entries in
    the top ``k`` use up room too); the others are pushed below every kept item, in their order.
    Vectorized over the batch: an item's rank within its (user, category) group decides.
    """

    name = "category_cap"
    reason = "category cap"

    def __init__(self, config: CategoryCapConfig, resources: RuleResources) -> None:
        self.config = config

    def apply(self, slate: Slate, ctx: RuleContext) -> tuple[Slate, list[Note]]:
        n, w = slate.shape
        cap = self.config.max_per_category
        category = _category_of(slate.items, ctx.item_info).astype(np.int64)
        if w == 0 or category.max() < 0:
            return slate, []
        group = np.arange(n, dtype=np.int64)[:, None] * (int(category.max()) + 1) + category
        position = np.arange(w)
        locked_top = slate.locked & (position < ctx.k)[None, :] & (category >= 0)
        free = slate.free & (category >= 0)
        locked_groups = np.sort(group[locked_top])

        flat = np.flatnonzero(free)  # row-major: position order within each row
        groups = group.ravel()[flat]
        order = np.argsort(groups, kind="stable")
        sorted_groups = groups[order]
        rank = np.empty(flat.size, dtype=np.int64)
        rank[order] = np.arange(flat.size) - np.searchsorted(sorted_groups, sorted_groups)
        used = np.searchsorted(locked_groups, groups, "right") - np.searchsorted(
            locked_groups, groups, "left"
        )
        over = np.zeros((n, w), dtype=bool)
        over.ravel()[flat[rank >= cap - used]] = True
        if not over.any():
            return slate, []
        notes = []
        if ctx.explain:
            rows, cols = np.nonzero(over & (position < ctx.k)[None, :])
            notes = [
                Note(
                    int(r),
                    "capped",
                    int(slate.items[r, c]),
                    f"category {int(category[r, c])} already has {cap} item(s) in the top {ctx.k}",
                )
                for r, c in zip(rows, cols, strict=True)
            ]
        return slate.reorder_free(position[None, :] + over * w), notes


class MMRDiversity:
    """Greedy maximal marginal relevance over the first ``n_candidates`` free entries.

    Fills the free positions of the top ``k`` one at a time with the candidate maximising
    ``w * relevance - (1 - w) * max similarity to the slate so far`` (the slate so far includes
    locked entries in the top ``k``). The candidates not picked keep their order after the picks.

    The greedy steps run for all users at once: step ``t`` picks every user's ``t``-th item, so
    the Python loop is over the ``k`` slots, not over users.
    """

    name = "mmr"
    reason = "diversity"

    def __init__(self, config: MMRConfig, resources: RuleResources) -> None:
        self.config = config

    def apply(self, slate: Slate, ctx: RuleContext) -> tuple[Slate, list[Note]]:
        n, w = slate.shape
        similarity = self.config.similarity
        if similarity == "auto":
            similarity = "category" if ctx.item_info.embeddings is None else "embedding"
        if similarity == "embedding" and ctx.item_info.embeddings is None:
            raise DataError("mmr.similarity is 'embedding' but no item embeddings were given")
        if w == 0:
            return slate, []
        position = np.arange(w)
        # Picked entries get keys 0.. in pick order; the others keep their order behind them.
        key = np.broadcast_to(position + w, (n, w)).copy()
        for start in range(0, n, _MMR_ROWS_PER_CHUNK):
            rows = slice(start, start + _MMR_ROWS_PER_CHUNK)
            columns, picks = self._pick(slate.take_rows(rows), ctx, similarity)
            picked = picks >= 0
            chunk_row, step = np.nonzero(picked)
            key[start + chunk_row, columns[chunk_row, picks[picked]]] = step
        return slate.reorder_free(key), []

    def _pick(
        self, slate: Slate, ctx: RuleContext, similarity: str
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        """The candidate columns (n, N) and, per row, the candidates picked, in pick order
        (n, steps) as indices into the columns, -1 past a row's picks."""
        n, w = slate.shape
        position = np.arange(w)
        free, locked = slate.free, slate.locked
        columns = np.argsort(~free, axis=1, kind="stable")[:, : self.config.n_candidates]
        candidate = np.take_along_axis(free, columns, axis=1)
        items = np.where(candidate, np.take_along_axis(slate.items, columns, axis=1), 0)
        in_top = position[None, :] < np.minimum(ctx.k, slate.lengths)[:, None]
        n_pick = np.minimum((in_top & ~locked).sum(axis=1), candidate.sum(axis=1))
        steps = int(n_pick.max(initial=0))
        picks = np.full((n, steps), -1, dtype=np.intp)
        if steps == 0:
            return columns, picks

        scores = np.take_along_axis(slate.scores, columns, axis=1).astype(np.float64)
        low = np.where(candidate, scores, np.inf).min(axis=1, keepdims=True)
        high = np.where(candidate, scores, -np.inf).max(axis=1, keepdims=True)
        spread = high > low
        # Padding (-inf) and rows without a spread get relevance 0, never inf or NaN.
        relevance = np.where(
            candidate & spread,
            (np.where(candidate, scores, 0.0) - np.where(spread, low, 0.0))
            / np.where(spread, high - low, 1.0),
            0.0,
        )
        similar_to = self._similarity(items, candidate, ctx, similarity)

        # Max similarity to the slate so far; `started` is false while a row's slate is empty
        # (no penalty yet: the max over nothing), then the first pick sets it.
        anchors = locked & in_top
        anchor_columns = np.argsort(~anchors, axis=1, kind="stable")[:, : int(anchors.sum(1).max())]
        anchor_valid = np.take_along_axis(anchors, anchor_columns, axis=1)
        anchor_items = np.where(anchor_valid, np.take_along_axis(slate.items, anchor_columns, 1), 0)
        max_similarity = np.zeros(items.shape)
        started = np.zeros(n, dtype=bool)
        for a in range(anchor_columns.shape[1]):
            max_similarity = self._merge(
                max_similarity, similar_to(anchor_items[:, a]), started, anchor_valid[:, a]
            )
            started |= anchor_valid[:, a]

        weight = self.config.relevance_weight
        taken = ~candidate
        every_row = np.arange(n)
        for t in range(steps):
            active = t < n_pick
            penalty = np.where(started[:, None], max_similarity, 0.0)
            gain = np.where(taken, -np.inf, weight * relevance - (1.0 - weight) * penalty)
            best = np.argmax(gain, axis=1)  # ties: the earlier position
            picks[active, t] = best[active]
            taken[every_row[active], best[active]] = True
            picked_items = items[every_row, best]
            max_similarity = self._merge(max_similarity, similar_to(picked_items), started, active)
            started |= active
        return columns, picks

    @staticmethod
    def _merge(
        current: npt.NDArray[np.float64],
        new: npt.NDArray[np.float64],
        started: BoolArray,
        active: BoolArray,
    ) -> npt.NDArray[np.float64]:
        """Fold the similarities to one more slate item into the running max (active rows)."""
        merged = np.where(started[:, None], np.maximum(current, new), new)
        return np.where(active[:, None], merged, current)

    @staticmethod
    def _similarity(
        items: IntArray, candidate: BoolArray, ctx: RuleContext, similarity: str
    ) -> Callable[[IntArray], npt.NDArray[np.float64]]:
        """``f(item per row) -> (n, N)``: each candidate's similarity to that row's item."""
        info = ctx.item_info
        if similarity == "embedding":
            embeddings: FloatArray = info.embeddings  # type: ignore[assignment]
            vectors = _unit_rows(embeddings[items]) * candidate[:, :, None]

            def cosine(other: IntArray) -> npt.NDArray[np.float64]:
                # A stacked matmul: one (N, d) @ (d, 1) product per row, the same for a row
                # whatever the batch around it.
                unit = _unit_rows(embeddings[other])
                return np.matmul(vectors, unit[:, :, None])[:, :, 0].astype(np.float64)

            return cosine
        category = np.where(candidate, info.primary_category[items], -1)

        def same_category(other: IntArray) -> npt.NDArray[np.float64]:
            theirs = info.primary_category[other][:, None]
            return ((category == theirs) & (category >= 0)).astype(np.float64)

        return same_category


def _unit_rows(vectors: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """Vectors (last axis) scaled to unit length; zero vectors stay zero (similar to nothing)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


class FreshnessBoost:
    """Add a linearly decaying bonus to young items, in units of the row's score spread.

    Then sorts every row's free entries by score (boosted or not): place it before the rules
    that reorder for other reasons (caps, MMR), or it undoes them.
    """

    name = "freshness_boost"
    reason = "freshness"

    def __init__(self, config: FreshnessBoostConfig, resources: RuleResources) -> None:
        self.config = config

    def apply(self, slate: Slate, ctx: RuleContext) -> tuple[Slate, list[Note]]:
        if slate.shape[1] == 0:
            return slate, []
        valid = slate.valid
        created = ctx.item_info.created_at[np.maximum(slate.items, 0)]
        # An item released after the request time (clock skew) counts as brand new.
        age = np.maximum(ctx.request.now[:, None] - created, 0).astype(np.float64)
        max_age = self.config.max_age_days * SECONDS_PER_DAY
        decay = np.clip(1.0 - age / max_age, 0.0, 1.0) * (valid & (created != UNKNOWN_TIME))
        scored = valid & np.isfinite(slate.scores)
        high = np.where(scored, slate.scores, -np.inf).max(axis=1)
        low = np.where(scored, slate.scores, np.inf).min(axis=1)
        spread = np.where(scored.any(axis=1), high - low, 0.0)
        bonus = self.config.bonus * spread[:, None] * decay
        # Re-sort every row, boosted or not, so the rule means the same for a row in any batch.
        boosted = slate.with_scores((slate.scores + bonus).astype(np.float32))
        return boosted.reorder_free(-boosted.scores.astype(np.float64)), []


class Boost:
    """Multiply or shift the scores of configured items and categories.

    Then sorts every row's free entries by score, like :class:`FreshnessBoost`.
    """

    name = "boost"
    reason = "boost"

    def __init__(self, config: BoostConfig, resources: RuleResources) -> None:
        self.config = config
        items = resources.items(self.name, "items", list(config.items), strict=True)
        order = np.argsort(items)
        self.items_ = items[order]
        self.item_factors_ = np.array(list(config.items.values()), dtype=np.float64)[order]
        categories = resources.categories(self.name, list(config.categories))
        neutral = 1.0 if config.mode == "multiply" else 0.0
        self.category_factors_ = np.full(len(resources.category_names), neutral)
        self.category_factors_[categories] = list(config.categories.values())

    def apply(self, slate: Slate, ctx: RuleContext) -> tuple[Slate, list[Note]]:
        neutral = 1.0 if self.config.mode == "multiply" else 0.0
        by_category = np.full(slate.shape, neutral)
        n_categories = self.category_factors_.size
        if n_categories:
            category = _category_of(slate.items, ctx.item_info)
            known = (category >= 0) & (category < n_categories)
            factors = self.category_factors_[np.clip(category, 0, n_categories - 1)]
            by_category = np.where(known, factors, neutral)
        by_item = np.full(slate.shape, neutral)
        if self.items_.size:
            at = np.minimum(np.searchsorted(self.items_, slate.items), self.items_.size - 1)
            by_item = np.where(self.items_[at] == slate.items, self.item_factors_[at], neutral)
        by_item = np.where(slate.valid, by_item, neutral)
        by_category = np.where(slate.valid, by_category, neutral)
        scores = np.where(slate.valid, slate.scores, 0.0).astype(np.float64)  # no inf * 0
        for factor in (by_category, by_item):
            if self.config.mode == "multiply":
                scores = scores + (factor - 1.0) * np.abs(scores)
            else:
                scores = scores + factor
        boosted = slate.with_scores(scores.astype(np.float32))
        return boosted.reorder_free(-boosted.scores.astype(np.float64)), []


# ------------------------------------------------------------------------------ positional


class ExplorationSlots:
    """Fill reserved positions of the top ``k`` with items drawn from below it; lock them.

    A slot already locked, or past the end of a short row, is left alone. Each user's draw uses
    ``np.random.default_rng([seed, step, user_key, request_key])``: deterministic per request
    and independent of the rest of the batch. Draws are without replacement, from the first
    ``pool_size`` free entries at positions ``>= k``; a slot stays as it was when the pool runs out.
    """

    name = "exploration"
    reason = "exploration"

    def __init__(self, config: ExplorationConfig, resources: RuleResources) -> None:
        self.config = config

    def apply(self, slate: Slate, ctx: RuleContext) -> tuple[Slate, list[Note]]:
        n, w = slate.shape
        k = ctx.k
        if w <= k:
            return slate, []  # nothing below the slate to draw from
        if ctx.request.user_keys is None:
            raise DataError("the exploration rule needs RerankRequest.user_keys to seed its draw")
        request_keys = ctx.request.request_keys
        free, locked, lengths = slate.free, slate.locked, slate.lengths
        rows, cols, slots_used = [], [], []
        for r in range(n):
            end = min(k, int(lengths[r]))
            slots = [p for p in self.config.positions if p < end and not locked[r, p]]
            pool = np.flatnonzero(free[r, k:])[: self.config.pool_size] + k
            n_draw = min(len(slots), pool.size)
            if n_draw == 0:
                continue
            rng = np.random.default_rng(
                [
                    ctx.request.seed,
                    ctx.step,
                    int(ctx.request.user_keys[r]) % _UINT64,
                    0 if request_keys is None else int(request_keys[r]) % _UINT64,
                ]
            )
            drawn = rng.choice(
                pool.size, size=n_draw, replace=False, p=self._weights(slate, r, pool)
            )
            rows.extend([r] * n_draw)
            cols.extend(pool[drawn].tolist())
            slots_used.extend(slots[:n_draw])
        if not rows:
            return slate, []
        row_index = np.array(rows, dtype=np.intp)
        col_index = np.array(cols, dtype=np.intp)
        notes = []
        if ctx.explain:
            notes = [
                Note(r, "explored", int(slate.items[r, c]), f"exploration slot {p}")
                for r, c, p in zip(rows, cols, slots_used, strict=True)
            ]
        placed = slate.place(row_index, col_index, np.array(slots_used, dtype=np.intp), pin=False)
        return placed, notes

    def _weights(
        self, slate: Slate, row: int, pool: npt.NDArray[np.intp]
    ) -> npt.NDArray[np.float64] | None:
        if self.config.sampling == "uniform":
            return None
        scores = slate.scores[row, pool].astype(np.float64)
        low, high = scores.min(), scores.max()
        normalised = (scores - low) / (high - low) if high > low else np.zeros_like(scores)
        weights = np.exp((normalised - 1.0) / self.config.temperature)
        return weights / weights.sum()


class Pins:
    """Put configured items at configured positions of the top ``k``; lock them.

    Pins are taken by position. A pin is skipped (and noted) when its position is past ``k``,
    already locked (by an earlier rule or pin), or its item is already placed; an item missing
    from the list is inserted only with ``insert_if_absent``, and only if it was never a candidate
    and passes the filters that ran before (an item a filter removed stays removed).
    """

    name = "pins"
    reason = "pin"

    def __init__(self, config: PinsConfig, resources: RuleResources) -> None:
        self.config = config
        items = resources.items(self.name, "items", list(config.items), strict=True)
        self.pins_ = sorted(zip(config.items.values(), items.tolist(), strict=True))

    def apply(self, slate: Slate, ctx: RuleContext) -> tuple[Slate, list[Note]]:
        n, w = slate.shape
        every_row = np.arange(n)
        taken = slate.locked.copy()  # positions claimed, by column
        placements: list[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], int]] = []
        inserts: list[tuple[npt.NDArray[np.intp], int, int]] = []
        notes: list[Note] = []

        def note(rows: npt.NDArray[np.bool_], item: int, reason: str) -> None:
            if ctx.explain:
                notes.extend(Note(int(r), "skipped", item, reason) for r in np.flatnonzero(rows))

        for position, item in self.pins_:
            match = slate.items == item
            present = match.any(axis=1)
            column = match.argmax(axis=1) if w else np.zeros(n, dtype=np.intp)
            locked_there = slate.locked[every_row, column] if w else np.zeros(n, dtype=bool)
            if position >= ctx.k:
                note(present, item, f"pin position {position} is past k={ctx.k}")
                continue
            claimed = taken[:, position] if position < w else np.zeros(n, dtype=bool)
            already = present & locked_there
            place = present & ~claimed & ~already
            note(present & claimed & ~already, item, f"position {position} is already taken")
            note(already, item, "already placed by an earlier rule")
            placements.append((np.flatnonzero(place), column[place], position))
            if position < w:
                taken[place, position] = True
            if not self.config.insert_if_absent:
                note(~present, item, "not a candidate (insert_if_absent is false)")
                continue
            refused = (ctx.input_items == item).any(axis=1) | self._filtered(item, ctx)
            insert = ~present & ~refused & ~claimed
            note(~present & refused, item, "removed by an earlier rule")
            note(~present & ~refused & claimed, item, f"position {position} is taken")
            inserts.append((np.flatnonzero(insert), item, position))
            if position < w:
                taken[insert, position] = True

        if inserts:
            slate, extra = self._insert(slate, inserts)
            placements.extend(extra)
        rows = np.concatenate([p[0] for p in placements]) if placements else np.zeros(0, int)
        if rows.size == 0:
            return slate, notes
        cols = np.concatenate([p[1] for p in placements])
        positions = np.concatenate([np.full(p[0].size, p[2]) for p in placements])
        if ctx.explain:
            notes.extend(
                Note(int(r), "pinned", int(slate.items[r, c]), f"pinned to position {p}")
                for r, c, p in zip(rows, cols, positions, strict=True)
            )
        return slate.place(rows, cols, positions, pin=True), notes

    @staticmethod
    def _filtered(item: int, ctx: RuleContext) -> BoolArray:
        """(n,) bool: whether a filter that ran before would have removed ``item`` per user."""
        n = len(ctx.request)
        probe = Slate.start(np.full((n, 1), item, dtype=np.int32), np.zeros((n, 1), np.float32))
        refused = np.zeros(n, dtype=bool)
        for rule in ctx.filters:
            refused |= rule.mask(probe, ctx)[:, 0]
        return refused

    @staticmethod
    def _insert(
        slate: Slate, inserts: list[tuple[npt.NDArray[np.intp], int, int]]
    ) -> tuple[Slate, list[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], int]]]:
        """Append the inserted items after each row's entries (score NaN); their placements."""
        n = slate.shape[0]
        per_row = np.zeros(n, dtype=np.intp)
        for rows, _, _ in inserts:
            per_row[rows] += 1
        if not per_row.any():
            return slate, []
        end = slate.lengths.copy()
        slate = slate.widen(max(0, int((end + per_row).max()) - slate.shape[1]))
        items, scores = slate.items.copy(), slate.scores.copy()
        placements = []
        for rows, item, position in inserts:
            cols = end[rows]
            items[rows, cols] = item
            scores[rows, cols] = np.nan
            end[rows] += 1
            placements.append((rows, cols, position))
        return replace(slate, items=items, scores=scores), placements


# ------------------------------------------------------------------------------ registry

RULE_TYPES: Mapping[type[RuleConfig], type] = MappingProxyType(
    {
        FilterSeenConfig: FilterSeen,
        FilterExcludedConfig: FilterExcluded,
        FilterUnavailableConfig: FilterUnavailable,
        FilterBlockedConfig: FilterBlocked,
        CategoryCapConfig: CategoryCap,
        MMRConfig: MMRDiversity,
        FreshnessBoostConfig: FreshnessBoost,
        ExplorationConfig: ExplorationSlots,
        PinsConfig: Pins,
        BoostConfig: Boost,
    }
)
"""Rule config class -> the rule it configures."""


def build_rule(config: RuleConfig, resources: RuleResources) -> Rule:
    """The rule for ``config``; ``ConfigError`` if a name in it cannot be resolved."""
    rule: Rule = RULE_TYPES[type(config)](config, resources)
    return rule


__all__ = [
    "PAD_ITEM",
    "PAD_SCORE",
    "Boost",
    "CategoryCap",
    "Filter",
    "ExplorationSlots",
    "FilterBlocked",
    "FilterExcluded",
    "FilterSeen",
    "FilterUnavailable",
    "FreshnessBoost",
    "ItemSideInfo",
    "MMRDiversity",
    "Note",
    "Pins",
    "RerankRequest",
    "Rule",
    "RuleContext",
    "RuleResources",
    "Slate",
    "build_rule",
    "per_row_mask",
]
