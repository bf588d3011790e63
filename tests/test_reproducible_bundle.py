"""Same data, config and seeds -> the same model_version; a changed seed -> another one.

model_version is a digest of the bundle's files less the training diagnostics (curves, stage
times), which hold wall-clock seconds (pipeline/bundle.py).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from pipeline.artifacts import TIMINGS, train_bundle
from pipeline.bundle import MANIFEST_NAME, UNVERSIONED, verify_bundle, write_manifest
from tests.conftest import TINY_CONFIG


def manifest_of(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / MANIFEST_NAME).read_text())


def differing_files(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    a, b = first["files"], second["files"]
    return sorted(name for name in a.keys() | b.keys() if a.get(name) != b.get(name))


def test_training_twice_gives_the_same_model_version(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    data, first = tiny_bundle
    again = train_bundle(data, tmp_path / "again", config=tomllib.loads(TINY_CONFIG))
    before = manifest_of(first)
    differ = differing_files(before, again)
    assert set(differ) <= set(again["unversioned"]), f"files that differ between runs: {differ}"
    assert again["model_version"] == before["model_version"]
    # The stage times are kept (and checksummed), only outside the version.
    assert TIMINGS in again["unversioned"] and TIMINGS in again["files"]
    timings = json.loads((tmp_path / "again" / TIMINGS).read_text())["stage_seconds"]
    assert "fit two_tower" in timings and all(seconds >= 0 for seconds in timings.values())


@pytest.mark.parametrize(
    ("section", "key"), [("two_tower", "seed"), ("als", "random_state")], ids=["two_tower", "als"]
)
def test_another_seed_gives_another_model_version(
    tiny_bundle: tuple[Path, Path], tmp_path: Path, section: str, key: str
) -> None:
    data, first = tiny_bundle
    config = tomllib.loads(TINY_CONFIG)
    config["retrieval"][section][key] = 7
    other = train_bundle(data, tmp_path / "other", config=config)
    assert other["model_version"] != manifest_of(first)["model_version"]


def test_diagnostics_are_checksummed_but_not_versioned(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "ranking").mkdir(parents=True)
    (bundle / "weights.npy").write_bytes(b"weights")
    (bundle / "ranking" / "curves.json").write_text('{"seconds": 1.0}')
    (bundle / TIMINGS).write_text('{"stage_seconds": {"fit": 1.0}}')
    seal = {"config": {}, "dataset_fingerprint": "f"}
    first = write_manifest(bundle, **seal)
    assert first["unversioned"] == sorted([TIMINGS, "ranking/curves.json"])
    assert UNVERSIONED  # the patterns exist, and matched both diagnostics above

    (bundle / "ranking" / "curves.json").write_text('{"seconds": 2.0}')
    (bundle / TIMINGS).write_text('{"stage_seconds": {"fit": 2.0}}')
    second = write_manifest(bundle, **seal)
    assert second["model_version"] == first["model_version"]
    assert second["files"] != first["files"]
    verify_bundle(bundle)  # still checksummed: the new contents match the new manifest

    (bundle / "weights.npy").write_bytes(b"other weights")
    assert write_manifest(bundle, **seal)["model_version"] != first["model_version"]
