"""A candidate source's saved state: one pickle-free layout for every source.

:func:`write_state` / :func:`read_state` write and read a ``config.json`` (format version, source
class, config, scalars, array names) and one ``.npy`` file per array under ``arrays/``. Separate
``.npy`` files, not one ``.npz``, because a ``.npy`` can be memory-mapped: every process that loads
the bundle (the serving workers of one machine) then shares one copy of the big arrays (factors,
item vectors) through the page cache.
"""

from __future__ import annotations

import json
import mmap
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from data.errors import BundleError

# 2: one .npy per array under ARRAYS_DIR (memory-mappable); 1: every array in STATE_FILE (.npz).
STATE_FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
CONFIG_FILE = "config.json"
ARRAYS_DIR = "arrays"
STATE_FILE = "state.npz"  # format 1 only: still read, no longer written
# Arrays are mapped from their files from one page up: a smaller one has no page to share, and
# each mapping holds a file descriptor.
MMAP_MIN_BYTES = mmap.PAGESIZE
# Array names become file names.
_ARRAY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def write_state(
    directory: Path, source: str, meta: Mapping[str, Any], arrays: Mapping[str, Any]
) -> None:
    """Write ``arrays`` as ``arrays/<name>.npy``, then ``config.json`` (``meta`` plus format,
    source and the array names).

    ``config.json`` comes last, so a directory that has it holds complete state.
    """
    out = Path(directory)
    bad = [name for name in arrays if not _ARRAY_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"array names must be identifiers (they become file names), got {bad}")
    out.mkdir(parents=True, exist_ok=True)
    # Leftovers of an earlier save in the same directory would outlive this one's state.
    (out / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(out / ARRAYS_DIR, ignore_errors=True)
    (out / ARRAYS_DIR).mkdir()
    for name, array in arrays.items():
        np.save(out / ARRAYS_DIR / f"{name}.npy", np.asarray(array), allow_pickle=False)
    document = {
        "format_version": STATE_FORMAT_VERSION,
        "source": source,
        **meta,
        "arrays": sorted(arrays),
    }
    (out / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def read_state(directory: Path, source: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The ``meta`` and ``arrays`` that :func:`write_state` wrote for ``source``.

    Arrays of at least ``MMAP_MIN_BYTES`` are ``np.memmap``s of their files, copy-on-write: the
    pages are read on first use and shared with every other process that maps the same file,
    until a process writes to one (it then gets a private copy; the file never changes). So
    they behave as arrays read into memory. A format-1 state (``state.npz``, which cannot be
    mapped) is read into memory.

    ``BundleError`` names the directory if a file is missing or unreadable, or if it holds
    another source or format version.
    """
    path = Path(directory)
    meta_file = path / CONFIG_FILE
    if not meta_file.is_file():
        raise BundleError(f"{path}: not a saved {source} ({CONFIG_FILE} missing)")
    try:
        meta = json.loads(meta_file.read_text())
    except (ValueError, OSError) as exc:
        raise BundleError(f"{path}: unreadable {source} state ({exc})") from exc
    found = (meta.get("source"), meta.get("format_version"))
    if found[0] != source or found[1] not in READABLE_FORMATS:
        raise BundleError(
            f"{path}: holds {found[0]!r} format {found[1]!r}, "
            f"expected {source!r} format {' or '.join(map(str, READABLE_FORMATS))}"
        )
    try:
        arrays = _read_npz(path) if found[1] == 1 else _map_arrays(path, meta.get("arrays"))
    except (ValueError, OSError) as exc:
        raise BundleError(f"{path}: unreadable {source} state ({exc})") from exc
    meta.pop("arrays", None)
    return meta, arrays


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """A format-1 state: every array from ``state.npz``, in memory."""
    if not (path / STATE_FILE).is_file():
        raise OSError(f"{STATE_FILE} is missing")
    with np.load(path / STATE_FILE, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def _map_arrays(path: Path, names: Any) -> dict[str, np.ndarray]:
    """A format-2 state: each listed ``arrays/<name>.npy``, mapped when big enough."""
    if not isinstance(names, list) or not all(
        isinstance(n, str) and _ARRAY_NAME.fullmatch(n) for n in names
    ):
        raise ValueError(f"{CONFIG_FILE} lists no valid array names (got {names!r})")
    arrays = {}
    for name in names:
        array = np.load(path / ARRAYS_DIR / f"{name}.npy", mmap_mode="c", allow_pickle=False)
        # Copying a small array into memory drops its mapping (and its file descriptor). A big
        # one is handed out as a plain ndarray view of the mapping: np.memmap's subclass hooks
        # run on every operation and its results, which cost ~10 % of a pipeline batch.
        arrays[name] = array.view(np.ndarray) if array.nbytes >= MMAP_MIN_BYTES else np.array(array)
    return arrays


def is_memory_mapped(array: np.ndarray) -> bool:
    """Whether ``array``'s memory is a mapped file (directly or through the views it came from)."""
    base: object = array
    while isinstance(base, np.ndarray):
        if isinstance(base, np.memmap):
            return True
        base = base.base
    return isinstance(base, mmap.mmap)


__all__ = [
    "ARRAYS_DIR",
    "CONFIG_FILE",
    "MMAP_MIN_BYTES",
    "STATE_FILE",
    "STATE_FORMAT_VERSION",
    "is_memory_mapped",
    "read_state",
    "write_state",
]
