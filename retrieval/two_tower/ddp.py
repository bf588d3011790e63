"""Distributed data-parallel training of the two-tower model (torch DDP; gloo on CPU, NCCL on CUDA).

Every rank holds the same log and features and the same model (same seed, and DDP broadcasts
rank 0's weights at start). A step takes one *global* batch of ``batch_size`` events, exactly as
single-process training does (every rank draws the same permutation of the events), and splits
it into one contiguous share per rank:

1. each rank encodes only its share (the towers' forward and backward are the work that scales);
2. the user vectors, candidate vectors and their ids are gathered from every rank
   (:class:`_GatherRows`), so the in-batch softmax of each row has the whole global batch as
   negatives: the loss is the single-process loss at the global batch size, not W smaller ones;
3. every rank computes that same global loss from the same gathered tensors. The gradient of a
   rank's own rows is therefore complete on the rank, and the gather's backward only slices it
   out; the loss is scaled by W so that DDP's average of the W partial gradients is the
   gradient of the global loss.

Dense parameters are averaged by DDP. The id tables, when they train with sparse gradients
(``TwoTowerConfig.sparse_embeddings``), are left out of DDP and averaged by
:func:`average_sparse_gradient`, an all-gather of the touched rows: gloo's DDP would take sparse
gradients, NCCL's has no sparse all-reduce, and one path for both keeps the NCCL one tested.

Rank 0 alone validates; its early-stopping decision is broadcast so that every rank stops after
the same epoch. After each epoch rank 0 writes a checkpoint (weights, optimizer moments, curves,
best weights so far); a run started again with the same inputs resumes after the last completed
epoch. Each epoch's randomness (the shuffle, each rank's id-dropout masks, uniform negatives and
tower dropout) comes from seeds derived from ``(seed, epoch[, rank])``, so nothing but the
checkpoint is needed to resume, and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data.interactions import Interactions
from data.progress import ProgressReporter, stage
from retrieval.two_tower.config import TwoTowerConfig
from retrieval.two_tower.model import (
    ItemInputs,
    TowerFeatures,
    TwoTowerModel,
    UserInputs,
    torch_threads,
)
from retrieval.two_tower.train import (
    _MIN_IMPROVEMENT,
    EpochRecord,
    PointInTimeHistory,
    TrainedTwoTower,
    TrainingCurves,
    _BatchLoss,
    _check_inputs,
    _chunks,
    _copy_state,
    _item_probability,
    _optimizers,
    _Validator,
    clip_grad_norm,
    resolve_device,
)

CHECKPOINT_FILE = "two_tower.pt"
# Spawn keys of the per-epoch random streams (apart from the validation sample's stream 1).
_SHUFFLE_STREAM = 2
_RANK_STREAM = 3


# ---------------------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class DistributedRun:
    """This process's place in a distributed training run.

    rank / world_size: torch.distributed's; local_rank: the rank on this machine (its GPU);
    checkpoint_dir: where rank 0 writes the per-epoch checkpoint (None: no checkpoints); only
    rank 0 reads it (it sends the content to the others), so it need not be shared.
    """

    rank: int
    world_size: int
    local_rank: int = 0
    checkpoint_dir: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CURRENT_RUN: ContextVar[DistributedRun | None] = ContextVar("two_tower_ddp_run", default=None)


@contextmanager
def distributed_run(run: DistributedRun) -> Iterator[DistributedRun]:
    """Within this block, ``train_two_tower`` trains with DDP as ``run`` (the process group must
    be initialised). The launcher sets it around the whole ``train_bundle`` of each rank, so the
    stages between it and the two-tower need no new parameter."""
    token = _CURRENT_RUN.set(run)
    try:
        yield run
    finally:
        _CURRENT_RUN.reset(token)


def current_run() -> DistributedRun | None:
    """The run set by :func:`distributed_run`, or None (single-process training)."""
    return _CURRENT_RUN.get()


def backend_for(device: str) -> str:
    """NCCL for CUDA tensors, gloo for CPU ones (NCCL cannot move CPU tensors)."""
    return "nccl" if device == "cuda" else "gloo"


def rank_device(config: TwoTowerConfig, run: DistributedRun) -> torch.device:
    """The device this rank trains on: its own GPU (``local_rank``) on CUDA, else the CPU."""
    device = resolve_device(config.device)
    if device.type == "cuda":
        return torch.device("cuda", run.local_rank)
    return device


# ---------------------------------------------------------------------------------------- gather
class _GatherRows(torch.autograd.Function):
    """All-gather rows of different counts per rank, differentiable for the local rows.

    Forward: (n_rank, ...) on each rank -> (sum of counts, ...) in rank order on every rank
    (padded to the largest count for the collective, the padding dropped). Backward: the slice
    of the incoming gradient that belongs to this rank's rows, with no communication: every rank
    computes the same loss from the same gathered tensor, so that slice is already the whole
    gradient of the loss with respect to these rows.
    """

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
        largest = max(counts)
        padded = local.new_zeros((largest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        ctx.start = sum(counts[:rank])
        ctx.count = counts[rank]
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad[ctx.start : ctx.start + ctx.count], None, None


def gather_rows(local: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
    """Every rank's rows of ``local`` in rank order (``counts[r]`` rows from rank ``r``)."""
    out: torch.Tensor = _GatherRows.apply(local, counts, rank)
    return out


def gather_ids(local: npt.NDArray[np.int64], counts: list[int], device: torch.device) -> Any:
    """Every rank's ``local`` ids in rank order, as numpy (the loss builds its masks from them)."""
    tensor = torch.as_tensor(np.ascontiguousarray(local, dtype=np.int64), device=device)
    return _GatherRows.apply(tensor, counts, 0).cpu().numpy()


def average_sparse_gradient(grad: torch.Tensor, world_size: int) -> torch.Tensor:
    """The mean over ranks of a sparse (rows) gradient, by an all-gather of the touched rows.

    Works on any backend (NCCL has no sparse all-reduce) and moves only the rows the ranks'
    batches looked up, not the table: O(batch), like the sparse step itself. Returns a
    coalesced sparse tensor equal on every rank.
    """
    grad = grad.coalesce()
    rows, values = grad.indices()[0], grad.values()
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    largest = max(sizes)
    padded_rows = rows.new_zeros(largest)
    padded_rows[: rows.shape[0]] = rows
    padded_values = values.new_zeros((largest, *values.shape[1:]))
    padded_values[: values.shape[0]] = values
    all_rows = [torch.empty_like(padded_rows) for _ in sizes]
    all_values = [torch.empty_like(padded_values) for _ in sizes]
    dist.all_gather(all_rows, padded_rows)
    dist.all_gather(all_values, padded_values)
    merged = torch.sparse_coo_tensor(
        torch.cat([r[:n] for r, n in zip(all_rows, sizes, strict=True)])[None, :],
        torch.cat([v[:n] for v, n in zip(all_values, sizes, strict=True)]) / world_size,
        grad.shape,
        check_invariants=True,  # cheap next to the gather, and a bad row index fails loudly
    )
    return merged.coalesce()


def shares(n_events: int, world_size: int) -> list[int]:
    """Events of each rank in a batch of ``n_events``: contiguous, the first ranks one more."""
    base, extra = divmod(n_events, world_size)
    return [base + (rank < extra) for rank in range(world_size)]


# ---------------------------------------------------------------------------------------- model
class _Towers(nn.Module):
    """Both towers behind one ``forward``: DDP synchronises the gradients of what its forward
    ran, and the two-tower model encodes through two methods."""

    def __init__(self, model: TwoTowerModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, user_inputs: UserInputs, item_inputs: ItemInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_users(user_inputs), self.model.encode_items(item_inputs)


def _wrap(model: TwoTowerModel, sparse: bool, device: torch.device) -> DistributedDataParallel:
    towers = _Towers(model)
    if sparse:
        # Averaged by average_sparse_gradient instead (see the module docstring).
        ignored = [f"model.{name}.weight" for name in ("user_embedding", "item_embedding")]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(towers, ignored)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(towers, device_ids=device_ids)


# ---------------------------------------------------------------------------------------- training
def train_two_tower_ddp(
    log: Interactions,
    features: TowerFeatures,
    config: TwoTowerConfig,
    run: DistributedRun,
    *,
    valid: Interactions | None = None,
    progress: ProgressReporter | None = None,
) -> TrainedTwoTower:
    """``train_two_tower`` across the ranks of ``run``: call it on every rank with the same inputs.

    Returns the model with the best weights on rank 0 (the one that writes the bundle); the
    other ranks return their copy of the last epoch's weights. ``progress`` is rank 0's.
    """
    _check_inputs(log, features, valid)
    device = rank_device(config, run)
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=rng_devices),
        torch_threads(config.num_threads),
        stage(progress, "two_tower epochs (DDP)", total=config.max_epochs) as epochs,
    ):
        torch.manual_seed(config.seed)
        model = TwoTowerModel(
            log.n_users,
            features.n_id_items,
            features.n_categories,
            features.n_user_features,
            config,
        ).to(device)
        sparse = config.sparse_id_tables(log.n_users, features.n_id_items)
        model.use_sparse_id_gradients(sparse)
        optimizers = _optimizers(model, config, sparse)
        checkpoints = _Checkpoints(run.checkpoint_dir, _run_key(config, log, features))
        progress_state = checkpoints.load(model, optimizers, config.eval_k, device, run)
        towers = _wrap(model, sparse, device)
        history = PointInTimeHistory(
            log.user_idx, log.item_idx, log.timestamp, config.history_length
        )
        probability = _item_probability(log.item_idx, features.n_items)
        id_l2 = config.weight_decay if sparse else 0.0
        loss = _BatchLoss(model, features, config, log, history, probability, device, id_l2)
        step = _DistributedStep(loss, towers, optimizers, config, run, sparse)
        has_valid = valid is not None and len(valid) > 0
        validator = None
        if run.is_main and has_valid:
            assert valid is not None
            validator = _Validator(log, valid, model, features, config, device)
        for record in progress_state.curves.records:  # what the resumed epochs reported
            epochs.advance(loss=record.train_loss, valid_loss=record.valid_loss)
        epoch = progress_state.epoch
        while not progress_state.finished and epoch < config.max_epochs:
            epoch += 1
            started = time.perf_counter()
            train_loss = step.epoch(len(log), epoch)
            train_seconds = time.perf_counter() - started
            started = time.perf_counter()
            valid_recall, valid_loss = validator.evaluate() if validator else (None, None)
            record = EpochRecord(
                epoch=epoch,
                train_loss=train_loss,
                valid_loss=valid_loss,
                valid_recall=valid_recall,
                train_seconds=train_seconds,
                valid_seconds=time.perf_counter() - started,
                examples_per_second=len(log) / train_seconds,
            )
            progress_state.update(record, model, config.patience, has_valid)
            # Rank 0's decision, the same on every rank: all stop after the same epoch.
            progress_state.finished = _broadcast_flag(progress_state.finished, device)
            epochs.advance(
                loss=train_loss,
                valid_loss=valid_loss,
                **{f"valid_recall@{config.eval_k}": valid_recall},
            )
            if run.is_main:
                checkpoints.save(epoch, model, optimizers, progress_state)
            dist.barrier()
        if run.is_main and progress_state.best_state is not None:
            model.load_state_dict(progress_state.best_state)
    model.use_sparse_id_gradients(False)
    model.eval()
    return TrainedTwoTower(model, progress_state.curves)


class _DistributedStep:
    """One rank's share of each global batch: encode, gather, global loss, synced step."""

    def __init__(
        self,
        loss: _BatchLoss,
        towers: DistributedDataParallel,
        optimizers: list[torch.optim.Optimizer],
        config: TwoTowerConfig,
        run: DistributedRun,
        sparse: bool,
    ) -> None:
        self.loss, self.towers, self.optimizers = loss, towers, optimizers
        self.config, self.run, self.sparse = config, run, sparse
        self.model = loss.model

    def epoch(self, n_events: int, epoch: int) -> float:
        """Train one epoch; the mean training loss per example (the same on every rank)."""
        config, run = self.config, self.run
        self.towers.train()
        # The same permutation on every rank; masks, negatives and dropout differ per rank.
        order = np.random.default_rng([config.seed, _SHUFFLE_STREAM, epoch]).permutation(n_events)
        rng = np.random.default_rng([config.seed, _RANK_STREAM, epoch, run.rank])
        torch.manual_seed(int(rng.integers(2**62)))
        total, seen = 0.0, 0
        for events in _chunks(order, config.batch_size):
            if events.shape[0] < run.world_size:
                continue  # a last batch too small to give every rank an event
            total += self.step(events, rng) * events.shape[0]
            seen += events.shape[0]
        return total / max(seen, 1)

    def step(self, events: npt.NDArray[np.int64], rng: np.random.Generator) -> float:
        """One optimisation step on the global batch ``events``; returns its loss."""
        run, config, device = self.run, self.config, self.loss.device
        counts = shares(events.shape[0], run.world_size)
        start = sum(counts[: run.rank])
        local = events[start : start + counts[run.rank]]
        uniform = shares(config.n_uniform_negatives, run.world_size)
        batch = self.loss.inputs(local, rng, uniform[run.rank])
        user_vectors, item_vectors = self.towers(batch.user_inputs, batch.item_inputs)
        n_local, width = local.shape[0], user_vectors.shape[1]
        # One gather for each event's (user vector, positive vector) and one for its ids: the
        # collectives' latency, not their bytes, is what a small model's step waits on.
        pairs = gather_rows(
            torch.cat([user_vectors, item_vectors[:n_local]], dim=1), counts, run.rank
        )
        pair_ids = gather_ids(
            np.stack([batch.users, batch.candidates[:n_local]], axis=1), counts, device
        )
        # Candidates in single-process order: every rank's positives, then every rank's draws.
        candidates, candidate_ids = pairs[:, width:], pair_ids[:, 1]
        if config.n_uniform_negatives:
            drawn = gather_rows(item_vectors[n_local:], uniform, run.rank)
            drawn_ids = gather_ids(batch.candidates[n_local:], uniform, device)
            candidates = torch.cat([candidates, drawn])
            candidate_ids = np.concatenate([candidate_ids, drawn_ids])
        loss = self.loss.loss_of_vectors(
            pairs[:, :width],
            candidates,
            pair_ids[:, 0],
            candidate_ids,
            config.n_uniform_negatives,
        )
        objective = loss * run.world_size
        if self.loss.id_l2 > 0:
            # Divided by the global batch's row counts, so that the ranks' average is the
            # single-process penalty of the global batch.
            n_rows = events.shape[0]
            per_rows = (n_rows, n_rows + config.n_uniform_negatives)
            objective = objective + self.loss.penalty(batch, per_rows) * run.world_size
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if self.sparse:
            for table in self.model.id_tables:
                if table.weight.grad is not None:
                    table.weight.grad = average_sparse_gradient(table.weight.grad, run.world_size)
        if config.grad_clip_norm > 0:
            clip_grad_norm(list(self.model.parameters()), config.grad_clip_norm)
        for optimizer in self.optimizers:
            optimizer.step()
        return float(loss.detach())


def _broadcast_flag(flag: bool, device: torch.device) -> bool:
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


# ---------------------------------------------------------------------------------------- progress
@dataclass
class _Progress:
    """Where training stands: what a checkpoint holds besides weights and moments."""

    curves: TrainingCurves
    epoch: int = 0
    best_recall: float = -np.inf
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0
    finished: bool = False

    def update(
        self, record: EpochRecord, model: TwoTowerModel, patience: int, has_valid: bool
    ) -> None:
        """Record an epoch; keep the best weights; decide whether to stop (rank 0's view)."""
        self.curves.records.append(record)
        self.epoch = record.epoch
        recall = record.valid_recall
        if not has_valid or recall is None:
            self.curves.best_epoch = record.epoch
        elif recall > self.best_recall + _MIN_IMPROVEMENT:
            self.best_recall, self.best_state, self.bad_epochs = recall, _copy_state(model), 0
            self.curves.best_epoch = record.epoch
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= patience:
                self.curves.stopped_early = True
                self.finished = True


def _run_key(config: TwoTowerConfig, log: Interactions, features: TowerFeatures) -> str:
    """What a checkpoint must match to be resumed: the config (but ``max_epochs``, so a finished
    run can be extended, and the knobs that do not change the weights) and the data's shape."""
    values = asdict(replace(config, max_epochs=1, progress=False, num_threads=None))
    values["data"] = [len(log), log.n_users, features.n_items, int(log.timestamp.sum())]
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


class _Checkpoints:
    """Rank 0 writes ``two_tower.pt`` after each epoch and reads it back to resume; the other
    ranks receive its content from rank 0."""

    def __init__(self, directory: Path | None, key: str) -> None:
        self.path = None if directory is None else Path(directory) / CHECKPOINT_FILE
        self.key = key

    def save(
        self,
        epoch: int,
        model: TwoTowerModel,
        optimizers: list[torch.optim.Optimizer],
        state: _Progress,
    ) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "key": self.key,
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizers": [optimizer.state_dict() for optimizer in optimizers],
            "curves": json.dumps(state.curves.to_dict()),
            "best_recall": float(state.best_recall),
            "best_state": state.best_state,
            "bad_epochs": state.bad_epochs,
            "finished": state.finished,
        }
        partial = self.path.with_suffix(".partial")
        torch.save(payload, partial)
        os.replace(partial, self.path)  # a crash mid-write leaves the previous checkpoint

    def load(
        self,
        model: TwoTowerModel,
        optimizers: list[torch.optim.Optimizer],
        eval_k: int,
        device: torch.device,
        run: DistributedRun,
    ) -> _Progress:
        """Restore the last completed epoch into ``model`` and ``optimizers``, or a fresh start.

        A checkpoint of another run (other data or config) is ignored, not an error: the
        directory belongs to this output, and a changed config starts training over.
        """
        payload = None
        if run.is_main and self.path is not None and self.path.is_file():
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        # Every rank resumes from rank 0's file: the directory need not be shared across nodes.
        box = [payload]
        dist.broadcast_object_list(box, src=0, device=device)
        payload = box[0]
        if payload is None or payload["key"] != self.key:
            return _Progress(TrainingCurves(eval_k=eval_k))
        model.load_state_dict(payload["model"])
        for optimizer, values in zip(optimizers, payload["optimizers"], strict=True):
            optimizer.load_state_dict(values)
        return _Progress(
            curves=TrainingCurves.from_dict(json.loads(payload["curves"])),
            epoch=int(payload["epoch"]),
            best_recall=float(payload["best_recall"]),
            best_state=payload["best_state"],
            bad_epochs=int(payload["bad_epochs"]),
            finished=bool(payload["finished"]),
        )
