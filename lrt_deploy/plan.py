"""The plan of an export: configs and the loaded model's facts in, every decision out (pure)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrt_deploy.compress.recipe import check_compressible, check_simulatable
from lrt_deploy.config.heal import HealConfig
from lrt_deploy.config.lowrank import LowRankConfig
from lrt_deploy.config.ranks import FidelityFloor
from lrt_deploy.errors import ConfigError
from lrt_deploy.export.build import ModelKind
from lrt_deploy.export.targets import Target

__all__ = ["CALIBRATION_HEAD_LINES", "BenchmarkSettings", "ModelFacts", "Plan", "make_plan"]

logger = logging.getLogger(__name__)

#: Lines of a user's text corpus read for activation statistics and the budget search when
#: healing streams the whole of it (the rest is never held in memory).
CALIBRATION_HEAD_LINES = 2048


@dataclass(frozen=True)
class BenchmarkSettings:
    """How latency and fidelity are measured for every variant (identical for all of them)."""

    batch: int = 1
    sequence: int = 128
    threads: int = 2
    warmup: int = 5
    runs: int = 30
    eval_batch: int = 16
    #: True when the graph's batch is fixed, so non-text example inputs are resized to ``batch``.
    fixed_batch: bool = False

    def __post_init__(self) -> None:
        for name in ("batch", "sequence", "threads", "runs", "eval_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"BenchmarkSettings.{name} must be at least 1, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``benchmark`` section."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs to know of a loaded model (``of`` reads them)."""

    name: str
    format: str
    is_text: bool
    can_compress: bool
    max_length: int = 0
    #: Positions the model has (a fixed sequence must fit them), or None when unknown.
    max_sequence: int | None = None
    #: Low-rank units the model was built with (0 when compressing: never looked for).
    design_layers: int = 0
    #: Whether a by-design baseline (dense equivalent, standard attention) exists.
    by_design: bool = False

    @classmethod
    def of(cls, loaded: Any, design_layers: int = 0, by_design: bool = False) -> ModelFacts:
        """The facts of a ``LoadedModel`` and what the caller found it was built with."""
        return cls(loaded.name, loaded.format, loaded.is_text, loaded.can_compress,
                   loaded.max_length, (loaded.text_limits or {}).get("max_sequence"),
                   design_layers, by_design)


@dataclass(frozen=True)
class Plan:
    """What an export does, decided once before any work."""

    settings: BenchmarkSettings
    compress: LowRankConfig | None
    heal: HealConfig | None
    #: Something changes the model's weights (a factorization, or quantisation-aware healing).
    compressing: bool
    #: The target's precision uses calibration feeds (static int8, outlier smoothing).
    calibrate: bool
    #: Calibration batches are read at all.
    read_calibration: bool
    #: Read only this many head lines of the calibration text (healing streams the rest).
    calibration_lines: int | None
    #: Healing streams ``healing_text`` instead of cycling calibration batches.
    stream_text: bool
    healing_text: str | Path | None
    #: A FidelityFloor's margin is measured on the shipped different-domain held-out text.
    probe: bool
    #: Built through the by-design path (the model and its dense-equivalent baseline).
    by_design: bool
    #: The models to build, in order; the last one's last variant is deployed.
    models: tuple[ModelKind, ...]

    def is_baseline(self, kind: ModelKind) -> bool:
        """Whether ``kind``'s variants are the ones the others are compared with."""
        return kind is ModelKind.DENSE or len(self.models) == 1


def compressing(compress: LowRankConfig | None, heal: HealConfig | None) -> bool:
    """Whether the weights change: a factorization, or quantisation-aware healing alone."""
    return compress is not None or bool(heal is not None and heal.quantized)


def check_choices(target: Target, compress: LowRankConfig | None,
                  heal: HealConfig | None) -> None:
    """Refuse combinations of configs that cannot work, before any model is loaded."""
    if heal is None:
        return
    if heal.quantized:
        check_simulatable(target.precision)
    elif compress is None:
        raise ConfigError("heal=HealConfig(...) needs a factorization (compress=LowRankConfig"
                          "(...)) or HealConfig.quantized=True, and HealConfig.steps >= 1")


def make_plan(facts: ModelFacts, target: Target, *, compress: LowRankConfig | None = None,
              heal: HealConfig | None = None, calibration: str | Path | None = None,
              settings: BenchmarkSettings | None = None) -> Plan:
    """Decide what the export of a model with ``facts`` does; raises on impossible choices."""
    check_choices(target, compress, heal)
    changes = compressing(compress, heal)
    _check_fixed_shape(facts, target)
    if changes:
        check_compressible(facts)
    if heal is not None and heal.corpus is not None and not (facts.is_text and changes):
        raise ConfigError(
            "HealConfig.corpus is text that healing streams: it needs a text model (other "
            "models heal on calibration= .npz batches)"
        )
    precision = target.precision
    calibrate = bool(precision and (precision.needs_calibration or (
        precision.uses_calibration and (facts.is_text or calibration is not None))))
    healing_text = heal.corpus if heal is not None and heal.corpus is not None else calibration
    stream = bool(changes and heal is not None and healing_text is not None and facts.is_text
                  and not str(healing_text).endswith(".npz"))
    floor = compress is not None and isinstance(compress.policy, FidelityFloor)
    needs = compress is None or compress.solver == "asvd" or heal is not None or floor
    return Plan(
        settings=_settings(facts, target, settings or BenchmarkSettings()),
        compress=compress, heal=heal, compressing=changes, calibrate=calibrate,
        read_calibration=calibrate or (changes and needs),
        calibration_lines=(CALIBRATION_HEAD_LINES if stream and heal.corpus is None else None),
        stream_text=stream, healing_text=healing_text, probe=floor and facts.is_text,
        by_design=not changes and facts.by_design, models=_models(facts, compress, changes),
    )


def _models(facts: ModelFacts, compress: LowRankConfig | None,
            changes: bool) -> tuple[ModelKind, ...]:
    """The dense model, then the factorized (or healed) one; a by-design model alone."""
    if changes:
        return (ModelKind.DENSE, ModelKind.LRT if compress is not None else ModelKind.HEALED)
    if facts.by_design:
        return ()  # the by-design path builds the model and its baseline together
    return (ModelKind.LRT,) if facts.design_layers else (ModelKind.DENSE,)


def _settings(facts: ModelFacts, target: Target, settings: BenchmarkSettings) -> BenchmarkSettings:
    """Latency at the shape the graph is fixed to, and never past the model's maximum length."""
    if target.fixed_shape:
        settings = dataclasses.replace(
            settings,
            batch=target.fixed_shape.get("batch", settings.batch),
            sequence=target.fixed_shape.get("sequence", settings.sequence),
            fixed_batch="batch" in target.fixed_shape,
        )
    if facts.is_text and settings.sequence > facts.max_length:
        logger.warning(
            "latency sequence %d exceeds the model's maximum length %d; measuring at %d",
            settings.sequence, facts.max_length, facts.max_length,
        )
        settings = dataclasses.replace(settings, sequence=facts.max_length)
    return settings


def _check_fixed_shape(facts: ModelFacts, target: Target) -> None:
    """A fixed sequence must fit the model's positions (an oversized one fails deep in export)."""
    sequence = target.fixed_shape.get("sequence")
    limit = facts.max_sequence
    if sequence and limit and sequence > limit:
        raise ConfigError(
            f"Target.fixed_shape sequence={sequence} exceeds the {limit} positions the model "
            f"has: use at most sequence={limit}"
        )
