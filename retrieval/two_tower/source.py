"""``TwoTowerSource``: two-tower retrieval as a candidate source, over a live ANN index.

``fit`` trains the towers (``retrieval.two_tower.train``), encodes every catalogue item and
builds a :class:`~retrieval.index.VectorIndex` of the item vectors. ``retrieve`` encodes each
user from their *current* state (``UserBatch.recent_items``) and searches the index: re-encoding
with frozen weights is the online update, so feedback that arrived after training changes a
user's candidates at once, and an unknown user with a history gets personalised candidates.

The catalogue moves between retrains too: :meth:`TwoTowerSource.add_items` embeds new items with
the item tower's features-only path and adds them to the live index; :meth:`remove_items` takes
retired ones out.

The index may be approximate (IVF, HNSW, quantized): the source over-fetches by the most items
any row excludes, drops the excluded ones, and re-scores the survivors with the exact float32
vectors, so the scores it returns are exact cosines whatever the index kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
import torch

from data.catalog import ItemCatalog
from data.configuration import from_mapping, to_mapping
from data.errors import BundleError, DataError, NotFittedError
from data.interactions import Interactions
from data.progress import ProgressReporter
from retrieval.base import Candidates, LastBatchMemo, UserBatch
from retrieval.index import VectorIndex
from retrieval.index_config import IndexConfig
from retrieval.index_search import search_exact_topk
from retrieval.state_io import read_state, write_state
from retrieval.topk import align_exclude, check_k
from retrieval.two_tower.config import TwoTowerConfig
from retrieval.two_tower.model import (
    TowerFeatures,
    TwoTowerModel,
    encode_items,
    encode_users,
    torch_threads,
)
from retrieval.two_tower.train import CURVES_JSON, TrainingCurves, train_two_tower
from retrieval.user_cache import UserVectorCache, history_digest

WEIGHTS_FILE = "model.pt"
INDEX_DIR = "index"
# Small catalogues do not need an approximate index; the serving config picks one for large ones.
DEFAULT_INDEX = IndexConfig(kind="flat")


class TwoTowerSource:
    """Two-tower candidates from an ANN index (see the module docstring).

    Learned state (after :meth:`fit`):
        model_:         the trained :class:`TwoTowerModel` (eval mode).
        features_:      :class:`TowerFeatures`, the towers' inputs by index.
        item_vectors_:  (n_items, output_dim) float32 unit item vectors (NaN: never embedded).
        in_index_:      (n_items,) bool, the item is in the index (retrievable).
        index_:         the :class:`VectorIndex` of the retrievable items.
        trained_until_: int seconds UTC, the last training event; items are aged at this time.
        curves_:        :class:`TrainingCurves` of the fit.
    """

    model_: TwoTowerModel
    features_: TowerFeatures
    item_vectors_: npt.NDArray[np.float32]
    in_index_: npt.NDArray[np.bool_]
    index_: VectorIndex
    trained_until_: int
    curves_: TrainingCurves

    def __init__(
        self,
        config: TwoTowerConfig | None = None,
        index: IndexConfig | None = None,
        *,
        name: str = "two_tower",
    ) -> None:
        self.config = config if config is not None else TwoTowerConfig()
        self.index_config = index if index is not None else DEFAULT_INDEX
        self.name = name
        self._vectors_memo: LastBatchMemo[npt.NDArray[np.float32]] = LastBatchMemo()
        self._user_cache: UserVectorCache | None = None
        # Online steps published on top of the fitted weights (pipeline/online_learning).
        self.online_step_ = 0

    @property
    def n_items(self) -> int:
        """Items the source has features for (the fitted catalogue plus added ones)."""
        return int(self.item_vectors_.shape[0])

    # ------------------------------------------------------------------------------ learning
    def fit(
        self,
        log: Interactions,
        catalog: ItemCatalog | None = None,
        valid: Interactions | None = None,
        *,
        user_features: npt.ArrayLike | None = None,
        progress: ProgressReporter | None = None,
    ) -> Self:
        """Train on ``log``, early-stopping on ``valid``; embed and index the whole catalogue.

        catalog: item features aligned with ``log.items`` (it may list more items after them,
            which are embedded from features only); None = ids only.
        valid: later events with the training id maps (early stopping); None = no stopping.
        user_features: optional (n_users, F) dense features aligned with ``log.users``.
        progress: receives the training epochs (``train_two_tower``).
        """
        catalog = catalog if catalog is not None else ItemCatalog.empty(log.items)
        features = self.build_features(log, catalog, user_features)
        trained = train_two_tower(log, features, self.config, valid=valid, progress=progress)
        self.model_, self.features_, self.curves_ = trained.model, features, trained.curves
        self._vectors_memo.clear()
        self._user_cache = None
        self.trained_until_ = int(log.timestamp.max())
        items = np.arange(catalog.n_items)
        self.item_vectors_ = self._encode_items(items, self.trained_until_)
        self.in_index_ = np.ones(catalog.n_items, dtype=bool)
        self.index_ = VectorIndex.build(self.index_config, self.item_vectors_, items)
        return self

    def build_features(
        self,
        log: Interactions,
        catalog: ItemCatalog,
        user_features: npt.ArrayLike | None = None,
    ) -> TowerFeatures:
        """The towers' inputs that :meth:`fit` trains on (also what every rank of a distributed
        fit builds for itself)."""
        _check_catalog(catalog, log)
        return TowerFeatures.build(
            catalog,
            log.item_counts,
            n_users=log.n_users,
            config=self.config,
            user_features=user_features,
        )

    # ------------------------------------------------------------------------------ vectors
    def user_vectors(self, users: UserBatch) -> npt.NDArray[np.float32]:
        """(n, output_dim) float32 unit vectors of the users in their current state.

        Encoded from the user id (unknown users: the "unknown user" row) and the first
        ``history_length`` items of ``users.recent_items``.
        """
        return self._batch_vectors(users).copy()

    def _batch_vectors(self, users: UserBatch) -> npt.NDArray[np.float32]:
        """:meth:`user_vectors`, encoded once per batch (read-only: shared with later calls)."""
        self._check_fitted()
        return self._vectors_memo.get(users, self._encode_users)

    def warm(self, users: UserBatch) -> None:
        """Encode ``users`` now into the cross-request cache (e.g. the snapshot's users at
        start-up), so their first requests skip the forward pass."""
        self._check_fitted()
        self._encode_users(users)

    def _encode_users(self, users: UserBatch) -> npt.NDArray[np.float32]:
        """The users' vectors: cached where their history is the one last encoded, a forward
        pass for the rest (then cached)."""
        history = users.recent_items[:, : self.config.history_length]
        cache = self._vector_cache()
        digests = history_digest(history)
        vectors, hit = cache.lookup(users.user_idx, digests)
        miss = np.flatnonzero(~hit)
        if miss.size:
            with torch_threads(self.config.num_threads):
                vectors[miss] = encode_users(
                    self.model_,
                    self.features_,
                    users.user_idx[miss],
                    history[miss],
                    batch_size=self.config.encode_batch_size,
                    device=self._device,
                )
            cache.store(users.user_idx[miss], digests[miss], vectors[miss])
        return vectors

    def _vector_cache(self) -> UserVectorCache:
        cache = self._user_cache
        if cache is None:  # two threads may both build one: either is right, one is kept
            cache = UserVectorCache(self.features_.n_users, self.item_vectors_.shape[1])
            self._user_cache = cache
        return cache

    def item_vectors(self, item_idx: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """(n, output_dim) float32 vectors of ``item_idx`` (n,); NaN rows for -1 / unknown items."""
        self._check_fitted()
        items = np.asarray(item_idx, dtype=np.int64)
        valid = (items >= 0) & (items < self.n_items)
        out = self.item_vectors_[np.where(valid, items, 0)]
        out[~valid] = np.nan
        return out

    def score(self, users: UserBatch, item_idx: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """(n, m) float32 cosine scores of items ``item_idx`` (n, m) for each user.

        NaN where the item is padding or unknown to the source (a missing ranker feature, not a
        low score).
        """
        items = np.asarray(item_idx)
        if items.ndim != 2 or items.shape[0] != len(users):
            raise DataError(f"item_idx has shape {items.shape}, expected ({len(users)}, m)")
        vectors = self._batch_vectors(users)
        item_vectors = self.item_vectors(items.ravel()).reshape(*items.shape, -1)
        return np.einsum("nd,nmd->nm", vectors, item_vectors).astype(np.float32)

    # ------------------------------------------------------------------------------ serving
    def retrieve(
        self, users: UserBatch, k: int, *, exclude: sp.csr_matrix | None = None
    ) -> Candidates:
        """Top-``k`` indexed items by cosine with each user's current vector, minus ``exclude``.

        Ties go to the lower item index; rows are padded when the index holds too few items.
        """
        self._check_fitted()
        k = check_k(k)
        n = len(users)
        mask = align_exclude(exclude, n, self.n_items)
        out = Candidates.empty(n, k)
        if k == 0 or len(self.index_) == 0 or n == 0:
            return out
        vectors = self._batch_vectors(users)
        top_items, top_scores = search_exact_topk(
            self.index_, vectors, vectors, self.item_vectors_, k, mask
        )
        width = top_items.shape[1]
        out.item_idx[:, :width], out.scores[:, :width] = top_items, top_scores
        return out

    # ------------------------------------------------------------------------------ catalogue
    def add_items(
        self, item_idx: npt.ArrayLike, catalog: ItemCatalog, *, now: int | None = None
    ) -> None:
        """Embed ``item_idx`` (n,) from ``catalog`` and add them to the live index.

        ``catalog`` is the current catalogue (its id map extends the fitted one, as
        ``IdMap.extend`` does). Items without a trained id row take the features-only path;
        ``now`` (seconds UTC, default: the end of training) sets their age. An item already in
        the index is re-embedded and replaced.
        """
        self._check_fitted()
        items = np.unique(np.asarray(item_idx, dtype=np.int64))
        if items.size and (items[0] < 0 or items[-1] >= catalog.n_items):
            raise DataError(
                f"item_idx must lie in [0, {catalog.n_items}) for a catalog of "
                f"{catalog.n_items} items, got values in [{items[0]}, {items[-1]}]"
            )
        known = self.n_items
        self.features_ = self.features_.with_items(catalog, items)
        if (items < known).any():
            # A re-embedded item may change the pooled history of any cached user; a brand-new
            # item is in nobody's history yet, so the warmed vectors stay valid.
            self._user_cache = None
            self._vectors_memo.clear()
        grow = self.features_.n_items - known
        if grow:
            nan_rows = np.full((grow, self.item_vectors_.shape[1]), np.nan, dtype=np.float32)
            self.item_vectors_ = np.concatenate([self.item_vectors_, nan_rows])
            self.in_index_ = np.concatenate([self.in_index_, np.zeros(grow, dtype=bool)])
        elif not self.item_vectors_.flags.writeable:  # memory-mapped: a private copy to edit
            self.item_vectors_ = np.array(self.item_vectors_)
            self.in_index_ = np.array(self.in_index_)
        if items.size == 0:
            return
        vectors = self._encode_items(items, self.trained_until_ if now is None else now)
        # Vectors first: a concurrent search that finds a new item must be able to rescore it.
        self.item_vectors_[items] = vectors
        self.index_.add(vectors, items)
        self.in_index_[items] = True

    def publish_model(
        self,
        model: TwoTowerModel,
        item_idx: npt.NDArray[np.int64],
        vectors: npt.NDArray[np.float32],
        *,
        online_step: int,
    ) -> None:
        """Serve ``model`` (weights updated online) from the next batch on.

        ``vectors`` (n, output_dim): ``model``'s vectors of ``item_idx`` (n,), the items whose
        vectors it changed; every other item's vector must be unchanged by it (the online
        trainer keeps the item tower's layers fixed for that). Vectors and index first, then the
        weights and a fresh user-vector cache: cached vectors belong to the version that
        computed them, so no request reads a vector of another version from the cache.
        """
        self._check_fitted()
        if not self.item_vectors_.flags.writeable:  # memory-mapped: a private copy to edit
            self.item_vectors_ = np.array(self.item_vectors_)
        items = np.asarray(item_idx, dtype=np.int64)
        if items.size:
            self.item_vectors_[items] = vectors
            live = self.in_index_[items]
            if live.any():
                self.index_.add(vectors[live], items[live])
        self.model_ = model
        self._user_cache = None
        self._vectors_memo.clear()
        self.online_step_ = online_step

    def remove_items(self, item_idx: npt.ArrayLike) -> int:
        """Take ``item_idx`` (n,) out of the index (retired items); returns how many were in it.

        Their vectors stay available to :meth:`score` and :meth:`item_vectors`.
        """
        self._check_fitted()
        items = np.asarray(item_idx, dtype=np.int64)
        items = np.unique(items[(items >= 0) & (items < self.n_items)])
        removed = self.index_.remove(items) if items.size else 0
        self.in_index_[items] = False
        return removed

    # ------------------------------------------------------------------------------ persistence
    def save(self, directory: Path) -> None:
        """Write weights (``model.pt``), the index, the curves, then ``config.json`` + arrays."""
        self._check_fitted()
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        torch.save(self.model_.state_dict(), out / WEIGHTS_FILE)
        self.index_.save(out / INDEX_DIR)
        self.curves_.save(out)
        features_meta, features_arrays = self.features_.to_state()
        meta: dict[str, Any] = {
            "name": self.name,
            "config": to_mapping(self.config),
            "index": self.index_config.to_dict(),
            "trained_until": self.trained_until_,
            "features": features_meta,
        }
        arrays = {
            **features_arrays,
            "item_vectors": self.item_vectors_,
            "in_index": self.in_index_,
        }
        # Last: a directory with config.json holds a complete source.
        write_state(out, type(self).__name__, meta, arrays)

    @classmethod
    def load(cls, directory: Path, *, mmap: bool = False) -> Self:
        """Read a directory written by :meth:`save` (onto the CPU); ``BundleError`` if broken.

        The arrays (item vectors, features) are copy-on-write maps of their files whatever
        ``mmap`` says (``read_state``). mmap: also map the model weights (copy-on-write) and the
        index (read-only: :meth:`add_items` and :meth:`remove_items` then raise), so the serving
        workers of one machine share one copy of each through the page cache.
        """
        path = Path(directory)
        meta, arrays = read_state(path, cls.__name__)
        config = from_mapping(TwoTowerConfig, meta["config"], cls.__name__)
        source = cls(
            config,
            from_mapping(IndexConfig, meta["index"], f"{cls.__name__} index"),
            name=meta["name"],
        )
        features = TowerFeatures.from_state(meta["features"], arrays)
        # Constructed under a forked RNG: the random init is overwritten, and loading must not
        # move the caller's torch random stream.
        with torch.random.fork_rng(devices=[]):
            model = TwoTowerModel(
                features.n_users,
                features.n_id_items,
                features.n_categories,
                features.n_user_features,
                config,
            )
        try:
            state = torch.load(
                path / WEIGHTS_FILE, map_location="cpu", weights_only=True, mmap=mmap
            )
            # assign: the parameters become the loaded (mapped) tensors instead of copies.
            model.load_state_dict(state, assign=mmap)
            curves = TrainingCurves.from_dict(json.loads((path / CURVES_JSON).read_text()))
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise BundleError(f"{path}: unreadable two-tower weights or curves ({exc})") from exc
        model.eval()
        source.model_, source.features_, source.curves_ = model, features, curves
        source.item_vectors_ = arrays["item_vectors"]
        source.in_index_ = arrays["in_index"]
        source.trained_until_ = int(meta["trained_until"])
        source.online_step_ = 0
        source.index_ = VectorIndex.load(path / INDEX_DIR, mmap=mmap)
        return source

    # ------------------------------------------------------------------------------ helpers
    @property
    def _device(self) -> torch.device:
        return next(self.model_.parameters()).device

    def _encode_items(self, items: npt.NDArray[np.int64], at: int) -> npt.NDArray[np.float32]:
        with torch_threads(self.config.num_threads):
            return encode_items(
                self.model_,
                self.features_,
                items,
                at,
                batch_size=self.config.encode_batch_size,
                device=self._device,
            )

    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise NotFittedError(f"{type(self).__name__} {self.name!r}: call fit() first")


def _check_catalog(catalog: ItemCatalog, log: Interactions) -> None:
    """The catalogue's first ``log.n_items`` ids must be the log's item map, in order."""
    if catalog.n_items < log.n_items or not catalog.items.ids.head(log.n_items).equals(
        log.items.ids
    ):
        raise DataError(
            f"catalog ({catalog.n_items} items) is not aligned with the log's item map "
            f"({log.n_items} items): build it with ItemCatalog.from_frame(items, log.items) "
            "(or an extension of log.items)"
        )
