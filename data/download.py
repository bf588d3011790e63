"""Cached, checksum-verified downloads of public data sets (MovieLens archives and the like).

``fetch`` streams a URL into ``cache_dir`` with a progress bar on stderr. The file appears under its
final name only once it is complete (and verified, when a SHA-256 is given): it is written to a
temporary file in the same directory and renamed, so an interrupted download never leaves a
truncated file that a later call would mistake for a cached one.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from data.errors import ConfigError, DataError


@dataclass(frozen=True)
class DownloadConfig:
    """Transfer settings of ``fetch``.

    chunk_size: bytes read per iteration. 1 MiB keeps the per-chunk Python overhead negligible at
        hundreds of MB/s while the progress bar still moves smoothly on slow links.
    timeout_s: socket timeout in seconds for connecting and for each read; a stalled server fails
        with a clear error instead of hanging forever.
    """

    chunk_size: int = 1 << 20
    timeout_s: float = 60.0


_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_SUPPORTED_SCHEMES = ("http", "https")


def fetch(
    url: str,
    cache_dir: str | Path,
    *,
    sha256: str | None,
    progress: bool = True,
    config: DownloadConfig | None = None,
) -> Path:
    """Download ``url`` into ``cache_dir`` (unless already cached) and return the file's path.

    The file is named after the last segment of the URL path. A cached copy is reused when it
    exists and, if ``sha256`` is given, matches it; a cached copy that does not match is fetched
    again. Without ``sha256`` a present file is trusted: downloads are atomic, so a file under the
    final name is always complete.

    Args:
        url: an ``http://`` or ``https://`` URL.
        cache_dir: directory for downloaded files; created if missing.
        sha256: expected hex SHA-256 of the file, or ``None`` to skip verification.
        progress: show a tqdm progress bar on stderr.
        config: transfer settings; ``DownloadConfig()`` when ``None``.

    Raises:
        DataError: the URL cannot be fetched (HTTP error, unreachable host, truncated transfer) or
            the content does not match ``sha256``. The message names the URL.
        ConfigError: ``url`` is not http(s) or ``sha256`` is not 64 hex digits.
    """
    config = config or DownloadConfig()
    expected = _normalize_sha256(sha256)
    target = Path(cache_dir) / _file_name(url)

    if target.is_file() and (expected is None or _sha256_of(target, config.chunk_size) == expected):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target, so the final rename is atomic (never crosses file systems).
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp_path = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as sink:
            actual = _stream(url, sink, config=config, progress=progress, label=target.name)
        if expected is not None and actual != expected:
            raise DataError(
                f"SHA-256 mismatch for {url}: expected {expected}, got {actual} "
                "(the download is corrupt or the file changed upstream)"
            )
        os.replace(tmp_path, target)
    finally:
        # No-op after a successful rename; otherwise removes the partial or rejected file.
        tmp_path.unlink(missing_ok=True)
    return target


def _stream(url: str, sink: BinaryIO, *, config: DownloadConfig, progress: bool, label: str) -> str:
    """Copy the body of ``url`` into the binary file ``sink``; return the body's hex SHA-256."""
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=config.timeout_s) as response:
            length_header = response.headers.get("Content-Length")
            expected_length = int(length_header) if length_header is not None else None
            with tqdm(
                total=expected_length,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label,
                file=sys.stderr,
                disable=not progress,
            ) as bar:
                while chunk := response.read(config.chunk_size):
                    sink.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        exc.close()  # an HTTPError holds the open response; release its socket now
        raise DataError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DataError(f"cannot download {url}: {exc.reason}") from exc
    except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:
        raise DataError(f"cannot download {url}: {type(exc).__name__}: {exc}") from exc
    # http.client ends a body silently when the connection drops early, so check the length.
    if expected_length is not None and received != expected_length:
        raise DataError(
            f"cannot download {url}: incomplete transfer, got {received} of {expected_length} bytes"
        )
    return digest.hexdigest()


def _file_name(url: str) -> str:
    """The cache file name for ``url``: the last segment of its path."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in _SUPPORTED_SCHEMES or not parsed.netloc:
        raise ConfigError(f"cannot download {url!r}: only http(s) URLs are supported")
    name = urllib.parse.unquote(parsed.path.rsplit("/", 1)[-1])
    if not name or name in (".", ".."):
        raise ConfigError(f"cannot download {url!r}: the URL path does not end in a file name")
    return name


def _normalize_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    normalized = sha256.strip().lower()
    if not _SHA256_PATTERN.fullmatch(normalized):
        raise ConfigError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return normalized


def _sha256_of(path: Path, chunk_size: int) -> str:
    """Hex SHA-256 of the file at ``path``, read in ``chunk_size`` byte blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()
