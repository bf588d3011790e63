"""The model bundle: one directory with every trained artifact and a manifest that vouches for it.

``manifest.json`` records the format version, creation time, the dataset fingerprint, the full
config and the SHA-256 of every file. :func:`verify_bundle` refuses a bundle whose files are
missing, altered or unlisted, so a half-copied or corrupted bundle is never served. No pickle:
weights are ``state_dict``s, arrays ``.npy``/``.npz``, tables parquet, indexes FAISS files.

``model_version`` names the model: a digest of the checksums of every file except the training
diagnostics (:data:`UNVERSIONED`: learning curves and their plots, stage wall times). Those are
checksummed like every other file, but two runs that train the same model write different ones
(seconds per epoch, examples per second), and the same data, config and seeds must give the same
``model_version`` (``tests/test_reproducible_bundle.py``). The manifest lists them under
``unversioned``.

A bundle is written into a temporary sibling directory and renamed into place once its manifest
is complete, so readers never see a partial bundle.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from data.errors import BundleError

BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Streaming hash chunk: keeps memory flat on multi-GB indexes.
_HASH_CHUNK_BYTES = 1 << 22
# Bundle paths (fnmatch patterns; ``*`` also matches ``/``) left out of model_version: what
# training measured about itself rather than what it learned.
UNVERSIONED = ("timings.json", "*curves.json", "*curves.png")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def bundle_writer(
    destination: str | Path, *, config: dict[str, Any], dataset_fingerprint: str
) -> Iterator[Path]:
    """Yield a staging directory to write artifacts into; on success, seal and move it in place.

    On an exception the staging directory is removed and ``destination`` is left untouched.
    """
    final = Path(destination)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        write_manifest(staging, config=config, dataset_fingerprint=dataset_fingerprint)
        if final.exists():
            retired = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_manifest(
    bundle: Path, *, config: dict[str, Any], dataset_fingerprint: str
) -> dict[str, Any]:
    files = {
        path.relative_to(bundle).as_posix(): sha256_file(path)
        for path in sorted(bundle.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }
    created = int(time.time())
    unversioned = sorted(name for name in files if is_unversioned(name))
    manifest = {
        "format_version": BUNDLE_FORMAT_VERSION,
        "created_at": created,
        "model_version": model_version(files, unversioned),
        "dataset_fingerprint": dataset_fingerprint,
        "config": config,
        "files": files,
        "unversioned": unversioned,
    }
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def is_unversioned(name: str) -> bool:
    """Whether bundle path ``name`` (POSIX, relative) is a diagnostic left out of the version."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in UNVERSIONED)


def model_version(files: dict[str, str], unversioned: list[str]) -> str:
    """Short, human-quotable identity of the model (served as ``model_version``): 12 hex digits
    of the SHA-256 over ``files`` (path -> checksum) less the ``unversioned`` paths."""
    left_out = set(unversioned)
    versioned = {name: digest for name, digest in files.items() if name not in left_out}
    return hashlib.sha256(json.dumps(versioned, sort_keys=True).encode()).hexdigest()[:12]


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Check a bundle against its manifest and return it; ``BundleError`` if anything differs.

    A path the OS refuses (a name too long, a file that cannot be read, an I/O error) is a bad
    bundle too: ``BundleError`` names the path, so callers (the CLI, ``/admin/reload``) report it
    like any other refused bundle instead of failing on a raw ``OSError``.
    """
    bundle = Path(path)
    try:
        return _verify(bundle)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        culprit = "" if exc.filename in (None, str(bundle)) else f" ({exc.filename})"
        raise BundleError(f"bundle {str(bundle)!r} cannot be read: {reason}{culprit}") from exc


def _verify(bundle: Path) -> dict[str, Any]:
    manifest_path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(f"bundle {str(bundle)!r} does not exist or is not a directory")
    if not manifest_path.is_file():
        raise BundleError(
            f"bundle {str(bundle)!r} has no {MANIFEST_NAME} (not a bundle, or incomplete)"
        )
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r} is not supported "
            f"(expected {BUNDLE_FORMAT_VERSION})"
        )
    listed: dict[str, str] = manifest.get("files", {})
    present = {
        p.relative_to(bundle).as_posix()
        for p in bundle.rglob("*")
        if p.is_file() and p.name != MANIFEST_NAME
    }
    missing = sorted(set(listed) - present)
    if missing:
        raise BundleError(f"bundle {str(bundle)!r} is missing {missing[:5]}")
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise BundleError(f"bundle {str(bundle)!r} has files not in its manifest: {unlisted[:5]}")
    for name, expected in listed.items():
        actual = sha256_file(bundle / name)
        if actual != expected:
            raise BundleError(
                f"bundle {str(bundle)!r}: {name} does not match its manifest checksum "
                f"(expected {expected[:12]}..., got {actual[:12]}...)"
            )
    return manifest
