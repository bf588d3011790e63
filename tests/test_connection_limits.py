"""Connection limits (cli/connection_limits.py): deadlines for request heads and bodies, idle
connections closed, a cap on connections per worker, request heads limited in bytes and lines.

First against uvicorn in this process with a trivial app and small limits (fast, exact), then
against a real ``recsys serve`` with its own flags: 300 idle and 100 slowloris connections while
normal requests keep answering, and 8 MB / 20,000-line request heads refused.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from cli import connection_limits
from cli.connection_limits import ConnectionLimits, GuardedHttpToolsProtocol, raise_open_file_limit
from cli.main import build_parser
from data.errors import ConfigError

LIMITS = ConnectionLimits(
    header_timeout_s=0.6,
    body_timeout_s=0.6,
    keep_alive_s=1,
    max_connections=20,
    max_header_bytes=1024,
    max_header_count=10,
)
# Time allowed on top of a deadline for the event loop to act on it (a loaded 2-core machine).
SLACK_S = 2.0


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 200 with the size of the request body it read."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = str(size).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server() -> Iterator[tuple[str, int]]:
    """uvicorn with the guarded protocol in a thread of this process: (host, port)."""
    port = free_port()
    config = uvicorn.Config(
        echo_app,
        host="127.0.0.1",
        port=port,
        http=functools.partial(GuardedHttpToolsProtocol, limits=LIMITS),  # type: ignore[arg-type]
        ws="none",
        lifespan="off",
        log_level="error",
        timeout_keep_alive=LIMITS.keep_alive_s,
    )
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not instance.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield "127.0.0.1", port
    instance.should_exit = True
    thread.join(timeout=10)


def connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (or 10 s pass)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def closed_after(sock: socket.socket, limit_s: float) -> float:
    """Seconds until the server closes ``sock`` (whatever it sends first); fails past limit_s."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"still open after {limit_s} s")
    return time.monotonic() - started


GET = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


def test_a_normal_request_and_keep_alive(server: tuple[str, int]) -> None:
    with connect(server) as sock:
        for _ in range(3):
            sock.sendall(GET)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        # Idle after a response: uvicorn's keep-alive limit closes it.
        assert closed_after(sock, LIMITS.keep_alive_s + SLACK_S) >= LIMITS.keep_alive_s - 0.1


def test_a_connection_that_sends_nothing_is_closed_by_the_head_deadline(
    server: tuple[str, int],
) -> None:
    with connect(server) as sock:
        waited = closed_after(sock, LIMITS.header_timeout_s + SLACK_S)
    assert waited >= LIMITS.header_timeout_s - 0.1


def test_a_head_sent_byte_by_byte_is_cut_off_at_its_deadline(server: tuple[str, int]) -> None:
    """Slowloris: each byte resets no timer; the head as a whole must arrive in time."""
    head = b"GET / HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 200
    with connect(server) as sock:
        started, answer = time.monotonic(), b""
        sock.settimeout(0.05)
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            if answer:
                break
        answer += read_response(sock)
        elapsed = time.monotonic() - started
    assert status_of(answer) == 408, answer
    assert LIMITS.header_timeout_s - 0.1 <= elapsed <= LIMITS.header_timeout_s + SLACK_S


def test_a_kept_alive_connection_gets_a_new_head_deadline_for_its_next_request(
    server: tuple[str, int],
) -> None:
    with connect(server) as sock:
        sock.sendall(GET)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET / HT")  # the next request starts, and stalls
        waited = closed_after(sock, LIMITS.header_timeout_s + SLACK_S)
    assert waited >= LIMITS.header_timeout_s - 0.1


def test_a_stalled_body_is_cut_off(server: tuple[str, int]) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        waited = closed_after(sock, LIMITS.body_timeout_s + SLACK_S)
    assert waited >= LIMITS.body_timeout_s - 0.1
    with connect(server) as sock:  # a body that arrives in time is read
        sock.sendall(b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n" + b"x" * 100)
        assert sock.recv(65536).endswith(b"\r\n\r\n100")


def head_of(size: int) -> bytes:
    """A GET whose head is exactly ``size`` bytes."""
    start, end = b"GET / HTTP/1.1\r\nHost: test\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


def test_the_head_byte_limit_is_exact_and_a_body_does_not_count(server: tuple[str, int]) -> None:
    with connect(server) as sock:
        sock.sendall(head_of(LIMITS.max_header_bytes))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    with connect(server) as sock:
        sock.sendall(head_of(LIMITS.max_header_bytes + 1))
        assert status_of(read_response(sock)) == 431
    body = b"y" * (4 * LIMITS.max_header_bytes)
    post = b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % len(body)
    with connect(server) as sock:  # head and body in one send: only the head is limited
        sock.sendall(post + body + GET)  # and a pipelined request after them
        answers = b""
        while answers.count(b"HTTP/1.1 200 ") < 2:
            answers += sock.recv(65536)
        assert b"\r\n\r\n%d" % len(body) in answers


def test_too_many_header_lines_are_a_431(server: tuple[str, int]) -> None:
    lines = b"".join(b"X-%d: v\r\n" % i for i in range(LIMITS.max_header_count))  # + Host: one over
    with connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n" + lines + b"\r\n")
        answer = read_response(sock)
    assert status_of(answer) == 431 and b"header lines" in answer
    fewer = b"".join(b"X-%d: v\r\n" % i for i in range(LIMITS.max_header_count - 1))
    with connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n" + fewer + b"\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


def send_huge_head(address: tuple[str, int], head: bytes) -> bytes:
    """Send ``head`` from a thread (the server answers long before it is all sent) while
    reading the answer here."""
    with connect(address) as sock:

        def send() -> None:
            with contextlib.suppress(OSError):  # the server closes after its answer
                sock.sendall(head)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = read_response(sock)
        sender.join(timeout=10)
    return answer


def test_megabyte_heads_are_refused_without_being_read(server: tuple[str, int]) -> None:
    big = b"GET / HTTP/1.1\r\nHost: test\r\nX-Big: " + b"b" * (8 * 1024 * 1024) + b"\r\n\r\n"
    assert status_of(send_huge_head(server, big)) == 431
    many = b"GET / HTTP/1.1\r\nHost: test\r\n" + b"X-A: b\r\n" * 20_000 + b"\r\n"
    assert status_of(send_huge_head(server, many)) == 431
    with connect(server) as sock:  # the server is fine
        sock.sendall(GET)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


def test_connections_over_the_cap_are_refused_until_some_close(server: tuple[str, int]) -> None:
    held = [connect(server) for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.1)  # let the server accept them all
        with connect(server) as extra:
            assert status_of(read_response(extra)) == 503
        for sock in held:  # idle: closed by the head deadline, which frees their places
            closed_after(sock, LIMITS.header_timeout_s + SLACK_S)
    finally:
        for sock in held:
            sock.close()
    with connect(server) as sock:
        sock.sendall(GET)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


def test_limits_check_their_values() -> None:
    with pytest.raises(ValueError, match="header_timeout_s must be positive"):
        ConnectionLimits(header_timeout_s=0)
    with pytest.raises(ValueError, match="max_connections must be >= 1"):
        ConnectionLimits(max_connections=0)


def test_the_open_file_limit_is_raised_or_the_cap_lowered(monkeypatch: pytest.MonkeyPatch) -> None:
    limits: dict[str, tuple[int, int]] = {"now": (1024, 4096)}
    monkeypatch.setattr(resource, "getrlimit", lambda _: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda _, value: limits.update(now=value))
    assert raise_open_file_limit(1000) == 1000
    assert limits["now"] == (1000 + connection_limits.RESERVED_FILES, 4096)
    limits["now"] = (1024, 1024)  # the hard limit is too low: fewer connections
    assert raise_open_file_limit(1000) == 1024 - connection_limits.RESERVED_FILES
    limits["now"] = (100, 100)
    with pytest.raises(ValueError, match="leaves no room for connections"):
        raise_open_file_limit(1000)


def test_serve_flags_have_production_defaults() -> None:
    args = build_parser().parse_args(["serve", "--bundle", "b"])
    defaults = ConnectionLimits()
    assert (args.timeout_header, args.timeout_body, args.timeout_keep_alive) == (
        defaults.header_timeout_s,
        defaults.body_timeout_s,
        defaults.keep_alive_s,
    )
    assert (args.limit_connections, args.limit_header_bytes, args.limit_header_count) == (
        defaults.max_connections,
        defaults.max_header_bytes,
        defaults.max_header_count,
    )
    with pytest.raises(SystemExit):  # one way to give the admin token, not two
        build_parser().parse_args(
            ["serve", "--bundle", "b", "--admin-token", "x", "--admin-token-file", "f"]
        )


# --------------------------------------------------------------------------- recsys serve
SERVE_HEADER_TIMEOUT_S = 3.0
IDLE, SLOWLORIS = 300, 100


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited with {process.returncode}"
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


@pytest.fixture
def enough_open_files() -> Iterator[None]:
    """This process holds 400+ sockets; the server inherits the limit (and raises its own)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1024 if hard == resource.RLIM_INFINITY else min(1024, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
def test_recsys_serve_keeps_answering_through_idle_and_slowloris_connections(
    tiny_bundle: tuple[Path, Path], tmp_path: Path, enough_open_files: None
) -> None:
    data, bundle = tiny_bundle
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "cli.main", "serve", "--bundle", str(bundle)]
    command += ["--data", str(data), "--port", str(port)]
    command += ["--feedback-db", str(tmp_path / "feedback.sqlite3"), "--log-level", "warning"]
    command += ["--timeout-header", str(SERVE_HEADER_TIMEOUT_S)]
    with (tmp_path / "server.err").open("wb") as err:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    stalled: list[socket.socket] = []
    try:
        wait_ready(url, server)
        opened = time.monotonic()
        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(IDLE)]
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(SLOWLORIS)]
        for sock in slow:
            sock.sendall(b"POST /v1/recommend HTTP/1.1\r\nHost: x\r\n")
        stalled += slow
        stop = threading.Event()

        def drip() -> None:  # one more header byte every 0.2 s on each slowloris connection
            while not stop.wait(0.2):
                for sock in slow:
                    with contextlib.suppress(OSError):
                        sock.send(b"a")

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()

        # While all 400 are open (the deadline has not passed yet): normal requests answer.
        latencies = []
        with httpx.Client(timeout=10) as client:
            while time.monotonic() - opened < SERVE_HEADER_TIMEOUT_S - 0.5:
                started = time.perf_counter()
                answer = client.post(f"{url}/v1/recommend", json={"user_id": "u", "k": 5})
                latencies.append(time.perf_counter() - started)
                assert answer.status_code == 200, answer.text
        assert len(latencies) >= 10

        # Every stalled connection is closed by the server, within the deadline.
        selector = selectors.DefaultSelector()
        for sock in stalled:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        closed_at: dict[int, float] = {}
        limit = opened + SERVE_HEADER_TIMEOUT_S + SLACK_S
        while len(closed_at) < len(stalled) and time.monotonic() < limit:
            for key, _ in selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    if sock.recv(65536):
                        continue  # the 408 of a slowloris connection; its close follows
                except OSError:
                    pass
                closed_at[sock.fileno()] = time.monotonic() - opened
                selector.unregister(sock)
        stop.set()
        dripper.join(timeout=5)
        assert len(closed_at) == len(stalled), f"{len(stalled) - len(closed_at)} still open"
        # Each deadline runs from its connection's opening, a little after `opened`.
        assert max(closed_at.values()) <= SERVE_HEADER_TIMEOUT_S + SLACK_S
        assert min(closed_at.values()) >= SERVE_HEADER_TIMEOUT_S - 0.5

        # Afterwards, still answering; and huge heads are refused.
        assert httpx.post(f"{url}/v1/recommend", json={"user_id": "u"}, timeout=10).is_success
        address = ("127.0.0.1", port)
        big = b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (8 * 1024 * 1024) + b"\r\n\r\n"
        assert status_of(send_huge_head(address, big)) in (400, 431)
        many = b"GET /readyz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 20_000 + b"\r\n"
        assert status_of(send_huge_head(address, many)) in (400, 431)
        p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else latencies[0]
        print(
            f"\n{len(latencies)} requests beside {len(stalled)} stalled connections: "
            f"p50 {statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; "
            f"closed {min(closed_at.values()):.2f}-{max(closed_at.values()):.2f} s after "
            f"opening (deadline {SERVE_HEADER_TIMEOUT_S} s)"
        )
    finally:
        for sock in stalled:
            sock.close()
        server.terminate()
        server.wait(timeout=30)
    log = (tmp_path / "server.err").read_text()
    assert "Traceback" not in log, log


def test_serve_admin_token_options_reach_the_workers(
    tiny_bundle: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--admin-token-file sets RECSYS_ADMIN_TOKEN_FILE; a token file the settings refuse stops
    ``recsys serve`` in one line, before uvicorn starts."""
    from cli import serve_command

    _, bundle = tiny_bundle
    started: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: started.append(kwargs))
    for name in ("RECSYS_ADMIN_TOKEN", "RECSYS_ADMIN_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("a-long-enough-admin-token\n")
    monkeypatch.setattr(os, "environ", dict(os.environ))  # what run_server sets stays here
    serve_command.run_server(bundle, admin_token_file=token_file, feedback_db=tmp_path / "f.db")
    assert os.environ["RECSYS_ADMIN_TOKEN_FILE"] == str(token_file.resolve())
    assert isinstance(started[0]["http"], functools.partial) and started[0]["ws"] == "none"

    token_file.write_text("tiny-tok")
    with pytest.raises(ConfigError, match="admin token has 8 characters") as caught:
        serve_command.run_server(bundle, admin_token_file=token_file, feedback_db=tmp_path / "f.db")
    assert "tiny-tok" not in str(caught.value), "the refused token is not echoed"


def test_the_deprecated_admin_token_flag_warns(
    tiny_bundle: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cli import serve_command
    from cli.main import main

    _, bundle = tiny_bundle
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(serve_command, "run_server", lambda *a, **k: calls.append(k))
    token = "a-long-enough-admin-token"
    assert main(["serve", "--bundle", str(bundle), "--admin-token", token]) == 0
    assert calls[0]["admin_token"] == token
    assert "--admin-token is deprecated" in capsys.readouterr().err
