"""Re-ranking configuration: an ordered list of rules, each with its own frozen config.

The ``[reranking]`` table of the project's TOML file lists the rules in the order they run::

    [[reranking.rules]]
    name = "filter_seen"

    [[reranking.rules]]
    name = "filter_blocked"
    item_ids = ["m-13", "m-666"]

    [[reranking.rules]]
    name = "freshness_boost"
    max_age_days = 7.0
    bonus = 0.1

    [[reranking.rules]]
    name = "category_cap"
    max_per_category = 3

    [[reranking.rules]]
    name = "exploration"
    positions = [4, 9]

    [[reranking.rules]]
    name = "pins"
    items = { "m-42" = 0 }

Every rule has one config dataclass below; :meth:`RerankerConfig.from_mapping` turns the table into
them and raises ``ConfigError`` naming the rule (its place in the list and its name) and the field
at fault. The same rule may appear more than once (two ``boost`` rules, one additive and one
multiplicative, for example).

Items and categories are named by their external ids (strings), as a person writes them; the
engine resolves them to indices when it is built (see :mod:`reranking.engine`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, ClassVar

from data.configuration import from_mapping
from data.errors import ConfigError
from data.validation import (
    boolean,
    finite_float,
    fraction,
    non_negative_int,
    one_of,
    positive_float,
    positive_int,
)

# ---------------------------------------------------------------------------------- validation
# Scalars are checked with data.validation (named "rule.field"); these check the collections.


def _check_names(rule: str, name: str, values: Iterable[object]) -> None:
    """Item ids and category names are strings, as in the data (a TOML integer is a mistake)."""
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise ConfigError(f"{rule}.{name} must hold strings (ids/names), got {bad[:5]!r}")


def _as_tuple(config: object, rule: str, name: str) -> None:
    """Store a sequence field as a tuple, so a config built in Python with a list stays frozen."""
    value = getattr(config, name)
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"{rule}.{name} must be a list, got {value!r}")
    object.__setattr__(config, name, tuple(value))


def _as_mapping(config: object, rule: str, name: str) -> None:
    """Store a table field as a read-only copy: the frozen config cannot be changed through it."""
    value = getattr(config, name)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{rule}.{name} must be a table, got {value!r}")
    object.__setattr__(config, name, MappingProxyType(dict(value)))


# ---------------------------------------------------------------------------------- filters


@dataclass(frozen=True)
class FilterSeenConfig:
    """Remove the items the user has already interacted with (``RerankRequest.seen``)."""

    name: ClassVar[str] = "filter_seen"


@dataclass(frozen=True)
class FilterExcludedConfig:
    """Remove the items the request asks to exclude (``RerankRequest.exclude``)."""

    name: ClassVar[str] = "filter_excluded"


@dataclass(frozen=True)
class FilterUnavailableConfig:
    """Remove items marked unavailable (``ItemSideInfo.available``: out of stock, withdrawn)."""

    name: ClassVar[str] = "filter_unavailable"


@dataclass(frozen=True)
class FilterBlockedConfig:
    """Remove a global set of blocked items (legal takedowns, editorial blocks).

    item_ids: external item ids. Ids the catalogue does not know are ignored: such an item can
        never be a candidate, so there is nothing to block (and a takedown list may name items
        this bundle has never seen). More blocked items can be given to the engine as indices.
    """

    name: ClassVar[str] = "filter_blocked"
    item_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _as_tuple(self, self.name, "item_ids")
        _check_names(self.name, "item_ids", self.item_ids)


# ---------------------------------------------------------------------------------- reordering

SIMILARITIES = ("auto", "embedding", "category")
SAMPLINGS = ("uniform", "score")
BOOST_MODES = ("multiply", "add")


@dataclass(frozen=True)
class CategoryCapConfig:
    """At most ``max_per_category`` items of one primary category in the final ``k``.

    Items over the cap are pushed below every item within it, not removed: when too few items
    respect the cap to fill ``k``, the pushed-down items fill the rest. Items without a category
    are never capped.

    max_per_category: default 3; with the usual ``k = 10`` that leaves room for at least four
        categories on a full slate, without forcing variety on a user with one clear taste.
    """

    name: ClassVar[str] = "category_cap"
    max_per_category: int = 3

    def __post_init__(self) -> None:
        positive_int(self.max_per_category, f"{self.name}.max_per_category")


@dataclass(frozen=True)
class MMRConfig:
    """Greedy maximal marginal relevance (Carbonell & Goldstein, SIGIR 1998) over the top items.

    Each free slot of the final ``k`` takes, among the first ``n_candidates`` candidates, the item
    maximising ``w * relevance - (1 - w) * max similarity to the items already on the slate``, with
    relevance the score min-max normalised to [0, 1] over those candidates.

    relevance_weight: ``w``, the lambda of MMR, in [0, 1]. 1 keeps the score order, 0 picks for
        diversity alone. Default 0.7: relevance stays the main criterion, and only near-duplicates
        of an item already shown lose their place to a slightly lower-scored different item.
    n_candidates: how deep MMR looks. Default 100: a few times ``k``, enough alternatives for
        every slot, and it bounds the per-user cost (``k * n_candidates * d`` operations).
    similarity: ``"embedding"`` (cosine of ``ItemSideInfo.embeddings``), ``"category"`` (1 for the
        same primary category, else 0) or ``"auto"`` (embeddings when given, else categories).
    """

    name: ClassVar[str] = "mmr"
    relevance_weight: float = 0.7
    n_candidates: int = 100
    similarity: str = "auto"

    def __post_init__(self) -> None:
        fraction(self.relevance_weight, f"{self.name}.relevance_weight")
        positive_int(self.n_candidates, f"{self.name}.n_candidates")
        one_of(self.similarity, f"{self.name}.similarity", SIMILARITIES)


@dataclass(frozen=True)
class FreshnessBoostConfig:
    """Raise the score of new items, then re-sort.

    An item ``age`` seconds old gets ``bonus * range * max(0, 1 - age / max_age)``, with
    ``range`` the spread (max - min) of the user's candidate scores: the boost decays linearly
    from ``bonus * range`` at release to nothing at ``max_age_days``. Measuring it in units of the
    spread makes the setting mean the same for any ranker (LambdaRank scores, probabilities, or
    retrieval scores when ranking degraded). Items of unknown release time get nothing.

    max_age_days: default 7, one week, the horizon over which "new" still means something for
        most catalogues (and the default popularity half-life of the trending source).
    bonus: default 0.1: a brand-new item moves up past items within a tenth of the score spread,
        a nudge that reorders near-ties but does not promote a poor match to the top.
    """

    name: ClassVar[str] = "freshness_boost"
    max_age_days: float = 7.0
    bonus: float = 0.1

    def __post_init__(self) -> None:
        positive_float(self.max_age_days, f"{self.name}.max_age_days")
        finite_float(self.bonus, f"{self.name}.bonus")


@dataclass(frozen=True)
class ExplorationConfig:
    """Reserve slate positions for items drawn from below the slate (positions ``>= k``).

    The draw uses a generator seeded by (request seed, rule, user key, request key), so a request
    replayed gives the same slate, and a user's slate does not depend on the rest of the batch.

    positions: 0-based slots of the final ``k`` to fill, e.g. ``[4, 9]``. Default ``(4, 9)``: two
        of the first ten, in the middle and at the end, exposure enough to learn about items the
        ranker is unsure of without touching the top of the slate.
    pool_size: how many candidates below the slate to draw from. Default 100: items the ranker
        still placed near the top, rather than the tail of the candidate list.
    sampling: ``"uniform"`` over the pool, or ``"score"``: probability proportional to
        ``exp(normalised score / temperature)``, scores min-max normalised over the pool.
    temperature: for ``"score"``. Default 0.25: the best of the pool is e^4 (about 55) times as
        likely as the worst, a clear preference that still leaves every item a chance.
    """

    name: ClassVar[str] = "exploration"
    positions: tuple[int, ...] = (4, 9)
    pool_size: int = 100
    sampling: str = "uniform"
    temperature: float = 0.25

    def __post_init__(self) -> None:
        _as_tuple(self, self.name, "positions")
        positions = [non_negative_int(p, f"{self.name}.positions") for p in self.positions]
        if len(set(positions)) != len(positions):
            raise ConfigError(f"{self.name}.positions repeats a position: {positions}")
        object.__setattr__(self, "positions", tuple(sorted(positions)))
        positive_int(self.pool_size, f"{self.name}.pool_size")
        one_of(self.sampling, f"{self.name}.sampling", SAMPLINGS)
        positive_float(self.temperature, f"{self.name}.temperature")


@dataclass(frozen=True)
class PinsConfig:
    """Put given items at fixed positions of the final slate.

    items: item id -> 0-based position; no two items may share a position.
    insert_if_absent: default ``False``: a pin applies only when the item is among the user's
        candidates, so the re-ranker never shows an item the earlier stages did not propose.
        ``True`` inserts a pinned item that was not in the candidate list at all (a sponsored
        slot); its score is NaN (it has none). Either way, an item that a filter listed before
        the pins removed, or would have removed (seen, blocked, unavailable, excluded), is
        never put back.
    """

    name: ClassVar[str] = "pins"
    items: Mapping[str, int] = field(default_factory=dict)
    insert_if_absent: bool = False

    def __post_init__(self) -> None:
        _as_mapping(self, self.name, "items")
        _check_names(self.name, "items", self.items)
        positions = [non_negative_int(p, f"{self.name}.items") for p in self.items.values()]
        if len(set(positions)) != len(positions):
            raise ConfigError(f"{self.name}.items: two items pinned to one position: {positions}")
        boolean(self.insert_if_absent, f"{self.name}.insert_if_absent")


@dataclass(frozen=True)
class BoostConfig:
    """Change the scores of given items and categories, then re-sort.

    items / categories: item id / category name -> factor. An item matching both gets both
        (category first, then item).
    mode: ``"multiply"`` (factor > 0; 1 is neutral) or ``"add"`` (score units; 0 is neutral).
        Multiplying applies ``s + (f - 1) * |s|``: that is ``f * s`` for a non-negative score,
        and for a negative one (LambdaRank scores are often negative) it still moves the score up
        when ``f > 1`` and down when ``f < 1``, as a boost should.
    """

    name: ClassVar[str] = "boost"
    items: Mapping[str, float] = field(default_factory=dict)
    categories: Mapping[str, float] = field(default_factory=dict)
    mode: str = "multiply"

    def __post_init__(self) -> None:
        one_of(self.mode, f"{self.name}.mode", BOOST_MODES)
        check_factor = positive_float if self.mode == "multiply" else finite_float
        for table in ("items", "categories"):
            _as_mapping(self, self.name, table)
            values = getattr(self, table)
            _check_names(self.name, table, values)
            for value in values.values():
                check_factor(value, f"{self.name}.{table}")


RuleConfig = (
    FilterSeenConfig
    | FilterExcludedConfig
    | FilterUnavailableConfig
    | FilterBlockedConfig
    | CategoryCapConfig
    | MMRConfig
    | FreshnessBoostConfig
    | ExplorationConfig
    | PinsConfig
    | BoostConfig
)

RULE_CONFIGS: Mapping[str, type[RuleConfig]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            FilterSeenConfig,
            FilterExcludedConfig,
            FilterUnavailableConfig,
            FilterBlockedConfig,
            CategoryCapConfig,
            MMRConfig,
            FreshnessBoostConfig,
            ExplorationConfig,
            PinsConfig,
            BoostConfig,
        )
    }
)
"""Rule name (the ``name`` key in TOML) -> its config class."""


def _default_rules() -> tuple[RuleConfig, ...]:
    # Only the filters: they make a response correct (nothing seen, excluded, unavailable or
    # blocked). Diversity, freshness, exploration and pins are product choices a deployment opts
    # into, and they change offline metrics, so they are not switched on behind anyone's back.
    return (
        FilterSeenConfig(),
        FilterExcludedConfig(),
        FilterUnavailableConfig(),
        FilterBlockedConfig(),
    )


@dataclass(frozen=True)
class RerankerConfig:
    """The rules, in the order they run (see the module docstring for the TOML form).

    rules: default: the four filters (seen, excluded, unavailable, blocked) and nothing else.
    """

    rules: tuple[RuleConfig, ...] = field(default_factory=_default_rules)

    def __post_init__(self) -> None:
        _as_tuple(self, "reranking", "rules")
        known = tuple(RULE_CONFIGS.values())
        for i, rule in enumerate(self.rules):
            if not isinstance(rule, known):
                raise ConfigError(
                    f"reranking.rules[{i}] is a {type(rule).__name__}, not a rule config"
                )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> RerankerConfig:
        """Parse the ``[reranking]`` table; ``None`` gives the default rules."""
        values = dict(values or {})
        unknown = sorted(set(values) - {"rules"})
        if unknown:
            raise ConfigError(f"[reranking]: unknown key(s) {unknown}; known: ['rules']")
        if "rules" not in values:
            return cls()
        entries = values["rules"]
        if not isinstance(entries, Sequence) or isinstance(entries, str):
            raise ConfigError(f"[reranking] rules must be a list of tables, got {entries!r}")
        return cls(tuple(_rule_from_mapping(i, entry) for i, entry in enumerate(entries)))

    def to_mapping(self) -> dict[str, Any]:
        """The TOML/JSON-friendly form that :meth:`from_mapping` reads back."""
        return {"rules": [_rule_to_mapping(rule) for rule in self.rules]}


def _rule_from_mapping(i: int, entry: object) -> RuleConfig:
    where = f"reranking.rules[{i}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"[{where}] must be a table, got {entry!r}")
    values = dict(entry)
    name = values.pop("name", None)
    if name not in RULE_CONFIGS:
        raise ConfigError(f"[{where}] unknown rule name {name!r}; known: {sorted(RULE_CONFIGS)}")
    try:
        return from_mapping(RULE_CONFIGS[name], values, f"{where} {name}")
    except ConfigError as exc:
        message = str(exc)
        # from_mapping already says where for unknown keys; value errors only name rule.field.
        raise ConfigError(message if message.startswith("[") else f"[{where}] {message}") from exc


def _rule_to_mapping(rule: RuleConfig) -> dict[str, Any]:
    values: dict[str, Any] = {"name": rule.name}
    for f in fields(rule):
        value = getattr(rule, f.name)
        if isinstance(value, Mapping):
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        values[f.name] = value
    return values
