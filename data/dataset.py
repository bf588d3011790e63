"""The dataset directory: the one on-disk format every loader writes and every stage reads.

Layout (README, "Dataset directory")::

    DIR/interactions.parquet        the whole log, canonical schema (data/schema.py)
    DIR/items.parquet               optional: item_id + features (categories, created_at, ...)
    DIR/users.parquet               optional: user_id + features
    DIR/splits/{train,valid,test}.parquet
    DIR/dataset.json                source, counts, split method, fingerprint
    DIR/world/                      synthetic datasets only: the ground truth (data/synthetic)

Files are written to a temporary name and renamed, and ``dataset.json`` is written last, so a
directory with a ``dataset.json`` is always complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from data.errors import DataError
from data.schema import (
    INTERACTION_SCHEMA,
    ITEM_ID,
    SPLIT_NAMES,
    TIMESTAMP,
    USER_ID,
    conform_interactions,
)

FORMAT_VERSION = 1
MANIFEST_NAME = "dataset.json"
INTERACTIONS_NAME = "interactions.parquet"
ITEMS_NAME = "items.parquet"
USERS_NAME = "users.parquet"
SPLITS_DIR = "splits"
WORLD_DIR = "world"
# Streaming hash chunk: large enough to keep the per-call overhead negligible on 1 GB files.
_HASH_CHUNK_BYTES = 1 << 22


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset directory. Frames are eager; use :func:`scan_split` for lazy access."""

    path: Path
    interactions: pl.DataFrame
    splits: dict[str, pl.DataFrame]
    items: pl.DataFrame | None
    users: pl.DataFrame | None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_world(self) -> bool:
        return (self.path / WORLD_DIR).is_dir()

    @property
    def timed(self) -> bool:
        """False for a log imported without event times (see ``data.schema.UNTIMED_TIMESTAMP``)."""
        return is_timed(self.meta)


def is_timed(manifest: dict[str, Any]) -> bool:
    """Whether a dataset manifest describes a log with event times (older manifests all do)."""
    return bool(manifest.get("timed", True))


def write_dataset(
    out_dir: str | Path,
    interactions: pl.DataFrame,
    splits: dict[str, pl.DataFrame],
    *,
    source: dict[str, Any],
    split_method: dict[str, Any],
    items: pl.DataFrame | None = None,
    users: pl.DataFrame | None = None,
    timed: bool = True,
) -> dict[str, Any]:
    """Write a complete dataset directory and return its manifest (``dataset.json``).

    ``timed=False`` records a log without event times (every event at ``UNTIMED_TIMESTAMP``).

    ``splits`` must hold the keys ``train``, ``valid`` and ``test`` (``valid`` may be empty).
    ``source`` describes where the data came from (``{"kind": "movielens", "variant": "100k"}``);
    ``split_method`` how the splits were made (``{"method": "temporal", "test_fraction": 0.1}``).
    """
    missing = [name for name in SPLIT_NAMES if name not in splits]
    if missing:
        raise DataError(f"splits {missing} are missing; expected {list(SPLIT_NAMES)}")
    out = Path(out_dir)
    (out / SPLITS_DIR).mkdir(parents=True, exist_ok=True)
    # An existing manifest would describe the old contents while we overwrite them.
    (out / MANIFEST_NAME).unlink(missing_ok=True)

    interactions = conform_interactions(interactions, "interactions")
    files = {INTERACTIONS_NAME: _write_parquet(interactions, out / INTERACTIONS_NAME)}
    split_counts: dict[str, int] = {}
    for name in SPLIT_NAMES:
        frame = splits[name]
        frame = conform_interactions(frame, f"split {name}") if frame.height else _empty()
        relative = f"{SPLITS_DIR}/{name}.parquet"
        files[relative] = _write_parquet(frame, out / relative)
        split_counts[name] = frame.height
    if items is not None:
        files[ITEMS_NAME] = _write_parquet(_require_id(items, ITEM_ID, "items"), out / ITEMS_NAME)
    if users is not None:
        files[USERS_NAME] = _write_parquet(_require_id(users, USER_ID, "users"), out / USERS_NAME)

    stats = interactions.select(
        pl.col(USER_ID).n_unique().alias("users"),
        pl.col(ITEM_ID).n_unique().alias("items"),
        pl.len().alias("interactions"),
        pl.col(TIMESTAMP).min().alias("first_timestamp"),
        pl.col(TIMESTAMP).max().alias("last_timestamp"),
    ).row(0, named=True)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "created_at": int(time.time()),
        "source": source,
        "counts": {k: int(stats[k]) for k in ("users", "items", "interactions")},
        "time_range": [int(stats["first_timestamp"]), int(stats["last_timestamp"])],
        "timed": timed,
        "split": {**split_method, "counts": split_counts},
        "files": files,
        "fingerprint": _fingerprint(files),
    }
    _atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read ``dataset.json``; ``DataError`` if ``path`` is not a dataset directory."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"dataset directory {str(root)!r} does not exist")
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DataError(
            f"{str(root)!r} is not a dataset directory: {MANIFEST_NAME} is missing "
            "(create one with `recsys data synth|movielens|import`)"
        )
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{manifest_path}: not valid JSON ({exc})") from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{manifest_path}: format_version {version!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    return manifest


def scan_split(path: str | Path, name: str) -> pl.LazyFrame:
    """Lazily scan one split (``train``, ``valid``, ``test``) or ``all`` (the whole log)."""
    root = Path(path)
    read_manifest(root)
    if name == "all":
        return pl.scan_parquet(root / INTERACTIONS_NAME)
    if name not in SPLIT_NAMES:
        raise DataError(f"unknown split {name!r}; expected one of {list(SPLIT_NAMES)} or 'all'")
    return pl.scan_parquet(root / SPLITS_DIR / f"{name}.parquet")


def load_dataset(path: str | Path) -> Dataset:
    """Load a dataset directory eagerly (verifies that the files listed in the manifest exist)."""
    root = Path(path)
    manifest = read_manifest(root)
    absent = [name for name in manifest.get("files", {}) if not (root / name).is_file()]
    if absent:
        raise DataError(f"dataset {str(root)!r} is incomplete: missing {absent}")
    optional = {
        name: pl.read_parquet(root / name) if (root / name).is_file() else None
        for name in (ITEMS_NAME, USERS_NAME)
    }
    return Dataset(
        path=root,
        interactions=pl.read_parquet(root / INTERACTIONS_NAME),
        splits={name: scan_split(root, name).collect() for name in SPLIT_NAMES},
        items=optional[ITEMS_NAME],
        users=optional[USERS_NAME],
        meta=manifest,
    )


def dataset_summary(path: str | Path) -> dict[str, Any]:
    """Summary statistics of a dataset directory, as shown by ``recsys data info``.

    Computed from the parquet files (not trusted from the manifest), lazily with one pass each.
    """
    root = Path(path)
    manifest = read_manifest(root)
    per_user = (
        scan_split(root, "all")
        .group_by(USER_ID)
        .agg(pl.len().alias("n"))
        .select(
            pl.len().alias("users"),
            pl.col("n").sum().alias("interactions"),
            pl.col("n").median().alias("median_per_user"),
            pl.col("n").quantile(0.99).alias("p99_per_user"),
            pl.col("n").max().alias("max_per_user"),
        )
    )
    overall = scan_split(root, "all").select(
        pl.col(ITEM_ID).n_unique().alias("items"),
        pl.col(TIMESTAMP).min().alias("first_timestamp"),
        pl.col(TIMESTAMP).max().alias("last_timestamp"),
    )
    user_stats, item_stats = pl.collect_all([per_user, overall])
    summary: dict[str, Any] = {**user_stats.row(0, named=True), **item_stats.row(0, named=True)}
    n_cells = summary["users"] * summary["items"]
    summary["density"] = summary["interactions"] / n_cells if n_cells else 0.0
    summary["splits"] = {
        name: scan_split(root, name).select(pl.len()).collect().item() for name in SPLIT_NAMES
    }
    summary["split_method"] = {k: v for k, v in manifest["split"].items() if k != "counts"}
    summary["timed"] = is_timed(manifest)
    summary["source"] = manifest["source"]
    summary["fingerprint"] = manifest["fingerprint"]
    summary["has_items"] = (root / ITEMS_NAME).is_file()
    summary["has_users"] = (root / USERS_NAME).is_file()
    summary["has_world"] = (root / WORLD_DIR).is_dir()
    return summary


def _empty() -> pl.DataFrame:
    return pl.DataFrame(schema=INTERACTION_SCHEMA)


def _require_id(frame: pl.DataFrame, id_col: str, source: str) -> pl.DataFrame:
    if id_col not in frame.columns:
        raise DataError(f"{source}: missing column {id_col!r}; found {frame.columns}")
    return frame.with_columns(pl.col(id_col).cast(pl.String))


def _write_parquet(frame: pl.DataFrame, path: Path) -> str:
    """Write atomically and return the file's SHA-256."""
    tmp = path.with_name(path.name + ".tmp")
    frame.write_parquet(tmp, statistics=True)
    os.replace(tmp, path)
    return _sha256(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _fingerprint(files: dict[str, str]) -> str:
    """One hash over every file's hash: identifies the exact contents of the dataset."""
    joined = "\n".join(f"{name}:{files[name]}" for name in sorted(files))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
