"""Torch modules for low-rank (LRT) layers."""

from __future__ import annotations

from lrt_deploy.nn.linformer import LinformerSelfAttention, StandardSelfAttention
from lrt_deploy.nn.lowrank import (
    LowRankEmbedding,
    LowRankLinear,
    is_lowrank_pair,
    lowrank_layers_in_weights,
    lowrank_rank,
)

__all__ = [
    "LinformerSelfAttention",
    "StandardSelfAttention",
    "LowRankEmbedding",
    "LowRankLinear",
    "is_lowrank_pair",
    "lowrank_layers_in_weights",
    "lowrank_rank",
]
