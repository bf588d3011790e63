"""Try a candidate bundle before it serves: load it, build its pipeline, answer a smoke request.

A bundle whose manifest matches can still be unusable: its files were corrupt when the manifest
was written (a truncated FAISS index, a garbage parquet, a half-written LightGBM model), or a
stage raises on its first request. :func:`check_bundle` turns every such failure into a
``BundleError`` naming the cause, so the service refuses the candidate (HTTP 409) and the old
bundle keeps serving.

Some failures are not exceptions: a loader's native code may end the process. LightGBM aborts
(``std::terminate``) on a truncated ``model.txt`` instead of raising. :class:`BundleChecker`
therefore runs the check in a child process first, so such a bundle costs the child, not the
serving worker and the requests in flight on it. The child is started on the first check and
kept for ``idle_s`` seconds after the last one, so a series of reloads pays its start-up (the
imports of torch, FAISS and LightGBM: ~3 s) once.

Run as ``python -m pipeline.bundle_check``: the child's side, one JSON request per line on
stdin (``{"bundle": path}``), one JSON reply per line (``{"ok": true}`` or
``{"ok": false, "error": message}``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from data.errors import BundleError
from pipeline.artifacts import load_artifacts
from pipeline.factory import make_pipeline, online_state_for
from pipeline.funnel import Pipeline, RecommendRequest

# Requested by the smoke test next to a user of the state: no bundle knows it, so the request
# takes the cold-start path too.
SMOKE_UNKNOWN_USER = "bundle-check:unknown-user"
# The logger whose records name a stage that raised (Pipeline._stage logs them, then degrades).
_FUNNEL_LOGGER = "pipeline.funnel"


def check_bundle(path: str | Path) -> str:
    """Load the bundle at ``path`` as the service does and answer a smoke request with it.

    Returns its model_version; raises ``BundleError`` naming the cause for any failure.
    """
    bundle = Path(path)
    try:
        artifacts = load_artifacts(bundle, mmap=True)
        pipeline = make_pipeline(artifacts, online_state_for(artifacts), enforce_budgets=False)
        smoke_test(pipeline)
    except BundleError:
        raise
    except Exception as exc:  # any failure of a loader or a stage: the bundle is refused
        raise BundleError(f"bundle {str(bundle)!r} could not be loaded: {describe(exc)}") from exc
    return artifacts.model_version


def smoke_test(pipeline: Pipeline) -> None:
    """Answer one batch (a user the state holds and an unknown user) with every stage, without
    budgets; ``BundleError`` if a stage raises.

    A stage that raises degrades a served answer instead of failing it (``Pipeline._stage``), so
    the failures are read from the answer's ``degraded`` and their causes from the log records
    the pipeline wrote on this thread.
    """
    known = pipeline.state.user_ids()[:1]
    requests = [RecommendRequest(user, k=10, explain=True) for user in [*known, SMOKE_UNKNOWN_USER]]
    rehearsal = Pipeline(
        pipeline.artifacts,
        pipeline.state,
        ranker=pipeline.ranker,
        reranker=pipeline.reranker,
        enforce_budgets=False,
        clock=pipeline.clock,
    )
    with _stage_failures() as causes:
        answers = rehearsal.recommend(requests)
    failed = sorted(
        {note for answer in answers for note in answer.degraded if note.endswith(":error")}
    )
    if failed:
        detail = "; ".join(causes) or "see the service log"
        raise BundleError(
            f"bundle {str(pipeline.artifacts.path)!r}: a smoke request failed in "
            f"{', '.join(failed)} ({detail})"
        )


def describe(exc: BaseException) -> str:
    """``Type: message``, with the file when the exception names one."""
    text = f"{type(exc).__name__}: {exc}".strip()
    filename = getattr(exc, "filename", None)
    if filename and str(filename) not in text:
        text += f" ({filename})"
    return text


@contextlib.contextmanager
def _stage_failures() -> Iterator[list[str]]:
    """Collect the causes of the stage failures this thread logs inside the block."""
    causes: list[str] = []
    thread = threading.get_ident()

    class Collector(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.thread == thread and record.exc_info and record.exc_info[1] is not None:
                causes.append(f"{record.getMessage()}: {describe(record.exc_info[1])}")

    collector = Collector(level=logging.ERROR)
    funnel_logger = logging.getLogger(_FUNNEL_LOGGER)
    funnel_logger.addHandler(collector)
    try:
        yield causes
    finally:
        funnel_logger.removeHandler(collector)


class BundleChecker:
    """Runs :func:`check_bundle` in a child process (see the module docstring).

    timeout_s: longest a check may take (loading the largest bundle with a cold page cache, with
    room to spare); past it the child is killed and the candidate refused.
    idle_s: the child exits this long after its last check, returning its memory (the imported
    libraries: a few hundred MB).
    """

    def __init__(self, *, timeout_s: float = 600.0, idle_s: float = 60.0) -> None:
        if timeout_s <= 0 or idle_s <= 0:
            raise ValueError(f"timeout_s ({timeout_s}) and idle_s ({idle_s}) must be positive")
        self.timeout_s = timeout_s
        self.idle_s = idle_s
        self._lock = threading.Lock()  # one check at a time; guards the child and the timer
        # The running child, if any: a list shared with the finalizer, which reaps the child if
        # the checker is dropped without close() (and at interpreter exit).
        self._child: list[subprocess.Popen[bytes] | None] = [None]
        self._idle_timer: threading.Timer | None = None
        weakref.finalize(self, _stop_child, self._child)

    def check(self, bundle: str | Path) -> None:
        """Return if the bundle loads and answers in the child; ``BundleError`` otherwise."""
        # Absolute (the child keeps the working directory it started in), but not resolved:
        # a path the OS refuses (a NUL byte, a name too long) is the child's to refuse, as
        # verify_bundle refuses it in this process.
        path = os.path.abspath(os.fspath(bundle))
        with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            child = self._ensure_child()
            try:
                reply = self._ask(child, path)
            except BundleError:
                self._stop()
                raise
            self._arm_idle_timer()
        if not reply.get("ok"):
            raise BundleError(str(reply.get("error") or f"bundle {path!r} refused"))

    def close(self) -> None:
        with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            self._stop()

    # -- internals (callers hold self._lock) ---------------------------------------------------
    def _ensure_child(self) -> subprocess.Popen[bytes]:
        child = self._child[0]
        if child is not None and child.poll() is None:
            return child
        self._stop()
        child = subprocess.Popen(
            [sys.executable, "-m", "pipeline.bundle_check"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # A session of its own: a terminal's Ctrl-C goes to the server, which stops it.
            start_new_session=True,
        )
        self._child[0] = child
        return child

    def _ask(self, child: subprocess.Popen[bytes], path: str) -> dict[str, object]:
        assert child.stdin is not None and child.stdout is not None
        try:
            child.stdin.write(json.dumps({"bundle": path}).encode() + b"\n")
            child.stdin.flush()
        except OSError as exc:  # it died between two checks
            raise BundleError(f"bundle {path!r}: the checking process is gone ({exc})") from exc
        ready, _, _ = select.select([child.stdout], [], [], self.timeout_s)
        line = child.stdout.readline() if ready else b""
        if not ready:
            raise BundleError(f"bundle {path!r}: loading it took more than {self.timeout_s:.0f} s")
        if not line:  # end of output: the child died while loading this bundle
            try:
                code = child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            raise BundleError(f"bundle {path!r}: the process loading it {_death(code)}")
        reply: dict[str, object] = json.loads(line)
        return reply

    def _arm_idle_timer(self) -> None:
        timer = threading.Timer(self.idle_s, self._stop_if_idle)
        timer.daemon = True  # never holds up the interpreter's exit
        self._idle_timer = timer
        timer.start()

    def _stop_if_idle(self) -> None:
        with self._lock:
            if self._idle_timer is threading.current_thread():
                self._idle_timer = None
                self._stop()

    def _stop(self) -> None:
        _stop_child(self._child)


def _stop_child(holder: list[subprocess.Popen[bytes] | None]) -> None:
    """Ask a child to exit (end of its input), kill it if it does not, and reap it."""
    child = holder[0]
    if child is None:
        return
    holder[0] = None
    with contextlib.suppress(OSError):
        if child.stdin is not None:
            child.stdin.close()
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    if child.stdout is not None:
        child.stdout.close()


def _death(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (a crash in a native loader)"
    return f"exited with status {code}"


def _serve(requests: IO[bytes], replies: IO[bytes]) -> None:
    """The child's loop: check each bundle named on ``requests``, reply on ``replies``."""
    for line in requests:
        path = json.loads(line)["bundle"]
        started = time.perf_counter()
        try:
            version = check_bundle(path)
        except Exception as exc:  # the reply carries it: every failure refuses the bundle
            reply: dict[str, object] = {"ok": False, "error": str(exc)}
        else:
            reply = {"ok": True, "model_version": version}
            logging.getLogger(__name__).info(
                "bundle %r (%s) checked in %.1f s", path, version, time.perf_counter() - started
            )
        replies.write(json.dumps(reply).encode() + b"\n")
        replies.flush()


def main() -> None:
    # The replies get a private copy of stdout; stdout itself becomes stderr, so that a library
    # printing to stdout (LightGBM does) cannot corrupt them.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with replies:
        _serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
