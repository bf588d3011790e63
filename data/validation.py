"""Checks of single config values and arguments: one wording, one rule for bools.

Every config dataclass validates its fields in ``__post_init__`` with these functions, and
functions check their scalar arguments with them, so a bad value gets the same message wherever
it is set::

    positive_int(config.factors, "ALSConfig.factors")
    # ConfigError: ALSConfig.factors must be an integer >= 1, got 0

Each check names the field, quotes the value, and rejects bools where a number is expected:
``True`` is an ``int`` to Python, but ``factors = true`` in a TOML file is a typo, not 1. Numpy
integers and floats pass as numbers (arguments are often read from arrays). Each check returns
the value as a plain ``int`` / ``float`` for a caller that keeps it.

``error`` picks the exception: :class:`~data.errors.ConfigError` (the default) for settings,
:class:`~data.errors.DataError` or ``ValueError`` where the value describes the data.
:func:`integer` with ``none_ok=True`` also accepts ``None`` (a setting whose ``None`` means "the
library default" or "no limit").
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Literal, TypeVar, overload

import numpy as np

from data.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "boolean",
    "finite_float",
    "fraction",
    "integer",
    "is_number",
    "non_negative_float",
    "non_negative_int",
    "one_of",
    "positive_float",
    "positive_int",
]


def is_number(value: object) -> bool:
    """Whether ``value`` is a real number (int or float, numpy's included), and not a bool."""
    return _as_float(value) is not None


def _as_float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return None
    return float(value)


@overload
def integer(
    value: object,
    name: str,
    *,
    minimum: int | None = ...,
    maximum: int | None = ...,
    none_ok: Literal[False] = ...,
    error: type[Exception] = ...,
) -> int: ...


@overload
def integer(
    value: object,
    name: str,
    *,
    minimum: int | None = ...,
    maximum: int | None = ...,
    none_ok: Literal[True],
    error: type[Exception] = ...,
) -> int | None: ...


def integer(
    value: object,
    name: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    none_ok: bool = False,
    error: type[Exception] = ConfigError,
) -> int | None:
    """``value`` as an ``int`` if it is an integer (not a bool) in ``[minimum, maximum]``.

    The message reads ``"{name} must be an integer >= {minimum}, got {value!r}"`` (or ``in
    [minimum, maximum]``, ``<= maximum``), with ``None or`` in front when ``none_ok``.
    """
    if value is None and none_ok:
        return None
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        number = int(value)
        if (minimum is None or number >= minimum) and (maximum is None or number <= maximum):
            return number
    if minimum is not None and maximum is not None:
        kind = f"an integer in [{minimum}, {maximum}]"
    elif minimum is not None:
        kind = f"an integer >= {minimum}"
    elif maximum is not None:
        kind = f"an integer <= {maximum}"
    else:
        kind = "an integer"
    raise error(f"{name} must be {'None or ' if none_ok else ''}{kind}, got {value!r}")


def positive_int(value: object, name: str, *, error: type[Exception] = ConfigError) -> int:
    """An integer ``>= 1``: ``"{name} must be an integer >= 1, got ..."`` (see :func:`integer`)."""
    return integer(value, name, minimum=1, error=error)


def non_negative_int(value: object, name: str, *, error: type[Exception] = ConfigError) -> int:
    """An integer ``>= 0``: ``"{name} must be an integer >= 0, got ..."`` (see :func:`integer`)."""
    return integer(value, name, minimum=0, error=error)


def _number(
    value: object,
    name: str,
    *,
    minimum: float | None = None,
    above: float | None = None,
    finite: bool = True,
    error: type[Exception],
) -> float:
    """``value`` as a float if it is a number (NaN never is) ``>= minimum`` / ``> above``."""
    number = _as_float(value)
    if (
        number is not None
        and not math.isnan(number)
        and (not finite or math.isfinite(number))
        and (minimum is None or number >= minimum)
        and (above is None or number > above)
    ):
        return number
    kind = "a finite number" if finite else "a number"
    if minimum is not None:
        kind += f" >= {minimum:g}"
    if above is not None:
        kind += f" > {above:g}"
    raise error(f"{name} must be {kind}, got {value!r}")


def finite_float(value: object, name: str, *, error: type[Exception] = ConfigError) -> float:
    """A finite number (not NaN, not a bool): ``"{name} must be a finite number, got ..."``."""
    return _number(value, name, error=error)


def positive_float(
    value: object, name: str, *, finite: bool = True, error: type[Exception] = ConfigError
) -> float:
    """A number ``> 0``: ``"{name} must be a finite number > 0, got ..."``; ``finite=False``
    also accepts infinity (a half-life of ``inf``: no decay)."""
    return _number(value, name, above=0.0, finite=finite, error=error)


def non_negative_float(
    value: object,
    name: str,
    *,
    minimum: float = 0.0,
    finite: bool = True,
    error: type[Exception] = ConfigError,
) -> float:
    """A number ``>= minimum`` (0 by default): ``"{name} must be a finite number >= 0, got
    ..."``; ``finite=False`` also accepts infinity."""
    return _number(value, name, minimum=minimum, finite=finite, error=error)


def fraction(
    value: object,
    name: str,
    *,
    low_open: bool = False,
    high_open: bool = False,
    error: type[Exception] = ConfigError,
) -> float:
    """A number in ``[0, 1]`` (``low_open``: ``(0, ...``; ``high_open``: ``..., 1)``):
    ``"{name} must lie in [0, 1), got ..."``."""
    number = _as_float(value)
    if number is not None:
        low_ok = number > 0 if low_open else number >= 0
        high_ok = number < 1 if high_open else number <= 1
        if low_ok and high_ok:  # NaN fails both
            return number
    interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
    raise error(f"{name} must lie in {interval}, got {value!r}")


def one_of(
    value: T, name: str, choices: Collection[object], *, error: type[Exception] = ConfigError
) -> T:
    """``value`` if it is one of ``choices``; ``"{name} must be one of [...], got ..."``."""
    if isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
        ok = False  # True == 1: a bool is never a stand-in for a numeric choice
    else:
        try:
            ok = value in choices
        except TypeError:  # unhashable value against a set of choices
            ok = False
    if not ok:
        raise error(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def boolean(value: object, name: str, *, error: type[Exception] = ConfigError) -> bool:
    """``value`` if it is a bool; ``"{name} must be true or false, got ..."``.

    TOML's ``true`` / ``false`` arrive as bools; ``1`` or ``"yes"`` are mistakes, not switches.
    """
    if not isinstance(value, bool):
        raise error(f"{name} must be true or false, got {value!r}")
    return value
