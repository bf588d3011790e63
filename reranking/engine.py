"""The re-ranking engine: the configured rules over a batch of ranked lists, with explanations.

Input, batch first: the ranker's list per user (:class:`RankedList`, ``(n, m)``), what is known
about items (:class:`~reranking.inputs.ItemSideInfo`) and about the requests
(:class:`~reranking.inputs.RerankRequest`). Output: ``k`` items per user (:class:`RerankResult`)
and, on request, an :class:`Explanation` per user that says, rule by rule, what happened.

Guarantees, whatever the configuration:

* every returned item was in the user's input list: rules only remove and reorder; the one
  exception is a pin configured with ``insert_if_absent = true`` (off by default), which may add
  its item (never one that a filter before it removed or would have removed);
* no item appears twice in a row (duplicates in the input are dropped, the first one kept);
* rows are filled from the front: ``-1`` (and score ``-inf``) only after the last item;
* rules start from each row in score order, whatever order the input had.

:data:`RULE_TYPES` maps each rule config to its rule; the rules themselves live in
:mod:`reranking.filters`, :mod:`reranking.diversity`, :mod:`reranking.boosts` and
:mod:`reranking.positional` (:mod:`reranking.rules` says what they share).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from data.catalog import ItemCatalog
from data.errors import ConfigError, DataError
from data.idmap import IdMap
from reranking.boosts import Boost, FreshnessBoost
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
    RerankerConfig,
    RuleConfig,
)
from reranking.diversity import CategoryCap, MMRDiversity
from reranking.filters import FilterBlocked, FilterExcluded, FilterSeen, FilterUnavailable
from reranking.inputs import ItemSideInfo, RerankRequest
from reranking.positional import ExplorationSlots, Pins
from reranking.rules import Filter, Note, Rule, RuleContext, RuleResources
from reranking.slate import PAD_ITEM, BoolArray, FloatArray, IntArray, Slate

INPUT_STEP = -1
"""The ``step`` of the report on the input itself (duplicates dropped before any rule)."""
PLACEMENT_KINDS = ("explored", "pinned")
"""Note kinds that say where an item went: such items are not listed again as "moved"."""

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


class Ranking(Protocol):
    """Anything holding a ranked list: :class:`RankedList`, ``retrieval.base.Candidates``."""

    @property
    def item_idx(self) -> IntArray: ...

    @property
    def scores(self) -> FloatArray: ...


@dataclass(frozen=True)
class RankedList:
    """The ranker's lists for ``n`` users.

    item_idx: (n, m) int32 item indices, -1 at padding.
    scores:   (n, m) float32, higher is better, finite for every item (any value at padding).
              The engine orders each row by score (stable: a row already best first is kept as
              it is), so scores may come in candidate order, as the ranking stage gives them.
    """

    item_idx: IntArray
    scores: FloatArray

    def __post_init__(self) -> None:
        _check_ranking(self.item_idx, self.scores)


def _check_ranking(item_idx: npt.NDArray[Any], scores: npt.NDArray[Any]) -> None:
    if item_idx.ndim != 2 or item_idx.shape != scores.shape:
        raise DataError(
            f"ranked items {item_idx.shape} and scores {scores.shape} must be equal 2-d shapes"
        )
    if not np.issubdtype(item_idx.dtype, np.integer):
        raise DataError(f"ranked item indices must be integers, got dtype {item_idx.dtype}")


# ------------------------------------------------------------------------------ explanations


@dataclass(frozen=True)
class Action:
    """One thing one rule did to one user's list.

    kind: ``"removed"`` (by a filter), ``"moved"`` (its place relative to the others changed),
        ``"inserted"``, ``"rescored"`` (its score changed), or a rule's own note: ``"capped"``,
        ``"explored"``, ``"pinned"``, ``"skipped"`` (a pin or slot that could not be applied).
    item: item index.
    from_position / to_position: 0-based positions in the list before / after the rule, -1 when
        the item was not in it (inserted) / is not any more (removed).
    reason: for people.
    """

    kind: str
    item: int
    from_position: int
    to_position: int
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "item": self.item,
            "from": self.from_position,
            "to": self.to_position,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class RuleReport:
    """What rule number ``step`` (``rule``: its config name) did to one user's list.

    "moved" lists the fewest items whose moves explain the new order: the others keep their
    relative order (a longest increasing subsequence of their old positions). So removing the
    removed items, taking out the moved, inserted, explored and pinned ones, and putting those
    back at their ``to_position`` (in increasing order) turns the list before into the list after.
    """

    step: int
    rule: str
    actions: tuple[Action, ...]

    def of_kind(self, *kinds: str) -> tuple[Action, ...]:
        return tuple(a for a in self.actions if a.kind in kinds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "rule": self.rule,
            "actions": [a.to_dict() for a in self.actions],
        }


@dataclass(frozen=True)
class Explanation:
    """One user's re-ranking, rule by rule, in the order the rules ran (every rule is listed)."""

    rules: tuple[RuleReport, ...]

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-friendly: one dict per rule (item indices; the caller maps them to ids)."""
        return [report.to_dict() for report in self.rules]


@dataclass(frozen=True)
class RerankResult:
    """The re-ranked slates of ``n`` users.

    item_idx:     (n, k) int32, -1 padded at the end of a short row.
    scores:       (n, k) float32, each item's score after the rules (boosts change scores,
                  reordering does not, so they need not be descending); -inf at padding, NaN for
                  a pin inserted without a score.
    explored:     (n, k) bool, the item fills an exploration slot.
    pinned:       (n, k) bool, the item was pinned there.
    explanations: one per user with ``explain=True``, else ``None``.
    """

    item_idx: IntArray
    scores: FloatArray
    explored: BoolArray
    pinned: BoolArray
    explanations: tuple[Explanation, ...] | None = None


# ------------------------------------------------------------------------------ the engine


class RuleEngine:
    """Runs :class:`~reranking.config.RerankerConfig`'s rules, in order, over batches.

    item_ids:       resolves the item ids of the config (pins, boosts, blocked items); needed
                    only when the config names items.
    category_names: resolves the category names of ``boost`` rules.
    blocked_items:  item indices to block on top of the configured ids (a takedown list known
                    only at run time); the config must have a ``filter_blocked`` rule.

    Building the rules resolves every name, so a bad config fails here, not on a request.
    """

    def __init__(
        self,
        config: RerankerConfig | None = None,
        *,
        item_ids: IdMap | None = None,
        category_names: Sequence[str] = (),
        blocked_items: npt.ArrayLike | None = None,
    ) -> None:
        self.config = config if config is not None else RerankerConfig()
        blocked = np.asarray([] if blocked_items is None else blocked_items, dtype=np.int64)
        if blocked.size and not any(
            isinstance(rule, FilterBlockedConfig) for rule in self.config.rules
        ):
            raise ConfigError(
                f"{blocked.size} blocked item(s) given, but no filter_blocked rule is configured"
            )
        resources = RuleResources(item_ids, tuple(category_names), blocked.reshape(-1))
        self.rules: tuple[Rule, ...] = tuple(
            build_rule(rule, resources) for rule in self.config.rules
        )

    @classmethod
    def for_catalog(
        cls,
        config: RerankerConfig | None,
        catalog: ItemCatalog,
        *,
        blocked_items: npt.ArrayLike | None = None,
    ) -> RuleEngine:
        """A rule engine resolving names with ``catalog``'s item ids and category names."""
        return cls(
            config,
            item_ids=catalog.items,
            category_names=catalog.category_names,
            blocked_items=blocked_items,
        )

    def rerank(
        self,
        ranked: Ranking,
        item_info: ItemSideInfo,
        request: RerankRequest,
        k: int,
        *,
        explain: bool = False,
    ) -> RerankResult:
        """The top ``k`` of each user's list after the rules (see the module's guarantees).

        ranked: (n, m) lists; item_info: side info covering every item index in them;
        request: ``n`` requests, row ``i`` for user ``i``. Each row's answer depends on that row
        alone, never on the rest of the batch.
        """
        k = _check_k(k)
        item_idx, scores = np.asarray(ranked.item_idx), np.asarray(ranked.scores)
        _check_ranking(item_idx, scores)
        n = item_idx.shape[0]
        if len(request) != n:
            raise DataError(f"{len(request)} requests for {n} ranked lists")
        _check_items(item_idx, scores, item_info.n_items)
        reports: list[list[RuleReport]] = [[] for _ in range(n)]

        slate = Slate.start(item_idx, scores)
        # Score order first (stable: a sorted list stays as it is), so a ranker's scores can come
        # in candidate order; then duplicates go, keeping the best-placed copy.
        ordered = slate.reorder_free(-slate.scores.astype(np.float64))
        duplicate = _duplicates(ordered.items)
        entered = ordered.remove(duplicate)
        if explain:
            for r in np.flatnonzero(duplicate.any(axis=1)):
                repeats = tuple(
                    Action("removed", int(ordered.items[r, c]), int(c), PAD_ITEM, "duplicate")
                    for c in np.flatnonzero(duplicate[r])
                )
                reports[r].append(RuleReport(INPUT_STEP, "input", repeats))
        slate = entered
        for step, rule in enumerate(self.rules):
            filters = tuple(r for r in self.rules[:step] if isinstance(r, Filter))
            ctx = RuleContext(k, item_info, request, entered.items, step, explain, filters)
            after, notes = rule.apply(slate, ctx)
            if explain:
                _record(reports, step, rule.name, rule.reason, slate, after, notes)
            slate = after
        top = slate.head(k)
        return RerankResult(
            top.items,
            top.scores,
            top.explored,
            top.pinned,
            tuple(Explanation(tuple(r)) for r in reports) if explain else None,
        )


# ------------------------------------------------------------------------------ helpers


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise DataError(f"k must be a non-negative integer, got {k!r}")
    return int(k)


def _check_items(item_idx: npt.NDArray[Any], scores: npt.NDArray[Any], n_items: int) -> None:
    valid = item_idx >= 0
    bad = (item_idx < PAD_ITEM) | (item_idx >= n_items)
    if bad.any():
        raise DataError(
            f"{int(bad.sum())} ranked item indices are outside [-1, {n_items}) (the side info "
            f"covers {n_items} items), e.g. {item_idx[bad][:5].tolist()}"
        )
    non_finite = valid & ~np.isfinite(scores)
    if non_finite.any():
        rows = np.unique(np.nonzero(non_finite)[0])[:5].tolist()
        raise DataError(
            f"{int(non_finite.sum())} ranked items have a non-finite score (rows {rows}...)"
        )


def _duplicates(items: npt.NDArray[Any]) -> BoolArray:
    """(n, m) bool: entries repeating an item earlier in their row (padding never counts)."""
    if items.shape[1] < 2:
        return np.zeros(items.shape, dtype=bool)
    order = np.argsort(items, axis=1, kind="stable")  # equal items stay in position order
    ordered = np.take_along_axis(items, order, axis=1)
    repeat = np.zeros(items.shape, dtype=bool)
    repeat[:, 1:] = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    duplicate = np.zeros(items.shape, dtype=bool)
    np.put_along_axis(duplicate, order, repeat, axis=1)
    return duplicate


def _record(
    reports: list[list[RuleReport]],
    step: int,
    rule: str,
    reason: str,
    before: Slate,
    after: Slate,
    notes: list[Note],
) -> None:
    """Append, for every user, the report of one rule: the diff of the slates plus its notes."""
    by_row: dict[int, list[Note]] = defaultdict(list)
    for note in notes:
        by_row[note.row].append(note)
    before_lengths, after_lengths = before.lengths, after.lengths
    for r, user_reports in enumerate(reports):
        actions = _diff(
            before.items[r, : before_lengths[r]],
            before.scores[r, : before_lengths[r]],
            after.items[r, : after_lengths[r]],
            after.scores[r, : after_lengths[r]],
            by_row.get(r, []),
            reason,
        )
        user_reports.append(RuleReport(step, rule, tuple(actions)))


def _diff(
    items_before: IntArray,
    scores_before: FloatArray,
    items_after: IntArray,
    scores_after: FloatArray,
    notes: list[Note],
    reason: str,
) -> list[Action]:
    """The actions turning one user's list ``before`` into ``after`` (see :class:`RuleReport`).

    Numpy throughout; Python objects only for what changed.
    """
    from_position = _positions_in(items_before, items_after)  # (len(after),), -1 if new
    to_position = _positions_in(items_after, items_before)  # (len(before),), -1 if removed
    placed = np.array([n.item for n in notes if n.kind in PLACEMENT_KINDS], dtype=np.int64)
    is_placed = np.isin(items_after, placed)
    actions = [
        Action("removed", int(items_before[i]), int(i), PAD_ITEM, reason)
        for i in np.flatnonzero(to_position < 0)
    ]
    common = np.flatnonzero(from_position >= 0)  # after-positions of items in both lists
    stays = _in_longest_increasing(from_position[common])
    actions += [
        Action("moved", int(items_after[i]), int(from_position[i]), int(i))
        for i in common[~stays & ~is_placed[common]]
    ]
    actions += [
        Action("inserted", int(items_after[i]), PAD_ITEM, int(i))
        for i in np.flatnonzero((from_position < 0) & ~is_placed)
    ]
    old, new = scores_before[from_position[common]], scores_after[common]
    changed = ~((old == new) | (np.isnan(old) & np.isnan(new)))
    actions += [
        Action(
            "rescored", int(items_after[i]), int(from_position[i]), int(i), f"{a:.6g} -> {b:.6g}"
        )
        for i, a, b in zip(
            common[changed], old[changed].tolist(), new[changed].tolist(), strict=True
        )
    ]
    if notes:
        noted = np.array([n.item for n in notes], dtype=np.int64)
        was_at = _positions_in(items_before, noted)
        now_at = _positions_in(items_after, noted)
        actions += [
            Action(n.kind, n.item, int(a), int(b), n.reason)
            for n, a, b in zip(notes, was_at, now_at, strict=True)
        ]
    return actions


def _positions_in(haystack: npt.NDArray[Any], needles: npt.NDArray[Any]) -> npt.NDArray[np.intp]:
    """For each needle, its position in ``haystack`` (distinct values), or -1 if absent."""
    if haystack.size == 0:
        return np.full(needles.shape, -1, dtype=np.intp)
    order = np.argsort(haystack, kind="stable")
    at = np.minimum(np.searchsorted(haystack[order], needles), haystack.size - 1)
    return np.where(haystack[order[at]] == needles, order[at], -1)


def _in_longest_increasing(values: npt.NDArray[np.intp]) -> BoolArray:
    """Mask of a longest strictly increasing subsequence of distinct ``values``.

    A value above everything before it and below everything after it is in every longest
    subsequence, and it splits the problem (what comes before it is smaller than what comes
    after), so the patience sort below only runs over the values out of place: few, for the
    usual re-ranking that moves a handful of items.
    """
    size = values.size
    if size == 0:
        return np.zeros(0, dtype=bool)
    before_max = np.maximum.accumulate(np.concatenate([[-1], values[:-1]]))
    after_min = np.minimum.accumulate(np.concatenate([values[1:], [size + values.max()]])[::-1])[
        ::-1
    ]
    in_place = (values > before_max) & (values < after_min)
    rest = np.flatnonzero(~in_place)
    chosen = in_place.copy()
    chosen[rest[_patience(values[rest].tolist())]] = True
    return chosen


def _patience(values: list[int]) -> list[int]:
    """Indices of a longest strictly increasing subsequence of ``values`` (patience sorting)."""
    tails: list[int] = []  # smallest tail value of an increasing run of each length
    tail_index: list[int] = []
    previous = [-1] * len(values)
    for i, value in enumerate(values):
        j = bisect_left(tails, value)
        if j == len(tails):
            tails.append(value)
            tail_index.append(i)
        else:
            tails[j], tail_index[j] = value, i
        previous[i] = tail_index[j - 1] if j else -1
    chain: list[int] = []
    i = tail_index[-1] if tail_index else -1
    while i >= 0:
        chain.append(i)
        i = previous[i]
    return chain[::-1]


__all__ = [
    "INPUT_STEP",
    "RULE_TYPES",
    "Action",
    "Explanation",
    "ItemSideInfo",
    "RankedList",
    "Ranking",
    "RerankRequest",
    "RerankResult",
    "RerankerConfig",
    "RuleEngine",
    "RuleReport",
    "build_rule",
]
