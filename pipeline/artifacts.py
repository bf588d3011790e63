"""Train the stages into a bundle, and load a verified bundle back as ``Artifacts``.

``recsys train`` calls :func:`train_bundle`; the pipeline, the evaluator and the simulator call
:func:`load_artifacts`, which verifies the manifest before reading anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from data.catalog import ItemCatalog
from data.configuration import load_toml
from data.dataset import Dataset, load_dataset
from data.errors import BundleError, ConfigError
from data.idmap import IdMap
from data.interactions import Interactions
from data.progress import ProgressReporter, StageLog, stage
from data.schema import INTERACTION_SCHEMA, ITEM_ID, TIMESTAMP, USER_ID
from pipeline.bundle import bundle_writer, verify_bundle
from ranking.stage import RankingConfig, RankingStage
from reranking.config import RerankerConfig
from retrieval.stage import RetrievalConfig, RetrievalStage

USERS_MAP = "ids/users.parquet"
ITEMS_MAP = "ids/items.parquet"
CATALOG = "catalog/items.parquet"
# Every train + valid event on the bundle's items, as it was when the bundle was trained: the
# online state's starting point, so a served bundle knows each user's recent history and every
# item they have seen without the dataset (the same state the offline evaluator builds).
HISTORY = "state/history.parquet"
RETRIEVAL_DIR = "retrieval"
RANKING_DIR = "ranking"
# Wall seconds of each training stage: diagnostics, left out of model_version (pipeline/bundle.py).
TIMINGS = "timings.json"
KNOWN_SECTIONS = ("retrieval", "ranking", "reranking")


@dataclass(frozen=True, eq=False)
class Artifacts:
    """Everything a pipeline needs, loaded from one verified bundle."""

    path: Path
    manifest: dict[str, Any]
    users: IdMap
    items: IdMap
    catalog: ItemCatalog
    retrieval: RetrievalStage
    # None for a bundle trained without a validation window: the pipeline keeps merge order.
    ranking: RankingStage | None = None

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])


@dataclass(frozen=True, eq=False)
class TrainingData:
    """What every stage trains on: the dataset, its id maps, the train and valid logs in index
    space (``valid_log`` None without a validation window) and the item catalogue."""

    dataset: Dataset
    users: IdMap
    items: IdMap
    log: Interactions
    valid_log: Interactions | None
    catalog: ItemCatalog


def prepare_training_data(data_dir: str | Path) -> TrainingData:
    """Load the dataset and index its train and valid splits (deterministic: the ranks of a
    distributed run each call it and hold the same arrays)."""
    dataset = load_dataset(data_dir)
    train, valid = dataset.splits["train"], dataset.splits["valid"]
    users = IdMap.from_ids(train[USER_ID])
    # Items listed in the catalogue but never trained on still get an index: the item tower embeds
    # them from their features, so they are retrievable from day one.
    catalog_ids = (
        dataset.items[ITEM_ID] if dataset.items is not None else pl.Series([], dtype=pl.String)
    )
    items = IdMap.from_ids(pl.concat([train[ITEM_ID], catalog_ids.cast(pl.String)]))
    log = Interactions.from_frame(train, users=users, items=items)
    valid_log = (
        Interactions.from_frame(valid, users=users, items=items, drop_unknown=True)
        if valid.height
        else None
    )
    catalog = ItemCatalog.from_frame(dataset.items, items)
    return TrainingData(dataset, users, items, log, valid_log, catalog)


def retrieval_section(config: dict[str, Any], device: str | None) -> dict[str, Any]:
    """The config's ``[retrieval]`` table, with ``device`` (if given) as the two-tower's."""
    values = dict(config.get("retrieval", {}))
    if device is not None:
        values["two_tower"] = {**values.get("two_tower", {}), "device": device}
    return values


def train_bundle(
    data_dir: str | Path,
    out: str | Path,
    *,
    config: dict[str, Any] | None = None,
    device: str | None = None,
    progress: ProgressReporter | None = None,
) -> dict[str, Any]:
    """Train every stage on the dataset's train split (valid split for early stopping).

    Returns the bundle manifest. ``config`` is the parsed TOML (``None`` = all defaults);
    ``device`` overrides ``[retrieval.two_tower] device``; ``progress`` receives each stage
    (loading, each source's fit, the ranker's, writing), the two-tower's epochs and the ranker's
    boosting rounds. The bundle's ``timings.json`` keeps each stage's wall seconds.
    """
    config = dict(config or {})
    unknown = sorted(set(config) - set(KNOWN_SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; known: {list(KNOWN_SECTIONS)}")
    retrieval_values = retrieval_section(config, device)
    retrieval_config = RetrievalConfig.from_mapping(retrieval_values)
    ranking_config = RankingConfig.from_mapping(config.get("ranking"))
    # Validated now, so a bad rule fails the training run, not the first request.
    reranking = RerankerConfig.from_mapping(config.get("reranking")).to_mapping()

    stages = StageLog(progress)
    with stage(stages, "load dataset"):
        data = prepare_training_data(data_dir)
    dataset, users, items, log = data.dataset, data.users, data.items, data.log
    valid_log, catalog = data.valid_log, data.catalog
    train, valid = dataset.splits["train"], dataset.splits["valid"]
    retrieval = RetrievalStage(retrieval_config).fit(log, catalog, valid_log, progress=stages)
    # The ranker learns from the funnel as it will see it: candidates from retrieval fitted on
    # train, labels from the valid window after it; its feature tables are then refreshed as of
    # the end of train + valid for serving (same code, later as-of time).
    ranking = None
    if valid_log is not None and len(valid_log):
        serving_log = Interactions.from_frame(
            pl.concat([train, valid]), users=users, items=items, drop_unknown=True
        )
        ranking = RankingStage(ranking_config).fit(
            retrieval, log, valid_log, catalog, serving_log, progress=stages
        )
        if retrieval_config.refit_after_validation:
            retrieval.refit(serving_log, catalog, progress=stages)

    full_config = {
        "retrieval": retrieval_values,
        "ranking": ranking_config.to_mapping(),
        "reranking": reranking,
        "data": {"path": str(data_dir)},
    }
    with (
        stage(stages, "write bundle"),
        bundle_writer(
            out, config=full_config, dataset_fingerprint=dataset.meta["fingerprint"]
        ) as staging,
    ):
        (staging / "ids").mkdir()
        users.to_frame().write_parquet(staging / USERS_MAP)
        items.to_frame().write_parquet(staging / ITEMS_MAP)
        (staging / "catalog").mkdir()
        if dataset.items is not None:
            dataset.items.write_parquet(staging / CATALOG)
        retrieval.save(staging / RETRIEVAL_DIR)
        if ranking is not None:
            ranking.save(staging / RANKING_DIR)
        (staging / "state").mkdir()
        history = pl.concat([train, valid]) if valid.height else train
        # All of it, not each user's latest history_length events: the seen set that keeps
        # old items out of recommendations needs every event.
        known = items.index(history[ITEM_ID], allow_unknown=True) >= 0
        history.filter(pl.Series(known)).sort(TIMESTAMP, maintain_order=True).write_parquet(
            staging / HISTORY
        )
        # The stages so far: training's share of the time (writing is still under way).
        timings = {"stage_seconds": stages.seconds}
        (staging / TIMINGS).write_text(json.dumps(timings, indent=2) + "\n")
    with stage(stages, "verify bundle"):
        return verify_bundle(out)


def load_history(artifacts: Artifacts) -> pl.DataFrame:
    """The bundle's history snapshot (empty for a bundle written without one)."""
    path = artifacts.path / HISTORY
    return pl.read_parquet(path) if path.is_file() else pl.DataFrame(schema=INTERACTION_SCHEMA)


def load_config_file(path: str | Path | None) -> dict[str, Any]:
    return {} if path is None else load_toml(path)


def load_artifacts(path: str | Path, *, mmap: bool = False) -> Artifacts:
    """Verify the bundle at ``path`` against its manifest, then load it (``BundleError`` if bad).

    mmap: map the two-tower weights and index from the bundle's files too (the sources' arrays
    always are; see ``retrieval.state_io.read_state``), so that the serving workers of one machine
    share them through the page cache. The mapped index is read-only: ``add_items`` raises.
    """
    bundle = Path(path)
    manifest = verify_bundle(bundle)
    try:
        users = IdMap.from_frame(pl.read_parquet(bundle / USERS_MAP))
        items = IdMap.from_frame(pl.read_parquet(bundle / ITEMS_MAP))
        catalog_frame = pl.read_parquet(bundle / CATALOG) if (bundle / CATALOG).is_file() else None
        catalog = ItemCatalog.from_frame(catalog_frame, items)
        retrieval = RetrievalStage.load(bundle / RETRIEVAL_DIR, mmap=mmap)
        ranking = (
            RankingStage.load(bundle / RANKING_DIR) if (bundle / RANKING_DIR).is_dir() else None
        )
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(f"bundle {str(bundle)!r} could not be loaded: {exc}") from exc
    return Artifacts(bundle, manifest, users, items, catalog, retrieval, ranking)
