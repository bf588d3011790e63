"""A LightGBM model compiled to machine code (lleaves, on LLVM), for fast serving.

LightGBM's own predictor walks its trees as data; compiled, each tree is a chain of branches the
CPU predicts well. For the 500 candidates of one request it takes 6-12x less CPU (docs/
benchmarks.md, "LightGBM ranker: LightGBM vs compiled trees"), with the same scores to ~1e-15:
the compiled code compares the same float64 values with the same thresholds.

Compiling costs ~30 ms a tree (seconds for a large model), once per model and machine: the
object code is cached on disk, keyed by the model text, the compiler's versions and the host
CPU, so a restart or a second worker loads it in milliseconds. Each entry carries its digest
(LLVM would abort the process on a damaged file), and the cache keeps the 32 most recently used
models. Every compiled forest is checked against LightGBM on probe rows built from the model's
own split thresholds (values at, just below and just above each, and missing) before it is
used; a mismatch or any failure to compile leaves the caller on LightGBM, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: workers may compile the same model twice
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

CACHE_ENV = "RECSYS_CACHE_DIR"
CACHE_SUBDIR = "compiled-rankers"
# Scores may differ in the last bits (the trees' leaf values are summed in another order); a
# row sent down another branch differs by a leaf value, many orders of magnitude more.
SCORE_TOLERANCE = 1e-9
PROBE_ROWS = 256
# Compiled models kept (the most recently used): each retrain adds one (~7 KB to ~0.5 MB), and a
# cache that only grows would fill a disk over a year of daily retrains.
CACHE_ENTRIES = 32
_ENTRY = re.compile(r"[0-9a-f]{32}\.o")
LIGHTGBM_ZERO = float(np.float32(1e-35))  # LightGBM's kZeroThreshold, a float32 constant

_compile_lock = threading.Lock()  # LLVM's process-wide state is set up by the first compile


class CompiledForest:
    """Scores rows with a compiled copy of one LightGBM model (:func:`compile_forest`)."""

    def __init__(self, model: Any, n_features: int, threads: int) -> None:
        self._model = model
        self.n_features = n_features
        self.threads = threads

    def predict(self, rows: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
        """(N,) float64 scores of ``rows`` (N, n_features): what ``Booster.predict`` gives.

        The rows are widened to float64, as LightGBM does before comparing them with its
        (float64) thresholds; the compiled code releases the GIL while it runs.
        """
        wide = np.array(rows, dtype=np.float64, order="C")  # a copy: the caller's rows stay
        # LightGBM reads a value within 1e-35 of zero as zero before any comparison (its dense
        # row reader drops it); the compiled trees compare what they are given, so do it here.
        wide[np.abs(wide) <= LIGHTGBM_ZERO] = 0.0
        scores: npt.NDArray[np.float64] = self._model.predict(wide, n_jobs=self.threads)
        return scores


def compile_forest(
    booster: lgb.Booster, *, threads: int = 1, cache_dir: Path | None = None
) -> CompiledForest | None:
    """``booster`` compiled and checked against itself, or ``None`` (logged) if that fails.

    cache_dir: where compiled models are kept; default :func:`default_cache_dir`. An unwritable
        directory only costs the cache.
    """
    model_text = booster.model_to_string()
    try:
        forest = _compile(model_text, booster.num_feature(), threads, cache_dir)
    except Exception as exc:  # an optional accelerator: any failure leaves LightGBM serving
        logger.warning("ranker not compiled (%s); LightGBM scores it", exc)
        return None
    mismatch = _largest_mismatch(forest, booster)
    if not mismatch <= SCORE_TOLERANCE:  # NaN (a score lost) is a mismatch too
        logger.warning(
            "compiled ranker differs from LightGBM by %.3g on probe rows; LightGBM scores it",
            mismatch,
        )
        return None
    return forest


def default_cache_dir() -> Path:
    """``$RECSYS_CACHE_DIR``, else ``$XDG_CACHE_HOME/recsys``, else ``~/.cache/recsys``; then
    ``compiled-rankers/``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / CACHE_SUBDIR
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "recsys" / CACHE_SUBDIR


def _compile(
    model_text: str, n_features: int, threads: int, cache_dir: Path | None
) -> CompiledForest:
    import lleaves  # imported here: LLVM loads only where a ranker is compiled
    import llvmlite.binding as llvm

    directory = cache_dir if cache_dir is not None else default_cache_dir()
    with _compile_lock, tempfile.TemporaryDirectory() as scratch:
        model_file = Path(scratch) / "model.txt"
        model_file.write_text(model_text)
        model = lleaves.Model(model_file=str(model_file))
        key = _cache_key(model_text, importlib.metadata.version("lleaves"), llvm)
        cached = directory / f"{key}.o"
        if not _writable(directory):
            model.compile()
        else:
            # One process compiles a model; the service's other workers, starting with it,
            # wait for that and load the result instead of all compiling it at once.
            with _exclusive(cached.with_suffix(".lock")):
                if _verified(cached):
                    model.compile(cache=str(cached))
                    _touch(cached)
                else:
                    _compile_into_cache(model, cached)
                    prune_cache(directory, CACHE_ENTRIES)
    return CompiledForest(model, n_features, threads)


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (POSIX ``flock``; a no-op without it)."""
    with open(lock_file, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _compile_into_cache(model: Any, cached: Path) -> None:
    """Compile ``model``, leaving its object code at ``cached`` and the code's digest next to it.

    Written under unique names, then renamed, digest first: a worker compiling the same model
    at the same moment, or a crash mid-write, never leaves a file that passes
    :func:`_verified` with other bytes than the compiler wrote.
    """
    partial = cached.with_name(f"{cached.stem}.{uuid.uuid4().hex}.partial")
    partial_digest = partial.with_suffix(".digest-partial")
    try:
        model.compile(cache=str(partial))
        partial_digest.write_text(_digest(partial))
        os.replace(partial_digest, _digest_file(cached))
        os.replace(partial, cached)
    finally:
        partial.unlink(missing_ok=True)
        partial_digest.unlink(missing_ok=True)


def _verified(cached: Path) -> bool:
    """``cached`` holds the bytes its digest names. LLVM aborts the whole process on a
    damaged object file, so nothing else is ever handed to it; a damaged entry is deleted
    (and compiled again)."""
    digest_file = _digest_file(cached)
    try:
        good = cached.is_file() and digest_file.read_text() == _digest(cached)
    except OSError:
        good = False
    if not good and cached.exists():
        logger.warning(
            "compiled ranker cache entry %s is damaged or has no digest; compiling again", cached
        )
        cached.unlink(missing_ok=True)
    return good


def _digest_file(cached: Path) -> Path:
    return cached.with_suffix(".sha256")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cache_key(model_text: str, lleaves_version: str, llvm: Any) -> str:
    """The compiled code depends on the model, the compilers and the CPU it is tuned for."""
    try:
        features = llvm.get_host_cpu_features().flatten()
    except RuntimeError:  # LLVM cannot always tell
        features = ""
    digest = hashlib.sha256()
    for part in (
        model_text,
        lleaves_version,
        ".".join(map(str, llvm.llvm_version_info)),
        llvm.get_host_cpu_name(),
        features,
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def prune_cache(directory: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` most recently used compiled models in ``directory`` (by
    modification time: a cache hit touches its file); returns what was deleted. Files this
    module did not name are left alone."""
    entries = [path for path in directory.iterdir() if _ENTRY.fullmatch(path.name)]
    entries.sort(key=_mtime, reverse=True)
    removed = entries[keep:]
    for path in removed:
        path.unlink(missing_ok=True)  # another worker may have pruned it first
        _digest_file(path).unlink(missing_ok=True)
        path.with_suffix(".lock").unlink(missing_ok=True)
    return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # pruned by another worker meanwhile: oldest
        return 0.0


def _touch(path: Path) -> None:
    # A read-only cache still serves; it only loses its recency order.
    with contextlib.suppress(OSError):
        os.utime(path)


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def _largest_mismatch(forest: CompiledForest, booster: lgb.Booster) -> float:
    rows = probe_rows(booster, PROBE_ROWS)
    expected = booster.predict(rows, num_threads=1)
    return float(np.max(np.abs(forest.predict(rows) - expected)))


def probe_rows(booster: lgb.Booster, n_rows: int, seed: int = 0) -> npt.NDArray[np.float32]:
    """(n_rows, F) float32 rows that exercise the model's branches where they are decided: each
    feature at one of its split thresholds, one float32 step below or above it, or missing."""
    thresholds = split_thresholds(booster)
    rng = np.random.default_rng(seed)
    rows = np.full((n_rows, booster.num_feature()), np.nan, dtype=np.float32)
    largest = np.finfo(np.float32).max
    for feature, values in thresholds.items():
        # LightGBM writes an open-ended split as a huge float64 threshold; the largest float32
        # probes the same branch.
        at = rng.choice(np.clip(values, -largest, largest).astype(np.float32), n_rows)
        step = rng.integers(-1, 2, n_rows)  # -1 below, 0 at, +1 above
        with np.errstate(over="ignore"):  # a step past the largest float32 is infinity: fine
            below = np.nextafter(at, np.float32(-np.inf))
            above = np.nextafter(at, np.float32(np.inf))
        moved = np.where(step < 0, below, np.where(step > 0, above, at))
        missing = rng.random(n_rows) < 0.1
        rows[:, feature] = np.where(missing, np.float32(np.nan), moved)
    return rows


def split_thresholds(booster: lgb.Booster) -> dict[int, list[float]]:
    """Feature index -> the thresholds of its numeric splits, over all trees."""
    found: dict[int, list[float]] = {}
    stack = [tree["tree_structure"] for tree in booster.dump_model()["tree_info"]]
    while stack:
        node = stack.pop()
        if "split_feature" not in node:
            continue  # a leaf
        if node.get("decision_type") == "<=":
            found.setdefault(int(node["split_feature"]), []).append(float(node["threshold"]))
        stack.extend((node["left_child"], node["right_child"]))
    return found
