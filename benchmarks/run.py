"""``make bench``: run every benchmark in its own process, then write docs/benchmarks.md.

Each benchmark is a module with ``main(argv) -> dict`` that writes
``benchmarks/results/<name>.json`` (see ``benchmarks.common.write_result``). A separate process per
benchmark keeps peak-memory figures honest (``ru_maxrss`` is a per-process high-water mark).

    python -m benchmarks.run                 # all
    python -m benchmarks.run --only negatives
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import bench_mixed_load, bench_quality
from benchmarks.common import RESULTS_DIR

DOCS_PATH = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
# docs/benchmarks.md from this heading on is written by hand (one-off measurements behind defaults
# in the code); re-rendering keeps it.
NOTES_HEADING = "## Measurements behind the defaults"


@dataclass(frozen=True)
class Benchmark:
    name: str  # results file stem
    module: str
    title: str
    target: str  # the figure an issue asks for, quoted in the docs next to the measurement
    # Markdown lines of the section from the results file (below the heading and target); None:
    # the default, one measurement of flat figures as a table.
    render: Callable[[dict[str, Any]], list[str]] | None = None
    args: tuple[str, ...] = ()  # command-line arguments of the module


def render_drift_simulation(result: dict[str, Any]) -> list[str]:
    """The issue-17 simulation: speed, each arm's drift recovery, the pairwise comparison,
    A/A, coverage and SRM power (the full figures stay in the results file)."""
    f, machine = result["figures"], result["machine"]
    lines = [
        f"Measured {result['date']} on {machine['cpu']} ({machine['cores']} cores, shared), "
        f"Python {machine['python']}: {f['users']:,} users, {f['items']:,} items, "
        f"{f['days']} days, arms {', '.join(f['arms'])}.",
        "",
        f"Simulation loop {f['simulation_seconds']:,.0f} s for {f['sessions']:,} sessions "
        f"({f['arm_sessions_per_second']:,.0f} arm-sessions/s); training "
        f"{f['training_seconds']:,.0f} s.",
        "",
        "| arm | CTR before drift | CTR at end | lowest share of no-drift twin | share at end "
        "| drift cost won back |",
        "|---|---|---|---|---|---|",
    ]
    for arm, d in f["drift"]["arms"].items():
        lines.append(
            f"| {arm} | {d['ctr_before']:.4f} | {d['ctr_end']:.4f} | {d['share_lowest']:.3f} | "
            f"{d['share_end']:.3f} | {d['cost_recovered']:.1%} |"
        )
    for name, pair in (f.get("pairwise") or {}).items():
        post = pair.get("post_drift_ctr")
        if post is not None:
            lines += [
                "",
                f"{name}, post-drift CTR: {post['difference']:+.4f} "
                f"[{post['ci'][0]:+.4f}, {post['ci'][1]:+.4f}], p = {post['p_value']:.3g}, "
                f"true {post['true_effect']:+.4f} "
                f"({'covered' if post['ci_covers_true_effect'] else 'not covered'}).",
            ]
    aa, srm = f.get("aa") or {}, f.get("srm_power_at_issue_population") or {}
    if aa:
        lines += [
            "",
            f"A/A over {aa['replicates']} replicates: fixed horizon {aa['fpr_fixed_horizon']:.3f}, "
            f"alpha spending {aa['fpr_sequential_alpha_spending']:.3f}, mSPRT "
            f"{aa['fpr_sequential_msprt']:.3f}.",
        ]
    for arm, metrics in (f.get("coverage") or {}).items():
        lines.append(f"Coverage of the true effect ({arm}, CTR): {metrics['ctr']['coverage']:.3f}.")
    if srm:
        lines.append(
            f"SRM at {srm['exposed_users']:,} users: 2 % loss in one arm detected in "
            f"{srm['loss']['detection_rate']:.1%} of {srm['replicates']} replicates "
            f"(formula power {srm['loss']['formula_power']:.3f}; "
            f"{srm['loss']['users_for_95_percent_detection']:,} users for 95 %), "
            f"false alarms {srm['false_alarm_rate']:.3f}."
        )
    criterion = f.get("srm_issue17_criterion")
    if criterion:
        lines.append(
            f"Issue 17's SRM criterion (2 % of all {criterion['exposed_users']:,} users lost, all "
            f"from one arm of a 50/50 split, alpha {criterion['srm_alpha']}): detected in "
            f"{criterion['loss']['detection_rate']:.1%} of {criterion['replicates']} replicates, "
            f"false alarms {criterion['false_alarm_rate']:.3f}."
        )
    return [*lines, ""]


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "synthetic",
        "benchmarks.bench_synthetic",
        "Synthetic world generation + temporal split (20M interactions)",
        "issue 2: generation + temporal split of a 20M-interaction log, "
        "under 60 s and 6 GB on 2 cores",
    ),
    Benchmark(
        "negatives",
        "benchmarks.bench_negatives",
        "Negative sampling (10M negatives)",
        "issue 2: 10M negatives in seconds, vectorized",
    ),
    Benchmark(
        "index",
        "benchmarks.bench_index",
        "ANN index kinds, 1M items x 64 dims",
        "issue 3: per kind build time, memory, single-query top-500 p50/p99, recall@100 vs exact; "
        "one kind with recall@100 >= 0.95 and p99 <= 5 ms on 2 cores",
    ),
    Benchmark(
        "online",
        "benchmarks.bench_online",
        "Online updates: event to changed candidates",
        "issue 3: the time from event to changed recommendations is measured",
    ),
    Benchmark(
        "online_learning",
        "benchmarks.bench_online_learning",
        "Online learning in the service: model freshness and its cost to requests",
        "issue 17: model_freshness_seconds p50 <= 60 s at 50 feedback events/s and 50 "
        "requests/s; p99 within +10 % of updates off (paired, same run)",
    ),
    Benchmark(
        "feedback",
        "benchmarks.bench_feedback",
        "Feedback log appends (SQLite WAL)",
        "issue 5: durable feedback log; appends/s with synchronous FULL vs NORMAL",
    ),
    Benchmark(
        "online_memory",
        "benchmarks.bench_online_memory",
        "Online state memory: 1M distinct feedback users, one worker",
        "issue 21: after 1M distinct feedback users one worker holds no more users than its "
        "cap, and its RSS growth stays within the cap's documented budget",
    ),
    Benchmark(
        "ranking",
        "benchmarks.bench_ranking",
        "Ranking 500 candidates for one request",
        "issue 4: p99 <= 5 ms on 2 cores; ranker NDCG@10 vs each source's own order",
    ),
    Benchmark(
        "compiled_ranker",
        "benchmarks.bench_compiled_ranker",
        "LightGBM ranker: LightGBM vs compiled trees, 500 candidates",
        "issue 5 (serving CPU): the same scores for less CPU per request",
    ),
    Benchmark(
        "budgets",
        "benchmarks.bench_budgets",
        "Enforcing stage budgets: cooperative vs preemptive (one request, in-process)",
        "issue 5 (serving CPU): what each way of enforcing the budgets adds to a request",
    ),
    Benchmark(
        "load",
        "benchmarks.bench_load",
        "HTTP service under load (1M-item catalogue, 500 candidates, k=20)",
        "issue 5: 100 requests/s for 60 s with zero errors and p99 <= 30 ms; max sustainable rate",
    ),
    Benchmark(
        "mixed_load",
        "benchmarks.bench_mixed_load",
        "Mixed load: two workers sharing the feedback log (SQLite, PostgreSQL)",
        "issue 18: 100 recommend requests/s + 20 feedback events/s against 2 workers; visibility "
        "lag p99 <= 100 ms; recommend p99 within 10% of recommend-only load; a reload served "
        "everywhere within 10 s of its 200, with no failed request",
        render=bench_mixed_load.render_section,
    ),
    Benchmark(
        "recommend",
        "benchmarks.bench_recommend",
        "Batch recommend for every user (100k users, k=10)",
        "issue 6: `recsys recommend --all` for 100k users x k=10 in under 5 minutes on 2 cores",
    ),
    Benchmark(
        "simulator",
        "benchmarks.bench_simulator",
        "Simulated A/B experiment (examples/ab_concept_drift.toml: 30 days, 50k users)",
        "issue 7: under 10 minutes on 2 cores with the Pipeline called in batches; "
        "A/A false-positive rate in [0.03, 0.07] with and without peeking; SRM detection. "
        "Issue 17: the example's 3 arms (frozen, online_state, online_learning) in <= 10 min",
    ),
    Benchmark(
        "simulator_drift_6k",
        "benchmarks.bench_simulator",
        "Simulated A/B under drift with online learning (3 arms, 6k users, 20 days)",
        "issue 17: online_learning wins back >= 50 % of its drift cost, ends >= 0.90 of its "
        "no-drift twin and beats online_state after the drift; 50k users x 30 days x 3 arms "
        "in <= 10 min (measured by the `simulator` benchmark; this one is the scaled-down run "
        "a shared 2-core machine can finish)",
        render_drift_simulation,
        (
            "--users",
            "6000",
            "--items",
            "2000",
            "--days",
            "20",
            "--drift-day",
            "7",
            "--name",
            "simulator_drift_6k",
            "--report",
            "benchmarks/results/simulator_drift_6k",
        ),
    ),
    Benchmark(
        "simulator_drift_heldout",
        "benchmarks.bench_simulator",
        "Simulated A/B under drift, held-out world (8k users, 2k items, seed 11, with the oracle)",
        "issue 17: as above, on a world of other seeds and sizes; the oracle arm (retrained on "
        "the true post-drift preferences) bounds what any arm can win back",
        render_drift_simulation,
        (
            "--users",
            "8000",
            "--items",
            "2000",
            "--seed",
            "11",
            "--oracle",
            "--name",
            "simulator_drift_heldout",
            "--report",
            "benchmarks/results/simulator_drift_heldout",
        ),
    ),
    Benchmark(
        "two_tower",
        "benchmarks.bench_two_tower",
        "Two-tower training throughput",
        "issue 3: training examples/s on CPU (and CUDA where available)",
    ),
    Benchmark(
        "distributed",
        "benchmarks.bench_distributed",
        "Distributed training (DDP) and batch scoring (Ray), default world",
        "issue 19: DDP examples/s with 1 and 2 processes and two-tower recall@100 within 0.02 "
        "of single-process; batch scoring users/s with 1 and 2 Ray workers vs `--workers`",
    ),
    Benchmark(
        "quality",
        "benchmarks.bench_quality",
        "Recommendation quality",
        bench_quality.TARGET,
        render=bench_quality.render_section,
    ),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="benchmark names to run (default: all)")
    parser.add_argument(
        "--docs-only", action="store_true", help="only re-render docs/benchmarks.md"
    )
    args = parser.parse_args(argv)
    selected = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    failed = []
    if not args.docs_only:
        for bench in selected:
            print(f"== {bench.name}: {bench.title}", flush=True)
            command = [sys.executable, "-m", bench.module, *bench.args]
            if subprocess.run(command, check=False).returncode != 0:
                failed.append(bench.name)
    DOCS_PATH.write_text(render_docs())
    print(f"wrote {DOCS_PATH}")
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
        return 1
    return 0


def render_docs() -> str:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m benchmarks.run`) from `benchmarks/results/*.json`.",
        "Machines are shared and noisy: figures are medians where repeated, and every section",
        "names the machine and date it was measured on. Re-run to refresh. The last section,",
        '"Measurements behind the defaults", is written by hand and kept when re-rendering.',
        "",
    ]
    for bench in BENCHMARKS:
        path = RESULTS_DIR / f"{bench.name}.json"
        lines += [f"## {bench.title}", "", f"Target: {bench.target}.", ""]
        if not path.is_file():
            lines += ["_Not measured yet._", ""]
            continue
        result = json.loads(path.read_text())
        if bench.render is not None:
            lines += bench.render(result)
            continue
        machine = result["machine"]
        lines += [
            f"Measured {result['date']} on {machine['cpu']} ({machine['cores']} cores), "
            f"Python {machine['python']}.",
            "",
            "| figure | value |",
            "|---|---|",
        ]
        lines += [f"| {key} | {_format(value)} |" for key, value in result["figures"].items()]
        lines.append("")
    return "\n".join(lines) + _hand_written_notes()


def _hand_written_notes() -> str:
    """The hand-written end of the current docs, from ``NOTES_HEADING`` on (empty if none)."""
    current = DOCS_PATH.read_text() if DOCS_PATH.is_file() else ""
    start = current.find(NOTES_HEADING)
    return "" if start < 0 else "\n" + current[start:]


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
