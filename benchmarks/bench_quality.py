"""Benchmark: recommendation quality on a real log (Last.fm 2k) and on the default synthetic world.

Measured the way a new user would measure it, through the ``recsys`` commands themselves (called
in-process, ``cli.main.main``), so nothing here can be wired differently from the CLI:

- **lastfm-2k**: the shared log's README protocol (5-core, per-user random 75/25, seed 42; its
  split files): ``recsys data import --interactions split/train.csv --test split/test.csv
  --weight-col weight``. The log is read from ``--lastfm DIR`` (default ``../shared/data/lastfm-2k``
  beside the repository) and never copied; without it that part is skipped, in one line.
- **synthetic**: the dataset ``make run`` builds (``recsys quickstart``: the default world, seed 0,
  the default temporal split), i.e. ``recsys data synth --seed 0``.

On each: ``recsys train`` (the built-in defaults, or ``--config FILE``, e.g. what ``recsys tune``
wrote), wall-timed, then ``recsys evaluate --report`` (full catalogue, seen items removed, 95%
bootstrap intervals). From its ``report.json`` we keep every system's nDCG@10 with its interval
and recall@10: the pipeline and its stages (``ranked``, ``retrieval_order``), each retrieval
source alone (``source:<name>``) and the baselines; the pipeline's lift (a ratio of nDCG@10
means) over the best single source and over the best baseline; and what training chose on
validation (the report's ``funnel``: merge order, each source's validation nDCG, whether the
ranker is served). The peers' figures from the lastfm-2k README are kept as reference rows.

Results go to ``benchmarks/results/quality.json`` (``--out``), one entry per dataset with its own
date, commit and machine; a part that is skipped keeps its previous entry.
:func:`render_section` writes the "Recommendation quality" section of ``docs/benchmarks.md``.

    python -m benchmarks.bench_quality [--lastfm DIR] [--config FILE] [--skip-synthetic]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, machine_info

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LASTFM = REPO_ROOT.parent / "shared" / "data" / "lastfm-2k"
RESULTS_PATH = RESULTS_DIR / "quality.json"
LASTFM, SYNTHETIC = "lastfm-2k", "synthetic"
DATASET_TITLES = {
    LASTFM: "lastfm-2k (HetRec 2011 Last.fm play counts; README protocol: 5-core, "
    "per-user random 75/25, seed 42)",
    SYNTHETIC: "default synthetic world (`make run`'s dataset: seed 0, temporal 80/10/10)",
}
K = 10
NDCG, RECALL = f"ndcg@{K}", f"recall@{K}"
PIPELINE = "pipeline"
FUNNEL_STAGES = (PIPELINE, "ranked", "retrieval_order")
SOURCE_PREFIX = "source:"
BASELINES = ("popular", "recent_popular", "als", "ease", "random")
# The lastfm-2k README's peers on the same split files (one run each, seed 42): the bar.
LASTFM_PEERS = {
    "EASE, lambda 100": 0.286,
    "implicit ALS, 32 factors, confidence 20": 0.267,
    "popularity (seen removed)": 0.099,
}
PEER_KIND = "peer (README)"
TARGET = (
    "issue 15: on lastfm-2k with the default config, pipeline nDCG@10 >= 0.286 (the README's "
    "EASE) and >= every baseline of its report, `recsys train` <= 2 min on 2 cores; after "
    "`recsys tune`, >= 0.30 and >= 1.05x the best single source; on the default synthetic "
    "world, >= 0.235"
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lastfm",
        type=Path,
        default=DEFAULT_LASTFM,
        help="lastfm-2k directory (with split/train.csv, split/test.csv)",
    )
    parser.add_argument(
        "--config", type=Path, help="training TOML for `recsys train` (default: built-in defaults)"
    )
    parser.add_argument("--skip-synthetic", action="store_true", help="measure lastfm-2k only")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH, help="results JSON to update")
    parser.add_argument(
        "--workdir", type=Path, help="keep the datasets, bundles and reports here (default: temp)"
    )
    args = parser.parse_args(argv)

    if args.workdir is not None:
        measured = _measure_all(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            measured = _measure_all(args, Path(tmp))
    previous = json.loads(args.out.read_text())["datasets"] if args.out.is_file() else {}
    result = {"benchmark": "quality", "datasets": previous | measured}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    for name, entry in measured.items():
        lift = entry["lift"]
        print(
            f"{name}: pipeline {NDCG} {entry['systems'][PIPELINE][NDCG]['mean']:.4f}, "
            f"{_ratio(lift['over_best_source'])} the best source ({lift['best_source']}), "
            f"{_ratio(lift['over_best_baseline'])} the best baseline ({lift['best_baseline']}); "
            f"train {entry['train_seconds']:.0f} s"
        )
    print(f"wrote {args.out}")
    return result


def _measure_all(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    measured: dict[str, Any] = {}
    train, test = args.lastfm / "split" / "train.csv", args.lastfm / "split" / "test.csv"
    if train.is_file() and test.is_file():
        imported = ["data", "import", "--interactions", str(train), "--test", str(test)]
        measured[LASTFM] = measure(
            [*imported, "--weight-col", "weight"], workdir / LASTFM, args.config
        )
        measured[LASTFM]["peers"] = dict(LASTFM_PEERS)
    else:
        print(f"{LASTFM}: no split/train.csv and split/test.csv under {args.lastfm}; skipped")
    if not args.skip_synthetic:
        measured[SYNTHETIC] = measure(
            ["data", "synth", "--seed", "0"], workdir / SYNTHETIC, args.config
        )
    return measured


def measure(dataset_command: list[str], workdir: Path, config: Path | None) -> dict[str, Any]:
    """Build the dataset with ``dataset_command`` (a ``recsys data ...`` command without
    ``--out``), train on it with ``config`` (None: the defaults) and evaluate; the figures."""
    data, bundle, report = workdir / "data", workdir / "bundle", workdir / "report"
    git = git_state()  # before: a commit made while this runs is not what was measured
    _recsys([*dataset_command, "--out", str(data)])
    started = time.perf_counter()
    _recsys(
        ["train", "--data", str(data), "--out", str(bundle)]
        + ([] if config is None else ["--config", str(config)])
    )
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    _recsys(["evaluate", "--data", str(data), "--bundle", str(bundle), "--report", str(report)])
    evaluate_seconds = time.perf_counter() - started
    figures = summarise(json.loads((report / "report.json").read_text()))
    return figures | {
        "config": "default" if config is None else str(config),
        "train_seconds": train_seconds,
        "evaluate_seconds": evaluate_seconds,
        # On a shared machine the seconds partly measure the other tenants: say how busy it was.
        "load_average_1min": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_info(),
        "git": git,
    }


def _recsys(args: list[str]) -> None:
    # Imported here, not at the top: ``benchmarks.run`` imports this module for
    # :func:`render_section`, and the CLI pulls in torch (seconds on a loaded machine).
    from cli.main import main as recsys

    print(f"$ recsys {' '.join(args)}", flush=True)
    code = recsys(args)
    if code != 0:
        raise RuntimeError(f"recsys {' '.join(args)} failed with exit code {code}")


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The figures kept from a ``recsys evaluate`` report (the content of ``report.json``).

    ``lift``: the pipeline's nDCG@10 mean divided by that of the best ``source:*`` system and of
    the best baseline (None when that system scored 0 or is absent).
    """
    if K not in report["ks"]:
        raise ValueError(f"report has cutoffs {report['ks']}, not {K}")
    systems = {
        name: {NDCG: values[NDCG], RECALL: values[RECALL]["mean"]}
        for name, values in report["systems"].items()
    }
    if PIPELINE not in systems:
        raise ValueError(f"report has no {PIPELINE!r} system; systems: {sorted(systems)}")
    pipeline = systems[PIPELINE][NDCG]["mean"]
    best_source = _best(systems, [n for n in systems if n.startswith(SOURCE_PREFIX)])
    best_baseline = _best(systems, [n for n in BASELINES if n in systems])
    return {
        "n_users": report["n_users"],
        "model_version": report["model_version"],
        "systems": systems,
        "lift": {
            "best_source": best_source,
            "over_best_source": _lift(pipeline, systems, best_source),
            "best_baseline": best_baseline,
            "over_best_baseline": _lift(pipeline, systems, best_baseline),
        },
        "retrieval_recall": {
            name: values for name, values in report["retrieval"].items() if not name.startswith("_")
        },
        "funnel": report.get("funnel", {}),
        "skipped": report.get("skipped", {}),
    }


def _best(systems: dict[str, Any], names: list[str]) -> str | None:
    return max(names, key=lambda name: systems[name][NDCG]["mean"], default=None)


def _lift(pipeline: float, systems: dict[str, Any], name: str | None) -> float | None:
    if name is None:
        return None
    other = float(systems[name][NDCG]["mean"])
    return pipeline / other if other > 0 else None


def git_state() -> dict[str, Any]:
    """The commit measured and whether the working tree had uncommitted changes to tracked files."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
            )
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def render_section(result: dict[str, Any]) -> list[str]:
    """Markdown lines of the "Recommendation quality" section below its heading and target: per
    dataset, where and how it was measured, a table of every system sorted by nDCG@10 (the peers'
    README figures among them), the pipeline's lifts, the validation choices and the times."""
    datasets = result["datasets"]
    lines: list[str] = []
    for name in sorted(datasets, key=lambda n: (n not in DATASET_TITLES, n)):
        lines += _render_dataset(name, datasets[name])
    return lines


def _render_dataset(name: str, entry: dict[str, Any]) -> list[str]:
    machine, git = entry["machine"], entry["git"]
    commit = (git["commit"] or "unknown")[:10] + (
        " with uncommitted changes" if git["dirty"] else ""
    )
    lines = [
        f"### {DATASET_TITLES.get(name, name)}",
        "",
        f"Measured {entry['date']} on {machine['cpu']} ({machine['cores']} cores, "
        f"{machine['platform']}; load average {entry['load_average_1min']:.1f}), commit {commit}; "
        f"training config: {entry['config']}; {entry['n_users']:,} test users; bundle "
        f"`{entry['model_version']}`.",
        "",
        f"| system | kind | nDCG@{K} [95% interval] | recall@{K} |",
        "|---|---|---|---|",
    ]
    rows = [_system_row(system, values) for system, values in entry["systems"].items()]
    rows += [
        (value, f"| {peer} | {PEER_KIND} | {value:.3f} | - |")
        for peer, value in entry.get("peers", {}).items()
    ]
    lines += [row for _, row in sorted(rows, key=lambda row: -row[0])]
    lift = entry["lift"]
    pipeline = entry["systems"][PIPELINE][NDCG]["mean"]
    lines.append("")
    for label, key in (("single source", "source"), ("baseline", "baseline")):
        best = lift[f"best_{key}"]
        if best is not None:
            lines.append(
                f"- pipeline ({pipeline:.4f}) / best {label} ({best}, "
                f"{entry['systems'][best][NDCG]['mean']:.4f}): {_ratio(lift[f'over_best_{key}'])}"
            )
    lines += _render_funnel(entry["funnel"])
    lines += [
        f"- `recsys train` {entry['train_seconds']:.0f} s, "
        f"`recsys evaluate` {entry['evaluate_seconds']:.0f} s (wall)",
        "",
    ]
    if entry.get("skipped"):
        lines[-1:-1] = [f"- not evaluated: {k} ({v})" for k, v in entry["skipped"].items()]
    return lines


def _system_row(system: str, values: dict[str, Any]) -> tuple[float, str]:
    """(nDCG@K mean, its table row); the pipeline in bold."""
    ci = values[NDCG]
    name = f"**{system}**" if system == PIPELINE else system
    return ci["mean"], (
        f"| {name} | {_kind(system)} | {ci['mean']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}] "
        f"| {values[RECALL]:.4f} |"
    )


def _kind(system: str) -> str:
    if system in FUNNEL_STAGES:
        return "funnel"
    if system.startswith(SOURCE_PREFIX):
        return "source alone"
    if system in BASELINES:
        return "baseline"
    return system  # e.g. the synthetic world's oracle


def _render_funnel(funnel: dict[str, Any]) -> list[str]:
    if not funnel:
        return []
    quality = funnel.get(f"source_validation_ndcg@{K}", {})
    order = ", ".join(
        f"{name} ({quality[name]:.4f})" if name in quality else name
        for name in funnel.get("merge_order", [])
    )
    lines = [f"- merge order chosen on validation (validation nDCG@{K}): {order}"]
    ranker = funnel.get("ranker")
    if ranker is None:
        lines.append("- ranker: none trained; the merge order is served")
    else:
        scores = ", ".join(
            f"{k} {v:.4f}" for k, v in ranker.items() if isinstance(v, float) and k != "served"
        )
        model = ranker.get("model", "ranker")
        verdict = f"{model} served" if ranker["served"] else "not served (the merge order is)"
        lines.append(f"- ranker: {verdict}; held-out {scores}")
    for name, reason in funnel.get("skipped_sources", {}).items():
        lines.append(f"- {name} left out: {reason}")
    return lines


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}x"


if __name__ == "__main__":
    main(sys.argv[1:])
