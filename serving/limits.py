"""Limits on what one request or one client may cost: body size, feedback rate."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import BodyTooLargeError, too_large_error


class BodySizeLimit:
    """Refuse request bodies over ``limit`` bytes with 413, by header or while streaming."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _too_large(send, self.limit)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLargeError(self.limit)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BodyTooLargeError:
            # Only reached when the body was read outside FastAPI's request parsing.
            await _too_large(send, self.limit)


async def _too_large(send: Send, limit: int) -> None:
    body = too_large_error(limit).model_dump_json()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})


class ClientRateLimiter:
    """A token bucket per client: ``rate_per_s`` tokens a second, at most ``burst`` saved up.

    Thread-safe (sync routes run on a thread pool). Memory is bounded: the ``max_clients``
    buckets used most recently are kept; a client whose bucket was dropped starts full again,
    which only matters to someone with more addresses than that, who could rotate them anyway.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst <= 0 or max_clients < 1:
            raise ValueError(
                f"rate_per_s ({rate_per_s}), burst ({burst}) and max_clients ({max_clients}) "
                "must be positive"
            )
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when
        self._lock = threading.Lock()

    def take(self, client: str, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens of ``client``'s bucket and return 0.0; or, if it holds fewer,
        spend nothing and return the seconds until it will hold enough. A cost above ``burst``
        is charged as ``burst`` (it could never pass otherwise)."""
        cost = min(cost, self.burst)
        with self._lock:
            now = self._clock()
            tokens, since = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - since) * self.rate_per_s)
            wait = 0.0
            if tokens >= cost:
                tokens -= cost
            else:
                wait = (cost - tokens) / self.rate_per_s
            self._buckets[client] = (tokens, now)  # re-inserted: the most recently used
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            return wait

    @staticmethod
    def retry_after(wait_s: float) -> str:
        """A ``Retry-After`` header value (whole seconds, at least 1) for a wait of ``wait_s``."""
        return str(max(1, math.ceil(wait_s)))
