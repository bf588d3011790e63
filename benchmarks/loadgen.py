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
from urllib.parse import urlsplit

import numpy as np

try:  # the server's event loop (a dependency on Linux/macOS): less CPU taken from the server
    import uvloop
except ImportError:  # pragma: no cover - Windows
    uvloop = None  # type: ignore[assignment]  # checked before use


class HTTPConnectionPool:
    """Keep-alive HTTP/1.1 connections to one host, at most ``size`` open, for POSTing JSON.

    Why not an HTTP client library: the generator shares the machine's cores with the server it
    measures, and a general-purpose async client spends ~1 ms of CPU a request in Python, time
    taken from the server. This speaks only the HTTP a FastAPI/uvicorn reply needs
    (status line, ``Content-Length`` body) and spends a few tens of microseconds.
    """

    def __init__(self, url: str, size: int, timeout: float) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(size)

    async def post_json(self, path: str, body: bytes) -> tuple[int, bytes]:
        """``(status, body)`` of one request (``post`` tells more)."""
        status, _, reply = await self.post(path, body)
        return status, reply

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """``(status, headers (lower-case names), body)`` of one request; raises ``OSError`` /
        ``TimeoutError`` / ``asyncio.IncompleteReadError`` on a transport failure (the
        connection is dropped).

        A reused connection that the server closed while it sat idle (its keep-alive timeout)
        fails before any reply byte: the request is sent again on a new connection, as HTTP
        clients do (safe: a recommendation request changes nothing on the server).
        """
        async with self._slots:
            for attempt in (1, 2):
                fresh = attempt == 2 or not self._idle
                reader, writer = await self._open() if fresh else self._idle.pop()
                try:
                    status, headers, reply = await asyncio.wait_for(
                        self._exchange(reader, writer, path, body), self.timeout
                    )
                except (ConnectionError, asyncio.IncompleteReadError) as exc:
                    writer.close()
                    partial = isinstance(exc, asyncio.IncompleteReadError) and exc.partial
                    if fresh or partial:
                        raise
                    continue
                except BaseException:
                    writer.close()
                    raise
                self._idle.append((reader, writer))
                return status, headers, reply
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode("ascii") + body)
        header_block = await reader.readuntil(b"\r\n\r\n")
        lines = header_block.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        if length == 0:
            raise OSError("reply without a Content-Length body (chunked replies are not read)")
        try:
            return status, headers, await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:  # a reply began: never resent
            raise OSError(f"reply cut short: {len(exc.partial)} of {length} body bytes") from exc


async def run_load(
    url: str, rate: float, seconds: float, users: list[str], k: int, seed: int, concurrency: int
) -> dict[str, object]:
    n_requests = int(rate * seconds)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(users), n_requests)
    # Bodies encoded before the clock starts: the generator's own work stays out of the timing.
    bodies = [json.dumps({"user_id": users[p], "k": k}).encode() for p in picks]
    latencies = np.full(n_requests, np.nan)
    statuses = np.zeros(n_requests, dtype=np.int32)
    stage_ms: dict[str, list[float]] = {
        "retrieval": [],
        "ranking": [],
        "reranking": [],
        "total": [],
    }
    degraded = 0
    pool = HTTPConnectionPool(url, concurrency, timeout=10.0)
    start = time.perf_counter() + 0.1

    async def one(i: int) -> None:
        nonlocal degraded
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            status, reply = await pool.post_json("/v1/recommend", bodies[i])
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            statuses[i] = -1
        else:
            latencies[i] = (time.perf_counter() - scheduled) * 1000
            statuses[i] = status
            if status == 200:
                answer = json.loads(reply)
                for stage in stage_ms:
                    stage_ms[stage].append(float(answer["timings_ms"][stage]))
                degraded += bool(answer["degraded"])

    try:
        await asyncio.gather(*(one(i) for i in range(n_requests)))
    finally:
        await pool.close()
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
    load = run_load(args.url, args.rate, args.seconds, users, args.k, args.seed, args.concurrency)
    result = uvloop.run(load) if uvloop is not None else asyncio.run(load)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
