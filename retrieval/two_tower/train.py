"""Training the two-tower model: point-in-time examples, sampled softmax with logQ, early stopping.

Each training event is one positive ``(user state just before the event, item)``. The user state
is the user's previous ``H`` items, strictly before the event's timestamp
(:class:`PointInTimeHistory`): nothing from the event itself or later leaks into its features.

The loss is an in-batch softmax (every other positive of the batch is a negative), optionally
mixed with uniformly drawn items, with two corrections:

- logQ (Yi et al., 2019, "Sampling-bias-corrected neural modeling for large corpus item
  recommendations"): popular items are negatives far more often than the softmax assumes, so
  each candidate's logit is reduced by the log of its expected count in the candidate set;
- accidental hits: a candidate equal to the row's positive item, or another positive of the
  same user, is not a negative and is masked out.

BPR (Rendle et al., 2009) over the same candidates is the alternative loss. AdamW, gradient
clipping and early stopping on validation recall@K (full catalogue, the user's training items
excluded) with the best weights restored. Same seed, same weights on CPU.

Large id tables (``TwoTowerConfig.sparse_embeddings``) train with sparse gradients and
``torch.optim.SparseAdam``: a step then costs O(rows in the batch), not O(catalogue), because
dense AdamW rewrites every row of the table (and both its moments) on every step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from data.errors import ConfigError, DataError
from data.interactions import Interactions
from data.progress import ProgressReporter, stage
from retrieval.base import PAD_ITEM, Candidates, UserBatch
from retrieval.two_tower.config import TwoTowerConfig
from retrieval.two_tower.model import (
    ItemInputs,
    TowerFeatures,
    TwoTowerModel,
    UserInputs,
    encode_items,
    encode_users,
    torch_threads,
)

CURVES_JSON = "curves.json"
CURVES_PNG = "curves.png"
# Scores held at once while validating: 16M float32 (64 MiB) per block of users.
_SCORE_BLOCK_ELEMENTS = 1 << 24
# Spawn key of the validation sample's random stream, apart from the training stream, so that
# adding a validation set does not change the training draws.
_VALID_STREAM = 1
# A validation recall must beat the best by more than this to count as better (float noise).
_MIN_IMPROVEMENT = 1e-9


# ---------------------------------------------------------------------------------------- history
class PointInTimeHistory:
    """For each event of a log, the same user's previous items, strictly earlier in time.

    Built once in O(n log n); :meth:`gather` then answers a batch of events in O(B * H) with no
    Python loop. Events at the same timestamp as the query event are excluded (their order is
    not known to be causal).
    """

    def __init__(
        self,
        user_idx: npt.NDArray[np.integer],
        item_idx: npt.NDArray[np.integer],
        timestamp: npt.NDArray[np.int64],
        history_length: int,
    ) -> None:
        n = user_idx.shape[0]
        order = np.lexsort((np.arange(n), timestamp, user_idx))
        users, times = user_idx[order], timestamp[order]
        positions = np.arange(n)
        new_user = np.ones(n, dtype=bool)
        new_user[1:] = users[1:] != users[:-1]
        new_time = new_user.copy()
        new_time[1:] |= times[1:] != times[:-1]
        # First sorted position of each event's user, and of its (user, timestamp) group.
        user_start = np.maximum.accumulate(np.where(new_user, positions, 0))
        time_start = np.maximum.accumulate(np.where(new_time, positions, 0))
        self._items = item_idx[order].astype(np.int32)
        self._user_start = np.empty(n, dtype=np.int64)
        self._time_start = np.empty(n, dtype=np.int64)
        self._user_start[order] = user_start
        self._time_start[order] = time_start
        self.history_length = history_length

    def gather(self, events: npt.NDArray[np.integer]) -> npt.NDArray[np.int32]:
        """(B, H) int32 items before each of ``events`` (log rows), most recent first, -1 padded."""
        events = np.asarray(events, dtype=np.int64)
        offsets = np.arange(1, self.history_length + 1)
        source = self._time_start[events, None] - offsets[None, :]
        valid = source >= self._user_start[events, None]
        return np.where(valid, self._items[np.where(valid, source, 0)], PAD_ITEM).astype(np.int32)


# ---------------------------------------------------------------------------------------- losses
def accidental_hits(
    positive_items: torch.Tensor,
    users: torch.Tensor,
    candidate_items: torch.Tensor,
    candidate_users: torch.Tensor,
) -> torch.Tensor:
    """(B, C) bool: candidates that must not count as negatives of each row.

    Column ``j < B`` is row ``j``'s positive; later columns are sampled items with
    ``candidate_users == -1``. A candidate is a hit when it is the row's positive item (a
    duplicate in the batch) or the positive of another event of the same user. The row's own
    positive (the diagonal) is never masked.
    """
    hits = positive_items[:, None] == candidate_items[None, :]
    hits |= users[:, None] == candidate_users[None, :]
    diagonal = torch.arange(positive_items.shape[0], device=hits.device)
    hits[diagonal, diagonal] = False
    return hits


def candidate_log_q(
    item_probability: torch.Tensor,
    candidate_items: torch.Tensor,
    n_in_batch: int,
    n_uniform: int,
    n_items: int,
) -> torch.Tensor:
    """(C,) log of each candidate's expected count in a candidate set.

    In-batch candidates are ``n_in_batch`` draws from the training stream (item ``i`` with
    probability ``item_probability[i]``, its share of training events); uniform ones are
    ``n_uniform`` draws over ``n_items``. Mixed sampling adds the two (Yang et al., 2020).
    """
    expected = n_in_batch * item_probability[candidate_items] + n_uniform / n_items
    return torch.log(expected)


def sampled_softmax_loss(
    scores: torch.Tensor,
    hits: torch.Tensor,
    temperature: float,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of each row's positive (column ``row``) against its candidates.

    scores: (B, C) cosine scores; hits: (B, C) bool accidental hits (masked to -inf);
    log_q: (C,) logQ correction subtracted from the logits, or None for no correction.
    """
    logits = scores / temperature
    if log_q is not None:
        logits = logits - log_q[None, :]
    logits = logits.masked_fill(hits, float("-inf"))
    target = torch.arange(scores.shape[0], device=scores.device)
    return torch.nn.functional.cross_entropy(logits, target)


def bpr_loss(scores: torch.Tensor, hits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean ``-log sigmoid((s_pos - s_neg) / T)`` over every (row, valid negative) pair."""
    diagonal = torch.arange(scores.shape[0], device=scores.device)
    positive = scores.diagonal()[:, None]
    negative = ~hits
    negative[diagonal, diagonal] = False
    margins = (positive - scores) / temperature
    return torch.nn.functional.softplus(-margins)[negative].mean()


# ---------------------------------------------------------------------------------------- curves
@dataclass(frozen=True)
class EpochRecord:
    """What one epoch did. Losses are per example; ``valid_*`` are None without validation."""

    epoch: int
    train_loss: float
    valid_loss: float | None
    valid_recall: float | None
    train_seconds: float
    valid_seconds: float
    examples_per_second: float


@dataclass
class TrainingCurves:
    """Per-epoch records, the epoch whose weights were kept, and whether training stopped early."""

    eval_k: int
    records: list[EpochRecord] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "eval_k": self.eval_k,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "epochs": [asdict(record) for record in self.records],
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingCurves:
        return cls(
            eval_k=int(values["eval_k"]),
            records=[EpochRecord(**record) for record in values["epochs"]],
            best_epoch=int(values["best_epoch"]),
            stopped_early=bool(values["stopped_early"]),
        )

    def save(self, directory: Path) -> tuple[Path, Path]:
        """Write ``curves.json`` and ``curves.png`` (loss, recall@K, throughput per epoch)."""
        directory.mkdir(parents=True, exist_ok=True)
        json_path, png_path = directory / CURVES_JSON, directory / CURVES_PNG
        json_path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        self._plot(png_path)
        return json_path, png_path

    def _plot(self, path: Path) -> None:
        # The object API with an explicit Agg canvas: no pyplot global state, no display needed.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        epochs = [r.epoch for r in self.records]
        figure = Figure(figsize=(12, 3.6), layout="constrained")
        FigureCanvasAgg(figure)
        loss_ax, recall_ax, speed_ax = figure.subplots(1, 3)
        loss_ax.plot(epochs, [r.train_loss for r in self.records], marker="o", label="train")
        if any(r.valid_loss is not None for r in self.records):
            valid = [np.nan if r.valid_loss is None else r.valid_loss for r in self.records]
            loss_ax.plot(epochs, valid, marker="o", label="valid")
        loss_ax.set(title="loss per example", xlabel="epoch")
        loss_ax.legend()
        recall = [np.nan if r.valid_recall is None else r.valid_recall for r in self.records]
        recall_ax.plot(epochs, recall, marker="o", color="tab:green")
        recall_ax.set(title=f"valid recall@{self.eval_k}", xlabel="epoch")
        speed_ax.plot(epochs, [r.examples_per_second for r in self.records], marker="o")
        speed_ax.set(title="training examples / s", xlabel="epoch")
        for ax in (loss_ax, recall_ax, speed_ax):
            if self.best_epoch:
                ax.axvline(self.best_epoch, color="grey", linestyle=":", linewidth=1)
            ax.grid(alpha=0.3)
        figure.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------- training
@dataclass(frozen=True, eq=False)
class TrainedTwoTower:
    """A trained model (best weights restored, eval mode) and its curves."""

    model: TwoTowerModel
    curves: TrainingCurves


def train_two_tower(
    log: Interactions,
    features: TowerFeatures,
    config: TwoTowerConfig,
    *,
    valid: Interactions | None = None,
    progress: ProgressReporter | None = None,
) -> TrainedTwoTower:
    """Train on every event of ``log``; early-stop on ``valid`` (later events, same id maps).

    ``features`` covers at least the log's items (``TowerFeatures.build``). Without ``valid``
    (or with an empty one) all ``max_epochs`` run and the last weights are kept. ``progress``
    receives each epoch with its training loss and validation loss and recall@``eval_k``.

    Inside ``retrieval.two_tower.ddp.distributed_run`` (set by ``recsys train --nproc N`` or
    under ``torchrun``) every rank trains its share of each batch with DDP instead.
    """
    # Imported here: ddp builds on this module's loss and validator.
    from retrieval.two_tower import ddp

    run = ddp.current_run()
    if run is not None:
        return ddp.train_two_tower_ddp(log, features, config, run, valid=valid, progress=progress)
    _check_inputs(log, features, valid)
    device = resolve_device(config.device)
    rng = np.random.default_rng(config.seed)
    # fork_rng: seed torch for init and dropout without changing the caller's global RNG state.
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=rng_devices),
        torch_threads(config.num_threads),
        stage(progress, "two_tower epochs", total=config.max_epochs) as epochs,
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
        id_l2 = config.weight_decay if sparse else 0.0
        epoch_runner = _EpochRunner(log, features, config, model, device, rng, id_l2)
        validator = None
        if valid is not None and len(valid):
            validator = _Validator(log, valid, model, features, config, device)
        curves = TrainingCurves(eval_k=config.eval_k)
        best_recall, best_state, bad_epochs = -np.inf, None, 0
        for epoch in range(1, config.max_epochs + 1):
            started = time.perf_counter()
            train_loss = epoch_runner.run(optimizers, epoch)
            train_seconds = time.perf_counter() - started
            started = time.perf_counter()
            valid_recall, valid_loss = validator.evaluate() if validator else (None, None)
            curves.records.append(
                EpochRecord(
                    epoch=epoch,
                    train_loss=train_loss,
                    valid_loss=valid_loss,
                    valid_recall=valid_recall,
                    train_seconds=train_seconds,
                    valid_seconds=time.perf_counter() - started,
                    examples_per_second=len(log) / train_seconds,
                )
            )
            epochs.advance(
                loss=train_loss,
                valid_loss=valid_loss,
                **{f"valid_recall@{config.eval_k}": valid_recall},
            )
            if valid_recall is None:  # nothing to select on: keep the last weights
                curves.best_epoch = epoch
            elif valid_recall > best_recall + _MIN_IMPROVEMENT:
                best_recall, best_state, bad_epochs = valid_recall, _copy_state(model), 0
                curves.best_epoch = epoch
            else:
                bad_epochs += 1
                if bad_epochs >= config.patience:
                    curves.stopped_early = True
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
    # Sparse gradients are a property of this training loop: hand back the module that loading
    # the saved weights gives (dense), which any other optimizer can fine-tune.
    model.use_sparse_id_gradients(False)
    model.eval()
    return TrainedTwoTower(model, curves)


def _optimizers(
    model: TwoTowerModel, config: TwoTowerConfig, sparse: bool
) -> list[torch.optim.Optimizer]:
    """AdamW over every parameter; with ``sparse``, SparseAdam over the id tables instead.

    SparseAdam updates only the rows present in a sparse gradient ("lazy" Adam: an absent row
    keeps its weights and moments); it has no weight decay, so ``_BatchLoss`` adds an L2 term
    on the looked-up rows.
    """
    if not sparse:
        return [
            torch.optim.AdamW(
                model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
            )
        ]
    id_weights = [table.weight for table in model.id_tables]
    dense = [p for p in model.parameters() if not any(p is w for w in id_weights)]
    return [
        torch.optim.AdamW(dense, lr=config.learning_rate, weight_decay=config.weight_decay),
        torch.optim.SparseAdam(id_weights, lr=config.learning_rate),
    ]


def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float) -> None:
    """``clip_grad_norm_`` whose global norm also counts sparse gradients.

    torch's own raises on a sparse gradient (``linalg.vector_norm`` has no sparse kernel), and
    clipping the dense parameters alone would let the id rows' share of the norm through.
    """
    for parameter in parameters:
        if parameter.grad is not None and parameter.grad.is_sparse:
            # Coalesce first: an embedding's sparse gradient holds one piece per lookup, and
            # the norm of a row's pieces is not the norm of their sum. SparseAdam would
            # coalesce anyway, so this costs nothing extra.
            parameter.grad = parameter.grad.coalesce()
    grads = [
        p.grad.values() if p.grad.is_sparse else p.grad for p in parameters if p.grad is not None
    ]
    total = torch.nn.utils.get_total_norm(grads)
    # foreach=False: the multi-tensor kernels' fast path takes strided tensors only, so a sparse
    # gradient sends them to this per-tensor path anyway (same products, any device).
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=False)


def resolve_device(name: str) -> torch.device:
    """The torch device for ``config.device``; ``"cuda"`` without a GPU is a ConfigError."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("TwoTowerConfig.device is 'cuda' but torch sees no CUDA device")
    return torch.device(name)


@dataclass(frozen=True, eq=False)
class BatchInputs:
    """A batch of events turned into tower inputs (see :meth:`_BatchLoss.inputs`).

    users: (B,) user index of each event; candidates: (B + U,) the events' items, then U sampled
    items; user_inputs / item_inputs: the towers' inputs for those rows.
    """

    users: npt.NDArray[np.int64]
    candidates: npt.NDArray[np.int64]
    user_inputs: UserInputs
    item_inputs: ItemInputs


class _BatchLoss:
    """The configured loss of a batch of events (rows of ``log``), as a differentiable scalar.

    With an ``rng`` (training) it draws id-dropout masks and ``n_uniform_negatives``; without
    one (evaluation) it uses in-batch negatives only and hides no id. ``id_l2 > 0`` (training
    with sparse id tables) also returns an L2 penalty on the id rows the batch looked up.

    The three steps (:meth:`inputs`, the towers, :meth:`loss_of_vectors`) are separate so that
    distributed training (``retrieval.two_tower.ddp``) encodes each rank's share of a batch and
    computes the loss over the vectors gathered from every rank.
    """

    def __init__(
        self,
        model: TwoTowerModel,
        features: TowerFeatures,
        config: TwoTowerConfig,
        log: Interactions,
        history: PointInTimeHistory,
        item_probability: npt.NDArray[np.float64],
        device: torch.device,
        id_l2: float = 0.0,
    ) -> None:
        self.model, self.features, self.config = model, features, config
        self.log, self.history, self.device = log, history, device
        self.item_probability = torch.tensor(item_probability, dtype=torch.float32, device=device)
        self.id_l2 = id_l2

    def __call__(
        self, events: npt.NDArray[np.int64], rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean loss over the batch's events, the id-row L2 penalty or None)."""
        n_uniform = self.config.n_uniform_negatives if rng is not None else 0
        batch = self.inputs(events, rng, n_uniform)
        user_vectors = self.model.encode_users(batch.user_inputs)
        item_vectors = self.model.encode_items(batch.item_inputs)
        penalty = None
        if self.id_l2 > 0 and rng is not None:
            penalty = self.penalty(batch)
        return self.loss_of_vectors(
            user_vectors, item_vectors, batch.users, batch.candidates, n_uniform
        ), penalty

    def inputs(
        self, events: npt.NDArray[np.int64], rng: np.random.Generator | None, n_uniform: int
    ) -> BatchInputs:
        """Tower inputs of ``events`` plus ``n_uniform`` uniformly drawn items (with ``rng``)."""
        config, features, log, device = self.config, self.features, self.log, self.device
        users, items, times = log.user_idx[events], log.item_idx[events], log.timestamp[events]
        recent = self.history.gather(events)
        batch = events.shape[0]
        sampled = (
            rng.integers(0, features.n_items, n_uniform) if rng is not None
            else np.zeros(0, dtype=np.int64)
        )  # fmt: skip
        candidates = np.concatenate([items, sampled])
        # Items are aged at their own event; sampled negatives at the batch's latest event.
        at = np.concatenate([times, np.full(n_uniform, times.max(), dtype=np.int64)])
        user_inputs = features.user_inputs(
            users,
            recent,
            hide_user=_flags(rng, batch, config.user_id_dropout),
            hide_history_ids=_flags(rng, recent.shape, config.item_id_dropout),
            device=device,
        )
        item_inputs = features.item_inputs(
            candidates,
            at,
            hide_id=_flags(rng, candidates.shape[0], config.item_id_dropout),
            device=device,
        )
        return BatchInputs(
            users.astype(np.int64), candidates.astype(np.int64), user_inputs, item_inputs
        )

    def penalty(self, batch: BatchInputs, per_rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The L2 penalty on the id rows ``batch`` looked up (``_id_row_penalty``); ``per_rows``
        divides the user and item sums by other counts than ``batch``'s own (a rank's share of
        a global batch divides by the global counts)."""
        return _id_row_penalty(
            self.model, batch.user_inputs.ids, batch.item_inputs.ids, self.id_l2, per_rows
        )

    def loss_of_vectors(
        self,
        user_vectors: torch.Tensor,
        item_vectors: torch.Tensor,
        users: npt.NDArray[np.int64],
        candidates: npt.NDArray[np.int64],
        n_uniform: int,
    ) -> torch.Tensor:
        """Mean loss of B events: (B, d) user vectors against (B + U, d) candidate vectors.

        ``users`` (B,) and ``candidates`` (B + U,) are their indices: candidate ``j < B`` is
        event ``j``'s positive, the last ``n_uniform`` are sampled items.
        """
        config, device = self.config, self.device
        batch = users.shape[0]
        scores = user_vectors @ item_vectors.T
        candidate_items = torch.tensor(candidates, device=device)
        user_ids = torch.tensor(users, device=device)
        no_user = torch.full((n_uniform,), -1, dtype=user_ids.dtype, device=device)
        hits = accidental_hits(
            candidate_items[:batch], user_ids, candidate_items, torch.cat([user_ids, no_user])
        )
        if config.loss == "bpr":
            return bpr_loss(scores, hits, config.temperature)
        log_q = None
        if config.logq_correction:
            log_q = candidate_log_q(
                self.item_probability, candidate_items, batch, n_uniform, self.features.n_items
            )
        return sampled_softmax_loss(scores, hits, config.temperature, log_q)


def _id_row_penalty(
    model: TwoTowerModel,
    user_rows: torch.Tensor,
    item_rows: torch.Tensor,
    strength: float,
    per_rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``strength / 2`` x (mean squared norm of the looked-up user rows + of the item rows).

    Stands in for weight decay on sparse id tables. SparseAdam has none, and decaying every row
    each step is the O(catalogue) update that sparse training avoids; so a row is pulled
    towards 0 when the batch uses it (the L2 form of ``weight_decay``, applied lazily). Per
    lookup and averaged like the loss, a row's pull (``strength`` x its share of the batch x
    the row) grows with its frequency as its data gradient does: the balance between the two
    does not depend on the row's popularity or on the batch size. The rows are those of the
    batch's users and candidate items; history slots reuse candidate rows of other events.
    """
    users, items = model.id_tables
    n_users, n_items = per_rows if per_rows is not None else (len(user_rows), len(item_rows))
    user_term = users(user_rows).square().sum() / n_users
    item_term = items(item_rows).square().sum() / n_items
    return 0.5 * strength * (user_term + item_term)


class _EpochRunner:
    """One pass over the shuffled training events: batches, loss, clipped optimizer steps."""

    def __init__(
        self,
        log: Interactions,
        features: TowerFeatures,
        config: TwoTowerConfig,
        model: TwoTowerModel,
        device: torch.device,
        rng: np.random.Generator,
        id_l2: float = 0.0,
    ) -> None:
        self.n_events, self.config, self.model, self.rng = len(log), config, model, rng
        history = PointInTimeHistory(
            log.user_idx, log.item_idx, log.timestamp, config.history_length
        )
        # The in-batch sampling distribution: each item's share of the training stream.
        probability = _item_probability(log.item_idx, features.n_items)
        self.loss = _BatchLoss(model, features, config, log, history, probability, device, id_l2)

    def run(self, optimizers: list[torch.optim.Optimizer], epoch: int) -> float:
        """Train one epoch; return the mean training loss per example (without the penalty)."""
        self.model.train()
        order = self.rng.permutation(self.n_events)
        n_batches = -(-self.n_events // self.config.batch_size)
        total = 0.0
        for events in tqdm(
            _chunks(order, self.config.batch_size),
            total=n_batches,
            desc=f"two-tower epoch {epoch}",
            disable=not self.config.progress,
        ):
            loss = self.step(events, optimizers)
            total += float(loss.detach()) * len(events)
        return total / self.n_events

    def step(
        self, events: npt.NDArray[np.int64], optimizers: list[torch.optim.Optimizer]
    ) -> torch.Tensor:
        """One optimisation step on ``events`` (log rows); returns their loss."""
        loss, penalty = self.loss(events, self.rng)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        (loss if penalty is None else loss + penalty).backward()
        if self.config.grad_clip_norm > 0:
            clip_grad_norm(list(self.model.parameters()), self.config.grad_clip_norm)
        for optimizer in optimizers:
            optimizer.step()
        return loss


class _Validator:
    """Validation recall@K (full catalogue, training items excluded) and loss, per epoch.

    Users: those with a validation event on an item they did not train on, a seeded sample of
    at most ``valid_max_users``. Their state is their training history; the loss is over their
    validation events, each with its point-in-time history (training + earlier validation).
    """

    def __init__(
        self,
        log: Interactions,
        valid: Interactions,
        model: TwoTowerModel,
        features: TowerFeatures,
        config: TwoTowerConfig,
        device: torch.device,
    ) -> None:
        self.model, self.features, self.config, self.device = model, features, config, device
        seen = _binary(log.matrix)
        held_out = _binary(valid.matrix)
        relevant = sp.csr_matrix(held_out - held_out.multiply(seen))
        relevant.eliminate_zeros()
        users = np.flatnonzero(np.diff(relevant.indptr) > 0)
        rng = np.random.default_rng([config.seed, _VALID_STREAM])
        if users.shape[0] > config.valid_max_users:
            users = np.sort(rng.choice(users, size=config.valid_max_users, replace=False))
        self.users = users.astype(np.int32)
        self.recent = UserBatch.from_interactions(
            log, self.users, history_length=config.history_length
        ).recent_items
        self.exclude, self.relevant = seen[self.users], relevant[self.users]
        self.reference_time = int(log.timestamp[-1])
        # Loss examples: the sampled users' validation events, histories over train + valid.
        combined, from_valid = _concatenate(log, valid)
        history = PointInTimeHistory(
            combined.user_idx, combined.item_idx, combined.timestamp, config.history_length
        )
        self.loss_events = np.flatnonzero(from_valid & np.isin(combined.user_idx, self.users))
        # logQ of a validation batch: its own events' item distribution.
        probability = _item_probability(combined.item_idx[self.loss_events], features.n_items)
        self.loss = _BatchLoss(model, features, config, combined, history, probability, device)

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float | None]:
        """(mean recall@K over the sampled users, mean validation loss per event)."""
        self.model.eval()
        return self._recall(), self._loss()

    def _recall(self) -> float:
        if self.users.shape[0] == 0:
            return 0.0
        config, features = self.config, self.features
        items = encode_items(
            self.model,
            features,
            np.arange(features.n_items),
            self.reference_time,
            batch_size=config.encode_batch_size,
            device=self.device,
        )
        users = encode_users(
            self.model,
            features,
            self.users,
            self.recent,
            batch_size=config.encode_batch_size,
            device=self.device,
        )
        block = max(1, _SCORE_BLOCK_ELEMENTS // features.n_items)
        recalls = []
        for start in range(0, users.shape[0], block):
            rows = slice(start, start + block)
            top = Candidates.from_scores(
                users[rows] @ items.T, config.eval_k, exclude=self.exclude[rows]
            ).item_idx
            recalls.append(_recall(top, self.relevant[rows]))
        return float(np.concatenate(recalls).mean())

    def _loss(self) -> float | None:
        if self.loss_events.shape[0] == 0:
            return None
        total = 0.0
        for events in _chunks(self.loss_events, self.config.batch_size):
            total += float(self.loss(events)[0]) * len(events)
        return total / self.loss_events.shape[0]


# ---------------------------------------------------------------------------------------- helpers
def _recall(top: npt.NDArray[np.int32], relevant: sp.csr_matrix) -> npt.NDArray[np.float64]:
    """(n,) hits in each row of ``top`` (n, K) over the row's relevant count (all rows >= 1)."""
    n_items = relevant.shape[1]
    rows = np.repeat(np.arange(relevant.shape[0], dtype=np.int64), np.diff(relevant.indptr))
    relevant_keys = np.sort(rows * n_items + relevant.indices)
    top_keys = np.arange(top.shape[0], dtype=np.int64)[:, None] * n_items + top
    hits = np.isin(top_keys, relevant_keys) & (top != PAD_ITEM)
    return hits.sum(axis=1) / np.diff(relevant.indptr)


def _flags(
    rng: np.random.Generator | None, shape: int | tuple[int, ...], probability: float
) -> npt.NDArray[np.bool_] | None:
    """Bernoulli(``probability``) flags of ``shape`` (id dropout); None when not training."""
    return None if rng is None else rng.random(shape) < probability


def _item_probability(items: npt.NDArray[np.integer], n_items: int) -> npt.NDArray[np.float64]:
    counts = np.bincount(items, minlength=n_items)
    return counts / max(int(counts.sum()), 1)


def _binary(matrix: sp.csr_matrix) -> sp.csr_matrix:
    out = sp.csr_matrix(matrix, dtype=np.float32, copy=True)
    out.data[:] = 1.0
    return out


def _concatenate(
    first: Interactions, second: Interactions
) -> tuple[Interactions, npt.NDArray[np.bool_]]:
    """Both logs as one, sorted by time (stable: ``first`` wins ties), and which rows are
    from ``second``."""
    timestamps = np.concatenate([first.timestamp, second.timestamp])
    order = np.argsort(timestamps, kind="stable")
    combined = Interactions(
        users=first.users,
        items=first.items,
        user_idx=np.concatenate([first.user_idx, second.user_idx])[order],
        item_idx=np.concatenate([first.item_idx, second.item_idx])[order],
        timestamp=timestamps[order],
        weight=np.concatenate([first.weight, second.weight])[order],
    )
    return combined, order >= len(first)


def _chunks(values: npt.NDArray[np.int64], size: int) -> Iterator[npt.NDArray[np.int64]]:
    for start in range(0, values.shape[0], size):
        yield values[start : start + size]


def _copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _check_inputs(log: Interactions, features: TowerFeatures, valid: Interactions | None) -> None:
    if len(log) == 0:
        raise DataError("cannot train the two-tower model on an empty interaction log")
    if features.n_id_items != log.n_items or features.n_users != log.n_users:
        raise DataError(
            f"features cover {features.n_users} users x {features.n_id_items} id items, the log "
            f"{log.n_users} x {log.n_items}"
        )
    if valid is not None and (valid.users != log.users or valid.items != log.items):
        raise DataError(
            "the validation log must use the training id maps; build it with "
            "Interactions.from_frame(frame, users=train.users, items=train.items, "
            f"drop_unknown=True) (got {valid.n_users} users x {valid.n_items} items, "
            f"training has {log.n_users} x {log.n_items})"
        )
