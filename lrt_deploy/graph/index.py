"""A read-mostly index over one ONNX graph for pattern-matching passes: who produces and who
consumes each tensor, constant values, and removal of nodes nothing depends on any more."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

__all__ = ["GraphIndex"]


class GraphIndex:
    """Producer/consumer maps of ``graph``'s top level (subgraphs are left alone).

    The maps reflect the graph when the index was built; after a rewrite call :meth:`rebuild`.
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.rebuild()

    def rebuild(self) -> None:
        """Recompute the maps after nodes were added or removed."""
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.graph_outputs = {value.name for value in self.graph.output}

    def parent(self, node: onnx.NodeProto, index: int) -> onnx.NodeProto | None:
        """The node producing ``node``'s ``index``-th input (``None`` for inputs/initializers)."""
        if index >= len(node.input):
            return None
        return self.producer.get(node.input[index])

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        """The single node reading ``name``, or ``None`` when zero or several do (or it is a
        graph output)."""
        readers = self.consumers.get(name, [])
        if len(readers) != 1 or name in self.graph_outputs:
            return None
        return readers[0]

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is an initializer or a ``Constant`` node's output."""
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def scalar(self, name: str) -> float | None:
        """``name``'s value when it is a constant holding exactly one number."""
        value = self.constant(name)
        if value is None or value.size != 1:
            return None
        return float(value.reshape(-1)[0])

    def rank(self, name: str) -> int | None:
        """Tensor rank from the graph's inputs/value_info, when recorded."""
        for value in [*self.graph.input, *self.graph.value_info, *self.graph.output]:
            if value.name == name and value.type.tensor_type.HasField("shape"):
                return len(value.type.tensor_type.shape.dim)
        return None

    def attribute(self, node: onnx.NodeProto, name: str, default: Any = None) -> Any:
        """The value of ``node``'s attribute ``name`` (``default`` when absent)."""
        from onnx import helper

        for attr in node.attribute:
            if attr.name == name:
                return helper.get_attribute_value(attr)
        return default

    def replace_node(self, old: onnx.NodeProto, new: onnx.NodeProto) -> None:
        """Put ``new`` where ``old`` stood (keeping topological order) and re-index."""
        nodes = list(self.graph.node)
        position = nodes.index(old)
        self.graph.node.remove(old)
        self.graph.node.insert(position, new)
        self.rebuild()

    def finish_contrib_fusion(self, model: onnx.ModelProto) -> None:
        """After fusing into ``com.microsoft`` ops: drop what the fused nodes replaced and make
        sure the model imports that domain."""
        from onnx import helper

        self.remove_dead_nodes()
        if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))

    def remove_dead_nodes(self) -> int:
        """Drop nodes none of whose outputs is read or a graph output, repeatedly, then drop
        initializers nothing reads. Returns the number of nodes removed."""
        removed = 0
        while True:
            used = {name for node in self.graph.node for name in node.input if name}
            used |= self.graph_outputs
            dead = [
                index for index, node in enumerate(self.graph.node)
                if not any(name in used for name in node.output if name)
            ]
            if not dead:
                break
            _delete_at(self.graph.node, dead)
            removed += len(dead)
        used = {name for node in self.graph.node for name in node.input if name}
        _delete_at(self.graph.initializer, [
            index for index, init in enumerate(self.graph.initializer) if init.name not in used
        ])
        live = {name for node in self.graph.node for name in node.output}
        _delete_at(self.graph.value_info, [
            index for index, value in enumerate(self.graph.value_info) if value.name not in live
        ])
        self.rebuild()
        return removed


def _delete_at(field: Any, indices: list[int]) -> None:
    # Deleting by index, last first: ``remove(message)`` compares messages by value, which is
    # slow for large initializers.
    for index in reversed(indices):
        del field[index]
