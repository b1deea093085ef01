"""The user's choices, typed: rank policies, ``LowRankConfig`` and ``HealConfig``."""

from lrt_deploy.config.heal import HealConfig
from lrt_deploy.config.lowrank import LowRankConfig
from lrt_deploy.config.ranks import (
    BudgetRank,
    EnergyRank,
    FidelityFloor,
    LowRankConfigError,
    RankPolicy,
    UniformRank,
)

__all__ = [
    "BudgetRank",
    "EnergyRank",
    "FidelityFloor",
    "HealConfig",
    "LowRankConfig",
    "LowRankConfigError",
    "RankPolicy",
    "UniformRank",
]
