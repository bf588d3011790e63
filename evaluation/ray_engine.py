"""Batch scoring and evaluation on a Ray cluster (``--engine ray``).

Ray Data splits the user list into blocks of ``batch_size`` users and streams them through a pool
of ``num_workers`` actors. Each actor loads the bundle once, memory-mapped (the workers of one
machine share the weights and the index through the page cache), builds the same ``Pipeline``
that ``recsys recommend`` and the service build (``pipeline.factory``), and answers its blocks
with the same function as the local path (``recommend_batch``). The pipeline is
batch-invariant (each user's answer depends only on that user), so the rows equal the
single-process run's; the order of the users is kept too.

Ray is imported here only, and this module only by ``--engine ray``: the embedded default and
the service never load it (it is the ``ray`` extra of ``pyproject.toml``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa

from data.errors import ConfigError
from data.validation import positive_int
from evaluation.batch_recommend import OUTPUT_SCHEMA, recommend_batch

# Users per Ray Data block and per actor call: the local path's batch (recommend_batch), so that
# one block is one funnel pass of the size the pipeline is tuned for.
DEFAULT_BATCH_SIZE = 1_000


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run.

    address: a running cluster (``ray://host:10001`` or ``host:6379``; ``"auto"`` finds the local
        one); None starts a private local Ray for this command and stops it afterwards.
    num_workers: actors, each a process holding one mapped bundle (default: one per CPU of the
        cluster).
    batch_size: users per block.
    """

    address: str | None = None
    num_workers: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.num_workers is not None:
            positive_int(self.num_workers, "--num-workers", error=ConfigError)
        positive_int(self.batch_size, "batch_size", error=ConfigError)


@contextmanager
def ray_session(options: RayOptions) -> Iterator[Any]:
    """Ray, connected: an already initialised one (left running), the cluster at ``address``,
    or a local one started here and shut down on exit."""
    try:
        import ray
    except ImportError as exc:  # the one-line CLI error, naming the fix
        raise ConfigError(
            "--engine ray needs Ray: pip install 'recsys-funnel[ray]' (or \"ray[data]\")"
        ) from exc
    if ray.is_initialized():
        yield ray
        return
    ray.init(
        address=options.address,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def _users_dataset(ray: Any, user_ids: list[str], batch_size: int) -> Any:
    """A Ray dataset of ``user_id`` (plus its position) in blocks of ``batch_size`` users."""
    table = pa.table(
        {"position": np.arange(len(user_ids), dtype=np.int64), "user_id": pa.array(user_ids)}
    )
    blocks = [table.slice(start, batch_size) for start in range(0, len(user_ids), batch_size)]
    return ray.data.from_arrow(blocks or [table])


def _configure(ray: Any) -> None:
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows in the order of the user list
    context.enable_progress_bars = False
    # Ray Data narrates every execution plan at INFO on stderr; the command prints its summary.
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _actor_pool(ray: Any, options: RayOptions, n_users: int) -> Any:
    """A fixed pool of ``num_workers`` actors (default: one per CPU of the cluster), no more
    than there are blocks: an actor without a block would only load the bundle."""
    workers = options.num_workers
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    n_blocks = max(1, -(-n_users // options.batch_size))
    return ray.data.ActorPoolStrategy(size=min(workers, n_blocks))


# ---------------------------------------------------------------------------------------- recommend
class RecommendActor:
    """One worker: the bundle mapped once, its served pipeline, ``recommend_batch`` per block."""

    def __init__(self, bundle: str, k: int, now: int) -> None:
        from pipeline.artifacts import load_artifacts
        from pipeline.factory import make_pipeline, online_state_for

        artifacts = load_artifacts(bundle, mmap=True)
        self.pipeline = make_pipeline(artifacts, online_state_for(artifacts), enforce_budgets=False)
        self.k, self.now = k, now

    def __call__(self, batch: pa.Table) -> pa.Table:
        users = batch.column("user_id").to_pylist()
        rows = recommend_batch(self.pipeline, users, self.k, now=self.now, batch_size=len(users))
        return rows.to_arrow()


def recommend_ray(
    bundle: str | Path,
    user_ids: list[str],
    k: int,
    *,
    now: int | None = None,
    options: RayOptions | None = None,
    out_dir: Path | None = None,
) -> pl.DataFrame | None:
    """``recommend_batch``'s rows for ``user_ids``, answered by Ray actors.

    ``now``: every request's time (None: the wall clock, read once here). ``out_dir``: the
    workers write parquet parts there in parallel and nothing comes back (None: the rows are
    gathered and returned in user-list order).
    """
    options = options or RayOptions()
    request_time = now if now is not None else int(time.time())
    with ray_session(options) as ray:
        _configure(ray)
        answers = _users_dataset(ray, user_ids, options.batch_size).map_batches(
            RecommendActor,
            fn_constructor_args=(str(Path(bundle).resolve()), k, request_time),
            batch_size=options.batch_size,
            batch_format="pyarrow",
            compute=_actor_pool(ray, options, len(user_ids)),
            num_cpus=1,
        )
        if out_dir is not None:
            answers.write_parquet(str(out_dir))
            return None
        tables = [ray.get(ref) for ref in answers.to_arrow_refs()]
    if not tables:
        return pl.DataFrame(schema=OUTPUT_SCHEMA)
    frame = pl.from_arrow(pa.concat_tables(tables))
    assert isinstance(frame, pl.DataFrame)
    return frame.cast(OUTPUT_SCHEMA)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- evaluate
class EvaluateActor:
    """One worker of ``recsys evaluate --engine ray``: every pipeline the report scores."""

    def __init__(self, bundle: str, data_dir: str, k: int, now: int) -> None:
        from evaluation.offline import evaluation_pipelines, evaluation_state
        from pipeline.artifacts import load_artifacts

        artifacts = load_artifacts(bundle, mmap=True)
        self.pipelines = evaluation_pipelines(artifacts, evaluation_state(artifacts, data_dir))
        self.k, self.now = k, now

    def __call__(self, batch: pa.Table) -> pa.Table:
        from evaluation.offline import recommend_items

        users = batch.column("user_id").to_pylist()
        columns: dict[str, Any] = {"position": batch.column("position")}
        for name, pipeline in self.pipelines.items():
            items = recommend_items(pipeline, users, self.k, self.now, len(users))
            columns[name] = pa.array(list(items))
        return pa.table(columns)


def evaluation_recommendations_ray(
    bundle: str | Path,
    data_dir: str | Path,
    user_ids: list[str],
    k: int,
    now: int,
    options: RayOptions | None = None,
) -> dict[str, npt.NDArray[np.int32]]:
    """``evaluate_offline``'s (n_users, k) item indices per pipeline, answered by Ray actors."""
    options = options or RayOptions()
    with ray_session(options) as ray:
        _configure(ray)
        answers = _users_dataset(ray, user_ids, options.batch_size).map_batches(
            EvaluateActor,
            fn_constructor_args=(
                str(Path(bundle).resolve()),
                str(Path(data_dir).resolve()),
                k,
                now,
            ),
            batch_size=options.batch_size,
            batch_format="pyarrow",
            compute=_actor_pool(ray, options, len(user_ids)),
            num_cpus=1,
        )
        tables = [ray.get(ref) for ref in answers.to_arrow_refs()]
    out: dict[str, npt.NDArray[np.int32]] = {}
    if not tables:
        return out
    table = pa.concat_tables(tables)
    positions = table.column("position").to_numpy()
    for name in table.column_names:
        if name == "position":
            continue
        rows = np.array(table.column(name).to_pylist(), dtype=np.int32).reshape(-1, k)
        ordered = np.empty_like(rows)
        ordered[positions] = rows
        out[name] = ordered
    return out
