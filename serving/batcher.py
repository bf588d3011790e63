"""Dynamic batching: concurrent single requests answered by one ``Pipeline`` call.

Most of a request's CPU is fixed cost per call (Python dispatch, one FAISS search, one LightGBM
call, array set-up), not per user, so the batch-first Pipeline answers two users at once in ~1.4x
the time of one (docs/benchmarks.md). One dispatcher thread takes whatever requests are waiting
when it becomes free, up to ``max_batch``, and answers them together. Nothing waits on purpose:
an idle service answers each request alone, as before; a loaded one forms bigger batches, so its
cost per request falls as load rises instead of the queue growing without bound.

One request must not fail its neighbours (batch isolation). The Pipeline degrades instead of
raising, so a batch that raises, or whose answer says a stage failed (``<stage>:error``), may have
been failed by one request's data; each of its requests is then answered alone, so only the
culprit is affected: a ``ValueError`` (``DataError`` included) raised for it alone is its input's
fault (:class:`RequestInputError`, a 422 over HTTP), any other failure gets the pipeline's
fallback (popular items minus seen and excluded, ``pipeline:error`` in ``degraded``, a 200), and
a stage error alone is its own degraded answer. When every request of a batch fails alone too,
the fault is not one request's (a ranker shard down): for ``isolation_pause_s`` batches with a
stage error are not answered again alone, so a service that is already degraded does not also
do each batch's work once per request.

The HTTP service uses it; batch recommendation, evaluation and the simulator call the Pipeline
with their own batches directly.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from pipeline.funnel import Pipeline, Recommendation, RecommendRequest
from serving.errors import escape_unprintable

logger = logging.getLogger(__name__)

_STOP = object()
# The degraded flag of an answer that the pipeline could not compute at all (the fallback's).
PIPELINE_ERROR = "pipeline:error"


class RequestInputError(Exception):
    """The pipeline could not answer a request, alone, because of what it asked for."""

    def __init__(self, cause: ValueError) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


def has_stage_error(answers: Sequence[Recommendation]) -> bool:
    """Whether a stage failed (raised) while computing ``answers``; a timeout is load, not a
    request's fault, and does not count."""
    return any(flag.endswith(":error") for answer in answers for flag in answer.degraded)


class RequestBatcher:
    """Answers :meth:`submit`-ted requests in batches of up to ``max_batch`` on one thread.

    pipeline: called once per batch, so a hot reload takes effect at the next batch.
    isolation_pause_s: after a batch whose requests all failed alone too, how long batches with
        a stage error are answered as they are (module docstring); 1 s bounds the extra work of
        a persistent fault to one isolated batch a second.
    """

    def __init__(
        self,
        pipeline: Callable[[], Pipeline],
        *,
        max_batch: int = 8,
        isolation_pause_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if isolation_pause_s < 0:
            raise ValueError(f"isolation_pause_s must be >= 0, got {isolation_pause_s}")
        self.pipeline = pipeline
        self.max_batch = max_batch
        self.isolation_pause_s = isolation_pause_s
        self._clock = clock
        self._isolation_paused_until = float("-inf")
        self._queue: queue.SimpleQueue[tuple[RecommendRequest, Future[Recommendation]] | object]
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="request-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: RecommendRequest) -> Future[Recommendation]:
        """A future of the answer to ``request``; cancelling it before its batch starts
        withdraws the request."""
        if not self._thread.is_alive():
            raise RuntimeError("the request batcher is closed")
        answer: Future[Recommendation] = Future()
        self._queue.put((request, answer))
        return answer

    def close(self) -> None:
        """Answer what is queued, then stop the dispatcher."""
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._answer(batch)  # type: ignore[arg-type]
            if stop:
                return

    def _answer(self, batch: list[tuple[RecommendRequest, Future[Recommendation]]]) -> None:
        # A caller that stopped waiting (its deadline passed while the request queued) has
        # cancelled its future: skip it, so an overloaded service does not compute answers nobody
        # reads. The others are marked running: from here on a cancel fails.
        batch = [(req, answer) for req, answer in batch if answer.set_running_or_notify_cancel()]
        if not batch:
            return
        pipeline = self.pipeline()  # one pipeline for the batch and its retries (hot reload)
        try:
            answers = pipeline.recommend([request for request, _ in batch])
        except Exception as exc:  # the Pipeline degrades instead of raising: one request's fault?
            if len(batch) == 1:
                self._answer_failed(pipeline, *batch[0], exc)
            else:
                logger.warning(
                    "a batch of %d requests failed (%s); answering each alone",
                    len(batch),
                    escape_unprintable(repr(exc)),
                )
                self._answer_alone(pipeline, batch)
            return
        if len(batch) > 1 and has_stage_error(answers) and not self._isolation_paused():
            self._answer_alone(pipeline, batch)
            return
        for (_, future), answer in zip(batch, answers, strict=True):
            future.set_result(answer)

    def _isolation_paused(self) -> bool:
        return self._clock() < self._isolation_paused_until

    def _answer_alone(
        self, pipeline: Pipeline, batch: list[tuple[RecommendRequest, Future[Recommendation]]]
    ) -> None:
        """Answer each request of a failed batch with its own pipeline call."""
        failed = 0
        for request, future in batch:
            try:
                answer = pipeline.recommend([request])[0]
            except Exception as exc:
                failed += 1
                self._answer_failed(pipeline, request, future, exc)
                continue
            failed += has_stage_error([answer])
            future.set_result(answer)
        if failed == len(batch):
            self._isolation_paused_until = self._clock() + self.isolation_pause_s
            logger.warning(
                "all %d requests of a batch failed alone too: not one request's fault; batches "
                "with a stage error are not answered alone for %.1f s",
                failed,
                self.isolation_pause_s,
            )

    @staticmethod
    def _answer_failed(
        pipeline: Pipeline,
        request: RecommendRequest,
        future: Future[Recommendation],
        exc: Exception,
    ) -> None:
        """Settle the future of a request whose pipeline call, alone, raised ``exc``."""
        user = escape_unprintable(repr(request.user_id))
        if isinstance(exc, ValueError):  # DataError, UnicodeError: what it asked for is the cause
            logger.warning("request of user %s refused: %s", user, escape_unprintable(repr(exc)))
            future.set_exception(RequestInputError(exc))
            return
        logger.error("request of user %s failed; answering with the fallback", user, exc_info=exc)
        try:
            answer = pipeline.fallback([request], PIPELINE_ERROR)[0]
        except Exception:
            logger.exception("the fallback failed too for user %s", user)
            future.set_exception(exc)
            return
        future.set_result(answer)
