"""Measuring built variants against the PyTorch reference: fidelity, latency, size.

Part of the composition (``pipeline.export_bundle``), not a stage: it joins what the stages
return — PyTorch reference outputs (``load``/``compress``), ONNX graphs (``export``) and ONNX
Runtime sessions (``runtime``) — with the same inputs, threads and provider for every variant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lrt_deploy._logs import quiet_loggers
from lrt_deploy.graph.ops import model_bytes

if TYPE_CHECKING:
    from pathlib import Path

    from lrt_deploy.compress.recipe import CompressionOutcome
    from lrt_deploy.export.build import ProviderReport, Variant
    from lrt_deploy.export.targets import Target
    from lrt_deploy.load import LoadedModel

__all__ = [
    "INTERLEAVE_MAX_BYTES",
    "Reference",
    "judge_deployed_floor",
    "measure_variants",
    "reference_outputs",
    "verify_devices",
]

ProgressFn = Callable[[str], None]


@dataclass
class Reference:
    """What every variant is compared with: PyTorch outputs on named input batches."""

    output: str
    feeds: list[dict[str, np.ndarray]]
    outputs: list[np.ndarray]
    masks: list[np.ndarray | None]


def reference_outputs(model: LoadedModel, output: str, batches: Sequence[dict[str, Any]]
                      ) -> Reference:
    """Run ``model`` (PyTorch) on ``batches``; keep the outputs, the masks and numpy feeds."""
    from lrt_deploy.data.readers import to_numpy_batches

    return Reference(
        output=output,
        feeds=to_numpy_batches(batches),
        outputs=[model.forward(batch)[output].numpy() for batch in batches],
        masks=[b["attention_mask"].numpy() if "attention_mask" in b else None for b in batches],
    )


#: Above this many bytes of model files, variants are timed one after another (one session
#: open at a time) instead of interleaved (all open together), to bound memory.
INTERLEAVE_MAX_BYTES = 4 * 1024**3
#: Rounds of an interleaved measurement: each variant runs a block of ``runs / ROUNDS`` per round.
ROUNDS = 3
#: Untimed runs opening each block, while the last variant's spinning threads go quiet.
SETTLE = 2
#: How the latency columns were timed, as the report says it.
INTERLEAVED = ("interleaved: each variant's {runs} runs in {rounds} blocks, one per round, order "
               "rotating, 2 untimed runs before each block, ONNX Runtime's default thread-pool "
               "spinning")
SEQUENTIAL = ("one variant after another ({runs} runs each; the model files are too large to "
              "hold every session open at once), so machine load can favour one variant")


def run_outputs(path: Path, reference: Reference, providers: Sequence[str],
                threads: int) -> list[np.ndarray]:
    """ONNX Runtime's ``reference.output`` of the model at ``path`` on the reference's feeds."""
    from lrt_deploy.runtime.session import Session

    session = Session(path, providers=list(providers), threads=threads)
    return [session.run(batch, [reference.output])[reference.output] for batch in reference.feeds]


def measure_variants(
    variants: list[Variant],
    kind: str,
    reference: Reference,
    feeds: dict[str, np.ndarray],
    providers: Sequence[str],
    settings: Any,
    progress: ProgressFn,
) -> str:
    """Fidelity against the reference, latency on ``feeds``, file size, for every variant.

    Latency is timed by :func:`~lrt_deploy.runtime.timing.time_runs`, every variant a block
    of runs per round in rotating order, so the ratios in the report compare variants under
    the same machine load; above :data:`INTERLEAVE_MAX_BYTES` of model files, one session at
    a time instead.

    Returns:
        How latency was measured, for the report.
    """
    progress(
        f"measuring {len(variants)} variants: batch {settings.batch}, sequence "
        f"{settings.sequence}, {settings.threads} threads"
    )
    interleave = sum(model_bytes(v.onnx_path) for v in variants) <= INTERLEAVE_MAX_BYTES
    from lrt_deploy.export.build import ProviderReport
    from lrt_deploy.metrics import output_fidelity
    from lrt_deploy.runtime.session import Session
    from lrt_deploy.runtime.timing import Schedule, runner, time_runs

    sessions = []
    for index, variant in enumerate(variants):
        # A provider fallback is warned about once (it is the same for every variant) and
        # written into the report's header for each run.
        with quiet_loggers(*(("lrt_deploy.runtime",) if index > 0 else ())):
            session = Session(variant.onnx_path, providers=list(providers),
                              threads=settings.threads)
            outputs = [session.run(batch, [reference.output])[reference.output]
                       for batch in reference.feeds]
        _record(variant, index, ProviderReport.from_dict(session.provider_report()),
                output_fidelity(kind, reference.outputs, outputs, reference.masks), progress)
        if interleave:
            sessions.append(runner(session, feeds))
        else:  # timed now, and the session let go before the next one opens
            alone = Schedule(runs=settings.runs, warmup=settings.warmup)
            variant.latency = time_runs([runner(session, feeds)], alone).stats().to_dict()
    if not interleave:
        return SEQUENTIAL.format(runs=settings.runs)
    # Blocks opened by settle runs: the sessions keep ONNX Runtime's default spinning, the
    # latency an app with default settings sees.
    blocks = Schedule(runs=settings.runs, rounds=ROUNDS, warmup=settings.warmup, settle=SETTLE)
    timings = time_runs(sessions, blocks)
    for variant, latency in zip(variants, timings.all_stats(), strict=True):
        variant.latency = latency.to_dict()
    return INTERLEAVED.format(runs=settings.runs, rounds=min(ROUNDS, settings.runs))


def _record(variant: Variant, index: int, provider: ProviderReport, fidelity: dict[str, float],
            progress: ProgressFn) -> None:
    variant.provider = provider
    variant.fidelity = fidelity
    variant.file_bytes = model_bytes(variant.onnx_path)
    if index == 0 and provider.fell_back:
        progress(f"provider fallback: {provider.message}")


def judge_deployed_floor(
    outcome: CompressionOutcome,
    deployed: Variant,
    dense: LoadedModel,
    loaded: LoadedModel,
    target: Target,
    settings: Any,
    feeds: dict[str, np.ndarray],
    *,
    quiet: bool,
    progress: ProgressFn,
) -> None:
    """Judge the fidelity floor on the deployed variant: its figure on heldout.txt (already
    measured) and on the shipped different-domain held-out set (measured here the same way,
    ONNX Runtime against the dense PyTorch model), the calibration split shown beside them.
    ``quiet``: the verdict lines go out through ``progress`` only, not the search's logger."""
    from lrt_deploy.compress.recipe import SELECTION_DATA
    from lrt_deploy.compress.search import judge_floor
    from lrt_deploy.data import readers
    from lrt_deploy.metrics import output_fidelity

    floor = outcome.budget_search.floor if outcome.budget_search is not None else None
    if floor is None or outcome.selection_fidelity is None:
        return
    figures: dict[str, dict[str, float]] = {SELECTION_DATA: outcome.selection_fidelity}
    if not loaded.is_text:
        figures["example inputs"] = _figure(deployed.fidelity)
    else:
        figures[readers.HELDOUT_TEXT] = _figure(deployed.fidelity)
        progress(f"measuring the deployed variant on {readers.DOMAIN_HELDOUT_TEXT}")
        fixed = dict(target.fixed_shape) or None
        domain = readers.evaluation_batches(loaded, settings.eval_batch, fixed,
                                            corpus=readers.DOMAIN_HELDOUT_TEXT)
        reference = reference_outputs(dense, loaded.output_names[0], domain)
        with quiet_loggers("lrt_deploy.runtime"):
            outputs = run_outputs(deployed.onnx_path, reference, target.providers,
                                  settings.threads)
        figures[readers.DOMAIN_HELDOUT_TEXT] = _figure(
            output_fidelity(loaded.kind, reference.outputs, outputs, reference.masks))
    with quiet_loggers(*(("lrt_deploy.compress.search",) if quiet else ())):
        outcome.floor_verdict = judge_floor(floor, figures, selection_data=SELECTION_DATA)
    for line in outcome.floor_verdict.lines():
        progress(line)


def _figure(fidelity: dict[str, Any] | None) -> dict[str, float]:
    fidelity = fidelity or {}
    return {"mean_cosine": float(fidelity.get("mean_cosine", float("nan"))),
            "worst_cosine": float(fidelity.get("worst_cosine", float("nan")))}


def verify_devices(staging: Path, manifest: dict[str, Any], dense: LoadedModel,
                   loaded: LoadedModel, target: Target, *, run: bool,
                   progress: ProgressFn) -> dict[str, Any]:
    """The manifest's ``devices`` section for the staged bundle: the classes its integer
    kernels are exact on (from the weights), and for a text model the deployed model run on
    every device class against the dense model (``verification.npz`` written beside it).
    ``run`` False (``--no-verify-devices``) keeps the first part only."""
    from lrt_deploy.data import readers
    from lrt_deploy.export.bundle import add_to_manifest
    from lrt_deploy.quant.kernels import exact_classes
    from lrt_deploy.runtime.devices import DEVICE_CLASSES
    from lrt_deploy.verify.check import (
        REFERENCE_FILE,
        REFERENCE_SENTENCES,
        SAMPLE_SENTENCES,
        SETS,
        verify_model,
        write_reference,
    )

    devices: dict[str, Any] = {
        "classes": list(DEVICE_CLASSES),
        "exact_on": exact_classes(staging / manifest["files"]["onnx"]),
        "session_config": {},
    }
    files: dict[str, str] = {}
    if not loaded.is_text:
        devices["skipped"] = "not a text model: no held-out sentences to run"
    elif not run:
        devices["skipped"] = "--no-verify-devices"
    else:
        sets = {}
        fixed = dict(target.fixed_shape) or None
        for key, corpus in zip(SETS, (readers.HELDOUT_TEXT, readers.DOMAIN_HELDOUT_TEXT),
                               strict=True):
            batch = readers.evaluation_batches(loaded, REFERENCE_SENTENCES,
                                               {**fixed, "batch": REFERENCE_SENTENCES}
                                               if fixed else None, corpus=corpus)[0]
            reference = dense.forward(batch)[loaded.output_names[0]].numpy()
            sets[key] = ({k: v.numpy() for k, v in batch.items()}, reference)
        write_reference(staging / REFERENCE_FILE, sets)
        files["verification"] = REFERENCE_FILE
        progress(f"running the deployed model on every device class ({SAMPLE_SENTENCES} "
                 "sentences of each held-out set, one per run; qemu for other CPUs)")
        verification = verify_model(staging / manifest["files"]["model"],
                                    staging / REFERENCE_FILE, devices["exact_on"],
                                    session_config=devices["session_config"],
                                    progress=progress)
        devices["verification"] = verification.to_dict()
    add_to_manifest(staging, manifest, files=files, sections={"devices": devices})
    return devices
