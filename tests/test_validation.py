"""The shared value checks of ``data.validation`` and the renamed-key aliases of config parsing."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from data.configuration import from_mapping, to_mapping
from data.errors import ConfigError, DataError
from data.validation import (
    boolean,
    finite_float,
    fraction,
    integer,
    is_number,
    non_negative_float,
    non_negative_int,
    one_of,
    positive_float,
    positive_int,
)


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.uint8(2)])
def test_positive_int_accepts_integers_and_returns_a_python_int(value: object) -> None:
    result = positive_int(value, "x")
    assert result == value and type(result) is int


@pytest.mark.parametrize("value", [0, -1, True, False, 1.0, "1", None, np.float32(2)])
def test_positive_int_rejects_with_the_field_and_the_value(value: object) -> None:
    message = f"Cfg.n must be an integer >= 1, got {value!r}"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        positive_int(value, "Cfg.n")


def test_non_negative_int_takes_zero_and_the_error_class() -> None:
    assert non_negative_int(0, "n") == 0
    with pytest.raises(DataError, match="n must be an integer >= 0, got -1"):
        non_negative_int(-1, "n", error=DataError)


def test_integer_bounds_and_none() -> None:
    assert integer(5, "k", minimum=1, maximum=5) == 5
    with pytest.raises(ConfigError, match=r"k must be an integer in \[1, 5\], got 6"):
        integer(6, "k", minimum=1, maximum=5)
    assert integer(None, "n", minimum=1, none_ok=True) is None
    with pytest.raises(ConfigError, match="n must be None or an integer >= 1, got 0"):
        integer(0, "n", minimum=1, none_ok=True)
    with pytest.raises(ConfigError, match="n must be an integer, got 'a'"):
        integer("a", "n")


def test_numbers_reject_bools_nan_and_by_default_infinity() -> None:
    assert positive_float(2, "x") == 2.0 and isinstance(positive_float(2, "x"), float)
    assert positive_float(np.float32(0.5), "x") == 0.5
    assert positive_float(math.inf, "x", finite=False) == math.inf
    for bad in (0, -1.0, True, math.nan, math.inf, "1"):
        with pytest.raises(ConfigError, match="x must be a finite number > 0"):
            positive_float(bad, "x")
    with pytest.raises(ConfigError, match="x must be a number > 0, got nan"):
        positive_float(math.nan, "x", finite=False)
    assert non_negative_float(0, "y") == 0.0
    with pytest.raises(ConfigError, match="y must be a finite number >= 1, got 0.5"):
        non_negative_float(0.5, "y", minimum=1)
    assert finite_float(-3, "z") == -3.0
    with pytest.raises(ConfigError, match="z must be a finite number, got False"):
        finite_float(False, "z")
    assert is_number(np.int32(1)) and not is_number(True) and not is_number(None)


def test_fraction_intervals() -> None:
    assert fraction(0, "p") == 0.0 and fraction(1, "p") == 1.0
    with pytest.raises(ConfigError, match=r"p must lie in \[0, 1\), got 1"):
        fraction(1, "p", high_open=True)
    with pytest.raises(ConfigError, match=r"p must lie in \(0, 1\], got 0"):
        fraction(0, "p", low_open=True)
    for bad in (math.nan, True, -0.1, "0.5"):
        with pytest.raises(ConfigError, match=r"p must lie in \[0, 1\]"):
            fraction(bad, "p")


def test_one_of_and_boolean() -> None:
    assert one_of("a", "mode", ("a", "b")) == "a"
    with pytest.raises(ConfigError, match=r"mode must be one of \['a', 'b'\], got 'c'"):
        one_of("c", "mode", ("a", "b"))
    with pytest.raises(ConfigError, match="must be one of"):
        one_of(True, "level", (1, 2))  # True == 1, but a bool is not a level
    with pytest.raises(ConfigError, match="must be one of"):
        one_of(["a"], "mode", {"a", "b"})  # unhashable
    assert boolean(True, "flag") is True
    with pytest.raises(ConfigError, match="flag must be true or false, got 1"):
        boolean(1, "flag")


@dataclass(frozen=True)
class _Renamed:
    renamed_keys: ClassVar[dict[str, str]] = {"threads": "num_threads"}
    num_threads: int | None = None


def test_an_old_key_still_loads_with_a_logged_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="data.configuration"):
        config = from_mapping(_Renamed, {"threads": 2}, "thing")
    assert config.num_threads == 2
    assert "'threads' is deprecated, use 'num_threads'" in caplog.text
    assert from_mapping(_Renamed, {"num_threads": 3}, "thing").num_threads == 3
    with pytest.raises(ConfigError, match="set only 'num_threads'"):
        from_mapping(_Renamed, {"threads": 2, "num_threads": 3}, "thing")


@dataclass(frozen=True)
class _Sized:
    size: int = 1
    shape: tuple[int, ...] = (1,)


def test_to_mapping_writes_numpy_scalars_as_python_numbers() -> None:
    values = to_mapping(_Sized(np.int64(3), (np.int64(4),)))  # type: ignore[arg-type]
    assert values == {"size": 3, "shape": [4]}
    assert type(values["size"]) is int and type(values["shape"][0]) is int
