"""Train / validation / test splits of an interaction log, and a temporal-leakage check.

Four methods, one contract: every function returns ``{"train", "valid", "test"}`` frames that
partition the input rows (each row in exactly one split, extra columns kept, input order kept
within a split). ``valid`` may be empty; ``train`` is never emptied on purpose.

- ``temporal`` (the default): global cut points in time. Random splits of behaviour logs leak the
  future into training; a global cut is what a model deployed at the cut would have seen.
- ``leave_last_n``: each user's latest events are held out (the common sequential protocol).
  Leak-free per user, but not globally: one user's test event can predate another's train event.
- ``random``: per-user stratified random split, for comparison with the literature.
- ``user_disjoint``: whole users held out, to measure generalisation to unseen users.

Each split labels every row with one vectorised polars expression and filters the frame by the
label, so memory is the input plus the three outputs (about twice the input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import numpy as np
import polars as pl

from data.errors import ConfigError, DataError
from data.schema import ITEM_ID, SPLIT_NAMES, TIMESTAMP, USER_ID, require_columns
from data.validation import fraction, non_negative_int, one_of

SplitMethod = Literal["temporal", "leave_last_n", "random", "user_disjoint"]
Frame = pl.DataFrame | pl.LazyFrame

# Split labels: positions in SPLIT_NAMES ("train", "valid", "test").
_TRAIN, _VALID, _TEST = (pl.lit(code, dtype=pl.Int8) for code in range(len(SPLIT_NAMES)))
_LABEL = "__split"
# How many leaking events a LeakageReport quotes.
_MAX_EXAMPLES = 5


@dataclass(frozen=True)
class SplitConfig:
    """How to split an interaction log (``method`` picks which of the other fields apply).

    Attributes:
        method: ``"temporal"`` (default: no future leaks into training), ``"leave_last_n"``,
            ``"random"`` or ``"user_disjoint"``; see the module docstring.
        test_fraction: share held out for test (temporal, random: of events; user_disjoint: of
            users). 0.1 is the usual 80/10/10 protocol.
        valid_fraction: share held out for validation, taken from the same total as
            ``test_fraction`` (so 0.1 + 0.1 leaves 0.8 for training); 0 gives an empty ``valid``.
        n_test: leave_last_n: each user's latest ``n_test`` events go to test (1 = leave-one-out).
        n_valid: leave_last_n: the ``n_valid`` events before those go to validation.
        seed: random, user_disjoint: seed of the random assignment (same seed, same split).
    """

    method: SplitMethod = "temporal"
    test_fraction: float = 0.1
    valid_fraction: float = 0.1
    n_test: int = 1
    n_valid: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        one_of(self.method, "split method", get_args(SplitMethod))
        _check_fractions(self.test_fraction, self.valid_fraction)
        _check_counts(self.n_test, self.n_valid)
        _check_seed(self.seed)


def split_interactions(df: Frame, config: SplitConfig) -> dict[str, pl.DataFrame]:
    """Split ``df`` as ``config`` says (the three keys of ``SPLIT_NAMES`` are always present)."""
    if config.method == "temporal":
        return temporal_split(df, config.test_fraction, config.valid_fraction)
    if config.method == "leave_last_n":
        return leave_last_n_split(df, config.n_test, config.n_valid)
    if config.method == "random":
        return random_split(df, config.test_fraction, config.valid_fraction, config.seed)
    return user_disjoint_split(df, config.test_fraction, config.valid_fraction, config.seed)


def temporal_split(
    df: Frame, test_fraction: float = 0.1, valid_fraction: float = 0.1
) -> dict[str, pl.DataFrame]:
    """Global cut points by time: test is the latest ``test_fraction`` of events, valid the
    ``valid_fraction`` just before it, train everything earlier.

    Events tied at a cut go to the later split, so ``max(train) < min(valid) <= max(valid) <
    min(test)`` holds strictly, and a split may be a little larger than its fraction (with
    heavily tied timestamps, much larger: if every event has one timestamp, all are test).
    Needs ``timestamp``. Cost: one partial sort of the timestamps (a copy of one int64 column).
    """
    _check_fractions(test_fraction, valid_fraction)
    frame = _materialise(df, [TIMESTAMP], "temporal_split input")
    n_rows = frame.height
    # Keep at least one event in train, whatever the rounding (ties may still empty it).
    n_test = min(_share(n_rows, test_fraction), max(n_rows - 1, 0))
    n_valid = min(_share(n_rows, valid_fraction), max(n_rows - 1 - n_test, 0))
    # Positions, in time order, of the first event of valid and of test; the timestamps there
    # are the cut points.
    valid_start, test_start = n_rows - n_test - n_valid, n_rows - n_test
    wanted = sorted(
        {start for start, size in ((valid_start, n_valid), (test_start, n_test)) if size}
    )
    cut = dict(zip(wanted, _kth_smallest(frame[TIMESTAMP].to_numpy(), wanted), strict=True))

    ts = pl.col(TIMESTAMP)
    label = _TRAIN
    if n_valid:
        label = pl.when(ts >= cut[valid_start]).then(_VALID).otherwise(label)
    if n_test:
        label = pl.when(ts >= cut[test_start]).then(_TEST).otherwise(label)
    return _partition(frame, label)


def leave_last_n_split(df: Frame, n_test: int = 1, n_valid: int = 1) -> dict[str, pl.DataFrame]:
    """Per user: the latest ``n_test`` events -> test, the ``n_valid`` before them -> valid.

    A user needs more than ``n_test + n_valid`` events to be split (at least one must stay in
    train for the model to know them); users with fewer keep all their events in train.
    Order within a user: by timestamp, ties broken by ``item_id``, then by input row order, so
    the split does not depend on how the input happens to be sorted (except among exact
    duplicate (user, item, timestamp) rows, which are interchangeable). Needs ``user_id``,
    ``item_id``, ``timestamp``. Per user leak-free: each test event is >= the user's train events.
    """
    _check_counts(n_test, n_valid)
    frame = _materialise(df, [USER_ID, ITEM_ID, TIMESTAMP], "leave_last_n_split input")
    windows = _windows(
        frame,
        # 1 = the user's latest event.
        recency=pl.struct(TIMESTAMP, ITEM_ID).rank("ordinal", descending=True).over(USER_ID),
        n_events=pl.len().over(USER_ID),
    )
    recency, n_events = pl.col("recency"), pl.col("n_events")
    held_out = n_test + n_valid
    label = (
        pl.when(n_events <= held_out)
        .then(_TRAIN)
        .when(recency <= n_test)
        .then(_TEST)
        .when(recency <= held_out)
        .then(_VALID)
        .otherwise(_TRAIN)
    )
    return _partition(frame, label, label_frame=windows)


def random_split(
    df: Frame, test_fraction: float = 0.1, valid_fraction: float = 0.1, seed: int = 0
) -> dict[str, pl.DataFrame]:
    """Per-user stratified random split: each user gives about ``test_fraction`` of their events
    to test and ``valid_fraction`` to valid, chosen at random.

    A user with ``m`` events gives ``round(m * test_fraction)`` to test, but at least one when the
    fraction is positive, so every user with two or more events is evaluated; then likewise for
    valid; always keeping at least one event in train. So users with one event stay wholly in
    train, and for users with few events the held-out share exceeds the fraction.
    Deterministic for a given ``seed`` and input row order. Needs ``user_id``.

    Random splits of time-ordered logs leak the future; prefer ``temporal_split`` for evaluation.
    """
    _check_fractions(test_fraction, valid_fraction)
    _check_seed(seed)
    frame = _materialise(df, [USER_ID], "random_split input")
    draws = pl.Series(np.random.default_rng(seed).random(frame.height))
    windows = _windows(
        frame.select(USER_ID).with_columns(draws.alias("draw")),
        # A uniformly random order of each user's events: 1 = first to be held out.
        order=pl.col("draw").rank("ordinal").over(USER_ID),
        n_events=pl.len().over(USER_ID),
    )
    order, n_events = pl.col("order"), pl.col("n_events")
    n_test = _user_share(n_events, test_fraction, spare=n_events - 1)
    n_valid = _user_share(n_events, valid_fraction, spare=n_events - 1 - n_test)
    label = (
        pl.when(order <= n_test)
        .then(_TEST)
        .when(order <= n_test + n_valid)
        .then(_VALID)
        .otherwise(_TRAIN)
    )
    return _partition(frame, label, label_frame=windows)


def user_disjoint_split(
    df: Frame, test_fraction: float = 0.1, valid_fraction: float = 0.1, seed: int = 0
) -> dict[str, pl.DataFrame]:
    """Whole users go to one split: ``round(n_users * fraction)`` random users to test, then to
    valid, the rest (at least one user) to train.

    The fractions are of users, not events. Deterministic for a given ``seed`` and set of users
    (users are sorted before shuffling, so row order does not matter). Needs ``user_id``.
    """
    _check_fractions(test_fraction, valid_fraction)
    _check_seed(seed)
    frame = _materialise(df, [USER_ID], "user_disjoint_split input")
    users = frame[USER_ID].unique().sort()
    n_users = users.len()
    n_test = min(_share(n_users, test_fraction), max(n_users - 1, 0))
    n_valid = min(_share(n_users, valid_fraction), max(n_users - 1 - n_test, 0))
    shuffled = users.gather(np.random.default_rng(seed).permutation(n_users))
    user = pl.col(USER_ID)
    label = (
        pl.when(user.is_in(shuffled.head(n_test).implode()))
        .then(_TEST)
        .when(user.is_in(shuffled.slice(n_test, n_valid).implode()))
        .then(_VALID)
        .otherwise(_TRAIN)
    )
    return _partition(frame, label)


# --------------------------------------------------------------------------------- leakage check
class LeakageExample(NamedTuple):
    """One training event later than the test event it is compared with (seconds UTC)."""

    user_id: str
    train_timestamp: int
    test_timestamp: int


@dataclass(frozen=True)
class LeakageReport:
    """The result of :func:`check_temporal_leakage`.

    Attributes:
        n_violations: training events later than their reference test timestamp.
        n_users_checked: per-user mode: users with both train and test events; global mode:
            distinct users in test (those whose evaluation the check protects).
        examples: up to five violations, the worst (largest time gap) first.
        per_user: which mode produced the report.
    """

    n_violations: int
    n_users_checked: int
    examples: tuple[LeakageExample, ...]
    per_user: bool

    @property
    def is_leaky(self) -> bool:
        return self.n_violations > 0

    def raise_if_leaky(self) -> None:
        """Raise ``DataError`` describing the leak, if there is one."""
        if not self.is_leaky:
            return
        reference = "their earliest test event" if self.per_user else "the earliest test event"
        shown = "; ".join(
            f"user {e.user_id!r}: train t={e.train_timestamp} > test t={e.test_timestamp}"
            for e in self.examples
        )
        raise DataError(
            f"temporal leakage: {self.n_violations} training event(s) are later than {reference} "
            f"({self.n_users_checked} users checked), e.g. {shown}"
        )


def check_temporal_leakage(train: Frame, test: Frame, *, per_user: bool) -> LeakageReport:
    """Check that no training event is later than the test events it will be evaluated against.

    Global mode (``per_user=False``): every train timestamp must be ``<= min(test timestamps)``,
    the guarantee of :func:`temporal_split`. Per-user mode: each user's train timestamps must be
    ``<=`` that user's earliest test timestamp, the guarantee of :func:`leave_last_n_split`.
    Needs ``user_id`` and ``timestamp`` in both frames. Equal timestamps are not leaks.
    """
    for frame, name in ((train, "train"), (test, "test")):
        require_columns(frame, [USER_ID, TIMESTAMP], f"check_temporal_leakage {name}")
    ts, reference = pl.col(TIMESTAMP), pl.col("__reference")
    train_events = train.lazy().select(USER_ID, TIMESTAMP)
    if per_user:
        first_test = test.lazy().group_by(USER_ID).agg(ts.min().alias("__reference"))
        compared = train_events.join(first_test, on=USER_ID, how="inner")
        users_checked = compared.select(pl.col(USER_ID).n_unique())
    else:
        # One reference for everybody: computed first, so the filter compares with a literal.
        test_start = test.lazy().select(ts.min()).collect().item()
        compared = train_events.with_columns(
            pl.lit(test_start, dtype=pl.Int64).alias("__reference")
        )
        users_checked = test.lazy().select(pl.col(USER_ID).n_unique())
    leaks = compared.filter(ts > reference)
    n_users, n_violations, worst = pl.collect_all(
        [
            users_checked,
            leaks.select(pl.len()),
            leaks.sort(ts - reference, USER_ID, descending=[True, False]).head(_MAX_EXAMPLES),
        ]
    )
    return LeakageReport(
        n_violations=int(n_violations.item()),
        n_users_checked=int(n_users.item()),
        examples=tuple(
            LeakageExample(user, int(train_ts), int(test_ts))
            for user, train_ts, test_ts in worst.select(USER_ID, TIMESTAMP, reference).iter_rows()
        ),
        per_user=per_user,
    )


# --------------------------------------------------------------------------------- helpers
def _materialise(df: Frame, columns: list[str], source: str) -> pl.DataFrame:
    """``df`` as an eager frame with ``columns`` present and free of nulls."""
    require_columns(df, columns, source)
    frame = df.collect() if isinstance(df, pl.LazyFrame) else df
    nulls = {c: n for c in columns if (n := frame[c].null_count())}
    if nulls:
        raise DataError(f"{source}: null values in {nulls}")
    return frame


def _windows(frame: pl.DataFrame, **expressions: pl.Expr) -> pl.DataFrame:
    """Per-row window columns (``.over(user)``), each computed once, eagerly.

    Label expressions then read these as plain columns. Two reasons: an eager ``select`` does not
    eliminate repeated sub-expressions, so inlining a window into the label would recompute it for
    every use; and in polars 2.1 the lazy engine mis-assigns ``rank().over()`` results to rows when
    the window sits inside ``when/then`` (tests/test_splits.py pins the correct behaviour).
    """
    return frame.select(**expressions)


def _partition(
    rows: pl.DataFrame, label: pl.Expr, *, label_frame: pl.DataFrame | None = None
) -> dict[str, pl.DataFrame]:
    """Split ``rows`` by a per-row ``label`` (codes are positions in ``SPLIT_NAMES``), evaluated
    on ``label_frame`` (row-aligned with ``rows``) if given, else on ``rows``."""
    codes = (rows if label_frame is None else label_frame).select(label.alias(_LABEL)).to_series()
    return {name: rows.filter(codes == code) for code, name in enumerate(SPLIT_NAMES)}


def _share(total: int, fraction: float) -> int:
    """``round(total * fraction)``, halves rounded up (not to even), as an int."""
    return int(np.floor(total * fraction + 0.5))


def _user_share(n_events: pl.Expr, fraction: float, *, spare: pl.Expr) -> pl.Expr:
    """Per user: ``round(n_events * fraction)``, >= 1 if ``fraction > 0``, <= ``spare``."""
    wanted = (n_events * fraction + 0.5).floor().cast(pl.Int64)
    if fraction > 0:
        wanted = pl.max_horizontal(wanted, pl.lit(1, dtype=pl.Int64))
    return pl.min_horizontal(wanted, pl.max_horizontal(spare, pl.lit(0, dtype=pl.Int64)))


def _kth_smallest(values: np.ndarray, positions: list[int]) -> list[int]:
    """The values at ``positions`` of ``sorted(values)`` without sorting everything."""
    if not positions:
        return []
    return [int(v) for v in np.partition(values, positions)[positions]]


def _check_fractions(test_fraction: float, valid_fraction: float) -> None:
    for name, value in (("test_fraction", test_fraction), ("valid_fraction", valid_fraction)):
        fraction(value, name, high_open=True)
    if test_fraction + valid_fraction >= 1.0:
        raise ConfigError(
            f"test_fraction + valid_fraction must be < 1 (something must be left to train on), "
            f"got {test_fraction} + {valid_fraction}"
        )


def _check_counts(n_test: int, n_valid: int) -> None:
    for name, value in (("n_test", n_test), ("n_valid", n_valid)):
        non_negative_int(value, name)


def _check_seed(seed: int) -> None:
    non_negative_int(seed, "seed")
