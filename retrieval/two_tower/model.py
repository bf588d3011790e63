"""The two-tower model: a user tower and an item tower that meet in one cosine space.

User tower: user-id embedding (row ``n_users`` is "unknown user") + a recency-weighted pooling
of the recent history items + optional dense user features -> MLP -> L2-normalised vector.
History items are embedded with the *item tower's* id table (shared) plus their category bag, so
a history of items never seen in training still says something.

Item tower: item-id embedding (row ``n_items`` is "unknown item") + category multi-hot
embedding-bag + item-age bucket -> MLP -> L2-normalised vector. Training hides the id of a share
of the items (``item_id_dropout``), so the tower also learns the features-only path that new
items take at inference.

:class:`TowerFeatures` holds the features in index space (numpy) and turns a batch of indices
into tower inputs; the model itself only sees tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from data.catalog import UNKNOWN_TIME, ItemCatalog
from data.errors import BundleError, DataError
from retrieval.two_tower.config import TwoTowerConfig

SECONDS_PER_DAY = 86_400
# Embedding init scale: small enough that the first cosine scores are near 0 (soft first
# softmax), large enough that the towers' inputs are not all alike.
_EMBEDDING_INIT_STD = 0.05
# Attention logit of a padded history slot: exp() of it is 0 in float32.
_MASKED_LOGIT = -1e9
# Lower bound of a history's total recency weight, so an empty history pools to 0, not NaN.
_MIN_WEIGHT_SUM = 1e-12

_FEATURE_ARRAYS = ("item_categories", "item_created_at", "item_known", "user_features")


# ---------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True, eq=False)
class ItemInputs:
    """Item-tower inputs for ``N`` items (tensors on one device).

    ids:        (N,) int64, the id-embedding row (``n_items`` = unknown / hidden id).
    categories: (N, C) int64 category codes, padded with ``n_categories``.
    age_bucket: (N,) int64 in ``[0, n_age_buckets)``.
    """

    ids: torch.Tensor
    categories: torch.Tensor
    age_bucket: torch.Tensor


@dataclass(frozen=True, eq=False)
class UserInputs:
    """User-tower inputs for ``B`` users (tensors on one device).

    ids:                (B,) int64 user-embedding row (``n_users`` = unknown / hidden user).
    history_ids:        (B, H) int64 item-embedding rows of the recent items, most recent first.
    history_categories: (B, H, C) int64 their category codes (padded with ``n_categories``).
    history_mask:       (B, H) bool, True where a history slot holds an item.
    features:           (B, F) float32 dense user features (F may be 0).
    """

    ids: torch.Tensor
    history_ids: torch.Tensor
    history_categories: torch.Tensor
    history_mask: torch.Tensor
    features: torch.Tensor


def age_buckets(
    created_at: npt.NDArray[np.int64],
    at: npt.NDArray[np.int64] | int,
    bucket_days: tuple[float, ...],
) -> npt.NDArray[np.int64]:
    """Bucket of each item's age at time ``at`` (seconds UTC, scalar or per item).

    0: release time unknown; 1: younger than ``bucket_days[0]`` days (or released after ``at``);
    ``i + 1``: between ``bucket_days[i - 1]`` and ``bucket_days[i]``; last: older than all edges.
    """
    age_days = np.maximum(np.asarray(at, dtype=np.int64) - created_at, 0) / SECONDS_PER_DAY
    buckets = 1 + np.searchsorted(np.asarray(bucket_days), age_days, side="right")
    return np.where(created_at == UNKNOWN_TIME, 0, buckets).astype(np.int64)


@dataclass(frozen=True, eq=False)
class TowerFeatures:
    """What the towers know about items and users, by index, and how a batch becomes inputs.

    item_categories: (n_items, C) int64 category codes, padded with ``n_categories`` (C >= 1).
    item_created_at: (n_items,) int64 seconds UTC, ``UNKNOWN_TIME`` when unknown.
    item_known:      (n_items,) bool, the item had training events, so its id row is trained.
    user_features:   (n_users, F) float32 dense user features (F = 0 without any).
    category_names:  the training category vocabulary; code ``i`` is ``category_names[i]``.
    n_id_items:      rows of the item-id table before the "unknown item" row (items at fit).
    age_bucket_days: the item-age bucket edges (``TwoTowerConfig.age_bucket_days``).
    """

    item_categories: npt.NDArray[np.int64]
    item_created_at: npt.NDArray[np.int64]
    item_known: npt.NDArray[np.bool_]
    user_features: npt.NDArray[np.float32]
    category_names: tuple[str, ...]
    n_id_items: int
    age_bucket_days: tuple[float, ...]

    @property
    def n_items(self) -> int:
        """Items with features (the fitted catalogue plus any added since)."""
        return int(self.item_known.shape[0])

    @property
    def n_users(self) -> int:
        return int(self.user_features.shape[0])

    @property
    def n_categories(self) -> int:
        return len(self.category_names)

    @property
    def n_user_features(self) -> int:
        return int(self.user_features.shape[1])

    @classmethod
    def build(
        cls,
        catalog: ItemCatalog,
        item_counts: npt.NDArray[np.int64],
        *,
        n_users: int,
        config: TwoTowerConfig,
        user_features: npt.ArrayLike | None = None,
    ) -> TowerFeatures:
        """Features of every catalogue item; ``item_counts`` (n_id_items,) are training events.

        ``user_features``, if given, is ``(n_users, F)`` float, aligned with the user map.
        """
        n_id_items = int(item_counts.shape[0])
        if catalog.n_items < n_id_items:
            raise DataError(
                f"catalog has {catalog.n_items} items but the training log {n_id_items}"
            )
        if user_features is None:
            dense = np.zeros((n_users, 0), dtype=np.float32)
        else:
            dense = np.array(user_features, dtype=np.float32, copy=True)
            if dense.ndim != 2 or dense.shape[0] != n_users:
                raise DataError(
                    f"user_features has shape {dense.shape}, expected ({n_users}, F): one row "
                    "per user of the training map"
                )
            if not np.isfinite(dense).all():
                raise DataError("user_features contains NaN or infinite values")
        known = np.zeros(catalog.n_items, dtype=bool)
        known[:n_id_items] = item_counts > 0
        items = np.arange(catalog.n_items)
        return cls(
            item_categories=_category_codes(catalog, items, catalog.category_names),
            item_created_at=catalog.created_at.astype(np.int64, copy=True),
            item_known=known,
            user_features=dense,
            category_names=catalog.category_names,
            n_id_items=n_id_items,
            age_bucket_days=config.age_bucket_days,
        )

    def with_items(self, catalog: ItemCatalog, item_idx: npt.NDArray[np.int64]) -> TowerFeatures:
        """A copy covering ``catalog.n_items`` items, with ``item_idx``'s features from ``catalog``.

        Categories are matched by name against the training vocabulary (a category unknown at
        training has no embedding and is dropped). Items beyond the current range start as
        unknown ids; a known item keeps its trained id row.
        """
        if catalog.n_items < self.n_items:
            raise DataError(
                f"catalog has {catalog.n_items} items, fewer than the {self.n_items} already "
                "embedded; pass the catalog extended with the new items"
            )
        grow = catalog.n_items - self.n_items
        codes = _category_codes(catalog, item_idx, self.category_names)
        width = max(self.item_categories.shape[1], codes.shape[1])
        categories = _pad_columns(self.item_categories, width, self.n_categories)
        categories = np.concatenate(
            [categories, np.full((grow, width), self.n_categories, dtype=np.int64)]
        )
        categories[item_idx] = _pad_columns(codes, width, self.n_categories)
        created_at = np.concatenate(
            [self.item_created_at, np.full(grow, UNKNOWN_TIME, dtype=np.int64)]
        )
        created_at[item_idx] = catalog.created_at[item_idx]
        known = np.concatenate([self.item_known, np.zeros(grow, dtype=bool)])
        return replace(
            self, item_categories=categories, item_created_at=created_at, item_known=known
        )

    # -------------------------------------------------------------------------- batch inputs
    def item_inputs(
        self,
        items: npt.NDArray[np.integer],
        at: npt.NDArray[np.int64] | int,
        *,
        hide_id: npt.NDArray[np.bool_] | None = None,
        device: torch.device | str = "cpu",
    ) -> ItemInputs:
        """Inputs for ``items`` (N,) valid indices, aged at ``at`` (seconds, scalar or (N,)).

        Items without a trained id, and those flagged in ``hide_id`` (id dropout), take the
        "unknown item" row: the features-only path.
        """
        items = np.asarray(items, dtype=np.int64)
        use_id = self.item_known[items]
        if hide_id is not None:
            use_id &= ~hide_id
        ids = np.where(use_id, items, self.n_id_items)
        buckets = age_buckets(self.item_created_at[items], at, self.age_bucket_days)
        return ItemInputs(
            ids=_tensor(ids, device),
            categories=_tensor(self.item_categories[items], device),
            age_bucket=_tensor(buckets, device),
        )

    def user_inputs(
        self,
        users: npt.NDArray[np.integer],
        history: npt.NDArray[np.integer],
        *,
        hide_user: npt.NDArray[np.bool_] | None = None,
        hide_history_ids: npt.NDArray[np.bool_] | None = None,
        device: torch.device | str = "cpu",
    ) -> UserInputs:
        """Inputs for ``users`` (B,) and their ``history`` (B, H), most recent first.

        A user index outside the training map (-1 included) or flagged in ``hide_user`` takes
        the "unknown user" row and zero features. History slots holding -1, or an item this
        model has no features for, are masked out; ``hide_history_ids`` (B, H) hides ids only.
        """
        users = np.asarray(users, dtype=np.int64)
        history = np.asarray(history, dtype=np.int64)
        if history.ndim != 2 or history.shape[0] != users.shape[0]:
            raise DataError(f"history has shape {history.shape}, expected ({users.shape[0]}, H)")
        known_user = (users >= 0) & (users < self.n_users)
        if hide_user is not None:
            known_user &= ~hide_user
        user_rows = np.where(known_user, users, self.n_users)
        features = np.zeros((users.shape[0], self.n_user_features), dtype=np.float32)
        features[known_user] = self.user_features[users[known_user]]

        mask = (history >= 0) & (history < self.n_items)
        slots = np.where(mask, history, 0)
        use_id = mask & self.item_known[slots]
        if hide_history_ids is not None:
            use_id &= ~hide_history_ids
        categories = self.item_categories[slots]
        categories[~mask] = self.n_categories
        return UserInputs(
            ids=_tensor(user_rows, device),
            history_ids=_tensor(np.where(use_id, slots, self.n_id_items), device),
            history_categories=_tensor(categories, device),
            history_mask=_tensor(mask, device),
            features=_tensor(features, device),
        )

    # -------------------------------------------------------------------------- persistence
    def to_state(self) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
        """(JSON-ready scalars, arrays): everything :meth:`from_state` needs, no pickle."""
        meta = {
            "category_names": list(self.category_names),
            "n_id_items": self.n_id_items,
            "age_bucket_days": list(self.age_bucket_days),
        }
        return meta, {name: getattr(self, name) for name in _FEATURE_ARRAYS}

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> TowerFeatures:
        missing = [name for name in _FEATURE_ARRAYS if name not in arrays]
        if missing:
            raise BundleError(f"two-tower features: missing array(s) {missing}")
        return cls(
            **{name: arrays[name] for name in _FEATURE_ARRAYS},
            category_names=tuple(meta["category_names"]),
            n_id_items=int(meta["n_id_items"]),
            age_bucket_days=tuple(float(x) for x in meta["age_bucket_days"]),
        )


# ---------------------------------------------------------------------------------------- model
class TwoTowerModel(nn.Module):
    """User and item towers over shared item-id embeddings; both output unit vectors.

    Sizes: ``n_users`` / ``n_items`` id rows (each table has one extra "unknown" row),
    ``n_categories`` category codes (plus a padding code), ``n_user_features`` dense inputs.
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        n_categories: int,
        n_user_features: int,
        config: TwoTowerConfig,
    ) -> None:
        super().__init__()
        dim = config.embedding_dim
        self.n_users, self.n_items = n_users, n_items
        self.n_categories, self.n_user_features = n_categories, n_user_features
        self.pooling = config.pooling
        self.recency_decay = config.recency_decay
        self.user_embedding = nn.Embedding(n_users + 1, dim)
        self.item_embedding = nn.Embedding(n_items + 1, dim)
        # mode="mean" skips padding codes, so an item with no category gets a zero vector.
        self.category_embedding = nn.EmbeddingBag(
            n_categories + 1, dim, mode="mean", padding_idx=n_categories
        )
        self.age_embedding = nn.Embedding(config.n_age_buckets, dim)
        self.attention = nn.Linear(dim, 1) if config.pooling == "attention" else None
        self.user_mlp = _mlp(2 * dim + n_user_features, config)
        self.item_mlp = _mlp(3 * dim, config)
        for table in (self.user_embedding, self.item_embedding, self.age_embedding):
            nn.init.normal_(table.weight, std=_EMBEDDING_INIT_STD)
        with torch.no_grad():
            nn.init.normal_(self.category_embedding.weight, std=_EMBEDDING_INIT_STD)
            self.category_embedding.weight[n_categories].zero_()

    @property
    def id_tables(self) -> tuple[nn.Embedding, nn.Embedding]:
        """The user- and item-id embedding tables: the parameters that grow with the data."""
        return self.user_embedding, self.item_embedding

    def use_sparse_id_gradients(self, sparse: bool) -> None:
        """Let backward give the id tables sparse gradients (only the looked-up rows) or dense.

        A training-time switch for ``torch.optim.SparseAdam``: no weight and no ``state_dict``
        key depends on it, so a saved model loads the same either way (dense, the default).
        """
        for table in self.id_tables:
            table.sparse = sparse

    def encode_items(self, inputs: ItemInputs) -> torch.Tensor:
        """(N, output_dim) unit item vectors."""
        parts = (
            self.item_embedding(inputs.ids),
            self.category_embedding(inputs.categories),
            self.age_embedding(inputs.age_bucket),
        )
        return nn.functional.normalize(self.item_mlp(torch.cat(parts, dim=1)), dim=1)

    def encode_users(self, inputs: UserInputs) -> torch.Tensor:
        """(B, output_dim) unit user vectors."""
        batch, length = inputs.history_ids.shape
        bags = self.category_embedding(inputs.history_categories.reshape(batch * length, -1))
        items = self.item_embedding(inputs.history_ids) + bags.reshape(batch, length, -1)
        history = self._pool(items, inputs.history_mask)
        parts = (self.user_embedding(inputs.ids), history, inputs.features)
        return nn.functional.normalize(self.user_mlp(torch.cat(parts, dim=1)), dim=1)

    def _pool(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, dim) recency-weighted pooling of (B, H, dim) history items; 0 for no history."""
        positions = torch.arange(items.shape[1], device=items.device, dtype=items.dtype)
        log_recency = positions * float(np.log(self.recency_decay))
        if self.attention is None:
            weights = torch.exp(log_recency) * mask
            total = weights.sum(dim=1, keepdim=True).clamp_min(_MIN_WEIGHT_SUM)
            weights = weights / total
        else:
            logits = self.attention(items).squeeze(-1) + log_recency
            weights = torch.softmax(logits.masked_fill(~mask, _MASKED_LOGIT), dim=1) * mask
        return torch.einsum("bh,bhd->bd", weights, items)


def _mlp(n_inputs: int, config: TwoTowerConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = n_inputs
    for hidden in config.hidden_dims:
        layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(config.dropout)]
        width = hidden
    layers.append(nn.Linear(width, config.output_dim))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------- inference
@torch.no_grad()
def encode_items(
    model: TwoTowerModel,
    features: TowerFeatures,
    items: npt.NDArray[np.integer],
    at: int,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> npt.NDArray[np.float32]:
    """(N, output_dim) float32 unit vectors of ``items`` aged at ``at``, in eval mode."""
    model.eval()
    items = np.asarray(items, dtype=np.int64)
    out = np.empty((items.shape[0], _output_dim(model)), dtype=np.float32)
    for start in range(0, items.shape[0], batch_size):
        chunk = items[start : start + batch_size]
        inputs = features.item_inputs(chunk, at, device=device)
        out[start : start + chunk.shape[0]] = model.encode_items(inputs).cpu().numpy()
    return out


@torch.no_grad()
def encode_users(
    model: TwoTowerModel,
    features: TowerFeatures,
    users: npt.NDArray[np.integer],
    history: npt.NDArray[np.integer],
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> npt.NDArray[np.float32]:
    """(B, output_dim) float32 unit vectors of ``users`` (B,) with ``history`` (B, H)."""
    model.eval()
    out = np.empty((len(users), _output_dim(model)), dtype=np.float32)
    for start in range(0, len(users), batch_size):
        stop = start + batch_size
        inputs = features.user_inputs(users[start:stop], history[start:stop], device=device)
        out[start:stop] = model.encode_users(inputs).cpu().numpy()
    return out


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run torch CPU ops with ``threads`` intra-op threads (``None``: leave torch's default).

    The setting is process-wide, so it is restored on exit.
    """
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _output_dim(model: TwoTowerModel) -> int:
    last = model.item_mlp[-1]
    assert isinstance(last, nn.Linear)
    return int(last.out_features)


def _tensor(array: npt.NDArray[Any], device: torch.device | str) -> torch.Tensor:
    # torch.tensor copies: the numpy arrays may be read-only views (from_numpy would warn).
    return torch.tensor(array, device=device)


def _category_codes(
    catalog: ItemCatalog, items: npt.NDArray[np.integer], vocabulary: tuple[str, ...]
) -> npt.NDArray[np.int64]:
    """(N, C) training-vocabulary codes of ``items``' categories, padded with ``len(vocabulary)``.

    C is the largest category count among ``items`` (at least 1).
    """
    pad = len(vocabulary)
    rows = catalog.categories[np.asarray(items, dtype=np.int64)].tocsr()
    position = {name: code for code, name in enumerate(vocabulary)}
    remap = np.array([position.get(name, -1) for name in catalog.category_names], dtype=np.int64)
    codes = remap[rows.indices] if rows.nnz else np.zeros(0, dtype=np.int64)
    row_of = np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr))
    keep = codes >= 0
    codes, row_of = codes[keep], row_of[keep]
    counts = np.bincount(row_of, minlength=rows.shape[0])
    width = max(int(counts.max(initial=0)), 1)
    # Slot of each code within its row: its rank among the row's kept codes.
    starts = np.cumsum(counts) - counts
    slot = np.arange(codes.shape[0]) - np.repeat(starts, counts)
    out = np.full((rows.shape[0], width), pad, dtype=np.int64)
    out[row_of, slot] = codes
    return out


def _pad_columns(codes: npt.NDArray[np.int64], width: int, pad: int) -> npt.NDArray[np.int64]:
    extra = width - codes.shape[1]
    if extra <= 0:
        return codes.copy()
    return np.concatenate([codes, np.full((codes.shape[0], extra), pad, dtype=np.int64)], axis=1)
