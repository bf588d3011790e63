"""Load the GroupLens MovieLens releases into the canonical interaction schema.

Three on-disk formats cover the supported variants (F. M. Harper and J. A. Konstan, "The MovieLens
Datasets: History and Context", ACM TiiS 5(4), 2015):

    100k          u.data      user \\t item \\t rating \\t unix_ts   (no header)
                  u.item      id|title|release|video release|url|19 genre flags  (latin-1)
    1m            ratings.dat user::item::rating::unix_ts          (no header)
                  movies.dat  id::title::Genre1|Genre2              (latin-1)
    latest-small, ratings.csv userId,movieId,rating,timestamp      (header)
    20m, 25m      movies.csv  movieId,title,Genre1|Genre2           (header, UTF-8, quoted titles)

A source is a directory, a ``.zip`` archive (read in memory, nothing is extracted) or an http(s) URL
of the archive (downloaded once into a cache directory). Files may sit at the root or in the
release's conventional subfolder (``ml-100k/``, ``ml-1m/``, ...).

The rating becomes the interaction ``weight`` (float32, 0.5-5 stars); ids keep their MovieLens
integer values, as strings.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Protocol, get_args

import polars as pl

from data.download import fetch
from data.errors import DataError
from data.schema import ITEM_ID, TIMESTAMP, USER_ID, WEIGHT, conform_interactions, require_columns

MovieLensVariant = Literal["100k", "1m", "latest-small", "20m", "25m"]
MOVIELENS_VARIANTS: tuple[str, ...] = get_args(MovieLensVariant)

TITLE = "title"
CATEGORIES = "categories"
ITEMS_SCHEMA: dict[str, pl.DataType] = {
    ITEM_ID: pl.String(),
    TITLE: pl.String(),
    CATEGORIES: pl.List(pl.String()),
}

_GROUPLENS = "https://files.grouplens.org/datasets/movielens"

# Genre columns of u.item, in file order (the ml-100k README and u.genre list them).
_GENRES_100K: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip
# Placeholders that mean "no genre"; they become an empty category list, not a category.
_NO_GENRE_LABELS: tuple[str, ...] = ("unknown", "(no genres listed)")


@dataclass(frozen=True)
class VariantSpec:
    """Where a MovieLens release is published and how its files are laid out.

    folder: the conventional top-level folder inside the official archive.
    layout: which of the three file formats the release uses ("100k", "1m" or "csv").
    url: the official GroupLens download URL of the zip archive.
    sha256: the archive's SHA-256, or None where no stable checksum is known.
    """

    folder: str
    layout: Literal["100k", "1m", "csv"]
    url: str
    sha256: str | None


# Checksums as recorded by TensorFlow Datasets (tensorflow_datasets/url_checksums/movielens.txt).
# ml-latest-small is re-issued in place by GroupLens, so it has no checksum that stays valid.
VARIANTS: Mapping[str, VariantSpec] = MappingProxyType(
    {
        "100k": VariantSpec(
            folder="ml-100k",
            layout="100k",
            url=f"{_GROUPLENS}/ml-100k.zip",
            sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        ),
        "1m": VariantSpec(
            folder="ml-1m",
            layout="1m",
            url=f"{_GROUPLENS}/ml-1m.zip",
            sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        ),
        "latest-small": VariantSpec(
            folder="ml-latest-small",
            layout="csv",
            url=f"{_GROUPLENS}/ml-latest-small.zip",
            sha256=None,
        ),
        "20m": VariantSpec(
            folder="ml-20m",
            layout="csv",
            url=f"{_GROUPLENS}/ml-20m.zip",
            sha256="96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
        ),
        "25m": VariantSpec(
            folder="ml-25m",
            layout="csv",
            url=f"{_GROUPLENS}/ml-25m.zip",
            sha256="8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa",
        ),
    }
)


@dataclass(frozen=True)
class MovieLensData:
    """One loaded MovieLens release.

    interactions: canonical interaction frame (``data.schema``), one row per rating, file order.
    items: ``item_id`` str, ``title`` str, ``categories`` list[str] (genres), one row per movie;
        None when the release's movies file is absent from the source.
    """

    variant: str
    source: str
    interactions: pl.DataFrame
    items: pl.DataFrame | None


def load_movielens(
    variant: MovieLensVariant,
    source: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> MovieLensData:
    """Load a MovieLens release from a directory, a zip archive or a URL.

    Args:
        variant: one of ``MOVIELENS_VARIANTS``.
        source: a directory, a ``.zip`` file, or an http(s) URL of the zip. ``None`` downloads the
            official GroupLens archive (``VARIANTS[variant].url``).
        cache_dir: where URL sources are downloaded; ``default_cache_dir()`` when ``None``.
        progress: show a download progress bar on stderr.

    Raises:
        DataError: unknown variant, missing source or file (the message names the path and the
            expected file name), malformed rows, or a failed download.
    """
    spec = _variant_spec(variant)
    path = _resolve_source(variant, spec, source, cache_dir=cache_dir, progress=progress)
    reader = _READERS[spec.layout]
    with _open_release(path, spec.folder) as release:
        ratings = release.find(reader.ratings_file)
        if ratings is None:
            raise DataError(
                f"{path}: MovieLens {variant} ratings file {reader.ratings_file!r} not found "
                f"(looked for {', '.join(release.candidates(reader.ratings_file))})"
            )
        interactions = conform_interactions(reader.read_ratings(ratings), ratings.label)
        movies = release.find(reader.movies_file)
        items = reader.read_items(movies) if movies is not None else None
    return MovieLensData(
        variant=variant, source=str(source or spec.url), interactions=interactions, items=items
    )


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/recsys-funnel/movielens`` (``~/.cache/...`` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "recsys-funnel" / "movielens"


# --------------------------------------------------------------------------------------------
# Finding the files of a release


@dataclass(frozen=True)
class _Member:
    """One file of a release: ``data`` is a path on disk or the bytes read from an archive."""

    label: str
    data: Path | bytes

    def read_bytes(self) -> bytes:
        return self.data.read_bytes() if isinstance(self.data, Path) else self.data


class _Release(Protocol):
    def candidates(self, name: str) -> list[str]: ...

    def find(self, name: str) -> _Member | None: ...


class _DirectoryRelease:
    def __init__(self, root: Path, folder: str) -> None:
        self._root = root
        self._folder = folder

    def candidates(self, name: str) -> list[str]:
        return [str(self._root / name), str(self._root / self._folder / name)]

    def find(self, name: str) -> _Member | None:
        for candidate in map(Path, self.candidates(name)):
            if candidate.is_file():
                return _Member(label=str(candidate), data=candidate)
        return None


class _ZipRelease:
    def __init__(self, archive: zipfile.ZipFile, path: Path, folder: str) -> None:
        self._archive = archive
        self._path = path
        self._folder = folder
        self._names = set(archive.namelist())

    def candidates(self, name: str) -> list[str]:
        return [f"{self._path}:{name}", f"{self._path}:{self._folder}/{name}"]

    def find(self, name: str) -> _Member | None:
        for member in (name, f"{self._folder}/{name}"):
            if member in self._names:
                label = f"{self._path}:{member}"
                try:
                    return _Member(label=label, data=self._archive.read(member))
                except (zipfile.BadZipFile, OSError) as exc:  # CRC mismatch, truncated archive
                    raise DataError(f"{label}: cannot read from the archive: {exc}") from exc
        return None


@contextmanager
def _open_release(path: Path, folder: str) -> Iterator[_Release]:
    if path.is_dir():
        yield _DirectoryRelease(path, folder)
    elif path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            yield _ZipRelease(archive, path, folder)
    else:
        raise DataError(f"{path}: a MovieLens source must be a directory or a .zip archive")


def _variant_spec(variant: str) -> VariantSpec:
    try:
        return VARIANTS[variant]
    except KeyError:
        raise DataError(
            f"unknown MovieLens variant {variant!r}; expected one of {list(MOVIELENS_VARIANTS)}"
        ) from None


def _resolve_source(
    variant: str,
    spec: VariantSpec,
    source: str | Path | None,
    *,
    cache_dir: str | Path | None,
    progress: bool,
) -> Path:
    """A local path for ``source``, downloading it first when it is a URL."""
    if source is None:
        source = spec.url
    if isinstance(source, str) and "://" in source:
        # The known checksum belongs to the official archive only, not to mirrors or copies.
        sha256 = spec.sha256 if source == spec.url else None
        return fetch(source, cache_dir or default_cache_dir(), sha256=sha256, progress=progress)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"MovieLens {variant} source {path} does not exist")
    return path


# --------------------------------------------------------------------------------------------
# Parsing the three formats


@dataclass(frozen=True)
class _Reader:
    ratings_file: str
    movies_file: str
    read_ratings: Callable[[_Member], pl.DataFrame]
    read_items: Callable[[_Member], pl.DataFrame]


# Rating fields of the headerless formats, in file order. Ids are parsed as integers, which
# validates them, and then kept as strings.
_RATING_TYPES: Mapping[str, pl.DataType] = MappingProxyType(
    {USER_ID: pl.Int64(), ITEM_ID: pl.Int64(), WEIGHT: pl.Float32(), TIMESTAMP: pl.Int64()}
)


def _read_100k_ratings(member: _Member) -> pl.DataFrame:
    return _ids_to_str(_read_delimited(member, separator="\t", schema=_RATING_TYPES))


def _read_100k_items(member: _Member) -> pl.DataFrame:
    flags = [f"genre_{i}" for i in range(len(_GENRES_100K))]
    schema: dict[str, pl.DataType] = {
        ITEM_ID: pl.Int64(),
        TITLE: pl.String(),
        "release_date": pl.String(),
        "video_release_date": pl.String(),
        "imdb_url": pl.String(),
        **dict.fromkeys(flags, pl.Int8()),
    }
    # Release and video dates and the IMDb URL are empty for some movies; they are not needed.
    frame = _read_delimited(
        member,
        separator="|",
        schema=schema,
        encoding="latin-1",
        required=[ITEM_ID, TITLE, *flags],
    )
    genre_or_null = [
        pl.when(pl.col(flag) == 1).then(pl.lit(genre))
        for flag, genre in zip(flags, _GENRES_100K, strict=True)
        if genre not in _NO_GENRE_LABELS
    ]
    return _ids_to_str(frame).select(
        ITEM_ID, TITLE, pl.concat_list(genre_or_null).list.drop_nulls().alias(CATEGORIES)
    )


def _read_1m_ratings(member: _Member) -> pl.DataFrame:
    fields = _split_lines(member, "::", list(_RATING_TYPES))
    return _ids_to_str(_cast(fields, _RATING_TYPES, member.label))


def _read_1m_items(member: _Member) -> pl.DataFrame:
    fields = _split_lines(member, "::", [ITEM_ID, TITLE, "genres"], encoding="latin-1")
    frame = _cast(fields, {ITEM_ID: pl.Int64()}, member.label)
    return _ids_to_str(frame).select(ITEM_ID, TITLE, _split_genres(pl.col("genres")))


def _read_csv_ratings(member: _Member) -> pl.DataFrame:
    columns = {
        "userId": pl.Int64(),
        "movieId": pl.Int64(),
        "rating": pl.Float32(),
        "timestamp": pl.Int64(),
    }
    frame = _read_delimited(member, separator=",", schema=columns, has_header=True)
    renamed = frame.rename(
        {"userId": USER_ID, "movieId": ITEM_ID, "rating": WEIGHT, "timestamp": TIMESTAMP}
    )
    return _ids_to_str(renamed)


def _read_csv_items(member: _Member) -> pl.DataFrame:
    columns = {"movieId": pl.Int64(), "title": pl.String(), "genres": pl.String()}
    frame = _read_delimited(member, separator=",", schema=columns, has_header=True, quoted=True)
    return _ids_to_str(frame.rename({"movieId": ITEM_ID})).select(
        ITEM_ID, TITLE, _split_genres(pl.col("genres"))
    )


_READERS: Mapping[str, _Reader] = MappingProxyType(
    {
        "100k": _Reader("u.data", "u.item", _read_100k_ratings, _read_100k_items),
        "1m": _Reader("ratings.dat", "movies.dat", _read_1m_ratings, _read_1m_items),
        "csv": _Reader("ratings.csv", "movies.csv", _read_csv_ratings, _read_csv_items),
    }
)


def _read_delimited(
    member: _Member,
    *,
    separator: str,
    schema: Mapping[str, pl.DataType],
    has_header: bool = False,
    quoted: bool = False,
    encoding: Literal["utf-8", "latin-1"] = "utf-8",
    required: Sequence[str] | None = None,
) -> pl.DataFrame:
    """Parse a single-byte-delimited file with a fixed schema; reject short or long rows.

    With ``has_header`` the header must name every column of ``schema`` (other columns are read
    and dropped). Without it every row has exactly ``len(schema)`` fields. Columns in
    ``required`` (default: all) must not be empty. Blank lines are skipped. Raises ``DataError``
    naming the file and the first bad row.
    """
    data: Path | bytes = member.data
    if encoding != "utf-8":  # polars reads UTF-8 only; the old releases are latin-1
        data = member.read_bytes().decode(encoding).encode("utf-8")
    if isinstance(data, bytes) and not data.strip():
        raise DataError(f"{member.label}: the file is empty")
    # Without a header, one spare column catches rows with extra fields (any further fields are
    # truncated away), so the error can name the line instead of polars' generic message.
    headerless_schema: dict[str, pl.DataType] = {**schema, "_extra": pl.String()}
    try:
        frame = pl.read_csv(
            data,
            separator=separator,
            has_header=has_header,
            schema_overrides=dict(schema) if has_header else None,
            schema=None if has_header else headerless_schema,
            truncate_ragged_lines=not has_header,
            missing_columns="insert" if not has_header else "raise",
            # Old titles contain stray '"'; only the CSV releases quote fields.
            quote_char='"' if quoted else None,
        )
    except pl.exceptions.NoDataError as exc:
        raise DataError(f"{member.label}: the file is empty") from exc
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{member.label}: malformed rows: {_first_line(exc)}") from exc
    if has_header:
        require_columns(frame, schema, member.label)
    columns = list(schema) if has_header else list(headerless_schema)
    frame = frame.select(columns).with_row_index("_line", offset=2 if has_header else 1)
    frame = frame.filter(~pl.all_horizontal(pl.exclude("_line").is_null()))  # blank lines
    if not has_header:
        frame = _reject_extra_fields(frame, member.label, len(schema), separator)
    _reject_incomplete_rows(frame, list(schema if required is None else required), member.label)
    return frame.drop("_line")


def _split_lines(
    member: _Member,
    delimiter: str,
    names: list[str],
    *,
    encoding: Literal["utf-8", "latin-1"] = "utf-8",
) -> pl.DataFrame:
    """Split each line of a multi-character-delimited file into ``names`` string columns.

    polars' CSV reader takes single-byte separators only, so the ``::`` files are read as one
    string column (no CSV parsing at all: the ASCII unit separator never occurs in the data) and
    split with vectorized string expressions. Extra or missing fields raise ``DataError``.
    """
    text = member.read_bytes().decode(encoding)
    if not text.strip():
        raise DataError(f"{member.label}: the file is empty")
    lines = pl.read_csv(
        text.encode("utf-8"),
        separator="\x1f",
        has_header=False,
        new_columns=["line"],
        schema={"line": pl.String()},
        quote_char=None,
    ).with_row_index("_line", offset=1)
    # One more split than fields: the last part is non-null exactly when a row has extra fields.
    parts = [*names, "_extra"]
    frame = (
        lines.filter(pl.col("line").str.strip_chars() != "")
        .select(
            "_line",
            pl.col("line")
            .str.strip_chars_end("\r")
            .str.splitn(delimiter, len(parts))
            .struct.rename_fields(parts)
            .alias("fields"),
        )
        .unnest("fields")
    )
    frame = _reject_extra_fields(frame, member.label, len(names), delimiter)
    _reject_incomplete_rows(frame, names, member.label)
    return frame.drop("_line")


def _reject_extra_fields(
    frame: pl.DataFrame, label: str, n_fields: int, separator: str
) -> pl.DataFrame:
    """Raise ``DataError`` if a row filled the spare ``_extra`` column; else drop that column."""
    extra = frame.filter(pl.col("_extra").is_not_null())
    if extra.height:
        raise DataError(
            f"{label}: malformed row at line {extra['_line'][0]}: expected {n_fields} fields "
            f"separated by {separator!r}, found more ({extra.height} such row(s))"
        )
    return frame.drop("_extra")


def _reject_incomplete_rows(frame: pl.DataFrame, required: Sequence[str], label: str) -> None:
    """Raise ``DataError`` naming the first row (by its ``_line`` number) missing a required field.

    A short row leaves its trailing columns null, so this also catches missing fields.
    """
    incomplete = frame.filter(pl.any_horizontal(pl.col(required).is_null()))
    if incomplete.height:
        first = incomplete.row(0, named=True)
        empty = [name for name in required if first[name] is None]
        raise DataError(
            f"{label}: malformed row at line {first['_line']}: missing or empty field(s) {empty}"
            f" ({incomplete.height} malformed row(s) in all)"
        )


def _cast(frame: pl.DataFrame, types: Mapping[str, pl.DataType], label: str) -> pl.DataFrame:
    """Strictly cast the named string columns; a non-numeric value raises ``DataError``."""
    try:
        return frame.with_columns(
            pl.col(name).str.strip_chars().cast(dtype) for name, dtype in types.items()
        )
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{label}: malformed rows: {_first_line(exc)}") from exc


def _ids_to_str(frame: pl.DataFrame) -> pl.DataFrame:
    """MovieLens ids are parsed as integers (which validates them) and kept as decimal strings."""
    return frame.with_columns(pl.col(c).cast(pl.String()) for c in (USER_ID, ITEM_ID) if c in frame)


def _split_genres(genres: pl.Expr) -> pl.Expr:
    """``"Action|Comedy"`` -> ``["Action", "Comedy"]``; placeholder labels give an empty list."""
    return (
        genres.fill_null("")
        .str.split("|")
        .list.eval(pl.element().filter(~pl.element().is_in([*_NO_GENRE_LABELS, ""])))
        .alias(CATEGORIES)
    )


def _first_line(exc: Exception) -> str:
    """The first line of a polars error (the rest is generic advice about schema inference)."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
