"""The report of one export run, built from its typed results (never re-read from a manifest).

:func:`run_report` turns the measured variants (``export.build.Variant``), the compression
outcome (``compress.recipe.CompressionOutcome``) and how things were measured into a
:class:`~lrt_deploy.report.comparison.ComparisonReport`, with the wording of its header,
its fidelity line and its notes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .comparison import ComparisonReport, VariantResult

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
    """What the fidelity columns compare, on which inputs, against which reference
    (``by_design``: a low-rank/Linformer-by-design model measured against its baseline)."""
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
    """The fidelity floor's verdict on the deployed variant, one line per dataset and a
    warning when a held-out figure is below the floor."""
    if outcome is None or outcome.floor_verdict is None:
        return []
    return outcome.floor_verdict.lines()


#: How much slower (median) the deployed low-rank variant may run than the dense variant of
#: its precision, in the same run, before the report says so (run-to-run noise is ~2-5%).
SLOWER_THAN_DENSE = 1.05
_PACKED_ATTENTION = ("Attention", "QAttention")
#: Labels of the variants built from the low-rank model (``export.build``).
_LOW_RANK_LABELS = ("LRT", "healed")


def _packs_attention(variant: Variant) -> bool:
    fused = (variant.optimization or {}).get("fused", {})
    return any(fused.get(op) for op in _PACKED_ATTENTION)


def speed_notes(variants: Sequence[Variant]) -> list[str]:
    """A line under the deployed low-rank variant when it ran slower than the dense model at
    the same precision in this run, with the causes this project measured
    (``benchmarks/bench_backends.py``): a low-rank pair is two matmuls, and in dynamic int8 each
    rounds its own input, which on CPUs with fast int8 units costs more than the products it
    saves; factorized Q/K/V projections keep attention from being packed into one node."""
    deployed = next((v for v in variants
                     if v.deployed and v.label.startswith(_LOW_RANK_LABELS)), None)
    if deployed is None:
        return []
    precision = deployed.label.split()[-1]
    dense = next((v for v in variants if v.label == f"dense {precision}"), None)
    mine = deployed.latency.get("median_ms")
    theirs = dense.latency.get("median_ms") if dense is not None else None
    if not mine or not theirs or mine <= theirs * SLOWER_THAN_DENSE:
        return []
    causes = []
    if _packs_attention(dense) and not _packs_attention(deployed):
        causes.append("its factorized query/key/value projections keep the attention from "
                      "being packed into one Attention/QAttention node")
    if precision == "int8":
        causes.append("each low-rank pair quantises its activations twice, which on CPUs with "
                      "fast int8 units (AVX-512 VNNI, AMX) costs more than the multiply-adds it "
                      "saves; fewer parameters pay in time in fp32 and in WebAssembly "
                      "(benchmarks/bench_backends.py)")
    why = f": {'; '.join(causes)}" if causes else ""
    return [f"{mine / theirs:.2f}x the latency of dense {precision} in this run "
            f"({mine:.2f} vs {theirs:.2f} ms median){why}"]


#: int8 costing more mean cosine than this against its fp32 twin earns a note.
INT8_COSINE_LOSS = 0.01


def int8_notes(variants: Sequence[Variant]) -> list[str]:
    """Lines under the deployed int8 variant: what outlier smoothing did (when it scaled
    anything or could not run), and, when int8 costs the output more than
    :data:`INT8_COSINE_LOSS` of mean cosine against the fp32 variant of the same model in this
    run, the fix: smoothing if it was off, else keeping the MatMuls int8 hurts most in fp32
    (``--exclude-sensitive``). On all-mpnet-base-v2, plain dynamic int8 gives 0.88 where
    all-MiniLM-L6-v2 keeps 0.99."""
    deployed = next((v for v in variants if v.deployed), None)
    if deployed is None or not deployed.label.endswith(" int8"):
        return []
    quantization = deployed.quantization or {}
    smoothing = quantization.get("smoothing")
    lines = _smoothing_lines(smoothing)
    twin = next((v for v in variants
                 if v.label == deployed.label.removesuffix(" int8") + " fp32"), None)
    mine = deployed.fidelity.get("mean_cosine")
    theirs = twin.fidelity.get("mean_cosine") if twin is not None else None
    if mine is None or theirs is None or not theirs - mine > INT8_COSINE_LOSS:
        return lines
    kept = len(quantization.get("excluded_nodes") or [])
    line = (f"int8 costs this model {theirs - mine:.3f} of mean cosine ({mine:.4f} against "
            f"{theirs:.4f} for {twin.label})")
    if quantization.get("mode") == "dynamic" and smoothing is None:
        return lines + [line + ": drop --no-smoothing (outlier smoothing took "
                        "all-mpnet-base-v2 from 0.92 to 0.995), or --exclude-sensitive N"]
    if kept:
        return lines + [line + f" with {kept} MatMuls kept fp32: raise --exclude-sensitive"]
    return lines + [line + ": --exclude-sensitive N keeps the N MatMuls whose int8 hurts the "
                    "output most in fp32 (12 of all-mpnet-base-v2's 72 took it from 0.88 to "
                    "0.994)"]


def _quantisation_section(quantization: Mapping[str, Any]) -> dict[str, Any]:
    """The report's quantisation settings: the smoothed MatMuls counted, not listed (the
    manifest keeps their names)."""
    smoothing = quantization.get("smoothing")
    if not smoothing or "nodes" not in smoothing:
        return dict(quantization)
    compact = {key: value for key, value in smoothing.items() if key != "nodes"}
    return {**quantization, "smoothing": {"matmuls": len(smoothing["nodes"]), **compact}}


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
            "inputs (--no-smoothing skips it)"]


def _layer_rows(
    outcome: CompressionOutcome | None, design_layers: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    if outcome is not None:
        return [
            {"name": d.name, "shape": list(d.shape), "rank": d.rank, "action": d.action,
             "reason": d.reason}
            for d in outcome.factorization.layers
        ]
    return [
        {"name": layer["name"], "shape": layer.get("shape"), "rank": layer.get("rank"),
         "action": layer.get("action", "low-rank by design"), "reason": layer.get("reason", "")}
        for layer in design_layers
    ]


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
    incomparable: Sequence[str] = (),
    latency_method: str | None = None,
    devices: Mapping[str, Any] | None = None,
) -> ComparisonReport:
    """The comparison report of one run.

    Args:
        title: Header, e.g. ``"all-MiniLM-L6-v2 (huggingface) -> target cpu"``.
        variants: Measured variants, baseline first; ``deployed`` marks the shipped one.
        measured_on: ``{"batch", "sequence"}`` for text models, ``{"inputs"}`` otherwise.
        threads: Intra-op threads of every measurement.
        fidelity_inputs: :func:`fidelity_description` of the fidelity columns.
        compression: How the low-rank model was made (its notes go under its first row).
        design_layers: Low-rank-by-design layers when nothing was factorized.
        baseline: How the baseline was made, when it is not the user's dense model.
        incomparable: Labels of variants whose fidelity is not comparable (blank, with a note).
        latency_method: How the latency columns were timed (interleaved or one by one).
        devices: The manifest's ``devices`` section (exact classes, verification table).
    """
    # Notes on how the low-rank model was made are shown once, under its first row.
    first_lrt = next((v for v in variants if v.label.startswith(_LOW_RANK_LABELS)), None)
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
            fidelity={} if v.label in incomparable else v.fidelity,
            provider_report=v.provider,
            notes=(list(notes) if v is first_lrt else [])
            + ([INCOMPARABLE_NOTE] if v.label in incomparable else [])
            + (floors + slower if v.deployed else []),
        )
        for v in variants
    ]
    provider = variants[0].provider
    messages = sorted({v.provider.get("message") for v in variants if v.provider.get("message")})
    return ComparisonReport(
        model=title,
        variants=results,
        settings={
            **measured_on,
            "threads": threads,
            "provider_requested": provider.get("requested"),
            "provider_active": provider.get("active"),
            "fidelity_inputs": fidelity_inputs,
            **({"baseline": baseline} if baseline else {}),
            **({"latency": latency_method} if latency_method else {}),
        },
        layers=_layer_rows(compression, design_layers),
        optimisation={
            v.label: v.optimization.get("fused", {}) for v in variants if v.optimization
        },
        quantisation=_quantisation_section(
            next((v.quantization for v in variants if v.quantization), {}) or {}),
        provider_messages=messages,
        devices=dict(devices) if devices else None,
    )
