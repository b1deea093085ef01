"""onnxruntime's integer matrix kernels in numpy, bit for bit, and which weights they keep exact.

MLAS computes ``(a - za) @ (b - zb)`` as ``a @ b - za * colsum(b) - zb * rowsum(a) + K * za * zb``
on the raw bytes. Its U8S8 kernel (uint8 ``a``, int8 ``b``) on x86 with AVX2 or AVX-512 but no
VNNI multiplies with ``VPMADDUBSW``: the products of each adjacent pair along K, ``(0, 1), (2, 3),
...`` (an odd K padded with a zero), are added into int16 with saturation, then summed in int32.
Only ``a @ b`` saturates; the zero-point corrections are exact. So a weight column is exact for
every activation iff each pair's positive parts and each pair's negative parts sum to at most 128
in magnitude (``255 * 128 = 32640``, ``255 * 129 = 32895``), whatever the zero points.
U8U8, S8S8 and every other device class accumulate exactly in int32.

Numpy only at import; :func:`integer_nodes`, :func:`exact_classes` and :func:`saturation_by_node`
import onnx (and onnxruntime) when called.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lrt_deploy.quant.rules import SAFE_PAIR_BOUND, adjacent_pairs, pair_peaks
from lrt_deploy.runtime.devices import DEVICE_CLASSES

__all__ = [
    "SAFE_PAIR_BOUND",
    "IntegerNode",
    "exact_classes",
    "integer_nodes",
    "is_pair_safe",
    "matmul_integer",
    "pair_bound",
    "pair_peaks",
    "saturation_by_node",
]

_INT16_MIN, _INT16_MAX = -32768, 32767
_CHUNK_ELEMENTS = 1 << 22
_INT_TYPES = (np.uint8, np.int8)


def _zero_point(zp: Any, name: str) -> np.ndarray:
    zp = np.asarray(zp)
    if zp.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got {zp.dtype}")
    return zp.astype(np.int64)


def _b_zero_point(zb: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``zb`` shaped to broadcast against ``b`` (..., K, N): a scalar, ``(N,)`` per column, or
    ``(..., 1, N)``."""
    if zb.size == 1:
        return zb.reshape(())
    if zb.ndim == 1:
        if zb.shape[0] != b.shape[-1]:
            raise ValueError(f"b_zero_point has {zb.shape[0]} values for {b.shape[-1]} columns")
        return zb.reshape(1, -1)
    if zb.shape[-2] != 1 or zb.shape[-1] != b.shape[-1]:
        raise ValueError(f"b_zero_point shape {zb.shape} does not fit b {b.shape}")
    return zb


def _saturation_excess(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum_j sat16(t_j) - t_j`` over the K pairs ``t_j = a_2j * b_2j + a_2j+1 * b_2j+1`` of the
    raw operands: what the saturating kernel adds to the exact product (int64, output shape)."""
    a0, a1 = adjacent_pairs(a, -1)
    b0, b1 = adjacent_pairs(b, -2)
    out_shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    excess = np.zeros(out_shape, np.int64)
    unsafe = pair_peaks(b, -2) > SAFE_PAIR_BOUND
    pairs = np.flatnonzero(unsafe.reshape(-1, *unsafe.shape[-2:]).any(axis=(0, 2)))
    if pairs.size == 0:
        return excess
    per_pair = max(1, int(np.prod(out_shape)))
    step = max(1, _CHUNK_ELEMENTS // per_pair)
    for start in range(0, pairs.size, step):
        j = pairs[start:start + step]
        t = (a0[..., :, j, None] * b0[..., None, j, :]
             + a1[..., :, j, None] * b1[..., None, j, :])
        excess += (np.clip(t, _INT16_MIN, _INT16_MAX) - t).sum(axis=-2, dtype=np.int64)
    return excess


def matmul_integer(a: np.ndarray, b: np.ndarray, a_zero_point: Any = 0, b_zero_point: Any = 0,
                   *, saturating: bool) -> np.ndarray:
    """ONNX MatMulInteger ``(a - za) @ (b - zb)`` as onnxruntime's CPU kernel returns it (int32).

    ``saturating=True`` models the x86 AVX2/AVX-512-without-VNNI U8S8 kernel: it changes the
    result only for uint8 ``a`` with int8 ``b`` (other type pairs run exact kernels everywhere).
    ``a`` is (..., M, K), ``b`` (..., K, N), broadcast like ``np.matmul``; ``a_zero_point`` is a
    scalar (as in onnxruntime), ``b_zero_point`` a scalar, ``(N,)`` or ``(..., 1, N)``.
    Invariant: ``saturating=False`` equals the int64 product wrapped to int32.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype not in _INT_TYPES or b.dtype not in _INT_TYPES:
        raise TypeError(f"a and b must be uint8 or int8, got {a.dtype} and {b.dtype}")
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"a and b need at least 2 dimensions, got {a.shape} and {b.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"inner dimensions differ: a {a.shape}, b {b.shape}")
    za = _zero_point(a_zero_point, "a_zero_point")
    if za.size != 1:
        raise ValueError("a_zero_point must be a scalar (onnxruntime has no per-row a zero point)")
    zb = _b_zero_point(_zero_point(b_zero_point, "b_zero_point"), b)
    # float64 holds every partial sum exactly while K * 255 * 255 < 2**53.
    exact = np.matmul(a.astype(np.float64) - float(za.reshape(())),
                      b.astype(np.float64) - zb.astype(np.float64))
    out = np.rint(exact).astype(np.int64)
    if saturating and a.dtype == np.uint8 and b.dtype == np.int8:
        out += _saturation_excess(a, b)
    return out.astype(np.int32)


def pair_bound(weight_int8: np.ndarray, axis: int = 0) -> int:
    """Max over the adjacent pairs ``(2j, 2j+1)`` along ``axis`` (K) of the larger of the pair's
    positive-part sum and negative-part magnitude sum; zero points play no part (MLAS multiplies
    raw bytes). A pair with bound ``p`` reaches ``255 * p`` in the int16 accumulator."""
    w = np.asarray(weight_int8)
    if w.dtype != np.int8:
        raise TypeError(f"pair_bound takes int8 weights, got {w.dtype}")
    if w.size == 0:
        return 0
    return int(pair_peaks(w, axis).max())


def is_pair_safe(weight_int8: np.ndarray, axis: int = 0) -> bool:
    """True iff the saturating U8S8 kernel equals the exact one for every uint8 activation and
    every zero point: ``pair_bound <= 128``; above it, some activation saturates."""
    return pair_bound(weight_int8, axis) <= SAFE_PAIR_BOUND


# --------------------------------------------------------------------------------------------
# Graphs


@dataclass(frozen=True)
class IntegerNode:
    """One node that runs an onnxruntime integer GEMM.

    Attributes:
        name: Node name.
        op_type: ``MatMulInteger``, ``QAttention``, ``QLinearMatMul``, ``MatMul`` (a QDQ pair)...
        kernel: ``u8s8`` (saturates on some classes), ``u8u8`` or ``s8s8`` (exact everywhere).
        weight: Name of the weight tensor.
        k: Length of the inner (K) axis, or None when the weight is not a constant.
        pair_bound: :func:`pair_bound` of the constant int8 weight, else None.
        pair_safe: True iff the node is exact on every device class.
    """

    name: str
    op_type: str
    kernel: str
    weight: str
    k: int | None
    pair_bound: int | None
    pair_safe: bool


# op_type -> (activation input, weight input); "float" activations are quantised to uint8 inside.
_INTEGER_OPS: dict[str, tuple[int, int]] = {
    "MatMulInteger": (0, 1),
    "MatMulIntegerToFloat": (0, 1),
    "DynamicQuantizeMatMul": (-1, 1),
    "QAttention": (0, 1),
    "QLinearMatMul": (0, 3),
    "QGemm": (0, 3),
}


def _constants(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _elem_types(model) -> dict[str, int]:
    """Element type (TensorProto enum) of every value onnx shape inference can name."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - contrib ops or big models: fall back to declared types
        inferred = model
    types: dict[str, int] = {}
    graph = inferred.graph
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in graph.initializer:
        types[t.name] = t.data_type
    for node in graph.node:
        if node.op_type == "DynamicQuantizeLinear":
            types[node.output[0]] = onnx.TensorProto.UINT8
            types[node.output[2]] = onnx.TensorProto.UINT8
        elif node.op_type == "QuantizeLinear" and len(node.input) > 2:
            zp_type = types.get(node.input[2])
            if zp_type is not None:
                types[node.output[0]] = zp_type
    return types


def _kernel(a_signed: bool | None, b_dtype: np.dtype) -> str:
    if b_dtype == np.uint8:
        return "s8u8" if a_signed else "u8u8"
    return "s8s8" if a_signed else "u8s8"


def _node(name: str, op_type: str, kernel: str, weight_name: str, weight: np.ndarray | None,
          k_axis: int) -> IntegerNode:
    if weight is None:
        return IntegerNode(name, op_type, kernel, weight_name, None, None, kernel != "u8s8")
    k = int(weight.shape[k_axis])
    if weight.dtype != np.int8:
        return IntegerNode(name, op_type, kernel, weight_name, k, None, True)
    bound = pair_bound(weight, axis=k_axis)
    return IntegerNode(name, op_type, kernel, weight_name, k, bound,
                       kernel != "u8s8" or bound <= SAFE_PAIR_BOUND)


def _qdq_matmuls(model, constants, types) -> list[IntegerNode]:
    """``DequantizeLinear(int8 const) -> MatMul`` whose other input is a DequantizeLinear of an
    8-bit activation: ORT (x86, default ``session.qdqisint8allowed``) fuses it into a U8S8 GEMM,
    shifting int8 activations to uint8. A float activation keeps the MatMul in float (exact)."""
    import onnx

    producer = {out: node for node in model.graph.node for out in node.output}
    eight_bit = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        dqs = [producer.get(i) for i in node.input]
        if not all(d is not None and d.op_type == "DequantizeLinear" for d in dqs):
            continue
        weight_dq, act_dq = dqs[1], dqs[0]
        weight = constants.get(weight_dq.input[0])
        if types.get(act_dq.input[0]) not in eight_bit:
            continue
        if weight is None:
            w_type = types.get(weight_dq.input[0])
            kernel = "u8s8" if w_type == onnx.TensorProto.INT8 else "u8u8"
        else:
            kernel = "u8s8" if weight.dtype == np.int8 else "u8u8"
        found.append(_node(node.name, "MatMul", kernel, weight_dq.input[0], weight, -2))
    return found


def integer_nodes(model) -> list[IntegerNode]:
    """Every node of ``model`` (a ModelProto or path) that runs an integer GEMM in onnxruntime's
    CPU provider, with its weight's pair bound. Weight-only nodes (MatMulNBits, and
    DequantizeLinear(int8 const) -> MatMul on a float activation, which onnxruntime fuses into
    MatMulNBits) are not listed: they do not saturate."""
    import onnx

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    constants = _constants(model)
    types = _elem_types(model)
    found: list[IntegerNode] = []
    for node in model.graph.node:
        spec = _INTEGER_OPS.get(node.op_type)
        if spec is None:
            continue
        a_index, b_index = spec
        if len(node.input) <= b_index:
            continue
        if a_index < 0:
            a_signed: bool | None = False
        elif node.op_type in ("QLinearMatMul", "QGemm") and len(node.input) > 2:
            a_signed = types.get(node.input[2], types.get(node.input[0])) == onnx.TensorProto.INT8
        else:
            a_signed = types.get(node.input[a_index]) == onnx.TensorProto.INT8
        weight = constants.get(node.input[b_index])
        if weight is not None:
            b_dtype = weight.dtype
        else:
            b_type = types.get(node.input[b_index])
            b_dtype = np.dtype(np.uint8 if b_type == onnx.TensorProto.UINT8 else np.int8)
        k_axis = -2
        if node.op_type == "QGemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            k_axis = -1 if trans_b else -2
        found.append(_node(node.name, node.op_type, _kernel(a_signed, b_dtype),
                           node.input[b_index], weight, k_axis))
    found.extend(_qdq_matmuls(model, constants, types))
    return found


def exact_classes(model) -> list[str]:
    """Names of the :data:`DEVICE_CLASSES` on which ``model``'s integer kernels are exact: every
    class when the model has none; else the classes running onnxruntime's integer GEMM
    (not ``own_int8_kernel``), all of them when every node is pair-safe, else the
    non-saturating ones."""
    nodes = integer_nodes(model)
    if not nodes:
        return list(DEVICE_CLASSES)
    gemm = {name: c for name, c in DEVICE_CLASSES.items() if not c.own_int8_kernel}
    if all(n.pair_safe for n in nodes):
        return list(gemm)
    return [name for name, c in gemm.items() if not c.saturates_u8s8]


# --------------------------------------------------------------------------------------------
# Measured saturation


def _gemm_inputs(node) -> tuple[str, str, str | None, str | None] | None:
    """(activation, weight, activation zero point, weight zero point) names of a covered node."""
    ins = list(node.input) + [""] * 9
    if node.op_type == "MatMulInteger":
        return ins[0], ins[1], ins[2] or None, ins[3] or None
    if node.op_type == "QAttention":
        return ins[0], ins[1], ins[6] or None, ins[7] or None
    return None


def saturation_by_node(model_path: str | Path, feeds: Iterable[dict[str, np.ndarray]]
                       ) -> list[dict[str, Any]]:
    """Run ``model_path`` once per feed in onnxruntime (no graph optimisation) with every
    MatMulInteger's and QAttention's GEMM inputs exported, and compare the saturating U8S8 GEMM
    against the exact one per node with :func:`matmul_integer`.

    Returns one dict per node, worst first: ``node``, ``op_type``, ``k``, ``pair_bound``,
    ``max_abs_error`` (int32 units), ``output_range`` (max - min of the exact output),
    ``relative_error`` (their ratio), ``fraction_differ`` (share of outputs that change) and
    ``outputs``. Independent of the host's kernel: both results come from the reference.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    constants = _constants(model)
    types = _elem_types(model)
    nodes = [(n, _gemm_inputs(n)) for n in model.graph.node]
    nodes = [(n, io) for n, io in nodes if io is not None]
    existing = {o.name for o in model.graph.output}
    wanted: list[str] = []
    for _, names in nodes:
        for name in names:
            if name and name not in constants and name not in existing and name not in wanted:
                wanted.append(name)
    for name in wanted:
        if name not in types:
            raise ValueError(f"cannot tell the element type of {name!r} to export it")
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    input_names = {i.name for i in session.get_inputs()}
    stats = {n.name: {"differ": 0, "outputs": 0, "max_abs_error": 0, "lo": None, "hi": None}
             for n, _ in nodes}
    for feed in feeds:
        values = dict(zip(wanted, session.run(wanted, {k: v for k, v in feed.items()
                                                        if k in input_names}), strict=True))
        values.update(constants)
        for node, (a_name, b_name, za_name, zb_name) in nodes:
            a, b = values[a_name], values[b_name]
            za = values[za_name] if za_name else 0
            zb = values[zb_name] if zb_name else 0
            exact = matmul_integer(a, b, za, zb, saturating=False)
            sat = matmul_integer(a, b, za, zb, saturating=True)
            diff = np.abs(sat.astype(np.int64) - exact)
            s = stats[node.name]
            s["differ"] += int(np.count_nonzero(diff))
            s["outputs"] += int(diff.size)
            s["max_abs_error"] = max(s["max_abs_error"], int(diff.max(initial=0)))
            lo, hi = int(exact.min(initial=0)), int(exact.max(initial=0))
            s["lo"] = lo if s["lo"] is None else min(s["lo"], lo)
            s["hi"] = hi if s["hi"] is None else max(s["hi"], hi)
    rows = []
    for node, (_, b_name, _, _) in nodes:
        s = stats[node.name]
        b = constants.get(b_name)
        span = (s["hi"] - s["lo"]) if s["lo"] is not None else 0
        rows.append({
            "node": node.name,
            "op_type": node.op_type,
            "k": int(b.shape[-2]) if b is not None else None,
            "pair_bound": pair_bound(b, axis=-2) if b is not None and b.dtype == np.int8
            else None,
            "max_abs_error": s["max_abs_error"],
            "output_range": span,
            "relative_error": s["max_abs_error"] / span if span else 0.0,
            "fraction_differ": s["differ"] / s["outputs"] if s["outputs"] else 0.0,
            "outputs": s["outputs"],
        })
    rows.sort(key=lambda r: (r["relative_error"], r["fraction_differ"]), reverse=True)
    return rows
