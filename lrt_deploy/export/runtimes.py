"""Which ONNX Runtime packages a graph runs on, judged from its operators.

Every package an app can embed compiles the same CPU kernels: the Python wheel, onnxruntime-node
(desktop, Electron), onnxruntime-web's WebAssembly backend (a browser page) and the full
onnxruntime-android AAR. What differs is whether a given build was checked with our graphs.
So each runtime below carries the operators of lrt-export graphs (every target, fused and
unfused, fp32, dynamic and static int8, int4) that were *run* in it; samples/js/README.md says
how. A graph whose operators are all in a runtime's list runs there; an operator outside the
list is reported as unverified, never silently as supported. For the installed Python
``onnxruntime`` the answer is exact: its own kernel registry is asked.

Operators are not the only condition: float16 graphs (the ``cuda`` target) need GPU kernels
the CPU builds lack for the fused attention and normalisation ops, so they are reported as not
running on any CPU package.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["RUNTIMES", "VERIFIED_OPERATORS", "graph_operators", "supported_runtimes"]

logger = logging.getLogger(__name__)

_STANDARD = "ai.onnx"
_MICROSOFT = "com.microsoft"

# Standard operators our exporter, fusion passes, ORT's offline optimiser and the quantisers emit.
_STANDARD_OPS = frozenset({
    "Add", "And", "Cast", "Clip", "Concat", "ConstantOfShape", "DequantizeLinear", "Div",
    "DynamicQuantizeLinear", "Equal", "Erf", "Expand", "Gather", "GatherND", "Gemm",
    "GreaterOrEqual", "IsNaN", "LayerNormalization", "MatMul", "MatMulInteger", "Max", "Mul",
    "Neg", "Pow", "QuantizeLinear", "Range", "ReduceL2", "ReduceMean", "ReduceSum", "Reshape",
    "Shape", "Slice", "Softmax", "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze",
    "Where",
})
_CONTRIB_OPS = frozenset({
    "BiasGelu", "FastGelu", "FusedMatMul", "Gelu", "MatMulIntegerToFloat", "MatMulNBits",
    "MultiHeadAttention", "SkipLayerNormalization", "DynamicQuantizeMatMul",
})
_VERIFIED = frozenset({(_STANDARD, op) for op in _STANDARD_OPS}) | frozenset(
    {(_MICROSOFT, op) for op in _CONTRIB_OPS}
)

#: Runtime -> (package and version the list was verified with, how, operators verified).
VERIFIED_OPERATORS: dict[str, dict[str, Any]] = {
    "onnxruntime-node": {
        "package": "onnxruntime-node 1.30.0 (npm)",
        "how": "lrt-export graphs run by samples/js (tests/test_js_runtimes.py)",
        "operators": _VERIFIED,
    },
    "onnxruntime-web-wasm": {
        "package": "onnxruntime-web 1.30.0 (npm), WebAssembly backend, headless Chromium",
        "how": "lrt-export graphs run by samples/js/web (tests/test_js_runtimes.py)",
        "operators": _VERIFIED,
    },
    "onnxruntime-android": {
        "package": "onnxruntime-android (full AAR)",
        "how": "not run: no Android device or SDK here; the full AAR builds the same CPU kernels",
        "operators": frozenset(),
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


def _has_float16_compute(model: Any) -> bool:
    import onnx

    float16 = onnx.TensorProto.FLOAT16
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    if any(value.type.tensor_type.elem_type == float16 for value in values):
        return True
    return any(init.data_type == float16 for init in model.graph.initializer)


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
    """Say which ONNX Runtime packages run a graph, from its operator set.

    Args:
        model: An ``onnx.ModelProto`` (the deployable graph of a bundle).

    Returns:
        One entry per name in :data:`RUNTIMES`: ``runs`` (True: every operator is known to
        run there; False: something is known not to; None: some operators were never
        verified there), ``missing`` and ``unverified`` (``"domain:op"`` lists), ``basis``
        (what the answer rests on) and, where it matters, ``note``. JSON-ready, for the
        manifest.
    """
    operators = graph_operators(model)
    float16 = _has_float16_compute(model)
    fp16_note = (
        "float16 graph (cuda target): the CPU builds lack float16 kernels for its fused ops; "
        "export for cpu or mobile to run here"
    )
    result: dict[str, dict[str, Any]] = {}

    installed = _installed_cpu_kernels()
    if installed is None:
        result["onnxruntime"] = _entry(None, set(), operators, "onnxruntime not installed")
    else:
        basis, kernels = installed
        missing = operators - kernels
        result["onnxruntime"] = _entry(
            not missing and not float16, missing, set(), basis, fp16_note if float16 else ""
        )

    for runtime, verified in VERIFIED_OPERATORS.items():
        unverified = operators - verified["operators"]
        basis = f"{verified['package']}: {verified['how']}"
        if float16:
            result[runtime] = _entry(False, set(), unverified, basis, fp16_note)
        else:
            result[runtime] = _entry(None if unverified else True, set(), unverified, basis)
    return result
