"""Which ONNX Runtime packages a graph runs on, judged from its operators.

Every package an app can embed compiles the same CPU kernels: the Python wheel, onnxruntime-node
(desktop, Electron), onnxruntime-web's WebAssembly backend (a browser page) and the full
onnxruntime-android AAR. What differs is whether a given build was checked with our graphs.
So each runtime below carries the operators of lrt-export graphs (every target, fused and
unfused, fp32, dynamic and static int8, int4) that were *run* in it; samples/js/README.md says
how. A graph whose operators are all in a runtime's list runs there; an operator outside the
list is reported as unverified, never silently as supported. For the installed Python
``onnxruntime`` the answer is exact: its own kernel registry is asked.

The file's IR version is the other condition: onnxruntime 1.30 (npm) and 1.31 (PyPI) refuse
IR version 14 ("max supported IR version: 13"); lrt-export writes IR 10.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["RUNTIMES", "VERIFIED_OPERATORS", "graph_operators", "supported_runtimes"]

logger = logging.getLogger(__name__)

_STANDARD = "ai.onnx"
_MICROSOFT = "com.microsoft"

# The operators of every graph lrt-export wrote for the verification: tiny BERT (tests'
# save_tiny_bert) for cpu (fused, --no-fusion), mobile (int8 dynamic, fused and --no-fusion;
# int8 static QDQ), cpu int4, and the quick start's MiniLM mobile bundle.
_STANDARD_OPS = frozenset({
    "Add", "And", "Cast", "Clip", "Concat", "DequantizeLinear", "Div", "DynamicQuantizeLinear",
    "Erf", "Expand", "Gather", "GatherND", "GreaterOrEqual", "IsNaN", "LayerNormalization",
    "MatMul", "MatMulInteger", "Max", "Mul", "QuantizeLinear", "Range", "ReduceL2", "ReduceSum",
    "Reshape", "Shape", "Slice", "Softmax", "Squeeze", "Transpose", "Unsqueeze", "Where",
})
# Attention and QAttention: onnxscript's packed-QKV fusion (fp32 in the int4 bundle's page test,
# QAttention in the quick start's int8 bundle, run by Node and the page).
# GatherBlockQuantized (uint8 pairs, bits=4) and MultiHeadAttention: the int4 bundle, run by
# Node and the page.
_CONTRIB_OPS = frozenset({
    "Attention", "BiasGelu", "FusedMatMul", "GatherBlockQuantized", "MatMulNBits",
    "MultiHeadAttention", "QAttention", "SkipLayerNormalization",
})
_VERIFIED = frozenset({(_STANDARD, op) for op in _STANDARD_OPS}) | frozenset(
    {(_MICROSOFT, op) for op in _CONTRIB_OPS}
)

#: Runtime -> (package and version the list was verified with, how, operators verified).
VERIFIED_OPERATORS: dict[str, dict[str, Any]] = {
    "onnxruntime-node": {
        "package": "onnxruntime-node 1.30.0 (npm)",
        "how": "lrt-export graphs run by samples/js (tests/samples/test_js_runtimes.py)",
        "operators": _VERIFIED,
        "max_ir_version": 13,
    },
    "onnxruntime-web-wasm": {
        "package": "onnxruntime-web 1.30.0 (npm), WebAssembly backend, headless Chromium",
        "how": "lrt-export graphs run by samples/js/web (tests/samples/test_js_runtimes.py)",
        "operators": _VERIFIED,
        "max_ir_version": 13,
    },
    "onnxruntime-android": {
        "package": "onnxruntime-android (full AAR)",
        "how": "not run: no Android device or SDK here; the full AAR builds the same CPU kernels",
        "operators": frozenset(),
        "max_ir_version": None,
    },
}

#: Every runtime :func:`supported_runtimes` answers for.
RUNTIMES = ("onnxruntime", *VERIFIED_OPERATORS)


def graph_operators(model: Any) -> set[tuple[str, str]]:
    """``(domain, op_type)`` of every node, subgraphs (If/Loop/Scan bodies) included.

    Args:
        model: An ``onnx.ModelProto``.
    """
    import onnx

    found: set[tuple[str, str]] = set()

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            found.add((node.domain or _STANDARD, node.op_type))
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g)
                for subgraph in attribute.graphs:
                    visit(subgraph)

    visit(model.graph)
    return found


# What onnxruntime 1.31.1 (PyPI) says for IR 14; the registry does not expose it.
_INSTALLED_MAX_IR_VERSION = 13


def _installed_cpu_kernels() -> tuple[str, set[tuple[str, str]]] | None:
    """The installed onnxruntime's CPU kernels, or None when this build cannot list them."""
    try:
        import onnxruntime
        from onnxruntime.capi import _pybind_state
    except ImportError:
        return None
    lister = getattr(_pybind_state, "get_all_opkernel_def", None)
    if lister is None:
        return None
    kernels = {
        (kernel.domain or _STANDARD, kernel.op_name)
        for kernel in lister()
        if kernel.provider == "CPUExecutionProvider"
    }
    return f"onnxruntime {onnxruntime.__version__} (installed, CPU kernel registry)", kernels


def _entry(runs: bool | None, missing: set, unverified: set, basis: str, note: str = "") -> dict:
    entry: dict[str, Any] = {
        "runs": runs,
        "missing": sorted(f"{domain}:{op}" for domain, op in missing),
        "unverified": sorted(f"{domain}:{op}" for domain, op in unverified),
        "basis": basis,
    }
    if note:
        entry["note"] = note
    return entry


def supported_runtimes(model: Any) -> dict[str, dict[str, Any]]:
    """Per name in :data:`RUNTIMES`, whether ``model`` runs there: ``runs`` (True, False, or
    None when some operators were never verified), ``missing``, ``unverified``, ``basis`` and
    maybe ``note``; JSON-ready for the manifest."""
    operators = graph_operators(model)
    ir_version = int(model.ir_version)
    result: dict[str, dict[str, Any]] = {}

    installed = _installed_cpu_kernels()
    if installed is None:
        result["onnxruntime"] = _entry(None, set(), operators, "onnxruntime not installed")
    else:
        basis, kernels = installed
        missing = operators - kernels
        too_new = ir_version > _INSTALLED_MAX_IR_VERSION
        result["onnxruntime"] = _entry(
            not missing and not too_new, missing, set(), basis, _ir_note(ir_version, too_new)
        )

    dynamic_int8 = (_STANDARD, "DynamicQuantizeLinear") in operators
    for runtime, verified in VERIFIED_OPERATORS.items():
        unverified = operators - verified["operators"]
        basis = f"{verified['package']}: {verified['how']}"
        limit = verified["max_ir_version"]
        too_new = limit is not None and ir_version > limit
        runs = False if too_new else (None if unverified or limit is None else True)
        note = _ir_note(ir_version, too_new)
        if runtime == "onnxruntime-web-wasm" and dynamic_int8 and not note:
            note = _DYNAMIC_INT8_WEB_NOTE
        result[runtime] = _entry(runs, set(), unverified, basis, note)
    return result


# Measured on the quick start's bundle (samples/js/README.md): every kernel agrees to float
# rounding, but rounding activations to int8 at run time turns a last-bit difference into a
# whole quantisation step, and the steps grow layer by layer (a 3e-7 change of the first
# LayerNorm in native ORT alone moves the embeddings as far). Weight-only int8 does not.
_DYNAMIC_INT8_WEB_NOTE = (
    "runs, but dynamic int8 rounds activations at run time, which turns the WebAssembly "
    "float kernels' last-bit differences into whole int8 steps: cosine 0.996-0.9997 per "
    "sentence to the "
    "native runtimes; --quantize int8 --quant-format weight-only keeps activations in float "
    "and matches them to 0.9999"
)


def _ir_note(ir_version: int, too_new: bool) -> str:
    if not too_new:
        return ""
    return f"IR version {ir_version} is newer than this runtime reads; re-save with an older IR"
