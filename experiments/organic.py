"""Organic consumption: what simulated users find outside the recommender (search, browsing).

Real logs hold consumption the recommender never proposed. Without it, a user whose taste moves
toward categories the system never shows them cannot reveal the move, and no online policy can
learn it (issue 17's diagnosis of the frozen and online-state arms). Here, every session also
yields an organic event with probability ``rate`` (:func:`organic_rate`), chosen by the user's
*true* preference at that time with a popularity bias: item ``i`` has the logit
``utility(u, i, t) + popularity_bias * log(popularity_i)`` over the items released by ``t``
(a Gumbel-max draw from that softmax).

Organic events are exogenous: they depend on the world and the simulation seed alone, never on an
arm, so every arm's copy of a user consumes the same organic items (common random numbers). They
are logged as feedback of their own type (``ORGANIC_EVENT``), count as consumed for fatigue, and
are no clicks on a slate: CTR and engagement measure the recommender alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from data.synthetic import World

__all__ = ["ORGANIC_EVENT", "OrganicEvents", "draw_organic", "organic_rate"]

# The feedback type of organic consumption in the arms' logs (a positive, like a click).
ORGANIC_EVENT = "organic"
# Users whose utility rows are computed at once: bounds the (block, n_items) float32 matrix.
_BLOCK_CELLS = 4_000_000


@dataclass(frozen=True)
class OrganicEvents:
    """One tick's organic consumption: (n,) row into the tick's arrivals, world item, time."""

    rows: npt.NDArray[np.int64]
    items: npt.NDArray[np.int64]
    times: npt.NDArray[np.int64]

    @property
    def size(self) -> int:
        return int(self.rows.size)


def organic_rate(organic_share: float, recommended_per_session: float) -> float:
    """Organic events per session so that they make ``organic_share`` of all consumption when
    the recommender earns ``recommended_per_session`` clicks per session.

    share = o / (o + c)  =>  o = c * share / (1 - share). The simulator passes the pre-period's
    clicks per slate under the world's logging policy, a figure no arm can move, so the rate is
    the same in every arm.
    """
    if not 0 <= organic_share < 1:
        raise ValueError(f"organic_share must be in [0, 1), got {organic_share!r}")
    return recommended_per_session * organic_share / (1.0 - organic_share)


def draw_organic(
    world: World,
    users: npt.NDArray[np.int64],
    times: npt.NDArray[np.int64],
    rate: float,
    popularity_bias: float,
    rng: np.random.Generator,
) -> OrganicEvents:
    """The organic events of one tick's sessions ``users`` (n,) at ``times`` (n,).

    Each session consumes one organic item with probability ``min(rate, 1)``, drawn from the
    softmax of true utility plus ``popularity_bias * log(popularity)`` over released items.
    """
    hit = np.flatnonzero(rng.random(users.size) < min(rate, 1.0))
    if hit.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return OrganicEvents(empty, empty, empty)
    log_popularity = (popularity_bias * np.log(world.item_popularity)).astype(np.float32)
    items = np.empty(hit.size, dtype=np.int64)
    block = max(1, _BLOCK_CELLS // world.n_items)
    for lo in range(0, hit.size, block):
        rows = hit[lo : lo + block]
        at = times[rows]
        logits = world.preference_vectors(users[rows], at) @ world.item_vectors.T
        logits += world.item_quality + log_popularity
        logits[world.item_release[None, :] > at[:, None]] = -np.inf
        # Gumbel-max: argmax(logit + Gumbel noise) is a draw from softmax(logit).
        logits += rng.gumbel(size=logits.shape).astype(np.float32)
        items[lo : lo + rows.size] = np.argmax(logits, axis=1)
    return OrganicEvents(hit.astype(np.int64), items, times[hit].astype(np.int64))
