"""IdMap: deterministic construction, bulk lookups both ways, unknown ids, parquet round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.errors import DataError
from data.idmap import UNKNOWN_INDEX, IdMap


def test_from_ids_sorts_and_deduplicates() -> None:
    id_map = IdMap.from_ids(["c", "a", "b", "a", "c"])
    assert len(id_map) == 3
    assert id_map.ids.to_list() == ["a", "b", "c"]
    assert IdMap.from_ids(["b", "c", "a"]) == id_map  # input order does not matter


def test_index_and_to_ids_known_answer() -> None:
    id_map = IdMap.from_ids(pl.Series(["u10", "u2", "u1"]))
    indices = id_map.index(pl.Series(["u2", "u1", "u2", "u10"]))
    assert indices.dtype == np.int32
    assert indices.tolist() == [2, 0, 2, 1]  # string order: u1 < u10 < u2
    assert id_map.to_ids(indices).to_list() == ["u2", "u1", "u2", "u10"]


@pytest.mark.parametrize(
    "ids", [["b", "a"], ("b", "a"), np.array(["b", "a"]), np.array(["b", "a"], dtype=object)]
)
def test_index_accepts_sequences_and_arrays(ids: object) -> None:
    assert IdMap.from_ids(["a", "b"]).index(ids).tolist() == [1, 0]  # type: ignore[arg-type]


def test_a_batch_of_one_is_answered_like_a_bigger_batch() -> None:
    id_map = IdMap.from_ids(["a", "b", "c"])
    assert id_map.index(["c"])[0] == id_map.index(["c", "a"])[0]


def test_unknown_ids_raise_naming_them() -> None:
    id_map = IdMap.from_ids(["a", "b"])
    with pytest.raises(
        DataError, match=r"3 of 4 ids \(2 distinct\) are not in the id map.*\['zz', 'yy'\]"
    ):
        id_map.index(["a", "zz", "yy", "zz"])


def test_unknown_ids_map_to_minus_one_when_allowed() -> None:
    id_map = IdMap.from_ids(["a", "b"])
    indices = id_map.index(pl.Series(["b", "new", None]), allow_unknown=True)
    assert indices.tolist() == [1, UNKNOWN_INDEX, UNKNOWN_INDEX]


def test_to_ids_rejects_out_of_range_indices() -> None:
    id_map = IdMap.from_ids(["a", "b"])
    with pytest.raises(DataError, match=r"outside \[0, 2\)"):
        id_map.to_ids([0, 2])
    with pytest.raises(DataError, match="outside"):
        id_map.to_ids([-1])
    with pytest.raises(DataError, match="integers"):
        id_map.to_ids([0.5])
    for bad in ([0, 2], [-1], [0.5]):
        with pytest.raises(DataError):
            id_map.id_list(bad)


def test_id_list_reads_few_and_many_ids_alike() -> None:
    id_map = IdMap.from_ids([f"i{n}" for n in range(1000)])
    for size in (0, 1, 256, 257, 900):  # both sides of the one-by-one / gather switch
        indices = np.random.default_rng(size).integers(0, 1000, size)
        assert id_map.id_list(indices) == id_map.to_ids(indices).to_list()


def test_bad_ids_are_rejected() -> None:
    with pytest.raises(DataError, match="null"):
        IdMap.from_ids(pl.Series(["a", None]))
    with pytest.raises(DataError, match="strings"):
        IdMap.from_ids(pl.Series([1, 2]))
    with pytest.raises(DataError, match="not unique"):
        IdMap(pl.Series(["a", "a"]))


def test_parquet_round_trip(tmp_path: Path) -> None:
    id_map = IdMap.from_ids([f"item{k}" for k in range(100)])
    path = tmp_path / "items.parquet"
    id_map.to_frame().write_parquet(path)
    loaded = IdMap.from_frame(pl.read_parquet(path))
    assert loaded == id_map
    probe = pl.Series(["item7", "item42", "item99"])
    assert np.array_equal(loaded.index(probe), id_map.index(probe))


def test_from_frame_accepts_any_row_order_but_not_gaps() -> None:
    saved = IdMap.from_ids(["a", "b", "c"]).to_frame()
    assert IdMap.from_frame(saved.reverse()).ids.to_list() == ["a", "b", "c"]
    with pytest.raises(DataError, match="index"):
        IdMap.from_frame(saved.with_columns(pl.Series("index", [0, 1, 5], dtype=pl.Int32)))
    with pytest.raises(DataError, match="missing column"):
        IdMap.from_frame(saved.drop("index"))


def test_extend_appends_new_ids_and_keeps_old_indices() -> None:
    id_map = IdMap.from_ids(["b", "d"])
    extended = id_map.extend(["e", "a", "b", "a"])
    assert extended.ids.to_list() == ["b", "d", "a", "e"]
    assert extended.index(["b", "d"]).tolist() == id_map.index(["b", "d"]).tolist()
    assert id_map.extend(["b"]) is id_map


def test_the_map_cannot_be_mutated_through_ids() -> None:
    id_map = IdMap.from_ids(["a", "b"])
    ids = id_map.ids
    ids[0] = "zzz"
    assert id_map.ids.to_list() == ["a", "b"]


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.text(min_size=0, max_size=6), min_size=1, max_size=30))
def test_index_and_to_ids_are_inverse(ids: list[str]) -> None:
    id_map = IdMap.from_ids(ids)
    assert len(id_map) == len(set(ids))
    indices = id_map.index(ids)
    assert indices.min() >= 0 and indices.max() < len(id_map)
    assert id_map.to_ids(indices).to_list() == ids
    assert id_map.id_list(indices) == ids
    everything = np.arange(len(id_map))
    assert np.array_equal(id_map.index(id_map.to_ids(everything)), everything)


@settings(max_examples=150, deadline=None)
@given(
    ids=st.lists(st.text(max_size=5), min_size=0, max_size=25),
    queries=st.lists(st.text(max_size=7), min_size=0, max_size=12),
)
def test_few_ids_are_looked_up_like_many(ids: list[str], queries: list[str]) -> None:
    """A small call (binary search over a sorted copy) answers like a bulk call (polars hash
    lookup): unknown ids, prefixes of known ids, longer ids and NUL characters included."""
    id_map = IdMap.from_ids(ids)
    repeats = 5_000 // max(len(queries), 1) + 1  # more ids than the map holds: the bulk path
    bulk = id_map.index(queries * repeats, allow_unknown=True)[: len(queries)]
    small = id_map.index(queries, allow_unknown=True)
    np.testing.assert_array_equal(small, bulk)
    known = set(ids)
    assert [q in id_map for q in queries] == [q in known for q in queries]


def test_a_longer_id_is_not_truncated_into_a_match() -> None:
    id_map = IdMap.from_ids(["ab", "b"])
    assert id_map.index(["abc", "a", "ab", "b\x00"], allow_unknown=True).tolist() == [-1, -1, 0, -1]
