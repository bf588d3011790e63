"""Frozen config dataclasses from TOML: one file configures every component.

Each component owns a frozen dataclass of hyperparameters with documented defaults; the TOML file
has one table per component. :func:`from_mapping` turns a table into that dataclass and rejects
unknown keys by name, so a typo in a config file is an error, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from data.errors import ConfigError

T = TypeVar("T")


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from ``values``; unknown keys raise ``ConfigError``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"[{where}]: unknown key(s) {unknown}; known: {sorted(known)}")
    # TOML arrays arrive as lists; frozen configs hold tuples so they stay hashable.
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"[{where}]: {exc}") from exc


def to_mapping(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON/TOML-friendly dict (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; ``ConfigError`` naming the file on a missing file or bad syntax."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {str(file)!r} does not exist")
    try:
        return tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(file)!r}: {exc}") from exc
