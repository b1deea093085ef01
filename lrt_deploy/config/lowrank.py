"""``LowRankConfig``: which layers to factorize, with which solver and rank policy."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field, fields
from typing import Any

from lrt_deploy.config.ranks import (
    BudgetRank,
    EnergyRank,
    FidelityFloor,
    LowRankConfigError,
    RankPolicy,
    UniformRank,
    check_rank,
    policy_from_dict,
    resolve_rank,
)

__all__ = ["SOLVERS", "LowRankConfig", "LowRankConfigError"]

#: ``"svd"`` fits the weights; ``"asvd"`` fits the layer outputs on calibration inputs.
SOLVERS = ("svd", "asvd")
_POLICIES = (UniformRank, EnergyRank, BudgetRank, FidelityFloor)


@dataclass(frozen=True)
class LowRankConfig:
    """How to factorize a model's layers into low-rank pairs; ``rank=R`` is ``UniformRank(R)``."""

    #: How ranks are chosen: UniformRank, EnergyRank, BudgetRank or FidelityFloor; under
    #: every policy ``rank_overrides`` pin a layer's rank and ``skip`` keeps it dense.
    policy: RankPolicy | None = None
    #: ``"svd"`` fits the weights; ``"asvd"`` fits layer outputs and needs calibration batches.
    solver: str = "asvd"
    #: Also factorize ``nn.Embedding`` tables.
    factorize_embeddings: bool = False
    #: Keep a layer dense unless its low-rank form has at most ``1 - min_param_saving`` of its
    #: dense parameters (and strictly fewer).
    min_param_saving: float = 0.0
    #: fnmatch patterns on qualified module names to keep dense, e.g. ``"pooler.*"``.
    skip: tuple[str, ...] = ()
    #: fnmatch pattern -> rank (int or fraction), overriding the policy; the first match wins.
    rank_overrides: Mapping[str, int | float] = field(default_factory=dict)
    #: Relative ridge of ``"asvd"`` whitening: eigenvalues floored at ``damping`` x their mean.
    damping: float = 1e-4
    rank: InitVar[int | float | None] = None

    def __post_init__(self, rank: int | float | None) -> None:
        if rank is not None:
            if self.policy is not None:
                raise LowRankConfigError(
                    f"LowRankConfig takes rank={rank!r} or policy={self.policy!r}, not both"
                )
            object.__setattr__(self, "policy", UniformRank(rank))
        if not isinstance(self.policy, _POLICIES):
            raise LowRankConfigError(
                "LowRankConfig needs a rank policy, e.g. rank=0.5 (UniformRank), "
                f"policy=BudgetRank(0.6) or policy=EnergyRank(0.95); got {self.policy!r}"
            )
        if self.solver not in SOLVERS:
            raise LowRankConfigError(
                f"LowRankConfig.solver must be one of {SOLVERS}, got {self.solver!r}"
            )
        if not isinstance(self.factorize_embeddings, bool):
            raise LowRankConfigError("LowRankConfig.factorize_embeddings must be True or False, "
                                     f"got {self.factorize_embeddings!r}")
        if not (isinstance(self.min_param_saving, (int, float))
                and 0.0 <= self.min_param_saving < 1.0):
            raise LowRankConfigError("LowRankConfig.min_param_saving must be a fraction in "
                                     f"[0, 1), got {self.min_param_saving!r}")
        self._check_patterns()
        if not (isinstance(self.damping, (int, float)) and not isinstance(self.damping, bool)
                and math.isfinite(self.damping) and self.damping > 0):
            raise LowRankConfigError("LowRankConfig.damping must be a small positive number "
                                     f"such as 1e-4, got {self.damping!r}")

    def _check_patterns(self) -> None:
        if isinstance(self.skip, str):
            raise LowRankConfigError(f"LowRankConfig.skip must be a sequence of patterns, e.g. "
                                     f"({self.skip!r},), not a bare string")
        # Lists arrive from JSON and from casual callers; a tuple makes configs compare equal.
        object.__setattr__(self, "skip", tuple(self.skip))
        for pattern in self.skip:
            if not isinstance(pattern, str):
                raise LowRankConfigError(
                    f"LowRankConfig.skip patterns must be strings, got {pattern!r}"
                )
        if not isinstance(self.rank_overrides, Mapping):
            raise LowRankConfigError("LowRankConfig.rank_overrides must be a dict of pattern -> "
                                     f"rank, got {self.rank_overrides!r}")
        for pattern, rank in self.rank_overrides.items():
            if not isinstance(pattern, str):
                raise LowRankConfigError(
                    f"LowRankConfig.rank_overrides keys must be strings, got {pattern!r}"
                )
            check_rank(rank, f"LowRankConfig.rank_overrides[{pattern!r}]")

    def describe(self) -> str:
        """A short description of what it asks for, for progress lines and errors."""
        embeddings = ", embeddings too" if self.factorize_embeddings else ""
        return f"{self.solver}, {self.policy.describe()}{embeddings}"

    def skip_pattern(self, name: str) -> str | None:
        """The first ``skip`` pattern matching module name ``name``, or None."""
        return next((p for p in self.skip if fnmatch.fnmatchcase(name, p)), None)

    def rank_for(self, name: str, full_rank: int) -> int:
        """The rank in [1, full_rank] of module ``name``: its override, else the uniform rank."""
        rank = self.rank_override_for(name, full_rank)
        if rank is not None:
            return rank
        if not isinstance(self.policy, UniformRank):
            raise LowRankConfigError(f"no rank for {name!r}: {type(self.policy).__name__} chooses "
                                     "ranks across layers and no rank_overrides pattern matches")
        return resolve_rank(self.policy.rank, full_rank)

    def rank_override_for(self, name: str, full_rank: int) -> int | None:
        """The rank in [1, full_rank] the first matching ``rank_overrides`` pins, or None."""
        rank = next(
            (r for p, r in self.rank_overrides.items() if fnmatch.fnmatchcase(name, p)), None
        )
        return None if rank is None else resolve_rank(rank, full_rank)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's flat, JSON-serialisable dict; ``from_dict`` reads it back."""
        flat = self.policy.to_dict()
        data = {"rank": flat.pop("rank"), "solver": self.solver,
                "factorize_embeddings": self.factorize_embeddings,
                "min_param_saving": self.min_param_saving, "skip": list(self.skip),
                "rank_overrides": dict(self.rank_overrides), "damping": self.damping}
        return {**data, **flat}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LowRankConfig:
        """The config ``to_dict`` wrote (unknown keys or invalid values raise)."""
        own = {f.name for f in fields(cls)} - {"policy"}
        policy_keys = {"rank", "policy", "budget", "energy", "budget_error", "floor", "low",
                       "high", "steps"}
        unknown = sorted(set(data) - own - policy_keys)
        if unknown:
            raise LowRankConfigError(f"unknown LowRankConfig keys {unknown}; expected a subset "
                                     f"of {sorted(own | policy_keys)}")
        policy = policy_from_dict({k: v for k, v in data.items() if k in policy_keys})
        return cls(policy, **{k: v for k, v in data.items() if k in own})
