"""Configuration of a low-rank factorization run."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = [
    "SOLVERS",
    "LowRankConfig",
    "LowRankConfigError",
]

SOLVERS = ("svd", "asvd")


class LowRankConfigError(ValueError):
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
            is the full rank.
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
    """

    rank: int | float
    solver: str = "asvd"
    factorize_embeddings: bool = False
    min_param_saving: float = 0.0
    skip: tuple[str, ...] = ()
    rank_overrides: dict[str, int | float] = field(default_factory=dict)
    damping: float = 1e-4

    def __post_init__(self) -> None:
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
        """
        rank = next(
            (r for p, r in self.rank_overrides.items() if fnmatch.fnmatchcase(name, p)),
            self.rank,
        )
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
        if "rank" not in data:
            raise LowRankConfigError("LowRankConfig needs a 'rank' entry")
        return cls(**data)
