"""``DNNRanker``: an MLP over the assembled features, trained per group (the alternative ranker).

Inputs are the same ``(N, F)`` rows LightGBM sees. Trees do not care about scale; a network does,
so each feature is compressed with ``sign(x) * log1p(|x|)`` (counts, ranks and ages are heavy-
tailed), standardised with the training rows' mean and deviation, and a missing value (NaN)
becomes 0 plus a 1 in its own missing-indicator input. The statistics live in the module's
buffers, so the ``state_dict`` carries them.

Losses (``DNNConfig.loss``):

* ``"listwise"``: softmax cross-entropy over each group (ListNet with a top-one target, Cao et
  al., 2007, "Learning to rank: from pairwise approach to listwise approach"): the target puts
  the group's (weighted) positives' mass on them, the loss is the cross-entropy with the softmax
  of the scores. Like LambdaRank it only asks for the right order within a user.
* ``"bce"``: pointwise binary cross-entropy with the per-row weights (class balance matters here,
  so pair it with ``weighting="balanced"`` in the training-set config).

AdamW, early stopping on validation NDCG@``eval_at`` with the best weights restored; saved as a
``state_dict`` and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Literal, Self, get_args

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from data.configuration import from_mapping, to_mapping
from data.errors import BundleError, ConfigError, DataError, NotFittedError
from data.progress import ProgressReporter, stage
from data.validation import (
    fraction,
    integer,
    non_negative_float,
    one_of,
    positive_float,
    positive_int,
)
from ranking.lgbm import META_FILE, read_meta
from ranking.training_set import TrainingSet, group_ndcg, write_curves
from retrieval.two_tower.model import torch_threads

WEIGHTS_FILE = "model.pt"
KIND = "dnn"
FORMAT_VERSION = 1

Loss = Literal["listwise", "bce"]


@dataclass(frozen=True)
class DNNConfig:
    """Hyperparameters of :class:`DNNRanker`.

    hidden_dims: widths of the hidden layers (ReLU + dropout after each); (64, 32) is plenty for
        ~50 features and keeps a single request's forward pass in the tens of microseconds.
    dropout: dropout probability after each hidden layer.
    loss: ``"listwise"`` (softmax over each group) or ``"bce"`` (weighted pointwise).
    learning_rate, weight_decay: AdamW (decoupled weight decay, Loshchilov & Hutter 2019).
    max_epochs: passes over the training groups.
    patience: epochs without a better validation NDCG before stopping (best weights kept).
    batch_groups: groups (users) per optimisation step.
    eval_at: K of the validation NDCG@K.
    seed: seeds weight init, dropout and the group shuffling.
    num_threads: torch intra-op CPU threads for training and prediction; ``None`` keeps
        torch's default. Serving a single request is fastest with 1. (TOML files may still
        call it ``threads``.)
    """

    renamed_keys: ClassVar[Mapping[str, str]] = MappingProxyType({"threads": "num_threads"})

    hidden_dims: tuple[int, ...] = (64, 32)
    dropout: float = 0.1
    loss: Loss = "listwise"
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    max_epochs: int = 30
    patience: int = 3
    batch_groups: int = 64
    eval_at: int = 10
    seed: int = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_dims", tuple(int(x) for x in self.hidden_dims))
        if not self.hidden_dims or any(width < 1 for width in self.hidden_dims):
            raise ConfigError(f"DNNConfig.hidden_dims must be positive, got {self.hidden_dims!r}")
        fraction(self.dropout, "DNNConfig.dropout", high_open=True)
        one_of(self.loss, "DNNConfig.loss", get_args(Loss))
        positive_float(self.learning_rate, "DNNConfig.learning_rate", finite=False)
        non_negative_float(self.weight_decay, "DNNConfig.weight_decay", finite=False)
        for name in ("max_epochs", "patience", "batch_groups", "eval_at"):
            positive_int(getattr(self, name), f"DNNConfig.{name}")
        integer(self.num_threads, "DNNConfig.num_threads", minimum=1, none_ok=True)


class RankerMLP(nn.Module):
    """Raw feature rows (B, F) with NaN -> scores (B,). Normalisation statistics are buffers."""

    center: torch.Tensor
    scale: torch.Tensor

    def __init__(self, n_features: int, hidden_dims: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(n_features))
        self.register_buffer("scale", torch.ones(n_features))
        layers: list[nn.Module] = []
        width = 2 * n_features  # standardised values + missing indicators
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def set_statistics(self, rows: npt.NDArray[np.float32]) -> None:
        """Standardise with the (compressed) training rows' mean and deviation, NaN ignored."""
        compressed = _compress(rows.astype(np.float64))
        observed = ~np.isnan(compressed)
        count = observed.sum(axis=0)
        total = np.where(observed, compressed, 0.0)
        center = np.divide(total.sum(axis=0), count, out=np.zeros(rows.shape[1]), where=count > 0)
        deviation = np.where(observed, compressed - center, 0.0)
        variance = np.divide(
            (deviation**2).sum(axis=0), count, out=np.zeros(rows.shape[1]), where=count > 0
        )
        scale = np.sqrt(variance)
        # Constant or never-observed features: scale 1 (they become 0 after centring).
        scale = np.where(scale > 1e-12, scale, 1.0)
        self.center.copy_(torch.from_numpy(center.astype(np.float32)))
        self.scale.copy_(torch.from_numpy(scale.astype(np.float32)))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        missing = torch.isnan(rows)
        compressed = torch.sign(rows) * torch.log1p(rows.abs())
        standard = torch.where(missing, 0.0, (compressed - self.center) / self.scale)
        inputs = torch.cat([standard, missing.to(rows.dtype)], dim=-1)
        return self.mlp(inputs).squeeze(-1)


def _compress(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.sign(values) * np.log1p(np.abs(values))


@dataclass
class DNNCurves:
    """Per-epoch train loss, validation loss and NDCG, train NDCG; the epoch kept (1-based)."""

    train_loss: list[float] = field(default_factory=list)
    valid_loss: list[float] = field(default_factory=list)
    train_ndcg: list[float] = field(default_factory=list)
    valid_ndcg: list[float] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "train_loss": self.train_loss,
            "valid_loss": self.valid_loss,
            "train_ndcg": self.train_ndcg,
            "valid_ndcg": self.valid_ndcg,
            "best_epoch": self.best_epoch,
            "seconds": self.seconds,
        }


class DNNRanker:
    """An MLP ranker (see the module docstring).

    Learned state (after :meth:`fit` or :meth:`load`):
        model_:         the :class:`RankerMLP` (eval mode, best weights).
        feature_names_: (F,) names of the columns ``predict`` expects.
        curves_:        :class:`DNNCurves`.
    """

    model_: RankerMLP
    feature_names_: tuple[str, ...]
    curves_: DNNCurves

    def __init__(self, config: DNNConfig | None = None) -> None:
        self.config = config if config is not None else DNNConfig()

    def fit(
        self,
        train: TrainingSet,
        valid: TrainingSet | None = None,
        *,
        progress: ProgressReporter | None = None,
    ) -> Self:
        """Train on ``train``'s groups; early-stop on ``valid`` NDCG@eval_at (None: all epochs).

        ``progress`` receives each epoch with its losses and NDCG."""
        if train.n_rows == 0:
            raise DataError("DNNRanker.fit: the training set is empty")
        if valid is not None and valid.names != train.names:
            raise DataError("train and valid sets have different feature names")
        config = self.config
        if valid is not None and valid.n_rows == 0:
            valid = None
        started = time.perf_counter()
        rng = np.random.default_rng(config.seed)
        curves = DNNCurves()
        # fork_rng: seed torch for init and dropout without changing the caller's global RNG.
        with (
            torch.random.fork_rng(devices=[]),
            torch_threads(config.num_threads),
            stage(progress, "dnn epochs", total=config.max_epochs) as epochs,
        ):
            torch.manual_seed(config.seed)
            model = RankerMLP(len(train.names), config.hidden_dims, config.dropout)
            model.set_statistics(train.values)
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
            )
            train_groups = _PaddedGroups(train)
            valid_groups = _PaddedGroups(valid) if valid is not None else None
            best_ndcg, best_state, stale = -np.inf, copy.deepcopy(model.state_dict()), 0
            for epoch in range(1, config.max_epochs + 1):
                model.train()
                losses = []
                for batch in train_groups.batches(config.batch_groups, rng):
                    loss = self._loss(model, *batch)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    losses.append(float(loss.detach()))
                curves.train_loss.append(float(np.mean(losses)))
                curves.train_ndcg.append(self._ndcg(model, train))
                if valid_groups is None or valid is None:
                    epochs.advance(loss=curves.train_loss[-1])
                    best_state, curves.best_epoch = copy.deepcopy(model.state_dict()), epoch
                    continue
                curves.valid_loss.append(self._mean_loss(model, valid_groups))
                ndcg = self._ndcg(model, valid)
                curves.valid_ndcg.append(ndcg)
                epochs.advance(loss=curves.train_loss[-1], valid_ndcg=ndcg)
                if ndcg > best_ndcg + 1e-9:
                    best_ndcg, best_state, stale = ndcg, copy.deepcopy(model.state_dict()), 0
                    curves.best_epoch = epoch
                else:
                    stale += 1
                    if stale >= config.patience:
                        break
            model.load_state_dict(best_state)
        model.eval()
        curves.seconds = time.perf_counter() - started
        self.model_, self.feature_names_, self.curves_ = model, train.names, curves
        return self

    def predict(self, values: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """(N,) float32 scores of rows ``values`` (N, F) (higher ranks first); NaN = missing."""
        self._check_fitted()
        rows = np.asarray(values, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != len(self.feature_names_):
            raise DataError(
                f"predict: values have shape {rows.shape}, expected (N, {len(self.feature_names_)})"
            )
        return _predict(self.model_, rows, self.config.num_threads)

    def warm(self) -> None:
        """Get ready to serve (the :class:`~ranking.stage.RankingModel` protocol): nothing to do,
        the network is ready once loaded."""
        self._check_fitted()

    # ---------------------------------------------------------------------------- internals
    def _loss(
        self,
        model: RankerMLP,
        rows: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Mean loss over a batch of padded groups: rows (B, L, F), the rest (B, L)."""
        scores = model(rows.reshape(-1, rows.shape[-1])).reshape(mask.shape)
        if self.config.loss == "bce":
            per_row = nn.functional.binary_cross_entropy_with_logits(
                scores, labels, reduction="none"
            )
            weight = weights * mask
            return (per_row * weight).sum() / weight.sum().clamp_min(1e-12)
        log_p = torch.log_softmax(scores.masked_fill(~mask, -torch.inf), dim=1)
        target = labels * weights * mask
        target = target / target.sum(dim=1, keepdim=True).clamp_min(1e-12)
        # 0 * log_p at padding would be 0 * -inf = NaN: take the padded entries out first.
        return -(target * log_p.masked_fill(~mask, 0.0)).sum(dim=1).mean()

    @torch.no_grad()
    def _mean_loss(self, model: RankerMLP, groups: _PaddedGroups) -> float:
        model.eval()
        losses = [
            float(self._loss(model, *batch)) for batch in groups.batches(self.config.batch_groups)
        ]
        return float(np.mean(losses))

    def _ndcg(self, model: RankerMLP, data: TrainingSet) -> float:
        scores = _predict(model, data.values, None)
        return float(np.nanmean(group_ndcg(scores, data.labels, data.groups, self.config.eval_at)))

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError("DNNRanker is not fitted: call fit() or load() first")

    # ---------------------------------------------------------------------------- persistence
    def save(self, directory: Path) -> None:
        """Write ``model.pt`` (state_dict), ``curves.json/png``, then ``ranker.json``."""
        self._check_fitted()
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.model_.state_dict(), directory / WEIGHTS_FILE)
        curves = self.curves_
        ndcg = f"ndcg@{self.config.eval_at}"
        panels = {"loss": {"train": curves.train_loss}, ndcg: {"train": curves.train_ndcg}}
        if curves.valid_loss:
            panels["loss"]["valid"] = curves.valid_loss
            panels[ndcg]["valid"] = curves.valid_ndcg
        write_curves(directory, panels, best=curves.best_epoch or None, xlabel="epoch")
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "config": to_mapping(self.config),
            "feature_names": list(self.feature_names_),
            # Without the wall seconds: this file is part of model_version (pipeline/bundle.py),
            # which must not change between two runs that train the same model.
            "curves": {k: v for k, v in curves.to_dict().items() if k != "seconds"},
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> DNNRanker:
        """Read a directory written by :meth:`save`; ``BundleError`` if missing or corrupt."""
        meta = read_meta(directory, KIND)
        ranker = cls(from_mapping(DNNConfig, meta["config"], "ranking.dnn"))
        names = tuple(meta["feature_names"])
        model = RankerMLP(len(names), ranker.config.hidden_dims, ranker.config.dropout)
        try:
            state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (OSError, RuntimeError, KeyError) as exc:
            raise BundleError(f"{directory}: unreadable DNN ranker weights ({exc})") from exc
        model.eval()
        ranker.model_, ranker.feature_names_ = model, names
        ranker.curves_ = DNNCurves(**meta["curves"])
        return ranker


@torch.no_grad()
def _predict(
    model: RankerMLP, rows: npt.NDArray[np.float32], num_threads: int | None
) -> npt.NDArray[np.float32]:
    if rows.shape[0] == 0:
        return np.zeros(0, dtype=np.float32)
    was_training = model.training
    model.eval()
    with torch_threads(num_threads):
        scores = model(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)))
    model.train(was_training)
    return scores.numpy().astype(np.float32, copy=False)


class _PaddedGroups:
    """A training set's groups as a (G, L) row-index matrix (-1 padded) for batched gathers."""

    def __init__(self, data: TrainingSet) -> None:
        sizes = data.groups
        self.index = np.full((sizes.size, int(sizes.max(initial=1))), -1, dtype=np.int64)
        group_of = np.repeat(np.arange(sizes.size), sizes)
        position = np.arange(data.n_rows) - np.repeat(data.offsets[:-1], sizes)
        self.index[group_of, position] = np.arange(data.n_rows)
        self.values = torch.from_numpy(np.ascontiguousarray(data.values, dtype=np.float32))
        self.labels = torch.from_numpy(data.labels.astype(np.float32))
        self.weights = torch.from_numpy(data.weights.astype(np.float32))

    def batches(
        self, batch_groups: int, rng: np.random.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(rows (B, L, F), labels, weights, mask (B, L)) per batch; shuffled when ``rng``."""
        n = self.index.shape[0]
        order = rng.permutation(n) if rng is not None else np.arange(n)
        for start in range(0, n, batch_groups):
            index = self.index[order[start : start + batch_groups]]
            # Trim the batch to its own longest group: less padding, same result.
            index = index[:, : int((index >= 0).sum(axis=1).max())]
            mask = torch.from_numpy(index >= 0)
            flat = torch.from_numpy(np.where(index >= 0, index, 0))
            rows = self.values[flat]
            rows = torch.where(mask[:, :, None], rows, 0.0)
            yield rows, self.labels[flat] * mask, self.weights[flat] * mask, mask
