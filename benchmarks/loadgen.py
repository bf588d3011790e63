"""An open-loop HTTP load generator for ``POST /v1/recommend`` (run as its own process).

Open loop: request ``i`` is *scheduled* at ``start + i / rate`` whatever happened to earlier ones,
and its latency is measured from that scheduled time. A closed-loop tool (one that waits for a
reply before sending the next request) under-reports tail latency when the server stalls
("coordinated omission"); this one does not.

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --rate 100 --seconds 60 \
        --users users.txt --out result.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np


async def run_load(
    url: str, rate: float, seconds: float, users: list[str], k: int, seed: int, concurrency: int
) -> dict[str, object]:
    n_requests = int(rate * seconds)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(users), n_requests)
    latencies = np.full(n_requests, np.nan)
    statuses = np.zeros(n_requests, dtype=np.int32)
    stage_ms: dict[str, list[float]] = {
        "retrieval": [],
        "ranking": [],
        "reranking": [],
        "total": [],
    }
    degraded = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10.0) as client:
        start = time.perf_counter() + 0.1

        async def one(i: int) -> None:
            nonlocal degraded
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                reply = await client.post(
                    "/v1/recommend", json={"user_id": users[picks[i]], "k": k}
                )
                statuses[i] = reply.status_code
                if reply.status_code == 200:
                    body = reply.json()
                    for stage in stage_ms:
                        stage_ms[stage].append(float(body["timings_ms"][stage]))
                    degraded += bool(body["degraded"])
            except httpx.HTTPError:
                statuses[i] = -1
            latencies[i] = (time.perf_counter() - scheduled) * 1000

        await asyncio.gather(*(one(i) for i in range(n_requests)))
    ok = statuses == 200
    lat = latencies[ok]
    return {
        "rate": rate,
        "seconds": seconds,
        "requests": n_requests,
        "errors": int((~ok).sum()),
        "degraded": degraded,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "max_ms": float(lat.max()) if lat.size else float("nan"),
        "stage_p50_ms": {s: float(np.percentile(v, 50)) for s, v in stage_ms.items() if v},
        "stage_p99_ms": {s: float(np.percentile(v, 99)) for s, v in stage_ms.items() if v},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--users", type=Path, required=True, help="file with one user id a line")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    users = args.users.read_text().split()
    result = asyncio.run(
        run_load(args.url, args.rate, args.seconds, users, args.k, args.seed, args.concurrency)
    )
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
