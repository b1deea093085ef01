"""Make an exported ONNX file depend only on the model, not on where or by whom it was built.

What varies, found by exporting the same tiny model twice from different places:

* The dynamo exporter stores each node's Python stack trace in ``pkg.torch.onnx.stack_trace``
  metadata: absolute file paths (checkout, virtual environment) and line numbers of our own
  sources, so moving the checkout or editing an unrelated line changes the bytes, and the file
  leaks local paths. Two exports from the same place are byte-identical.
* The TorchScript exporter writes similar traces into node ``doc_string`` fields.
* ORT-format (``.ort``) files are not byte-identical between two conversions of the same
  ``.onnx`` even in one process: ONNX Runtime serialises the kernel type-string tables from an
  unordered map, so the flatbuffer's table offsets change while the content read back (ops,
  opsets, kernels) is identical. That is inside ONNX Runtime's writer and is not normalised here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["VOLATILE_METADATA_KEYS", "NormalizationResult", "normalize_for_reproducibility"]

logger = logging.getLogger(__name__)

VOLATILE_METADATA_KEYS = ("pkg.torch.onnx.stack_trace",)


@dataclass(frozen=True)
class NormalizationResult:
    """What :func:`normalize_for_reproducibility` removed."""

    metadata_removed: int
    doc_strings_cleared: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "metadata_removed": self.metadata_removed,
            "doc_strings_cleared": self.doc_strings_cleared,
        }


def normalize_for_reproducibility(
    model_path: str | Path,
    target: str | Path | None = None,
    *,
    volatile_keys: tuple[str, ...] = VOLATILE_METADATA_KEYS,
) -> NormalizationResult:
    """Strip build-environment details from an ONNX file: volatile node metadata (stack traces
    with absolute paths), every ``doc_string``, and the order of opset imports.

    The graph's computation, names and the exporter's module-scope metadata (``namespace``,
    ``class_hierarchy``) are kept. Weights in an external-data file are left where they are.

    Args:
        model_path: ONNX file to normalise.
        target: Where to write the result (default: overwrite ``model_path``).
        volatile_keys: Node/value metadata keys to drop.

    Returns:
        Counts of what was removed.
    """
    import onnx

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    removed = cleared = 0
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        if graph.doc_string:
            graph.ClearField("doc_string")
            cleared += 1
        items = [*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer]
        for item in items:
            if item.doc_string:
                item.ClearField("doc_string")
                cleared += 1
            keep = [p for p in item.metadata_props if p.key not in volatile_keys]
            if len(keep) != len(item.metadata_props):
                removed += len(item.metadata_props) - len(keep)
                del item.metadata_props[:]
                item.metadata_props.extend(keep)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    if model.doc_string:
        model.ClearField("doc_string")
        cleared += 1
    opsets = sorted(model.opset_import, key=lambda o: (o.domain, o.version))
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    onnx.save(model, str(target or model_path))
    result = NormalizationResult(removed, cleared)
    logger.info("normalised %s: %d metadata entries, %d doc strings removed", model_path.name,
                removed, cleared)
    return result
