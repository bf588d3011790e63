"""MovieLens loading (all formats, directory / zip / HTTP sources) and the cached downloader.

Everything runs against tiny fixture files and a local HTTP server on 127.0.0.1: nothing here
touches the internet.
"""

from __future__ import annotations

import hashlib
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from data.download import fetch
from data.errors import ConfigError, DataError
from data.movielens import (
    ITEMS_SCHEMA,
    MOVIELENS_VARIANTS,
    VARIANTS,
    MovieLensData,
    load_movielens,
)
from data.schema import INTERACTION_SCHEMA
from tests.fixtures_movielens import (
    ML100K_COUNTS,
    MOVIES,
    RATINGS,
    Movie,
    Rating,
    serve_directory,
    write_1m,
    write_100k,
    write_csv_release,
    write_ml100k_full_size,
    write_release,
    zip_release,
)

LAYOUTS = ("directory", "directory-subfolder", "zip", "zip-subfolder")


def expected_interactions(ratings: Sequence[Rating]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [str(r.user) for r in ratings],
            "item_id": [str(r.item) for r in ratings],
            "timestamp": [r.timestamp for r in ratings],
            "weight": [float(r.rating) for r in ratings],
        },
        schema=INTERACTION_SCHEMA,
    )


def expected_items(movies: Sequence[Movie]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": [str(m.item) for m in movies],
            "title": [m.title for m in movies],
            "categories": [list(m.genres) for m in movies],
        },
        schema=ITEMS_SCHEMA,
    )


def make_source(variant: str, layout: str, tmp: Path, **rows: object) -> Path:
    subfolder = layout.endswith("subfolder")
    if layout.startswith("zip"):
        return zip_release(variant, tmp / "release.zip", subfolder=subfolder, **rows)
    return write_release(variant, tmp / "release", subfolder=subfolder, **rows)


# --------------------------------------------------------------------------------------------
# load_movielens: formats and sources


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", MOVIELENS_VARIANTS)
def test_every_variant_and_layout_loads_the_known_rows(
    variant: str, layout: str, tmp_path: Path
) -> None:
    data = load_movielens(variant, make_source(variant, layout, tmp_path))  # type: ignore[arg-type]

    assert isinstance(data, MovieLensData)
    assert data.variant == variant
    assert data.interactions.schema == pl.Schema(INTERACTION_SCHEMA)
    assert_frame_equal(data.interactions, expected_interactions(RATINGS))
    assert data.items is not None
    assert_frame_equal(data.items, expected_items(MOVIES))


@pytest.mark.parametrize("variant", ["100k", "1m", "25m"])
def test_known_rows_titles_and_genres(variant: str, tmp_path: Path) -> None:
    data = load_movielens(variant, write_release(variant, tmp_path))  # type: ignore[arg-type]

    first = data.interactions.row(0, named=True)
    assert first == {"user_id": "196", "item_id": "242", "timestamp": 881250949, "weight": 3.0}
    assert data.interactions.height == len(RATINGS)
    assert data.interactions["user_id"].n_unique() == 4
    assert data.items is not None
    by_id = {row["item_id"]: row for row in data.items.iter_rows(named=True)}
    # latin-1 in 100k/1m, UTF-8 in the CSV releases: the same text either way.
    assert by_id["377"]["title"] == "Misérables, Les (1995)"
    assert by_id["302"]["title"] == "Star Wars: Episode IV - A New Hope (1977)"
    assert by_id["51"]["categories"] == ["Drama", "Romance", "War"]
    # "unknown" (100k) and "(no genres listed)" (CSV) mean no category.
    assert by_id["999"]["categories"] == []


def test_csv_release_keeps_half_star_ratings(tmp_path: Path) -> None:
    ratings = [Rating(1, 10, 3.5, 1_500_000_000), Rating(2, 10, 0.5, 1_500_000_001)]
    write_csv_release(tmp_path, ratings=ratings)

    data = load_movielens("latest-small", tmp_path)

    assert data.interactions["weight"].to_list() == [3.5, 0.5]


@pytest.mark.parametrize("variant", ["100k", "1m", "20m"])
def test_missing_movies_file_gives_no_items(variant: str, tmp_path: Path) -> None:
    data = load_movielens(variant, write_release(variant, tmp_path, movies=None))  # type: ignore[arg-type]

    assert data.items is None
    assert data.interactions.height == len(RATINGS)


def test_loads_from_a_local_http_server_and_caches_the_archive(tmp_path: Path) -> None:
    archive = zip_release("1m", tmp_path / "www" / "ml-1m.zip")
    cache = tmp_path / "cache"

    with serve_directory(archive.parent) as server:
        url = f"{server.url}/ml-1m.zip"
        first = load_movielens("1m", url, cache_dir=cache, progress=False)
        second = load_movielens("1m", url, cache_dir=cache, progress=False)

    assert server.requests == ["/ml-1m.zip"]  # the second load used the cache
    assert (cache / "ml-1m.zip").read_bytes() == archive.read_bytes()
    assert first.source == url
    assert_frame_equal(first.interactions, expected_interactions(RATINGS))
    assert_frame_equal(first.interactions, second.interactions)


def test_a_full_size_100k_release_has_the_published_counts(tmp_path: Path) -> None:
    n_users, n_items, n_ratings = ML100K_COUNTS
    write_ml100k_full_size(tmp_path / "ml-100k")

    data = load_movielens("100k", tmp_path)

    frame = data.interactions
    assert frame.height == n_ratings
    assert frame["user_id"].n_unique() == n_users
    assert frame["item_id"].n_unique() == n_items
    assert frame["weight"].min() == 1.0
    assert frame["weight"].max() == 5.0
    assert data.items is None


@settings(max_examples=25, deadline=None)
@given(
    variant=st.sampled_from(MOVIELENS_VARIANTS),
    ratings=st.lists(
        st.builds(
            Rating,
            user=st.integers(1, 10**6),
            item=st.integers(1, 10**6),
            rating=st.integers(1, 5).map(float),
            timestamp=st.integers(0, 2**31 - 1),
        ),
        min_size=1,
        max_size=30,
    ),
)
def test_any_ratings_round_trip_through_every_format(variant: str, ratings: list[Rating]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = write_release(variant, Path(tmp), ratings=ratings, movies=None)
        data = load_movielens(variant, source)  # type: ignore[arg-type]

    assert_frame_equal(data.interactions, expected_interactions(ratings))


# --------------------------------------------------------------------------------------------
# load_movielens: errors


def test_missing_ratings_file_names_the_path_and_the_file(tmp_path: Path) -> None:
    write_1m(tmp_path / "ml-1m")

    with pytest.raises(DataError, match=r"u\.data") as caught:
        load_movielens("100k", tmp_path)

    message = str(caught.value)
    assert str(tmp_path) in message
    assert "ml-100k/u.data" in message
    assert "\n" not in message


def test_missing_ratings_file_in_a_zip_names_the_archive(tmp_path: Path) -> None:
    archive = zip_release("100k", tmp_path / "wrong.zip")

    with pytest.raises(DataError, match=r"wrong\.zip.*ratings\.csv"):
        load_movielens("25m", archive)


def test_missing_source_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_movielens("100k", tmp_path / "nowhere")


def test_a_source_that_is_neither_directory_nor_zip_is_rejected(tmp_path: Path) -> None:
    not_a_zip = tmp_path / "ml-100k.zip"
    not_a_zip.write_text("<html>not found</html>")

    with pytest.raises(DataError, match="directory or a .zip archive"):
        load_movielens("100k", not_a_zip)


def test_unknown_variant_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'10m'.*'100k'"):
        load_movielens("10m", tmp_path)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("file_name", "content", "message"),
    [
        ("u.data", "196\t242\t3\t881250949\n186\t302\tthree\t891717742\n", "three"),
        ("u.data", "196\t242\t3\t881250949\n186\t302\t3\n", "line 2"),
        ("u.data", "196\t242\t3\t881250949\t7\n", "line 1.*found more"),
        ("u.data", "", "empty"),
        ("u.data", "\n\n", "empty"),
        ("ratings.dat", "1::1193::5::978300760\n1::661::3\n", "line 2"),
        ("ratings.dat", "1::1193::5::978300760::9\n", "line 1.*more"),
        ("ratings.dat", "1::x::5::978300760\n", '"x"'),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,four,3\n", "four"),
        ("ratings.csv", "user,movie,rating,timestamp\n1,2,4.0,3\n", "missing column"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n", "no interactions"),
    ],
)
def test_malformed_ratings_files_raise_data_errors_naming_the_file(
    file_name: str, content: str, message: str, tmp_path: Path
) -> None:
    variant = {"u.data": "100k", "ratings.dat": "1m", "ratings.csv": "latest-small"}[file_name]
    (tmp_path / file_name).write_text(content)

    with pytest.raises(DataError, match=message) as caught:
        load_movielens(variant, tmp_path)  # type: ignore[arg-type]

    assert file_name in str(caught.value)


def test_malformed_movies_file_is_a_data_error(tmp_path: Path) -> None:
    write_100k(tmp_path, movies=None)
    (tmp_path / "u.item").write_text("1|Toy Story (1995)|01-Jan-1995\n")

    with pytest.raises(DataError, match=r"u\.item.*line 1"):
        load_movielens("100k", tmp_path)


def test_blank_lines_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text("1::10::5::100\n\n2::20::4::200\n\n")

    data = load_movielens("1m", tmp_path)

    assert data.interactions["item_id"].to_list() == ["10", "20"]


def test_variant_table_points_at_grouplens() -> None:
    assert set(VARIANTS) == set(MOVIELENS_VARIANTS)
    for spec in VARIANTS.values():
        assert spec.url == f"https://files.grouplens.org/datasets/movielens/{spec.folder}.zip"
        assert spec.sha256 is None or len(bytes.fromhex(spec.sha256)) == 32


# --------------------------------------------------------------------------------------------
# fetch: the cached, verified downloader


@pytest.fixture
def www(tmp_path: Path) -> Path:
    folder = tmp_path / "www"
    folder.mkdir()
    (folder / "data.bin").write_bytes(bytes(range(256)) * 100)
    return folder


def sha256_hex(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_downloads_into_the_cache_and_reuses_it(www: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with serve_directory(www) as server:
        first = fetch(f"{server.url}/data.bin", cache, sha256=None, progress=False)
        second = fetch(f"{server.url}/data.bin", cache, sha256=None, progress=False)

    assert first == second == cache / "data.bin"
    assert first.read_bytes() == (www / "data.bin").read_bytes()
    assert server.requests == ["/data.bin"]
    assert sorted(p.name for p in cache.iterdir()) == ["data.bin"]  # no temporary files left


def test_fetch_verifies_the_checksum_and_replaces_a_stale_cached_copy(
    www: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "data.bin").write_bytes(b"stale")
    digest = sha256_hex(www / "data.bin")

    with serve_directory(www) as server:
        path = fetch(f"{server.url}/data.bin", cache, sha256=digest.upper(), progress=False)
        fetch(f"{server.url}/data.bin", cache, sha256=digest, progress=False)

    assert sha256_hex(path) == digest
    assert server.requests == ["/data.bin"]  # the verified copy was reused the second time


def test_fetch_checksum_mismatch_names_both_digests_and_keeps_nothing(
    www: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    wrong = "0" * 64

    with serve_directory(www) as server, pytest.raises(DataError) as caught:
        fetch(f"{server.url}/data.bin", cache, sha256=wrong, progress=False)

    message = str(caught.value)
    assert wrong in message
    assert sha256_hex(www / "data.bin") in message
    assert "data.bin" in message
    assert list(cache.iterdir()) == []


def test_fetch_http_error_is_one_line_naming_the_url(www: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with serve_directory(www) as server, pytest.raises(DataError, match="HTTP 404") as caught:
        fetch(f"{server.url}/missing.zip", cache, sha256=None, progress=False)

    assert f"{server.url}/missing.zip" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert list(cache.iterdir()) == []


def test_fetch_unreachable_host_is_a_data_error(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ml-100k.zip"

    with pytest.raises(DataError, match="cannot download") as caught:
        fetch(url, tmp_path, sha256=None, progress=False)

    assert url in str(caught.value)


def test_fetch_truncated_transfer_is_detected_and_removed(www: Path, tmp_path: Path) -> None:
    with (
        serve_directory(www, truncate_to=1000) as server,
        pytest.raises(DataError, match="incomplete transfer, got 1000 of 25600 bytes"),
    ):
        fetch(f"{server.url}/data.bin", tmp_path / "cache", sha256=None, progress=False)

    assert list((tmp_path / "cache").iterdir()) == []


def test_fetch_shows_progress_on_stderr(
    www: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serve_directory(www) as server:
        fetch(f"{server.url}/data.bin", tmp_path, sha256=None, progress=True)

    captured = capsys.readouterr()
    assert "data.bin" in captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    ("url", "sha256", "message"),
    [
        ("ftp://example.org/ml-100k.zip", None, "only http"),
        ("http://example.org/", None, "file name"),
        ("http://example.org/ml-100k.zip", "abc", "64 hex digits"),
    ],
)
def test_fetch_rejects_bad_arguments_before_any_network_access(
    url: str, sha256: str | None, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        fetch(url, tmp_path, sha256=sha256, progress=False)
