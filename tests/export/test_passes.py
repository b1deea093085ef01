"""The export graph passes' one shape and the dense-equivalent folds as onnxscript rewrite rules,
each checked on a tiny graph against onnxruntime running the unfolded one."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lrt_deploy.export.build import export_passes  # noqa: E402
from lrt_deploy.export.passes.dense_equivalent import (  # noqa: E402
    DenseEquivalentFold,
    FoldResult,
    fold_lowrank_pairs,
    lowrank_pair_rules,
)
from lrt_deploy.export.passes.fixed_shape import FixedShape  # noqa: E402
from lrt_deploy.export.passes.fusion import TransformerFusion  # noqa: E402
from lrt_deploy.export.passes.optimize import OrtOptimization  # noqa: E402
from lrt_deploy.export.passes.reproducibility import NormalizeForReproducibility  # noqa: E402
from lrt_deploy.export.targets import Target  # noqa: E402
from lrt_deploy.graph.passes import PassContext, run_passes  # noqa: E402
from lrt_deploy.quant.recipes import Int4WeightOnly  # noqa: E402

RNG = np.random.default_rng(7)
IN, RANK, OUT, VOCAB = 16, 4, 12, 40


def _w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _model(nodes, weights, *, ids: bool = False, batch: int | str = 3, extra_outputs=()):
    """A graph over input ``x`` (floats, or token ids when ``ids``) with output ``y``."""
    if ids:
        x = helper.make_tensor_value_info("x", TensorProto.INT64, [batch])
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, IN])
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, None])
               for n in ("y", *extra_outputs)]
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    graph = helper.make_graph(nodes, "g", [x], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _feeds(model) -> dict[str, np.ndarray]:
    if model.graph.input[0].type.tensor_type.elem_type == TensorProto.INT64:
        return {"x": np.array([0, 5, 39], np.int64)}
    return {"x": RNG.standard_normal((3, IN)).astype(np.float32)}


def _run(model, feeds) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], feeds)[0]


def _ops(model) -> dict[str, int]:
    return dict(Counter(node.op_type for node in model.graph.node))


def _apply(rule_name: str, model) -> int:
    """Apply only the rule called ``rule_name`` to ``model`` in place; how often it fired."""
    import onnx_ir as ir
    from onnxscript.rewriter import RewriteRuleSet

    rules = [r for r in lowrank_pair_rules(FoldResult()) if r.name == rule_name]
    assert len(rules) == 1, rule_name
    graph = ir.serde.deserialize_model(model)
    count = RewriteRuleSet(rules).apply_to_model(graph)
    if count:
        model.CopyFrom(ir.serde.serialize_model(graph))
    return count


def _node(op: str, inputs: list[str], output: str, **attrs):
    return helper.make_node(op, inputs, [output], name=f"{op.lower()}_{output}", **attrs)


MATCHES = {
    "fold_matmul_matmul": lambda: _model(
        [_node("MatMul", ["x", "E"], "h"), _node("MatMul", ["h", "D"], "y")],
        {"E": _w(IN, RANK), "D": _w(RANK, OUT)}),
    "fold_matmul_gemm": lambda: _model(
        [_node("MatMul", ["x", "E"], "h"),
         _node("Gemm", ["h", "Dt", "C"], "y", transB=1, alpha=0.5, beta=2.0)],
        {"E": _w(IN, RANK), "Dt": _w(OUT, RANK), "C": _w(OUT)}),
    "fold_gemm_matmul": lambda: _model(
        [_node("Gemm", ["x", "Et"], "h", transB=1), _node("MatMul", ["h", "D"], "y")],
        {"Et": _w(RANK, IN), "D": _w(RANK, OUT)}),
    "fold_gemm_gemm": lambda: _model(
        [_node("Gemm", ["x", "E"], "h"), _node("Gemm", ["h", "D", "C"], "y")],
        {"E": _w(IN, RANK), "D": _w(RANK, OUT), "C": _w(OUT)}),
    "fold_gather_matmul": lambda: _model(
        [_node("Gather", ["T", "x"], "h"), _node("MatMul", ["h", "D"], "y")],
        {"T": _w(VOCAB, RANK), "D": _w(RANK, OUT)}, ids=True),
    "fold_gather_gemm": lambda: _model(
        [_node("Gather", ["T", "x"], "h"), _node("Gemm", ["h", "Dt"], "y", transB=1)],
        {"T": _w(VOCAB, RANK), "Dt": _w(OUT, RANK)}, ids=True),
}


@pytest.mark.parametrize("rule", sorted(MATCHES))
def test_each_fold_rule_matches_its_pair_and_keeps_the_function(rule: str) -> None:
    model = MATCHES[rule]()
    feeds = _feeds(model)
    expected = _run(model, feeds)
    assert _apply(rule, model) == 1
    onnx.checker.check_model(model)
    assert sum(_ops(model).values()) == 1
    np.testing.assert_allclose(_run(model, feeds), expected, rtol=1e-5, atol=1e-5)


def test_fold_looks_through_a_transpose_and_a_constant_node() -> None:
    d = numpy_helper.from_array(_w(RANK, OUT), "d_value")
    model = _model([
        _node("Transpose", ["Et"], "E", perm=[1, 0]),
        helper.make_node("Constant", [], ["D"], value=d),
        _node("MatMul", ["x", "E"], "h"), _node("MatMul", ["h", "D"], "y"),
    ], {"Et": _w(RANK, IN)})
    feeds = _feeds(model)
    expected = _run(model, feeds)
    result = fold_lowrank_pairs(model)
    assert result.pairs == 1 and result.folded[0] == {
        "first": "matmul_h", "second": "matmul_y", "rank": RANK, "shape": [IN, OUT]}
    assert result.params_before == (IN + OUT) * RANK and result.params_after == IN * OUT
    assert _ops(model) == {"MatMul": 1}  # the Transpose and Constant are gone
    assert len(model.graph.initializer) == 1
    np.testing.assert_allclose(_run(model, feeds), expected, rtol=1e-5, atol=1e-5)


NOT_UNITS = {
    "full rank": ("fold_matmul_matmul", lambda: _model(
        [_node("MatMul", ["x", "E"], "h"), _node("MatMul", ["h", "D"], "y")],
        {"E": _w(IN, IN), "D": _w(IN, OUT)})),
    "intermediate is a graph output": ("fold_matmul_matmul", lambda: _model(
        [_node("MatMul", ["x", "E"], "h"), _node("MatMul", ["h", "D"], "y")],
        {"E": _w(IN, RANK), "D": _w(RANK, OUT)}, extra_outputs=["h"])),
    "weight is not constant": ("fold_matmul_matmul", lambda: _model(
        [_node("Relu", ["E0"], "E"), _node("MatMul", ["x", "E"], "h"),
         _node("MatMul", ["h", "D"], "y")],
        {"E0": _w(IN, RANK), "D": _w(RANK, OUT)})),
    "bias between the factors": ("fold_gemm_matmul", lambda: _model(
        [_node("Gemm", ["x", "E", "b"], "h"), _node("MatMul", ["h", "D"], "y")],
        {"E": _w(IN, RANK), "b": _w(RANK), "D": _w(RANK, OUT)})),
    "scaled first gemm": ("fold_gemm_matmul", lambda: _model(
        [_node("Gemm", ["x", "E"], "h", alpha=2.0), _node("MatMul", ["h", "D"], "y")],
        {"E": _w(IN, RANK), "D": _w(RANK, OUT)})),
    "gather on axis 1": ("fold_gather_matmul", lambda: _model(
        [_node("Gather", ["T", "x"], "h", axis=1), _node("MatMul", ["h", "D"], "y")],
        {"T": _w(VOCAB, RANK), "D": _w(3, OUT)}, ids=True)),
    "gather then biased gemm": ("fold_gather_gemm", lambda: _model(
        [_node("Gather", ["T", "x"], "h"), _node("Gemm", ["h", "D", "C"], "y")],
        {"T": _w(VOCAB, RANK), "D": _w(RANK, OUT), "C": _w(OUT)}, ids=True)),
}


@pytest.mark.parametrize("case", sorted(NOT_UNITS))
def test_fold_rules_leave_what_is_not_a_lowrank_unit(case: str) -> None:
    rule, make = NOT_UNITS[case]
    model = make()
    before = model.SerializeToString()
    assert _apply(rule, model) == 0
    assert fold_lowrank_pairs(model).pairs == 0
    assert model.SerializeToString() == before


def _save(model, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_dense_equivalent_pass_records_the_fold(tmp_path: Path) -> None:
    source = _save(MATCHES["fold_matmul_matmul"](), tmp_path / "lrt.raw.onnx")
    results = run_passes([DenseEquivalentFold()], source,
                         PassContext(output=tmp_path / "dense.raw.onnx"))
    assert [r.name for r in results] == ["dense_equivalent"]
    details = results[0].details
    assert set(details) == {"pairs", "folded", "params_before", "params_after", "op_changes"}
    assert details["pairs"] == 1 and details["op_changes"] == {"MatMul": -1}
    assert FoldResult(**details).to_dict() == details
    assert results[0].output == tmp_path / "dense.raw.onnx"


def test_run_passes_chains_graphs_and_keeps_each_record(tmp_path: Path) -> None:
    model = _model([_node("MatMul", ["x", "W"], "h"), _node("Relu", ["h"], "y")],
                   {"W": _w(IN, OUT)}, batch="batch")
    source = _save(model, tmp_path / "m.raw.onnx")
    lines: list[str] = []
    passes = [NormalizeForReproducibility(), OrtOptimization("basic"), FixedShape({"batch": 2})]
    context = PassContext(output=tmp_path / "m.fp32.onnx", label="dense", progress=lines.append)
    results = run_passes(passes, source, context)
    assert [r.name for r in results] == ["normalize", "optimize", "fixed_shape"]
    assert results[-1].output == tmp_path / "m.fp32.onnx"
    assert results[1].output.name == "m.fp32.1-optimize.onnx"
    assert set(results[1].details) == {"level", "nodes_before", "nodes_after", "op_changes",
                                       "fused"}
    assert results[2].details == {"fixed": ["batch"]}
    assert lines == ["optimising dense graph (basic)"]
    fixed = onnx.load(str(tmp_path / "m.fp32.onnx"))
    assert fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    feeds = {"x": RNG.standard_normal((2, IN)).astype(np.float32)}
    np.testing.assert_allclose(_run(fixed, feeds), _run(model, feeds), rtol=1e-6)


def test_export_passes_order_follows_the_target() -> None:
    transformer = SimpleNamespace(attention_shape=(2, 32))
    plain = SimpleNamespace(attention_shape=None)
    cpu = export_passes(Target.cpu(), transformer)
    assert cpu == [TransformerFusion(num_heads=2, hidden_size=32, level="extended")]
    phone = export_passes(Target.mobile(fixed_shape={"batch": 1}), plain)
    assert phone == [OrtOptimization("extended"), FixedShape({"batch": 1})]
    int4 = export_passes(Target.cpu(precision=Int4WeightOnly()), transformer)
    assert int4[0].pack_qkv is False
    with pytest.raises(ValueError, match="multiple"):
        TransformerFusion(num_heads=3, hidden_size=32)
