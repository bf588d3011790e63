"""Generate the interaction log of a synthetic world: sessions, slates, exposure and clicks.

The process, per chunk of users and fully vectorised within a chunk:

1. Sessions: each user's count is Poisson in their activity (lognormal across users); start times
   are a uniform day, an hour from the hour-of-day profile and a uniform second. Covariate drift
   changes the rate over time; sessions are drawn at each user's peak rate and thinned
   (Lewis & Shedler, 1979), which is exact for any ramp.
2. Slates: 1 + Poisson slates per session, separated by exponential gaps.
3. Exposure (the logging policy, ``_LoggingPolicy``): each slot is personalised with probability
   ``personalized_share`` (a category from the user's interests, then an item by popularity
   within it) or else global popularity, always among items released by the start of the
   slate's hour (a new item becomes exposable at the first hour boundary after its release).
   Duplicates within a slate are redrawn. The policy knows the users' original interests only,
   so under concept drift the exposure goes stale while the clicks follow the new preferences.
4. Clicks: at most one per slate, drawn from the world's multinomial logit
   (``World._sample_clicks``), the same code the A/B simulator uses.

The session rate is calibrated on a pilot sample of slates so the log has about
``target_interactions`` clicks. Every chunk has its own random stream (``SeedSequence`` spawn
keys), and chunk boundaries follow from the config alone, so the result is identical for any
number of worker threads. NumPy releases the GIL in the heavy kernels, so threads scale.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from data.schema import ITEM_ID, TIMESTAMP, USER_ID, WEIGHT
from data.synthetic.config import HOURS_PER_DAY, SECONDS_PER_DAY, WorldConfig
from data.synthetic.world import STREAM_CALIBRATION, STREAM_LOG, World, seed_sequence

# Guide-table buckets per stored item: more buckets, fewer scan steps (2: ~1 in 8 draws steps).
_GUIDE_DENSITY = 2
# Rounds of redrawing duplicate items within a slate; slots still duplicated stay empty (-1).
_DEDUP_ROUNDS = 3
_SECONDS_PER_HOUR = 3_600


@dataclass(frozen=True, eq=False)
class ClickLog:
    """Generated clicks in time order (ties keep generation order); all arrays have shape (n,).

    Attributes:
        user: int32 user index.  item: int32 item index.  timestamp: int64 Unix seconds.
        position: int16 0-based slot of the clicked item in its slate (for position-bias checks).
        n_sessions, n_slates: how many sessions and slates were simulated (clicked or not).
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    position: np.ndarray
    n_sessions: int
    n_slates: int


@dataclass(frozen=True, eq=False)
class SyntheticData:
    """A generated dataset and the world behind it.

    Attributes:
        world: the ground truth (save it next to the dataset as ``world/``).
        interactions: canonical interaction frame (``data.schema``), one row per click
            (weight 1.0), sorted by timestamp; ids are ``"u<idx>"`` / ``"i<idx>"``.
        items: ``item_id`` str, ``categories`` list[str] (one ``"c<idx>"``), ``created_at``
            int64 Unix seconds (release time; before the log's start for the initial catalogue).
        users: ``user_id`` str, ``home_category`` str (the user's strongest interest, like a
            declared interest at sign-up).
        positions: (n_interactions,) int16, slate slot of each click, aligned with the rows of
            ``interactions``.
        n_sessions, n_slates: simulated sessions and slates (the click rate is
            ``len(interactions) / n_slates``).
    """

    world: World
    interactions: pl.DataFrame
    items: pl.DataFrame
    users: pl.DataFrame
    positions: np.ndarray
    n_sessions: int
    n_slates: int


def generate(
    config: WorldConfig, *, progress: bool = False, workers: int | None = None
) -> SyntheticData:
    """Sample a world from ``config`` and simulate its interaction log (deterministic in seed).

    ``progress`` shows a progress bar on stderr; ``workers`` threads simulate chunks in parallel
    (default: the CPUs this process may use). The result does not depend on ``workers``.
    """
    world = World.sample(config)
    log = simulate_log(world, progress=progress, workers=workers)
    return SyntheticData(
        world=world,
        interactions=interactions_frame(log),
        items=items_frame(world),
        users=users_frame(world),
        positions=log.position,
        n_sessions=log.n_sessions,
        n_slates=log.n_slates,
    )


def simulate_log(world: World, *, progress: bool = False, workers: int | None = None) -> ClickLog:
    """Simulate sessions, exposure and clicks for every user of ``world`` over its ``n_days``.

    ``workers`` threads run the chunks (default: the CPUs this process may use); the result is
    the same for any number. Memory: the output (18 bytes per click, held twice while it is
    put in time order) plus ``workers`` chunks in flight (~200 bytes per slot of a chunk).
    """
    policy = _LoggingPolicy(world)
    plan = _plan_sessions(world, policy)
    n_workers = max(1, workers if workers is not None else _available_cpus())

    def run(chunk: int) -> _Chunk:
        return _simulate_chunk(world, policy, plan, chunk)

    chunks: list[_Chunk] = []
    with (
        ThreadPoolExecutor(max_workers=n_workers) as pool,
        tqdm(total=plan.n_chunks, desc="synthetic log", unit="chunk", disable=not progress) as bar,
    ):
        for chunk in pool.map(run, range(plan.n_chunks)):  # map keeps chunk order
            chunks.append(chunk)
            bar.update()
    return _assemble(chunks)


# ---------------------------------------------------------------------- frames


def interactions_frame(log: ClickLog) -> pl.DataFrame:
    """The canonical interaction frame of ``log`` (rows in the log's time order)."""
    n_users = int(log.user.max()) + 1 if log.user.size else 0
    n_items = int(log.item.max()) + 1 if log.item.size else 0
    # Format each id once and gather: far cheaper than formatting one string per event.
    return pl.DataFrame(
        {
            USER_ID: _id_strings("u", n_users).gather(log.user),
            ITEM_ID: _id_strings("i", n_items).gather(log.item),
            TIMESTAMP: pl.Series(log.timestamp, dtype=pl.Int64),
            WEIGHT: pl.Series(np.ones(log.user.size, dtype=np.float32)),
        }
    )


def items_frame(world: World) -> pl.DataFrame:
    """``item_id``, ``categories`` (list of one ``"c<idx>"``), ``created_at`` for every item."""
    category = _id_strings("c", world.config.n_categories).gather(world.item_category)
    return pl.DataFrame(
        {
            ITEM_ID: _id_strings("i", world.n_items),
            "categories": category.to_frame("c").select(pl.concat_list("c")).to_series(),
            "created_at": pl.Series(world.item_release, dtype=pl.Int64),
        }
    )


def users_frame(world: World) -> pl.DataFrame:
    """``user_id`` and ``home_category`` (strongest interest) for every user."""
    home = _id_strings("c", world.config.n_categories).gather(world.user_interests[:, 0])
    return pl.DataFrame({USER_ID: _id_strings("u", world.n_users), "home_category": home})


def _id_strings(prefix: str, n: int) -> pl.Series:
    """``[f"{prefix}0", ..., f"{prefix}{n-1}"]`` as a polars String series."""
    return pl.select(pl.format(prefix + "{}", pl.int_range(n, dtype=pl.Int64))).to_series()


# ---------------------------------------------------------------------- exposure (logging policy)


class _GroupedPopularitySampler:
    """Draws items with probability proportional to a weight within a group (e.g. a category),
    among the items released by the start of the hour, in expected O(1) per draw.

    Entries are stored grouped, in release order within a group, with each group's normalised
    cumulative weight ``within`` (1 at the group's last entry). The items released by a time
    are then a prefix of their group, holding the share ``released[group, hour]`` of its
    weight, so a uniform scaled by that share and inverted through ``within`` lands exactly on
    a released item, drawn with probability proportional to its weight: no rejection needed.
    The inversion is an indexed search (Chen & Asau, 1974): a guide table points at or just
    before the answer, and a short forward scan finishes.

    Release is applied per hour (items become exposable from the first hour boundary after
    their release), which keeps the released-share table small: (n_groups, n_hours + 1).
    """

    def __init__(
        self,
        items: np.ndarray,
        weights: np.ndarray,
        groups: np.ndarray,
        n_groups: int,
        release: np.ndarray,
        hour_starts: np.ndarray,
    ) -> None:
        order = np.lexsort((release, groups))  # by group, then release time
        group = groups[order].astype(np.int64)
        sizes = np.bincount(group, minlength=n_groups)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        cum = np.concatenate([[0.0], np.cumsum(weights[order].astype(np.float64))])
        start, total = cum[offsets[:-1]], cum[offsets[1:]] - cum[offsets[:-1]]
        within = (cum[1:] - start[group]) / np.maximum(total, np.finfo(np.float64).tiny)[group]
        within[offsets[1:][sizes > 0] - 1] = 1.0  # exactly 1 at each group's end: scans stop there
        self._items = items[order].astype(np.int64)
        self._within = within

        # Guide table: group g owns density * size + 1 buckets; bucket b points at the first
        # slot whose within exceeds b / n_buckets (the extra bucket guards u * n rounding up).
        n_buckets = _GUIDE_DENSITY * sizes
        bucket_group = np.repeat(np.arange(n_groups), n_buckets + 1)
        bucket_offsets = np.concatenate([[0], np.cumsum(n_buckets + 1)])
        bucket = np.arange(bucket_group.size) - bucket_offsets[bucket_group]
        fraction = bucket / np.maximum(n_buckets, 1)[bucket_group]
        guide = np.searchsorted(group + within, bucket_group + fraction, side="right")
        self._guide = np.minimum(guide, offsets[1:][bucket_group] - 1)
        self._n_buckets = n_buckets.astype(np.float64)
        self._bucket_offset = bucket_offsets[:-1].astype(np.float64)

        # released[g, h]: weight share of group g released by hour_starts[h], found by one
        # search of (group, hour start) in the group-major release key.
        release_sorted = release[order].astype(np.int64)
        origin = int(release_sorted.min())
        span = int(release_sorted.max()) - origin + 2
        release_key = group * span + (release_sorted - origin)
        since = np.clip(hour_starts.astype(np.int64) - origin, -1, span - 2)
        queries = np.arange(n_groups)[:, None] * span + since[None, :]
        end = np.searchsorted(release_key, queries, side="right")  # (n_groups, n_hours)
        first = offsets[:-1, None]
        share = np.where(end > first, within[np.maximum(end - 1, 0)], 0.0)
        self._released_share = share.ravel()
        self._n_hours = hour_starts.size

    def sample(self, groups: np.ndarray, hours: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(m,) int64 item per draw; -1 where the group has nothing released by the hour.

        ``groups``: (m,) int64 group ids; ``hours``: (m,) int64 indices into ``hour_starts``.
        """
        share = self._released_share[groups * self._n_hours + hours]
        u = rng.random(groups.size) * share
        n_buckets = self._n_buckets[groups]
        bucket = (u * n_buckets + self._bucket_offset[groups]).astype(np.int64)
        slot = self._guide[bucket]
        # The answer is the first slot with within > u; within >= share > u at the end of the
        # released prefix, so the scan never leaves it.
        need = np.flatnonzero(self._within[slot] <= u)
        while need.size:  # rarely more than one step: a bucket holds < 1 item on average
            slot[need] += 1
            need = need[self._within[slot[need]] <= u[need]]
        return np.where(share > 0, self._items[slot], -1)


class _LoggingPolicy:
    """The recommender that produced the log: fills each slate slot (see the module docstring).

    A slot's source is one of ``K + 1`` options per user: interest category ``k`` with
    probability ``personalized_share * weight_k``, else the whole catalogue (group id
    ``n_categories``), so one uniform and one sampler serve every slot.
    """

    def __init__(self, world: World) -> None:
        c = world.config
        self._slate_size = c.slate_size
        self._everything = c.n_categories  # group id of the whole catalogue
        self._start = c.start
        n_users = c.n_users
        # C order matters: the hot loops gather columns and compare whole rows.
        self._options = np.ascontiguousarray(
            np.concatenate([world.user_interests.T, np.full((1, n_users), c.n_categories)]),
            dtype=np.int64,
        )
        cdf = np.cumsum(world.user_interest_weights.T.astype(np.float64), axis=0)
        cdf[-1] = 1.0
        self._option_cdf = np.ascontiguousarray(c.personalized_share * cdf, dtype=np.float32)
        # One more hour than the log covers: the last sessions' slates may run past its end.
        self._n_hours = c.n_days * HOURS_PER_DAY + 1
        items = np.arange(c.n_items)
        self._sampler = _GroupedPopularitySampler(
            items=np.concatenate([items, items]),
            weights=np.concatenate([world.item_popularity, world.item_popularity]),
            groups=np.concatenate([world.item_category, np.full(c.n_items, c.n_categories)]),
            n_groups=c.n_categories + 1,
            release=np.concatenate([world.item_release, world.item_release]),
            hour_starts=c.start + np.arange(self._n_hours) * _SECONDS_PER_HOUR,
        )

    def sample(self, users: np.ndarray, times: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Slates for (n,) users at (n,) times >= ``start``, slot-major: (S, n) int64 items.

        -1 marks an empty slot (a duplicate that could not be redrawn).
        """
        n, size = users.size, self._slate_size
        draw = rng.random((size, n), dtype=np.float32)
        option_cdf = np.take(self._option_cdf, users, axis=1)
        option = np.zeros((size, n), dtype=np.int64)
        for k in range(option_cdf.shape[0]):  # K vectorised steps
            option += draw >= option_cdf[k]
        group = np.take_along_axis(np.take(self._options, users, axis=1), option, axis=0).ravel()
        hour = np.minimum((times - self._start) // _SECONDS_PER_HOUR, self._n_hours - 1)
        hours = np.tile(hour, size)  # flat slot f is slot f // n of slate f % n
        slates = self._draw(group, hours, rng)

        rows = np.arange(n)
        for _ in range(_DEDUP_ROUNDS):
            repeats = _duplicate_slots(slates.reshape(size, n), rows)
            if repeats.size == 0:
                break
            slates[repeats] = self._draw(group[repeats], hours[repeats], rng)
            again = np.zeros(n, dtype=bool)
            again[repeats % n] = True
            rows = np.flatnonzero(again)
        else:
            slates[_duplicate_slots(slates.reshape(size, n), rows)] = -1
        return slates.reshape(size, n)

    def _draw(self, group: np.ndarray, hours: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item per slot; a category with nothing released yet falls back to the catalogue."""
        items = self._sampler.sample(group, hours, rng)
        empty = np.flatnonzero(items < 0)
        if empty.size:
            everything = np.full(empty.size, self._everything, dtype=np.int64)
            items[empty] = self._sampler.sample(everything, hours[empty], rng)
        return items


def _duplicate_slots(slates: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Flat indices (``slot * n + row``) of slots in ``rows`` of slot-major (S, n) ``slates``
    that repeat an earlier slot's item."""
    block = np.take(slates, rows, axis=1)  # C order: the row comparisons below stay contiguous
    repeated = np.zeros(block.shape, dtype=bool)
    for j in range(1, block.shape[0]):  # S - 1 vectorised steps, not a loop over events
        repeated[j] = (block[:j] == block[j]).any(axis=0)
    repeated &= block >= 0
    hit_slot, hit_row = np.nonzero(repeated)
    return hit_slot * slates.shape[1] + rows[hit_row]


# ---------------------------------------------------------------------- sessions and chunks


@dataclass(frozen=True, eq=False)
class _SessionPlan:
    """Calibrated session rates and the chunking of users.

    rate: sessions per unit of activity over the whole log; peak_multiplier: (n_users,) the
    highest activity factor each user reaches (sessions are drawn at it, then thinned);
    hour_cdf: (24,) cumulative hour-of-day profile; bounds: (n_chunks + 1,) user index bounds.
    """

    rate: float
    peak_multiplier: np.ndarray
    hour_cdf: np.ndarray
    bounds: np.ndarray

    @property
    def n_chunks(self) -> int:
        return self.bounds.size - 1


@dataclass(frozen=True, eq=False)
class _Chunk:
    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    position: np.ndarray
    n_sessions: int
    n_slates: int


def _plan_sessions(world: World, policy: _LoggingPolicy) -> _SessionPlan:
    """Calibrate the session rate on pilot slates so the log has ~``target_interactions`` clicks."""
    c = world.config
    profile = np.asarray(c.hour_profile)
    hour_cdf = np.cumsum(profile) / profile.sum()
    peak = np.maximum(1.0, world.drift_activity_multiplier.astype(np.float64))
    weight = world.user_activity * _mean_activity_multiplier(world)

    rng = np.random.default_rng(seed_sequence(c, STREAM_CALIBRATION))
    users = rng.choice(c.n_users, size=c.calibration_slates, p=weight / weight.sum())
    times = _session_starts(rng, c, hour_cdf, users.size)
    slates = policy.sample(users, times, rng)
    weights = world._choice_weights(users, slates, times, _log_bias(world))
    click_rate = float(1.0 - (weights[-1] / weights.sum(axis=0)).mean())

    sessions = c.target_interactions / (c.mean_slates_per_session * max(click_rate, 1e-9))
    rate = sessions / float(weight.sum())
    # Chunks of consecutive users holding ~chunk_slates slates each (drawn at peak rate).
    expected = np.cumsum(rate * world.user_activity * peak * c.mean_slates_per_session)
    n_chunks = max(1, math.ceil(expected[-1] / c.chunk_slates))
    cuts = np.searchsorted(expected, np.arange(1, n_chunks) * c.chunk_slates, side="right")
    bounds = np.unique(np.concatenate([[0], cuts, [c.n_users]]))
    return _SessionPlan(rate=rate, peak_multiplier=peak, hour_cdf=hour_cdf, bounds=bounds)


def _mean_activity_multiplier(world: World) -> np.ndarray:
    """(n_users,) each user's activity factor averaged over the log's session-time distribution."""
    c = world.config
    if c.drift != "covariate":
        return np.ones(c.n_users)
    hours = np.arange(c.n_days * HOURS_PER_DAY)
    mid = c.start + hours * _SECONDS_PER_HOUR + _SECONDS_PER_HOUR // 2
    hour_weight = np.asarray(c.hour_profile)[hours % HOURS_PER_DAY]
    progress = world.drift_progress(mid)
    # Only a couple of distinct multipliers exist: average each once, then map back.
    values, inverse = np.unique(world.drift_activity_multiplier, return_inverse=True)
    means = (values[:, None].astype(np.float64) ** progress[None, :]) @ hour_weight
    return (means / hour_weight.sum())[inverse]


def _session_starts(
    rng: np.random.Generator, c: WorldConfig, hour_cdf: np.ndarray, n: int
) -> np.ndarray:
    """(n,) int64 session start times: uniform day, profile hour, uniform second."""
    day = rng.integers(0, c.n_days, n)
    hour = np.minimum(np.searchsorted(hour_cdf, rng.random(n), side="right"), HOURS_PER_DAY - 1)
    second = rng.integers(0, _SECONDS_PER_HOUR, n)
    return c.start + day * SECONDS_PER_DAY + hour * _SECONDS_PER_HOUR + second


def _simulate_chunk(world: World, policy: _LoggingPolicy, plan: _SessionPlan, chunk: int) -> _Chunk:
    """Sessions, slates and clicks of the users in ``plan.bounds[chunk:chunk + 2]``."""
    c = world.config
    rng = np.random.default_rng(seed_sequence(c, STREAM_LOG, chunk))
    users = np.arange(plan.bounds[chunk], plan.bounds[chunk + 1])
    peak_rate = plan.rate * world.user_activity[users] * plan.peak_multiplier[users]
    session_user = np.repeat(users, rng.poisson(peak_rate))
    session_start = _session_starts(rng, c, plan.hour_cdf, session_user.size)
    if c.drift == "covariate":  # thin the peak-rate sessions to the rate at their time
        factor = world.activity_multiplier(session_user, session_start)
        keep = rng.random(session_user.size) * plan.peak_multiplier[session_user] < factor
        session_user, session_start = session_user[keep], session_start[keep]

    n_slates = 1 + rng.poisson(c.mean_slates_per_session - 1, session_user.size)
    user = np.repeat(session_user, n_slates)
    gaps = rng.exponential(c.mean_gap_seconds, user.size)
    first = np.cumsum(n_slates) - n_slates
    gaps[first] = 0.0
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[first], n_slates)  # time since the session's first slate
    times = np.repeat(session_start, n_slates) + elapsed.astype(np.int64)

    slates = policy.sample(user, times, rng)
    clicked = world._sample_clicks(user, slates, times, _log_bias(world), rng, check_release=False)
    hit = np.flatnonzero(clicked >= 0)
    return _Chunk(
        user=user[hit].astype(np.int32),
        item=slates[clicked[hit], hit].astype(np.int32),
        timestamp=times[hit],
        position=clicked[hit].astype(np.int16),
        n_sessions=int(session_user.size),
        n_slates=int(user.size),
    )


def _log_bias(world: World) -> np.ndarray:
    """(S, 1) log position bias of slots 0..S-1, broadcast over a chunk's slates."""
    return world._log_position_bias(np.arange(world.config.slate_size))[:, None]


def _assemble(chunks: list[_Chunk]) -> ClickLog:
    """Concatenate chunk outputs and put them in time order."""
    timestamp = np.concatenate([ch.timestamp for ch in chunks])
    order = _time_order(timestamp)
    return ClickLog(
        user=np.concatenate([ch.user for ch in chunks])[order],
        item=np.concatenate([ch.item for ch in chunks])[order],
        timestamp=timestamp[order],
        position=np.concatenate([ch.position for ch in chunks])[order],
        n_sessions=sum(ch.n_sessions for ch in chunks),
        n_slates=sum(ch.n_slates for ch in chunks),
    )


def _time_order(timestamp: np.ndarray) -> np.ndarray:
    """Stable ordering permutation of int64 ``timestamp``.

    Packs (time offset, row) into one unique int64 key and sorts the keys: unique keys make any
    sort algorithm give the same answer, so NumPy's fast SIMD sort can be used, and it is several
    times quicker than a stable argsort. Falls back to the stable argsort if the key overflows.
    """
    n = timestamp.size
    if n == 0:
        return np.empty(0, dtype=np.int64)
    offset = timestamp - timestamp.min()
    row_bits = max(1, (n - 1).bit_length())
    if int(offset.max()).bit_length() + row_bits > 62:
        return np.argsort(timestamp, kind="stable")
    keys = np.sort((offset << row_bits) | np.arange(n, dtype=np.int64))
    return keys & ((1 << row_bits) - 1)


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
