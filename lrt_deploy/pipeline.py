"""The whole job, as a composition of stages: plan -> compress -> build variants -> measure ->
write bundle -> report.

Each stage is a function of the package that owns it and takes plain values:

* ``data.readers``: calibration, held-out and latency batches;
* ``compress.recipe``: (budget search) -> factorize -> (heal);
* ``export.build``: export, validate, optimise and apply the target's precision, per model;
* ``measure.measure_variants``: one session per variant, fidelity against PyTorch
  (``compress.fidelity``), then latency on the same inputs, the variants interleaved
  (``runtime.benchmark.measure_interleaved``);
* ``export.bundle``: output-folder checks, manifest, atomic commit;
* ``report.summary``: the comparison report from the typed results.

The CLI and Python users run the same code (``lrt_deploy.export_bundle``).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrt_deploy.errors import LrtDeployError
from lrt_deploy.export.targets import Target

if TYPE_CHECKING:
    from lrt_deploy.compress import FactorizationResult, LowRankConfig
    from lrt_deploy.compress.recipe import CompressionOutcome
    from lrt_deploy.export.build import ModelKind, Variant
    from lrt_deploy.load import LoadedModel

__all__ = ["BenchmarkSettings", "BundleResult", "export_bundle"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str], None]

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def _noop(_: str) -> None:
    return None


def _plan_settings(
    loaded: LoadedModel, target: Target, settings: BenchmarkSettings
) -> BenchmarkSettings:
    """Latency is measured at the shape the graph is fixed to, and never past the model's
    maximum length."""
    if target.fixed_shape:
        settings = dataclasses.replace(
            settings,
            batch=target.fixed_shape.get("batch", settings.batch),
            sequence=target.fixed_shape.get("sequence", settings.sequence),
            fixed_batch="batch" in target.fixed_shape,
        )
    if loaded.is_text and settings.sequence > loaded.max_length:
        logger.warning(
            "latency sequence %d exceeds the model's maximum length %d; measuring at %d",
            settings.sequence, loaded.max_length, loaded.max_length,
        )
        settings = dataclasses.replace(settings, sequence=loaded.max_length)
    return settings


def _check_fixed_shape(loaded: LoadedModel, target: Target) -> None:
    """A fixed sequence must fit the model's positions (an oversized one fails deep in export)."""
    sequence = target.fixed_shape.get("sequence")
    limit = (loaded.text_limits or {}).get("max_sequence")
    if sequence and limit and sequence > limit:
        raise LrtDeployError(
            f"--fixed-shape sequence={sequence} exceeds the {limit} positions the model has: "
            f"use at most sequence={limit}"
        )


def export_bundle(
    loaded: LoadedModel,
    out_dir: str | Path,
    target: Target,
    *,
    compress: LowRankConfig | None = None,
    calibration: str | Path | None = None,
    settings: BenchmarkSettings | None = None,
    force: bool = False,
    heal_steps: int = 0,
    fidelity_floor: float | None = None,
    progress: ProgressFn = _noop,
    device: str = "auto",
    heal_precision: str = "auto",
    heal_quantized: bool = False,
    heal_batch: int = 32,
    heal_lr: float = 1e-4,
    heal_corpus: str | Path | None = None,
    verify_on_devices: bool = True,
) -> BundleResult:
    """Build a deployment bundle for ``loaded`` and measure it against the dense baseline.

    Args:
        loaded: From :func:`lrt_deploy.load_model`. Compression modifies ``loaded.module``.
        out_dir: Bundle folder; written atomically (nothing is left behind on failure).
        target: A :class:`Target` preset, possibly overridden.
        compress: Factorize the model first with this config (``None``: export as it is).
        calibration: Text lines or ``.npz`` for activation-aware factorization and static int8.
        settings: Benchmark settings shared by all variants.
        force: Replace ``out_dir`` if it exists.
        heal_steps: After factorizing, distil towards the dense model for this many steps
            (keeps the best step; never worse than before).
        fidelity_floor: With a budget config: search the smallest budget whose model keeps
            this mean cosine to the dense model on a calibration split (plus a margin measured
            on the shipped different-domain held-out text), then judged on both held-out sets
            (``manifest["lowrank"]["fidelity_floor"]``).
        progress: Called with a short line as each stage starts.
        device: Where healing runs (``"auto"``, ``"cpu"``, ``"cuda"``).
        heal_precision: Healing autocast (``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"``).
        heal_quantized: Heal with the target's quantisation simulated in the loop (dynamic
            int8 per channel or int4; every weight but the embedding tables trains).
        heal_batch: Sentences per healing step when healing streams a text corpus.
        heal_lr: Peak learning rate of healing.
        heal_corpus: A text file healing streams, apart from ``calibration`` (which then
            calibrates the factorization, the search and int8 in full; default: the shipped
            corpus). Without it, healing streams ``calibration`` when that is a text file and
            everything else reads its head.
        verify_on_devices: Run the deployed text model on every device class this machine
            can reach (emulated CPUs, WebAssembly) against the dense model (the manifest's
            ``devices``); the classes its integer kernels are exact on are recorded always.

    Returns:
        The manifest, report and per-variant measurements.
    """
    from lrt_deploy.compress.recipe import (
        check_compressible,
        compress_model,
        lowrank_by_design,
        needs_calibration,
        simulated_quantization,
        text_healing_data,
    )
    from lrt_deploy.data import readers
    from lrt_deploy.export.build import ModelKind, build_by_design_variants, build_variants
    from lrt_deploy.export.bundle import commit, staging_folder, write_bundle
    from lrt_deploy.export.by_design import by_design_baseline
    from lrt_deploy.measure import (
        judge_deployed_floor,
        measure_variants,
        reference_outputs,
        verify_devices,
    )
    from lrt_deploy.report.summary import baseline_description
    from lrt_deploy.report.writer import write_report

    # Checked before any work: a precision the healing loop cannot simulate is one line now.
    simulation = simulated_quantization(target.precision) if heal_quantized else None
    # Quantisation-aware healing alone (nothing factorized) is a compression step too.
    compressing = compress is not None or bool(heal_steps and simulation is not None)
    settings = _plan_settings(loaded, target, settings or BenchmarkSettings())
    out_dir = Path(out_dir)
    _check_fixed_shape(loaded, target)
    if heal_corpus is not None and not (loaded.is_text and heal_steps and compressing):
        raise LrtDeployError(
            "--heal-corpus is text that healing streams: it needs a text model and --heal STEPS "
            "with a factorization or --heal-quantized (other models heal on --calibration .npz)"
        )
    healing_text = heal_corpus if heal_corpus is not None else calibration
    with staging_folder(out_dir, force, loaded.source_path) as staging:
        if compressing:
            check_compressible(loaded)
        precision = target.precision
        # Outlier smoothing uses calibration when there is some: text models always have the
        # shipped corpus; other models only an .npz the user gives.
        calibrate = bool(precision and (precision.needs_calibration or (
            precision.uses_calibration and (loaded.is_text or calibration is not None))))
        # Read once: factorization, healing, the budget search and static int8 share it.
        batches: list[dict[str, Any]] = []
        # Healing on a user's text file streams all of it; everything else reads the head of
        # that file when it is also the calibration, else the calibration in full.
        stream_text = bool(
            compressing and heal_steps and healing_text is not None and loaded.is_text
            and not str(healing_text).endswith(".npz")
        )
        if calibrate or (compressing and (
            compress is None or needs_calibration(compress, heal_steps, fidelity_floor)
        )):
            progress("reading calibration data")
            streamed_too = stream_text and heal_corpus is None
            batches = readers.calibration_batches(
                loaded, calibration, max_lines=CALIBRATION_HEAD_LINES if streamed_too else None
            )
        outcome = None
        if compressing:
            probe = (
                readers.evaluation_batches(loaded, settings.eval_batch,
                                           corpus=readers.DOMAIN_HELDOUT_TEXT)
                if fidelity_floor is not None and loaded.is_text else None
            )
            outcome = compress_model(
                loaded, compress, batches, heal_steps=heal_steps,
                fidelity_floor=fidelity_floor, progress=progress, device=device,
                heal_precision=heal_precision,
                healing_data=(text_healing_data(loaded, healing_text, batch_size=heal_batch)
                              if stream_text else None),
                probe=probe, probe_data=readers.DOMAIN_HELDOUT_TEXT,
                heal_quantization=simulation, heal_lr=heal_lr,
            )
        dense = outcome.dense if outcome is not None else loaded

        progress("preparing held-out evaluation data")
        evaluation = readers.evaluation_batches(loaded, settings.eval_batch)
        measured = (
            readers.evaluation_batches(loaded, settings.eval_batch, dict(target.fixed_shape))
            if target.fixed_shape
            else evaluation
        )
        reference = reference_outputs(dense, loaded.output_names[0], measured)

        work = staging / ".work"
        work.mkdir()
        # A factorized model is compared with its dense original; a model that is low-rank
        # (or Linformer) by design with its dense equivalent, built here.
        design_layers = lowrank_by_design(loaded.module) if not compressing else []
        by_design = by_design_baseline(loaded) if not compressing else None
        plan = [] if design_layers else [(ModelKind.DENSE, dense)]
        if compress is None and compressing:
            plan.append((ModelKind.HEALED, loaded))  # the dense model, healed for its int
        elif compress is not None or design_layers:
            plan.append((ModelKind.LRT, loaded))
        feeds = readers.latency_inputs(
            loaded, settings.batch, settings.sequence
        )
        calibration_feeds = readers.to_numpy_batches(batches) if calibrate else []
        variants: list[Variant] = []
        fold = None
        if by_design is not None:
            variants, fold = build_by_design_variants(
                loaded, by_design, target=target, work=work,
                validation_batches=lambda model: readers.validation_batches(model, evaluation),
                check_feeds=feeds, calibration_feeds=calibration_feeds, progress=progress,
            )
            plan = []  # built above
        for kind, model in plan:
            variants.extend(build_variants(
                kind, model, target=target, work=work,
                is_baseline=kind is ModelKind.DENSE or len(plan) == 1,
                validation_batches=readers.validation_batches(model, evaluation),
                check_feeds=feeds, calibration_feeds=calibration_feeds, progress=progress,
            ))
        deployed = variants[-1]
        deployed.deployed = True

        latency_method = measure_variants(variants, loaded.kind, reference, feeds,
                                          target.providers, settings, progress)
        # Standard attention is not the Linformer's function: its cosine would mislead.
        incomparable = (
            [ModelKind.DENSE]
            if by_design is not None and not by_design.fidelity_comparable else []
        )
        for variant in variants:
            if variant.model in incomparable:
                variant.fidelity = {}
        if outcome is not None and outcome.selection_fidelity is not None:
            judge_deployed_floor(outcome, deployed, dense, loaded, target, settings, feeds,
                                 quiet=progress is not _noop, progress=progress)

        progress("packaging the bundle")
        lowrank = (
            outcome.to_manifest() if outcome is not None
            else {"origin": "by design", "layers": design_layers}
            if design_layers or by_design is not None
            else None
        )
        baseline_text = None
        if by_design is not None and lowrank is not None:
            lowrank["baseline"] = {
                **by_design.to_dict(), "fold": fold.to_dict() if fold is not None else None
            }
            baseline_text = baseline_description(by_design, fold)
        manifest = write_bundle(
            staging, target=target, deployed=deployed, reference=variants[0],
            source={"name": loaded.name, "format": loaded.format,
                    "sha256": loaded.source_hash, "kind": loaded.kind},
            tokenizer_file=loaded.tokenizer_file, text_limits=loaded.text_limits,
            benchmark=settings.to_dict(), feeds=feeds,
            threads=settings.threads, lowrank=lowrank,
        )
        devices = verify_devices(staging, manifest, dense, loaded, target,
                                 run=verify_on_devices, progress=progress)
        report = _report(loaded, target, variants, settings, outcome, design_layers,
                         baseline_text, incomparable, feeds, latency_method, devices)
        write_report(report, staging)
        shutil.rmtree(work)
        commit(staging, out_dir)
    factorization = outcome.factorization if outcome is not None else None
    return BundleResult(out_dir, manifest, report, variants, factorization, outcome, devices)


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
