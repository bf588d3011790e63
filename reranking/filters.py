"""The filters: rules that remove entries (seen, excluded by the request, unavailable, blocked).

Each is a (n, w) mask over the whole batch (:class:`~reranking.rules.Filter`). A filter removes
a locked entry too: a blocked item is never shown, pinned or not.
"""

from __future__ import annotations

import numpy as np

from reranking.config import (
    FilterBlockedConfig,
    FilterExcludedConfig,
    FilterSeenConfig,
    FilterUnavailableConfig,
)
from reranking.inputs import per_row_mask
from reranking.rules import Filter, RuleContext, RuleResources
from reranking.slate import BoolArray, Slate


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


__all__ = ["FilterBlocked", "FilterExcluded", "FilterSeen", "FilterUnavailable"]
