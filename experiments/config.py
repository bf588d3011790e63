"""The TOML config of a simulated A/B experiment: the arms, the users, the analysis, the monitors.

The config file::

    seed = 0
    salt = "exp-1"             # assignment salt (pipeline.assignment)
    n_days = 30                # experiment days
    pre_period_days = 14       # history log before the experiment (training data, CUPED)

    [world]                    # WorldConfig overrides; drift_day counts experiment days
    n_users = 5000
    drift = "concept"
    drift_day = 10

    [training]                 # the bundle config, as for `recsys train --config` (or a path)
    [behaviour]                # the simulated users: sessions, fatigue, slate size, batching
    [analysis]                 # alpha, power analysis, sequential test, replicates, guardrails
    [monitors]                 # PSI/KS drift monitors
    [sample_loss]              # inject a logging loss in one arm (SRM check)

    [[arms]]
    name = "frozen"
    kind = "frozen"
    weight = 0.5
    [[arms]]
    name = "online"
    kind = "online"
    weight = 0.5
    params = { }               # kind-specific: every_days, monitor, cooldown_days, training

The arm kinds and what each does at run time: :mod:`experiments.arms`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

from data.configuration import from_mapping, load_toml
from data.errors import ConfigError
from data.synthetic import WorldConfig
from experiments.conventions import DEFAULT_ALPHA
from experiments.drift import DriftConfig
from experiments.guardrails import Guardrail
from experiments.power import DEFAULT_POWER
from experiments.srm import SRM_ALPHA
from pipeline.online_learning.config import OnlineLearningConfig

ArmKind = Literal[
    "frozen",
    "online_state",
    "online",  # the alias of online_state (its name before online learning existed)
    "online_learning",
    "retrain_every",
    "drift_retrain",
    "popularity",
    "oracle",
]
MetricName = Literal["ctr", "engagement"]
MonitorName = Literal["clicked_popularity", "score"]

# The default world's click density (200k clicks / 5k users / 30 days): kept when the pre-period
# length or the population changes, so a bigger experiment is not a sparser one.
DEFAULT_CLICKS_PER_USER_DAY = 200_000 / 5_000 / 30

# What a popularity arm trains: the trending source alone (two-tower and ALS are never fitted).
POPULARITY_TRAINING: Mapping[str, Any] = MappingProxyType(
    {"retrieval": {"sources": ["popular"], "quotas": {"popular": 500}}}
)


@dataclass(frozen=True)
class ArmConfig:
    """One arm: ``name``, update policy ``kind``, relative assignment ``weight`` and parameters.

    every_days: ``retrain_every``: days between retrains (the first at the end of day
        ``every_days - 1``). Default 7: a weekly retrain, the common production cadence.
    monitor: ``drift_retrain``: the monitor whose alert triggers a retrain
        (``"clicked_popularity"``: a feature; ``"score"``: the model's prediction scores).
    cooldown_days: ``drift_retrain``: minimum days between two retrains. Default 3: the monitor
        needs ``reference_days`` of fresh data after a retrain before it can judge again.
    training: overrides deep-merged into the experiment's training config for this arm only
        (a model variant as an arm). Popularity arms get ``POPULARITY_TRAINING`` merged in too.
    online_learning: ``online_learning``: overrides of the online trainer's settings
        (``pipeline.online_learning.OnlineLearningConfig``).
    """

    name: str
    kind: ArmKind
    weight: float = 1.0
    every_days: int = 7
    monitor: MonitorName = "clicked_popularity"
    cooldown_days: int = 3
    training: Mapping[str, Any] = field(default_factory=dict)
    online_learning: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or "/" in self.name:
            raise ConfigError(f"arm name must be a non-empty string without '/', got {self.name!r}")
        if self.kind not in get_args(ArmKind):
            raise ConfigError(
                f"arm {self.name!r}: kind must be one of {list(get_args(ArmKind))}, "
                f"got {self.kind!r}"
            )
        if not (isinstance(self.weight, int | float) and math.isfinite(self.weight)):
            raise ConfigError(f"arm {self.name!r}: weight must be a number, got {self.weight!r}")
        if self.weight <= 0:
            raise ConfigError(f"arm {self.name!r}: weight must be > 0, got {self.weight!r}")
        _positive_int(self.every_days, f"arm {self.name!r}: every_days")
        _positive_int(self.cooldown_days, f"arm {self.name!r}: cooldown_days")
        if self.monitor not in get_args(MonitorName):
            raise ConfigError(
                f"arm {self.name!r}: monitor must be one of {list(get_args(MonitorName))}, "
                f"got {self.monitor!r}"
            )
        if not isinstance(self.training, Mapping):
            raise ConfigError(f"arm {self.name!r}: training must be a table")
        if not isinstance(self.online_learning, Mapping):
            raise ConfigError(f"arm {self.name!r}: online_learning must be a table")
        self.online_learning_config()  # validated now, not days into a run

    @property
    def updates_online(self) -> bool:
        """Whether feedback reaches the online state (everything but the frozen bundle)."""
        return self.kind != "frozen"

    @property
    def learns_online(self) -> bool:
        """Whether the arm's model weights follow the feedback stream (the online trainer)."""
        return self.kind == "online_learning"

    def online_learning_config(self) -> OnlineLearningConfig:
        """The online trainer's settings: the defaults with this arm's overrides."""
        try:
            return OnlineLearningConfig.from_mapping(dict(self.online_learning))
        except ConfigError as exc:
            raise ConfigError(f"arm {self.name!r}: {exc}") from exc

    @classmethod
    def from_table(cls, table: Mapping[str, Any], where: str) -> ArmConfig:
        """Build from one ``[[arms]]`` table: ``name``, ``kind``, ``weight``, ``params``."""
        values = dict(table)
        params = values.pop("params", {}) or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"[{where}] params must be a table, got {params!r}")
        allowed = _KIND_PARAMS.get(str(values.get("kind")), frozenset()) | {"training"}
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ConfigError(
                f"[{where}] params {unknown} do not apply to kind {values.get('kind')!r}; "
                f"it takes {sorted(allowed)}"
            )
        return from_mapping(cls, {**values, **params}, where)


# Parameters each kind takes besides ``training`` (any kind may override the model).
_KIND_PARAMS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "retrain_every": frozenset({"every_days"}),
        "drift_retrain": frozenset({"monitor", "cooldown_days"}),
        "online_learning": frozenset({"online_learning"}),
    }
)


@dataclass(frozen=True)
class BehaviourConfig:
    """The simulated users (the world's choice model does the rest).

    sessions_per_user_day: mean sessions per day of a user of average activity (the world's
        lognormal activity and covariate drift scale it per user). Default 0.5: every other day,
        which keeps a 50k-user month within the benchmark's time budget
        (``docs/benchmarks.md``).
    ticks_per_day: micro-batches per day. Sessions of one tick are served together, then their
        feedback is recorded, so the online state lags by at most one tick (3 h at 8), like a
        streaming update with a short interval. A user has at most one session per tick.
    slate_size: items per slate (the ``k`` of the request); each slate gets at most one click.
    fatigue_per_repeat: utility penalty per earlier impression of the same item still in the
        user's memory (logit units: 0.3 cuts the odds of a click by ~26 % per repeat). Models the
        well-known decay of CTR on re-shown items; 0 turns fatigue off.
    fatigue_memory: impressions per user remembered for fatigue (10 = the previous slate).
    consumed_penalty: utility penalty of an item the user already clicked (consumed), among
        their last ``consumed_memory`` clicks. Default 2.0 (odds x 0.14): a film watched or an
        article read rarely gets a second click; without it, re-showing yesterday's clicks would
        be the best policy, which no real catalogue rewards. The pre-period's clicks count.
    consumed_memory: clicks per user remembered as consumed (50, the default history length).
    batch_size: users per ``Pipeline.recommend`` call. Default 256: large enough to amortise the
        funnel's per-call overhead, small enough to keep the per-row response building cheap.
    organic_share: the share of all consumption users find outside the recommender (search,
        browsing; :mod:`experiments.organic`), logged as feedback of type ``"organic"``.
        Default 0.3: real logs hold such consumption, and without it a user's new interests
        reach the log only if the recommender already shows them. 0 turns it off.
    organic_popularity_bias: weight of log-popularity in the organic choice's logit (1 = the
        world's exposure prior in full). Default 0.5: search and browsing lean toward popular
        items, but less than an exposure-driven feed does.
    parallel_arms: serve the arms' copies of a tick at once, one thread per arm, each arm's
        numeric libraries on one thread. The copies share no state and every random draw is
        made before they run, so the result is the same as one arm after the other; on a
        machine with a core per arm the loop takes about the time of one arm.
    """

    sessions_per_user_day: float = 0.5
    ticks_per_day: int = 8
    slate_size: int = 10
    fatigue_per_repeat: float = 0.3
    fatigue_memory: int = 10
    consumed_penalty: float = 2.0
    consumed_memory: int = 50
    batch_size: int = 256
    organic_share: float = 0.3
    organic_popularity_bias: float = 0.5
    parallel_arms: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.parallel_arms, bool):
            raise ConfigError(
                f"[behaviour] parallel_arms must be true or false, got {self.parallel_arms!r}"
            )
        if not (math.isfinite(self.sessions_per_user_day) and self.sessions_per_user_day > 0):
            raise ConfigError(
                "[behaviour] sessions_per_user_day must be a finite number > 0, "
                f"got {self.sessions_per_user_day!r}"
            )
        for name in (
            "ticks_per_day",
            "slate_size",
            "fatigue_memory",
            "consumed_memory",
            "batch_size",
        ):
            _positive_int(getattr(self, name), f"[behaviour] {name}")
        if self.ticks_per_day > 24 or 24 % self.ticks_per_day:
            raise ConfigError(
                f"[behaviour] ticks_per_day must divide 24 (whole hours per tick), "
                f"got {self.ticks_per_day}"
            )
        if not (
            isinstance(self.organic_share, int | float)
            and not isinstance(self.organic_share, bool)
            and 0 <= self.organic_share < 1
        ):
            raise ConfigError(
                f"[behaviour] organic_share must be in [0, 1), got {self.organic_share!r}"
            )
        for name in ("fatigue_per_repeat", "consumed_penalty", "organic_popularity_bias"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"[behaviour] {name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class AnalysisConfig:
    """How the experiment is analysed (the methods: :mod:`experiments.conventions` lists them).

    alpha: two-sided level of every test and interval. srm_alpha: level of the SRM check.
    primary_metric: the decision metric (``"ctr"``: clicks per session, per user;
        ``"engagement"``: clicks per exposed user). Power analysis and sequential tests use it.
    mde_relative: the relative lift the power analysis plans for (0.02 = 2 %).
    power: target power of the power analysis.
    mixture_sd: tau of the mSPRT (metric units); ``None`` = the planned absolute MDE, where the
        test is most powerful.
    aa_replicates: A/A replicates (re-randomised assignments of the control universe).
    coverage_replicates: re-randomised A/B assignments, for the coverage of the true effect and
        the estimator's bias.
    srm_replicates: re-randomised assignments for the SRM detection rates.
    srm_shift: the split shift whose detection rate is measured (0.02: 50/50 run as 48/52).
    head_share: items making up the "head" for the long-tail guardrail: the most-clicked share
        of the catalogue in the pre-period (0.1 = top 10 %).
    guardrails: metrics the treatment must not degrade (``latency_ms``, ``diversity``,
        ``long_tail_share``), as non-inferiority checks.
    comparisons: pairs of arm names ``[baseline, candidate]`` compared head to head besides
        every arm against the control (``pairwise`` in the report), e.g.
        ``[["online", "online_learning"]]``.
    """

    alpha: float = DEFAULT_ALPHA
    srm_alpha: float = SRM_ALPHA
    primary_metric: MetricName = "ctr"
    mde_relative: float = 0.02
    power: float = DEFAULT_POWER
    mixture_sd: float | None = None
    aa_replicates: int = 200
    coverage_replicates: int = 200
    srm_replicates: int = 200
    srm_shift: float = 0.02
    head_share: float = 0.1
    guardrails: tuple[Guardrail, ...] = (
        # Amortised batch latency is noisy on a shared machine: a 25 % margin.
        Guardrail("latency_ms", "lower_is_better", 0.25),
        Guardrail("diversity", "higher_is_better", 0.05),
        Guardrail("long_tail_share", "higher_is_better", 0.10),
    )
    comparisons: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name in ("alpha", "srm_alpha", "power"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ConfigError(f"[analysis] {name} must be in (0, 1), got {value!r}")
        if self.primary_metric not in get_args(MetricName):
            raise ConfigError(
                f"[analysis] primary_metric must be one of {list(get_args(MetricName))}, "
                f"got {self.primary_metric!r}"
            )
        for name in ("mde_relative", "srm_shift", "head_share"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ConfigError(f"[analysis] {name} must be in (0, 1), got {value!r}")
        if self.mixture_sd is not None and not self.mixture_sd > 0:
            raise ConfigError(f"[analysis] mixture_sd must be > 0, got {self.mixture_sd!r}")
        for name in ("aa_replicates", "coverage_replicates", "srm_replicates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"[analysis] {name} must be an integer >= 0, got {value!r}")
        guardrails = tuple(
            g if isinstance(g, Guardrail) else from_mapping(Guardrail, g, "analysis.guardrails")
            for g in self.guardrails
        )
        object.__setattr__(self, "guardrails", guardrails)
        pairs = []
        for pair in self.comparisons:
            if (
                not isinstance(pair, list | tuple)
                or len(pair) != 2
                or not all(isinstance(name, str) for name in pair)
                or pair[0] == pair[1]
            ):
                raise ConfigError(
                    f"[analysis] comparisons must be pairs of two arm names, got {pair!r}"
                )
            pairs.append((pair[0], pair[1]))
        object.__setattr__(self, "comparisons", tuple(pairs))


@dataclass(frozen=True)
class MonitorConfig:
    """Drift monitors run on every arm, one window per day (``experiments.drift.DriftMonitor``).

    reference_days: the first experiment days (and the first days after a retrain) form the
        reference distribution; later days are compared with it. Default 3.
    score_sample_per_tick: sessions per tick whose prediction scores are computed for the
        score monitor (a second user encoding: sampled to bound its cost).
    drift: the PSI / KS settings. The simulator's default turns the KS alert off: with
        thousands of clicks a day, KS flags the slow day-to-day evolution of an online arm, so
        only the PSI > 0.2 alert counts (KS statistics are still reported).
    """

    reference_days: int = 3
    score_sample_per_tick: int = 256
    drift: DriftConfig = field(default_factory=lambda: DriftConfig(ks_p_value_threshold=None))

    def __post_init__(self) -> None:
        _positive_int(self.reference_days, "[monitors] reference_days")
        _positive_int(self.score_sample_per_tick, "[monitors] score_sample_per_tick")
        if isinstance(self.drift, Mapping):
            values = {"ks_p_value_threshold": None, **self.drift}
            object.__setattr__(self, "drift", from_mapping(DriftConfig, values, "monitors.drift"))


@dataclass(frozen=True)
class SampleLossConfig:
    """Inject a logging loss: ``fraction`` of the users of arm ``arm`` vanish from the analysis
    (as if their events were dropped by a broken pipeline), to exercise the SRM check."""

    arm: str | None = None
    fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.fraction < 1:
            raise ConfigError(f"[sample_loss] fraction must be in [0, 1), got {self.fraction!r}")
        if self.fraction > 0 and self.arm is None:
            raise ConfigError("[sample_loss] a fraction > 0 needs the arm that loses users")


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one simulated experiment needs (see the module docstring for the TOML form).

    seed: every random draw of the simulation derives from it (the world has its own
        ``[world] seed``). salt: the assignment salt. n_days: experiment days. pre_period_days:
        days of history generated before the experiment (training data, CUPED covariate).
    world: ``WorldConfig`` overrides; ``drift_day`` counts experiment days, ``n_days`` is set
        by the simulator (pre-period + experiment) and may not be given.
    training: the bundle config (``recsys train --config`` TOML, parsed).
    arms: at least two; the first is the control.
    """

    arms: tuple[ArmConfig, ...]
    seed: int = 0
    salt: str = "experiment"
    n_days: int = 30
    pre_period_days: int = 14
    world: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    behaviour: BehaviourConfig = field(default_factory=BehaviourConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    monitors: MonitorConfig = field(default_factory=MonitorConfig)
    sample_loss: SampleLossConfig = field(default_factory=SampleLossConfig)

    def __post_init__(self) -> None:
        if len(self.arms) < 2:
            raise ConfigError(f"an experiment needs at least 2 arms, got {len(self.arms)}")
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ConfigError(f"arm names must be unique, got {names}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.salt, str) or not self.salt:
            raise ConfigError(f"salt must be a non-empty string, got {self.salt!r}")
        _positive_int(self.n_days, "n_days")
        _positive_int(self.pre_period_days, "pre_period_days")
        if "n_days" in self.world:
            raise ConfigError(
                "[world] n_days is set by the simulator (pre_period_days + n_days); remove it"
            )
        drift_day = self.world.get("drift_day", 0)
        if self.world.get("drift", "none") != "none" and not 0 < drift_day < self.n_days:
            raise ConfigError(
                f"[world] drift_day counts experiment days and must lie in (0, {self.n_days}), "
                f"got {drift_day!r}"
            )
        if self.monitors.reference_days >= self.n_days:
            raise ConfigError(
                f"[monitors] reference_days ({self.monitors.reference_days}) must be shorter "
                f"than the experiment ({self.n_days} days)"
            )
        for pair in self.analysis.comparisons:
            unknown = [name for name in pair if name not in names]
            if unknown:
                raise ConfigError(f"[analysis] comparisons: {unknown} not among the arms {names}")
        loss = self.sample_loss
        if loss.arm is not None and loss.arm not in names:
            raise ConfigError(f"[sample_loss] arm {loss.arm!r} is not one of the arms {names}")
        self.world_config()  # validates the overrides now, not hours into a run

    @property
    def arm_names(self) -> tuple[str, ...]:
        return tuple(arm.name for arm in self.arms)

    @property
    def weights(self) -> dict[str, float]:
        """Arm name -> relative weight, in arm order (the assignment's interval order)."""
        return {arm.name: float(arm.weight) for arm in self.arms}

    @property
    def drift_day(self) -> int | None:
        """Experiment day the world's drift starts, ``None`` without drift."""
        if self.world.get("drift", "none") == "none":
            return None
        return int(self.world.get("drift_day", 0))

    def world_config(self) -> WorldConfig:
        """The world over pre-period + experiment; its ``drift_day`` counts from the log start."""
        overrides = dict(self.world)
        n_users = int(overrides.get("n_users", WorldConfig().n_users))
        overrides.setdefault(
            "target_interactions",
            max(1, round(DEFAULT_CLICKS_PER_USER_DAY * n_users * self.pre_period_days)),
        )
        overrides["n_days"] = self.pre_period_days + self.n_days
        overrides["drift_day"] = self.pre_period_days + int(overrides.get("drift_day", 0))
        try:
            return WorldConfig.from_overrides(**overrides)
        except TypeError as exc:
            raise ConfigError(f"[world]: {exc}") from exc

    def arm_training(self, arm: ArmConfig) -> dict[str, Any]:
        """The bundle config of ``arm``: the experiment's, with the arm's overrides merged in."""
        config = deep_merge(self.training, arm.training)
        if arm.kind == "popularity":
            config = deep_merge(config, POPULARITY_TRAINING)
        return config

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], base_dir: Path | None = None
    ) -> ExperimentConfig:
        """Build from a parsed TOML document; a ``training`` path is relative to ``base_dir``."""
        values = dict(values)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"experiment config: unknown key(s) {unknown}; known: {sorted(known)}"
            )
        tables = values.pop("arms", None)
        if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
            raise ConfigError("experiment config: [[arms]] tables are required (at least two)")
        arms = tuple(ArmConfig.from_table(t, f"arms.{i}") for i, t in enumerate(tables))
        training = values.pop("training", {})
        if isinstance(training, str):
            path = Path(training)
            training = load_toml(path if path.is_absolute() else (base_dir or Path()) / path)
        sections: dict[str, type[Any]] = {
            "behaviour": BehaviourConfig,
            "analysis": AnalysisConfig,
            "monitors": MonitorConfig,
            "sample_loss": SampleLossConfig,
        }
        built: dict[str, Any] = {
            name: from_mapping(kind, values.pop(name), name)
            for name, kind in sections.items()
            if name in values
        }
        try:
            return cls(arms=arms, training=training, **built, **values)
        except TypeError as exc:
            raise ConfigError(f"experiment config: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (guardrails and the drift config flattened)."""

        def plain(value: Any) -> Any:
            if hasattr(value, "__dataclass_fields__"):
                return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
            if isinstance(value, Mapping):
                return {str(k): plain(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [plain(v) for v in value]
            return value

        out: dict[str, Any] = plain(self)
        return out


def load_experiment_config(path: str | Path) -> ExperimentConfig:
    """Read an experiment TOML file (``ConfigError`` naming the file and the bad key)."""
    file = Path(path)
    return ExperimentConfig.from_mapping(load_toml(file), base_dir=file.parent)


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied recursively (tables merge, other values replace)."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _positive_int(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
