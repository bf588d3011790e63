"""Progress events of long-running work (training, evaluation), for whoever wants to show them.

Library code never prints. A function that takes a while accepts ``progress: ProgressReporter |
None`` and reports, through :func:`stage`, what it is doing: a named stage starts, advances by
steps (epochs, boosting rounds, batches; each step may carry metrics such as a loss) and
finishes with its wall time. Stages nest: a stage opened while another is open belongs to it
(the two-tower's epochs inside the two-tower's fit). The command line shows the events on a
terminal (``cli/progress.py``); :class:`StageLog` records them, for tests and for the stage
times that ``recsys train`` writes next to the model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol


class ProgressReporter(Protocol):
    """Receives the events of :func:`stage`, in the order they happen, on the calling thread."""

    def started(self, stage: str, total: int | None) -> None:
        """``stage`` began; ``total``: the steps it will take at most (None: not counted)."""

    def advanced(self, stage: str, metrics: Mapping[str, float]) -> None:
        """``stage`` completed one step; ``metrics``: what that step measured (may be empty)."""

    def finished(self, stage: str, seconds: float) -> None:
        """``stage`` ended after ``seconds`` of wall time: before ``total`` steps perhaps (early
        stopping), or by an exception, which then propagates to the caller."""


class StageSteps:
    """What :func:`stage` yields: reports the steps of its stage (a no-op without a reporter)."""

    def __init__(self, progress: ProgressReporter | None, name: str) -> None:
        self._progress, self._name = progress, name

    def advance(self, **metrics: float | None) -> None:
        """One more step; metrics that are ``None`` (not measured this step) are left out."""
        if self._progress is not None:
            measured = {key: float(value) for key, value in metrics.items() if value is not None}
            self._progress.advanced(self._name, measured)


@contextmanager
def stage(
    progress: ProgressReporter | None, name: str, total: int | None = None
) -> Iterator[StageSteps]:
    """Report the work of the ``with`` block as stage ``name`` (nothing at all when ``progress``
    is None). Every started stage finishes, also when the block raises, so that a reporter's
    stages always nest."""
    if progress is not None:
        progress.started(name, total)
    started = time.perf_counter()
    try:
        yield StageSteps(progress, name)
    finally:
        if progress is not None:
            progress.finished(name, time.perf_counter() - started)


class StageLog:
    """A reporter that records every event and the wall time of each outermost stage, and passes
    the events on to ``forward`` (if any).

    events: ``(kind, stage)`` in order, kind one of ``"started"``, ``"advanced"``, ``"finished"``.
    seconds: outermost stage -> its wall time, in the order they finished (a stage name met
        twice adds up).
    """

    def __init__(self, forward: ProgressReporter | None = None) -> None:
        self.forward = forward
        self.events: list[tuple[str, str]] = []
        self.seconds: dict[str, float] = {}
        self._open: list[str] = []

    def started(self, stage: str, total: int | None) -> None:
        self.events.append(("started", stage))
        self._open.append(stage)
        if self.forward is not None:
            self.forward.started(stage, total)

    def advanced(self, stage: str, metrics: Mapping[str, float]) -> None:
        self.events.append(("advanced", stage))
        if self.forward is not None:
            self.forward.advanced(stage, metrics)

    def finished(self, stage: str, seconds: float) -> None:
        self.events.append(("finished", stage))
        if self._open and self._open[-1] == stage:
            self._open.pop()
        if not self._open:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        if self.forward is not None:
            self.forward.finished(stage, seconds)

    def names(self, kind: str) -> list[str]:
        """The stages of every event of ``kind``, in order."""
        return [name for event, name in self.events if event == kind]
