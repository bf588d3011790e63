"""The synthetic world: ground-truth preferences, a realistic implicit-feedback log, and drift.

The embedded default dataset and, later, the A/B simulator's ground truth::

    from data.synthetic import WorldConfig, generate

    data = generate(WorldConfig(seed=7))          # ~5k users x 2k items x 200k clicks
    data.interactions                             # canonical frame (data.schema), time-sorted
    data.world.true_top_k(np.arange(10), k=10, t=data.world.config.end)

- ``config.py``: ``WorldConfig``, every knob with its default and meaning.
- ``world.py``: ``World``, the ground truth and the click model (utility, logit choice with
  position bias, oracle ranking), with ``save`` / ``load``.
- ``generate.py``: ``generate``, sessions -> slates -> exposure -> clicks, vectorised in chunks.
"""

from data.synthetic.config import DEFAULT_START, Drift, WorldConfig
from data.synthetic.generate import (
    ClickLog,
    SyntheticData,
    generate,
    interactions_frame,
    items_frame,
    simulate_log,
    users_frame,
)
from data.synthetic.world import World

__all__ = [
    "DEFAULT_START",
    "ClickLog",
    "Drift",
    "SyntheticData",
    "World",
    "WorldConfig",
    "generate",
    "interactions_frame",
    "items_frame",
    "simulate_log",
    "users_frame",
]
