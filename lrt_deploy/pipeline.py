"""``export_bundle``: make a plan, then run its stages: compress, build, measure, write, report."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrt_deploy.export.targets import Target
from lrt_deploy.plan import BenchmarkSettings, ModelFacts, Plan, compressing, make_plan

if TYPE_CHECKING:
    from lrt_deploy.compress import FactorizationResult, LowRankConfig
    from lrt_deploy.compress.recipe import CompressionOutcome
    from lrt_deploy.config.heal import HealConfig
    from lrt_deploy.export.build import ModelKind, Variant
    from lrt_deploy.export.by_design import ByDesignBaseline
    from lrt_deploy.export.passes.dense_equivalent import FoldResult
    from lrt_deploy.load import LoadedModel
    from lrt_deploy.measure import Reference

__all__ = ["BenchmarkSettings", "BundleResult", "export_bundle"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str], None]


@dataclass
class BundleResult:
    """What ``export_bundle`` wrote and measured."""

    out_dir: Path
    manifest: dict[str, Any]
    report: Any
    variants: list[Variant]
    factorization: FactorizationResult | None = None
    compression: CompressionOutcome | None = None
    devices: dict[str, Any] | None = None


@dataclass
class Design:
    """How a model that is not compressed was built: its low-rank units and its baseline."""

    layers: list[dict[str, Any]]
    baseline: ByDesignBaseline | None


@dataclass
class Inputs:
    """The data every variant is measured on: held-out batches, references, latency feeds."""

    evaluation: list[dict[str, Any]]
    reference: Reference
    feeds: dict[str, Any]
    calibration: list[dict[str, Any]]


@dataclass
class Built:
    """The variants built (the deployed one last) and the by-design fold, if any."""

    variants: list[Variant]
    fold: FoldResult | None = None


def _noop(_: str) -> None:
    return None


def export_bundle(
    loaded: LoadedModel,
    out_dir: str | Path,
    target: Target,
    *,
    compress: LowRankConfig | None = None,
    heal: HealConfig | None = None,
    calibration: str | Path | None = None,
    settings: BenchmarkSettings | None = None,
    force: bool = False,
    progress: ProgressFn = _noop,
    verify_on_devices: bool = True,
) -> BundleResult:
    """Build ``loaded``'s bundle in ``out_dir`` (atomically; nothing left on failure) and
    measure it against the dense model; compression modifies ``loaded.module``."""
    from lrt_deploy.export.bundle import commit, staging_folder, write_bundle
    from lrt_deploy.measure import judge_deployed_floor, measure_variants, verify_devices
    from lrt_deploy.report.writer import write_report

    design = _design(loaded, compressing(compress, heal))
    facts = ModelFacts.of(loaded, len(design.layers), design.baseline is not None)
    plan = make_plan(facts, target, compress=compress, heal=heal, calibration=calibration,
                     settings=settings)
    out_dir = Path(out_dir)
    with staging_folder(out_dir, force, loaded.source_path) as staging:
        batches = _calibration(plan, loaded, calibration, progress)
        outcome = _compress(plan, loaded, target, batches, progress)
        dense = outcome.dense if outcome is not None else loaded
        inputs = _inputs(plan, loaded, dense, target, batches, progress)
        built = _build(plan, loaded, dense, design, target, staging / ".work", inputs, progress)
        deployed = built.variants[-1]
        latency_method = measure_variants(built.variants, loaded.kind, inputs.reference,
                                          inputs.feeds, target.providers, plan.settings, progress)
        incomparable = _incomparable(built.variants, design.baseline)
        if outcome is not None and outcome.selection_fidelity is not None:
            judge_deployed_floor(outcome, deployed, dense, loaded, target, plan.settings,
                                 inputs.feeds, quiet=progress is not _noop, progress=progress)
        progress("packaging the bundle")
        lowrank, baseline_text = _lowrank_section(outcome, design, built.fold)
        manifest = write_bundle(
            staging, target=target, deployed=deployed, reference=built.variants[0],
            source={"name": loaded.name, "format": loaded.format,
                    "sha256": loaded.source_hash, "kind": loaded.kind},
            tokenizer_file=loaded.tokenizer_file, text_limits=loaded.text_limits,
            benchmark=plan.settings.to_dict(), feeds=inputs.feeds,
            threads=plan.settings.threads, lowrank=lowrank,
        )
        devices = verify_devices(staging, manifest, dense, loaded, target,
                                 run=verify_on_devices, progress=progress)
        report = _report(loaded, target, built.variants, plan.settings, outcome, design.layers,
                         baseline_text, incomparable, inputs.feeds, latency_method, devices)
        write_report(report, staging)
        shutil.rmtree(staging / ".work")
        commit(staging, out_dir)
    factorization = outcome.factorization if outcome is not None else None
    return BundleResult(out_dir, manifest, report, built.variants, factorization, outcome,
                        devices)


def _design(loaded: LoadedModel, changes: bool) -> Design:
    """The low-rank units a model was built with and its baseline (none when compressing)."""
    from lrt_deploy.compress.recipe import lowrank_by_design
    from lrt_deploy.export.by_design import by_design_baseline

    if changes:
        return Design([], None)
    return Design(lowrank_by_design(loaded.module), by_design_baseline(loaded))


def _calibration(plan: Plan, loaded: LoadedModel, calibration: str | Path | None,
                 progress: ProgressFn) -> list[dict[str, Any]]:
    """Calibration batches, read once for factorization, healing, the search and int8."""
    from lrt_deploy.data import readers

    if not plan.read_calibration:
        return []
    progress("reading calibration data")
    return readers.calibration_batches(loaded, calibration, max_lines=plan.calibration_lines)


def _compress(plan: Plan, loaded: LoadedModel, target: Target, batches: list[dict[str, Any]],
              progress: ProgressFn) -> CompressionOutcome | None:
    """Run the compression recipe the plan asks for (None when it asks for none)."""
    from lrt_deploy.compress.recipe import (
        compress_model,
        simulated_quantization,
        text_healing_data,
    )
    from lrt_deploy.data import readers

    if not plan.compressing:
        return None
    heal = plan.heal
    probe = (readers.evaluation_batches(loaded, plan.settings.eval_batch,
                                        corpus=readers.DOMAIN_HELDOUT_TEXT)
             if plan.probe else None)
    healing_data = (text_healing_data(loaded, plan.healing_text, batch_size=heal.batch)
                    if plan.stream_text else None)
    simulation = (simulated_quantization(target.precision)
                  if heal is not None and heal.quantized else None)
    return compress_model(loaded, plan.compress, batches, heal=heal, quantization=simulation,
                          progress=progress, healing_data=healing_data, probe=probe,
                          probe_data=readers.DOMAIN_HELDOUT_TEXT)


def _inputs(plan: Plan, loaded: LoadedModel, dense: LoadedModel, target: Target,
            batches: list[dict[str, Any]], progress: ProgressFn) -> Inputs:
    """Held-out batches, the dense model's outputs on them, latency and calibration feeds."""
    from lrt_deploy.data import readers
    from lrt_deploy.measure import reference_outputs

    progress("preparing held-out evaluation data")
    settings = plan.settings
    evaluation = readers.evaluation_batches(loaded, settings.eval_batch)
    measured = (readers.evaluation_batches(loaded, settings.eval_batch, dict(target.fixed_shape))
                if target.fixed_shape else evaluation)
    reference = reference_outputs(dense, loaded.output_names[0], measured)
    feeds = readers.latency_inputs(loaded, settings.batch, settings.sequence)
    calibration = readers.to_numpy_batches(batches) if plan.calibrate else []
    return Inputs(evaluation, reference, feeds, calibration)


def _build(plan: Plan, loaded: LoadedModel, dense: LoadedModel, design: Design, target: Target,
           work: Path, inputs: Inputs, progress: ProgressFn) -> Built:
    """Export and optimise every model the plan names; the last variant is deployed."""
    from lrt_deploy.data import readers
    from lrt_deploy.export.build import ModelKind, build_by_design_variants, build_variants

    work.mkdir()
    common = {"target": target, "work": work, "check_feeds": inputs.feeds,
              "calibration_feeds": inputs.calibration, "progress": progress}
    if plan.by_design:
        variants, fold = build_by_design_variants(
            loaded, design.baseline,
            validation_batches=lambda model: readers.validation_batches(model, inputs.evaluation),
            **common,
        )
        built = Built(variants, fold)
    else:
        models = {ModelKind.DENSE: dense, ModelKind.LRT: loaded, ModelKind.HEALED: loaded}
        built = Built([
            variant for kind in plan.models for variant in build_variants(
                kind, models[kind], is_baseline=plan.is_baseline(kind),
                validation_batches=readers.validation_batches(models[kind], inputs.evaluation),
                **common,
            )
        ])
    built.variants[-1].deployed = True
    return built


def _incomparable(variants: list[Variant], baseline: ByDesignBaseline | None
                  ) -> list[ModelKind]:
    """Models whose cosine would mislead (standard attention is not a Linformer's function);
    their variants' fidelity is cleared."""
    from lrt_deploy.export.build import ModelKind

    if baseline is None or baseline.fidelity_comparable:
        return []
    for variant in variants:
        if variant.model is ModelKind.DENSE:
            variant.fidelity = {}
    return [ModelKind.DENSE]


def _lowrank_section(outcome: CompressionOutcome | None, design: Design,
                     fold: FoldResult | None) -> tuple[dict[str, Any] | None, str | None]:
    """The manifest's ``lowrank`` section and the report's baseline description."""
    from lrt_deploy.report.summary import baseline_description

    if outcome is not None:
        return outcome.to_manifest(), None
    if not design.layers and design.baseline is None:
        return None, None
    lowrank: dict[str, Any] = {"origin": "by design", "layers": design.layers}
    if design.baseline is None:
        return lowrank, None
    lowrank["baseline"] = {
        **design.baseline.to_dict(), "fold": fold.to_dict() if fold is not None else None
    }
    return lowrank, baseline_description(design.baseline, fold)


def _report(
    loaded: LoadedModel,
    target: Target,
    variants: list[Variant],
    settings: BenchmarkSettings,
    outcome: CompressionOutcome | None,
    design_layers: list[dict[str, Any]],
    baseline: str | None = None,
    incomparable: list[ModelKind] | None = None,
    feeds: dict[str, Any] | None = None,
    latency_method: str | None = None,
    devices: dict[str, Any] | None = None,
) -> Any:
    """The comparison report of the run."""
    from lrt_deploy.report.summary import fidelity_description, run_report

    measured_on: dict[str, Any] = (
        {"batch": settings.batch, "sequence": settings.sequence}
        if loaded.is_text
        else {"inputs": ", ".join(  # what latency was measured on
            f"{n} {tuple(t.shape)}" for n, t in (feeds or loaded.example_inputs).items()
        )}
    )
    return run_report(
        title=f"{loaded.name} ({loaded.format}) -> target {target.name}",
        variants=variants,
        measured_on=measured_on,
        threads=settings.threads,
        fidelity_inputs=fidelity_description(
            loaded.kind, loaded.output_names[0], loaded.is_text, outcome is not None,
            by_design=baseline is not None,
        ),
        compression=outcome,
        design_layers=design_layers,
        baseline=baseline,
        incomparable=incomparable or (),
        latency_method=latency_method,
        devices=devices,
    )
