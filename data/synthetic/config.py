"""``WorldConfig``: every knob of the synthetic world, with documented defaults.

The defaults build the embedded default dataset: about 5k users x 2k items x 200k clicks over 30
days, small enough that training every stage on it takes minutes on two cores. The same config
scales to the benchmark size (1M users x 100k items x 20M clicks) by changing the counts only.

Utilities are in "logit" units: a click is a multinomial-logit choice over a slate plus a no-click
option, so a utility difference of 1 multiplies the odds by e.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, get_args

from data.errors import ConfigError
from data.validation import (
    finite_float,
    fraction,
    integer,
    is_number,
    non_negative_float,
    non_negative_int,
    one_of,
    positive_float,
    positive_int,
)

Drift = Literal["none", "concept", "covariate", "prior"]
ConceptShift = Literal["individual", "shared"]

SECONDS_PER_DAY = 86_400
HOURS_PER_DAY = 24

# Relative session start rates per UTC hour: quiet nights, a morning rise, an evening peak
# (the usual shape of consumer-app traffic).
DEFAULT_HOUR_PROFILE: tuple[float, ...] = (
    0.40, 0.25, 0.15, 0.10, 0.10, 0.15, 0.35, 0.60, 0.80, 0.90, 1.00, 1.05,
    1.10, 1.00, 0.95, 0.95, 1.00, 1.15, 1.35, 1.55, 1.65, 1.50, 1.10, 0.70,
)  # fmt: skip

# 2026-01-01T00:00:00Z: the fixed start of every synthetic log (timestamps are Unix seconds).
DEFAULT_START = 1_767_225_600


@dataclass(frozen=True)
class WorldConfig:
    """The synthetic world: sizes, preference structure, behaviour model, drift and seed.

    Sizes
        n_users, n_items: population and catalogue size.
        n_days: length of the generated log, in days from ``start``.
        target_interactions: clicks to generate, approximately (the session rate is calibrated
            on a pilot sample of slates, then sessions are Poisson, so expect ~1% deviation).
        start: Unix seconds of day 0 (default 2026-01-01 UTC).

    Preference structure
        dim: true latent dimension of user and item vectors.
        n_categories: item categories; item vectors are built around one centroid per category,
            so categories carry real signal.
        category_concentration: Dirichlet concentration of category sizes (large = equal sizes).
        item_noise: spread of item vectors around their category centroid (centroids have norm 1).
        max_interests: categories each user is interested in (a user vector mixes their centroids).
        interest_concentration: Dirichlet concentration of a user's weights over their interests
            (small = one dominant interest).
        user_noise: idiosyncratic part of a user vector, relative to the unit-norm centroids.
        affinity_scale: utility of a perfect user-item match; scales user vectors, and with it how
            much personal taste matters relative to item quality and position.
        quality_std: standard deviation of item quality, an additive utility term every user sees.
        quality_popularity_corr: correlation of quality with (log) exposure popularity: popular
            items are somewhat better, not only more visible.

    Popularity, users and catalogue
        popularity_exponent: item exposure popularity is Zipfian, ``rank ** -exponent``
            (1.0 is the classic Zipf law of consumer catalogues).
        activity_sigma: user activity is lognormal with this sigma (1.0: the top 1% of users
            produce roughly 10% of the sessions).
        initial_item_fraction: share of items already released at day 0; the rest are released
            uniformly over the log's days. Must be > 0 so day 0 has something to show.
        catalogue_history_days: initial items were created uniformly over this many days
            before ``start`` (only their ``created_at`` depends on it).

    Sessions and slates
        mean_slates_per_session: slates (screens) per session, 1 + Poisson; each slate gets at
            most one click.
        mean_gap_seconds: mean exponential gap between consecutive slates of a session.
        hour_profile: 24 relative session-start rates per UTC hour (normalised internally).
        slate_size: items per slate.
        position_bias_eta: examination probability of slot ``p`` (0-based) is
            ``(p + 1) ** -eta`` (Joachims et al., 2017); its log is added to the utility.
            0 disables position bias.
        no_click_utility: utility of leaving the slate without a click; with the defaults about
            45% of slates get a click.
        personalized_share: chance that a slot is filled by personalised exposure (a category
            from the user's interests, then an item by popularity within it) rather than by
            global popularity. This is the logging policy that produced the log.

    Drift (from ``drift_day``, ramping in linearly over ``drift_ramp_days``)
        drift: ``"none"``; ``"concept"``: preferences move toward alternative user vectors
            (P(click | user, item) changes); ``"covariate"``: a segment of users becomes more
            active and the others less (who is active changes); ``"prior"``: base engagement
            changes (the no-click utility shifts).
        drift_day: day the drift starts; may lie beyond ``n_days`` (drift that happens after the
            log ends, e.g. during a simulated A/B test).
        drift_strength: concept: final weight of the alternative vectors, in [0, 1];
            covariate: the rising segment's activity is multiplied by ``exp(strength)`` and the
            others' by ``exp(-strength)``; prior: added to the no-click utility (> 0 means fewer
            clicks).
        drift_ramp_days: days over which the drift ramps from 0 to full strength (0 = a step).
        concept_shift: where concept drift moves preferences. ``"individual"``: each user
            toward interests drawn afresh for them (every user's change is private: only that
            user's own clicks reveal it). ``"shared"``: the categories rotate for everyone
            through one permutation (whoever liked category A now likes B), a population-level
            change that aggregate signals (trending, co-visitation, a retrain) can pick up.
        covariate_user_fraction: covariate drift: approximate share of users in the rising
            segment (whole primary-interest categories are picked, so the item mix shifts too).

    Engine
        seed: every random draw derives from it; same seed, same world and log.
        calibration_slates: pilot slates used to estimate the click rate for the session rate.
        chunk_slates: slates simulated per work chunk (bounds memory: ~200 bytes per slot;
            16k keeps a chunk's arrays in the CPU cache). Chunk boundaries follow from the
            config, so results do not depend on the thread count; changing this value changes
            the random draws (not their distribution).
    """

    # Sizes
    n_users: int = 5_000
    n_items: int = 2_000
    n_days: int = 30
    target_interactions: int = 200_000
    start: int = DEFAULT_START
    # Preference structure
    dim: int = 16
    n_categories: int = 20
    category_concentration: float = 2.0
    item_noise: float = 0.6
    max_interests: int = 3
    interest_concentration: float = 0.5
    user_noise: float = 0.3
    affinity_scale: float = 3.0
    quality_std: float = 0.5
    quality_popularity_corr: float = 0.3
    # Popularity, users and catalogue
    popularity_exponent: float = 1.0
    activity_sigma: float = 1.0
    initial_item_fraction: float = 0.7
    catalogue_history_days: float = 365.0
    # Sessions and slates
    mean_slates_per_session: float = 3.0
    mean_gap_seconds: float = 45.0
    hour_profile: tuple[float, ...] = DEFAULT_HOUR_PROFILE
    slate_size: int = 10
    position_bias_eta: float = 1.0
    no_click_utility: float = 3.5
    personalized_share: float = 0.7
    # Drift
    drift: Drift = "none"
    drift_day: int = 20
    drift_strength: float = 1.0
    drift_ramp_days: float = 1.0
    concept_shift: ConceptShift = "individual"
    covariate_user_fraction: float = 0.2
    # Engine
    seed: int = 0
    calibration_slates: int = 20_000
    chunk_slates: int = 16_384

    def __post_init__(self) -> None:
        # JSON gives lists; keep the dataclass hashable and the round trip exact.
        object.__setattr__(self, "hour_profile", tuple(float(x) for x in self.hour_profile))
        _validate(self)

    @property
    def end(self) -> int:
        """Unix seconds at which the log ends (``start + n_days`` days)."""
        return self.start + self.n_days * SECONDS_PER_DAY

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; :meth:`from_dict` inverts it exactly."""
        out = asdict(self)
        out["hour_profile"] = list(self.hour_profile)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> WorldConfig:
        """Build from a dict (e.g. ``world.json``); unknown keys raise ``ConfigError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"WorldConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_overrides(cls, **overrides: Any) -> WorldConfig:
        """Defaults with ``overrides`` applied, keeping clicks per user when only sizes change.

        If ``n_users`` is overridden but ``target_interactions`` is not, the target scales with
        the population (the default's 40 clicks per user), so ``--users 500`` gives a world as
        dense as the default rather than one with 400 clicks per user.
        """
        base = cls()
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"WorldConfig: unknown field(s) {unknown}")
        if "n_users" in overrides and "target_interactions" not in overrides:
            per_user = base.target_interactions / base.n_users
            overrides["target_interactions"] = max(1, round(per_user * int(overrides["n_users"])))
        return replace(base, **overrides)


def _validate(c: WorldConfig) -> None:
    """Raise ``ConfigError`` naming the first invalid field and its value."""
    positive_ints = ("n_users", "n_items", "n_days", "target_interactions", "dim",
                     "n_categories", "max_interests", "slate_size", "calibration_slates",
                     "chunk_slates")  # fmt: skip
    for name in positive_ints:
        positive_int(getattr(c, name), f"WorldConfig.{name}")
    non_negative = ("item_noise", "user_noise", "affinity_scale", "quality_std",
                    "popularity_exponent", "activity_sigma", "catalogue_history_days",
                    "position_bias_eta", "drift_strength", "drift_ramp_days")  # fmt: skip
    for name in non_negative:
        non_negative_float(getattr(c, name), f"WorldConfig.{name}")
    for name in ("category_concentration", "interest_concentration", "mean_gap_seconds"):
        positive_float(getattr(c, name), f"WorldConfig.{name}")
    finite_float(c.no_click_utility, "WorldConfig.no_click_utility")
    unit_intervals = (
        ("quality_popularity_corr", False),
        ("personalized_share", False),
        ("initial_item_fraction", True),
        ("covariate_user_fraction", True),
    )
    for name, lo_open in unit_intervals:
        fraction(getattr(c, name), f"WorldConfig.{name}", low_open=lo_open)
    if c.max_interests > c.n_categories:
        raise ConfigError(
            f"WorldConfig.max_interests ({c.max_interests}) exceeds n_categories ({c.n_categories})"
        )
    if c.n_categories > c.n_items:
        raise ConfigError(
            f"WorldConfig.n_categories ({c.n_categories}) exceeds n_items ({c.n_items})"
        )
    non_negative_float(c.mean_slates_per_session, "WorldConfig.mean_slates_per_session", minimum=1)
    if (
        len(c.hour_profile) != HOURS_PER_DAY
        or not all(is_number(x) and math.isfinite(x) and x >= 0 for x in c.hour_profile)
        or sum(c.hour_profile) <= 0
    ):
        raise ConfigError(
            f"WorldConfig.hour_profile must be {HOURS_PER_DAY} non-negative rates with a positive "
            f"sum, got {list(c.hour_profile)}"
        )
    one_of(c.drift, "WorldConfig.drift", get_args(Drift))
    non_negative_int(c.drift_day, "WorldConfig.drift_day")
    one_of(c.concept_shift, "WorldConfig.concept_shift", get_args(ConceptShift))
    if c.drift == "concept" and c.drift_strength > 1:
        raise ConfigError(
            "WorldConfig.drift_strength is the final weight of the alternative preferences under "
            f"concept drift and must lie in [0, 1], got {c.drift_strength!r}"
        )
    non_negative_int(c.seed, "WorldConfig.seed")
    integer(c.start, "WorldConfig.start (Unix seconds)")
