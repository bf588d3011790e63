"""Batch recommendation through the serving ``Pipeline`` (``recsys recommend``).

The same object that answers HTTP requests answers here, in large batches and without latency
budgets, so offline numbers describe the served system. Unknown users take the cold-start path.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
from tqdm import tqdm

from data.validation import positive_int
from pipeline.funnel import Pipeline, RecommendRequest

OUTPUT_SCHEMA = {"user_id": pl.String, "item_id": pl.String, "rank": pl.Int32, "score": pl.Float32}


def recommend_batch(
    pipeline: Pipeline,
    user_ids: Sequence[str],
    k: int,
    *,
    now: int | None = None,
    batch_size: int = 1_000,
    workers: int = 1,
    progress: bool = False,
    stage_seconds: dict[str, float] | None = None,
) -> pl.DataFrame:
    """``user_id, item_id, rank (1-based), score`` rows for every user, seen items excluded.

    ``now``: request time of every user, seconds UTC; ``None`` reads the pipeline's clock once,
    so one file is one point in time however long the run (the ranker reads the hour and ages).
    ``workers``: batches answered at once, in threads. The Pipeline is thread-safe (the service
    calls it from a thread pool), its heavy work (LightGBM, FAISS, torch, numpy) releases the GIL
    and the ranker predicts on one thread per call (the serving setting), so one worker per core
    is what uses the cores. The rows do not depend on it: each user's answer depends on that user
    alone (the pipeline is batch-invariant) and the batches are concatenated in input order.
    ``stage_seconds``: if given, each batch's funnel timings (the Pipeline's ``timings_ms``:
    retrieval, ranking, reranking, total) are added to it, in seconds; with several workers
    their sum exceeds the wall time.
    """
    positive_int(workers, "workers", error=ValueError)
    request_time = now if now is not None else int(pipeline.clock())
    if pipeline.ranker is not None:
        pipeline.ranker.warm()  # LightGBM compiles its trees: less CPU for every batch after

    def answer(chunk: Sequence[str]) -> tuple[pl.DataFrame, dict[str, float]]:
        answers = pipeline.recommend([RecommendRequest(u, k=k, now=request_time) for u in chunk])
        lengths = np.array([len(a.item_ids) for a in answers], dtype=np.int64)
        frame = pl.DataFrame(
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
        # One funnel pass per batch: every answer carries the batch's timings.
        return frame, (answers[0].timings_ms if answers else {})

    chunks = [user_ids[start : start + batch_size] for start in range(0, len(user_ids), batch_size)]
    frames = []
    with ThreadPoolExecutor(workers, thread_name_prefix="recommend-batch") as pool:
        results = pool.map(answer, chunks)  # in input order, whichever batch finishes first
        for frame, timings_ms in tqdm(
            results, total=len(chunks), desc="recommend", unit="batch", disable=not progress
        ):
            frames.append(frame)
            if stage_seconds is not None:
                for stage, ms in timings_ms.items():
                    stage_seconds[stage] = stage_seconds.get(stage, 0.0) + ms / 1000
    return pl.concat(frames) if frames else pl.DataFrame(schema=OUTPUT_SCHEMA)
