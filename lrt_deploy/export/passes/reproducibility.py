"""Make an exported ONNX file depend only on the model, not on where or by whom it was built.

The dynamo exporter stores each node's Python stack trace (absolute paths of the checkout and
virtual environment) in ``pkg.torch.onnx.stack_trace`` metadata, the TorchScript exporter in
``doc_string`` fields; both are dropped. ORT-format files still differ between two conversions
(ONNX Runtime writes its kernel type-string tables from an unordered map): not normalised here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lrt_deploy.graph.passes import PassContext, PassResult

__all__ = ["VOLATILE_METADATA_KEYS", "NormalizeForReproducibility", "normalize_for_reproducibility"]

logger = logging.getLogger(__name__)

VOLATILE_METADATA_KEYS = ("pkg.torch.onnx.stack_trace",)


@dataclass(frozen=True)
class NormalizeForReproducibility:
    """Pass: strip stack traces, doc strings and opset order; the computation is unchanged."""

    volatile_keys: tuple[str, ...] = VOLATILE_METADATA_KEYS
    name = "normalize"

    def run(self, model: Path, context: PassContext) -> PassResult:
        """Write ``model`` normalised to ``context.output`` (which may be ``model`` itself)."""
        return normalize_for_reproducibility(model, context.output,
                                             volatile_keys=self.volatile_keys)


def normalize_for_reproducibility(
    model_path: str | Path,
    target: str | Path | None = None,
    *,
    volatile_keys: tuple[str, ...] = VOLATILE_METADATA_KEYS,
) -> PassResult:
    """Drop ``volatile_keys`` metadata, every ``doc_string`` and the opset order of
    ``model_path`` into ``target`` (default: in place); external weights stay where they are.

    ``details``: ``metadata_removed`` and ``doc_strings_cleared``.
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
    output = Path(target or model_path)
    onnx.save(model, str(output))
    logger.info("normalised %s: %d metadata entries, %d doc strings removed", model_path.name,
                removed, cleared)
    details = {"metadata_removed": removed, "doc_strings_cleared": cleared}
    return PassResult(NormalizeForReproducibility.name, output, details)
