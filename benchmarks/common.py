"""Helpers shared by the benchmark scripts: machine description, peak memory, result files."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data.prepare import prepare_dataset
from data.splits import SplitConfig
from data.synthetic import WorldConfig, generate

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on (they mean little without it)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """Run ``fn`` ``repeats`` times; return the median and all wall times in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def write_result(name: str, figures: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the figures, the machine and the date."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_info(),
        "figures": figures,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def write_synthetic_dataset(
    directory: Path, config: WorldConfig, *, progress: bool = False
) -> None:
    """Generate the world of ``config`` and write its log as a dataset with the default
    (temporal) split and the item catalogue: the serving benchmarks' input."""
    synthetic = generate(config, progress=progress)
    prepare_dataset(
        directory,
        synthetic.interactions,
        split=SplitConfig(),
        source={"kind": "synthetic"},
        items=synthetic.items,
    )
