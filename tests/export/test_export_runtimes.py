"""supported_runtimes: which ONNX Runtime packages run a graph, from its operators."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from lrt_deploy.export.runtimes import RUNTIMES, graph_operators, supported_runtimes


def _graph_with(op: str, domain: str = "", ir_version: int = 10) -> onnx.ModelProto:
    """x -> op -> y, plus an If whose branch holds a Softmax (a subgraph operator)."""
    node = helper.make_node(op, ["x"], ["y"], domain=domain)
    branch = helper.make_graph(
        [helper.make_node("Softmax", ["y"], ["z"])], "branch", [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    condition = helper.make_node("If", ["c"], ["out"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph(
        [node, condition], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
    )
    opsets = [helper.make_opsetid("", 18)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = ir_version
    return model


def test_graph_operators_include_subgraphs() -> None:
    assert graph_operators(_graph_with("Erf")) == {
        ("ai.onnx", "Erf"), ("ai.onnx", "If"), ("ai.onnx", "Softmax"),
    }


def test_verified_operators_run_everywhere_they_were_checked() -> None:
    model = _graph_with("Erf")
    runtimes = supported_runtimes(model)
    assert set(runtimes) == set(RUNTIMES)
    assert runtimes["onnxruntime"]["runs"] is True
    # If was never part of an exported graph: not claimed for the npm packages.
    for name in ("onnxruntime-node", "onnxruntime-web-wasm"):
        assert runtimes[name]["runs"] is None
        assert runtimes[name]["unverified"] == ["ai.onnx:If"]
    assert runtimes["onnxruntime-android"]["runs"] is None


def test_quick_start_operators_are_verified_for_node_and_web() -> None:
    from lrt_deploy.export.runtimes import VERIFIED_OPERATORS

    quick_start = {
        ("com.microsoft", "MultiHeadAttention"), ("com.microsoft", "SkipLayerNormalization"),
        ("com.microsoft", "BiasGelu"), ("ai.onnx", "MatMulInteger"),
        ("ai.onnx", "DynamicQuantizeLinear"),
    }
    for name in ("onnxruntime-node", "onnxruntime-web-wasm"):
        assert quick_start <= VERIFIED_OPERATORS[name]["operators"]


def test_unknown_domain_is_missing_from_the_installed_runtime() -> None:
    runtimes = supported_runtimes(_graph_with("Frobnicate", domain="com.example"))
    assert runtimes["onnxruntime"]["runs"] is False
    assert runtimes["onnxruntime"]["missing"] == ["com.example:Frobnicate"]
    assert "com.example:Frobnicate" in runtimes["onnxruntime-web-wasm"]["unverified"]


@pytest.mark.parametrize("runtime", ["onnxruntime", "onnxruntime-node", "onnxruntime-web-wasm"])
def test_ir_version_newer_than_the_runtime_reads(runtime: str) -> None:
    entry = supported_runtimes(_graph_with("Erf", ir_version=14))[runtime]
    assert entry["runs"] is False
    assert "IR version 14" in entry["note"]


def test_installed_runtime_answer_matches_onnxruntime() -> None:
    """The registry answer agrees with what onnxruntime does with the graph."""
    import numpy as np
    import onnxruntime as ort

    for model in (_graph_with("Erf"), _graph_with("Frobnicate", domain="com.example")):
        claimed = supported_runtimes(model)["onnxruntime"]["runs"]
        try:
            session = ort.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
            session.run(None, {"x": np.ones(2, np.float32), "c": np.array(True)})
            ran = True
        except Exception:  # noqa: BLE001 - any failure means "does not run"
            ran = False
        assert claimed is ran


def test_dynamic_int8_graphs_carry_the_web_reproducibility_note() -> None:
    entry = supported_runtimes(_graph_with("DynamicQuantizeLinear"))["onnxruntime-web-wasm"]
    assert "dynamic int8" in entry["note"]
    assert "note" not in supported_runtimes(_graph_with("Erf"))["onnxruntime-web-wasm"]
