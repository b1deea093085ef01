"""The report of one export run, built from its typed results (never re-read from a manifest).

:func:`run_report` turns the measured variants (``export.build.Variant``), the compression
outcome (``compress.recipe.CompressionOutcome``) and how things were measured into a
:class:`~lrt_deploy.report.model.ComparisonReport`, with the wording of its header, its
fidelity line and its notes. Variants are told apart by their model kind and precision.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lrt_deploy.export.build import ModelKind, PrecisionRecord
from lrt_deploy.runtime.devices import host_class, host_cpu_name

from .model import ComparisonReport, DeviceSection, LayerRow, ReportSettings, VariantResult

if TYPE_CHECKING:
    from lrt_deploy.compress.heal import HealResult
    from lrt_deploy.compress.recipe import CompressionOutcome
    from lrt_deploy.compress.search import BudgetSearchResult
    from lrt_deploy.export.build import Variant
    from lrt_deploy.export.by_design import ByDesignBaseline
    from lrt_deploy.export.passes.dense_equivalent import FoldResult

__all__ = [
    "INCOMPARABLE_NOTE",
    "baseline_description",
    "compression_notes",
    "fidelity_description",
    "floor_notes",
    "int8_notes",
    "run_report",
    "speed_notes",
]

#: Under each baseline row whose function differs from the deployed model's (Linformer).
INCOMPARABLE_NOTE = (
    "fidelity not comparable: standard attention is a different function from the deployed "
    "Linformer model, so no cosine is printed"
)

_COMPARED = {
    "text-embedding": "sentence embeddings",
    "text-hidden": "hidden states of real tokens",
    "text-logits": "logits (and their top-1 and KL)",
}


def fidelity_description(
    kind: str, output_name: str, is_text: bool, compressed: bool, by_design: bool = False
) -> str:
    """What the fidelity columns compare, on which inputs, against which reference model."""
    what = _COMPARED.get(kind, f"output '{output_name}' rows")
    source = (
        "the shipped held-out sentences (heldout.txt, never used for calibration)"
        if is_text
        else "the example inputs"
    )
    reference = (
        "dense PyTorch fp32 model" if compressed
        else "by-design PyTorch fp32 model" if by_design
        else "PyTorch fp32 model"
    )
    return f"cosine of {what} vs the {reference} on {source}"


def baseline_description(baseline: ByDesignBaseline, fold: FoldResult | None) -> str:
    """How the baseline of a by-design model was made, for the report's "Baseline:" line."""
    if fold is not None:
        if not fold.pairs:
            return "the model itself: no low-rank pair was found on its exported graph"
        how = (
            f"{fold.pairs} low-rank pairs folded on the exported ONNX graph "
            f"({fold.params_before:,} -> {fold.params_after:,} weights)"
        )
    else:
        what = {
            "dense-equivalent": "low-rank units multiplied out",
            "standard-attention": "Linformer attentions replaced",
        }.get(baseline.kind, "low-rank units and Linformer attentions replaced")
        how = f"{baseline.units} {what} in the PyTorch model"
    return f"{baseline.note}; {how}, then built exactly like the deployed model"


def _search_note(search: BudgetSearchResult, selection: str) -> str:
    tried = ", ".join(f"{t['budget']:.3f}: {t['mean_cosine']:.4f}" for t in search.trials)
    target = (f"{search.floor} + margin {search.margin:.4f} (the drop measured on "
              f"{search.probe_data})" if search.probe_data else f"{search.floor}")
    return (
        f"budget {search.budget:.3f} is the smallest tried with mean cosine >= "
        f"{target} on the {selection} (tried {tried})"
    )


def _healing_note(healing: HealResult, selection: str) -> str:
    how = healing.precision
    if healing.quantization:
        how = f"{how}, {healing.quantization} simulated"
    return (
        f"healed {healing.steps_run} steps in {healing.seconds:.0f}s on {healing.device} "
        f"({how}), kept step {healing.best_step}; mean cosine on "
        f"{'' if selection.startswith('the ') else 'the '}{selection} "
        f"{healing.before_mean_cosine:.4f} -> {healing.after_mean_cosine:.4f}"
    )


def compression_notes(outcome: CompressionOutcome | None) -> list[str]:
    """Budget search and healing, as lines under the table."""
    if outcome is None:
        return []
    from lrt_deploy.compress.recipe import SELECTION_DATA

    notes = []
    if outcome.budget_search is not None:
        notes.append(_search_note(outcome.budget_search, SELECTION_DATA))
    if outcome.healing is not None:
        notes.append(_healing_note(outcome.healing, outcome.healing_selection))
    return notes


def floor_notes(outcome: CompressionOutcome | None) -> list[str]:
    """The fidelity floor's verdict on the deployed variant, one line per dataset."""
    if outcome is None or outcome.floor_verdict is None:
        return []
    return outcome.floor_verdict.lines()


#: How much slower (median) the deployed low-rank variant may run than the dense variant of
#: its precision, in the same run, before the report says so (run-to-run noise is ~2-5%).
SLOWER_THAN_DENSE = 1.05
_PACKED_ATTENTION = ("Attention", "QAttention")


def _packs_attention(variant: Variant) -> bool:
    fused = (variant.optimization or {}).get("fused", {})
    return any(fused.get(op) for op in _PACKED_ATTENTION)


def speed_notes(variants: Sequence[Variant]) -> list[str]:
    """A line under the deployed low-rank variant when it ran slower than the dense variant of
    its precision in this run, naming the causes that apply."""
    deployed = next((v for v in variants if v.deployed and v.model.low_rank), None)
    if deployed is None:
        return []
    dense = _twin(variants, ModelKind.DENSE, deployed.precision)
    mine = deployed.latency.get("median_ms")
    theirs = dense.latency.get("median_ms") if dense is not None else None
    if dense is None or not mine or not theirs or mine <= theirs * SLOWER_THAN_DENSE:
        return []
    causes = []
    if _packs_attention(dense) and not _packs_attention(deployed):
        causes.append("its factorized query/key/value projections keep the attention from "
                      "being packed into one Attention/QAttention node")
    if deployed.precision == "int8":
        causes.append("each low-rank pair quantises its activations twice, which on CPUs with "
                      "fast int8 units (AVX-512 VNNI, AMX) costs more than the multiply-adds it "
                      "saves; fewer parameters pay in time in fp32 and in WebAssembly "
                      "(benchmarks/bench_backends.py)")
    why = f": {'; '.join(causes)}" if causes else ""
    return [f"{mine / theirs:.2f}x the latency of {dense.label} in this run "
            f"({mine:.2f} vs {theirs:.2f} ms median){why}"]


#: int8 costing more mean cosine than this against its fp32 twin earns a note.
INT8_COSINE_LOSS = 0.01


def int8_notes(variants: Sequence[Variant]) -> list[str]:
    """Lines under the deployed int8 variant: what outlier smoothing did, and the fix when int8
    costs more than :data:`INT8_COSINE_LOSS` of mean cosine against the same model's fp32."""
    deployed = next((v for v in variants if v.deployed), None)
    if deployed is None or deployed.precision != "int8":
        return []
    quantization = deployed.quantization or PrecisionRecord({})
    smoothing = quantization.smoothing
    lines = _smoothing_lines(smoothing)
    twin = _twin(variants, deployed.model, "fp32")
    mine = deployed.fidelity.get("mean_cosine")
    theirs = twin.fidelity.get("mean_cosine") if twin is not None else None
    if twin is None or mine is None or theirs is None or not theirs - mine > INT8_COSINE_LOSS:
        return lines
    kept = len(quantization.excluded_nodes)
    line = (f"int8 costs this model {theirs - mine:.3f} of mean cosine ({mine:.4f} against "
            f"{theirs:.4f} for {twin.label})")
    if quantization.mode == "dynamic" and smoothing is None:
        return lines + [line + ": drop --no-smoothing (DynamicInt8.smooth; outlier "
                        "smoothing, docs/quantization.md), or --exclude-sensitive N"]
    if kept:
        return lines + [line + f" with {kept} MatMuls kept fp32: raise --exclude-sensitive"]
    return lines + [line + ": --exclude-sensitive N (DynamicInt8.exclude_sensitive) keeps the N "
                    "MatMuls whose int8 hurts the output most in fp32 (docs/quantization.md)"]


def _quantisation_section(quantization: PrecisionRecord | None) -> dict[str, Any]:
    """The report's quantisation settings, smoothed MatMuls counted (the manifest names them)."""
    if quantization is None:
        return {}
    details = quantization.to_dict()
    smoothing = quantization.smoothing
    if not smoothing or "nodes" not in smoothing:
        return details
    compact = {key: value for key, value in smoothing.items() if key != "nodes"}
    return {**details, "smoothing": {"matmuls": len(smoothing["nodes"]), **compact}}


def _twin(variants: Sequence[Variant], model: ModelKind, precision: str) -> Variant | None:
    """The variant of ``model`` at ``precision`` in this run, if it was built."""
    return next((v for v in variants if v.model is model and v.precision == precision), None)


def _smoothing_lines(smoothing: Mapping[str, Any] | None) -> list[str]:
    if not smoothing:
        return []
    if smoothing.get("skipped"):
        return [f"int8 outlier smoothing skipped: {smoothing['skipped']}"]
    if not smoothing.get("channels"):
        return []
    return [f"int8 outlier smoothing: {smoothing['channels']} input channels peaking above "
            f"{smoothing['ratio']:g}x their tensor's median channel (on "
            f"{smoothing['rows']} calibration rows) scaled into the weights of "
            f"{len(smoothing['nodes'])} MatMuls, one Mul on each of {smoothing['inputs']} "
            "inputs (--no-smoothing, DynamicInt8.smooth=False, skips it)"]


def _layer_rows(
    outcome: CompressionOutcome | None, design_layers: Sequence[Mapping[str, Any]]
) -> list[LayerRow]:
    if outcome is not None:
        return [LayerRow(d.name, list(d.shape), d.rank, d.action, d.reason)
                for d in outcome.factorization.layers]
    return [
        LayerRow(layer["name"], layer.get("shape"), layer.get("rank"),
                 layer.get("action", "low-rank by design"), layer.get("reason", ""))
        for layer in design_layers
    ]


def _settings(variants: Sequence[Variant], measured_on: Mapping[str, Any],
              **how: str | int | None) -> ReportSettings:
    """How the run measured: inputs, ``how``, the first variant's providers and this CPU."""
    provider = variants[0].provider
    return ReportSettings.from_dict({
        **measured_on,
        **how,
        "provider_requested": list(provider.requested) or None,
        "provider_active": list(provider.active) or None,
        "cpu": host_cpu_name(),
        "device_class": host_class(),
    })


def run_report(
    *,
    title: str,
    variants: Sequence[Variant],
    measured_on: Mapping[str, Any],
    threads: int,
    fidelity_inputs: str,
    compression: CompressionOutcome | None = None,
    design_layers: Sequence[Mapping[str, Any]] = (),
    baseline: str | None = None,
    incomparable: Collection[ModelKind] = (),
    latency_method: str | None = None,
    devices: Mapping[str, Any] | None = None,
) -> ComparisonReport:
    """The comparison report of one run, measured on this machine's CPU.

    Args:
        title: Header, e.g. ``"all-MiniLM-L6-v2 (huggingface) -> target cpu"``.
        variants: Measured variants, baseline first; ``deployed`` marks the shipped one.
        measured_on: ``{"batch", "sequence"}`` for text models, ``{"inputs"}`` otherwise.
        threads: Intra-op threads of every measurement.
        fidelity_inputs: :func:`fidelity_description` of the fidelity columns.
        compression: How the compressed model was made (its notes go under its first row).
        design_layers: Low-rank-by-design layers when nothing was factorized.
        baseline: How the baseline was made, when it is not the user's dense model.
        incomparable: Models whose variants' fidelity is not comparable (blank, with a note).
        latency_method: How the latency columns were timed (interleaved or one by one).
        devices: The manifest's ``devices`` section (exact classes, verification table).
    """
    # Notes on how the compressed model was made are shown once, under its first row.
    first_compressed = next((v for v in variants if v.model is not ModelKind.DENSE), None)
    notes = compression_notes(compression)
    # The floor is judged on what ships, so its verdict goes under the deployed row.
    floors = floor_notes(compression)
    slower = speed_notes(variants) + int8_notes(variants)
    results = [
        VariantResult(
            name=v.label + (" (deployed)" if v.deployed else ""),
            file_bytes=v.file_bytes,
            is_baseline=v.is_baseline,
            params=v.params,
            latency=v.latency,
            fidelity={} if v.model in incomparable else v.fidelity,
            provider_report=v.provider.to_dict(),
            notes=(list(notes) if v is first_compressed else [])
            + ([INCOMPARABLE_NOTE] if v.model in incomparable else [])
            + (floors + slower if v.deployed else []),
        )
        for v in variants
    ]
    return ComparisonReport(
        model=title,
        variants=results,
        settings=_settings(variants, measured_on, threads=threads,
                           fidelity_inputs=fidelity_inputs, baseline=baseline or None,
                           latency=latency_method or None),
        layers=_layer_rows(compression, design_layers),
        optimisation={
            v.label: v.optimization.get("fused", {}) for v in variants if v.optimization
        },
        quantisation=_quantisation_section(
            next((v.quantization for v in variants if v.quantization is not None), None)),
        provider_messages=sorted({v.provider.message for v in variants if v.provider.message}),
        devices=DeviceSection.from_dict(devices) if devices else None,
    )
