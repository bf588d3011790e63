"""Packed-key sorts: the same permutation as np.lexsort, floats ordered by their bit patterns."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from retrieval._sorting import descending_key, sort_order

small_keys = st.integers(1, 40).flatmap(
    lambda n: st.lists(hnp.arrays(np.int64, n, elements=st.integers(0, 50)), min_size=1, max_size=4)
)


@settings(max_examples=200, deadline=None)
@given(small_keys)
def test_packed_sort_equals_lexsort_including_ties(keys: list[np.ndarray]) -> None:
    np.testing.assert_array_equal(sort_order(keys), np.lexsort(tuple(reversed(keys))))


def test_keys_too_wide_to_pack_fall_back_to_lexsort() -> None:
    rng = np.random.default_rng(0)
    keys = [rng.integers(0, 2**40, 100), rng.integers(0, 2**40, 100)]  # 80 bits together
    np.testing.assert_array_equal(sort_order(keys), np.lexsort(tuple(reversed(keys))))


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.integers(1, 50),
        elements=st.floats(width=32, allow_nan=False),
    )
)
def test_descending_key_orders_like_the_negated_floats(values: np.ndarray) -> None:
    keys = descending_key(values)
    assert (keys >= 0).all() and (keys < 2**32).all()
    order = np.argsort(keys, kind="stable")
    np.testing.assert_array_equal(order, np.argsort(-values, kind="stable"))


def test_descending_key_known_values() -> None:
    keys = descending_key(np.array([1.0, -0.0, 0.0, -1.0, np.float32(3e-45)], dtype=np.float32))
    assert keys[1] == keys[2]  # -0.0 == 0.0
    assert keys[0] < keys[4] < keys[2] < keys[3]
