"""Fold each low-rank pair of an ONNX graph into one dense op: the dense-equivalent baseline.

A model trained low-rank by design (every large Linear an encoder ``E`` then a decoder ``D``)
exports as ``MatMul(x, E) -> MatMul(., D) [-> Add bias]``. Its dense equivalent, the same
function at full-rank cost, is ``MatMul(x, E @ D) [-> Add bias]``. Built on the graph rather
than on the module so it also works for TorchScript archives and ``torch.export`` programs whose
module classes are gone.

A pair is folded when:

* the first op is ``MatMul(x, E)``, ``Gemm(x, E)`` (no bias, ``alpha = 1``, ``transA = 0``) or
  ``Gather(T, ids)`` (a low-rank embedding's code table, axis 0), with ``E``/``T`` a constant
  2-D weight (an initializer, a ``Constant``, or either behind a ``Transpose``);
* its output is read by exactly one node and is not a graph output;
* that node is ``MatMul(., D)`` or ``Gemm(., D[, C])`` (``transA = 0``) with ``D`` constant 2-D;
* the bottleneck ``r`` is below ``min(in, out)`` (otherwise it is two dense layers, not a
  low-rank unit, and multiplying out would not make a full-rank baseline of it).

Any bias ``Add`` after the pair is left as it is; a ``Gemm`` keeps its ``C``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lrt_deploy.graph.external_data import load_model_proto, save_model_proto
from lrt_deploy.graph.index import GraphIndex
from lrt_deploy.graph.ops import count_changes, op_counts

if TYPE_CHECKING:
    from lrt_deploy.load import LoadedModel

__all__ = [
    "ByDesignBaseline",
    "FoldResult",
    "by_design_baseline",
    "dense_equivalent_onnx",
    "fold_lowrank_pairs",
]

logger = logging.getLogger(__name__)


@dataclass
class FoldResult:
    """What :func:`dense_equivalent_onnx` did, for the report.

    Attributes:
        pairs: Low-rank pairs multiplied out.
        folded: Per folded pair: the first and second node names, ``rank`` and ``shape``
            (in, out).
        params_before: Weight elements of the folded pairs' factors.
        params_after: Weight elements of the dense products that replaced them.
        changes: Per op type, nodes added (+) or removed (-).
    """

    pairs: int
    folded: list[dict[str, Any]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    changes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "folded": self.folded,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "op_changes": self.changes,
        }


def _weight(index: GraphIndex, name: str) -> np.ndarray | None:
    """A constant 2-D float weight, looking through one ``Transpose`` the exporter may leave."""
    value = index.constant(name)
    if value is None:
        node = index.producer.get(name)
        if node is None or node.op_type != "Transpose":
            return None
        value = index.constant(node.input[0])
        if value is None:
            return None
        perm = index.attribute(node, "perm", None)
        value = value.transpose(perm) if perm is not None else value.T
    if value.ndim != 2 or value.dtype.kind != "f":
        return None
    return value


def _gemm_ok(index: GraphIndex, node: Any) -> bool:
    return index.attribute(node, "transA", 0) == 0


def _first_factor(index: GraphIndex, node: Any) -> np.ndarray | None:
    """The ``in x r`` (or embedding ``n x r``) factor of a pair's first op, oriented."""
    if node.op_type == "MatMul" and len(node.input) == 2:
        return _weight(index, node.input[1])
    if node.op_type == "Gemm":
        if not _gemm_ok(index, node) or index.attribute(node, "alpha", 1.0) != 1.0:
            return None
        if len(node.input) > 2 and node.input[2]:
            return None  # a bias between the factors: not a low-rank unit
        weight = _weight(index, node.input[1])
        if weight is not None and index.attribute(node, "transB", 0):
            weight = weight.T
        return weight
    if node.op_type == "Gather" and index.attribute(node, "axis", 0) == 0:
        return _weight(index, node.input[0])
    return None


def _second_factor(index: GraphIndex, node: Any, first: Any) -> np.ndarray | None:
    """The ``r x out`` factor of a pair's second op, oriented."""
    if node.op_type == "MatMul" and node.input[0] == first.output[0]:
        return _weight(index, node.input[1])
    if node.op_type == "Gemm" and node.input[0] == first.output[0] and _gemm_ok(index, node):
        if first.op_type == "Gather" and len(node.input) > 2 and node.input[2]:
            return None
        weight = _weight(index, node.input[1])
        if weight is not None and index.attribute(node, "transB", 0):
            weight = weight.T
        return weight
    return None


def _unique_name(index: GraphIndex, base: str) -> str:
    taken = set(index.initializers) | set(index.producer)
    name, suffix = base, 1
    while name in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    return name


def fold_lowrank_pairs(model: Any) -> FoldResult:
    """Multiply out every low-rank pair of ``model``'s main graph, in place.

    Args:
        model: An ``onnx.ModelProto`` as the exporter wrote it (before ORT optimisation,
            which may fuse the decoder's bias into other ops).

    Returns:
        How many pairs were folded and which.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    index = GraphIndex(graph)
    result = FoldResult(pairs=0)
    # Outputs of nodes already folded away: a chain x @ A @ B @ C folds (A, B) once, and the
    # stale B of the snapshot must not then pair with C.
    gone: set[str] = set()
    for first in list(graph.node):
        if first.op_type not in ("MatMul", "Gemm", "Gather") or first.output[0] in gone:
            continue
        factor_in = _first_factor(index, first)
        second = index.only_consumer(first.output[0])
        if factor_in is None or second is None:
            continue
        factor_out = _second_factor(index, second, first)
        if factor_out is None or factor_in.shape[1] != factor_out.shape[0]:
            continue
        rank = factor_in.shape[1]
        size_in, size_out = factor_in.shape[0], factor_out.shape[1]
        if rank >= min(size_in, size_out):
            continue
        embedding = first.op_type == "Gather"
        # float64 product: the folded weight should differ from the factors only by one
        # final rounding, so the baseline's fidelity to the low-rank model is ~1.0.
        product = (factor_in.astype(np.float64) @ factor_out.astype(np.float64)).astype(
            factor_in.dtype
        )
        weight_name = _unique_name(index, f"{second.name or second.output[0]}_dense_weight")
        graph.initializer.append(numpy_helper.from_array(product, weight_name))
        if embedding:
            node = helper.make_node(
                "Gather", [weight_name, first.input[1]], list(second.output),
                name=f"{first.name}_dense", axis=0,
            )
        else:
            attributes = {
                attr.name: helper.get_attribute_value(attr) for attr in second.attribute
            }
            if second.op_type == "Gemm":
                attributes["transB"] = 0
            inputs = [first.input[0], weight_name, *second.input[2:]]
            node = helper.make_node(
                second.op_type, inputs, list(second.output), name=f"{second.name}_dense",
                **attributes,
            )
        gone.update([first.output[0], second.output[0]])
        index.replace_node(second, node)
        graph.node.remove(first)
        index.rebuild()
        result.pairs += 1
        result.params_before += factor_in.size + factor_out.size
        result.params_after += product.size
        result.folded.append({
            "first": first.name, "second": second.name, "rank": int(rank),
            "shape": [int(size_in), int(size_out)],
        })
    if result.pairs:
        index.remove_dead_nodes()
    logger.info("dense equivalent: folded %d low-rank pairs (%d -> %d weights)", result.pairs,
                result.params_before, result.params_after)
    return result


def dense_equivalent_onnx(source: str | Path, target: str | Path) -> FoldResult:
    """Write the dense equivalent of the ONNX model at ``source`` to ``target``.

    Run it on the raw export of a by-design low-rank model; then optimise, quantise and
    measure ``target`` exactly as the low-rank graph is.

    Args:
        source: The low-rank model's ONNX file (external data beside it is read).
        target: Where the dense-equivalent graph goes (external data when large).

    Returns:
        What was folded, with op-count changes.
    """
    source, target = Path(source), Path(target)
    model = load_model_proto(source)
    result = fold_lowrank_pairs(model)
    save_model_proto(model, target)
    result.changes = count_changes(op_counts(source), op_counts(target))
    return result


@dataclass
class ByDesignBaseline:
    """The baseline to build for a model that is low-rank (or Linformer) by design.

    Attributes:
        kind: ``"dense-equivalent"`` (low-rank pairs multiplied out: the same function),
            ``"standard-attention"`` (Linformer replaced: a different function) or
            ``"dense-equivalent+standard-attention"`` (both).
        note: What the report says about the baseline (see ``lrt_deploy.nn.equivalents``).
        fidelity_comparable: False when the baseline computes a different function, so the
            report must print "not comparable" instead of a cosine.
        loaded: The baseline as a model to export like any other, or None when it must be
            made on the graph: export the by-design model, then :func:`dense_equivalent_onnx`
            on its raw ONNX (TorchScript and ``.pt2`` inputs, whose module classes are gone).
        units: Low-rank units multiplied out and Linformer attentions replaced in ``loaded``
            (the ONNX path counts its pairs in :class:`FoldResult` instead).
    """

    kind: str
    note: str
    fidelity_comparable: bool
    loaded: LoadedModel | None
    units: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "note": self.note,
            "fidelity_comparable": self.fidelity_comparable,
            "made_from": "module" if self.loaded is not None else "onnx graph",
            "units": self.units,
        }


def by_design_baseline(loaded: LoadedModel) -> ByDesignBaseline | None:
    """Plan the dense baseline of a model built with low-rank layers or Linformer attention.

    Args:
        loaded: The model as loaded (not factorized by lrt-deploy).

    Returns:
        None when the model has neither; else what to build and how to label it.
    """
    import torch

    from lrt_deploy.nn import LinformerSelfAttention, is_lowrank_pair, lowrank_layers_in_weights
    from lrt_deploy.nn.equivalents import (
        DENSE_EQUIVALENT_NOTE,
        STANDARD_ATTENTION_NOTE,
        dense_equivalent,
        standard_attention_equivalent,
    )

    module = loaded.module
    if loaded.can_compress:
        has_linformer = any(isinstance(m, LinformerSelfAttention) for m in module.modules())
        if not has_linformer and not any(is_lowrank_pair(m) for m in module.modules()):
            return None  # an ordinary dense model: nothing to copy
        standard, attentions = (
            standard_attention_equivalent(module) if has_linformer else (module, 0)
        )
        # dense_equivalent copies again; the first copy (if any) is dropped right away.
        dense, pairs = dense_equivalent(standard)
        kinds = (["dense-equivalent"] if pairs else []) + (
            ["standard-attention"] if attentions else [])
        notes = ([DENSE_EQUIVALENT_NOTE] if pairs else []) + (
            [STANDARD_ATTENTION_NOTE] if attentions else [])
        return ByDesignBaseline(
            kind="+".join(kinds), note="; ".join(notes), fidelity_comparable=not attentions,
            loaded=dataclasses.replace(loaded, module=dense), units=pairs + attentions,
        )
    if isinstance(module, torch.export.ExportedProgram):
        state = dict(module.state_dict)
    else:
        state = dict(module.state_dict()) if callable(getattr(module, "state_dict", None)) else {}
    if not lowrank_layers_in_weights(state):
        return None
    return ByDesignBaseline(
        kind="dense-equivalent", note=DENSE_EQUIVALENT_NOTE, fidelity_comparable=True,
        loaded=None,
    )
