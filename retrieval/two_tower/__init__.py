"""Two-tower retrieval: the model, its trainer and the ``TwoTowerSource`` candidate source."""

from retrieval.two_tower.config import TwoTowerConfig
from retrieval.two_tower.model import TowerFeatures, TwoTowerModel
from retrieval.two_tower.source import TwoTowerSource
from retrieval.two_tower.train import (
    PointInTimeHistory,
    TrainedTwoTower,
    TrainingCurves,
    train_two_tower,
)

__all__ = [
    "PointInTimeHistory",
    "TowerFeatures",
    "TrainedTwoTower",
    "TrainingCurves",
    "TwoTowerConfig",
    "TwoTowerModel",
    "TwoTowerSource",
    "train_two_tower",
]
