"""The load generator's HTTP client against a real local server: replies, errors, keep-alive."""

from __future__ import annotations

import asyncio
import json

from benchmarks.loadgen import run_load

REPLY = {
    "timings_ms": {"retrieval": 1.0, "ranking": 2.0, "reranking": 0.5, "total": 4.0},
    "degraded": [],
}


async def serve_and_load(
    *, fail_every: int, close_after_reply: bool = False, rate: float = 200, seconds: float = 0.25
) -> tuple[dict[str, object], int]:
    """Run ``run_load`` against an HTTP/1.1 server that cuts every ``fail_every``-th reply
    short (0: none) and, with ``close_after_reply``, closes each connection after its reply (as a
    server does when its keep-alive timeout ends); returns the result and how many connections
    the server accepted."""
    seen = 0
    connections = 0

    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen, connections
        connections += 1
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                request = json.loads(await reader.readexactly(length))
                assert set(request) == {"user_id", "k"}
                seen += 1
                body = json.dumps({**REPLY, "degraded": ["ranking:timeout"] * (seen % 2)})
                cut = bool(fail_every) and seen % fail_every == 0
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(body)}\r\n\r\n".encode()
                    + body.encode()[: len(body) // 2 if cut else None]
                )
                if cut:
                    break  # hang up half-way through the body
                await writer.drain()
                if close_after_reply:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await run_load(
            f"http://127.0.0.1:{port}", rate, seconds, ["u1", "u2", "u3"], 5, 0, 4
        )
        # The generator closed its connections: each handler sees the end of its stream.
        await asyncio.gather(*handlers)
    return result, connections


def test_every_request_is_answered_and_timed_over_reused_connections() -> None:
    result, connections = asyncio.run(serve_and_load(fail_every=0))
    assert result["requests"] == 50 and result["errors"] == 0
    assert result["degraded"] == 25  # every other reply says it degraded
    assert result["stage_p50_ms"] == REPLY["timings_ms"]
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"] < 10_000
    assert connections <= 4  # keep-alive: at most one connection per concurrency slot


def test_a_reply_cut_short_is_an_error_and_the_load_goes_on() -> None:
    result, _ = asyncio.run(serve_and_load(fail_every=10))
    assert result["requests"] == 50 and result["errors"] == 5


def test_connections_the_server_closed_while_idle_are_replaced_not_errors() -> None:
    result, connections = asyncio.run(serve_and_load(fail_every=0, close_after_reply=True))
    assert result["requests"] == 50 and result["errors"] == 0
    assert connections >= 50  # every request after the first on a slot found its connection closed
