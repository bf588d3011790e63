"""Batch recommendation through the serving ``Pipeline`` (``recsys recommend``).

The same object that answers HTTP requests answers here, in large batches and without latency
budgets, so offline numbers describe the served system. Unknown users take the cold-start path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
from tqdm import tqdm

from serving.pipeline import Pipeline, RecommendRequest

OUTPUT_SCHEMA = {"user_id": pl.String, "item_id": pl.String, "rank": pl.Int32, "score": pl.Float32}


def recommend_batch(
    pipeline: Pipeline,
    user_ids: Sequence[str],
    k: int,
    *,
    now: int | None = None,
    batch_size: int = 1_000,
    progress: bool = False,
) -> pl.DataFrame:
    """``user_id, item_id, rank (1-based), score`` rows for every user, seen items excluded."""
    frames = []
    starts = range(0, len(user_ids), batch_size)
    for start in tqdm(starts, desc="recommend", unit="batch", disable=not progress):
        chunk = user_ids[start : start + batch_size]
        answers = pipeline.recommend([RecommendRequest(u, k=k, now=now) for u in chunk])
        lengths = np.array([len(a.item_ids) for a in answers], dtype=np.int64)
        frames.append(
            pl.DataFrame(
                {
                    "user_id": np.repeat(np.array(chunk, dtype=object), lengths).tolist(),
                    "item_id": [i for a in answers for i in a.item_ids],
                    "rank": np.concatenate([np.arange(1, n + 1) for n in lengths])
                    if lengths.size
                    else [],
                    "score": [s for a in answers for s in a.scores],
                },
                schema=OUTPUT_SCHEMA,
            )
        )
    return pl.concat(frames) if frames else pl.DataFrame(schema=OUTPUT_SCHEMA)
