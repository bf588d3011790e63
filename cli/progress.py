"""Progress of ``recsys train`` and ``recsys evaluate`` on a terminal (rich).

The library reports stages through a :class:`~data.progress.ProgressReporter`; this module shows
them as live rows on stderr: one row per stage, indented under the stage it belongs to, with its
steps (epochs, boosting rounds, batches), the last step's metrics and the elapsed time. Only on a
terminal, or when asked (``--progress``): in pipes and tests the commands print their results
and a summary line, nothing else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from data.progress import ProgressReporter

RUNNING, DONE = "[yellow]…[/]", "[green]✓[/]"


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress on stderr (default: when stderr is a terminal)",
    )


def wants_progress(flag: bool | None) -> bool:
    """``--progress`` / ``--no-progress`` if given, else whether stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag


class RichProgress:
    """A :class:`~data.progress.ProgressReporter` that draws each stage as a row of a rich
    ``Progress`` display (use :func:`terminal_progress`, which starts and stops the display)."""

    def __init__(self, display: Progress) -> None:
        self.display = display
        self._open: list[_Row] = []  # open stages, outermost first

    def started(self, stage: str, total: int | None) -> None:
        indent = "  " * len(self._open)
        count = "" if total is None else f"0/{total}"
        task = self.display.add_task(
            f"{indent}{stage}", total=total, mark=RUNNING, count=count, metrics=""
        )
        self._open.append(_Row(stage, task, total))

    def advanced(self, stage: str, metrics: Mapping[str, float]) -> None:
        row = self._row(stage)
        if row is not None:
            row.done += 1
            count = f"{row.done}" if row.total is None else f"{row.done}/{row.total}"
            shown = "  ".join(f"{name} {value:.4g}" for name, value in metrics.items())
            self.display.update(row.task, completed=row.done, count=count, metrics=shown)

    def finished(self, stage: str, seconds: float) -> None:
        row = self._row(stage)
        if row is None:
            return
        self._open.remove(row)
        # A stage without counted steps shows a full bar once done; one that stopped early
        # (early stopping) keeps its count of the steps it took, e.g. 7/20.
        if row.total is None:
            self.display.update(row.task, total=1, completed=1)
        self.display.update(row.task, mark=DONE)
        self.display.stop_task(row.task)

    def _row(self, stage: str) -> _Row | None:
        return next((row for row in reversed(self._open) if row.stage == stage), None)


@dataclass
class _Row:
    stage: str
    task: TaskID
    total: int | None
    done: int = 0


@contextmanager
def terminal_progress(enabled: bool) -> Iterator[ProgressReporter | None]:
    """A live rich display on stderr while the block runs (None when not ``enabled``)."""
    if not enabled:
        yield None
        return
    display = Progress(
        TextColumn("{task.fields[mark]}"),
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        TextColumn("{task.fields[count]}", justify="right"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=Console(stderr=True),
    )
    with display:
        yield RichProgress(display)


def stage_summary(seconds: Mapping[str, float]) -> str:
    """``12.3 s: load dataset 0.2 s, fit two_tower 6.1 s, ...``: the total, then each stage."""
    parts = ", ".join(f"{name} {value:.1f} s" for name, value in seconds.items())
    return f"{sum(seconds.values()):.1f} s: {parts}"
