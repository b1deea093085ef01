"""Rank policies: how factorization chooses each layer's rank; each one validates itself."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from lrt_deploy.errors import ConfigError

__all__ = [
    "BUDGET_ERRORS",
    "BudgetRank",
    "EnergyRank",
    "FidelityFloor",
    "LowRankConfigError",
    "RankPolicy",
    "UniformRank",
    "check_rank",
    "policy_from_dict",
    "resolve_rank",
]

#: What a budget minimises: the layers' error weighted by its measured effect on the model
#: output (``"output"``), or the plain sum of the layers' own errors (``"layer"``).
BUDGET_ERRORS = ("output", "layer")


class LowRankConfigError(ConfigError):
    """A factorization setting is invalid or inconsistent with the inputs given."""


def check_rank(rank: Any, what: str) -> None:
    """Raise unless ``rank`` is an int >= 1 or a float fraction in (0, 1]."""
    is_int = isinstance(rank, int) and not isinstance(rank, bool)
    valid = (is_int and rank >= 1) or (isinstance(rank, float) and 0.0 < rank <= 1.0)
    if not valid:
        raise LowRankConfigError(
            f"{what} must be a positive int or a fraction in (0, 1], got {rank!r}"
        )


def resolve_rank(rank: int | float, full_rank: int) -> int:
    """A fixed rank clamped to ``full_rank``, or a fraction of it rounded up (at least 1)."""
    if isinstance(rank, float):
        return max(1, math.ceil(rank * full_rank))
    return min(rank, full_rank)


def _check_fraction(value: Any, what: str, *, closed: bool = False) -> None:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not (0.0 < value < 1.0 or (closed and value == 1.0)):
        interval = "(0, 1]" if closed else "(0, 1)"
        raise LowRankConfigError(f"{what} must be a fraction in {interval}, got {value!r}")


def _check_budget_error(value: Any, owner: str) -> None:
    if value not in BUDGET_ERRORS:
        raise LowRankConfigError(
            f"{owner}.budget_error must be one of {BUDGET_ERRORS}, got {value!r}"
        )


def _flat(policy: str, **values: Any) -> dict[str, Any]:
    """The manifest's flat policy keys, every one present (None where it does not apply)."""
    flat = {"rank": None, "policy": policy, "budget": None, "energy": None,
            "budget_error": "output"}
    flat.update(values)
    return flat


@dataclass(frozen=True)
class UniformRank:
    """One rank for every layer: an int >= 1, or a fraction in (0, 1] of each full rank."""

    rank: int | float
    name: ClassVar[str] = "uniform"

    def __post_init__(self) -> None:
        check_rank(self.rank, "UniformRank.rank")

    def describe(self) -> str:
        """What it asks for, for progress lines and errors."""
        return f"rank {self.rank}"

    def to_dict(self) -> dict[str, Any]:
        """The manifest's flat keys (``policy_from_dict`` reads them back)."""
        return _flat(self.name, rank=self.rank)


@dataclass(frozen=True)
class EnergyRank:
    """Per layer, the smallest rank keeping ``energy`` (in (0, 1]) of its spectrum energy."""

    energy: float
    name: ClassVar[str] = "energy"

    def __post_init__(self) -> None:
        _check_fraction(self.energy, "EnergyRank.energy", closed=True)

    def describe(self) -> str:
        """What it asks for, for progress lines and errors."""
        return f"energy {self.energy:g} of each layer's spectrum"

    def to_dict(self) -> dict[str, Any]:
        """The manifest's flat keys (``policy_from_dict`` reads them back)."""
        return _flat(self.name, energy=self.energy)


@dataclass(frozen=True)
class BudgetRank:
    """Ranks spread over the layers to keep ``budget`` (in (0, 1)) of their parameters."""

    budget: float
    #: ``"output"``: each layer's error weighted by its measured effect on the model output (a
    #: few extra calibration forwards per layer); ``"layer"``: the plain sum of their errors.
    budget_error: str = "output"
    name: ClassVar[str] = "budget"

    def __post_init__(self) -> None:
        _check_fraction(self.budget, "BudgetRank.budget")
        _check_budget_error(self.budget_error, "BudgetRank")

    def describe(self) -> str:
        """What it asks for, for progress lines and errors."""
        return f"budget {self.budget:g} of the candidate parameters"

    def to_dict(self) -> dict[str, Any]:
        """The manifest's flat keys (``policy_from_dict`` reads them back)."""
        return _flat(self.name, budget=self.budget, budget_error=self.budget_error)


@dataclass(frozen=True)
class FidelityFloor:
    """The smallest ``BudgetRank`` in [low, high] whose model keeps mean cosine ``floor``."""

    floor: float
    budget_error: str = "output"
    #: Smallest budget the bisection tries.
    low: float = 0.3
    #: Largest budget tried first; when it misses the floor there is no answer.
    high: float = 0.98
    #: Bisection steps after the first trial at ``high``.
    steps: int = 4
    name: ClassVar[str] = "fidelity_floor"

    def __post_init__(self) -> None:
        _check_fraction(self.floor, "FidelityFloor.floor")
        _check_budget_error(self.budget_error, "FidelityFloor")
        _check_fraction(self.low, "FidelityFloor.low")
        _check_fraction(self.high, "FidelityFloor.high")
        if self.low > self.high:
            raise LowRankConfigError(
                f"FidelityFloor.low {self.low} is above FidelityFloor.high {self.high}"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise LowRankConfigError(
                f"FidelityFloor.steps must be an int >= 0, got {self.steps!r}"
            )

    def describe(self) -> str:
        """What it asks for, for progress lines and errors."""
        return f"the smallest budget with mean cosine >= {self.floor}"

    def start(self) -> BudgetRank:
        """The budget the search starts from (``high``)."""
        return BudgetRank(self.high, self.budget_error)

    def to_dict(self) -> dict[str, Any]:
        """The flat keys plus the search's (``policy_from_dict`` reads them back)."""
        return {**_flat(self.name, budget_error=self.budget_error), "floor": self.floor,
                "low": self.low, "high": self.high, "steps": self.steps}


RankPolicy = UniformRank | EnergyRank | BudgetRank | FidelityFloor

_BY_NAME: dict[str, type] = {
    cls.name: cls for cls in (UniformRank, EnergyRank, BudgetRank, FidelityFloor)
}
_FIELDS = {"uniform": ("rank",), "energy": ("energy",), "budget": ("budget", "budget_error"),
           "fidelity_floor": ("budget_error", "floor", "low", "high", "steps")}
_OWNER = {"rank": "uniform", "budget": "budget", "energy": "energy", "budget_error": "budget"}


def policy_from_dict(data: dict[str, Any]) -> RankPolicy:
    """The policy a flat dict (``to_dict``'s keys; ``policy`` defaults to uniform) describes."""
    name = data.get("policy", "uniform")
    if name not in _BY_NAME:
        raise LowRankConfigError(f"policy must be one of {tuple(_BY_NAME)}, got {name!r}")
    own = _FIELDS[name]
    for key, owner in _OWNER.items():
        value = data.get(key)
        # Every flat key is written for every policy; budget_error's default means "unset".
        unset = value is None or (key == "budget_error" and value == "output")
        if key not in own and not unset:
            raise LowRankConfigError(
                f"{key}={value!r} only applies to policy={owner!r} (policy is {name!r}): set "
                f"policy={owner!r} or drop {key}"
            )
    missing = [key for key in own[:1] if data.get(key) is None]
    if missing:
        raise LowRankConfigError(f"policy={name!r} needs a {missing[0]!r} entry")
    return _BY_NAME[name](**{key: data[key] for key in own if key in data})
