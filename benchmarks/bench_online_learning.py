"""Benchmark: the service with online learning on, under feedback and request load (issue 17).

Two ``RecommenderService`` instances over the same bundle, in one process: one trains the
two-tower online (``pipeline/online_learning``, the background cadence of ``recsys serve
--online-learning``), the other keeps the bundle's weights. Each takes the same load in
alternating phases (on, off, on, off, ...): a feeder posts ``--events-per-s`` feedback events
(clicks of known users on known items, in batches every 100 ms) and a requester sends
``--requests-per-s`` single-user requests through the pipeline with its budgets enforced.

Reports ``model_freshness_seconds`` (event time to the first model version trained on it: p50,
p99), the online steps published, and the request latency (p50, p99) of each service; the ratio
``p99 on / p99 off`` is the online learning's cost to the request path. In-process, not over
HTTP: the HTTP load benchmark (``bench_load``) measures the server; this one isolates what the
trainer's thread adds to the pipeline beside it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import peak_rss_mb, write_result, write_synthetic_dataset
from data.synthetic import WorldConfig
from pipeline.artifacts import train_bundle
from pipeline.feedback_log import FeedbackEvent, FeedbackLog, FeedbackLogConfig
from pipeline.funnel import BudgetConfig, RecommendRequest
from pipeline.online_learning import OnlineLearningConfig
from pipeline.service import RecommenderService

# A small world with a two-tower (the bundle's default leaves it out below 100k events).
TRAINING = {
    "retrieval": {"two_tower": {"min_interactions": 0, "max_epochs": 2, "num_threads": 1}},
    "ranking": {"lightgbm": {"num_threads": 1}},
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--items", type=int, default=1_000)
    parser.add_argument("--events-per-s", type=float, default=50.0)
    parser.add_argument("--requests-per-s", type=float, default=100.0)
    parser.add_argument("--phase-seconds", type=float, default=20.0)
    parser.add_argument("--phases", type=int, default=4, help="phases per service")
    parser.add_argument("--interval-s", type=float, default=5.0, help="online update cadence")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-online-learning-") as tmp:
        root = Path(tmp)
        config = WorldConfig.from_overrides(
            n_users=args.users,
            n_items=args.items,
            target_interactions=40 * args.users,
            seed=args.seed,
        )
        write_synthetic_dataset(root / "data", config)
        train_bundle(root / "data", root / "bundle", config=TRAINING)
        services = {
            "on": _service(root, "on", OnlineLearningConfig(interval_s=args.interval_s)),
            "off": _service(root, "off", None),
        }
        try:
            latencies: dict[str, list[float]] = {name: [] for name in services}
            for phase in range(args.phases):
                for name, service in services.items():
                    latencies[name] += _phase(service, args, phase, f"{name}-{phase}")
            status = services["on"].online_status()
        finally:
            for service in services.values():
                service.close()

    on, off = (np.asarray(latencies[n]) * 1000 for n in ("on", "off"))
    figures: dict[str, Any] = {
        "users": args.users,
        "items": args.items,
        "events_per_s": args.events_per_s,
        "requests_per_s": args.requests_per_s,
        "seconds_per_service": args.phases * args.phase_seconds,
        "update_interval_s": args.interval_s,
        "online_steps": status.get("steps_taken"),
        "model_freshness_p50_s": status.get("model_freshness_p50_s"),
        "model_freshness_p99_s": status.get("model_freshness_p99_s"),
        "requests_on": int(on.size),
        "requests_off": int(off.size),
        "latency_on_p50_ms": float(np.percentile(on, 50)),
        "latency_on_p99_ms": float(np.percentile(on, 99)),
        "latency_off_p50_ms": float(np.percentile(off, 50)),
        "latency_off_p99_ms": float(np.percentile(off, 99)),
        "p99_ratio_on_vs_off": float(np.percentile(on, 99) / np.percentile(off, 99)),
        "peak_rss_mb": peak_rss_mb(),
    }
    path = write_result("online_learning", figures)
    for key, value in figures.items():
        print(f"{key}: {value}")
    print(f"wrote {path}")
    return figures


def _service(root: Path, name: str, online: OnlineLearningConfig | None) -> RecommenderService:
    log = FeedbackLog(FeedbackLogConfig(path=root / f"{name}.db", synchronous="NORMAL"))
    return RecommenderService(
        root / "bundle",
        log,
        budgets=BudgetConfig(),
        online_learning=online,
        check_reloads_in_child=False,
    )


def _phase(
    service: RecommenderService, args: argparse.Namespace, phase: int, tag: str
) -> list[float]:
    """One phase of load on ``service``; returns each request's wall seconds. Both services
    get the same users and events in the same phase (one generator per thread and phase)."""
    requests_rng = np.random.default_rng([args.seed, phase, 0])
    events_rng = np.random.default_rng([args.seed, phase, 1])
    artifacts = service.pipeline.artifacts
    users = artifacts.users.id_list(np.arange(len(artifacts.users)))
    items = artifacts.items.id_list(np.arange(len(artifacts.items)))
    stop = threading.Event()
    per_batch = max(1, round(args.events_per_s / 10))

    def feed() -> None:
        sent = 0
        tick = time.monotonic()
        while not stop.is_set():
            now = int(time.time())
            service.record_feedback(
                [
                    FeedbackEvent(
                        f"{tag}-{sent + i}",
                        users[int(events_rng.integers(len(users)))],
                        items[int(events_rng.integers(len(items)))],
                        "click",
                        now,
                        1.0,
                    )
                    for i in range(per_batch)
                ]
            )
            sent += per_batch
            tick += 0.1
            time.sleep(max(0.0, tick - time.monotonic()))

    feeder = threading.Thread(target=feed)
    feeder.start()
    latencies: list[float] = []
    gap = 1.0 / args.requests_per_s
    start = next_at = time.monotonic()
    try:
        while time.monotonic() - start < args.phase_seconds:
            user = users[int(requests_rng.integers(len(users)))]
            began = time.perf_counter()
            service.pipeline.recommend([RecommendRequest(user_id=user, k=10)])
            latencies.append(time.perf_counter() - began)
            next_at += gap
            time.sleep(max(0.0, next_at - time.monotonic()))
    finally:
        stop.set()
        feeder.join()
    return latencies


if __name__ == "__main__":
    main(sys.argv[1:])
