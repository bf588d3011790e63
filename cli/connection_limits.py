"""Connection limits for the HTTP server: what uvicorn does not enforce on its own.

uvicorn (0.55, httptools parser) closes a kept-alive connection that stays idle between requests
(``timeout_keep_alive``), and that is all: it sets no deadline on a connection that never sends a
byte or that sends its request head one byte at a time (slowloris), none on a request body, no
limit on the size of a request head (llhttp has none: an 8 MB header was accepted), and its
``limit_concurrency`` answers 503 only once a request head has arrived, after the connection
already holds a file descriptor. :class:`GuardedHttpToolsProtocol` is uvicorn's httptools
protocol with those limits added; ``recsys serve`` passes it to uvicorn (``http=``) with the
:class:`ConnectionLimits` of its flags. Doing it in the server keeps one process to deploy and
test; a reverse proxy in front (nginx's ``client_header_timeout``, ``large_client_header_buffers``)
is still the place for per-client rate limits.

Per connection:

- a request head (request line and headers) must be complete within ``header_timeout_s`` of the
  connection's opening (the first request) or of its first byte (later requests); past it the
  connection is closed (with ``408`` if part of a head had arrived). An idle new connection is
  closed by the same deadline, an idle kept-alive one by uvicorn's ``timeout_keep_alive``;
- a request body must be complete within ``body_timeout_s`` of its head;
- a head over ``max_header_bytes`` bytes or ``max_header_count`` header lines is answered ``431``
  and the connection closed; no more of it than the limit is ever parsed or held;

and per worker process: at most ``max_connections`` open connections; one over it is answered
``503`` and closed at once, before it is read. Open-file limits: :func:`raise_open_file_limit`.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

# Files a worker needs besides its connections: the bundle's files while it loads, SQLite's
# (database, WAL and shared memory per pooled connection), the event loop's, a bundle checker's
# pipes, the listening socket. Generous: running short of descriptors fails everything at once.
RESERVED_FILES = 256
# How long a refused request's connection keeps reading (and discarding) after its answer, so
# that the client reads the answer instead of a reset (a "lingering close", as nginx does).
LINGER_S = 2.0


@dataclass(frozen=True)
class ConnectionLimits:
    """The limits one worker puts on its client connections (``recsys serve`` flags).

    The defaults suit an API whose requests are small JSON documents, reached directly or through
    a proxy on the same network.
    """

    # Far above what a head of a few hundred bytes needs on any working link; a client slower
    # than that is broken or hostile. nginx waits 60 s, Go services commonly 5-10 s.
    header_timeout_s: float = 10.0
    # The largest body (1 MB, the app's max_body_bytes) at ~35 KB/s: a slow mobile link.
    body_timeout_s: float = 30.0
    # Between requests on a kept-alive connection (uvicorn's own limit, and its default). Behind
    # a proxy that pools connections, set it above the proxy's idle timeout.
    keep_alive_s: int = 5
    # Open connections per worker; each costs a file descriptor and a few KB. Far above what a
    # worker serves at its sustainable rate (~100-400 requests/s at ~10 ms each), below the
    # open-file limits of common systems once raised (raise_open_file_limit).
    max_connections: int = 1_000
    # A head is a request line and a few headers here; 16 KiB is what Node.js and h11 allow.
    max_header_bytes: int = 16 * 1024
    # Apache's LimitRequestFields default.
    max_header_count: int = 100

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("max_connections", "max_header_bytes", "max_header_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")


class _HeadTooLargeError(Exception):
    """Raised in a parser callback to stop parsing a head that broke a limit."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of :class:`ConnectionLimits` (see module).

    Give it to uvicorn as ``http=functools.partial(GuardedHttpToolsProtocol, limits=...)``.
    """

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._in_head = True  # waiting for (the rest of) a request head
        self._head_bytes = 0  # bytes of the current head fed to the parser
        self._header_count = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._refusing = False  # answered and closing: input is read and discarded
        self._head_refusal: str | None = None  # why on_header stopped the parser

    # -- connection --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            logger.warning(
                "refused a connection: %d open, the limit is %d",
                len(self.connections) - 1,
                self.limits.max_connections,
            )
            self._answer_and_close(503, "too many connections", linger=False)
            return
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusing:
            return
        if not self._in_head:
            super().data_received(data)
            return
        if self._head_timer is None:  # the first byte of a kept-alive connection's next request
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_late)
        room = self.limits.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        # Feed no more than the limit: a head that ends within it is parsed and the rest of the
        # data (its body, or a pipelined request) follows; one that does not is refused.
        self._head_bytes += room
        super().data_received(data[:room])
        if self._refusing or self.transport.is_closing():
            return
        if self._in_head:
            self._refuse_head(f"request head over {self.limits.max_header_bytes} bytes")
            return
        self.data_received(data[room:])

    def eof_received(self) -> None:
        # During a lingering close the client's end of input is the moment to close.
        if self._refusing:
            self.transport.close()
        super().eof_received()

    # -- parser callbacks --------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_header_count:
            self._head_refusal = f"over {self.limits.max_header_count} header lines"
            raise _HeadTooLargeError(self._head_refusal)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_late)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers a parser error 400; one raised by on_header's limit is a 431.
        if self._head_refusal is not None:
            self._refuse_head(self._head_refusal)
        else:
            super().send_400_response(msg)

    # -- refusals and deadlines --------------------------------------------------------------
    def _refuse_head(self, reason: str) -> None:
        logger.warning("refused a request head from %s: %s (431)", self._peer(), reason)
        self._answer_and_close(431, f"request header fields too large: {reason}", linger=True)

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._in_head:
            return
        if self._head_bytes:
            logger.info("closed %s: request head not complete in time (408)", self._peer())
            self._answer_and_close(408, "request head not received in time", linger=True)
        else:
            self.transport.close()  # a connection that never sent a request

    def _body_late(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self._in_head:
            return
        logger.info("closed %s: request body not complete in time", self._peer())
        # The app is waiting on the body: closing ends its receive() with a disconnect.
        self.transport.close()

    def _answer_and_close(self, status: int, message: str, *, linger: bool) -> None:
        """Write a complete ``status`` answer, then close: at once, or after the client closed
        its side or ``LINGER_S`` passed, reading and discarding what it still sends."""
        self._refusing = True
        self._cancel_timers()
        body = message.encode("ascii")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])
            + b"content-type: text/plain; charset=utf-8\r\n"
            + b"content-length: %d\r\n" % len(body)
            + b"connection: close\r\n\r\n"
            + body
        )
        if not linger:
            self.transport.close()
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"


_REASONS = {
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


def raise_open_file_limit(max_connections: int) -> int:
    """Make room for ``max_connections`` connections in this process (and the workers it
    starts, which inherit it); returns the connection limit that fits.

    Raises the soft open-file limit as far as needed, up to the hard limit (what any process may
    do; Go's runtime does it at start-up). If even the hard limit is too low, the connection
    limit is lowered to fit, with a warning: a worker out of descriptors fails every request,
    its log writes and its bundle reloads, not only new connections.
    """
    needed = max_connections + RESERVED_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        fitting = soft - RESERVED_FILES
        if fitting < 1:
            raise ValueError(
                f"the open-file limit ({soft}) leaves no room for connections "
                f"({RESERVED_FILES} files are kept for the service itself)"
            )
        logger.warning(
            "open-file limit %d: serving at most %d connections per worker instead of %d",
            soft,
            fitting,
            max_connections,
        )
        return fitting
    return max_connections
