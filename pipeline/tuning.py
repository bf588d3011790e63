"""``recsys tune``: search the funnel's main hyperparameters for the best validation nDCG@10.

What is optimised is the whole pipeline, trained by :func:`~pipeline.artifacts.train_bundle` and
scored end to end, not each stage alone: a two-tower that is weaker on its own can still feed the
merge and the ranker better candidates.

**The test split is never read.** Tuning works on a derived dataset (:func:`derive_tuning_dataset`)
whose test split is the dataset's *valid* split and whose train / valid splits are the dataset's
train split cut again the way the dataset was cut (per user at random for random splits and
untimed logs, by time for temporal ones). Each trial trains on that train split (its valid split
drives early stopping, the merge order and the ranker, as in ``recsys train``) and is scored on
the dataset's valid split; ``recsys train --config`` on the result then trains on the full train
split and ``recsys evaluate`` scores on test, which no choice here has seen.

**Search.** Optuna's TPE sampler (Bergstra et al. 2011, "Algorithms for hyper-parameter
optimization"), seeded, over :data:`DEFAULT_SPACE`: the main settings of the two-tower, ALS, the
LightGBM ranker and the merge, log-uniform where a setting acts multiplicatively (learning rates,
penalties, widths). Keys set in the base config (``recsys tune --config``) are kept fixed and
left out of the search; settings of sources or rankers the base config does not use are too.
The first trial of a new study is the space's defaults (the built-in config), so the tuned config
is always compared against what an untuned ``recsys train`` would give.

**Resumable.** Trials are stored in an SQLite database (default: next to the output file) under
a study name made of the data's fingerprint and a digest of the base config and search space, so
re-running the same command adds trials to the same study. The sampler's seed is the given seed
plus the number of trials already stored, so a resumed run does not replay the random start-up
points of the first run, and the same sequence of commands gives the same trials.

**Cheap trials.** The derived dataset is written once per run and shared by every trial; each
trial's bundle is deleted once it is scored.

The scorer is passed in (:data:`Scorer`): the offline evaluator lives in ``evaluation/``, above
this package, so ``cli/tune_command.py`` wires it in.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import optuna
import polars as pl
from tqdm import tqdm

from data.dataset import (
    ITEMS_NAME,
    USERS_NAME,
    is_timed,
    read_manifest,
    scan_split,
    write_dataset,
)
from data.errors import ConfigError, DataError
from data.schema import USER_ID
from data.splits import leave_last_n_split, random_split, temporal_split, user_disjoint_split
from data.validation import integer, non_negative_int, positive_float, positive_int
from pipeline.artifacts import train_bundle
from ranking.stage import RankingConfig
from retrieval.stage import SOURCE_KINDS, RetrievalConfig

# nDCG@10 per system ("pipeline", "retrieval_order", "source:als", ...) of the bundle at the
# second path, on the test split of the dataset at the first. "pipeline" is the objective.
Scorer = Callable[[Path, Path], Mapping[str, float]]
OBJECTIVE_SYSTEM = "pipeline"
# Not a config key: the quota sizes of [retrieval.quotas], summing to n_candidates, shrink by
# this factor from one source to the next (merge priority order). With order_by_validation the
# largest go to the sources that validate best, so only the shape of the sizes matters.
QUOTA_DECAY = "retrieval.quota_decay"
STUDY_PREFIX = "recsys-tune"


# ---------------------------------------------------------------------------- the search space
@dataclass(frozen=True)
class FloatParam:
    """A float setting at dotted TOML path ``path``, searched in ``[low, high]``."""

    path: str
    low: float
    high: float
    default: float
    log: bool = False

    def __post_init__(self) -> None:
        _check_range(self.path, self.low, self.high, self.default, self.log)

    def suggest(self, trial: optuna.Trial) -> float:
        return trial.suggest_float(self.path, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class IntParam:
    """An integer setting at dotted TOML path ``path``, searched in ``[low, high]``."""

    path: str
    low: int
    high: int
    default: int
    log: bool = False

    def __post_init__(self) -> None:
        for name in ("low", "high", "default"):
            integer(getattr(self, name), f"{self.path}: {name}")
        _check_range(self.path, self.low, self.high, self.default, self.log)

    def suggest(self, trial: optuna.Trial) -> int:
        return trial.suggest_int(self.path, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class ChoiceParam:
    """A setting at dotted TOML path ``path`` that takes one of ``choices`` (str, int, float or
    bool: what Optuna stores)."""

    path: str
    choices: tuple[str | int | float | bool, ...]
    default: str | int | float | bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.default not in self.choices:
            raise ConfigError(
                f"{self.path}: default {self.default!r} is not one of {list(self.choices)}"
            )

    def suggest(self, trial: optuna.Trial) -> str | int | float | bool:
        # Optuna's overloads allow None, which no choice here is.
        return cast(str | int | float | bool, trial.suggest_categorical(self.path, self.choices))


Param = FloatParam | IntParam | ChoiceParam


def _check_range(path: str, low: float, high: float, default: float, log: bool) -> None:
    if not low < high:
        raise ConfigError(f"{path}: low {low!r} must be below high {high!r}")
    if log and low <= 0:
        raise ConfigError(f"{path}: a log-uniform range needs low > 0, got {low!r}")
    if not low <= default <= high:
        raise ConfigError(f"{path}: default {default!r} lies outside [{low!r}, {high!r}]")


# Defaults are the built-in configs' values (the quota decay approximates the shape of the
# default quotas), so trial 0 of every study is, but for that, the untuned ``recsys train``.
# Ranges span what the sources' docstrings and the literature report as useful; the EASE ridge
# and the ALS regularisation are not here because their sources already choose them on the
# validation window (a fixed value from the search would override that choice).
DEFAULT_SPACE: tuple[Param, ...] = (
    # The funnel's width: more candidates give the ranker more to find, and cost ranking time.
    IntParam("retrieval.n_candidates", 100, 500, 500, log=True),
    FloatParam(QUOTA_DECAY, 0.3, 1.0, 0.7),
    # Two-tower: capacity, temperature, regularisation (what a small log most needs right).
    ChoiceParam("retrieval.two_tower.embedding_dim", (16, 32, 64, 128), 32),
    FloatParam("retrieval.two_tower.temperature", 0.02, 0.2, 0.05, log=True),
    FloatParam("retrieval.two_tower.learning_rate", 3e-4, 1e-2, 3e-3, log=True),
    FloatParam("retrieval.two_tower.weight_decay", 1e-6, 1e-2, 1e-4, log=True),
    FloatParam("retrieval.two_tower.dropout", 0.0, 0.5, 0.1),
    # ALS: Hu et al.'s confidence and the factor count (the penalty is chosen per fit).
    IntParam("retrieval.als.factors", 16, 256, 64, log=True),
    ChoiceParam("retrieval.als.confidence", ("log", "linear", "binary"), "log"),
    FloatParam("retrieval.als.mean_confidence", 1.0, 64.0, 8.0, log=True),
    # LightGBM LambdaRank: tree size, shrinkage, leaf support.
    IntParam("ranking.lightgbm.num_leaves", 7, 63, 15, log=True),
    FloatParam("ranking.lightgbm.learning_rate", 0.02, 0.3, 0.1, log=True),
    IntParam("ranking.lightgbm.min_data_in_leaf", 5, 200, 50, log=True),
)


def active_space(space: Sequence[Param], base: Mapping[str, Any]) -> tuple[Param, ...]:
    """The params of ``space`` that a trial on ``base`` searches: those the base config does not
    set, belonging to a source the base config enables or to the ranker model it uses."""
    retrieval = base.get("retrieval", {})
    sources = retrieval.get("sources", RetrievalConfig().sources)
    model = base.get("ranking", {}).get("model", RankingConfig().model)
    kept = []
    for param in space:
        keys = param.path.split(".")
        if param.path == QUOTA_DECAY:
            pinned = "quotas" in retrieval
        else:
            pinned = _lookup(base, keys) is not None
        unused = (
            keys[0] == "retrieval" and keys[1] in SOURCE_KINDS and keys[1] not in sources
        ) or (keys[0] == "ranking" and keys[1] in ("lightgbm", "dnn") and keys[1] != model)
        if not (pinned or unused):
            kept.append(param)
    return tuple(kept)


def config_from_params(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` (a parsed TOML config) with each dotted-path value of ``params`` set in it.

    :data:`QUOTA_DECAY` becomes ``[retrieval.quotas]`` over the enabled sources, in order.
    """
    config = json.loads(json.dumps(base))  # a deep copy of plain TOML data
    for path, value in params.items():
        if path != QUOTA_DECAY:
            _assign(config, path.split("."), value)
    if QUOTA_DECAY in params:
        retrieval = config.setdefault("retrieval", {})
        n_candidates = retrieval.get("n_candidates", RetrievalConfig().n_candidates)
        sources = retrieval.get("sources", RetrievalConfig().sources)
        retrieval["quotas"] = geometric_quotas(sources, n_candidates, params[QUOTA_DECAY])
    return config


def geometric_quotas(sources: Sequence[str], n_candidates: int, decay: float) -> dict[str, int]:
    """Quotas summing to about ``n_candidates``, each ``decay`` times the one before (at least 1):
    ``decay=1`` shares the slate evenly, small values hand most of it to the first source."""
    weights = [decay**i for i in range(len(sources))]
    total = sum(weights)
    return {
        name: max(1, round(n_candidates * weight / total))
        for name, weight in zip(sources, weights, strict=True)
    }


def _lookup(config: Mapping[str, Any], keys: Sequence[str]) -> Any:
    node: Any = config
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _assign(config: dict[str, Any], keys: Sequence[str], value: Any) -> None:
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(
                f"{'.'.join(keys)}: {key!r} is a value in the base config, not a table"
            )
    node[keys[-1]] = value


# ------------------------------------------------------------------------ the derived dataset
def derive_tuning_dataset(data_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write the dataset tuning trains and scores on to ``out_dir``; returns its manifest.

    Its test split is ``data_dir``'s valid split; its train and valid splits are ``data_dir``'s
    train split cut again with the dataset's own split method (temporal and leave-last-n by
    time, user-disjoint by user, random splits and logs without times per user at random), the
    new validation share equal to the original's share of train + valid. Item and user tables
    are kept. ``data_dir``'s test split is never opened.
    """
    root = Path(data_dir)
    manifest = read_manifest(root)
    train = scan_split(root, "train").collect()
    valid = scan_split(root, "valid").collect()
    if valid.height == 0:
        raise DataError(
            f"dataset {str(root)!r} has an empty valid split: tuning scores on it "
            "(re-create the dataset with --valid-fraction > 0)"
        )
    split = manifest.get("split", {})
    inner = _split_again(train, valid, split, timed=is_timed(manifest))
    if inner["train"].height == 0 or inner["test"].height == 0:
        raise DataError(
            f"dataset {str(root)!r}: its train split ({train.height} events) is too small to "
            "carve a validation slice from"
        )
    side = {name: root / name for name in (ITEMS_NAME, USERS_NAME)}
    return write_dataset(
        out_dir,
        pl.concat([train, valid]),
        {"train": inner["train"], "valid": inner["test"], "test": valid},
        source={"kind": "tuning", "from": str(root), "fingerprint": manifest["fingerprint"]},
        split_method={"method": f"tuning+{inner['method']}", "test": "the valid split"},
        items=pl.read_parquet(side[ITEMS_NAME]) if side[ITEMS_NAME].is_file() else None,
        users=pl.read_parquet(side[USERS_NAME]) if side[USERS_NAME].is_file() else None,
        timed=is_timed(manifest),
    )


def _split_again(
    train: pl.DataFrame, valid: pl.DataFrame, split: Mapping[str, Any], *, timed: bool
) -> dict[str, Any]:
    """``train`` cut into train / test (the new validation) the way ``split`` describes."""
    # "given_test+random" (an import with its own test file): how validation was carved.
    method = str(split.get("method", "")).rsplit("+", 1)[-1]
    seed = int(split.get("seed", 0))
    share = valid.height / (train.height + valid.height)
    if method == "leave_last_n" and timed:
        cut = leave_last_n_split(train, n_test=int(split.get("n_valid", 1)), n_valid=0)
    elif method == "user_disjoint":
        n_train = train[USER_ID].n_unique()
        user_share = valid[USER_ID].n_unique() / (n_train + valid[USER_ID].n_unique())
        cut = user_disjoint_split(train, test_fraction=user_share, valid_fraction=0.0, seed=seed)
    elif timed and method != "random":
        method = "temporal"
        cut = temporal_split(train, test_fraction=share, valid_fraction=0.0)
    else:
        method = "random"
        cut = random_split(train, test_fraction=share, valid_fraction=0.0, seed=seed)
    return {"train": cut["train"], "test": cut["test"], "method": method}


# ---------------------------------------------------------------------------------- the study
@dataclass(frozen=True)
class TuneConfig:
    """How ``recsys tune`` searches.

    n_trials: trials to run now (a resumed study keeps its earlier ones and adds these).
    timeout: seconds after which no new trial starts (the running one finishes); None = no limit.
    seed: seed of the TPE sampler (plus the number of trials already stored; module docstring).
    storage: Optuna storage: an SQLAlchemy URL (``sqlite:///x.db``) or a file path, used as
        SQLite; None = the output path with the suffix ``.db``.
    base: the parsed TOML config every trial starts from; its keys are not searched.
    space: the settings searched (:data:`DEFAULT_SPACE`).
    n_startup_trials: random trials before TPE models the results. 6, below Optuna's 10: a
        30-minute budget on a small machine fits a few dozen trials at most, and the random
        ones would otherwise be a third of them or more.
    """

    n_trials: int
    timeout: float | None = None
    seed: int = 0
    storage: str | Path | None = None
    base: Mapping[str, Any] = field(default_factory=dict)
    space: tuple[Param, ...] = DEFAULT_SPACE
    n_startup_trials: int = 6

    def __post_init__(self) -> None:
        positive_int(self.n_trials, "--trials")
        if self.timeout is not None:
            positive_float(self.timeout, "--timeout")
        non_negative_int(self.seed, "--seed")
        non_negative_int(self.n_startup_trials, "TuneConfig.n_startup_trials")
        object.__setattr__(self, "space", tuple(self.space))
        paths = [param.path for param in self.space]
        duplicated = sorted({p for p in paths if paths.count(p) > 1})
        if duplicated:
            raise ConfigError(f"the search space lists {duplicated} more than once")


@dataclass(frozen=True)
class TuneResult:
    """The outcome of one ``recsys tune`` run (the study may hold earlier runs' trials too)."""

    study_name: str
    storage: str
    n_trials: int  # trials in the study, every state
    n_complete: int
    best_number: int
    best_value: float
    best_config: dict[str, Any]
    default_value: float | None  # trial 0 (the defaults), when it completed
    out: Path


def study_name(fingerprint: str, base: Mapping[str, Any], space: Sequence[Param]) -> str:
    """``recsys-tune-<data fingerprint>-<digest of base config and space>``: the same command
    on the same data continues one study; another base config or space starts another."""
    described = json.dumps(
        {"base": base, "space": [repr(param) for param in space]}, sort_keys=True, default=str
    )
    digest = hashlib.sha256(described.encode()).hexdigest()[:8]
    return f"{STUDY_PREFIX}-{fingerprint}-{digest}"


def storage_url(storage: str | Path | None, out: Path) -> str:
    """An SQLAlchemy URL for ``storage`` (a URL, a path taken as SQLite, or None: next to out)."""
    if storage is not None and "://" in str(storage):
        return str(storage)
    path = Path(storage) if storage is not None else out.with_suffix(".db")
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


def open_study(
    storage: str | optuna.storages.BaseStorage, name: str, *, seed: int, n_startup_trials: int
) -> optuna.Study:
    """Create or load study ``name`` (maximising) in ``storage`` (a URL or a storage object)
    with a TPE sampler seeded by ``seed`` plus the number of trials already stored."""
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, direction="maximize", load_if_exists=True
        )
    except (ValueError, ImportError) as exc:  # a malformed URL, an unknown database driver
        raise ConfigError(f"--storage {storage!r}: {exc}") from exc
    done = len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=seed + done, n_startup_trials=n_startup_trials)
    return study


class PipelineObjective:
    """One trial: the trial's config -> ``train_bundle`` on the derived dataset -> its score.

    A config the stages reject (``ConfigError``) prunes the trial, with the message kept as
    the trial's ``error`` attribute; the study goes on.
    """

    def __init__(
        self,
        data_dir: Path,
        workdir: Path,
        base: Mapping[str, Any],
        space: Sequence[Param],
        scorer: Scorer,
    ) -> None:
        self.data_dir = data_dir
        self.workdir = workdir
        self.base = base
        self.space = tuple(space)
        self.scorer = scorer

    def __call__(self, trial: optuna.Trial) -> float:
        params = {param.path: param.suggest(trial) for param in self.space}
        config = config_from_params(self.base, params)
        bundle = self.workdir / f"trial-{trial.number}"
        started = time.perf_counter()
        try:
            train_bundle(self.data_dir, bundle, config=config)
            scores = dict(self.scorer(self.data_dir, bundle))
        except ConfigError as exc:
            message = " ".join(str(exc).split())
            trial.set_user_attr("error", message)
            raise optuna.TrialPruned(message) from exc
        finally:
            shutil.rmtree(bundle, ignore_errors=True)
        trial.set_user_attr("ndcg@10", scores)
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        value = scores.get(OBJECTIVE_SYSTEM, math.nan)
        if not math.isfinite(value):
            trial.set_user_attr("error", f"{OBJECTIVE_SYSTEM} nDCG@10 is {value}")
            raise optuna.TrialPruned(f"no validation user to score ({OBJECTIVE_SYSTEM}: {value})")
        return float(value)


def tune(
    data_dir: str | Path,
    out: str | Path,
    config: TuneConfig,
    *,
    scorer: Scorer,
    progress: bool = False,
) -> TuneResult:
    """Run ``config.n_trials`` trials on ``data_dir`` and write the best config to ``out``.

    ``out`` is a TOML file that ``recsys train --config`` reads: the base config plus the best
    trial's values, under a comment header naming the data, the trials and the best validation
    nDCG@10. Interrupted (Ctrl-C), the best config so far is written before re-raising.
    """
    data, out = Path(data_dir), Path(out)
    fingerprint = read_manifest(data)["fingerprint"]
    space = active_space(config.space, config.base)
    if not space:
        raise ConfigError("nothing to tune: the base config sets every searched setting")
    url = storage_url(config.storage, out)
    name = study_name(fingerprint, config.base, space)
    study = open_study(url, name, seed=config.seed, n_startup_trials=config.n_startup_trials)
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial({param.path: param.default for param in space})

    with (
        tempfile.TemporaryDirectory(prefix="recsys-tune-") as tmp,
        _progress_bar(config.n_trials, progress) as on_trial_end,
    ):
        derived = Path(tmp) / "data"
        derive_tuning_dataset(data, derived)
        objective = PipelineObjective(derived, Path(tmp), config.base, space, scorer)
        try:
            study.optimize(
                objective,
                n_trials=config.n_trials,
                timeout=config.timeout,
                callbacks=[on_trial_end],
            )
        except KeyboardInterrupt:
            if _completed(study):
                _write_best(study, data, out, config.base, space, url)
            raise
    if not _completed(study):
        errors = [t.user_attrs.get("error") for t in study.get_trials(deepcopy=False)]
        last = next((e for e in reversed(errors) if e), "no trial finished")
        raise ConfigError(f"no trial of study {name!r} completed; the last said: {last}")
    return _write_best(study, data, out, config.base, space, url)


def _completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


@contextmanager
def _progress_bar(
    total: int, enabled: bool
) -> Iterator[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]]:
    """A tqdm bar over this run's trials showing the best value so far; yields the callback."""
    with tqdm(total=total, desc="tune", unit="trial", disable=not enabled) as bar:

        def on_trial_end(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            bar.update(1)
            if trial.state == optuna.trial.TrialState.PRUNED and enabled:
                bar.write(f"trial {trial.number} pruned: {trial.user_attrs.get('error', '')}")
            if _completed(study):
                bar.set_postfix(best=f"{study.best_value:.4f}", trial=study.best_trial.number)

        yield on_trial_end


def _write_best(
    study: optuna.Study,
    data: Path,
    out: Path,
    base: Mapping[str, Any],
    space: Sequence[Param],
    storage: str,
) -> TuneResult:
    best = study.best_trial
    assert best.value is not None, "the best trial is a completed one"
    config = config_from_params(base, best.params)
    trials = study.get_trials(deepcopy=False)
    first = trials[0] if trials else None
    default_value = (
        first.value
        if first is not None and first.state == optuna.trial.TrialState.COMPLETE
        else None
    )
    complete = _completed(study)
    header = [
        f"recsys tune: the best of {len(complete)} completed trials "
        f"({len(trials)} in study {study.study_name})",
        f"data: {data} (fingerprint {read_manifest(data)['fingerprint']})",
        f"best validation nDCG@10 (pipeline): {best.value:.4f} (trial {best.number})",
        "default config: "
        + (f"{default_value:.4f} (trial 0)" if default_value is not None else "not scored"),
        "scored on the valid split, trained on train minus a validation slice; test unread",
        *textwrap.wrap(f"searched: {', '.join(param.path for param in space)}", 96),
    ]
    write_toml(out, config, header=header)
    return TuneResult(
        study_name=study.study_name,
        storage=storage,
        n_trials=len(trials),
        n_complete=len(complete),
        best_number=best.number,
        best_value=float(best.value),
        best_config=config,
        default_value=default_value,
        out=out,
    )


# ------------------------------------------------------------------------- writing TOML back
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def dumps_toml(config: Mapping[str, Any]) -> str:
    """``config`` (nested dicts of str, int, float, bool and lists of them) as TOML text that
    ``tomllib.loads`` reads back equal. Tables nest as ``[a.b]`` headers; dicts inside lists
    become inline tables. ``None`` has no TOML form and raises ``ConfigError``."""
    lines: list[str] = []
    _dump_table(lines, (), config)
    return "\n".join(lines).strip("\n") + "\n"


def write_toml(path: str | Path, config: Mapping[str, Any], *, header: Sequence[str] = ()) -> None:
    """Write :func:`dumps_toml` of ``config`` to ``path`` atomically, ``header`` lines first as
    ``#`` comments."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    comments = "".join(f"# {' '.join(line.split())}\n" for line in header)
    text = comments + ("\n" if comments else "") + dumps_toml(config)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)


def _dump_table(lines: list[str], path: tuple[str, ...], table: Mapping[str, Any]) -> None:
    values = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    if path and (values or not tables):  # a table with only sub-tables needs no header
        lines.append(f"[{'.'.join(_toml_key(k) for k in path)}]")
    for key, value in values.items():
        lines.append(f"{_toml_key(key)} = {_toml_value(value, (*path, key))}")
    if lines and lines[-1]:
        lines.append("")
    for key, value in tables.items():
        _dump_table(lines, (*path, key), value)


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any, where: tuple[str, ...]) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # always has "." or "e" (or is inf / nan): read back as a float
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    if isinstance(value, Mapping):
        items = (f"{_toml_key(k)} = {_toml_value(v, (*where, k))}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise ConfigError(f"{'.'.join(where)}: {value!r} has no TOML form")


def _toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:  # control characters must be escaped
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'
