"""``LightGBMRanker``: gradient-boosted trees with the LambdaRank objective (the default ranker).

LambdaRank (Burges, "From RankNet to LambdaRank to LambdaMART: An Overview", 2010) weighs every
pair of rows in a group by how much swapping them would change NDCG, so the trees learn the order
that the top of the list needs, not a calibrated probability. Groups are users; early stopping
watches NDCG@``eval_at`` on a user-disjoint validation slice.

Saved as LightGBM's own text model (``model_to_string`` / ``Booster(model_str=...)``) plus a JSON
document with the config, feature names, best iteration and gain importance: no pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from data.configuration import from_mapping, to_mapping
from data.errors import BundleError, DataError, NotFittedError
from data.progress import ProgressReporter, StageSteps, stage
from data.validation import boolean, fraction, non_negative_float, non_negative_int, positive_int
from ranking.compiled_forest import CompiledForest, compile_forest
from ranking.training_set import TrainingSet, write_curves

MODEL_FILE = "model.txt"
META_FILE = "ranker.json"
IMPORTANCE_FILE = "importance.json"
KIND = "lightgbm"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LightGBMConfig:
    """Hyperparameters of :class:`LightGBMRanker` (LightGBM's names where they exist).

    num_leaves: leaves per tree. 15, not LightGBM's 31: a tree's serving cost grows with its
        depth, and on the default dataset 15 leaves ranked as well as 31 (overlapping
        intervals of pipeline NDCG@10).
    learning_rate: shrinkage per tree (LightGBM's default 0.1). Serving cost grows with the
        number of trees: on the default dataset 0.05 stopped at about three times as many trees
        as 0.1, with the same pipeline NDCG@10. Figures: ``docs/benchmarks.md``, "Measurements
        behind the defaults".
    max_rounds: boosting rounds at most (early stopping usually ends sooner).
    early_stopping_rounds: stop when validation NDCG has not improved for this many rounds;
        the best round's trees are kept. Ignored without a validation set.
    min_data_in_leaf: rows per leaf at least; 50 keeps leaves from fitting one user's quirks.
    feature_fraction: share of features each tree sees (decorrelates trees, like a forest).
    lambda_l2: L2 penalty on leaf values.
    eval_at: K of NDCG@K, the early-stopping metric and the training curves.
    truncation_level: LambdaRank considers pairs involving the top ``truncation_level`` rows
        of each group; 20 covers NDCG@10 with a margin (LightGBM's default is 30).
    num_threads: training threads; 0 = LightGBM's default (OpenMP: one per core).
    predict_threads: threads per ``predict`` call; 1 is fastest for a single request's few
        hundred rows (thread start-up costs more than it saves) and lets a server run one
        request per core.
    compiled: serve from machine code compiled from the trees (``ranking/compiled_forest.py``)
        once :meth:`LightGBMRanker.warm` has run: the same scores, 6-12x less CPU per request
        (docs/benchmarks.md).
        Off, or if compiling fails, LightGBM scores every row.
    deterministic: same data + seed -> the same model (LightGBM's ``deterministic`` with
        row-wise histograms forced, as its docs require); a little slower.
    seed: LightGBM's master seed (feature sub-sampling).
    monotone: constrain the features whose direction is known (:func:`monotone_direction`): a
        better rank in a source's list or in the merged list never lowers a candidate's score,
        and neither does a higher model score. On small logs the trees otherwise learn
        wiggles in those features that do not hold out (Last.fm validation nDCG@10 +0.003 with
        the constraints, ``docs/benchmarks.md``, quality section).
    """

    num_leaves: int = 15
    learning_rate: float = 0.1
    max_rounds: int = 300
    early_stopping_rounds: int = 30
    min_data_in_leaf: int = 50
    feature_fraction: float = 0.9
    lambda_l2: float = 1.0
    eval_at: int = 10
    truncation_level: int = 20
    num_threads: int = 0
    predict_threads: int = 1
    compiled: bool = True
    deterministic: bool = True
    seed: int = 0
    monotone: bool = True

    def __post_init__(self) -> None:
        positive = ("num_leaves", "max_rounds", "early_stopping_rounds", "min_data_in_leaf",
                    "eval_at", "truncation_level", "predict_threads")  # fmt: skip
        for name in positive:
            positive_int(getattr(self, name), f"LightGBMConfig.{name}")
        for name in ("compiled", "deterministic", "monotone"):
            boolean(getattr(self, name), f"LightGBMConfig.{name}")
        non_negative_int(self.num_threads, "LightGBMConfig.num_threads")
        for name in ("learning_rate", "feature_fraction"):
            fraction(getattr(self, name), f"LightGBMConfig.{name}", low_open=True)
        non_negative_float(self.lambda_l2, "LightGBMConfig.lambda_l2", finite=False)

    def train_params(self) -> dict[str, Any]:
        """The LightGBM parameter dict for training."""
        return {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [self.eval_at],
            "lambdarank_truncation_level": self.truncation_level,
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "lambda_l2": self.lambda_l2,
            "num_threads": self.num_threads,
            "deterministic": self.deterministic,
            "force_row_wise": self.deterministic,
            "seed": self.seed,
            "verbosity": -1,
        }


def monotone_direction(feature: str) -> int:
    """-1 for rank features (smaller is better), +1 for model scores (larger is better), 0 for
    everything else (left free)."""
    if feature == "merged_position" or (feature.startswith("src_") and feature.endswith("_rank")):
        return -1
    if feature.endswith(("_score", "_score_z")):
        return 1
    return 0


class LightGBMRanker:
    """LambdaRank gradient-boosted trees over the assembled features.

    Learned state (after :meth:`fit` or :meth:`load`):
        booster_:        the ``lightgbm.Booster``, holding only the kept (best) trees.
        feature_names_:  (F,) names of the columns ``predict`` expects, in order.
        best_iteration_: number of trees kept.
        curves_:         {"train": [...], "valid": [...]} NDCG@eval_at per round.
        importance_:     {feature: total gain of its splits in the kept trees}.
        compiled_:       the booster compiled for serving (:meth:`warm`), or ``None``.
    """

    booster_: lgb.Booster
    feature_names_: tuple[str, ...]
    best_iteration_: int
    curves_: dict[str, list[float]]
    importance_: dict[str, float]

    def __init__(self, config: LightGBMConfig | None = None) -> None:
        self.config = config if config is not None else LightGBMConfig()
        self.compiled_: CompiledForest | None = None
        self._compile_tried = False

    def fit(
        self,
        train: TrainingSet,
        valid: TrainingSet | None = None,
        *,
        progress: ProgressReporter | None = None,
    ) -> Self:
        """Boost on ``train``; early-stop on ``valid`` NDCG@eval_at (None: ``max_rounds``).

        ``progress`` receives each boosting round with its train / valid NDCG@eval_at."""
        if train.n_rows == 0:
            raise DataError("LightGBMRanker.fit: the training set is empty")
        if valid is not None and valid.names != train.names:
            raise DataError("train and valid sets have different feature names")
        config = self.config
        params = config.train_params()
        if config.monotone:
            directions = [monotone_direction(name) for name in train.names]
            if any(directions):
                params["monotone_constraints"] = directions
                params["monotone_constraints_method"] = "advanced"
        names = [_safe_name(name) for name in train.names]
        train_data = _dataset(train, names, params)
        sets, set_names = [train_data], ["train"]
        callbacks: list[Any] = []
        if valid is not None and valid.n_rows:
            sets.append(_dataset(valid, names, params, reference=train_data))
            set_names.append("valid")
            callbacks.append(
                lgb.early_stopping(
                    config.early_stopping_rounds, first_metric_only=True, verbose=False
                )
            )
        history: dict[str, dict[str, list[float]]] = {}
        callbacks.append(lgb.record_evaluation(history))
        with stage(progress, "lightgbm rounds", total=config.max_rounds) as rounds:
            callbacks.append(_ReportRound(rounds))
            booster = lgb.train(
                params,
                train_data,
                num_boost_round=config.max_rounds,
                valid_sets=sets,
                valid_names=set_names,
                callbacks=callbacks,
            )
        best = booster.best_iteration if booster.best_iteration > 0 else booster.current_iteration()
        metric = f"ndcg@{config.eval_at}"
        self.curves_ = {name: list(map(float, values[metric])) for name, values in history.items()}
        # Rebuild from the text model holding only the kept trees: the in-memory model is then
        # exactly what save() writes and load() reads, and the training data is released.
        self.booster_ = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
        self.compiled_, self._compile_tried = None, False
        self.best_iteration_ = int(best)
        self.feature_names_ = train.names
        gains = self.booster_.feature_importance(importance_type="gain")
        self.importance_ = {
            name: float(gain) for name, gain in zip(train.names, gains, strict=True)
        }
        return self

    def predict(self, values: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """(N,) float32 scores of rows ``values`` (N, F) (higher ranks first); NaN = missing."""
        self._check_fitted()
        rows = np.asarray(values, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != len(self.feature_names_):
            raise DataError(
                f"predict: values have shape {rows.shape}, expected (N, {len(self.feature_names_)})"
            )
        if rows.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        forest = self.compiled_
        if forest is not None:
            return forest.predict(rows).astype(np.float32)
        scores = self.booster_.predict(rows, num_threads=self.config.predict_threads)
        return np.asarray(scores, dtype=np.float32)

    def warm(self) -> None:
        """Get ready to serve: compile the trees (``config.compiled``; seconds for a large model
        the first time on a machine, then cached). Idempotent."""
        self._check_fitted()
        if self.config.compiled and not self._compile_tried:
            self._compile_tried = True
            self.compiled_ = compile_forest(self.booster_, threads=self.config.predict_threads)

    def _check_fitted(self) -> None:
        if not hasattr(self, "booster_"):
            raise NotFittedError("LightGBMRanker is not fitted: call fit() or load() first")

    # ---------------------------------------------------------------------------- persistence
    def save(self, directory: Path) -> None:
        """Write ``model.txt``, ``importance.json``, ``curves.json/png``, then ``ranker.json``."""
        self._check_fitted()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MODEL_FILE).write_text(self.booster_.model_to_string())
        ranked = dict(sorted(self.importance_.items(), key=lambda item: -item[1]))
        (directory / IMPORTANCE_FILE).write_text(json.dumps(ranked, indent=2) + "\n")
        write_curves(
            directory,
            {f"ndcg@{self.config.eval_at}": self.curves_},
            best=self.best_iteration_,
            xlabel="boosting round",
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "config": to_mapping(self.config),
            "feature_names": list(self.feature_names_),
            "best_iteration": self.best_iteration_,
            "curves": self.curves_,
            "importance": self.importance_,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> LightGBMRanker:
        """Read a directory written by :meth:`save`; ``BundleError`` if missing or corrupt."""
        meta = read_meta(directory, KIND)
        ranker = cls(from_mapping(LightGBMConfig, meta["config"], "ranking.lightgbm"))
        try:
            ranker.booster_ = lgb.Booster(model_str=(directory / MODEL_FILE).read_text())
        except (OSError, lgb.basic.LightGBMError) as exc:
            raise BundleError(f"{directory}: unreadable LightGBM model ({exc})") from exc
        ranker.feature_names_ = tuple(meta["feature_names"])
        ranker.best_iteration_ = int(meta["best_iteration"])
        ranker.curves_ = {k: list(v) for k, v in meta["curves"].items()}
        ranker.importance_ = dict(meta["importance"])
        if ranker.booster_.num_feature() != len(ranker.feature_names_):
            raise BundleError(
                f"{directory}: the model has {ranker.booster_.num_feature()} features but "
                f"{META_FILE} names {len(ranker.feature_names_)}"
            )
        return ranker


def read_meta(directory: Path, kind: str) -> dict[str, Any]:
    """``ranker.json`` of a saved ranker of ``kind``; ``BundleError`` if missing or another."""
    path = directory / META_FILE
    if not path.is_file():
        raise BundleError(f"{directory}: {META_FILE} is missing (not a saved ranker)")
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{directory}: unreadable {META_FILE} ({exc})") from exc
    found = (meta.get("kind"), meta.get("format_version"))
    if found != (kind, FORMAT_VERSION):
        raise BundleError(
            f"{directory}: holds a {found[0]!r} ranker format {found[1]!r}, "
            f"expected {kind!r} format {FORMAT_VERSION}"
        )
    return meta


class _ReportRound:
    """LightGBM callback: one progress step per boosting round, with its evaluation results."""

    # After record_evaluation (20), before early_stopping (30), which ends training by raising.
    order = 25

    def __init__(self, rounds: StageSteps) -> None:
        self.rounds = rounds

    def __call__(self, env: lgb.callback.CallbackEnv) -> None:
        results = env.evaluation_result_list or []
        self.rounds.advance(**{f"{data} {metric}": value for data, metric, value, *_ in results})


def _dataset(
    training: TrainingSet,
    names: list[str],
    params: dict[str, Any],
    reference: lgb.Dataset | None = None,
) -> lgb.Dataset:
    return lgb.Dataset(
        training.values,
        label=training.labels,
        weight=training.weights,
        group=training.groups,
        feature_name=names,
        reference=reference,
        params=params,
        free_raw_data=True,
    )


def _safe_name(name: str) -> str:
    """LightGBM refuses some characters in feature names (JSON specials); ours never use them."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)
