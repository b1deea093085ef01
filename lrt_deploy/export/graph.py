"""Small helpers over ONNX graphs shared by the passes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["op_counts", "count_changes", "default_opset", "model_bytes"]


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
