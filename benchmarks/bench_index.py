"""Benchmark: ANN index kinds on 1M x 64 unit vectors (target: recall@100 >= 0.95, p99 <= 5 ms).

Items and queries are drawn from the same mixture of 1000 gaussian clusters on the unit sphere,
as two-tower item and user vectors are. For each kind we report the build time, the memory (the
serialized index size and the RSS growth of the build), the single-query top-500 latency p50/p99
over 1000 queries (one query per call, the serving case), the batched throughput, recall@100
against exact search, a recall/latency sweep of the search knob (nprobe or ef_search), and the
cost of a live add and remove of 1000 items. Ground truth is exact top-100 by ``exact_search``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

import faiss
import numpy as np

from benchmarks.common import median_seconds, peak_rss_mb, write_result
from retrieval.index import VectorIndex, exact_search, recall_at_k
from retrieval.index_config import IVF_KINDS, IndexConfig, IndexKind

KINDS: tuple[IndexKind, ...] = ("flat", "ivf_flat", "ivf_fp16", "hnsw", "ivf_pq", "sq8")
# Search-time knob swept per kind (no rebuild): recall and p99 at each value.
SWEEPS: dict[str, tuple[str, tuple[int, ...]]] = {
    "ivf_flat": ("nprobe", (16, 32, 64, 128, 256)),
    "ivf_fp16": ("nprobe", (16, 32, 64, 128, 256)),
    "sq8": ("nprobe", (16, 32, 64, 128, 256)),
    "ivf_pq": ("nprobe", (16, 32, 64, 128, 256)),
    "hnsw": ("ef_search", (64, 128, 256, 512)),
}
RECALL_K = 100  # the recall@100
SERVING_K = 500  # candidates a serving request asks the ANN source for
TARGET_RECALL = 0.95
TARGET_P99_MS = 5.0
LATENCY_PASSES = 3


def clustered_unit_vectors(
    centers: np.ndarray, n: int, spread: float, rng: np.random.Generator
) -> np.ndarray:
    """``n`` unit vectors: a random center plus gaussian noise of norm ~``spread``, normalised."""
    dim = centers.shape[1]
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors *= np.float32(spread / np.sqrt(dim))
    vectors += centers[rng.integers(0, centers.shape[0], n)]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def current_rss_mb() -> float:
    """Resident memory of this process now, in MiB (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def single_query_latency_ms(
    index: VectorIndex, queries: np.ndarray, k: int, **knobs: int
) -> dict[str, float]:
    """Latency in ms of one-query ``search`` calls, every query ``LATENCY_PASSES`` times.

    ``p50_ms``/``p99_ms`` are percentiles over queries of each query's fastest pass: the same
    query does the same work every pass, so the fastest pass is its cost without the scheduler
    noise of a shared machine (a neighbour's thread pre-empting ours costs a 4 ms tick).
    ``p99_raw_ms`` is the p99 over every call, noise included.
    """
    for row in range(min(20, queries.shape[0])):
        index.search(queries[row : row + 1], k, **knobs)
    times = np.empty((LATENCY_PASSES, queries.shape[0]))
    for rep in range(LATENCY_PASSES):
        for row in range(queries.shape[0]):
            start = time.perf_counter()
            index.search(queries[row : row + 1], k, **knobs)
            times[rep, row] = time.perf_counter() - start
    times *= 1e3
    p50, p99 = np.percentile(times.min(axis=0), [50, 99])
    raw_p99 = float(np.percentile(times, 99))
    return {"p50_ms": float(p50), "p99_ms": float(p99), "p99_raw_ms": raw_p99}


def measure_kind(
    config: IndexConfig,
    vectors: np.ndarray,
    ids: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    extra: np.ndarray,
    *,
    measure_mmap: bool,
) -> dict[str, Any]:
    """Every figure of one index kind, keyed ``<kind>_<figure>``.

    extra: (1000, d) vectors of new items for the live add/remove figures. ``measure_mmap``
    also saves the index and measures a memory-mapped load (done for the default kind).
    """
    kind = config.kind
    gc.collect()
    rss_before = current_rss_mb()
    start = time.perf_counter()
    index = VectorIndex.build(config, vectors, ids)
    build_seconds = time.perf_counter() - start
    out: dict[str, Any] = {
        "build_seconds": build_seconds,
        "build_rss_delta_mb": current_rss_mb() - rss_before,
        "index_mb": index.serialized_bytes() / 2**20,
    }
    found, _ = index.search(queries, RECALL_K)
    out["recall_at_100"] = recall_at_k(found, truth)
    out.update(single_query_latency_ms(index, queries, SERVING_K))
    batch_seconds, _ = median_seconds(lambda: index.search(queries, SERVING_K), repeats=3)
    out["batch_queries_per_second"] = queries.shape[0] / batch_seconds
    if kind in SWEEPS:
        knob, values = SWEEPS[kind]
        for value in values:
            found, _ = index.search(queries, RECALL_K, **{knob: value})
            latency = single_query_latency_ms(index, queries, SERVING_K, **{knob: value})
            out[f"{knob}_{value}_recall_at_100"] = recall_at_k(found, truth)
            out[f"{knob}_{value}_p99_ms"] = latency["p99_ms"]
    # Live updates: 1000 new items, then retire them again.
    new_ids = np.arange(extra.shape[0], dtype=np.int64) + int(ids.max()) + 1
    out["add_1000_ms"] = median_seconds(lambda: index.add(extra, new_ids), repeats=1)[0] * 1e3
    top, _ = index.search(extra[:100], 1)
    out["added_found_top1"] = float(np.mean(top[:, 0] == new_ids[:100]))
    out["remove_1000_ms"] = median_seconds(lambda: index.remove(new_ids), repeats=1)[0] * 1e3
    top, _ = index.search(extra[:100], SERVING_K)
    out["removed_never_returned"] = not np.isin(top, new_ids).any()
    if measure_mmap:
        out.update(_mmap_figures(index, queries))
    return {f"{kind}_{key}": value for key, value in out.items()}


def _mmap_figures(index: VectorIndex, queries: np.ndarray) -> dict[str, Any]:
    """Load the saved index with mmap=True: memory it costs a worker, and its latency."""
    with tempfile.TemporaryDirectory() as directory:
        index.save(directory)
        gc.collect()
        rss_before = current_rss_mb()
        shared = VectorIndex.load(directory, mmap=True)
        rss_loaded = current_rss_mb() - rss_before
        latency = single_query_latency_ms(shared, queries, SERVING_K)
        figures = {
            "mmap_load_rss_delta_mb": rss_loaded,
            "mmap_p50_ms": latency["p50_ms"],
            "mmap_p99_ms": latency["p99_ms"],
        }
        del shared
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clusters", type=int, default=1000)
    # 1.0 makes every kind look perfect (clusters barely overlap), 1.5 makes 64-d neighbours
    # nearly random; 1.25 is in between, where the search knobs visibly trade recall for time.
    parser.add_argument("--spread", type=float, default=1.25, help="noise norm / center norm")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    parser.add_argument("--threads", type=int, default=None, help="FAISS threads (default: all)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    vectors = clustered_unit_vectors(centers, args.items, args.spread, rng)
    ids = np.arange(args.items, dtype=np.int64)
    queries = clustered_unit_vectors(centers, args.queries, args.spread, rng)
    extra = clustered_unit_vectors(centers, 1000, args.spread, rng)

    start = time.perf_counter()
    truth, _ = exact_search(vectors, ids, queries, RECALL_K)
    figures: dict[str, Any] = {
        "items": args.items,
        "dim": args.dim,
        "clusters": args.clusters,
        "spread": args.spread,
        "queries": args.queries,
        "serving_k": SERVING_K,
        "faiss_version": faiss.__version__,
        "faiss_threads": args.threads or faiss.omp_get_max_threads(),
        "exact_top100_seconds": time.perf_counter() - start,
        "load_average_1min_start": os.getloadavg()[0],
    }
    default = IndexConfig(num_threads=args.threads)
    figures["default_kind"] = default.kind
    for kind in args.kinds:
        config = replace(default, kind=kind)
        if kind in IVF_KINDS:
            figures[f"{kind}_nlist"] = config.resolved_nlist(args.items)
            figures[f"{kind}_nprobe"] = config.nprobe
        if kind == "ivf_pq":
            figures["ivf_pq_pq_m"] = config.resolved_pq_m(args.dim)
            figures["ivf_pq_pq_nbits"] = config.pq_nbits
        if kind == "hnsw":
            figures["hnsw_m"] = config.hnsw_m
            figures["hnsw_ef_construction"] = config.ef_construction
            figures["hnsw_ef_search"] = config.ef_search
        print(f"-- {kind}", flush=True)
        figures.update(
            measure_kind(
                config, vectors, ids, queries, truth, extra, measure_mmap=kind == default.kind
            )
        )
    meets = [
        kind
        for kind in args.kinds
        if figures[f"{kind}_recall_at_100"] >= TARGET_RECALL
        and figures[f"{kind}_p99_ms"] <= TARGET_P99_MS
    ]
    figures["kinds_meeting_target"] = ",".join(meets) or "none"
    figures["peak_rss_mb"] = peak_rss_mb()
    # Shared machines: the load tells how much neighbours may have disturbed the timings.
    figures["load_average_1min_end"] = os.getloadavg()[0]
    path = write_result("index", figures)
    for key, value in figures.items():
        print(f"{key}: {value:,.3f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
