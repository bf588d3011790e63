"""Tiny MovieLens releases written in the exact original file formats, and a local HTTP server.

Real MovieLens data is not in the repository and tests never download it: these helpers write a
handful of known ratings and movies the way GroupLens lays them out (``u.data``/``u.item`` for
100k, ``ratings.dat``/``movies.dat`` for 1m, ``ratings.csv``/``movies.csv`` for the CSV releases),
as a directory, inside a zip archive, or served over HTTP from 127.0.0.1.
"""

from __future__ import annotations

import functools
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from data.movielens import VARIANTS


@dataclass(frozen=True)
class Rating:
    user: int
    item: int
    rating: float
    timestamp: int


@dataclass(frozen=True)
class Movie:
    item: int
    title: str
    genres: tuple[str, ...]


# Known rows. Titles exercise the format traps: a comma (quoted in movies.csv), a colon (next to
# the "::" separator of movies.dat), a non-ASCII character (latin-1 in the old releases) and a
# movie without genres.
RATINGS: tuple[Rating, ...] = (
    Rating(user=196, item=242, rating=3, timestamp=881250949),
    Rating(user=186, item=302, rating=3, timestamp=891717742),
    Rating(user=22, item=377, rating=1, timestamp=878887116),
    Rating(user=196, item=51, rating=2, timestamp=880606923),
    Rating(user=22, item=242, rating=5, timestamp=886397596),
    Rating(user=186, item=51, rating=4, timestamp=884182806),
    Rating(user=7, item=302, rating=4, timestamp=891350008),
)
MOVIES: tuple[Movie, ...] = (
    Movie(item=51, title="Legends of the Fall (1994)", genres=("Drama", "Romance", "War")),
    Movie(item=242, title="Kolya (1996)", genres=("Comedy",)),
    Movie(item=302, title="Star Wars: Episode IV - A New Hope (1977)", genres=("Action", "Sci-Fi")),
    Movie(item=377, title="Misérables, Les (1995)", genres=("Drama", "Musical")),
    Movie(item=999, title="Ghost Movie (2000)", genres=()),
)

# u.item genre flag columns, in file order (the ml-100k README).
GENRES_100K: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip


def write_100k(
    directory: Path, ratings: Sequence[Rating] = RATINGS, movies: Sequence[Movie] | None = MOVIES
) -> None:
    """``u.data`` (tab-separated, no header) and ``u.item`` (pipe-separated, latin-1)."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = (f"{r.user}\t{r.item}\t{int(r.rating)}\t{r.timestamp}\n" for r in ratings)
    (directory / "u.data").write_text("".join(rows), encoding="ascii")
    if movies is None:
        return
    lines = []
    for movie in movies:
        genres = set(movie.genres) or {"unknown"}
        flags = "|".join("1" if genre in genres else "0" for genre in GENRES_100K)
        # The video release date column is empty for every movie in the real file.
        url = "http://us.imdb.com/M/title-exact?" + movie.title.replace(" ", "%20")
        lines.append(f"{movie.item}|{movie.title}|01-Jan-1995||{url}|{flags}\n")
    (directory / "u.item").write_bytes("".join(lines).encode("latin-1"))


# The published size of MovieLens 100k: users, items, ratings.
ML100K_COUNTS = (943, 1682, 100_000)


def write_ml100k_full_size(directory: Path, seed: int = 7) -> Path:
    """A random ``u.data`` with exactly the 100k release's counts (every user and item present)."""
    n_users, n_items, n_ratings = ML100K_COUNTS
    rng = np.random.default_rng(seed)
    users = np.concatenate([np.arange(1, n_users + 1), rng.integers(1, n_users + 1, n_ratings)])
    items = np.concatenate([np.arange(1, n_items + 1), rng.integers(1, n_items + 1, n_ratings)])
    table = np.column_stack(
        [
            rng.permutation(users[:n_ratings]),
            rng.permutation(items[:n_ratings]),
            rng.integers(1, 6, n_ratings),
            rng.integers(874_724_710, 893_286_638, n_ratings),
        ]
    )
    directory.mkdir(parents=True, exist_ok=True)
    np.savetxt(directory / "u.data", table, fmt="%d", delimiter="\t")
    return directory


def write_1m(
    directory: Path, ratings: Sequence[Rating] = RATINGS, movies: Sequence[Movie] | None = MOVIES
) -> None:
    """``ratings.dat`` and ``movies.dat`` (``::``-separated, genres ``|``-separated, latin-1)."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = (f"{r.user}::{r.item}::{int(r.rating)}::{r.timestamp}\n" for r in ratings)
    (directory / "ratings.dat").write_text("".join(rows), encoding="ascii")
    if movies is None:
        return
    lines = (f"{m.item}::{m.title}::{'|'.join(m.genres)}\n" for m in movies)
    (directory / "movies.dat").write_bytes("".join(lines).encode("latin-1"))


def write_csv_release(
    directory: Path, ratings: Sequence[Rating] = RATINGS, movies: Sequence[Movie] | None = MOVIES
) -> None:
    """``ratings.csv`` and ``movies.csv`` with headers, as in ml-latest-small, ml-20m, ml-25m."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = (f"{r.user},{r.item},{r.rating:.1f},{r.timestamp}\n" for r in ratings)
    (directory / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(rows), encoding="utf-8"
    )
    if movies is None:
        return
    lines = []
    for movie in movies:
        title = f'"{movie.title}"' if "," in movie.title else movie.title
        genres = "|".join(movie.genres) or "(no genres listed)"
        lines.append(f"{movie.item},{title},{genres}\n")
    (directory / "movies.csv").write_text(
        "movieId,title,genres\n" + "".join(lines), encoding="utf-8"
    )


WRITERS: dict[str, Callable[..., None]] = {
    "100k": write_100k,
    "1m": write_1m,
    "latest-small": write_csv_release,
    "20m": write_csv_release,
    "25m": write_csv_release,
}


def write_release(variant: str, root: Path, *, subfolder: bool = True, **rows: Any) -> Path:
    """Write a release under ``root`` (in ``ml-xxx/`` when ``subfolder``); return ``root``."""
    WRITERS[variant](root / VARIANTS[variant].folder if subfolder else root, **rows)
    return root


def zip_release(variant: str, archive: Path, *, subfolder: bool = True, **rows: Any) -> Path:
    """Write a release into the zip file ``archive`` (via a sibling staging directory)."""
    staging = archive.with_suffix(".staging")
    write_release(variant, staging, subfolder=subfolder, **rows)
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                out.write(path, path.relative_to(staging).as_posix())
    return archive


@dataclass
class LocalServer:
    """A running local HTTP server: ``url`` has no trailing slash; ``requests`` logs paths."""

    url: str
    requests: list[str] = field(default_factory=list)


@contextmanager
def serve_directory(directory: Path, *, truncate_to: int | None = None) -> Iterator[LocalServer]:
    """Serve ``directory`` on 127.0.0.1 (a free port) from a background thread.

    With ``truncate_to``, responses announce the full Content-Length but send only that many
    bytes, as a connection dropped mid-transfer would.
    """
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server naming)
            requests.append(self.path)
            super().do_GET()

        def copyfile(self, source: BinaryIO, outputfile: BinaryIO) -> None:  # type: ignore[override]
            if truncate_to is None:
                super().copyfile(source, outputfile)
            else:
                outputfile.write(source.read(truncate_to))

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # keep test output clean

    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(directory))
    )
    # A short poll interval makes shutdown() return quickly at the end of each test.
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield LocalServer(url=f"http://127.0.0.1:{server.server_port}", requests=requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
