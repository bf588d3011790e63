"""The retrieval stage: the configured candidate sources, fitted together, merged with quotas.

This is what the pipeline calls and what ``recsys train`` saves into the bundle's ``retrieval/``
directory (one sub-directory per source plus ``stage.json``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from data.catalog import ItemCatalog
from data.configuration import from_mapping, to_mapping
from data.errors import BundleError, ConfigError, DataError, NotFittedError
from data.interactions import Interactions
from data.progress import ProgressReporter, stage
from data.validation import is_number, positive_int
from retrieval.als import ALSConfig, ALSSource
from retrieval.base import (
    Candidates,
    CandidateSource,
    ObservingSource,
    UserBatch,
    WarmableSource,
)
from retrieval.coldstart import ColdStartConfig, ColdStartSource
from retrieval.covisit import CoVisitationConfig, CoVisitationSource
from retrieval.index_config import IndexConfig
from retrieval.item_item import ItemItemConfig, ItemItemSource, ItemKNNConfig
from retrieval.merge import MergedCandidates, merge_candidates
from retrieval.popular import PopularConfig, PopularSource
from retrieval.quotas import learn_quotas, relevant_ranks
from retrieval.two_tower.config import TwoTowerConfig
from retrieval.two_tower.source import TwoTowerSource
from retrieval.validation import VALIDATION_K, ndcg, validation_window

# Source kind -> (class, config class). The kind is also the default source name.
SOURCE_KINDS: Mapping[str, tuple[type[Any], type[Any]]] = MappingProxyType(
    {
        "two_tower": (TwoTowerSource, TwoTowerConfig),
        "als": (ALSSource, ALSConfig),
        "item_item": (ItemItemSource, ItemItemConfig),
        "item_knn": (ItemItemSource, ItemKNNConfig),
        "covisit": (CoVisitationSource, CoVisitationConfig),
        "popular": (PopularSource, PopularConfig),
        "coldstart": (ColdStartSource, ColdStartConfig),
    }
)
STAGE_FILE = "stage.json"
# Users the merge order is measured on at most: nDCG@10 over a few thousand users separates
# sources that differ by more than noise, at a fraction of a full evaluation's cost.
VALIDATION_USERS = 5_000
# Learned quotas move in steps of n_candidates / QUOTA_STEPS (25 of the default 500 slots): fine
# enough to follow a source's recall curve, coarse enough that a step's gain is not noise.
QUOTA_STEPS = 20


def _default_quotas() -> dict[str, int]:
    # The learned sources get most of the slate; the safety nets keep a few slots each so that a
    # user the models know little about still gets a full candidate list. They sum to the
    # default n_candidates, so every source places its quota whatever the merge order.
    return {
        "item_item": 125,
        "two_tower": 125,
        "als": 100,
        "item_knn": 50,
        "covisit": 50,
        "popular": 25,
        "coldstart": 25,
    }


def skip_reason(kind: str, config: Any, log: Interactions) -> str | None:
    """Why source ``kind`` is left out of a stage fitted on ``log``, or ``None`` to fit it.

    The two-tower needs ``min_interactions`` events (``TwoTowerConfig``); the item-item sources
    stop at ``max_items`` items (``ItemItemConfig``); co-visitation pairs
    events by their order in time, which an untimed log (every event at one time) does not
    have: its file order would pass for behaviour.
    """
    if isinstance(config, TwoTowerConfig) and len(log) < config.min_interactions:
        return (
            f"{len(log):,} training events < min_interactions {config.min_interactions:,}: "
            "the neighbourhood models and ALS serve a log this small better and faster"
        )
    if isinstance(config, ItemItemConfig) and log.n_items > config.max_items:
        return f"{log.n_items:,} items > max_items {config.max_items:,}"
    if kind == "covisit" and len(log) and int(log.timestamp.min()) == int(log.timestamp.max()):
        return "the log has no event times to pair events by"
    return None


class RetrievalAbandonedError(Exception):
    """Retrieval stopped part-way because its caller asked it to (``should_stop``)."""


@dataclass(frozen=True)
class RetrievalConfig:
    """The ``[retrieval]`` table (:meth:`from_mapping` reads it).

    sources: enabled source kinds, in merge priority order (quota slots are filled in order).
    quotas: new items each source may contribute before the round-robin fill.
    n_candidates: merged list length handed to the ranker (the funnel's width).
    history_length: recent events per user kept in the user state (H of UserBatch).
    fetch_per_quota: each source fetches ``ceil(quota * fetch_per_quota)`` candidates (at most
        ``n_candidates``): its quota, plus as many again for the fill when the sources overlap.
        ``None`` (or any value past ``n_candidates / quota``): every source fetches
        ``n_candidates``, as bundles trained before this setting do. On the default dataset 2
        ranks as well as 500 from every source (same pipeline NDCG@10 and merged recall@500:
        ``docs/benchmarks.md``, "Measurements behind the defaults") and the merge sorts 1000
        slots per user instead of 2500.
    source_configs: source kind -> its config (the ``[retrieval.<kind>]`` tables); a kind
        without one uses its config's defaults (:meth:`source_config`).
    order_by_validation: after fitting, measure each source's own top-10 on the validation
        window (nDCG@10) and merge in that order, best first (each keeps its quota). Which
        source is best differs between logs (the two-tower leads on the synthetic world, ALS
        and EASE on Last.fm), and the merged order is what the pipeline serves when the
        ranker is off or out of budget.
    index: the ANN index of the sources that search one (``[retrieval.index]``).
    learn_quotas: replace ``quotas`` by quotas learned on the validation window: slots go, a
        step at a time, to the source whose next candidates cover the most validation items no
        other quota covers yet (``retrieval/quotas.py``); every source keeps a floor of one step
        (``n_candidates / QUOTA_STEPS``). Off by default: on Last.fm it cost 0.004 nDCG@10
        (``docs/benchmarks.md``, "Measurements behind the defaults"); turn it on where one
        source finds much of what the others miss.
    refit_after_validation: once the validation window has chosen the hyperparameters, the
        merge order and the ranker, fit the sources again on training plus that window (with
        the chosen hyperparameters), so the served models learn from every event. The most
        recent events are the most telling on a timed log, and a random carve would otherwise
        cost the sources a tenth of their data. The two-tower is not refitted (a second SGD run
        would double the training time); it reads the window's events as user history.
    """

    sources: tuple[str, ...] = (
        "two_tower",
        "item_item",
        "als",
        "item_knn",
        "covisit",
        "popular",
        "coldstart",
    )
    quotas: Mapping[str, int] = field(default_factory=_default_quotas)
    n_candidates: int = 500
    history_length: int = 50
    fetch_per_quota: float | None = 2.0
    source_configs: Mapping[str, Any] = field(default_factory=dict)
    index: IndexConfig = field(default_factory=IndexConfig)
    order_by_validation: bool = True
    learn_quotas: bool = False
    refit_after_validation: bool = True

    def __post_init__(self) -> None:
        unknown = [s for s in self.sources if s not in SOURCE_KINDS]
        if unknown:
            raise ConfigError(
                f"[retrieval] unknown source kind(s) {unknown}; known: {list(SOURCE_KINDS)}"
            )
        for name in ("n_candidates", "history_length"):
            positive_int(getattr(self, name), f"[retrieval] {name}")
        missing = [s for s in self.sources if s not in self.quotas]
        if missing:
            raise ConfigError(f"[retrieval.quotas] no quota for source(s) {missing}")
        factor = self.fetch_per_quota
        if factor is not None and not (is_number(factor) and factor >= 1):
            raise ConfigError(
                f"[retrieval] fetch_per_quota must be >= 1 (a source fetches at least its "
                f"quota), got {factor!r}"
            )
        for kind, config in self.source_configs.items():
            expected = SOURCE_KINDS[kind][1] if kind in SOURCE_KINDS else None
            if expected is None or not isinstance(config, expected):
                raise ConfigError(
                    f"[retrieval] source_configs[{kind!r}] must be a "
                    f"{getattr(expected, '__name__', 'known source kind config')}, "
                    f"got {config!r}"
                )
        if not isinstance(self.index, IndexConfig):
            raise ConfigError(f"[retrieval] index must be an IndexConfig, got {self.index!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> RetrievalConfig:
        """Parse the ``[retrieval]`` table: the stage keys, ``[retrieval.quotas]``, one table per
        enabled source kind and ``[retrieval.index]``; unknown keys raise ``ConfigError``."""
        values = dict(values or {})
        per_source = {kind: values.pop(kind, None) for kind in SOURCE_KINDS}
        index = from_mapping(IndexConfig, values.pop("index", None), "retrieval.index")
        quotas = values.pop("quotas", None)
        stage = from_mapping(cls, values, "retrieval")
        configs = {
            kind: from_mapping(SOURCE_KINDS[kind][1], per_source[kind], f"retrieval.{kind}")
            for kind in stage.sources
        }
        quotas = stage.quotas if quotas is None else {**_default_quotas(), **quotas}
        return replace(stage, quotas=quotas, source_configs=configs, index=index)

    def source_config(self, kind: str) -> Any:
        """The config of source ``kind`` (its defaults when ``source_configs`` has none)."""
        return self.source_configs.get(kind) or SOURCE_KINDS[kind][1]()

    def fetch_depth(self, source: str) -> int:
        """How many candidates ``source`` fetches for each user."""
        if self.fetch_per_quota is None:
            return self.n_candidates
        return min(self.n_candidates, math.ceil(self.quotas[source] * self.fetch_per_quota))


class RetrievalStage:
    """The fitted sources of one bundle plus the merge policy.

    Learned state: ``sources_`` (name -> fitted source, in merge order), ``validation_``
    (name -> validation nDCG@10 of the source alone; empty without a validation window) and
    ``skipped_`` (name -> why a configured source was left out: :func:`skip_reason`).
    """

    def __init__(self, config: RetrievalConfig | None = None) -> None:
        self.config = config if config is not None else RetrievalConfig()
        self.sources_: dict[str, CandidateSource] = {}
        self.validation_: dict[str, float] = {}
        self.skipped_: dict[str, str] = {}

    def _make(self, kind: str) -> CandidateSource:
        cls = SOURCE_KINDS[kind][0]
        config = self.config.source_config(kind)
        if cls is TwoTowerSource:
            return TwoTowerSource(config, self.config.index, name=kind)
        source: CandidateSource = cls(config, name=kind)
        return source

    def fit(
        self,
        log: Interactions,
        catalog: ItemCatalog,
        valid: Interactions | None = None,
        *,
        progress: ProgressReporter | None = None,
    ) -> RetrievalStage:
        """Fit every configured source on ``log``; ``valid`` (same id maps) drives early stopping
        and hyperparameter choices where sources use it, and the merge order. ``progress``
        receives one stage per source fit (the two-tower's epochs inside it) and the merge
        order's validation."""
        sources: dict[str, CandidateSource] = {}
        self.skipped_ = {}
        for kind in self.config.sources:
            reason = skip_reason(kind, self.config.source_config(kind), log)
            if reason is not None:
                self.skipped_[kind] = reason
                continue
            source = self._make(kind)
            with stage(progress, f"fit {kind}"):
                if isinstance(source, TwoTowerSource):
                    source.fit(log, catalog, valid, progress=progress)
                elif isinstance(source, ItemItemSource | ALSSource):
                    source.fit(log, catalog, valid)
                else:
                    source.fit(log, catalog)
            sources[kind] = source
        if not sources:
            raise DataError(f"no retrieval source can be fitted: {self.skipped_}")
        self.sources_ = sources
        self.config = replace(self.config, sources=tuple(sources))
        self.validation_ = {}
        window = validation_window(log, valid, max_users=VALIDATION_USERS)
        if window is not None:
            depth = self.config.n_candidates if self.config.learn_quotas else VALIDATION_K
            with stage(progress, "order sources on validation"):
                batch = window.batch(log, self.config.history_length)
                lists = {
                    name: source.retrieve(batch, depth, exclude=window.seen).item_idx
                    for name, source in sources.items()
                }
                self.validation_ = {
                    name: ndcg(items, window.relevant) for name, items in lists.items()
                }
            if self.config.order_by_validation:
                self._order_by(self.validation_)
            if self.config.learn_quotas:
                with stage(progress, "learn merge quotas on validation"):
                    self._learn_quotas(lists, window.relevant)
        return self

    def _learn_quotas(
        self, lists: Mapping[str, npt.NDArray[np.int32]], relevant: sp.csr_matrix
    ) -> None:
        """Set the quotas of the fitted sources from their validation lists (merge order)."""
        names = self.source_names
        n_candidates = self.config.n_candidates
        step = max(1, n_candidates // QUOTA_STEPS)
        if step * len(names) > n_candidates:  # more sources than steps: keep the configured
            return
        ranks = relevant_ranks({name: lists[name] for name in names}, relevant)
        learned = dict(zip(names, learn_quotas(ranks, n_candidates, step), strict=True))
        self.config = replace(self.config, quotas={**self.config.quotas, **learned})

    def refit(
        self,
        log: Interactions,
        catalog: ItemCatalog,
        *,
        progress: ProgressReporter | None = None,
    ) -> RetrievalStage:
        """Fit every source but the two-tower again on ``log`` (training plus the validation
        window, same id maps), keeping the hyperparameters, merge order and validation figures
        that :meth:`fit` chose (``RetrievalConfig.refit_after_validation``)."""
        self._check_fitted()
        for name, source in self.sources_.items():
            if isinstance(source, TwoTowerSource):
                continue
            with stage(progress, f"refit {name}"):
                if isinstance(source, ItemItemSource | ALSSource):
                    self.sources_[name] = source.refit(log, catalog)
                else:
                    self.sources_[name] = self._make(name).fit(log, catalog)
        return self

    def _order_by(self, quality: Mapping[str, float]) -> None:
        """Merge the sources best first (ties keep the configured order)."""
        order = sorted(self.sources_, key=lambda name: -quality[name])
        self.config = replace(self.config, sources=tuple(order))
        self.sources_ = {name: self.sources_[name] for name in order}

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(self.sources_)

    def retrieve_each(
        self, users: UserBatch, k: int, *, exclude: sp.csr_matrix | None = None
    ) -> dict[str, Candidates]:
        """Top-``k`` from every source separately (for evaluation and for the merger)."""
        self._check_fitted()
        return {
            name: source.retrieve(users, k, exclude=exclude)
            for name, source in self.sources_.items()
        }

    def warm(self, users: UserBatch) -> None:
        """Precompute what sources keep across requests (two-tower user vectors of ``users``,
        the ALS fold-in's Gram matrix), so no request pays for it."""
        self._check_fitted()
        for source in self.sources_.values():
            if isinstance(source, WarmableSource):
                source.warm(users)

    def retrieve(
        self,
        users: UserBatch,
        *,
        exclude: sp.csr_matrix | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> MergedCandidates:
        """Merged, deduplicated candidates (``n_candidates`` per user) with provenance.

        should_stop: asked before each source; ``True`` raises :class:`RetrievalAbandonedError`. A
            caller that has given up waiting (a latency budget ran out) so stops the work it
            will discard, instead of letting it compete with the next requests for the CPU.
        """
        self._check_fitted()
        quotas = {name: self.config.quotas[name] for name in self.sources_}
        # Each source fetches enough to fill its quota and to help fill the merged list.
        per_source = {}
        for name, source in self.sources_.items():
            if should_stop is not None and should_stop():
                raise RetrievalAbandonedError(f"stopped before source {name!r}: the caller gave up")
            depth = self.config.fetch_depth(name)
            per_source[name] = source.retrieve(users, depth, exclude=exclude)
        return merge_candidates(per_source, quotas, self.config.n_candidates)

    def observe(
        self, item_idx: npt.ArrayLike, timestamps: npt.ArrayLike, weights: npt.ArrayLike
    ) -> list[str]:
        """Fold live events (item indices, seconds UTC, weights) into the sources that follow the
        event stream between retrains (trending); returns their names. Per-user state is the
        online state's job; model weights wait for the next retrain."""
        self._check_fitted()
        updated = []
        for name, source in self.sources_.items():
            if isinstance(source, ObservingSource):
                source.observe(item_idx, timestamps, weights)
                updated.append(name)
        return updated

    @property
    def online_step(self) -> int:
        """Online steps published on the sources' weights (0: the weights as trained)."""
        return max((getattr(s, "online_step_", 0) for s in self.sources_.values()), default=0)

    def add_items(
        self, item_idx: npt.ArrayLike, catalog: ItemCatalog, *, now: int | None = None
    ) -> list[str]:
        """Make new (or changed) items retrievable now, without a retrain or a restart.

        ``catalog`` is the current catalogue (its id map extends the bundle's). Sources that embed
        items from features (two-tower) add them to their live index; the others learn about an
        item only from interactions (ALS at retrain, co-visitation and trending from feedback).
        Returns the names of the sources that took the items.
        """
        self._check_fitted()
        updated = []
        for name, source in self.sources_.items():
            if isinstance(source, TwoTowerSource):
                source.add_items(item_idx, catalog, now=now)
                updated.append(name)
        return updated

    def _check_fitted(self) -> None:
        if not self.sources_:
            raise NotFittedError("RetrievalStage is not fitted: call fit() or load() first")

    # ---------------------------------------------------------------------------- persistence
    def save(self, directory: Path) -> None:
        self._check_fitted()
        directory.mkdir(parents=True, exist_ok=True)
        nested = ("source_configs", "index")  # written under "sources" and "index"
        stage_keys = {k: v for k, v in to_mapping(self.config).items() if k not in nested}
        meta = {
            "config": stage_keys | {"quotas": dict(self.config.quotas)},
            "index": to_mapping(self.config.index),
            "sources": {
                name: {"kind": name, "config": to_mapping(self.config.source_config(name))}
                for name in self.sources_
            },
            "validation_ndcg@10": self.validation_,
            "skipped": self.skipped_,
        }
        (directory / STAGE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        for name, source in self.sources_.items():
            source.save(directory / name)

    @classmethod
    def load(cls, directory: Path, *, mmap: bool = False) -> RetrievalStage:
        """Read a stage written by :meth:`save` (``BundleError`` if it is not one).

        mmap: map the two-tower sources' weights and index from their files (read-only: shared
        by the serving processes of one machine through the page cache; ``add_items`` raises).
        """
        path = directory / STAGE_FILE
        if not path.is_file():
            raise BundleError(f"{directory}: {STAGE_FILE} is missing (not a retrieval stage)")
        meta = json.loads(path.read_text())
        config_values = dict(meta["config"])
        # A bundle from before the setting fetched n_candidates from every source; its ranker
        # learned from those lists, so it keeps them.
        config_values.setdefault("fetch_per_quota", None)
        source_configs = {
            name: from_mapping(SOURCE_KINDS[spec["kind"]][1], spec["config"], f"retrieval.{name}")
            for name, spec in meta["sources"].items()
        }
        config = replace(
            from_mapping(RetrievalConfig, config_values, "retrieval"),
            source_configs=source_configs,
            index=from_mapping(IndexConfig, meta["index"], "retrieval.index"),
        )
        stage = cls(config)
        # Merge priority is the configured order (the JSON file's key order is not meaningful).
        stage.sources_ = {}
        for name in stage.config.sources:
            source_cls = SOURCE_KINDS[meta["sources"][name]["kind"]][0]
            stage.sources_[name] = (
                source_cls.load(directory / name, mmap=True)
                if mmap and source_cls in (TwoTowerSource, ALSSource)
                else source_cls.load(directory / name)
            )
        stage.validation_ = {k: float(v) for k, v in meta.get("validation_ndcg@10", {}).items()}
        stage.skipped_ = {str(k): str(v) for k, v in meta.get("skipped", {}).items()}
        return stage
