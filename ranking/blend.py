"""``BlendRanker``: a per-user score blend of the retrieval models, weights fitted on labels.

The candidates' model scores, each standardised within the user's retrieved candidates (the
``<name>_score_z`` features), are summed with non-negative weights that add up to 1:

    score(u, i) = sum_s w_s * z_s(u, i)

The weights are the point of a simplex grid (``step`` apart) with the best mean NDCG@``eval_at``
over the training groups. It is the ranker a small log can afford: one weight per source instead
of hundreds of trees, so it cannot fit the noise of a few thousand users, and on Last.fm such a
blend of ALS and item-kNN scores beat both a LambdaRank forest over the same candidates and
every single source (``docs/benchmarks.md``, quality section). The ranking stage trains it beside
the forest and serves whichever orders its held-out users better.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from data.configuration import from_mapping, to_mapping
from data.errors import BundleError, DataError, NotFittedError
from data.progress import ProgressReporter
from data.validation import fraction, positive_int
from ranking.training_set import TrainingSet, group_ndcg

KIND = "blend"
META_FILE = "blend.json"
Z_SUFFIX = "_score_z"


@dataclass(frozen=True)
class BlendConfig:
    """Hyperparameters of :class:`BlendRanker`.

    step: the simplex grid's spacing; 0.1 gives 286 candidate weightings of four sources.
    missing_z: the standardised score of a candidate a model cannot score (no user vector, no
        history): three deviations below the user's mean, "not recommended by this model".
    eval_at: K of the NDCG@K the weights maximise.
    max_groups: training groups the grid is scored on at most (a seeded subset: the mean NDCG
        of a thousand users ranks weightings as a full set does, at a fraction of the cost).
    seed: the subset's seed.
    """

    step: float = 0.1
    missing_z: float = -3.0
    eval_at: int = 10
    max_groups: int = 1_000
    seed: int = 0

    def __post_init__(self) -> None:
        fraction(self.step, "BlendConfig.step", low_open=True)
        positive_int(self.eval_at, "BlendConfig.eval_at")
        positive_int(self.max_groups, "BlendConfig.max_groups")


def simplex_grid(n: int, step: float) -> npt.NDArray[np.float64]:
    """(m, n) every weight vector of ``n`` non-negative multiples of ``step`` summing to 1."""
    units = round(1.0 / step)
    rows = [combo for combo in itertools.product(range(units + 1), repeat=n) if sum(combo) == units]
    return np.asarray(rows, dtype=np.float64) / units


class BlendRanker:
    """Per-user z-score blend of model scores (see the module docstring).

    Learned state (after :meth:`fit` or :meth:`load`):
        feature_names_: (F,) names of the columns ``predict`` expects.
        weights_:       {feature: weight} of the blended ``*_score_z`` columns (sum 1).
        train_ndcg_:    mean NDCG@eval_at of the chosen weights on the scored training groups.
    """

    feature_names_: tuple[str, ...]
    weights_: dict[str, float]
    train_ndcg_: float

    def __init__(self, config: BlendConfig | None = None) -> None:
        self.config = config if config is not None else BlendConfig()

    def fit(
        self,
        train: TrainingSet,
        valid: TrainingSet | None = None,
        *,
        progress: ProgressReporter | None = None,
    ) -> Self:
        """Choose the weights on ``train``'s groups (``valid`` is not used: the caller compares
        rankers on it). ``DataError`` if the set has no ``*_score_z`` column."""
        columns = [i for i, name in enumerate(train.names) if name.endswith(Z_SUFFIX)]
        if not columns:
            raise DataError("BlendRanker.fit: the training set has no standardised score column")
        config = self.config
        groups = train
        if train.n_groups > config.max_groups:
            rng = np.random.default_rng(config.seed)
            groups = train.take_groups(
                np.sort(rng.choice(train.n_groups, config.max_groups, replace=False))
            )
        z = self._standardised(groups.values[:, columns])
        best_score, best_weights = -np.inf, np.zeros(len(columns))
        for weights in simplex_grid(len(columns), config.step):
            score = float(
                np.nanmean(group_ndcg(z @ weights, groups.labels, groups.groups, config.eval_at))
            )
            if score > best_score:  # ties keep the earlier (grid-order) weighting
                best_score, best_weights = score, weights
        self.feature_names_ = train.names
        self.weights_ = {
            train.names[i]: float(w) for i, w in zip(columns, best_weights, strict=True)
        }
        self.train_ndcg_ = best_score
        return self

    def predict(self, values: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """(N,) float32 blended scores of rows ``values`` (N, F); higher ranks first."""
        self._check_fitted()
        rows = np.asarray(values, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != len(self.feature_names_):
            raise DataError(
                f"predict: values have shape {rows.shape}, expected (N, {len(self.feature_names_)})"
            )
        index = [self.feature_names_.index(name) for name in self.weights_]
        weights = np.fromiter(self.weights_.values(), dtype=np.float64, count=len(index))
        return (self._standardised(rows[:, index]) @ weights).astype(np.float32)

    def _standardised(self, z: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
        return np.where(np.isnan(z), self.config.missing_z, z).astype(np.float64)

    def warm(self) -> None:
        """Nothing to prepare: a dot product per candidate."""

    def save(self, directory: Path) -> None:
        """Write ``blend.json`` (config, feature names, weights)."""
        self._check_fitted()
        directory.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "kind": KIND,
            "config": to_mapping(self.config),
            "feature_names": list(self.feature_names_),
            "weights": self.weights_,
            "train_ndcg": self.train_ndcg_,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> BlendRanker:
        """Read a directory written by :meth:`save`; ``BundleError`` if missing or corrupt."""
        path = directory / META_FILE
        try:
            meta = json.loads(path.read_text())
            ranker = cls(from_mapping(BlendConfig, meta["config"], "BlendRanker"))
            ranker.feature_names_ = tuple(meta["feature_names"])
            ranker.weights_ = {str(k): float(v) for k, v in meta["weights"].items()}
            ranker.train_ndcg_ = float(meta["train_ndcg"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{directory}: unreadable blend ranker ({exc})") from exc
        missing = [name for name in ranker.weights_ if name not in ranker.feature_names_]
        if missing or meta.get("kind") != KIND:
            raise BundleError(f"{directory}: not a blend ranker (kind {meta.get('kind')!r})")
        return ranker

    def _check_fitted(self) -> None:
        if not hasattr(self, "weights_"):
            raise NotFittedError("BlendRanker is not fitted; call fit first")
