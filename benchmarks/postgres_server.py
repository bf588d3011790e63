"""A throw-away PostgreSQL server for the tests and the mixed-load benchmark: ``initdb`` +
``pg_ctl`` in a temporary directory.

Debian's ``postgresql`` package (``make test`` installs it where it may: root with apt-get)
puts the server under ``/usr/lib/postgresql/<version>/bin``. ``initdb`` and ``postgres`` refuse
to run as root, so under root the server runs as ``nobody`` (through ``setpriv``), in a
directory that user owns. Where no server can be started, :class:`PostgresUnavailableError` says why
and the tests that need one skip with that reason.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_UNPRIVILEGED_USER = "nobody"


class PostgresUnavailableError(RuntimeError):
    """No PostgreSQL server could be started here (the message says why)."""


@dataclass
class PostgresServer:
    root: Path
    bin_dir: Path
    port: int
    run_as: list[str]

    @property
    def url(self) -> str:
        """The superuser's URL (trust authentication on 127.0.0.1)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def pg_ctl(self, *args: str, timeout: float = 60.0) -> None:
        command = [*self.run_as, str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data")]
        result = subprocess.run(
            [*command, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            log = (self.root / "server.log").read_text(errors="replace")[-2000:]
            raise PostgresUnavailableError(
                f"pg_ctl {' '.join(args)} failed: {result.stderr.strip()} | {log}"
            )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            "-c max_connections=100 -c shared_buffers=16MB"
        )
        self.pg_ctl("-o", options, "-l", str(self.root / "server.log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-m", mode, "-w", "stop")


def find_bin_dir() -> Path | None:
    """The newest PostgreSQL server's bin directory, or None."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server() -> PostgresServer:
    """Initialise and start a throw-away server (raises :class:`PostgresUnavailableError`)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise PostgresUnavailableError(
            "no PostgreSQL server binaries (initdb); `make test` installs Debian's postgresql "
            "package when run as root"
        )
    root = Path(tempfile.mkdtemp(prefix="recsys-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam(_UNPRIVILEGED_USER)
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--clear-groups",
            "--",
        ]
    init = subprocess.run(
        [
            *run_as,
            str(bin_dir / "initdb"),
            "-D",
            str(root / "data"),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",  # a throw-away cluster: no need to fsync its template files
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "LC_ALL": "C"},
    )
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise PostgresUnavailableError(f"initdb failed: {init.stderr.strip()[-500:]}")
    server = PostgresServer(root, bin_dir, free_port(), run_as)
    try:
        server.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return server


def wait_accepting(url: str, timeout_s: float = 30.0) -> None:
    import psycopg

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
