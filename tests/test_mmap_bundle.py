"""Memory-mapped bundles: the big arrays, weights and index are maps of the bundle's files.

Several serving workers on one machine then share one copy through the page cache. Known
answers: a mapped load retrieves exactly what an in-memory load does; the arrays are
copy-on-write (a write never reaches the file); a bundle saved in the old ``state.npz`` layout
still loads.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from data.errors import BundleError
from pipeline.artifacts import RETRIEVAL_DIR, Artifacts, load_artifacts
from pipeline.factory import online_state_for
from retrieval import state_io
from retrieval.als import ALSSource
from retrieval.two_tower.source import INDEX_DIR, WEIGHTS_FILE, TwoTowerSource

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads the process's mappings in /proc"
)


def mapped_file(address: int) -> str | None:
    """What is mapped at ``address`` in this process: a file path, a pseudo-path such as
    ``[heap]``, or None (anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(bound, 16) for bound in fields[0].split("-"))
        if low <= address < high:
            return fields[5].strip() if len(fields) == 6 else None
    return None


def mapped_files() -> set[str]:
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {
        fields[5].strip()
        for fields in (line.split(maxsplit=5) for line in lines)
        if len(fields) == 6
    }


def sources(artifacts: Artifacts) -> tuple[TwoTowerSource, ALSSource]:
    tower = artifacts.retrieval.sources_["two_tower"]
    als = artifacts.retrieval.sources_["als"]
    assert isinstance(tower, TwoTowerSource) and isinstance(als, ALSSource)
    return tower, als


def test_mapped_load_shares_files_and_retrieves_the_same(tiny_bundle: tuple[Path, Path]) -> None:
    _, bundle = tiny_bundle
    plain, mapped = load_artifacts(bundle), load_artifacts(bundle, mmap=True)
    tower, als = sources(mapped)
    tower_dir = bundle / RETRIEVAL_DIR / "two_tower"

    for array in (tower.item_vectors_, als.item_factors_, als.user_factors_):
        assert state_io.is_memory_mapped(array) and type(array) is np.ndarray
    assert tower.index_.read_only and str(tower_dir / INDEX_DIR / "index.faiss") in mapped_files()
    weights = max(tower.model_.parameters(), key=lambda p: p.numel())
    assert mapped_file(weights.data_ptr()) == str(tower_dir / WEIGHTS_FILE)
    # Without mmap the two-tower weights and index are private memory (the index stays writable).
    plain_tower, _ = sources(plain)
    assert not plain_tower.index_.read_only
    plain_weights = max(plain_tower.model_.parameters(), key=lambda p: p.numel())
    assert mapped_file(plain_weights.data_ptr()) != str(tower_dir / WEIGHTS_FILE)

    users = plain.users.ids.head(40).to_list() + ["someone-new"]
    now = 2**40
    expected = plain.retrieval.retrieve(online_state_for(plain).batch(users, now))
    got = mapped.retrieval.retrieve(online_state_for(mapped).batch(users, now))
    np.testing.assert_array_equal(got.item_idx, expected.item_idx)
    np.testing.assert_array_equal(got.source_scores, expected.source_scores)
    assert (expected.item_idx[:, 0] >= 0).all(), "every user gets candidates: a real comparison"


def test_mapped_arrays_are_copy_on_write(tiny_bundle: tuple[Path, Path]) -> None:
    _, bundle = tiny_bundle
    directory = bundle / RETRIEVAL_DIR / "als"
    first = ALSSource.load(directory)
    original = np.array(first.item_factors_[0])
    first.item_factors_[0] = 123.0  # a private page of this process; the file never changes
    assert (first.item_factors_[0] == 123.0).all()
    np.testing.assert_array_equal(ALSSource.load(directory).item_factors_[0], original)


def test_small_arrays_are_read_into_memory(tmp_path: Path) -> None:
    small = np.arange(4, dtype=np.int64)
    big = np.arange(state_io.MMAP_MIN_BYTES // 8, dtype=np.int64)
    state_io.write_state(tmp_path, "Thing", {"x": 1}, {"small": small, "big": big})
    meta, arrays = state_io.read_state(tmp_path, "Thing")
    assert meta["x"] == 1 and "arrays" not in meta
    assert not state_io.is_memory_mapped(arrays["small"]) and state_io.is_memory_mapped(
        arrays["big"]
    )
    np.testing.assert_array_equal(arrays["small"], small)
    np.testing.assert_array_equal(arrays["big"], big)


def test_a_bundle_in_the_old_npz_layout_still_loads(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    _, bundle = tiny_bundle
    old = tmp_path / "als"
    shutil.copytree(bundle / RETRIEVAL_DIR / "als", old)
    # Rewrite the state as format 1 wrote it: every array in state.npz, no array list.
    meta = json.loads((old / state_io.CONFIG_FILE).read_text())
    arrays = {
        name: np.load(old / state_io.ARRAYS_DIR / f"{name}.npy") for name in meta.pop("arrays")
    }
    np.savez(old / state_io.STATE_FILE, allow_pickle=False, **arrays)
    shutil.rmtree(old / state_io.ARRAYS_DIR)
    (old / state_io.CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 1}))

    loaded, current = ALSSource.load(old), ALSSource.load(bundle / RETRIEVAL_DIR / "als")
    assert not state_io.is_memory_mapped(loaded.item_factors_)
    np.testing.assert_array_equal(loaded.item_factors_, current.item_factors_)
    np.testing.assert_array_equal(loaded.user_items_.toarray(), current.user_items_.toarray())

    (old / state_io.CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(BundleError, match="format 3, expected 'ALSSource' format 1 or 2"):
        ALSSource.load(old)
    (old / state_io.CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 1}))
    (old / state_io.STATE_FILE).unlink()
    with pytest.raises(BundleError, match="state.npz is missing"):
        ALSSource.load(old)
