"""Where a model's bytes go: embeddings, attention, feed-forward (FFN) and the rest.

Exported graphs name most weights anonymously (``val_150_quantized``), so each initializer is
classified by what the graph does with it, with its name used only when it says something:

- a table read by ``Gather`` (or ``EmbedLayerNormalization``) is **embeddings**; so are the
  weights of a ``MatMul`` fed straight by such a ``Gather`` (a factorized embedding E·D);
- a weight whose node reaches ``MultiHeadAttention`` / ``Attention`` / ``Softmax`` downstream
  (query/key/value projections) or is fed by it upstream (output projection) is **attention**;
- the same with ``Gelu`` / ``BiasGelu`` / ``FastGelu`` / ``Erf`` / ``Relu`` is **FFN**;
- everything else (LayerNorm scales, pooler, classifier, ...) is **other**.

Walks stop at normalisation nodes, which separate the blocks of a transformer, so an output
projection is not mistaken for the next block's input projection. Both low-rank factors of a
pair are classified like the dense layer they replace. Needs ``onnx`` (export extra).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict, deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["COMPONENTS", "size_by_component"]

logger = logging.getLogger(__name__)

#: Component names, in display order.
COMPONENTS = ("embeddings", "attention", "ffn", "other")

_ATTENTION_OPS = frozenset(
    {"MultiHeadAttention", "Attention", "QAttention", "Softmax", "GroupQueryAttention"}
)
_FFN_OPS = frozenset({"Gelu", "BiasGelu", "FastGelu", "Erf", "Relu", "QuickGelu", "Sigmoid"})
_EMBEDDING_OPS = frozenset({"Gather", "GatherBlockQuantized", "EmbedLayerNormalization"})
# Normalisation separates transformer blocks: walks do not cross it.
_BOUNDARY_OPS = frozenset(
    {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
     "SkipSimplifiedLayerNormalization", "EmbedLayerNormalization"}
)
_MAX_STEPS = 8
_NAME_HINTS = (
    ("embeddings", "embeddings"),
    ("layernorm", "other"),
    ("layer_norm", "other"),
    ("attention", "attention"),
    ("intermediate", "ffn"),
    ("mlp", "ffn"),
    ("ffn", "ffn"),
)


def _name_hint(name: str) -> str | None:
    lowered = name.lower()
    for needle, component in _NAME_HINTS:
        if needle in lowered:
            return component
    return None


class _Graph:
    def __init__(self, graph: Any) -> None:
        self.nodes = list(graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for index, node in enumerate(self.nodes):
            for name in node.output:
                self.producer[name] = index
            for name in node.input:
                if name:
                    self.consumers[name].append(index)

    def distance(self, start: int, targets: frozenset[str], *, forward: bool) -> int | None:
        """Steps from node ``start`` to the nearest node of a ``targets`` op type, or None."""
        seen = {start}
        queue = deque([(start, 0)])
        while queue:
            index, steps = queue.popleft()
            node = self.nodes[index]
            if steps and node.op_type in targets:
                return steps
            if steps >= _MAX_STEPS or (steps and node.op_type in _BOUNDARY_OPS):
                continue
            if forward:
                neighbours = [c for name in node.output for c in self.consumers.get(name, [])]
                # The value projection meets Softmax only as a sibling input of the
                # probabilities x V MatMul; look one step upstream of every node reached.
                if steps and any(
                    self.nodes[self.producer[name]].op_type in targets
                    for name in node.input
                    if name in self.producer
                ):
                    return steps + 1
            else:
                neighbours = [self.producer[name] for name in node.input if name in self.producer]
            for neighbour in neighbours:
                if neighbour not in seen:
                    seen.add(neighbour)
                    queue.append((neighbour, steps + 1))
        return None

    def classify_node(self, index: int) -> str:
        node = self.nodes[index]
        if node.op_type in _EMBEDDING_OPS:
            return "embeddings"
        if node.op_type in _ATTENTION_OPS:
            return "attention"
        if node.op_type in _FFN_OPS:
            return "ffn"
        if node.op_type in _BOUNDARY_OPS:
            return "other"
        candidates = []
        for component, ops in (("attention", _ATTENTION_OPS), ("ffn", _FFN_OPS)):
            for forward in (True, False):
                steps = self.distance(index, ops, forward=forward)
                if steps is not None:
                    candidates.append((steps, component))
        if candidates:
            return min(candidates)[1]
        # Reaching neither attention nor FFN before the next LayerNorm, a MatMul just after a
        # Gather is the second factor of a factorized embedding table.
        upstream_gather = self.distance(index, frozenset({"Gather"}), forward=False)
        if upstream_gather is not None and upstream_gather <= 2:
            return "embeddings"
        return "other"


def _initializer_bytes(tensor: Any) -> int:
    from onnx import helper

    count = 1
    for dim in tensor.dims:
        count *= dim
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return count * dtype.itemsize


def _classify(graph: _Graph, name: str) -> str:
    hint = _name_hint(name)
    if hint is not None:
        return hint
    votes = [graph.classify_node(index) for index in graph.consumers.get(name, [])]
    votes = [vote for vote in votes if vote != "other"] or votes
    return max(set(votes), key=votes.count) if votes else "other"


def size_by_component(model_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Split an ONNX model's size into embeddings / attention / FFN / other.

    Sizes are the in-memory bytes of the initializers (what the weights occupy once loaded).
    The graph structure, names and metadata are counted in ``other``, so the four
    components add up to ``file_bytes`` (plus external data, if any).

    Args:
        model_path: A ``.onnx`` file (not ``.ort``: give the bundle's ``model.onnx``, which
            holds the same weights).

    Returns:
        ``{"embeddings": bytes, "attention": bytes, "ffn": bytes, "other": bytes,
        "file_bytes": bytes, "initializer_bytes": bytes, "graph_bytes": bytes}``.
    """
    import onnx

    path = Path(model_path)
    model = onnx.load(str(path), load_external_data=False)
    graph = _Graph(model.graph)
    sizes = dict.fromkeys(COMPONENTS, 0)
    tensors: Iterable[Any] = model.graph.initializer
    for tensor in tensors:
        sizes[_classify(graph, tensor.name)] += _initializer_bytes(tensor)
    # Constant nodes hold weights too in some exports.
    for index, node in enumerate(graph.nodes):
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    component = _classify(graph, node.output[0])
                    if component == "other":
                        component = graph.classify_node(index)
                    sizes[component] += _initializer_bytes(attribute.t)
    initializer_bytes = sum(sizes.values())
    file_bytes = path.stat().st_size
    external = sum(
        p.stat().st_size for p in path.parent.glob(path.name + ".data") if p.is_file()
    )
    graph_bytes = max(file_bytes + external - initializer_bytes, 0)
    sizes["other"] += graph_bytes
    logger.info("size by component of %s: %s", path, sizes)
    return {
        **sizes,
        "file_bytes": file_bytes + external,
        "initializer_bytes": initializer_bytes,
        "graph_bytes": graph_bytes,
    }
