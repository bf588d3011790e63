"""Online model updates between retrains: the two-tower trained on the live feedback stream.

:class:`OnlineTrainer` is the one component the service and the A/B simulator share: it takes
micro-batch optimiser steps from the feedback the online state just observed (with a replay
buffer of recent examples against forgetting), re-embeds the items a step touched into the
live index, and publishes each new model version atomically. See :mod:`.trainer`.
"""

from pipeline.online_learning.als_trainer import AlsOnlineTrainer
from pipeline.online_learning.als_update import AlsItemUpdater
from pipeline.online_learning.config import OnlineLearningConfig
from pipeline.online_learning.replay import ReplayBuffer
from pipeline.online_learning.trainer import OnlineTrainer, UpdateStats

__all__ = [
    "AlsItemUpdater",
    "AlsOnlineTrainer",
    "OnlineLearningConfig",
    "OnlineTrainer",
    "ReplayBuffer",
    "UpdateStats",
]
