"""What every re-ranking rule shares: the :class:`Rule` protocol, its context and resources.

A rule has one job and a frozen config (:mod:`reranking.config`). It takes the batch's
:class:`~reranking.slate.Slate` and returns a new one; rules only **remove** entries or
**reorder** them (pins with ``insert_if_absent`` are the one documented exception). The engine
(:mod:`reranking.engine`) builds them from the config, runs them in the configured order and
turns the difference between consecutive slates into the per-rule explanation.

The rules, by job: :mod:`reranking.filters` (remove), :mod:`reranking.diversity` (category cap,
MMR), :mod:`reranking.boosts` (freshness, configured boosts) and :mod:`reranking.positional`
(exploration slots, pins). Filters are numpy masks over the whole batch; caps, boosts and
freshness are vectorized too. MMR's greedy selection runs for every user at once, one step per
slot of the top ``k``. Exploration alone loops over users, for their own seeded random generators.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np
import numpy.typing as npt

from data.errors import ConfigError
from data.idmap import UNKNOWN_INDEX, IdMap
from reranking.inputs import ItemSideInfo, RerankRequest
from reranking.slate import BoolArray, IntArray, Slate


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


def category_of(items: IntArray, info: ItemSideInfo) -> IntArray:
    """(n, w) primary category of each entry, -1 at padding and for uncategorised items."""
    return np.where(items >= 0, info.primary_category[np.maximum(items, 0)], -1)


class Filter:
    """A rule that removes the entries of a (n, w) mask; subclasses say which."""

    name: ClassVar[str]
    reason: ClassVar[str]

    def mask(self, slate: Slate, ctx: RuleContext) -> BoolArray:
        raise NotImplementedError

    def apply(self, slate: Slate, ctx: RuleContext) -> tuple[Slate, list[Note]]:
        mask = self.mask(slate, ctx) & slate.valid
        return (slate.remove(mask) if mask.any() else slate), []


__all__ = ["Filter", "Note", "Rule", "RuleContext", "RuleResources", "category_of"]
