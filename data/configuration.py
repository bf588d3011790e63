"""Frozen config dataclasses from TOML: one file configures every component.

Each component owns a frozen dataclass of hyperparameters with documented defaults; the TOML file
has one table per component. :func:`from_mapping` turns a table into that dataclass and rejects
unknown keys by name, so a typo in a config file is an error, not a silently ignored setting.
Values are checked in each dataclass's ``__post_init__`` with :mod:`data.validation`.

A key renamed for consistency keeps loading under its old name: the dataclass lists
``renamed_keys = {"old": "new"}`` (a ``ClassVar``), and :func:`from_mapping` reads the old key as
the new one and logs a warning (a log line, not a ``DeprecationWarning``, so a config file that
still says ``threads`` loads wherever warnings are errors).
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from data.errors import ConfigError

T = TypeVar("T")
logger = logging.getLogger(__name__)


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from ``values``; unknown keys raise ``ConfigError``."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    values = _rename_old_keys(cls, dict(values or {}), where)
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


def _rename_old_keys(cls: type[Any], values: dict[str, Any], where: str) -> dict[str, Any]:
    """Read a key under its old name (``cls.renamed_keys``) as its new one, with a warning."""
    renamed: Mapping[str, str] = getattr(cls, "renamed_keys", {})
    for old, new in renamed.items():
        if old not in values:
            continue
        if new in values:
            raise ConfigError(f"[{where}]: {old!r} is the old name of {new!r}; set only {new!r}")
        logger.warning("[%s]: %r is deprecated, use %r (same meaning)", where, old, new)
        values[new] = values.pop(old)
    return values


def to_mapping(config: Any) -> dict[str, Any]:
    """A dataclass config as a JSON/TOML-friendly dict (tuples become lists, numpy scalars that
    the validators accept become Python numbers)."""
    return {k: _plain(v) for k, v in dataclasses.asdict(config).items()}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; ``ConfigError`` naming the file on a missing file or bad syntax."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {str(file)!r} does not exist")
    try:
        return tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(file)!r}: {exc}") from exc
