"""``make bench`` on a fresh clone: every module the benchmarks import is the project's own, the
standard library's, or installed by ``pip install -e '.[bench]'`` (the base dependencies and the
``bench`` extra). Issue 21: bench_load imported httpx, which only the test extra installed."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = {
    "benchmarks",
    "cli",
    "data",
    "evaluation",
    "experiments",
    "pipeline",
    "ranking",
    "reranking",
    "retrieval",
    "serving",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.split(r"[<>=!~;\[\s]", requirement, maxsplit=1)[0])


def imported_modules(path: Path) -> set[str]:
    """Top-level modules ``path`` imports (absolute imports, anywhere in the file)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def test_every_benchmark_import_is_installed_by_make_bench() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = {requirement_name(r) for r in project["dependencies"]}
    installed |= {requirement_name(r) for r in project["optional-dependencies"]["bench"]}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        for module in imported_modules(script):
            if module in PROJECT_PACKAGES or module in sys.stdlib_module_names:
                continue
            providers = {canonical(d) for d in distributions.get(module, [module])}
            if not providers & installed:
                missing.setdefault(module, []).append(script.name)
    assert not missing, f"imported by benchmarks but not installed by make bench: {missing}"


def test_make_bench_installs_the_bench_extra() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^bench: install-bench$", makefile, re.MULTILINE)
    assert "pip install -e '.[bench]'" in makefile
