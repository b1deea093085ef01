"""Small helpers over ONNX graphs shared by the passes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["INLINE_LIMIT", "count_changes", "cpu_session", "default_opset", "model_bytes",
           "op_counts", "weighted_nodes", "with_outputs"]


def op_counts(path: str | Path) -> Counter[str]:
    """Node count per op type (subgraphs included) of the model at ``path``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: Counter[str] = Counter()
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            counts[node.op_type] += 1
            stack.extend(attr.g for attr in node.attribute if attr.HasField("g"))
    return counts


def count_changes(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    """Per op type, how many nodes a pass added (+) or removed (-); unchanged types left out."""
    return {
        op: after.get(op, 0) - before.get(op, 0)
        for op in sorted(set(before) | set(after))
        if after.get(op, 0) != before.get(op, 0)
    }


def model_bytes(path: str | Path) -> int:
    """Size on disk of a model file plus its external-data file, if any."""
    path = Path(path)
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)


def default_opset(model: Any) -> int:
    """The default-domain (``ai.onnx``) opset an ``onnx.ModelProto`` imports."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


# Above this an in-memory model is saved with external weights first (protobuf's 2 GB).
INLINE_LIMIT = 1_500_000_000


def cpu_session(model: Any, scratch: str | Path) -> Any:
    """A quiet CPU ``InferenceSession`` over an in-memory ``onnx.ModelProto``; a large model
    goes through ``scratch`` (a folder that must outlive the session) with external weights."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if model.ByteSize() > INLINE_LIMIT:
        path = Path(scratch) / "model.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location="model.data")
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def with_outputs(model: Any, names: list[str]) -> Any:
    """A copy of the ``onnx.ModelProto`` ``model`` that also returns the float tensors ``names``."""
    import onnx
    from onnx import TensorProto, helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    outputs = {value.name for value in copy.graph.output}
    for name in names:
        if name not in outputs:
            copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return copy


def weighted_nodes(model: Any, op_types: tuple[str, ...] = ("MatMul",)) -> list[tuple[Any, Any]]:
    """(node, weight) of each ``op_types`` node whose input 1 is a constant 2-D float weight."""
    import numpy as np

    from lrt_deploy.graph.index import GraphIndex

    index = GraphIndex(model.graph)
    found = []
    for node in model.graph.node:
        if node.op_type not in op_types or len(node.input) < 2:
            continue
        if node.op_type == "MatMul" and len(node.input) != 2:
            continue
        weight = index.constant(node.input[1])
        if weight is not None and weight.ndim == 2 and np.issubdtype(weight.dtype, np.floating):
            found.append((node, weight))
    return found
