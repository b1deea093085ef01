"""Fold each low-rank pair of an ONNX graph into one dense op: the dense-equivalent baseline.

A model low-rank by design exports each large Linear as ``MatMul(x, E) -> MatMul(., D)``; its
dense equivalent, the same function at full-rank cost, is ``MatMul(x, E @ D)``. Folding the
graph, not the module, also serves TorchScript archives and ``.pt2`` programs. The folds are
onnxscript rewrite rules, one per (first, second) op pair:

* first ``MatMul(x, E)``, ``Gemm(x, E)`` (no bias, ``alpha = 1``, ``transA = 0``) or
  ``Gather(T, ids)`` (a low-rank embedding's code table, axis 0);
* second ``MatMul(., D)`` or ``Gemm(., D[, C])`` (``transA = 0``; no ``C`` after a Gather);
* ``E``/``T`` and ``D`` constant 2-D float weights (initializer or ``Constant``, either maybe
  behind a ``Transpose``), the first op's output read only by the second and not a graph output;
* the bottleneck ``r`` below ``min(in, out)`` (else it is two dense layers, not a low-rank unit).

A bias ``Add`` after the pair is left as it is; a ``Gemm`` keeps its ``C``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lrt_deploy.graph.external_data import load_model_proto, save_model_proto
from lrt_deploy.graph.index import GraphIndex
from lrt_deploy.graph.ops import count_changes, op_counts
from lrt_deploy.graph.passes import PassContext, PassResult

__all__ = [
    "DenseEquivalentFold",
    "FoldResult",
    "dense_equivalent_onnx",
    "fold_lowrank_pairs",
    "lowrank_pair_rules",
]

logger = logging.getLogger(__name__)

_FIRST_OPS = ("MatMul", "Gemm", "Gather")
_SECOND_OPS = ("MatMul", "Gemm")


@dataclass
class FoldResult:
    """What folding did: pairs folded, per pair ``first``/``second`` node names, ``rank`` and
    ``shape`` (in, out), weight elements of the factors and of their products, op changes."""

    pairs: int = 0
    folded: list[dict[str, Any]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    op_changes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DenseEquivalentFold:
    """Pass: multiply out every low-rank pair; ``details`` are :class:`FoldResult`'s fields."""

    name = "dense_equivalent"

    def run(self, model: Path, context: PassContext) -> PassResult:
        """Write the dense equivalent of ``model`` (a raw export) to ``context.output``."""
        context.progress(
            "multiplying out the low-rank pairs of the exported graph (dense equivalent)")
        fold = dense_equivalent_onnx(model, context.output)
        return PassResult(self.name, context.output, fold.to_dict())


def _weight(value: Any) -> np.ndarray | None:
    """A constant 2-D float weight, looking through one ``Transpose`` the exporter may leave."""
    if value is None:
        return None
    if value.const_value is not None:
        array = value.const_value.numpy()
    else:
        node = value.producer()
        if node is None or node.op_type != "Transpose" or node.inputs[0] is None:
            return None
        source = node.inputs[0].const_value
        if source is None:
            return None
        perm = node.attributes.get_ints("perm")
        array = source.numpy().transpose(perm) if perm is not None else source.numpy().T
    if array.ndim != 2 or array.dtype.kind != "f":
        return None
    return array


def _int(node: Any, name: str, default: int = 0) -> int:
    return node.attributes.get_int(name, default)


def _gemm_weight(node: Any) -> np.ndarray | None:
    """``node``'s second input oriented as ``(in, out)``, if a plain ``transA = 0`` Gemm's."""
    if _int(node, "transA") != 0:
        return None
    weight = _weight(node.inputs[1])
    return weight.T if weight is not None and _int(node, "transB") else weight


def _factors(first: Any, second: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The pair's ``in x r`` and ``r x out`` factors when it is a low-rank unit, else None."""
    if first.op_type == "MatMul":
        factor_in = _weight(first.inputs[1])
    elif first.op_type == "Gemm":
        plain = first.attributes.get_float("alpha", 1.0) == 1.0
        factor_in = _gemm_weight(first) if plain else None
    else:
        factor_in = _weight(first.inputs[0]) if _int(first, "axis") == 0 else None
    if second.op_type == "MatMul":
        factor_out = _weight(second.inputs[1])
    elif first.op_type == "Gather" and (
        len(second.inputs) > 2 or second.attributes.get_float("alpha", 1.0) != 1.0
    ):
        factor_out = None  # a Gather has no place for the Gemm's bias or scale
    else:
        factor_out = _gemm_weight(second)
    if factor_in is None or factor_out is None or factor_in.shape[1] != factor_out.shape[0]:
        return None
    if factor_in.shape[1] >= min(factor_in.shape[0], factor_out.shape[1]):
        return None
    return factor_in, factor_out


def _unique_name(node: Any, base: str) -> str:
    graph = node.graph
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs}
    name, suffix = base, 1
    while name in taken:
        suffix += 1
        name = f"{base}_{suffix}"
    return name


def lowrank_pair_rules(record: FoldResult) -> list[Any]:
    """One onnxscript rewrite rule per (first, second) op pair, each adding its folds to
    ``record``."""
    from onnxscript.rewriter import RewriteRule

    pairs = [_LowRankPair(first, second, record) for first in _FIRST_OPS for second in _SECOND_OPS]
    return [RewriteRule(p.pattern, p.rewrite, p.check, name=p.name) for p in pairs]


@dataclass(frozen=True)
class _LowRankPair:
    """Pattern, check and rewrite of ``first(x, E) -> second(., D)`` to one op with ``E @ D``."""

    first: str
    second: str
    record: FoldResult

    @property
    def name(self) -> str:
        return f"fold_{self.first}_{self.second}".lower()

    def pattern(self, op: Any, x: Any, first_weight: Any, second_weight: Any) -> Any:
        if self.first == "Gather":
            hidden = op.Gather(first_weight, x, _outputs=["hidden"])
        else:
            hidden = getattr(op, self.first)(x, first_weight, _outputs=["hidden"])
        return getattr(op, self.second)(
            hidden, second_weight, _allow_other_inputs=True, _outputs=["out"]
        )

    def check(self, context: Any, hidden: Any, out: Any, **_: Any) -> bool:
        return _factors(hidden.producer(), out.producer()) is not None

    def rewrite(self, op: Any, x: Any, hidden: Any, out: Any, **_: Any) -> Any:
        import onnx_ir as ir

        first, second = hidden.producer(), out.producer()
        factors = _factors(first, second)
        assert factors is not None  # check() accepted this match
        factor_in, factor_out = factors
        # float64 product: the folded weight differs from the factors by one final rounding,
        # so the baseline's fidelity to the low-rank model is ~1.0.
        product = (factor_in.astype(np.float64) @ factor_out.astype(np.float64)).astype(
            factor_in.dtype)
        name = _unique_name(second, f"{second.name or out.name}_dense_weight")
        weight = op.initializer(ir.tensor(product, name=name), name=name)
        self._record(first, second, factor_in, factor_out)
        if first.op_type == "Gather":
            return op.Gather(weight, x, axis=0, _name=f"{first.name or ''}_dense")
        attributes: dict[str, Any] = dict(second.attributes)
        if second.op_type == "Gemm":
            attributes["transB"] = 0
        return getattr(op, second.op_type)(
            x, weight, *second.inputs[2:], _name=f"{second.name or ''}_dense", **attributes
        )

    def _record(self, first: Any, second: Any, factor_in: np.ndarray,
                factor_out: np.ndarray) -> None:
        record = self.record
        record.pairs += 1
        record.params_before += factor_in.size + factor_out.size
        record.params_after += factor_in.shape[0] * factor_out.shape[1]
        record.folded.append({
            "first": first.name or "", "second": second.name or "",
            "rank": int(factor_in.shape[1]),
            "shape": [int(factor_in.shape[0]), int(factor_out.shape[1])],
        })


def fold_lowrank_pairs(model: Any) -> FoldResult:
    """Multiply out every low-rank pair of ``model`` (an ``onnx.ModelProto`` as the exporter
    wrote it, before ORT fuses biases away), in place; unchanged when nothing folds."""
    import onnx_ir as ir
    from onnxscript.rewriter import RewriteRuleSet

    result = FoldResult()
    graph = ir.serde.deserialize_model(model)
    RewriteRuleSet(lowrank_pair_rules(result)).apply_to_model(graph)
    if result.pairs:
        folded = ir.serde.serialize_model(graph)
        GraphIndex(folded.graph).remove_dead_nodes()
        model.CopyFrom(folded)
    logger.info("dense equivalent: folded %d low-rank pairs (%d -> %d weights)", result.pairs,
                result.params_before, result.params_after)
    return result


def dense_equivalent_onnx(source: str | Path, target: str | Path) -> FoldResult:
    """Write the dense equivalent of the ONNX model at ``source`` (external data read) to
    ``target``; optimise, quantise and measure it exactly as the low-rank graph."""
    source, target = Path(source), Path(target)
    model = load_model_proto(source)
    result = fold_lowrank_pairs(model)
    save_model_proto(model, target)
    result.op_changes = count_changes(op_counts(source), op_counts(target))
    return result
