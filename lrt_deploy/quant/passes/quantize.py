"""Quantisation options: int8 dynamic (the default), int8 static QDQ with calibration and
excluded nodes, int8 weight-only (``DequantizeLinear`` on the weights), a per-node sensitivity
finder, and 4-bit weight-only ``MatMulNBits``."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lrt_deploy._logs import quiet_loggers
from lrt_deploy.graph.ops import count_changes, op_counts

__all__ = [
    "DYNAMIC_INT8_OP_TYPES",
    "NodeSensitivity",
    "QuantizationResult",
    "find_sensitive_nodes",
    "make_weights_pair_safe",
    "quantize_int8",
    "quantize_static_int8",
    "quantize_weights_4bit",
    "quantize_weights_int8",
    "symmetric_int8_scale",
]

_QUANTIZED_OP_TYPES = (
    "MatMulInteger",
    "QAttention",
    "QEmbedLayerNormalization",
    "DynamicQuantizeLinear",
    "QuantizeLinear",
    "DequantizeLinear",
    "MatMulNBits",
    "GatherBlockQuantized",
)

logger = logging.getLogger(__name__)


@dataclass
class QuantizationResult:
    """What quantisation did: settings and op-count changes (e.g. MatMul -> MatMulInteger)."""

    mode: str
    per_channel: bool
    weight_type: str
    quantized_ops: dict[str, int] = field(default_factory=dict)
    changes: dict[str, int] = field(default_factory=dict)
    excluded_nodes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "per_channel": self.per_channel,
            "weight_type": self.weight_type,
            "quantized_ops": self.quantized_ops,
            "op_changes": self.changes,
            "excluded_nodes": list(self.excluded_nodes),
            "settings": dict(self.settings),
        }


# What dynamic int8 quantises by default. ``Attention`` (packed QKV, which
# ``export.fusion.fuse_transformer`` makes of dense Q/K/V) becomes ``QAttention``: the QKV
# projection runs in int8 inside the attention kernel, one node instead of three MatMulIntegers
# and their rescaling. ORT's quantiser only does so for an Attention without
# ``qkv_hidden_sizes`` and with a ``mask_index`` rather than an additive bias, which is why the
# fusion rewrites those (see ``export/fuse_attention.py``). MultiHeadAttention (low-rank Q/K/V)
# has no integer kernel and stays float; the factor MatMuls around it are quantised.
DYNAMIC_INT8_OP_TYPES = ("MatMul", "Gather", "Attention")


def quantize_int8(
    source: str | Path,
    target: str | Path,
    *,
    per_channel: bool = True,
    op_types: Sequence[str] = DYNAMIC_INT8_OP_TYPES,
    nodes_to_exclude: Sequence[str] = (),
    weight_grid: str = "pair-safe",
) -> QuantizationResult:
    """Dynamic int8 quantisation: weights int8 (signed, per output channel by default),
    activations quantised at run time. MatMul, Gather (embedding) and packed-QKV Attention
    weights are quantised.

    Args:
        source: fp32 ONNX file (optimised or not).
        target: Where the quantised ONNX file goes.
        per_channel: One scale per output channel (per-tensor costs MiniLM ~0.04 cosine).
        op_types: Op types to quantise (see :data:`DYNAMIC_INT8_OP_TYPES`).
        nodes_to_exclude: Node names kept in float (see
            :func:`lrt_deploy.quant.passes.sensitivity.rank_int8_damage`).
        weight_grid: ``pair-safe`` (exact on every device class,
            :mod:`lrt_deploy.quant.rules`) or ``full-range`` ([-127, 127]: saturates on x86
            AVX2 / AVX-512 without VNNI).

    Returns:
        The settings used and which ops changed.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _check_grid(weight_grid)

    with quiet_loggers(""):  # ORT's quantisers log hints on the root logger
        quantize_dynamic(
            str(source),
            str(target),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types),
            nodes_to_exclude=list(nodes_to_exclude),
            # Shape inference cannot type the outputs of com.microsoft ops (SkipLayerNorm,
            # BiasGelu); every float tensor in these graphs is fp32.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    regridded = _regrid(source, target, weight_grid)
    before, after = op_counts(source), op_counts(target)
    result = QuantizationResult(
        mode="dynamic",
        per_channel=per_channel,
        weight_type="int8",
        quantized_ops=_quantized_ops(target),
        changes=count_changes(before, after),
        excluded_nodes=list(nodes_to_exclude),
        settings={"op_types": list(op_types), "weight_grid": weight_grid,
                  "pair_safe_weights": regridded},
    )
    logger.info("quantised int8 (per_channel=%s): %s", per_channel, result.quantized_ops)
    return result


def _check_grid(weight_grid: str) -> None:
    from lrt_deploy.quant.rules import INT8_WEIGHT_GRIDS

    if weight_grid not in INT8_WEIGHT_GRIDS:
        raise ValueError(f"weight_grid must be one of {INT8_WEIGHT_GRIDS}, got {weight_grid!r}")


def _regrid(source: str | Path, target: str | Path, weight_grid: str) -> int:
    """Put ``target``'s integer-kernel weights on the pair-safe grid (``weight_grid``
    ``pair-safe``), re-rounded from ``source``'s float weights; returns how many."""
    if weight_grid != "pair-safe":
        return 0
    from lrt_deploy.graph.external_data import load_model_proto, save_model_proto

    model = load_model_proto(target)
    count = make_weights_pair_safe(model, load_model_proto(source))
    if count:
        save_model_proto(model, target)
    return count


def _integer_weight_slots(model: Any) -> list[tuple[str, str]]:
    """(int8 weight, its scale) of every node running the uint8 x int8 kernel on a constant
    weight laid out (K, N): MatMulInteger (the scale is the quantiser's ``<weight>_scale``),
    QAttention, DynamicQuantizeMatMul, and QDQ weights (a DequantizeLinear into a MatMul)."""
    from lrt_deploy.quant.kernels import integer_nodes

    producer = {out: node for node in model.graph.node for out in node.output}
    by_name = {node.name: node for node in model.graph.node}
    scale_input = {"QAttention": 4, "DynamicQuantizeMatMul": 2, "MatMulIntegerToFloat": 3}
    slots = []
    for entry in integer_nodes(model):
        node = by_name.get(entry.name)
        if node is None or entry.kernel != "u8s8" or entry.pair_bound is None:
            continue
        if node.op_type in scale_input:
            slots.append((entry.weight, node.input[scale_input[node.op_type]]))
        elif node.op_type == "MatMulInteger":
            slots.append((entry.weight, f"{entry.weight.removesuffix('_quantized')}_scale"))
        elif node.op_type == "MatMul" and (dq := producer.get(node.input[1])) is not None:
            slots.append((entry.weight, dq.input[1]))
    return slots


def make_weights_pair_safe(model: Any, float_model: Any) -> int:
    """Re-round every int8 weight of an integer matrix kernel in ``model`` (in place) onto the
    pair-safe grid (:func:`lrt_deploy.quant.rules.pair_safe_int8`, per channel when its scale
    is), from the float weight of the same name in ``float_model`` (the quantiser's input;
    the int8 codes times their scale where it has none). Returns the weights changed.

    Invariant: afterwards :func:`lrt_deploy.quant.kernels.exact_classes` lists every class."""
    from onnx import numpy_helper

    from lrt_deploy.quant.rules import pair_safe_int8

    floats = {init.name: init for init in float_model.graph.initializer}
    inits = {init.name: init for init in model.graph.initializer}
    done: set[str] = set()
    for weight_name, scale_name in _integer_weight_slots(model):
        if weight_name in done or weight_name not in inits or scale_name not in inits:
            continue
        codes = numpy_helper.to_array(inits[weight_name])
        scale = numpy_helper.to_array(inits[scale_name])
        original = floats.get(weight_name.removesuffix("_quantized"))
        weight = (numpy_helper.to_array(original).astype(np.float32)
                  if original is not None and tuple(original.dims) == codes.shape
                  else codes.astype(np.float32) * scale.reshape(1, -1))
        new_codes, new_scale = pair_safe_int8(weight, k_axis=0, per_channel=scale.size > 1)
        inits[weight_name].CopyFrom(numpy_helper.from_array(new_codes, weight_name))
        inits[scale_name].CopyFrom(numpy_helper.from_array(
            new_scale.reshape(scale.shape).astype(scale.dtype), scale_name))
        done.add(weight_name)
    return len(done)


def _quantized_ops(path: str | Path) -> dict[str, int]:
    after = op_counts(path)
    return {op: after[op] for op in _QUANTIZED_OP_TYPES if after.get(op)}


def _reader(batches: Iterable[Mapping[str, np.ndarray]], input_names: Sequence[str]) -> Any:
    """A ``CalibrationDataReader`` over named numpy batches (only the graph's inputs kept)."""
    from onnxruntime.quantization import CalibrationDataReader

    feeds = [{name: np.asarray(batch[name]) for name in input_names} for batch in batches]

    class _BatchReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._items, None)

        def rewind(self) -> None:
            self._items = iter(feeds)

    return _BatchReader()


def _graph_input_names(path: str | Path) -> list[str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    return [value.name for value in graph.input if value.name not in initializers]


def quantize_static_int8(
    source: str | Path,
    target: str | Path,
    calibration: Iterable[Mapping[str, np.ndarray]],
    *,
    per_channel: bool = True,
    nodes_to_exclude: Sequence[str] = (),
    op_types: Sequence[str] = ("MatMul",),
    activation_type: str = "uint8",
    calibrate_method: str = "minmax",
    weight_grid: str = "pair-safe",
) -> QuantizationResult:
    """Static int8 quantisation in QDQ format: activation ranges come from ``calibration``.

    Every quantised tensor gets a ``QuantizeLinear -> DequantizeLinear`` pair; ONNX Runtime
    fuses the pairs around a MatMul into an integer kernel when the session loads, and other
    runtimes (TensorRT, NNAPI, QNN) read the same format.

    Args:
        source: fp32 ONNX file (optimised or not).
        target: Where the quantised ONNX file goes.
        calibration: Named numpy input batches (e.g. tokenised text); a few hundred tokens of
            real data are enough for min/max ranges.
        per_channel: One weight scale per output channel.
        nodes_to_exclude: Node names kept in float (see :func:`find_sensitive_nodes`).
        op_types: Op types to quantise. MatMul only by default: QDQ pairs around ops without an
            integer CPU kernel (Add, Gather, LayerNorm) would only add conversions.
        activation_type: ``uint8`` (asymmetric; on all-MiniLM-L6-v2 mean cosine 0.990 vs fp32)
            or ``int8`` (symmetric; 0.977). Weights are always int8.
        calibrate_method: ``minmax``, ``entropy`` or ``percentile``; the last two build
            histograms and need every calibration batch to have the same shape.
        weight_grid: ``pair-safe`` or ``full-range``, as for :func:`quantize_int8` (x86
            onnxruntime runs QDQ MatMuls on the same uint8 x int8 kernel).

    Returns:
        Settings used, excluded nodes, and QDQ op counts.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    activations = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if activation_type not in activations:
        raise ValueError(f"activation_type must be int8 or uint8, got {activation_type!r}")
    if calibrate_method not in methods:
        raise ValueError(f"calibrate_method must be one of {sorted(methods)}, got "
                         f"{calibrate_method!r}")
    _check_grid(weight_grid)
    batches = list(calibration)
    if calibrate_method != "minmax" and len({
        tuple(np.shape(value) for value in batch.values()) for batch in batches
    }) > 1:
        raise ValueError(
            f"calibrate_method {calibrate_method!r} needs calibration batches of one shape: pad "
            "them to one length, or use minmax"
        )
    reader = _reader(batches, _graph_input_names(source))
    with quiet_loggers(""):  # ORT's quantisers log hints on the root logger
        quantize_static(
            str(source),
            str(target),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            per_channel=per_channel,
            activation_type=activations[activation_type],
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(nodes_to_exclude),
            calibrate_method=methods[calibrate_method],
            extra_options={
                "ActivationSymmetric": activation_type == "int8",
                # ORT also quantises each MatMul's output by default; the next op (bias Add,
                # Gelu) has no integer kernel, so that pair would only add rounding error.
                "OpTypesToExcludeOutputQuantization": list(op_types),
            },
        )
    regridded = _regrid(source, target, weight_grid)
    before, after = op_counts(source), op_counts(target)
    result = QuantizationResult(
        mode="static-qdq",
        per_channel=per_channel,
        weight_type="int8",
        quantized_ops=_quantized_ops(target),
        changes=count_changes(before, after),
        excluded_nodes=list(nodes_to_exclude),
        settings={
            "activation_type": activation_type,
            "calibrate_method": calibrate_method,
            "op_types": list(op_types),
            "weight_grid": weight_grid,
            "pair_safe_weights": regridded,
        },
    )
    logger.info("quantised static QDQ int8 (per_channel=%s, %d excluded): %s", per_channel,
                len(result.excluded_nodes), result.quantized_ops)
    return result


@dataclass(frozen=True)
class NodeSensitivity:
    """How much int8 hurts one MatMul on its own: SQNR of its quantised output (higher is
    better) measured on the calibration activations."""

    node: str
    sqnr_db: float

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "sqnr_db": self.sqnr_db}


def symmetric_int8_scale(values: np.ndarray, axis: int | None) -> np.ndarray:
    """Scales of symmetric int8 (``[-127, 127]``), one per slice along ``axis`` (one for the
    tensor when None), shaped to broadcast against ``values``; an all-zero slice gets 1."""
    reduce = None if axis is None else tuple(i for i in range(values.ndim) if i != axis)
    scale = np.abs(values).max(axis=reduce, keepdims=True) / 127.0
    return np.where(scale == 0, 1.0, scale)


def _quantize_dequantize(values: np.ndarray, axis: int | None, symmetric: bool) -> np.ndarray:
    """Round-trip through int8 with scales per slice along ``axis`` (per tensor when None)."""
    reduce = None if axis is None else tuple(i for i in range(values.ndim) if i != axis)
    if symmetric:
        scale = symmetric_int8_scale(values, axis)
        return np.clip(np.round(values / scale), -127, 127) * scale
    low = np.minimum(values.min(axis=reduce, keepdims=True), 0.0)
    high = np.maximum(values.max(axis=reduce, keepdims=True), 0.0)
    scale = np.where(high > low, (high - low) / 255.0, 1.0)
    zero = np.round(-low / scale)
    return (np.clip(np.round(values / scale) + zero, 0, 255) - zero) * scale


def find_sensitive_nodes(
    source: str | Path,
    calibration: Iterable[Mapping[str, np.ndarray]],
    *,
    per_channel: bool = True,
    activation_type: str = "uint8",
) -> list[NodeSensitivity]:
    """Rank the graph's MatMuls with a constant weight by how much int8 hurts each, worst first.

    One fp32 run collects each MatMul's input on the calibration batches; then for each node
    alone, its input (per tensor, range from those batches, as static calibration would set it)
    and weight (per output channel when ``per_channel``) are rounded through int8 and the
    output's signal-to-quantisation-noise ratio is measured. This is a local measure (the
    error each node adds, not its effect on the model output), costing one inference pass
    instead of one quantisation per node. Exclude the first few with
    ``quantize_static_int8(..., nodes_to_exclude=[s.node for s in ranked[:n]])``.

    Args:
        source: fp32 ONNX file.
        calibration: Named numpy input batches.
        per_channel: Weight scales per output channel, as the quantiser will use.
        activation_type: ``uint8`` (asymmetric) or ``int8`` (symmetric) activations, as the
            quantiser will use.

    Returns:
        One entry per MatMul with a constant weight, lowest SQNR first.
    """
    import onnx
    import onnxruntime as ort

    from lrt_deploy.graph.index import GraphIndex

    model = onnx.load(str(source))
    index = GraphIndex(model.graph)
    targets = [
        (node.name, node.input[0], index.constant(node.input[1]))
        for node in model.graph.node
        if node.op_type == "MatMul" and index.constant(node.input[1]) is not None
    ]
    targets = [(name, x, w) for name, x, w in targets if w is not None and w.ndim == 2]
    existing = {value.name for value in model.graph.output}
    for tensor in {x for _, x, _ in targets} - existing:
        model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, 1, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [value.name for value in session.get_outputs()]
    inputs = [value.name for value in session.get_inputs()]
    collected: dict[str, list[np.ndarray]] = {}
    for batch in calibration:
        outputs = session.run(names, {name: np.asarray(batch[name]) for name in inputs})
        for name, value in zip(names, outputs, strict=True):
            collected.setdefault(name, []).append(value.reshape(-1, value.shape[-1]))
    symmetric = activation_type == "int8"
    ranked = []
    for name, tensor, weight in targets:
        x = np.concatenate(collected[tensor]).astype(np.float64)
        w = weight.astype(np.float64)
        exact = x @ w
        approx = _quantize_dequantize(x, None, symmetric) @ _quantize_dequantize(
            w, 1 if per_channel else None, True
        )
        noise = float(np.sum((exact - approx) ** 2))
        signal = float(np.sum(exact**2))
        sqnr = float("inf") if noise == 0 else 10.0 * np.log10(max(signal, 1e-30) / noise)
        ranked.append(NodeSensitivity(name, sqnr))
    ranked.sort(key=lambda item: item.sqnr_db)
    return ranked


def _pack_int4_tables(model: Any) -> None:
    """Re-store ``GatherBlockQuantized`` tables from ONNX ``INT4`` to ``uint8`` bytes of two
    values (low nibble first, offset by the implicit zero point 8; ``bits=4``): the same
    numbers (tested), but the ORT format of mobile bundles has no INT4 tensor type."""
    import onnx
    from onnx import numpy_helper

    tables = {node.input[0]: node for node in model.graph.node
              if node.op_type == "GatherBlockQuantized"}
    for tensor in model.graph.initializer:
        if tensor.name not in tables or tensor.data_type != onnx.TensorProto.INT4:
            continue
        values = numpy_helper.to_array(tensor).astype(np.int16) + 8
        if values.shape[-1] % 2:  # the byte width would not say the table's width
            logger.warning("%s has an odd width: kept as INT4 (not loadable as ORT format)",
                           tensor.name)
            continue
        packed = (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)
        tensor.CopyFrom(numpy_helper.from_array(packed, tensor.name))
        node = tables[tensor.name]
        if not any(attribute.name == "bits" for attribute in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("bits", 4))


def quantize_weights_4bit(
    source: str | Path,
    target: str | Path,
    *,
    block_size: int = 128,
    min_elements: int = 0,
    symmetric: bool = True,
    accuracy_level: int | None = None,
    nodes_to_exclude: Sequence[str] = (),
    embeddings: bool = False,
) -> QuantizationResult:
    """4-bit weight-only quantisation: MatMul weights become ``com.microsoft.MatMulNBits``
    (int4 blocks of ``block_size`` along the input dimension, one scale per block), and with
    ``embeddings`` the tables of constant Gathers ``com.microsoft.GatherBlockQuantized`` (blocks
    along the hidden dimension).

    Activations stay float, so no calibration is needed; the weights shrink ~7x. Only MatMuls
    whose constant weight has at least ``min_elements`` entries are quantised: small weights
    (the ``r``-wide factors of a low-rank pair at small rank) save little and lose the most.

    Args:
        source: fp32 ONNX file.
        target: Where the quantised ONNX file goes.
        block_size: Weights per scale: 32 (more accurate) to 128 (smaller); a power of 2, >= 16.
        min_elements: Skip MatMuls whose weight has fewer entries.
        symmetric: Symmetric blocks (no zero point).
        accuracy_level: ``MatMulNBits`` compute type on CPU (``4`` = int8 activations, fastest;
            ``None`` = float).
        nodes_to_exclude: Node names kept in float.
        embeddings: Quantise embedding tables (Gather on a constant) as well.

    Returns:
        Settings used, the nodes skipped, and the MatMulNBits count.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from lrt_deploy.graph.index import GraphIndex

    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of 2 of at least 16, got {block_size}")
    model = onnx.load(str(source))
    index = GraphIndex(model.graph)
    small = [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul"
        and (weight := index.constant(node.input[1])) is not None
        and weight.size < min_elements
    ]
    excluded = sorted({*nodes_to_exclude, *small})
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        nodes_to_exclude=excluded,
        **({"op_types_to_quantize": ("MatMul", "Gather"),
            "quant_axes": (("MatMul", 0), ("Gather", 1))} if embeddings else {}),
    )
    # ORT's quantisers log hints on the root logger; its Gather path divides all-zero blocks
    # (a padding row) by a zero scale before np.where discards the result.
    with quiet_loggers(""), np.errstate(divide="ignore", invalid="ignore"):
        quantizer.process()
    if embeddings:
        _pack_int4_tables(quantizer.model.model)
    quantizer.model.save_model_to_file(str(target))
    before, after = op_counts(source), op_counts(target)
    result = QuantizationResult(
        mode="weight-only",
        per_channel=False,
        weight_type="int4",
        quantized_ops=_quantized_ops(target),
        changes=count_changes(before, after),
        excluded_nodes=excluded,
        settings={
            "block_size": block_size,
            "symmetric": symmetric,
            "accuracy_level": accuracy_level,
            "min_elements": min_elements,
            "embeddings": embeddings,
        },
    )
    logger.info("quantised weights to 4 bits (block %d): %s", block_size, result.quantized_ops)
    return result


# Weights int8 weight-only stores int8 and dequantises with ``DequantizeLinear``: (domain,
# op_type) -> (input index, axis of the per-channel scale in the weight, axis of the scale in
# what DequantizeLinear dequantises). The packed-QKV Attention dequantises its whole [K, 3H]
# weight per output column; a Gather gathers int8 rows and dequantises only them, per column
# (the last axis), so the table stays int8 in memory too. MatMul weights are not here: a
# DequantizeLinear -> MatMul pair is what ONNX Runtime's extended optimisations fuse into
# MatMulNBits with int8 *activations* (accuracy_level 4), so they become MatMulNBits at once,
# with float compute.
_DEQUANTIZED_WEIGHTS: dict[tuple[str, str], tuple[int, int, int]] = {
    ("com.microsoft", "Attention"): (1, 1, 1),
    ("", "Gather"): (0, 1, -1),
}


def quantize_weights_int8(
    source: str | Path,
    target: str | Path,
    *,
    block_size: int = 128,
    min_elements: int = 1024,
) -> QuantizationResult:
    """Int8 weight-only quantisation, activations float: MatMul weights become 8-bit
    ``com.microsoft.MatMulNBits`` (blocks of ``block_size`` along the input dimension, float
    compute), and the packed-QKV ``Attention`` and embedding ``Gather`` weights are stored
    int8 (symmetric, one scale per column) behind a standard ``DequantizeLinear``.

    Why it exists: dynamic int8 (:func:`quantize_int8`) rounds every activation tensor to int8
    at run time, which turns the last-bit differences between two builds' float kernels
    (x86 against WebAssembly or ARM) into whole int8 steps that grow layer by layer, up to
    cosine ~0.998 between runtimes. With float activations two builds differ by float
    rounding only. The file is about as small as dynamic int8's; the matmuls run in float.

    Args:
        source: fp32 ONNX file.
        target: Where the quantised ONNX file goes.
        block_size: MatMul weights per scale; a power of 2, >= 16.
        min_elements: Weights with fewer entries stay fp32 (they save little).

    Returns:
        The settings used and which ops changed.
    """
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from lrt_deploy.graph.index import GraphIndex

    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of 2 of at least 16, got {block_size}")
    model = onnx.load(str(source))
    index = GraphIndex(model.graph)
    small = sorted(
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul"
        and (weight := index.constant(node.input[1])) is not None
        and weight.size < min_elements
    )
    # accuracy_level None: the kernel computes in float (4 would quantise activations again).
    quantizer = MatMulNBitsQuantizer(
        model, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=None,
        nodes_to_exclude=small,
    )
    with quiet_loggers(""):  # ORT's quantisers log hints on the root logger
        quantizer.process()
    model = quantizer.model.model
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    quantized: dict[str, tuple[str, str]] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        rule = _DEQUANTIZED_WEIGHTS.get((node.domain or "", node.op_type))
        slot = rule[0] if rule else len(node.input)
        weight = initializers.get(node.input[slot]) if slot < len(node.input) else None
        if (rule is None or weight is None or weight.data_type != onnx.TensorProto.FLOAT
                or len(weight.dims) != 2 or int(np.prod(weight.dims)) < min_elements):
            new_nodes.append(node)
            continue
        _, weight_axis, dq_axis = rule
        name = weight.name
        if name not in quantized:
            q_values, scale = _symmetric_int8(numpy_helper.to_array(weight), weight_axis)
            quantized[name] = (f"{name}_int8", f"{name}_int8_scale")
            graph.initializer.append(numpy_helper.from_array(q_values, quantized[name][0]))
            graph.initializer.append(numpy_helper.from_array(scale, quantized[name][1]))
        q_name, s_name = quantized[name]
        rewritten = onnx.NodeProto()
        rewritten.CopyFrom(node)
        if node.op_type == "Gather":
            # Gather int8 rows, then dequantise only those rows.
            rewritten.input[slot] = q_name
            rewritten.output[0] = f"{node.output[0]}_int8"
            new_nodes += [rewritten, helper.make_node(
                "DequantizeLinear", [rewritten.output[0], s_name], [node.output[0]],
                name=f"{node.name}_dequantize", axis=dq_axis,
            )]
        else:
            dequantized = f"{node.name}_{name}_dequantized"
            rewritten.input[slot] = dequantized
            new_nodes += [helper.make_node(
                "DequantizeLinear", [q_name, s_name], [dequantized],
                name=f"{node.name}_weight_dequantize", axis=dq_axis,
            ), rewritten]
    # The fp32 originals go once nothing reads them any more.
    used = {name for node in new_nodes for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(new_nodes)
    onnx.save(model, str(target))
    before, after = op_counts(source), op_counts(target)
    result = QuantizationResult(
        mode="weight-only",
        per_channel=True,
        weight_type="int8",
        quantized_ops=_quantized_ops(target),
        changes=count_changes(before, after),
        excluded_nodes=small,
        settings={"block_size": block_size, "min_elements": min_elements,
                  "dequantized_weights": len(quantized)},
    )
    logger.info("quantised weights to int8 (weight-only): %s", result.quantized_ops)
    return result


def _symmetric_int8(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``values`` as int8 in [-127, 127] with one fp32 scale per index of ``axis``."""
    other = 1 - axis
    peak = np.abs(values).max(axis=other)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    shape = [1, 1]
    shape[axis] = -1
    quantized = np.clip(np.rint(values / scale.reshape(shape)), -127, 127).astype(np.int8)
    return quantized, scale
