"""Benchmark: what enforcing the stage budgets costs a request, cooperative vs preemptive.

One bundle, one online state, three pipelines over them in the same process: budgets off (the
offline path), cooperative deadlines (the serving default: every stage runs on the caller's
thread) and preemptive deadlines (every stage on a worker thread, the caller waiting at most the
budget). Single-user requests, k=20, the same users for each pipeline, in alternating rounds so
all three see the same moments of the machine. Two conditions:

- idle: nothing else runs. Each preemptive handoff wakes a thread on an idle core; on a VM the
  idle vCPU has halted and waking it costs far more than the handoff itself.
- busy: one spinning process per core at the lowest priority keeps every vCPU awake (a loaded
  server's cores are rarely idle), which isolates the cost of the handoff proper.

The library thread pools are limited to one thread, as in a server with one worker per core.

    python -m benchmarks.bench_budgets [--bundle DIR] [--requests 200] [--rounds 5]

Without ``--bundle`` a bundle of the default synthetic world is trained first (a few minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from benchmarks.common import write_result, write_synthetic_dataset
from data.synthetic import WorldConfig
from pipeline.artifacts import load_artifacts, train_bundle
from pipeline.factory import make_pipeline, online_state_for
from pipeline.funnel import BudgetConfig, Pipeline, RecommendRequest

MODES = ("none", "cooperative", "preemptive")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def busy_cores() -> Iterator[None]:
    """One lowest-priority busy loop per core, for the duration of the block."""
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.nice(19))
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        time.sleep(0.5)  # let them start
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def request_ms(pipeline: Pipeline, users: list[str]) -> list[float]:
    """Wall time of one single-user request per user, in ms."""
    times = []
    for user in users:
        start = time.perf_counter()
        pipeline.recommend([RecommendRequest(user, k=20)])
        times.append((time.perf_counter() - start) * 1000)
    return times


def measure(
    pipelines: dict[str, Pipeline], users: list[str], requests: int, rounds: int, seed: int
) -> dict[str, float]:
    """Median request time per mode over alternating rounds of ``requests`` requests."""
    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {mode: [] for mode in pipelines}
    for _ in range(rounds):
        picked = [str(u) for u in rng.choice(users, requests)]
        for mode, pipeline in pipelines.items():
            times[mode] += request_ms(pipeline, picked)
    return {mode: float(np.median(values)) for mode, values in times.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a trained bundle (default: train one)")
    parser.add_argument("--requests", type=int, default=200, help="requests per mode per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if any(os.environ.get(variable) != "1" for variable in THREAD_VARIABLES):
        # The libraries read these when they load: start again with them set.
        env = dict(os.environ, **dict.fromkeys(THREAD_VARIABLES, "1"))
        os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *sys.argv[1:]], env)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            data, bundle = Path(tmp) / "data", Path(tmp) / "bundle"
            write_synthetic_dataset(data, WorldConfig.from_overrides(seed=args.seed))
            train_bundle(data, bundle)
        artifacts = load_artifacts(bundle, mmap=True)
        state = online_state_for(artifacts)
        pipelines = {
            "none": make_pipeline(artifacts, state, enforce_budgets=False),
            "cooperative": make_pipeline(artifacts, state, budgets=BudgetConfig()),
            "preemptive": make_pipeline(artifacts, state, budgets=BudgetConfig(preemptive=True)),
        }
        pipelines["none"].warm()
        users = [str(u) for u in artifacts.users.ids.head(20_000).to_list()]
        measure(pipelines, users, 50, 1, args.seed + 1)  # first calls of each thread
        idle = measure(pipelines, users, args.requests, args.rounds, args.seed)
        with busy_cores():
            busy = measure(pipelines, users, args.requests, args.rounds, args.seed)
        for pipeline in pipelines.values():
            pipeline.close()
    figures: dict[str, float] = {"requests_per_mode": float(args.requests * args.rounds)}
    for condition, medians in (("idle", idle), ("busy", busy)):
        for mode in MODES:
            figures[f"{condition}_{mode}_ms"] = medians[mode]
        for mode in ("cooperative", "preemptive"):
            figures[f"{condition}_{mode}_extra_ms"] = medians[mode] - medians["none"]
    path = write_result("budgets", figures)
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
