"""Keep one worker's online state and bundle in step with the shared feedback log.

Every worker (a uvicorn process, or a replica on another machine) answers from its own memory:
its online state and its loaded bundle. What makes N of them one service is that each follows
the same log:

* every ``interval_s``, :meth:`RecommenderService.catch_up` applies what any worker logged
  since the last tick (catalogue updates, then feedback events, by sequence number), so feedback
  accepted by one worker reaches the others' next recommendations within about one interval
  plus a read;
* every ``generation_interval_s``, :meth:`RecommenderService.follow_published` loads and warms
  the newest published bundle generation while the current one serves, then swaps it in. It
  runs on its own thread: loading a bundle takes seconds, and the feedback must keep flowing
  meanwhile.

A log that cannot be read (the database is down) is retried with a back-off up to
``max_backoff_s``; the worker goes on serving from what it holds. One warning per outage, one
line when it ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.feedback_log import FeedbackLogBusyError
from pipeline.service import RecommenderService

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FollowerConfig:
    """How often a worker looks at the log."""

    # The feedback visibility lag across workers is about this plus one read (target p99 of
    # 100 ms on one machine; docs/benchmarks.md, "Mixed load"); a tick that finds nothing new
    # costs two indexed reads (~0.1 ms on SQLite).
    interval_s: float = 0.02
    # A new bundle generation is rare; each look is one indexed read.
    generation_interval_s: float = 0.5
    # Ceiling of the back-off while the log cannot be read.
    max_backoff_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("interval_s", "generation_interval_s", "max_backoff_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class LogFollower:
    """Two daemon threads that keep ``service`` following its log (module doc)."""

    def __init__(
        self,
        service: RecommenderService,
        config: FollowerConfig | None = None,
        *,
        on_step: Callable[[], None] | None = None,
    ) -> None:
        """on_step: called after each successful step of either thread (e.g. to export the
        position reached as a gauge)."""
        self.service = service
        self.config = config if config is not None else FollowerConfig()
        self._on_step = on_step
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._loop,
                args=(service.catch_up, self.config.interval_s, "feedback"),
                name="log-follower",
                daemon=True,
            ),
            threading.Thread(
                target=self._loop,
                args=(service.follow_published, self.config.generation_interval_s, "bundle"),
                name="bundle-follower",
                daemon=True,
            ),
        ]

    def start(self) -> LogFollower:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop both threads (a bundle load in progress finishes first, up to ``timeout_s``)."""
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout_s)

    def _loop(self, step: Callable[[], object], interval_s: float, what: str) -> None:
        wait_s, failing = interval_s, False
        while not self._stop.wait(wait_s):
            try:
                step()
            except FeedbackLogBusyError as exc:
                if not failing:
                    logger.warning("cannot follow the %s log, retrying: %s", what, exc)
                failing = True
                wait_s = min(self.config.max_backoff_s, max(wait_s * 2, 0.05))
                continue
            except Exception:  # a bug must not stop the worker from following for good
                logger.exception("following the %s log failed; retrying", what)
                wait_s = self.config.max_backoff_s
                continue
            if self._on_step is not None:
                self._on_step()
            if failing:
                logger.info("following the %s log again", what)
            wait_s, failing = interval_s, False
