"""Benchmark: the HTTP service under load (issue 5).

Builds a bundle over a large synthetic catalogue (default 1M items), serves it with
``recsys serve`` (uvicorn, one worker per core) and drives it from a separate process with the
open-loop generator in ``benchmarks/loadgen.py``: 100 requests/s for 60 s (k=20, 500
candidates), then stepped rates to find the highest one that holds p99 <= 30 ms with no errors
(upwards if 100/s holds, downwards if it does not) and, upwards, the highest one the service
still serves: no errors and p99 within its default request deadline (315 ms), past which it
would shed requests to the popular fallback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import write_result, write_synthetic_dataset
from data.dataset import load_dataset
from data.synthetic import WorldConfig
from pipeline.artifacts import train_bundle
from pipeline.funnel import BudgetConfig

# Training settings for the big catalogue: a real model of the serving shape (1M-item index, every
# source, a ranker), trained quickly: this benchmark measures serving, not model quality. One
# epoch of 1024-example batches: the 1.1M id rows train sparse ("auto"), so a step costs the same
# whatever the catalogue size (a dense AdamW step rewrites all 1M rows, >10x slower).
#
# The ranker is pinned to 31-leaf trees at learning rate 0.05: this sparse world (3 events per
# item) gives early stopping little to keep, and at the defaults (15 leaves, 0.1) it kept a single
# tree, a ranker that costs nothing to serve. Pinned, it keeps more 31-leaf trees than the defaults
# train on the default dataset (15 leaves), so the figures err on the slow side (how many it kept
# follows the retrieval features: docs/benchmarks.md, "Measurements behind the defaults"). The
# service scores it with the compiled trees (ranking/compiled_forest.py), as it would any ranker.
FAST_TRAINING = {
    "retrieval": {
        "n_candidates": 500,
        "two_tower": {"max_epochs": 1, "batch_size": 1024},
        "als": {"factors": 32, "iterations": 5},
    },
    "ranking": {"lightgbm": {"learning_rate": 0.05, "num_leaves": 31}},
}
P99_TARGET_MS = 30.0
# The service's default request deadline (two full batches at the default budgets).
SERVED_P99_MS = 2 * BudgetConfig().for_call(8)


def build(
    root: Path, n_items: int, n_users: int, interactions: int, seed: int
) -> tuple[Path, float]:
    """Train the bundle in ``root`` (the dataset too, unless ``root/data`` already holds one)."""
    data, bundle = root / "data", root / "bundle"
    if (data / "dataset.json").is_file():
        print(f"reusing the dataset in {data}", flush=True)
    else:
        config = WorldConfig.from_overrides(
            n_users=n_users, n_items=n_items, target_interactions=interactions, seed=seed
        )
        write_synthetic_dataset(data, config, progress=True)
    start = time.perf_counter()
    train_bundle(data, bundle, config=FAST_TRAINING)
    users = load_dataset(data).splits["train"]["user_id"].unique(maintain_order=True)
    ids = users.head(20_000).to_list() + [f"new-user-{i}" for i in range(500)]
    (root / "users.txt").write_text("\n".join(ids))
    return bundle, time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(bundle: Path, root: Path, port: int, workers: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli.main",
            "serve",
            "--bundle",
            str(bundle),
            "--port",
            str(port),
            "--feedback-db",
            str(root / "feedback.sqlite3"),
            "--workers",
            str(workers),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("server did not become ready")


def load(port: int, rate: float, seconds: float, root: Path) -> dict[str, Any]:
    out = root / f"load-{rate:g}.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.loadgen",
            "--url",
            f"http://127.0.0.1:{port}",
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
            "--users",
            str(root / "users.txt"),
            "--out",
            str(out),
        ],
        check=True,
    )
    result: dict[str, Any] = json.loads(out.read_text())
    print(json.dumps(result), flush=True)
    return result


def holds(result: dict[str, Any]) -> bool:
    """The issue's bar: no errors and p99 <= 30 ms."""
    return result["errors"] == 0 and float(result["p99_ms"]) <= P99_TARGET_MS


def serves(result: dict[str, Any]) -> bool:
    """The service keeps up: no errors and p99 within the default request deadline, past which
    it would shed requests to the popular fallback (its queue would otherwise grow)."""
    return result["errors"] == 0 and float(result["p99_ms"]) <= SERVED_P99_MS


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--interactions", type=int, default=3_000_000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--step-seconds", type=float, default=20.0)
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[120, 140, 160, 200, 300, 400, 500]
    )
    parser.add_argument(
        "--lower-rates",
        type=float,
        nargs="+",
        default=[80, 60, 50, 40, 30, 20, 10],
        help="tried in order when 100/s does not hold, until one does",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="uvicorn worker processes (default: one per core; they share the mapped bundle)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep the dataset and bundle here; a rerun reuses them"
    )
    args = parser.parse_args(argv)
    figures: dict[str, object] = {
        "items": args.items,
        "k": 20,
        "candidates": 500,
        "workers": args.workers,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir if args.workdir is not None else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if (root / "bundle" / "manifest.json").is_file() and (root / "users.txt").is_file():
            bundle = root / "bundle"
            print(f"reusing {bundle}", flush=True)
        else:
            bundle, train_seconds = build(
                root, args.items, args.users, args.interactions, args.seed
            )
            figures["bundle_train_seconds"] = train_seconds
        port = free_port()
        server = serve(bundle, root, port, args.workers)
        try:
            load(port, 20, 5, root)  # warm-up: caches, threads, first-call costs
            # The same service nearly idle (one request at a time, 5/s): the host's speed at this
            # moment. Shared machines drift by tens of percent between runs, so each rate's
            # figures are also reported as multiples of this baseline.
            unloaded = load(port, 5, args.step_seconds, root)
            figures.update(
                {
                    "unloaded_p50_ms": unloaded["p50_ms"],
                    "unloaded_p99_ms": unloaded["p99_ms"],
                    "unloaded_stage_p50_ms": unloaded["stage_p50_ms"],
                }
            )
            steady = load(port, 100, args.seconds, root)
            figures.update({f"rate100_{k}": v for k, v in steady.items()})
            held = holds(steady)
            sustained = 100.0 if held else 0.0
            served = 100.0 if serves(steady) else 0.0

            def step(rate: float) -> dict[str, Any]:
                result = load(port, rate, args.step_seconds, root)
                for key in ("p50_ms", "p99_ms", "errors", "degraded"):
                    figures[f"rate{rate:g}_{key}"] = result[key]
                figures[f"rate{rate:g}_p99_over_unloaded_p50"] = float(result["p99_ms"]) / float(
                    unloaded["p50_ms"]
                )
                return result

            # Up from 100/s through every rate the service still serves; then, if 100/s missed
            # the target, down until a rate holds it.
            for rate in args.rates if serves(steady) else []:
                result = step(rate)
                if holds(result):
                    sustained = max(sustained, rate)
                if not serves(result):
                    break
                served = max(served, rate)
            for rate in [] if held else args.lower_rates:
                result = step(rate)
                if serves(result):
                    served = max(served, rate)
                if holds(result):
                    sustained = rate
                    break
            figures["max_sustained_rps_p99_30ms"] = sustained
            figures["max_served_rps"] = served
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
    path = write_result("load", figures)
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main(sys.argv[1:])
