"""Configuration of a low-rank factorization run."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lrt_deploy.errors import LrtDeployError

__all__ = [
    "BUDGET_ERRORS",
    "POLICIES",
    "SOLVERS",
    "LowRankConfig",
    "LowRankConfigError",
]

SOLVERS = ("svd", "asvd")
POLICIES = ("uniform", "energy", "budget")
BUDGET_ERRORS = ("output", "layer")


class LowRankConfigError(LrtDeployError):
    """A factorization setting is invalid or inconsistent with the inputs given."""


def _check_rank(rank: Any, what: str) -> None:
    is_int = isinstance(rank, int) and not isinstance(rank, bool)
    valid = (is_int and rank >= 1) or (isinstance(rank, float) and 0.0 < rank <= 1.0)
    if not valid:
        raise LowRankConfigError(
            f"{what} must be a positive int or a fraction in (0, 1], got {rank!r}"
        )


@dataclass
class LowRankConfig:
    """How to factorize a model's layers into low-rank pairs.

    Args:
        rank: Fixed rank (int >= 1) or fraction of each layer's full rank ``min(out, in)``
            (float in (0, 1], rounded up, at least 1). Note ``1`` is rank one while ``1.0``
            is the full rank. Required by ``policy="uniform"``, unused by the others.
        solver: ``"svd"`` fits the weights; ``"asvd"`` fits the layer outputs on calibration
            inputs (activation-aware) and needs calibration batches.
        factorize_embeddings: Also factorize ``nn.Embedding`` tables.
        min_param_saving: Keep a layer dense unless its low-rank form has at most
            ``(1 - min_param_saving)`` of its dense parameters (and strictly fewer).
        skip: fnmatch patterns on module qualified names to keep dense, e.g. ``"pooler.*"``.
        rank_overrides: fnmatch pattern -> rank, overriding ``rank``; the first matching
            pattern (in insertion order) wins.
        damping: Relative ridge on the input covariance for ``"asvd"`` whitening: eigenvalues
            are floored at ``damping`` times their mean.
        policy: How ranks are chosen. ``"uniform"``: ``rank`` for every layer. ``"energy"``:
            per layer, the smallest rank keeping ``energy`` of its (whitened) spectrum energy.
            ``"budget"``: ranks spread over the layers to keep ``budget`` of the candidate
            layers' parameters with the least total truncation error. Under every policy
            ``rank_overrides`` pin a layer's rank and ``skip`` keeps it dense.
        budget: Fraction in (0, 1) of the candidate layers' dense parameters to keep (layers
            kept dense by ``skip``, tied weights or overrides count against it); required by,
            and only valid with, ``policy="budget"``.
        energy: Fraction in (0, 1] of each layer's spectrum energy to keep; required by, and
            only valid with, ``policy="energy"``.
        budget_error: What ``policy="budget"`` minimises. ``"output"``: each layer's error
            scaled by its measured effect on the model output (a few extra calibration
            forwards per layer; on all-MiniLM-L6-v2 much better than the alternative).
            ``"layer"``: the plain sum of the layers' own (whitened) errors, no extra forwards.
            Without calibration data both are the plain sum.
    """

    rank: int | float | None = None
    solver: str = "asvd"
    factorize_embeddings: bool = False
    min_param_saving: float = 0.0
    skip: tuple[str, ...] = ()
    rank_overrides: dict[str, int | float] = field(default_factory=dict)
    damping: float = 1e-4
    policy: str = "uniform"
    budget: float | None = None
    energy: float | None = None
    budget_error: str = "output"

    def __post_init__(self) -> None:
        self._check_policy()
        if self.rank is not None:
            _check_rank(self.rank, "rank")
        if self.solver not in SOLVERS:
            raise LowRankConfigError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if not isinstance(self.factorize_embeddings, bool):
            raise LowRankConfigError(
                f"factorize_embeddings must be True or False, got {self.factorize_embeddings!r}"
            )
        if not (
            isinstance(self.min_param_saving, (int, float)) and 0.0 <= self.min_param_saving < 1.0
        ):
            raise LowRankConfigError(
                f"min_param_saving must be a fraction in [0, 1), got {self.min_param_saving!r}"
            )
        if isinstance(self.skip, str):
            raise LowRankConfigError(
                f"skip must be a sequence of patterns, e.g. ({self.skip!r},), not a bare string"
            )
        # Lists arrive from JSON and from casual callers; store a tuple so configs compare equal.
        self.skip = tuple(self.skip)
        for pattern in self.skip:
            if not isinstance(pattern, str):
                raise LowRankConfigError(f"skip patterns must be strings, got {pattern!r}")
        if not isinstance(self.rank_overrides, dict):
            raise LowRankConfigError(
                f"rank_overrides must be a dict of pattern -> rank, got {self.rank_overrides!r}"
            )
        for pattern, rank in self.rank_overrides.items():
            if not isinstance(pattern, str):
                raise LowRankConfigError(f"rank_overrides keys must be strings, got {pattern!r}")
            _check_rank(rank, f"rank_overrides[{pattern!r}]")
        if not (
            isinstance(self.damping, (int, float))
            and not isinstance(self.damping, bool)
            and math.isfinite(self.damping)
            and self.damping > 0
        ):
            raise LowRankConfigError(
                f"damping must be a small positive number such as 1e-4, got {self.damping!r}"
            )

    def _check_policy(self) -> None:
        if self.policy not in POLICIES:
            raise LowRankConfigError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.budget_error not in BUDGET_ERRORS:
            raise LowRankConfigError(
                f"budget_error must be one of {BUDGET_ERRORS}, got {self.budget_error!r}"
            )
        if self.policy == "uniform" and self.rank is None:
            raise LowRankConfigError(
                "LowRankConfig needs a 'rank' (e.g. rank=0.5) with policy='uniform', or "
                "policy='budget' with budget=0.6, or policy='energy' with energy=0.95"
            )
        for name, example, upper_closed in (("budget", 0.6, False), ("energy", 0.95, True)):
            value = getattr(self, name)
            interval = "(0, 1]" if upper_closed else "(0, 1)"
            if value is None:
                if self.policy == name:
                    raise LowRankConfigError(
                        f"policy={name!r} needs {name}=<fraction in {interval}>, e.g. {example}"
                    )
                continue
            if self.policy != name:
                raise LowRankConfigError(
                    f"{name}={value!r} only applies to policy={name!r} "
                    f"(policy is {self.policy!r}): set policy={name!r} or drop {name}"
                )
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not is_number or not (0.0 < value < 1.0 or (upper_closed and value == 1.0)):
                raise LowRankConfigError(f"{name} must be a fraction in {interval}, got {value!r}")

    def skip_pattern(self, name: str) -> str | None:
        """The first ``skip`` pattern matching module name ``name``, or None."""
        return next((p for p in self.skip if fnmatch.fnmatchcase(name, p)), None)

    def rank_for(self, name: str, full_rank: int) -> int:
        """Resolve the rank for module ``name`` whose full rank is ``full_rank``.

        Args:
            name: Qualified module name, matched against ``rank_overrides``.
            full_rank: ``min(out, in)`` of the layer.

        Returns:
            The rank in ``[1, full_rank]``; fixed ranks above the full rank are clamped.

        Raises:
            LowRankConfigError: No override matches and ``rank`` is None (a non-uniform policy
                chooses those ranks itself: see :meth:`rank_override_for`).
        """
        rank = self.rank_override_for(name, full_rank)
        if rank is not None:
            return rank
        if self.rank is None:
            raise LowRankConfigError(
                f"no rank for {name!r}: rank is None and no rank_overrides pattern matches"
            )
        return self._resolve(self.rank, full_rank)

    def rank_override_for(self, name: str, full_rank: int) -> int | None:
        """The rank pinned by the first ``rank_overrides`` pattern matching ``name``, or None.

        Args:
            name: Qualified module name.
            full_rank: ``min(out, in)`` of the layer.

        Returns:
            The resolved rank in ``[1, full_rank]``, or None when no pattern matches.
        """
        rank = next(
            (r for p, r in self.rank_overrides.items() if fnmatch.fnmatchcase(name, p)), None
        )
        return None if rank is None else self._resolve(rank, full_rank)

    @staticmethod
    def _resolve(rank: int | float, full_rank: int) -> int:
        if isinstance(rank, float):
            return max(1, math.ceil(rank * full_rank))
        return min(rank, full_rank)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that ``from_dict`` turns back into an equal config."""
        data = asdict(self)
        data["skip"] = list(self.skip)
        data["rank_overrides"] = dict(self.rank_overrides)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LowRankConfig:
        """Rebuild a config from ``to_dict`` output.

        Raises:
            LowRankConfigError: On unknown keys or invalid values.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LowRankConfigError(
                f"unknown LowRankConfig keys {unknown}; expected a subset of {sorted(known)}"
            )
        if "rank" not in data and data.get("policy", "uniform") == "uniform":
            raise LowRankConfigError("LowRankConfig needs a 'rank' entry")
        return cls(**data)
