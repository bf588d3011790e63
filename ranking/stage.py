"""The ranking stage: a feature store plus a trained ranker, scoring merged candidates.

Training (:meth:`RankingStage.fit`) follows the funnel:

1. fit a :class:`~ranking.features.FeatureStore` with ``as_of = cut`` (the first label event),
2. build the training set (:func:`~ranking.training_set.build_training_set`): the retrieval
   stage's candidates for each label-window user, labelled by the label window,
3. split it by user (seeded) and train the ranker, early-stopping on the held-out users,
4. refit the feature store, same code, as of the end of ``feature_log_for_serving`` (e.g.
   train + valid), the freshest tables serving can have.

Serving (:meth:`RankingStage.score`) assembles the features with the same function and returns
one score per merged candidate. What ``recsys train`` stores under the bundle's ``ranking/``:
``ranking.json`` (config and training summary), ``store/`` (parquet + npz tables) and
``model/`` (LightGBM text model or a DNN ``state_dict``, curves, importance). No pickle.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, Self, get_args

import numpy as np
import numpy.typing as npt

from data.catalog import ItemCatalog
from data.configuration import from_mapping, to_mapping
from data.errors import BundleError, DataError, NotFittedError
from data.interactions import Interactions
from data.progress import ProgressReporter, stage
from data.validation import finite_float, fraction, one_of
from ranking.blend import KIND as BLEND
from ranking.blend import Z_SUFFIX, BlendConfig, BlendRanker
from ranking.dnn import DNNConfig, DNNRanker
from ranking.features import (
    FeatureConfig,
    FeatureMatrix,
    FeatureStore,
    assemble,
    check_feature_names,
    feature_names,
)
from ranking.lgbm import LightGBMConfig, LightGBMRanker
from ranking.training_set import (
    TrainingSet,
    TrainingSetConfig,
    build_training_set,
    group_ndcg,
    label_cut,
    split_groups,
)
from retrieval.base import UserBatch
from retrieval.merge import MergedCandidates, merge_order_scores
from retrieval.stage import RetrievalStage

RankerKind = Literal["lightgbm", "dnn"]
STAGE_FILE = "ranking.json"
STORE_DIR = "store"
MODEL_DIR = "model"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class RankingConfig:
    """The ``[ranking]`` table.

    model: ``"lightgbm"`` (LambdaRank trees, the default: strong on tabular features, fast to
        serve) or ``"dnn"`` (an MLP with a listwise loss).
    valid_fraction: share of the training users held out for early stopping (user-disjoint).
    split_seed: seed of that split.
    min_lift: the ranker serves only if its nDCG on those held-out users beats the retrieval
        order's (the merged list, best source first) on the same rows by this relative margin;
        otherwise the pipeline keeps the retrieval order, and the report shows both. A ranker
        that adds nothing costs latency and, on small logs, often quality (the held-out users
        also chose its early-stopping round, so a small margin guards that optimism). ``None``
        serves the ranker whatever it scores.
    rank_users_without_history: rank the candidates of a user with no event at all (a new
        user) too. Off by default: such a user gives the ranker nothing personal to order by,
        it learned from users who had history (where popularity means "already seen"), and
        the merge order, led by the trending and cold-start sources for that user, served new
        users better (``docs/benchmarks.md``, "Measurements behind the defaults").
    features, training, lightgbm, dnn, blend: the sub-tables ``[ranking.features]`` etc.
    """

    model: RankerKind = "lightgbm"
    valid_fraction: float = 0.2
    split_seed: int = 0
    min_lift: float | None = 0.01
    rank_users_without_history: bool = False
    features: FeatureConfig = field(default_factory=FeatureConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    training: TrainingSetConfig = field(default_factory=TrainingSetConfig)
    lightgbm: LightGBMConfig = field(default_factory=LightGBMConfig)
    dnn: DNNConfig = field(default_factory=DNNConfig)

    def __post_init__(self) -> None:
        one_of(self.model, "[ranking] model", get_args(RankerKind))
        fraction(self.valid_fraction, "[ranking] valid_fraction", high_open=True)
        if self.min_lift is not None:
            finite_float(self.min_lift, "[ranking] min_lift")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> RankingConfig:
        """Parse the ``[ranking]`` table (unknown keys raise ``ConfigError`` naming them)."""
        values = dict(values or {})
        subs = {
            name: from_mapping(sub_cls, values.pop(name, None), f"ranking.{name}")
            for name, sub_cls in _SUB_TABLES.items()
        }
        return from_mapping(cls, {**values, **subs}, "ranking")

    def to_mapping(self) -> dict[str, Any]:
        """The TOML/JSON-friendly nested form that :meth:`from_mapping` reads back."""
        out: dict[str, Any] = {
            "model": self.model,
            "valid_fraction": self.valid_fraction,
            "split_seed": self.split_seed,
            "min_lift": self.min_lift,
        }
        for name in _SUB_TABLES:
            out[name] = to_mapping(getattr(self, name))
        return out


_SUB_TABLES: Mapping[str, type[Any]] = {
    "features": FeatureConfig,
    "training": TrainingSetConfig,
    "lightgbm": LightGBMConfig,
    "dnn": DNNConfig,
    "blend": BlendConfig,
}


class RankingModel(Protocol):
    """What :class:`RankingStage` needs of a ranking model (``LightGBMRanker``, ``DNNRanker``)."""

    feature_names_: tuple[str, ...]

    def fit(
        self,
        train: TrainingSet,
        valid: TrainingSet | None = None,
        *,
        progress: ProgressReporter | None = None,
    ) -> RankingModel: ...

    def predict(self, values: npt.ArrayLike) -> npt.NDArray[np.float32]: ...

    def warm(self) -> None: ...

    def save(self, directory: Path) -> None: ...


class RankingStage:
    """Feature store + ranker (see the module docstring).

    Learned state (after :meth:`fit` or :meth:`load`):
        store_:   the serving :class:`FeatureStore` (as of the end of the serving log).
        ranker_:  the model the stage scores with: the trained forest (or DNN), or the score
                  blend when it ordered the held-out users better (:meth:`_select`).
        summary_: {name: value} training-set counts, cut, validation NDCG of the ranker and of
                  the retrieval order (for reports).
        selected_: whether the pipeline serves the ranker (``RankingConfig.min_lift``).
    """

    store_: FeatureStore
    ranker_: RankingModel
    summary_: dict[str, float]
    selected_: bool

    def __init__(self, config: RankingConfig | None = None) -> None:
        self.config = config if config is not None else RankingConfig()

    def fit(
        self,
        retrieval_stage: RetrievalStage,
        history_log: Interactions,
        label_log: Interactions,
        catalog: ItemCatalog,
        feature_log_for_serving: Interactions,
        *,
        progress: ProgressReporter | None = None,
    ) -> Self:
        """Train the ranker on the label window, then build the serving feature store.

        history_log: what the retrieval stage was trained on (events before the label window);
        label_log: the label window (same id maps); catalog: aligned with the item map;
        feature_log_for_serving: the log whose end the serving features describe (same id maps),
        typically history + label window; progress: receives the stages (training set, ranker
        with its rounds or epochs, serving features).
        """
        config = self.config
        if len(label_log) == 0:
            raise DataError("RankingStage.fit: the label log is empty")
        with stage(progress, "ranker training set"):
            cut = label_cut(history_log, label_log)
            training_store = FeatureStore(config.features).fit(history_log, catalog, as_of=cut)
            training = build_training_set(
                retrieval_stage, training_store, history_log, label_log, catalog, config.training
            )
        train, valid = split_groups(training, config.valid_fraction, config.split_seed)
        ranker: RankingModel = (
            LightGBMRanker(config.lightgbm) if config.model == "lightgbm" else DNNRanker(config.dnn)
        )
        with stage(progress, f"train ranker ({config.model})"):
            ranker.fit(train, valid, progress=progress)
        summary = {f"training_{k}": v for k, v in training.describe().items()}
        summary["cut"] = float(cut)
        selected = True
        if valid is not None:
            k = config.lightgbm.eval_at if config.model == "lightgbm" else config.dnn.eval_at
            ranker, selected = self._select(ranker, train, valid, k, summary, progress)
        summary["selected"] = float(selected)
        if len(feature_log_for_serving) == 0:
            raise DataError("RankingStage.fit: feature_log_for_serving is empty")
        serving_as_of = int(feature_log_for_serving.timestamp[-1]) + 1  # include the last event
        with stage(progress, "ranker serving features"):
            self.store_ = FeatureStore(config.features).fit(
                feature_log_for_serving, catalog, as_of=serving_as_of
            )
        self.ranker_, self.summary_, self.selected_ = ranker, summary, selected
        return self

    def _select(
        self,
        forest: RankingModel,
        train: TrainingSet,
        valid: TrainingSet,
        k: int,
        summary: dict[str, float],
        progress: ProgressReporter | None,
    ) -> tuple[RankingModel, bool]:
        """The served model and whether it is served, judged on the held-out users.

        Three orders compete on ``valid``'s groups, on the rows retrieval returned (the missed
        positives a training set appends are never in a served list, and a model that finds them
        there would look better than it serves): the merged retrieval order, the score blend
        (:class:`BlendRanker`, fitted on ``train``'s groups) and the trained ``forest``. The
        forest serves only if it beats both others by ``min_lift`` (it also chose its early
        stopping round on these users); otherwise the blend, if it beats the merged order;
        otherwise the merged order (the forest is kept for reports). Figures go to ``summary``.
        """
        config = self.config
        valid = valid.retrieved_only()

        def held_out_ndcg(scores: npt.NDArray[np.floating]) -> float:
            return float(np.nanmean(group_ndcg(scores, valid.labels, valid.groups, k)))

        ranked = held_out_ndcg(forest.predict(valid.values))
        in_order = held_out_ndcg(-valid.values[:, valid.names.index("merged_position")])
        summary[f"valid_ndcg@{k}"] = ranked
        summary[f"valid_ndcg@{k}_retrieval_order"] = in_order
        if config.min_lift is None:
            return forest, True
        blended = -np.inf
        blend: BlendRanker | None = None
        if any(name.endswith(Z_SUFFIX) for name in train.names):
            with stage(progress, "score blend"):
                blend = BlendRanker(replace(config.blend, eval_at=k)).fit(train)
            blended = held_out_ndcg(blend.predict(valid.values))
            summary[f"valid_ndcg@{k}_blend"] = blended
        if ranked > max(in_order, blended) * (1.0 + config.min_lift):
            return forest, True
        if blend is not None and blended > in_order:
            return blend, True
        return forest, False

    def features(
        self,
        retrieval_stage: RetrievalStage,
        users: UserBatch,
        merged: MergedCandidates,
        now: npt.ArrayLike | None = None,
    ) -> FeatureMatrix:
        """The (n, m, F) features the ranker scores (for explanations and drift monitors)."""
        self._check_fitted()
        check_feature_names(
            self.ranker_.feature_names_,
            feature_names(self.store_, merged.sources),
            "RankingStage",
        )
        return assemble(self.store_, retrieval_stage, users, merged, now)

    def score(
        self,
        retrieval_stage: RetrievalStage,
        users: UserBatch,
        merged: MergedCandidates,
        now: npt.ArrayLike | None = None,
    ) -> npt.NDArray[np.float32]:
        """(n, m) float32 ranker scores of the merged candidates; -inf at padding.

        ``now``: (n,) request times, default ``users.now``. Higher is better; sort each row by
        it to rank. Users without history keep the merge order unless
        ``RankingConfig.rank_users_without_history``.
        """
        matrix = self.features(retrieval_stage, users, merged, now)
        scores = np.full(matrix.valid.shape, -np.inf, dtype=np.float32)
        scores[matrix.valid] = self.ranker_.predict(matrix.rows())
        if not self.config.rank_users_without_history:
            new_users = ~users.has_history
            if new_users.any():
                scores[new_users] = merge_order_scores(merged.item_idx[new_users])
        return scores

    def warm(self) -> None:
        """Get ready to serve: what the ranker does before its first request (LightGBM compiles
        its trees). The service, offline evaluation and the simulator call it once a bundle is
        loaded; the stage also scores without it, only more slowly."""
        self._check_fitted()
        self.ranker_.warm()

    def with_catalog(self, catalog: ItemCatalog) -> RankingStage:
        """A stage with the same ranker whose feature store describes ``catalog``'s items (new
        items served before the next retrain; see :meth:`FeatureStore.with_items`)."""
        self._check_fitted()
        stage = RankingStage(self.config)
        stage.store_ = self.store_.with_items(catalog)
        stage.ranker_, stage.summary_, stage.selected_ = self.ranker_, self.summary_, self.selected_
        return stage

    def _check_fitted(self) -> None:
        if not hasattr(self, "ranker_"):
            raise NotFittedError("RankingStage is not fitted: call fit() or load() first")

    # ---------------------------------------------------------------------------- persistence
    @property
    def model_kind(self) -> str:
        """``"blend"`` when the score blend won the held-out users, else the configured model."""
        return BLEND if isinstance(self.ranker_, BlendRanker) else self.config.model

    def save(self, directory: Path) -> None:
        """Write ``store/``, ``model/``, then ``ranking.json``."""
        self._check_fitted()
        directory.mkdir(parents=True, exist_ok=True)
        self.store_.save(directory / STORE_DIR)
        self.ranker_.save(directory / MODEL_DIR)
        meta = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_mapping(),
            "summary": self.summary_,
            "model_kind": self.model_kind,
        }
        (directory / STAGE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path) -> RankingStage:
        """Read a directory written by :meth:`save`; ``BundleError`` if missing or corrupt."""
        path = directory / STAGE_FILE
        if not path.is_file():
            raise BundleError(f"{directory}: {STAGE_FILE} is missing (not a ranking stage)")
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BundleError(f"{directory}: unreadable {STAGE_FILE} ({exc})") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{directory}: ranking stage format {meta.get('format_version')!r}, "
                f"expected {FORMAT_VERSION}"
            )
        config = dict(meta["config"])
        # Bundles ranked without the standardised scores (and without the item-item source).
        config["features"] = {
            "normalized_scores": False,
            "model_scores": ["two_tower", "als"],
            **config.get("features", {}),
        }
        stage = cls(RankingConfig.from_mapping(config))
        stage.store_ = FeatureStore.load(directory / STORE_DIR)
        model_dir = directory / MODEL_DIR
        loaders: dict[str, Callable[[Path], RankingModel]] = {
            "lightgbm": LightGBMRanker.load,
            "dnn": DNNRanker.load,
            BLEND: BlendRanker.load,
        }
        kind = meta.get("model_kind", stage.config.model)
        if kind not in loaders:
            raise BundleError(f"{directory}: unknown ranking model kind {kind!r}")
        stage.ranker_ = loaders[kind](model_dir)
        stage.summary_ = {k: float(v) for k, v in meta["summary"].items()}
        stage.selected_ = bool(stage.summary_.get("selected", 1.0))  # older bundles: served
        return stage
