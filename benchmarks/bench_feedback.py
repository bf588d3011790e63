"""Benchmark: feedback log appends/s, 1 and 100 events per append, synchronous FULL vs NORMAL.

Each configuration appends to a fresh SQLite file: ``--singles`` appends of one event (the
``POST /v1/feedback`` case: one commit per request) and ``--batches`` appends of ``--batch-size``
events. We report appends/s and events/s over the whole run, per-append latency p50/p99, and
how fast the log reads back as an interaction frame. FULL fsyncs the WAL at every commit, so its
figures depend on the disk more than on the CPU: the file system is reported with them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import median_seconds, peak_rss_mb, write_result
from pipeline.feedback_log import FeedbackEvent, FeedbackLog, FeedbackLogConfig, SynchronousMode


def file_system(path: Path) -> str:
    """The type of the file system holding ``path`` (longest mount point that contains it)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fs_type, *_ = line.split()
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fs_type
    except OSError:
        pass
    return kind


def make_events(log: FeedbackLog, prefix: str, n: int) -> list[FeedbackEvent]:
    """``n`` click events with distinct ids, built before the clock starts."""
    return [
        log.make_event(f"{prefix}-{i}", f"u{i % 1000}", f"i{i % 5000}", "click") for i in range(n)
    ]


def time_appends(log: FeedbackLog, batches: list[list[FeedbackEvent]]) -> dict[str, float]:
    """Append every batch, one transaction each; throughput and per-append latency."""
    latencies = np.empty(len(batches))
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        result = log.append(batch)
        latencies[i] = time.perf_counter() - t0
        assert result.accepted == len(batch)
    total = time.perf_counter() - start
    n_events = sum(len(b) for b in batches)
    return {
        "appends_per_s": len(batches) / total,
        "events_per_s": n_events / total,
        "append_p50_ms": float(np.percentile(latencies, 50) * 1e3),
        "append_p99_ms": float(np.percentile(latencies, 99) * 1e3),
    }


def main(argv: list[str] | None = None) -> dict[str, float | int | str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--singles", type=int, default=2_000, help="one-event appends")
    parser.add_argument("--batches", type=int, default=200, help="appends of --batch-size events")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--dir", type=Path, default=None, help="where the log files go (a disk!)")
    args = parser.parse_args(argv)

    figures: dict[str, float | int | str] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        figures["file_system"] = file_system(Path(tmp).resolve())
        modes: tuple[SynchronousMode, ...] = ("FULL", "NORMAL")
        for mode in modes:
            path = Path(tmp) / f"feedback-{mode.lower()}.db"
            with FeedbackLog(FeedbackLogConfig(path=path, synchronous=mode)) as log:
                singles = [[e] for e in make_events(log, "s", args.singles)]
                events = make_events(log, "b", args.batches * args.batch_size)
                batches = [
                    events[i : i + args.batch_size] for i in range(0, len(events), args.batch_size)
                ]
                runs = {
                    "single": time_appends(log, singles),
                    f"batch{args.batch_size}": time_appends(log, batches),
                }
                for run, stats in runs.items():
                    for key, value in stats.items():
                        figures[f"{mode.lower()}_{run}_{key}"] = value
                seconds, _ = median_seconds(log.to_frame, repeats=3)
                figures[f"{mode.lower()}_to_frame_rows_per_s"] = log.count() / seconds
            figures[f"{mode.lower()}_file_mb"] = os.path.getsize(path) / 2**20
    figures["singles"] = args.singles
    figures["batch_events"] = args.batches * args.batch_size
    figures["peak_rss_mb"] = peak_rss_mb()
    out = write_result("feedback", figures)
    for key, figure in figures.items():
        print(f"{key}: {figure:,.3f}" if isinstance(figure, float) else f"{key}: {figure}")
    print(f"wrote {out}")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
