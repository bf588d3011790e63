"""Dynamic batching: concurrent single requests answered by one ``Pipeline`` call.

Most of a request's CPU is fixed cost per call (Python dispatch, one FAISS search, one LightGBM
call, array set-up), not per user, so the batch-first Pipeline answers two users at once in ~1.4x
the time of one (docs/benchmarks.md). One dispatcher thread takes whatever requests are waiting
when it becomes free, up to ``max_batch``, and answers them together. Nothing waits on purpose:
an idle service answers each request alone, as before; a loaded one forms bigger batches, so its
cost per request falls as load rises instead of the queue growing without bound.

The HTTP service uses it; batch recommendation, evaluation and the simulator call the Pipeline
with their own batches directly.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

from pipeline.funnel import Pipeline, Recommendation, RecommendRequest

logger = logging.getLogger(__name__)

_STOP = object()


class RequestBatcher:
    """Answers :meth:`submit`-ted requests in batches of up to ``max_batch`` on one thread.

    pipeline: called once per batch, so a hot reload takes effect at the next batch.
    """

    def __init__(self, pipeline: Callable[[], Pipeline], *, max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.pipeline = pipeline
        self.max_batch = max_batch
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
        requests = [request for request, _ in batch]
        try:
            answers = self.pipeline().recommend(requests)
        except Exception as exc:  # the Pipeline degrades instead of raising: this is a bug
            logger.exception("a batch of %d requests failed", len(batch))
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), answer in zip(batch, answers, strict=True):
            future.set_result(answer)
