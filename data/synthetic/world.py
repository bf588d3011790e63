"""The ground truth of the synthetic world: who likes what, how they click, and how that drifts.

A ``World`` holds the true user and item vectors and every behaviour parameter. Its methods are the
oracle that the log generator (``generate.py``) and, later, the A/B simulator use, so both draw
clicks from one model:

- utility ``U(u, i, t) = <p_u(t), v_i> + quality_i``, where ``p_u(t)`` is the user's preference
  vector at time ``t`` (it moves toward an alternative vector under concept drift);
- a slate of ``S`` items shown at positions ``0..S-1`` gets at most one click, a multinomial logit
  over the slate plus a no-click option (McFadden, 1974) with position bias as an additive
  ``log((pos + 1) ** -eta)`` (Joachims et al., 2017):
  ``P(slot j) ∝ exp(U_j + log bias(pos_j))``, ``P(no click) ∝ exp(no_click_utility(t))``.

Times are Unix seconds (int64) throughout; ``t`` may be one scalar for the whole batch or one per
row. Users and items are 0-based indices; the dataset's ids are ``"u<idx>"`` and ``"i<idx>"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from data.errors import DataError
from data.synthetic.config import SECONDS_PER_DAY, WorldConfig
from data.validation import integer

FORMAT_VERSION = 1
WORLD_JSON = "world.json"
# Independent random streams derived from the config seed (SeedSequence spawn keys), so adding
# draws to one stage never changes another's.
STREAM_WORLD, STREAM_CALIBRATION, STREAM_LOG = 0, 1, 2
STREAM_CONCEPT_SHIFT = 0  # a sub-stream of STREAM_WORLD: (STREAM_WORLD, 0)
# Cells of the (users x items) utility block that true_top_k scores at once (~64 MB of float32).
_TOP_K_BLOCK_CELLS = 1 << 24
# Users per block when sampling interests (bounds the (users x categories) key matrix).
_INTEREST_BLOCK_USERS = 1 << 16


def seed_sequence(config: WorldConfig, *stream: int) -> np.random.SeedSequence:
    """The ``SeedSequence`` of one random stream of ``config.seed`` (e.g. ``STREAM_LOG, 3``)."""
    return np.random.SeedSequence(config.seed, spawn_key=stream)


@dataclass(frozen=True, eq=False)
class World:
    """Ground-truth preferences and behaviour parameters (arrays are read-only).

    Attributes:
        config: the ``WorldConfig`` it was sampled from (sizes, behaviour and drift parameters).
        user_vectors: (n_users, dim) float32, preferences before any drift.
        alt_user_vectors: (n_users, dim) float32, the preferences concept drift moves toward.
        item_vectors: (n_items, dim) float32, built around their category centroid.
        category_centroids: (n_categories, dim) float32, unit norm.
        item_category: (n_items,) int32 in [0, n_categories); every category has an item.
        item_quality: (n_items,) float32, additive utility every user sees.
        item_popularity: (n_items,) float64, Zipfian exposure prior, sums to 1.
        item_release: (n_items,) int64 Unix seconds; an item cannot be shown or clicked before.
        user_interests: (n_users, max_interests) int32 category ids, strongest interest first.
        user_interest_weights: (n_users, max_interests) float32, rows sum to 1, descending.
        user_activity: (n_users,) float32 relative session rate, mean 1, lognormal.
        drift_activity_multiplier: (n_users,) float32, covariate drift: activity factor once the
            drift is complete (``exp(+strength)`` for the rising segment, ``exp(-strength)`` for
            the rest); all ones for other drift kinds.
    """

    config: WorldConfig
    user_vectors: np.ndarray
    alt_user_vectors: np.ndarray
    item_vectors: np.ndarray
    category_centroids: np.ndarray
    item_category: np.ndarray
    item_quality: np.ndarray
    item_popularity: np.ndarray
    item_release: np.ndarray
    user_interests: np.ndarray
    user_interest_weights: np.ndarray
    user_activity: np.ndarray
    drift_activity_multiplier: np.ndarray
    # Derived on construction, not saved: [item_vectors | item_quality], so one gathered row and
    # one dot with [preference | 1] give a whole utility (the generator's hottest loop).
    _utility_table: np.ndarray = field(init=False, repr=False)

    # name -> (dtype, shape as config attribute names or ints); checked on construction.
    _ARRAYS: ClassVar[dict[str, tuple[type[np.generic], tuple[str, ...]]]] = {
        "user_vectors": (np.float32, ("n_users", "dim")),
        "alt_user_vectors": (np.float32, ("n_users", "dim")),
        "item_vectors": (np.float32, ("n_items", "dim")),
        "category_centroids": (np.float32, ("n_categories", "dim")),
        "item_category": (np.int32, ("n_items",)),
        "item_quality": (np.float32, ("n_items",)),
        "item_popularity": (np.float64, ("n_items",)),
        "item_release": (np.int64, ("n_items",)),
        "user_interests": (np.int32, ("n_users", "max_interests")),
        "user_interest_weights": (np.float32, ("n_users", "max_interests")),
        "user_activity": (np.float32, ("n_users",)),
        "drift_activity_multiplier": (np.float32, ("n_users",)),
    }

    def __post_init__(self) -> None:
        for name, (dtype, dims) in self._ARRAYS.items():
            array = getattr(self, name)
            expected = tuple(getattr(self.config, d) for d in dims)
            if not isinstance(array, np.ndarray) or array.shape != expected:
                shape = getattr(array, "shape", type(array).__name__)
                raise DataError(f"world array {name}: expected shape {expected}, got {shape}")
            if array.dtype != dtype:
                raise DataError(
                    f"world array {name}: expected dtype {np.dtype(dtype)}, got {array.dtype}"
                )
            array.flags.writeable = False
        if self.item_category.min() < 0 or self.item_category.max() >= self.config.n_categories:
            raise DataError("world array item_category: category ids out of range")
        table = np.concatenate([self.item_vectors, self.item_quality[:, None]], axis=1)
        table.flags.writeable = False
        object.__setattr__(self, "_utility_table", table)

    # ------------------------------------------------------------------ construction, persistence

    @classmethod
    def sample(cls, config: WorldConfig) -> World:
        """Draw a world from ``config`` (deterministic in ``config.seed``)."""
        return _sample_world(config)

    def save(self, directory: str | Path) -> Path:
        """Write ``world.json`` (config + format version) and one ``.npy`` per array.

        ``world.json`` is written last, through a temporary file, so a directory that has it is
        complete. Returns the directory.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name in self._ARRAYS:
            np.save(out / f"{name}.npy", getattr(self, name), allow_pickle=False)
        meta = {"format_version": FORMAT_VERSION, "config": self.config.to_dict()}
        tmp = out / f".{WORLD_JSON}.tmp"
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out / WORLD_JSON)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> World:
        """Read a directory written by :meth:`save`; ``DataError`` if it is missing or corrupt."""
        path = Path(directory)
        meta_path = path / WORLD_JSON
        if not meta_path.is_file():
            raise DataError(f"{path} is not a synthetic world directory: {WORLD_JSON} is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{meta_path}: invalid JSON ({exc})") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{meta_path}: format_version {meta.get('format_version')!r}, "
                f"this code reads {FORMAT_VERSION}"
            )
        config = WorldConfig.from_dict(meta["config"])
        arrays: dict[str, Any] = {}
        for name in cls._ARRAYS:
            file = path / f"{name}.npy"
            if not file.is_file():
                raise DataError(f"{path}: world array file {file.name} is missing")
            try:
                arrays[name] = np.load(file, allow_pickle=False)
            except ValueError as exc:
                raise DataError(f"{file}: unreadable array ({exc})") from exc
        return cls(config=config, **arrays)

    # ------------------------------------------------------------------ sizes and drift schedule

    @property
    def n_users(self) -> int:
        return self.config.n_users

    @property
    def n_items(self) -> int:
        return self.config.n_items

    @property
    def dim(self) -> int:
        return self.config.dim

    def without_drift(self) -> World:
        """The same world with its drift switched off (arrays shared, not copied).

        The counterfactual a simulation measures the drift's cost against: the same users shown
        the same slates at the same times, had their preferences never moved.
        """
        return replace(self, config=replace(self.config, drift="none"))

    def drift_progress(self, t: np.ndarray | int) -> np.ndarray:
        """How far the drift has gone at Unix seconds ``t``: float64 in [0, 1], shape of ``t``.

        0 before ``drift_day``, then linear up to 1 over ``drift_ramp_days`` (a step if 0);
        always 0 when ``drift == "none"``.
        """
        t = np.asarray(t, dtype=np.float64)
        c = self.config
        if c.drift == "none":
            return np.zeros(t.shape)
        begin = c.start + c.drift_day * SECONDS_PER_DAY
        ramp = c.drift_ramp_days * SECONDS_PER_DAY
        if ramp == 0:
            return (t >= begin).astype(np.float64)
        return np.clip((t - begin) / ramp, 0.0, 1.0)

    def no_click_utility(self, t: np.ndarray | int) -> np.ndarray:
        """No-click utility at ``t``: float32, shape of ``t`` (prior drift moves it)."""
        base = np.full(np.shape(t), self.config.no_click_utility, dtype=np.float32)
        if self.config.drift != "prior":
            return base
        return base + np.float32(self.config.drift_strength) * self.drift_progress(t).astype(
            np.float32
        )

    def activity_multiplier(self, user_idx: np.ndarray, t: np.ndarray | int) -> np.ndarray:
        """Factor on each user's session rate at ``t``: (n,) float64 (1 unless covariate drift).

        The factor moves geometrically from 1 to ``drift_activity_multiplier`` as the drift ramps.
        """
        users = self._check_users(user_idx)
        progress = self.drift_progress(self._broadcast_time(t, users.size))
        return self.drift_activity_multiplier[users].astype(np.float64) ** progress

    def session_rates(self, t: int) -> np.ndarray:
        """Relative session rate of every user at ``t``: (n_users,) float64, mean about 1.

        What the A/B simulator samples arriving users from (covariate drift changes who comes).
        """
        users = np.arange(self.n_users)
        return self.user_activity * self.activity_multiplier(users, t)

    def position_bias(self, positions: np.ndarray) -> np.ndarray:
        """Examination probability ``(pos + 1) ** -eta`` of 0-based slots: float32, same shape."""
        return np.exp(self._log_position_bias(np.asarray(positions)))

    # ------------------------------------------------------------------ the oracle

    def preference_vectors(self, user_idx: np.ndarray, t: np.ndarray | int) -> np.ndarray:
        """True preference vectors at ``t``: (n, dim) float32 for ``user_idx`` of shape (n,).

        Under concept drift the vector moves from ``user_vectors`` to ``alt_user_vectors`` by
        the weight ``drift_strength * drift_progress(t)``, rescaled to the interpolated norm so
        utilities do not shrink half-way.
        """
        users = self._check_users(user_idx)
        return self._preferences(users, self._broadcast_time(t, users.size))

    def utility(
        self, user_idx: np.ndarray, item_idx: np.ndarray, t: np.ndarray | int
    ) -> np.ndarray:
        """True utilities: float32 with the shape of ``item_idx``.

        ``user_idx``: (n,) ints; ``item_idx``: (n,) (one item per user) or (n, m) (m items per
        user); ``t``: Unix seconds, scalar or (n,). Release times are not applied here (see
        :meth:`click_probabilities`).
        """
        users = self._check_users(user_idx)
        items = self._check_items(item_idx, users.size, allow_empty=False)
        times = self._broadcast_time(t, users.size)
        if items.ndim == 1:
            return self._utility_slots(users, items[None, :], times)[0]
        return self._utility_slots(users, items.T, times).T

    def click_probabilities(
        self,
        user_idx: np.ndarray,
        slates: np.ndarray,
        t: np.ndarray | int,
        positions: np.ndarray | None = None,
    ) -> np.ndarray:
        """Click distribution of each slate: (n, S + 1) float32, rows sum to 1.

        Column ``j < S`` is the probability of a click on ``slates[:, j]``; column ``S`` is the
        probability of no click. ``slates``: (n, S) item indices, -1 for an empty slot;
        ``positions``: the 0-based screen position of each slot, (S,) or (n, S), default
        ``0..S-1``. Empty slots and items not yet released at ``t`` get probability 0.
        """
        users, slots, times, log_bias = self._check_slates(user_idx, slates, t, positions)
        weights = self._choice_weights(users, slots, times, log_bias)
        return (weights / weights.sum(axis=0)).T

    def sample_clicks(
        self,
        user_idx: np.ndarray,
        slates: np.ndarray,
        t: np.ndarray | int,
        rng: np.random.Generator,
        positions: np.ndarray | None = None,
    ) -> np.ndarray:
        """Draw at most one click per slate: (n,) int64 clicked slot index, -1 for no click.

        Same arguments as :meth:`click_probabilities`, plus the ``rng`` to draw from.
        """
        users, slots, times, log_bias = self._check_slates(user_idx, slates, t, positions)
        return self._sample_clicks(users, slots, times, log_bias, rng)

    def true_top_k(
        self,
        user_idx: np.ndarray,
        k: int,
        t: np.ndarray | int,
        exclude: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The oracle ranking: each user's ``k`` highest-utility items released by ``t``.

        ``exclude``: optional, one array of item indices per user (e.g. already seen items).
        Returns ``(items, utilities)``: (n, k) int64 and (n, k) float32, best first; where fewer
        than ``k`` items are eligible the tail is item -1 with utility -inf.
        """
        users = self._check_users(user_idx)
        k = integer(k, "true_top_k: k", minimum=1, maximum=self.n_items, error=DataError)
        if exclude is not None and len(exclude) != users.size:
            raise DataError(f"true_top_k: {len(exclude)} exclude lists for {users.size} users")
        times = self._broadcast_time(t, users.size)
        items = np.empty((users.size, k), dtype=np.int64)
        scores = np.empty((users.size, k), dtype=np.float32)
        block = max(1, _TOP_K_BLOCK_CELLS // self.n_items)
        for lo in range(0, users.size, block):  # blocks of users bound memory, not a per-user loop
            hi = min(lo + block, users.size)
            utilities = self._preferences(users[lo:hi], times[lo:hi]) @ self.item_vectors.T
            utilities += self.item_quality
            utilities[self.item_release[None, :] > times[lo:hi, None]] = -np.inf
            if exclude is not None:
                self._mask_excluded(utilities, exclude[lo:hi])
            items[lo:hi], scores[lo:hi] = _top_k_rows(utilities, k)
        items[np.isneginf(scores)] = -1
        return items, scores

    # ------------------------------------------------------------------ unchecked internals
    # Used directly by the generator on arrays it built itself. Slates are slot-major here,
    # (S, n): reductions over the slots of a slate then run across contiguous rows, which is
    # several times faster than reducing the short last axis of an (n, S) array.

    def _preferences(self, users: np.ndarray, times: np.ndarray) -> np.ndarray:
        base = self.user_vectors[users]
        if self.config.drift != "concept":
            return base
        weight = self.config.drift_strength * self.drift_progress(times)
        moved = np.flatnonzero(weight > 0)
        if moved.size == 0:
            return base
        w = weight[moved, None].astype(np.float32)
        old, new = base[moved], self.alt_user_vectors[users[moved]]
        mixed = (1 - w) * old + w * new
        target = (1 - w) * _norms(old) + w * _norms(new)
        norm = _norms(mixed)
        base[moved] = mixed * np.divide(target, norm, out=np.ones_like(norm), where=norm > 0)
        return base

    def _utility_slots(
        self,
        users: np.ndarray,
        slots: np.ndarray,
        times: np.ndarray,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """(S, n) float32 utilities of slot-major item indices ``slots`` (S, n) for (n,) users."""
        prefs = np.empty((users.size, self.dim + 1), dtype=np.float32)
        prefs[:, :-1] = self._preferences(users, times)
        prefs[:, -1] = 1.0  # picks up the quality column of the utility table
        if out is None:
            out = np.empty(slots.shape, dtype=np.float32)
        for j in range(slots.shape[0]):  # S vectorised steps; keeps the gathered block small
            np.einsum("nd,nd->n", self._utility_table.take(slots[j], axis=0), prefs, out=out[j])
        return out

    def _log_position_bias(self, positions: np.ndarray) -> np.ndarray:
        return (-self.config.position_bias_eta * np.log1p(positions)).astype(np.float32)

    def _choice_weights(
        self,
        users: np.ndarray,
        slots: np.ndarray,
        times: np.ndarray,
        log_bias: np.ndarray,
        *,
        check_release: bool = True,
    ) -> np.ndarray:
        """Unnormalised logit weights: (S + 1, n) float32, no-click last, 0 where not showable.

        ``slots``: (S, n) item indices (-1 = empty); ``log_bias``: log position bias
        broadcastable to (S, n). ``check_release=False`` skips the release test for callers
        whose slates only hold released items (the generator's exposure guarantees it).
        """
        empty = slots < 0
        hidden = empty if empty.any() else None
        items = np.where(empty, 0, slots) if hidden is not None else slots
        if check_release:
            unreleased = self.item_release[items] > times
            hidden = unreleased if hidden is None else hidden | unreleased
        logits = np.empty((slots.shape[0] + 1, slots.shape[1]), dtype=np.float32)
        self._utility_slots(users, items, times, out=logits[:-1])
        logits[:-1] += log_bias
        logits[-1] = self.no_click_utility(times)
        if hidden is not None:
            np.copyto(logits[:-1], -np.inf, where=hidden)
        # Subtracting the column max keeps exp() finite for any utility scale; the no-click
        # option is always finite, so every slate has a positive total weight.
        logits -= logits.max(axis=0)
        return np.exp(logits, out=logits)

    def _sample_clicks(
        self,
        users: np.ndarray,
        slots: np.ndarray,
        times: np.ndarray,
        log_bias: np.ndarray,
        rng: np.random.Generator,
        *,
        check_release: bool = True,
    ) -> np.ndarray:
        """(n,) int64 clicked slot per slate (-1 = none) for slot-major ``slots`` (S, n)."""
        # An inverse-CDF draw from the logit probabilities: the same distribution as Gumbel-max
        # over utility + log bias + Gumbel noise, with one uniform per slate instead of one
        # Gumbel per option.
        weights = self._choice_weights(users, slots, times, log_bias, check_release=check_release)
        cumulative = np.cumsum(weights, axis=0, out=weights)
        draw = rng.random(users.size, dtype=np.float32) * cumulative[-1]
        choice = (cumulative <= draw).sum(axis=0)
        n_slots = slots.shape[0]
        return np.where(choice >= n_slots, -1, choice).astype(np.int64)

    def _mask_excluded(self, utilities: np.ndarray, exclude: Sequence[np.ndarray]) -> None:
        lists = [np.asarray(e, dtype=np.int64).ravel() for e in exclude]
        cols = np.concatenate(lists) if lists else np.empty(0, dtype=np.int64)
        if cols.size and (cols.min() < 0 or cols.max() >= self.n_items):
            raise DataError(f"true_top_k: exclude holds item indices outside [0, {self.n_items})")
        rows = np.repeat(np.arange(len(lists)), [e.size for e in lists])
        utilities[rows, cols] = -np.inf

    # ------------------------------------------------------------------ input checks

    def _check_users(self, user_idx: np.ndarray) -> np.ndarray:
        users = np.asarray(user_idx)
        if users.ndim != 1 or not np.issubdtype(users.dtype, np.integer):
            raise DataError(
                f"user_idx must be a 1-d integer array, got shape {users.shape} dtype {users.dtype}"
            )
        if users.size and (users.min() < 0 or users.max() >= self.n_users):
            raise DataError(
                f"user_idx values must lie in [0, {self.n_users}), got "
                f"[{users.min()}, {users.max()}]"
            )
        return users.astype(np.int64, copy=False)

    def _check_items(
        self, item_idx: np.ndarray, n_rows: int, *, allow_empty: bool, ndim: int | None = None
    ) -> np.ndarray:
        items = np.asarray(item_idx)
        ok_ndim = items.ndim in (1, 2) if ndim is None else items.ndim == ndim
        if not ok_ndim or not np.issubdtype(items.dtype, np.integer) or items.shape[0] != n_rows:
            raise DataError(
                f"item indices must be an integer array with {n_rows} rows"
                f"{f' and {ndim} dimensions' if ndim else ''}, got shape {items.shape} "
                f"dtype {items.dtype}"
            )
        low = -1 if allow_empty else 0
        if items.size and (items.min() < low or items.max() >= self.n_items):
            raise DataError(
                f"item indices must lie in [{low}, {self.n_items}), got "
                f"[{items.min()}, {items.max()}]"
            )
        return items.astype(np.int64, copy=False)

    @staticmethod
    def _broadcast_time(t: np.ndarray | int, n: int) -> np.ndarray:
        times = np.asarray(t)
        if not (np.issubdtype(times.dtype, np.integer) or np.issubdtype(times.dtype, np.floating)):
            raise DataError(f"t must be Unix seconds (numbers), got dtype {times.dtype}")
        if times.ndim == 0:
            times = np.full(n, times)
        if times.shape != (n,):
            raise DataError(f"t must be a scalar or have shape ({n},), got {times.shape}")
        if np.issubdtype(times.dtype, np.floating):
            if not np.isfinite(times).all():
                raise DataError("t holds non-finite values")
            times = np.floor(times)
        return times.astype(np.int64, copy=False)

    def _check_slates(
        self,
        user_idx: np.ndarray,
        slates: np.ndarray,
        t: np.ndarray | int,
        positions: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Validated users, slot-major slates (S, n), times and log position bias (S, n | 1)."""
        users = self._check_users(user_idx)
        slots = self._check_items(slates, users.size, allow_empty=True, ndim=2).T
        times = self._broadcast_time(t, users.size)
        if positions is None:
            return users, slots, times, self._log_position_bias(np.arange(slots.shape[0]))[:, None]
        pos = np.asarray(positions)
        if not np.issubdtype(pos.dtype, np.integer) or (pos.size and pos.min() < 0):
            raise DataError("positions must be non-negative integers")
        if pos.shape not in {(slots.shape[0],), np.shape(slates)}:
            raise DataError(
                f"positions of shape {pos.shape} do not fit slates of shape {np.shape(slates)}; "
                f"expected ({slots.shape[0]},) or {np.shape(slates)}"
            )
        bias = self._log_position_bias(pos)
        return users, slots, times, bias[:, None] if bias.ndim == 1 else bias.T


# ---------------------------------------------------------------------- sampling a world


def _sample_world(config: WorldConfig) -> World:
    rng = np.random.default_rng(seed_sequence(config, STREAM_WORLD))
    c = config
    centroids = _unit_rows(rng.standard_normal((c.n_categories, c.dim)))
    item_category = _sample_item_categories(rng, c)
    # Noise per coordinate is scaled by 1/sqrt(dim) so its norm, like the centroids', is ~1.
    noise_scale = np.float32(1.0 / np.sqrt(c.dim))
    item_vectors = centroids[item_category] + c.item_noise * noise_scale * _normal(
        rng, (c.n_items, c.dim)
    )
    popularity = _zipf_popularity(rng, c.n_items, c.popularity_exponent)
    quality = _item_quality(rng, popularity, c.quality_std, c.quality_popularity_corr)
    release = _release_times(rng, c)

    category_share = np.bincount(item_category, minlength=c.n_categories) / c.n_items
    vectors: list[np.ndarray] = []
    interests: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for draw in range(2):  # the base preferences, then the alternative ones concept drift moves to
        chosen, w = _sample_interests(rng, c, category_share)
        if draw == 1 and c.concept_shift == "shared":
            # Everyone's interests move through the same map; the draw above still happens, so
            # every other array is the same in both kinds of world.
            chosen, w = _shared_category_map(c)[interests[0]], weights[0]
        user = c.user_noise * noise_scale * _normal(rng, (c.n_users, c.dim))
        for k in range(c.max_interests):  # a few vectorised steps: the interest mixture
            user += w[:, k, None].astype(np.float32) * centroids[chosen[:, k]]
        user *= np.float32(c.affinity_scale)
        vectors.append(user)
        interests.append(chosen)
        weights.append(w)

    activity = rng.lognormal(0.0, c.activity_sigma, c.n_users)
    activity /= activity.mean()
    # Drawn last, so worlds that differ only in their drift share every other array.
    multiplier = _covariate_multiplier(rng, c, interests[0][:, 0])
    return World(
        config=c,
        user_vectors=vectors[0],
        alt_user_vectors=vectors[1],
        item_vectors=item_vectors.astype(np.float32),
        category_centroids=centroids,
        item_category=item_category.astype(np.int32),
        item_quality=quality.astype(np.float32),
        item_popularity=popularity,
        item_release=release,
        user_interests=interests[0].astype(np.int32),
        user_interest_weights=weights[0].astype(np.float32),
        user_activity=activity.astype(np.float32),
        drift_activity_multiplier=multiplier.astype(np.float32),
    )


def _shared_category_map(config: WorldConfig) -> np.ndarray:
    """(n_categories,) int: the category each category's fans like after shared concept drift.

    One cycle through all categories in a random order (a derangement: every category moves),
    from its own random stream so it does not shift the world's other draws.
    """
    rng = np.random.default_rng(seed_sequence(config, STREAM_WORLD, STREAM_CONCEPT_SHIFT))
    order = rng.permutation(config.n_categories)
    mapping = np.empty(config.n_categories, dtype=np.int64)
    mapping[order] = np.roll(order, -1)
    return mapping


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _sample_item_categories(rng: np.random.Generator, c: WorldConfig) -> np.ndarray:
    """(n_items,) category ids with Dirichlet sizes; every category gets at least one item."""
    shares = rng.dirichlet(np.full(c.n_categories, c.category_concentration))
    rest = rng.choice(c.n_categories, size=c.n_items - c.n_categories, p=shares)
    return rng.permutation(np.concatenate([np.arange(c.n_categories), rest]))


def _zipf_popularity(rng: np.random.Generator, n_items: int, exponent: float) -> np.ndarray:
    """(n_items,) float64 summing to 1: ``rank ** -exponent`` for a random rank order."""
    ranks = rng.permutation(n_items) + 1.0
    popularity = ranks**-exponent
    return popularity / popularity.sum()


def _item_quality(
    rng: np.random.Generator, popularity: np.ndarray, std: float, corr: float
) -> np.ndarray:
    """Quality correlated ``corr`` with standardised log popularity, standard deviation ``std``."""
    log_pop = np.log(popularity)
    spread = log_pop.std()
    z = (log_pop - log_pop.mean()) / spread if spread > 0 else np.zeros_like(log_pop)
    return std * (corr * z + np.sqrt(1.0 - corr**2) * rng.standard_normal(popularity.size))


def _release_times(rng: np.random.Generator, c: WorldConfig) -> np.ndarray:
    """(n_items,) int64 Unix seconds: initial items before ``start``, the rest during the log."""
    n_initial = max(1, round(c.initial_item_fraction * c.n_items))
    initial = np.zeros(c.n_items, dtype=bool)
    initial[rng.permutation(c.n_items)[:n_initial]] = True
    history = c.catalogue_history_days * SECONDS_PER_DAY
    before = c.start - 1 - np.floor(rng.random(c.n_items) * history).astype(np.int64)
    during = c.start + np.floor(rng.random(c.n_items) * c.n_days * SECONDS_PER_DAY).astype(np.int64)
    return np.where(initial, before, during)


def _sample_interests(
    rng: np.random.Generator, c: WorldConfig, category_share: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's ``max_interests`` distinct categories (by size) and Dirichlet weights.

    Returns (n_users, K) int64 categories and (n_users, K) float64 weights, strongest first.
    Categories are drawn without replacement proportionally to their size with the
    Efraimidis-Spirakis keys ``log(u) / w`` (Efraimidis & Spirakis, 2006).
    """
    k = c.max_interests
    chosen = np.empty((c.n_users, k), dtype=np.int64)
    inverse_share = (1.0 / category_share).astype(np.float32)
    for lo in range(0, c.n_users, _INTEREST_BLOCK_USERS):  # blocks of users bound memory
        hi = min(lo + _INTEREST_BLOCK_USERS, c.n_users)
        # log(1 - u) with u in [0, 1) is never log(0).
        keys = np.log1p(-rng.random((hi - lo, c.n_categories), dtype=np.float32)) * inverse_share
        chosen[lo:hi] = np.argpartition(-keys, k - 1, axis=1)[:, :k]
    weights = rng.gamma(c.interest_concentration, size=(c.n_users, k))
    total = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, total, out=np.full_like(weights, 1.0 / k), where=total > 0)
    order = np.argsort(-weights, axis=1, kind="stable")
    return np.take_along_axis(chosen, order, axis=1), np.take_along_axis(weights, order, axis=1)


def _covariate_multiplier(
    rng: np.random.Generator, c: WorldConfig, primary_interest: np.ndarray
) -> np.ndarray:
    """(n_users,) activity factor at full covariate drift; ones for other drift kinds.

    The rising segment is every user whose primary interest is in a random set of categories
    holding about ``covariate_user_fraction`` of the users, so the item mix shifts with it.
    """
    if c.drift != "covariate":
        return np.ones(c.n_users)
    order = rng.permutation(c.n_categories)
    share = np.bincount(primary_interest, minlength=c.n_categories)[order] / c.n_users
    n_rising = int(np.searchsorted(np.cumsum(share), c.covariate_user_fraction)) + 1
    rising = np.isin(primary_interest, order[:n_rising])
    multiplier = np.full(c.n_users, np.exp(-c.drift_strength))
    multiplier[rising] = np.exp(c.drift_strength)
    return multiplier


# ---------------------------------------------------------------------- small array helpers


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)


def _norms(matrix: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("nd,nd->n", matrix, matrix))[:, None]


def _top_k_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices and values of each row's ``k`` largest entries, best first."""
    if k < scores.shape[1]:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    values = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(values, order, axis=1)
