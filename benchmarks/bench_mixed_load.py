"""Benchmark: mixed load on two workers sharing one feedback log, SQLite and PostgreSQL (issue 18).

The default world (``recsys quickstart``'s data and training config) served by
``recsys serve --workers 2``; for each backend, in one server process, three phases:

1. recommend only: 100 requests/s (the baseline of this run, this moment);
2. mixed: the same 100 recommend requests/s plus 20 feedback events/s (one event a request,
   random users and items), open loop: recommend and feedback p99, and the visibility lag;
3. rollout: the mixed load again while ``/admin/reload`` swaps in another bundle: failed
   requests, and the time from the reload's 200 until every answer carries the new
   ``model_version``.

Visibility lag. Each feedback answer names its position in the log (``X-Feedback-Log-Seq``)
and each recommendation the position its worker's online state held when the request started.
An event's lag is measured from its 202 to the last recommend request that was still behind it
(0 when none was): to that request's answer (an upper bound: its own latency is included) and
to its scheduled start (a lower bound: its worker read the position in between); between two
answers of one worker (~20 ms at 100/s over 2 workers) it cannot see. The follower alone,
without HTTP, is measured in-process too (``follower_lag``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import polars as pl

from benchmarks.common import write_result, write_synthetic_dataset
from benchmarks.loadgen import HTTPConnectionPool
from data.synthetic import WorldConfig
from pipeline.artifacts import train_bundle
from pipeline.bundle import MANIFEST_NAME, write_manifest
from serving.schemas import LOG_SEQ_HEADER

TOKEN = "mixed-load-benchmark-token"
RECOMMEND_RATE = 100.0
FEEDBACK_RATE = 20.0
# The bars.
LAG_P99_TARGET_MS = 100.0
P99_RISE_TARGET = 1.10
ROLLOUT_TARGET_S = 10.0


@dataclass(frozen=True)
class Record:
    kind: str  # "recommend" or "feedback"
    scheduled: float  # perf_counter seconds
    done: float
    status: int  # -1: no HTTP answer
    seq: int  # the log position header (-1: absent)
    model_version: str = ""
    degraded: bool = False  # any stage flagged (over its budget, or failed)
    fallback: bool = False  # answered by the popular fallback past the request deadline


async def drive(
    url: str,
    seconds: float,
    users: list[str],
    items: list[str],
    *,
    feedback_rate: float,
    seed: int,
    tag: str,
    during: Any = None,
) -> list[Record]:
    """Open-loop recommend (and feedback) requests for ``seconds``; ``during``: a coroutine run
    beside them (the rollout phase's reload)."""
    rng = np.random.default_rng(seed)
    schedule = [("recommend", i / RECOMMEND_RATE) for i in range(int(RECOMMEND_RATE * seconds))]
    if feedback_rate > 0:
        schedule += [("feedback", i / feedback_rate) for i in range(int(feedback_rate * seconds))]
    bodies = []
    for n, (kind, _) in enumerate(schedule):
        user = users[int(rng.integers(len(users)))]
        if kind == "recommend":
            bodies.append(json.dumps({"user_id": user, "k": 10}).encode())
        else:
            item = items[int(rng.integers(len(items)))]
            event = {"event_id": f"{tag}-{n}", "user_id": user, "item_id": item, "type": "click"}
            bodies.append(json.dumps({"events": [event]}).encode())
    pool = HTTPConnectionPool(url, 64, timeout=10.0)
    records: list[Record] = []
    start = time.perf_counter() + 0.1

    async def one(n: int) -> None:
        kind, offset = schedule[n]
        scheduled = start + offset
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            status, headers, reply = await pool.post(f"/v1/{kind}", bodies[n])
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            records.append(Record(kind, scheduled, time.perf_counter(), -1, -1))
            return
        done = time.perf_counter()
        seq = int(headers.get(LOG_SEQ_HEADER.lower(), "-1"))
        version, degraded, fallback = "", False, False
        if kind == "recommend" and status == 200:
            answer = json.loads(reply)
            version, degraded = answer["model_version"], bool(answer["degraded"])
            fallback = any(flag.startswith("pipeline:") for flag in answer["degraded"])
        records.append(Record(kind, scheduled, done, status, seq, version, degraded, fallback))

    tasks = [one(n) for n in range(len(schedule))]
    if during is not None:
        tasks.append(during)
    try:
        await asyncio.gather(*tasks)
    finally:
        await pool.close()
    return records


def latency_figures(records: list[Record], kind: str) -> dict[str, float]:
    mine = [r for r in records if r.kind == kind]
    ok = [r for r in mine if r.status in (200, 202)]
    latency = np.array([(r.done - r.scheduled) * 1000 for r in ok])
    return {
        f"{kind}_requests": len(mine),
        f"{kind}_errors": len(mine) - len(ok),
        f"{kind}_p50_ms": float(np.percentile(latency, 50)) if latency.size else float("nan"),
        f"{kind}_p99_ms": float(np.percentile(latency, 99)) if latency.size else float("nan"),
    }


def visibility_lags_ms(records: list[Record], *, upper: bool = True) -> np.ndarray:
    """Per acknowledged event: from its 202 to the last recommendation that was still behind
    it (module doc): to its answer (``upper``: an upper bound, the answer's latency included)
    or to its scheduled start (a lower bound: its worker read the position in between)."""
    answers = sorted(
        (r for r in records if r.kind == "recommend" and r.status == 200 and r.seq >= 0),
        key=lambda r: r.done,
    )
    done = np.array([r.done for r in answers])
    seqs = np.array([r.seq for r in answers])
    # A request is "after" the 202 when it was scheduled after it.
    scheduled = np.array([r.scheduled for r in answers])
    lags = []
    for event in records:
        if event.kind != "feedback" or event.status != 202 or event.seq < 0:
            continue
        behind = (scheduled >= event.done) & (seqs < event.seq)
        until = done if upper else scheduled
        lags.append((until[behind].max() - event.done) * 1000 if behind.any() else 0.0)
    return np.array(lags)


def follower_lag(
    bundle: Path, feedback_db: str, users: list[str], items: list[str], seconds: float
) -> dict[str, float]:
    """The log follower alone, without HTTP: two services on one log in this process (as two
    workers), feedback appended through one at ``FEEDBACK_RATE``; per event, the time from the
    append's return until the other's follower thread has applied it (polled every 0.5 ms).
    What the HTTP figures add to this is the requests' queueing."""
    from pipeline.feedback_store import open_feedback_store
    from pipeline.log_follower import LogFollower
    from pipeline.service import RecommenderService

    services = [
        RecommenderService(bundle, open_feedback_store(feedback_db), check_reloads_in_child=False)
        for _ in range(2)
    ]
    writer, reader = services
    follower = LogFollower(reader).start()
    rng = np.random.default_rng(5)
    lags = []
    try:
        start = time.perf_counter()
        for n in range(int(FEEDBACK_RATE * seconds)):
            delay = start + n / FEEDBACK_RATE - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            user = users[int(rng.integers(len(users)))]
            item = items[int(rng.integers(len(items)))]
            event = writer.feedback.make_event(f"lag-{n}", user, item, "click")
            seq = writer.record_feedback([event]).last_seq
            committed = time.perf_counter()
            while reader.applied_seq < seq:
                time.sleep(0.0005)
            lags.append((time.perf_counter() - committed) * 1000)
    finally:
        follower.stop()
        for service in services:
            service.close()
    values = np.array(lags)
    return {
        "follower_events": int(values.size),
        "follower_lag_p50_ms": float(np.percentile(values, 50)),
        "follower_lag_p99_ms": float(np.percentile(values, 99)),
        "follower_lag_max_ms": float(values.max()),
    }


def build(root: Path, seed: int) -> tuple[Path, Path, list[str], list[str]]:
    """The default world and its bundle (reused from ``root`` when there), a resealed copy
    with a model_version of its own (the rollout's target), users and items."""
    data, bundle, other = root / "data", root / "bundle", root / "bundle-b"
    if not (data / "dataset.json").is_file():
        write_synthetic_dataset(data, WorldConfig.from_overrides(seed=seed), progress=True)
    if not (bundle / MANIFEST_NAME).is_file():
        train_bundle(data, bundle)
    if not (other / MANIFEST_NAME).is_file():
        shutil.rmtree(other, ignore_errors=True)
        shutil.copytree(bundle, other)
        (other / "NOTES.txt").write_text("the rollout's target\n")
        manifest = json.loads((other / MANIFEST_NAME).read_text())
        write_manifest(
            other, config=manifest["config"], dataset_fingerprint=manifest["dataset_fingerprint"]
        )
    users = pl.read_parquet(bundle / "ids" / "users.parquet")["id"].to_list()[:5000]
    items = pl.read_parquet(bundle / "ids" / "items.parquet")["id"].to_list()
    return bundle, other, users, items


def serve(bundle: Path, feedback_db: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RECSYS_FEEDBACK_DB": feedback_db, "RECSYS_ADMIN_TOKEN": TOKEN}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [sys.executable, "-m", "cli.main", "serve", "--bundle", str(bundle)]
    command += ["--port", str(port), "--workers", "2", "--log-level", "warning"]
    with log.open("wb") as err:
        server = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            if sum(line.startswith("recsys_worker_up") for line in text.splitlines()) >= 2:
                return server
        if server.poll() is not None:
            break
        time.sleep(0.5)
    stop(server)
    raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")


def settle(url: str, users: list[str], timeout_s: float = 600.0) -> None:
    """Until ten answers in a row come back from the pipeline (not its fallback) within a
    second: the first requests compile the ranker (cached afterwards) and fill caches, and a
    phase measured before would measure that. A stage over its budget (``retrieval:timeout``)
    is the service's policy on a slow host, not a cold start."""
    deadline, in_a_row, n = time.monotonic() + timeout_s, 0, 0
    while in_a_row < 10:
        if time.monotonic() > deadline:
            raise RuntimeError("the server never answered undegraded")
        answer = httpx.post(
            f"{url}/v1/recommend", json={"user_id": users[n % len(users)], "k": 10}, timeout=60
        )
        n += 1
        served = (
            answer.status_code == 200
            and answer.elapsed.total_seconds() < 1.0
            and not any(flag.startswith("pipeline:") for flag in answer.json()["degraded"])
        )
        in_a_row = in_a_row + 1 if served else 0


def stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def run_backend(
    name: str,
    feedback_db: str,
    bundle: Path,
    other: Path,
    users: list[str],
    items: list[str],
    seconds: float,
    root: Path,
) -> dict[str, Any]:
    from benchmarks.bench_load import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = serve(bundle, feedback_db, port, root / f"{name}.log")
    try:
        settle(url, users)
        asyncio.run(drive(url, 5, users, items, feedback_rate=FEEDBACK_RATE, seed=9, tag="warm"))
        only = asyncio.run(drive(url, seconds, users, items, feedback_rate=0, seed=1, tag="a"))
        mixed = asyncio.run(
            drive(url, seconds, users, items, feedback_rate=FEEDBACK_RATE, seed=2, tag="b")
        )
        reload_answer: dict[str, float] = {}

        async def reload_after(delay: float) -> None:
            await asyncio.sleep(delay)
            async with httpx.AsyncClient(timeout=120) as client:
                answer = await client.post(
                    f"{url}/admin/reload",
                    json={"bundle": str(other)},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
            reload_answer["status"] = answer.status_code
            reload_answer["at"] = time.perf_counter()
            reload_answer["version"] = answer.json().get("model_version")

        rollout = asyncio.run(
            drive(
                url,
                max(seconds, 30.0),
                users,
                items,
                feedback_rate=FEEDBACK_RATE,
                seed=3,
                tag="c",
                during=reload_after(5.0),
            )
        )
    finally:
        stop(server)
    base = latency_figures(only, "recommend")
    figures: dict[str, Any] = {f"only_{k}": v for k, v in base.items()}
    figures.update(follower_lag(bundle, feedback_db, users, items, min(seconds, 20.0)))
    figures.update({f"mixed_{k}": v for k, v in latency_figures(mixed, "recommend").items()})
    figures.update({f"mixed_{k}": v for k, v in latency_figures(mixed, "feedback").items()})
    figures["recommend_p99_ratio"] = figures["mixed_recommend_p99_ms"] / base["recommend_p99_ms"]
    lags = visibility_lags_ms(mixed)
    figures["visibility_events"] = int(lags.size)
    figures["visibility_lag_p50_ms"] = float(np.percentile(lags, 50)) if lags.size else None
    figures["visibility_lag_p99_ms"] = float(np.percentile(lags, 99)) if lags.size else None
    figures["visibility_lag_max_ms"] = float(lags.max()) if lags.size else None
    lower = visibility_lags_ms(mixed, upper=False)
    figures["visibility_lag_lower_p99_ms"] = float(np.percentile(lower, 99)) if lower.size else None
    figures["rollout_requests"] = len(rollout)
    # Failed: no answer, or not a 2xx. Degraded answers (a stage over its budget, or the
    # popular fallback past the request deadline) are the overload policy, counted apart.
    figures["rollout_failed"] = sum(r.status not in (200, 202) for r in rollout)
    figures["rollout_degraded"] = sum(r.degraded for r in rollout)
    for phase, records in (("only", only), ("mixed", mixed), ("rollout", rollout)):
        figures[f"{phase}_degraded"] = sum(r.degraded for r in records)
        figures[f"{phase}_fallback"] = sum(r.fallback for r in records)
    figures["rollout_reload_status"] = reload_answer.get("status")
    new = reload_answer.get("version")
    answered_at = reload_answer.get("at", float("inf"))
    stale = [
        r.done
        for r in rollout
        if r.kind == "recommend"
        and r.status == 200
        and r.model_version != new
        and r.scheduled >= answered_at
    ]
    figures["rollout_after_200_s"] = max(stale) - answered_at if stale else 0.0
    return figures


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="per phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--workdir", type=Path, help="keep the world and bundles for a rerun")
    args = parser.parse_args(argv)
    figures: dict[str, object] = {
        "workers": 2,
        "recommend_rate": RECOMMEND_RATE,
        "feedback_rate": FEEDBACK_RATE,
        "seconds_per_phase": args.seconds,
        "world": "default (recsys quickstart)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir if args.workdir is not None else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        bundle, other, users, items = build(root, args.seed)
        for backend in args.backends:
            result: dict[str, Any] | str
            if backend == "sqlite":
                db = root / "feedback.sqlite3"
                db.unlink(missing_ok=True)
                result = run_backend(
                    "sqlite", str(db), bundle, other, users, items, args.seconds, root
                )
            else:
                result = run_postgres(bundle, other, users, items, args.seconds, root)
            print(backend, json.dumps(result, indent=1), flush=True)
            figures[backend] = result
    write_result("mixed_load", figures)
    return figures


def run_postgres(
    bundle: Path, other: Path, users: list[str], items: list[str], seconds: float, root: Path
) -> dict[str, Any] | str:
    """The PostgreSQL phases on a throw-away local server (``benchmarks/postgres_server.py``)."""
    from benchmarks.postgres_server import PostgresUnavailableError, start_server, wait_accepting

    try:
        server = start_server()
    except PostgresUnavailableError as exc:
        return f"skipped: {exc}"
    try:
        wait_accepting(server.url)
        return run_backend("postgresql", server.url, bundle, other, users, items, seconds, root)
    finally:
        with contextlib.suppress(PostgresUnavailableError):
            server.stop("fast")
        shutil.rmtree(server.root, ignore_errors=True)


if __name__ == "__main__":
    main()


def render_section(result: dict[str, Any]) -> list[str]:
    """The docs/benchmarks.md section: one column per backend."""
    machine = result["machine"]
    figures = result["figures"]
    backends = [b for b in ("sqlite", "postgresql") if b in figures]
    lines = [
        f"Measured {result['date']} on {machine['cpu']} ({machine['cores']} cores, shared with "
        "other engineers' jobs, loaded), Python "
        f"{machine['python']}: `recsys serve --workers 2` on the default world, "
        f"{figures['recommend_rate']:g} recommend requests/s (k=10) plus "
        f"{figures['feedback_rate']:g} feedback events/s, open loop, "
        f"{figures['seconds_per_phase']:g} s per phase; latencies from each request's scheduled "
        "time. The visibility lag over HTTP is bounded from above and below (module doc of "
        "`benchmarks/bench_mixed_load.py`); the follower alone is measured in-process.",
        "",
        "| figure | " + " | ".join(backends) + " |",
        "|---|" + "---|" * len(backends),
    ]
    rows = [
        ("recommend only: p50 / p99 ms", "only_recommend_p50_ms", "only_recommend_p99_ms"),
        ("mixed: recommend p50 / p99 ms", "mixed_recommend_p50_ms", "mixed_recommend_p99_ms"),
        ("mixed: feedback p50 / p99 ms", "mixed_feedback_p50_ms", "mixed_feedback_p99_ms"),
        ("recommend p99, mixed / only", "recommend_p99_ratio", None),
        (
            "visibility lag p50 / p99 ms (upper bound)",
            "visibility_lag_p50_ms",
            "visibility_lag_p99_ms",
        ),
        ("visibility lag p99 ms, lower bound", "visibility_lag_lower_p99_ms", None),
        ("visibility lag max ms", "visibility_lag_max_ms", None),
        (
            "follower alone (no HTTP): lag p50 / p99 ms",
            "follower_lag_p50_ms",
            "follower_lag_p99_ms",
        ),
        ("follower alone: lag max ms", "follower_lag_max_ms", None),
        ("errors: only / mixed recommend", "only_recommend_errors", "mixed_recommend_errors"),
        ("degraded answers: only / mixed", "only_degraded", "mixed_degraded"),
        ("of which the fallback: only / mixed", "only_fallback", "mixed_fallback"),
        ("rollout: failed / degraded requests", "rollout_failed", "rollout_degraded"),
        ("rollout: requests", "rollout_requests", None),
        ("rollout: old model answering after the 200, s", "rollout_after_200_s", None),
    ]
    for label, first, second in rows:
        cells = []
        for backend in backends:
            values = figures[backend]
            if not isinstance(values, dict):
                cells.append(str(values))
                continue
            cell = _cell(values.get(first))
            if second is not None:
                cell += " / " + _cell(values.get(second))
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for backend in backends:
        values = figures[backend]
        if not isinstance(values, dict):
            continue
        flagged = values.get("only_degraded", 0) / max(1, values["only_recommend_requests"])
        if flagged > 0.5:
            lines += [
                f"{backend}: {flagged:.0%} of the recommend-only answers flagged a stage over its "
                "latency budget (`degraded`, e.g. `retrieval:timeout`): the host was slower than "
                "the budgets at that moment, with or without feedback. They are answers all the "
                "same (no error); the fallback row counts the ones the pipeline did not produce.",
                "",
            ]
        fallback = values.get("only_fallback", 0) / max(1, values["only_recommend_requests"])
        if fallback > 0.5:
            lines += [
                f"{backend}: {fallback:.0%} of the recommend-only answers were the popular "
                "fallback past the request deadline: the host could not serve 100 "
                "requests/s at that moment even without feedback, so the latencies above measure "
                "its overload, not the feedback path, and the p99 ratio is noise. The follower "
                "alone (no HTTP) isolates what sharing the log costs.",
                "",
            ]
    return lines


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:,.0f}"
    return "-" if value is None else str(value)
