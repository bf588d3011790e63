"""``recsys train --nproc N``, and ``recsys train`` under ``torchrun``: a DDP-trained two-tower.

Only the two-tower is distributed; every other stage is cheap next to it, or (ALS, EASE) already
uses every core of one machine. So rank 0 runs the whole :func:`~pipeline.artifacts.train_bundle`
and writes the one bundle, in the same format as a single-process run; the other ranks build the
same training log and tower features from the same dataset (:func:`two_tower_share`), join the
two-tower's DDP training when rank 0 reaches it, and exit. The rendezvous is torch's own
(``torch.distributed.launcher``, the machinery behind ``torchrun``): ``--nproc N`` starts N local
processes, and ``torchrun --nnodes M --nproc-per-node N -m cli.main train ...`` runs the same code
on several machines (``docs/scale.md``).
"""

from __future__ import annotations

import datetime
import os
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from data.dataset import read_manifest
from data.errors import ConfigError, RecsysError
from data.progress import ProgressReporter
from pipeline.artifacts import prepare_training_data, retrieval_section, train_bundle
from retrieval.stage import RetrievalConfig, skip_reason
from retrieval.two_tower.ddp import DistributedRun, backend_for, distributed_run
from retrieval.two_tower.source import TwoTowerSource
from retrieval.two_tower.train import train_two_tower

# How long a rank waits for the others at a collective. Rank 0 fits the sources configured before
# the two-tower (ALS, EASE, ...) while the other ranks wait at the first one, so this is far above
# NCCL's and gloo's default of 10-30 minutes.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=6)
TWO_TOWER = "two_tower"


def checkpoint_dir_for(out: str | Path) -> Path:
    """The default checkpoint directory of a run writing the bundle ``out``: beside it."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoint")


def launch_local(
    data_dir: str | Path,
    out: str | Path,
    *,
    nproc: int,
    config: dict[str, Any] | None = None,
    device: str | None = None,
    checkpoint_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train a bundle with ``nproc`` local DDP processes; returns rank 0's manifest.

    The processes are started by torch's elastic launcher with a local rendezvous (what
    ``torchrun --standalone`` does); a failed rank fails the run (no restarts: start the
    command again and it resumes from the last checkpoint).
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be positive, got {nproc}")
    # What fails before training fails here, in one line, rather than in every rank.
    read_manifest(Path(data_dir))
    RetrievalConfig.from_mapping(retrieval_section(config or {}, device))
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        start_method="spawn",
        monitor_interval=0.1,
    )
    try:
        results = elastic_launch(launch, run_rank)(
            str(data_dir),
            str(out),
            config,
            device,
            None if checkpoint_dir is None else str(checkpoint_dir),
        )
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        message = str(failure.message or f"exit code {failure.exitcode}").strip().splitlines()
        raise TrainingError(f"distributed training failed on rank {rank}: {message[0]}") from exc
    manifest: dict[str, Any] = results[0]
    return manifest


class TrainingError(RecsysError):
    """A rank of a distributed training run failed (its first line of error)."""


@record  # a failing rank's exception reaches the launcher, and the CLI's one-line error
def run_rank(
    data_dir: str,
    out: str,
    config: dict[str, Any] | None,
    device: str | None,
    checkpoint_dir: str | None,
    progress: ProgressReporter | None = None,
) -> dict[str, Any] | None:
    """One rank of a distributed ``recsys train`` (the environment of ``torchrun``: RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT). Rank 0 returns the manifest."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    two_tower_device = _two_tower_device(config, device)
    if two_tower_device == "cuda":
        torch.cuda.set_device(local_rank)
    else:
        # The ranks of a machine share its cores; torch's default of one thread per core each
        # would oversubscribe them (a TwoTowerConfig.num_threads still wins inside training).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group(backend_for(two_tower_device), timeout=COLLECTIVE_TIMEOUT)
    run = DistributedRun(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else checkpoint_dir_for(out),
    )
    try:
        with distributed_run(run):
            if run.is_main:
                manifest = train_bundle(
                    data_dir, out, config=config, device=device, progress=progress
                )
            else:
                two_tower_share(data_dir, config, device)
                manifest = None
        dist.barrier()  # rank 0 has written the bundle: the run is over for everyone
    finally:
        dist.destroy_process_group()
    if run.is_main and run.checkpoint_dir is not None:
        _remove_checkpoint(run.checkpoint_dir)
    return manifest


def two_tower_share(
    data_dir: str | Path, config: dict[str, Any] | None, device: str | None
) -> None:
    """A non-zero rank's part: the two-tower's DDP training on the data rank 0 trains on.

    The log, validation log, catalogue and tower features come from the same functions rank 0's
    ``train_bundle`` uses, so every rank holds the same arrays; a two-tower that rank 0 skips
    (too few events, not configured) is skipped here too, and the rank exits at once.
    """
    retrieval_config = RetrievalConfig.from_mapping(retrieval_section(config or {}, device))
    if TWO_TOWER not in retrieval_config.sources:
        return
    data = prepare_training_data(data_dir)
    tower_config = retrieval_config.source_config(TWO_TOWER)
    if skip_reason(TWO_TOWER, tower_config, data.log) is not None:
        return
    source = TwoTowerSource(tower_config, retrieval_config.index, name=TWO_TOWER)
    features = source.build_features(data.log, data.catalog)
    train_two_tower(data.log, features, tower_config, valid=data.valid_log)


def _two_tower_device(config: dict[str, Any] | None, device: str | None) -> str:
    if device is not None:
        return device
    return str((config or {}).get("retrieval", {}).get(TWO_TOWER, {}).get("device", "cpu"))


def _remove_checkpoint(directory: Path) -> None:
    """The bundle is written: its checkpoint has nothing left to resume."""
    from retrieval.two_tower.ddp import CHECKPOINT_FILE

    (directory / CHECKPOINT_FILE).unlink(missing_ok=True)
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
