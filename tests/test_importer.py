"""Importing interaction logs and side tables from CSV / TSV / parquet files."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from data.errors import ConfigError, DataError
from data.importer import import_interactions, import_table
from data.schema import INTERACTION_SCHEMA


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def canonical(rows: list[tuple[str, str, int, float]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=INTERACTION_SCHEMA, orient="row")


# --------------------------------------------------------------------------------------------
# import_interactions: formats and column mapping


def test_csv_with_default_columns_gets_unit_weights(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n007,42,100\n8,042,200\n")

    frame = import_interactions(path)

    assert frame.schema == pl.Schema(INTERACTION_SCHEMA)
    # Ids are read as text, so leading zeros survive.
    assert_frame_equal(frame, canonical([("007", "42", 100, 1.0), ("8", "042", 200, 1.0)]))


def test_tsv_with_mapped_columns_and_a_weight(tmp_path: Path) -> None:
    path = write(
        tmp_path / "log.tsv",
        "ts\tuid\tsku\tqty\textra\n1700000000\tu1\ti1\t2.5\tx\n1700000060\tu2\ti1\t1\ty\n",
    )

    frame = import_interactions(
        path, user_col="uid", item_col="sku", time_col="ts", weight_col="qty"
    )

    expected = canonical([("u1", "i1", 1_700_000_000, 2.5), ("u2", "i1", 1_700_000_060, 1.0)])
    assert_frame_equal(frame, expected)


@pytest.mark.parametrize("suffix", [".parquet", ".pq"])
def test_parquet_ids_of_any_type_become_strings(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"log{suffix}"
    pl.DataFrame(
        {
            "user_id": [1, 2],
            "item_id": [7.0, 8.0],  # pandas turns int ids into floats when one is missing
            "timestamp": [10, 20],
            "rating": pl.Series([4, 5], dtype=pl.Int8),
        }
    ).write_parquet(path)

    frame = import_interactions(path, weight_col="rating")

    assert_frame_equal(frame, canonical([("1", "7", 10, 4.0), ("2", "8", 20, 5.0)]))


def test_millisecond_timestamps_need_an_explicit_unit(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\na,b,1700000000999\n")

    assert import_interactions(path, time_unit="ms")["timestamp"].to_list() == [1_700_000_000]
    assert import_interactions(path)["timestamp"].to_list() == [1_700_000_000_999]


@pytest.mark.parametrize(
    ("values", "time_format", "expected"),
    [
        (["2024-01-05T10:00:00+02:00", "2024-01-06T00:00:00Z"], None, [1704441600, 1704499200]),
        (["2024-01-05T08:00:00", "2024-01-05 08:00:01"], None, [1704441600, 1704441601]),
        (["1970-01-02", "1970-01-03"], None, [86_400, 172_800]),
        (["05/01/2024 08:00", "06/01/2024 00:00"], "%d/%m/%Y %H:%M", [1704441600, 1704499200]),
        (["20240105", "20240106"], "%Y%m%d", [1704412800, 1704499200]),
        (["1.9", "2.2"], None, [1, 2]),
    ],
)
def test_string_and_float_timestamps_become_epoch_seconds_utc(
    values: list[str], time_format: str | None, expected: list[int], tmp_path: Path
) -> None:
    rows = "".join(f"u,i{n},{value}\n" for n, value in enumerate(values))
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n" + rows)

    frame = import_interactions(path, time_format=time_format)

    assert frame["timestamp"].to_list() == expected


@pytest.mark.parametrize(
    "column",
    [
        pl.Series([dt.datetime(2024, 1, 5, 8)]),
        pl.Series([dt.datetime(2024, 1, 5, 10)]).dt.replace_time_zone("Europe/Helsinki"),
        pl.Series([dt.date(2024, 1, 5)]),
    ],
)
def test_parquet_datetime_and_date_columns(column: pl.Series, tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pl.DataFrame({"user_id": ["u"], "item_id": ["i"], "when": column}).write_parquet(path)

    frame = import_interactions(path, time_col="when")

    assert frame["timestamp"].to_list() == [1704441600 if column.dtype != pl.Date else 1704412800]


@settings(max_examples=30, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.text("0123456789abcXYZ_-", min_size=1, max_size=6),
            st.text("0123456789abcXYZ_-", min_size=1, max_size=6),
            st.integers(-(2**40), 2**40),
            st.floats(-1e6, 1e6, width=32, allow_nan=False),
        ),
        min_size=1,
        max_size=40,
    ),
    suffix=st.sampled_from([".csv", ".tsv", ".parquet"]),
)
def test_canonical_frames_round_trip_through_every_format(
    rows: list[tuple[str, str, int, float]], suffix: str
) -> None:
    original = canonical(rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"log{suffix}"
        if suffix == ".parquet":
            original.write_parquet(path)
        else:
            original.write_csv(path, separator="\t" if suffix == ".tsv" else ",")
        imported = import_interactions(path, weight_col="weight")

    assert_frame_equal(imported, original)


# --------------------------------------------------------------------------------------------
# import_interactions: errors


def test_error_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        import_interactions(tmp_path / "nope.csv")


def test_error_directory_instead_of_file(tmp_path: Path) -> None:
    folder = tmp_path / "log.csv"
    folder.mkdir()
    with pytest.raises(DataError, match="not a file"):
        import_interactions(folder)


def test_error_unsupported_extension(tmp_path: Path) -> None:
    path = write(tmp_path / "log.json", "[]")
    with pytest.raises(DataError, match=r"unsupported file extension '\.json'.*\.parquet"):
        import_interactions(path)


@pytest.mark.parametrize("name", ["log.csv", "log.parquet"])
def test_error_zero_byte_file(name: str, tmp_path: Path) -> None:
    path = write(tmp_path / name, "")
    with pytest.raises(DataError, match=r"empty \(0 bytes\)"):
        import_interactions(path)


def test_error_header_without_rows(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n")
    with pytest.raises(DataError, match="no rows"):
        import_interactions(path)


def test_error_parquet_without_rows(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pl.DataFrame(schema=INTERACTION_SCHEMA).write_parquet(path)
    with pytest.raises(DataError, match="no rows"):
        import_interactions(path)


def test_error_missing_column_lists_the_columns_found(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "user,item_id,ts\na,b,1\n")
    with pytest.raises(
        DataError, match=r"missing column.*'user_id'.*found \['item_id', 'ts', 'user'\]"
    ):
        import_interactions(path)


def test_error_missing_weight_column(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\na,b,1\n")
    with pytest.raises(DataError, match="'clicks'"):
        import_interactions(path, weight_col="clicks")


@pytest.mark.parametrize(
    ("body", "column"),
    [("a,b,1\n,c,2\n", "uid"), ("a,b,1\nd,,2\n", "iid")],
)
def test_error_null_ids_name_the_column(body: str, column: str, tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "uid,iid,timestamp\n" + body)
    with pytest.raises(DataError, match=rf"1 null value\(s\) in column '{column}'"):
        import_interactions(path, user_col="uid", item_col="iid")


def test_error_unparsable_timestamp_names_the_column_and_a_value(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "u,i,when\na,b,2024-01-05\na,c,yesterday\n")
    with pytest.raises(DataError, match=r"1 value\(s\) in column 'when'.*'yesterday'"):
        import_interactions(path, user_col="u", item_col="i", time_col="when")


def test_error_timestamp_not_matching_the_given_format(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\na,b,2024-01-05\n")
    with pytest.raises(DataError, match="'2024-01-05'"):
        import_interactions(path, time_format="%d/%m/%Y")


def test_error_null_timestamp(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\na,b,1\na,c,\n")
    with pytest.raises(DataError, match=r"1 null value\(s\) in column 'timestamp'"):
        import_interactions(path)


def test_error_unsupported_timestamp_type(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pl.DataFrame({"user_id": ["a"], "item_id": ["b"], "timestamp": [True]}).write_parquet(path)
    with pytest.raises(DataError, match="'timestamp' has type Boolean"):
        import_interactions(path)


def test_error_non_numeric_weight_names_a_value(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp,w\na,b,1,2\na,c,2,lots\n")
    with pytest.raises(DataError, match=r"column 'w' cannot be parsed as a number, e.g. 'lots'"):
        import_interactions(path, weight_col="w")


def test_error_bad_time_unit(tmp_path: Path) -> None:
    path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\na,b,1\n")
    with pytest.raises(ConfigError, match="'us'"):
        import_interactions(path, time_unit="us")  # type: ignore[arg-type]


def test_error_corrupt_parquet(tmp_path: Path) -> None:
    path = write(tmp_path / "log.parquet", "this is not parquet")
    with pytest.raises(DataError, match="cannot read the file") as caught:
        import_interactions(path)
    assert "\n" not in str(caught.value)


def test_every_error_message_is_one_line_and_names_the_file(tmp_path: Path) -> None:
    cases = {
        "missing.csv": None,
        "empty.csv": "",
        "header.csv": "user_id,item_id,timestamp\n",
        "columns.csv": "a,b\n1,2\n",
        "nullid.csv": "user_id,item_id,timestamp\n,b,1\n",
        "time.csv": "user_id,item_id,timestamp\na,b,soon\n",
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            write(path, text)
        with pytest.raises(DataError) as caught:
            import_interactions(path)
        message = str(caught.value)
        assert "\n" not in message, name
        assert name in message, name


# --------------------------------------------------------------------------------------------
# import_table


def test_items_table_renames_the_id_and_splits_categories(tmp_path: Path) -> None:
    path = write(
        tmp_path / "items.csv",
        'movieId,title,categories\n01,"Heat, The",Action|Crime\n2,Up,\n3,Odd, Comedy |\n',
    )

    items = import_table(path, "movieId", "items")

    assert items.columns == ["item_id", "title", "categories"]
    assert items.schema["item_id"] == pl.String
    assert items.schema["categories"] == pl.List(pl.String)
    assert items["item_id"].to_list() == ["01", "2", "3"]
    assert items["categories"].to_list() == [["Action", "Crime"], [], ["Comedy"]]


def test_users_table_from_parquet_keeps_list_categories_and_other_columns(
    tmp_path: Path,
) -> None:
    path = tmp_path / "users.parquet"
    pl.DataFrame({"age": [31, 45], "uid": [10, 11], "categories": [["a"], []]}).write_parquet(path)

    users = import_table(path, "uid", "users")

    assert users.columns == ["user_id", "age", "categories"]
    assert users["user_id"].to_list() == ["10", "11"]
    assert users["categories"].to_list() == [["a"], []]


def test_table_error_duplicate_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "items.csv", "id,title\n1,a\n2,b\n1,c\n")
    with pytest.raises(DataError, match=r"1 item id\(s\) in column 'id' appear more than once"):
        import_table(path, "id", "items")


def test_table_error_null_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "users.csv", "id,age\n1,20\n,30\n")
    with pytest.raises(DataError, match=r"null value\(s\) in column 'id'"):
        import_table(path, "id", "users")


def test_table_error_missing_id_column(tmp_path: Path) -> None:
    path = write(tmp_path / "items.csv", "movieId,title\n1,a\n")
    with pytest.raises(DataError, match=r"missing column.*'item'.*found"):
        import_table(path, "item", "items")


def test_table_error_two_id_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "items.csv", "movieId,item_id\n1,a\n")
    with pytest.raises(DataError, match="both 'movieId'"):
        import_table(path, "movieId", "items")


def test_table_error_no_rows(tmp_path: Path) -> None:
    path = write(tmp_path / "items.tsv", "item_id\ttitle\n")
    with pytest.raises(DataError, match="no rows"):
        import_table(path, "item_id", "items")


def test_table_error_bad_kind(tmp_path: Path) -> None:
    path = write(tmp_path / "items.csv", "item_id\n1\n")
    with pytest.raises(ConfigError, match="'things'"):
        import_table(path, "item_id", "things")  # type: ignore[arg-type]
