"""Benchmark: one worker's online-state memory under 1M distinct feedback users (issue 21).

The worst case of unauthenticated traffic: every event comes from a user id never seen before,
and every such user also asks for recommendations (a read restores them from the log). Two
phases, each in a process of its own so that its RSS growth is its own:

- ``unbounded``: ``--per-user-sample`` distinct users (default 200k) in a state with no cap, the
  cost of one held user (RSS growth / users). What a worker paid per user before the cap.
- ``bounded``: ``--users`` distinct users (default 1M) in a state bounded at ``--max-users``
  (the service's default cap) over a real feedback log (SQLite, synchronous NORMAL: this
  measures memory, not durability), the service's restore path (``pipeline.service.LogRestore``).
  Per append of ``--append-events`` events: observe, as ``record_feedback`` does, then read every
  user of the append in batches of ``--read-batch`` (the service's default max_batch).

RSS is read from /proc/self/statm after a warm-up round (see ``bounded``), with polars'
allocator set to return freed memory at once (``RSS_ENVIRONMENT``). The budget the cap promises:
``max_users`` x ``BUDGET_BYTES_PER_USER``. The figures: users held (never above the cap), the
bounded phase's RSS growth against that budget and over its second half (flat once the cap is
full), evictions and reads. The state is used directly (no model): its memory does not depend
on the bundle.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import write_result
from data.idmap import IdMap
from pipeline.feedback_log import FeedbackEvent, FeedbackLog, FeedbackLogConfig
from pipeline.online_state import OnlineState
from pipeline.service import DEFAULT_MAX_ONLINE_USERS, LogRestore
from retrieval.stage import RetrievalConfig

# A 1M-item catalogue, as in the load benchmark: a user's seen set holds item indices of it.
N_ITEMS = 1_000_000
HISTORY_LENGTH = RetrievalConfig().history_length  # the default H of a served bundle
EVENTS_PER_USER = 2
# Before the bundle's history cut: nothing filtered out (LogRestore keeps events after it).
START_TIME = 1_700_000_000
MIB = 1024 * 1024
# What one held user may cost a bounded worker, as pipeline/service.py and docs/benchmarks.md
# state it: a 50-event history, the seen items and the LRU's bookkeeping measured ~1.5 KB.
BUDGET_BYTES_PER_USER = 2048
# polars' allocator (jemalloc) keeps freed pages for ~10 s before it returns them: with its decay
# at 0 the RSS follows what is alive, not what polars freed a moment ago.
RSS_ENVIRONMENT = {"_RJEM_MALLOC_CONF": "dirty_decay_ms:0,muzzy_decay_ms:0"}


def rss_bytes() -> int:
    """Resident memory of this process now (not the peak): /proc/self/statm, in bytes."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


def events_of(users: range, rng: np.random.Generator) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``EVENTS_PER_USER`` clicks per user: (user ids, item indices, timestamps)."""
    ids = [f"user-{u}" for u in users for _ in range(EVENTS_PER_USER)]
    items = rng.integers(0, N_ITEMS, size=len(ids), dtype=np.int32)
    times = START_TIME + np.arange(len(ids), dtype=np.int64)
    return ids, items, times


def unbounded(users: int, seed: int) -> dict[str, Any]:
    state = OnlineState(IdMap.from_ids(["seed"]), N_ITEMS, HISTORY_LENGTH)
    rng = np.random.default_rng(seed)
    gc.collect()
    before = rss_bytes()
    for start in range(0, users, 10_000):
        ids, items, times = events_of(range(start, min(start + 10_000, users)), rng)
        state.observe(ids, items, times)
    grown = rss_bytes() - before
    return {"users": len(state), "rss_growth_bytes": grown, "bytes_per_user": grown / len(state)}


def bounded(users: int, max_users: int, append_events: int, read_batch: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    items = IdMap.from_ids([f"item-{i}" for i in range(N_ITEMS)])
    item_names = np.array(items.ids.to_list(), dtype=object)
    with tempfile.TemporaryDirectory() as tmp:
        config = FeedbackLogConfig(path=Path(tmp) / "feedback.sqlite3", synchronous="NORMAL")
        with FeedbackLog(config) as log:
            state = OnlineState(IdMap.from_ids(["seed"]), N_ITEMS, HISTORY_LENGTH)
            restore = LogRestore(log, START_TIME - 1, items)
            state.bound(max_users, restore=restore)
            per_append = max(1, append_events // EVENTS_PER_USER)

            def feed(chunk: range) -> int:
                """Log the chunk's events, observe them, read its users; returns the reads."""
                ids, idx, times = events_of(chunk, rng)
                result = log.append(
                    FeedbackEvent(f"e{chunk.start}-{i}", user, item, "click", int(t), 1.0)
                    for i, (user, item, t) in enumerate(
                        zip(ids, item_names[idx], times, strict=True)
                    )
                )
                state.observe(ids, idx, times, seq=result.last_seq)
                names = [f"user-{u}" for u in chunk]
                for offset in range(0, len(names), read_batch):
                    state.batch(names[offset : offset + read_batch], START_TIME)
                return -(-len(names) // read_batch)

            # One round first, and one restore (none happens before the first eviction), so that
            # the baseline holds what any traffic allocates once: SQLite's page cache, polars'
            # thread pool, the item map's sorted index (tens of MB for 1M items, built by its first
            # lookup, which in a server is the first request's).
            reads = feed(range(users, users + per_append))
            restore([f"user-{users}"])
            gc.collect()
            before = rss_bytes()
            most_held, at_cap, half, started = 0, None, 0, time.perf_counter()
            for start in range(0, users, per_append):
                if not half and start >= users // 2:
                    half = rss_bytes()
                reads += feed(range(start, min(start + per_append, users)))
                most_held = max(most_held, len(state))
                if at_cap is None and len(state) >= max_users:
                    at_cap = (start + per_append, rss_bytes())
            seconds = time.perf_counter() - started
            end = rss_bytes()
            grown = end - before
            events = log.count()
    return {
        "users": users,  # and per_append more, before the baseline
        "events": events,
        "reads": reads,
        "held_at_end": len(state),
        "most_held": most_held,
        "evictions": state.evictions,
        "rss_growth_bytes": grown,
        # Users fed when the cap was first reached, and the growth from then to the end.
        "users_at_cap": at_cap[0] if at_cap else None,
        "rss_growth_after_cap_bytes": end - at_cap[1] if at_cap else None,
        "rss_growth_last_half_bytes": end - half,
        "seconds": seconds,
    }


def run_phase(argv: list[str]) -> dict[str, Any]:
    """Run one phase in a child process; its JSON line is the last line of its output."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_online_memory", *argv],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **RSS_ENVIRONMENT},
    ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000, help="distinct feedback users")
    parser.add_argument("--max-users", type=int, default=DEFAULT_MAX_ONLINE_USERS)
    parser.add_argument("--per-user-sample", type=int, default=200_000)
    parser.add_argument("--append-events", type=int, default=1_000)
    parser.add_argument("--read-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phase", choices=("unbounded", "bounded"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase == "unbounded":
        print(json.dumps(unbounded(args.per_user_sample, args.seed)))
        return {}
    if args.phase == "bounded":
        phase = bounded(args.users, args.max_users, args.append_events, args.read_batch, args.seed)
        print(json.dumps(phase))
        return {}

    common = ["--seed", str(args.seed)]
    cost = run_phase(["--phase", "unbounded", "--per-user-sample", str(args.per_user_sample)])
    capped = run_phase(
        [
            "--phase",
            "bounded",
            "--users",
            str(args.users),
            "--max-users",
            str(args.max_users),
            "--append-events",
            str(args.append_events),
            "--read-batch",
            str(args.read_batch),
            *common,
        ]
    )
    budget = args.max_users * BUDGET_BYTES_PER_USER
    figures = {
        "history_length": HISTORY_LENGTH,
        "events_per_user": EVENTS_PER_USER,
        "unbounded_users": cost["users"],
        "unbounded_rss_growth_mb": cost["rss_growth_bytes"] / MIB,
        "unbounded_bytes_per_held_user": cost["bytes_per_user"],
        "distinct_users": capped["users"],
        "events_logged": capped["events"],
        "reads": capped["reads"],
        "max_users": args.max_users,
        "users_held_most": capped["most_held"],
        "users_held_at_end": capped["held_at_end"],
        "evictions": capped["evictions"],
        "bounded_rss_growth_mb": capped["rss_growth_bytes"] / MIB,
        "bounded_bytes_per_held_user": capped["rss_growth_bytes"] / args.max_users,
        "users_fed_when_the_cap_was_reached": capped["users_at_cap"],
        "rss_growth_after_the_cap_was_reached_mb": (capped["rss_growth_after_cap_bytes"] or 0)
        / MIB,
        "rss_growth_over_the_last_half_of_the_users_mb": capped["rss_growth_last_half_bytes"] / MIB,
        "budget_mb (max_users x 2 KiB)": budget / MIB,
        "growth / budget": capped["rss_growth_bytes"] / budget,
        "unbounded_projection_mb (all users held)": capped["users"] * cost["bytes_per_user"] / MIB,
        "bounded_seconds": capped["seconds"],
    }
    path = write_result("online_memory", figures)
    for key, value in figures.items():
        print(f"{key}: {value:,.3f}" if isinstance(value, float) else f"{key}: {value:,}")
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
