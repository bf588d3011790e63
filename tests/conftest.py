"""Shared pytest fixtures."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.postgres_server import (
    PostgresServer,
    PostgresUnavailableError,
    start_server,
    wait_accepting,
)
from cli.main import main
from ranking.compiled_forest import CACHE_ENV

TINY_CONFIG = """
[retrieval]
n_candidates = 60
history_length = 10
# The service tests pin the merge order (trending's share of 60 slots depends on it); the order
# chosen on validation is tested on test_ranking_features' tiny funnel.
order_by_validation = false
sources = ["two_tower", "als", "covisit", "popular", "coldstart", "item_item", "item_knn"]

[retrieval.quotas]
two_tower = 25
als = 15
item_item = 10
item_knn = 5

[retrieval.index]
kind = "flat"

[retrieval.two_tower]
min_interactions = 0  # the tests' logs are tiny; they test the tower anyway
embedding_dim = 8
hidden_dims = [16]
output_dim = 8
max_epochs = 2
batch_size = 256
num_threads = 1

[retrieval.als]
factors = 8
iterations = 3
num_threads = 1

[ranking.lightgbm]
max_rounds = 30
num_threads = 1
min_data_in_leaf = 10
"""


@pytest.fixture(scope="session", autouse=True)
def compiled_ranker_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Compiled rankers go to a directory of this test session, not the user's cache (the
    server processes that tests start inherit the variable)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(root))
        yield root


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset dir, bundle dir) of a tiny synthetic world trained with a tiny config (~5 s)."""
    root = tmp_path_factory.mktemp("tiny_bundle")
    data, bundle, config = root / "data", root / "bundle", root / "config.toml"
    config.write_text(TINY_CONFIG)
    world = ["--users", "300", "--items", "150", "--days", "20", "--interactions", "9000"]
    assert main(["data", "synth", "--out", str(data), *world, "--seed", "1"]) == 0
    assert main(["train", "--data", str(data), "--out", str(bundle), "--config", str(config)]) == 0
    return data, bundle


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (benchmarks/postgres_server.py); skips, with the
    reason, where none can be started."""
    try:
        server = start_server()
    except PostgresUnavailableError as exc:
        pytest.skip(str(exc))
    try:
        wait_accepting(server.url)
        yield server
    finally:
        with contextlib.suppress(PostgresUnavailableError):  # a test may have stopped it
            server.stop("immediate")
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a fresh, empty database on the session's server."""
    import psycopg

    name = f"recsys_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]  # generated name
    return postgres_server.database_url(name)
