"""The boosting rules: a decaying bonus for young items, and configured item / category boosts.

Both change scores, then sort every row's free entries by the new score.
"""

from __future__ import annotations

import numpy as np

from data.catalog import UNKNOWN_TIME
from reranking.config import BoostConfig, FreshnessBoostConfig
from reranking.rules import Note, RuleContext, RuleResources, category_of
from reranking.slate import Slate

SECONDS_PER_DAY = 86_400


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
            category = category_of(slate.items, ctx.item_info)
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


__all__ = ["Boost", "FreshnessBoost"]
