"""Adapts the rule engine (``reranking/``) to the Pipeline's re-ranking step.

The engine is model-free and knows nothing about users; the pipeline hands it index arrays. This
adapter supplies the item side information from the bundle's catalogue and a stable integer key
per user (so exploration draws are the same for a user whatever batch they arrive in).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from data.catalog import ItemCatalog
from reranking.config import RerankerConfig
from reranking.engine import RankedList, RuleEngine
from reranking.inputs import ItemSideInfo, RerankRequest


def user_keys(user_ids: Sequence[str]) -> npt.NDArray[np.int64]:
    """A stable non-negative 63-bit integer per user id (blake2b, independent of the id maps)."""
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little") >> 1
            for u in user_ids
        ],
        dtype=np.int64,
    )


class RuleReranker:
    """The pipeline's :class:`~pipeline.funnel.RerankingStep`: the configured rules over the
    bundle's catalogue."""

    def __init__(self, config: RerankerConfig, catalog: ItemCatalog, *, seed: int = 0) -> None:
        self.engine = RuleEngine.for_catalog(config, catalog)
        self.item_info = ItemSideInfo.from_catalog(catalog)
        self.seed = seed

    def rerank(
        self,
        item_idx: npt.NDArray[np.int32],
        scores: npt.NDArray[np.float32],
        *,
        k: int,
        seen: sp.csr_matrix,
        exclude: Sequence[npt.NDArray[np.int32]],
        now: npt.NDArray[np.int64],
        user_ids: Sequence[str],
        explain: bool = False,
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], list[list[dict[str, Any]]]]:
        request = RerankRequest(
            now=now,
            seen=seen,
            exclude=list(exclude),
            user_keys=user_keys(user_ids),
            seed=self.seed,
        )
        result = self.engine.rerank(
            RankedList(item_idx, scores), self.item_info, request, k, explain=explain
        )
        notes: list[list[dict[str, Any]]] = (
            [explanation.to_list() for explanation in result.explanations]
            if explain and result.explanations is not None
            else [[] for _ in range(item_idx.shape[0])]
        )
        return result.item_idx, _fill_unscored(result.scores), notes


def _fill_unscored(scores: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """A pin inserted from outside the candidates has no score (NaN): give it the row's best."""
    unscored = np.isnan(scores)
    if not unscored.any():
        return scores
    finite = np.where(np.isfinite(scores), scores, -np.inf)
    best = finite.max(axis=1, keepdims=True)
    best[~np.isfinite(best)] = 0.0
    return np.where(unscored, best, scores).astype(np.float32)
