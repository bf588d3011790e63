"""The rank processes of tests/test_distributed_training.py (spawned: they import this module).

Each rank joins a 2-process gloo group and, on the clustered log with sparse id tables:
one DDP step on a fixed global batch (saved for comparison with a single-process step), an
uninterrupted 3-epoch run, and a 2-epoch run resumed from its checkpoint to 3 epochs.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data.interactions import Interactions
from retrieval.two_tower import TowerFeatures, TwoTowerConfig
from retrieval.two_tower.ddp import (
    DistributedRun,
    _DistributedStep,
    _wrap,
    distributed_run,
    train_two_tower_ddp,
)
from retrieval.two_tower.model import TwoTowerModel
from retrieval.two_tower.train import (
    PointInTimeHistory,
    _BatchLoss,
    _item_probability,
    _optimizers,
    clip_grad_norm,
    train_two_tower,
)
from tests.retrieval_contract import HISTORY, clustered_log

# No dropout of any kind: a DDP step must then equal the single-process step exactly.
DETERMINISTIC = TwoTowerConfig(
    embedding_dim=16,
    hidden_dims=(32,),
    output_dim=16,
    history_length=HISTORY,
    batch_size=64,
    max_epochs=3,
    learning_rate=1e-2,
    eval_k=5,
    num_threads=1,
    sparse_embeddings=True,
    n_uniform_negatives=0,
    dropout=0.0,
    user_id_dropout=0.0,
    item_id_dropout=0.0,
)
STEP_EVENTS = np.arange(3, 3 + 61)  # an odd global batch: ranks get 31 and 30 events


def one_step(config: TwoTowerConfig, run: DistributedRun | None) -> TwoTowerModel:
    """The model after one step on ``STEP_EVENTS`` (DDP when ``run`` is given)."""
    log, catalog = clustered_log()
    features = TowerFeatures.build(catalog, log.item_counts, n_users=log.n_users, config=config)
    torch.manual_seed(config.seed)
    model = TwoTowerModel(log.n_users, log.n_items, features.n_categories, 0, config)
    model.use_sparse_id_gradients(True)
    optimizers = _optimizers(model, config, True)
    history = PointInTimeHistory(log.user_idx, log.item_idx, log.timestamp, config.history_length)
    probability = _item_probability(log.item_idx, features.n_items)
    device = torch.device("cpu")
    loss = _BatchLoss(model, features, config, log, history, probability, device, 1e-4)
    if run is None:
        rng = np.random.default_rng(0)
        objective, penalty = loss(STEP_EVENTS, rng)
        assert penalty is not None
        for optimizer in optimizers:
            optimizer.zero_grad()
        (objective + penalty).backward()
        clip_grad_norm(list(model.parameters()), config.grad_clip_norm)
        for optimizer in optimizers:
            optimizer.step()
        return model
    step = _DistributedStep(loss, _wrap(model, True, device), optimizers, config, run, True)
    step.step(STEP_EVENTS, np.random.default_rng(0))
    return model


def rank_main(rank: int, world_size: int, init_file: str, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    torch.set_num_threads(1)
    out_dir = Path(out)
    try:
        run = DistributedRun(rank=rank, world_size=world_size)
        model = one_step(DETERMINISTIC, run)
        if rank == 0:
            torch.save(model.state_dict(), out_dir / "step.pt")

        log, catalog = clustered_log()
        train, valid = split_last_two(log)
        features = TowerFeatures.build(
            catalog, train.item_counts, n_users=train.n_users, config=DETERMINISTIC
        )
        # Every source of randomness on, uniform negatives shared 3 + 2 between the ranks.
        config = replace(
            DETERMINISTIC,
            dropout=0.1,
            user_id_dropout=0.1,
            item_id_dropout=0.1,
            n_uniform_negatives=5,
        )
        with distributed_run(run):  # the entry point recsys train uses
            straight = train_two_tower(train, features, config, valid=valid)
        # Interrupted after epoch 2, started again: resumes at epoch 3 from the checkpoint.
        resumable = replace(run, checkpoint_dir=out_dir / "checkpoint")
        train_two_tower_ddp(train, features, replace(config, max_epochs=2), resumable, valid=valid)
        resumed = train_two_tower_ddp(train, features, config, resumable, valid=valid)
        if rank == 0:
            torch.save(straight.model.state_dict(), out_dir / "straight.pt")
            torch.save(resumed.model.state_dict(), out_dir / "resumed.pt")
            curves = {"straight": straight.curves.to_dict(), "resumed": resumed.curves.to_dict()}
            (out_dir / "curves.json").write_text(json.dumps(curves))
    finally:
        dist.destroy_process_group()


def split_last_two(log: Interactions) -> tuple[Interactions, Interactions]:
    """(train, valid): each user's last two events are validation (the clustered test split)."""
    rank = np.empty(len(log), dtype=np.int64)
    order = np.lexsort((log.timestamp, log.user_idx))
    starts = np.searchsorted(log.user_idx[order], log.user_idx[order])
    rank[order] = np.arange(len(log)) - starts
    held = rank >= 4
    train, valid = (
        Interactions(
            log.users, log.items, log.user_idx[m], log.item_idx[m], log.timestamp[m], log.weight[m]
        )
        for m in (~held, held)
    )
    return train, valid
