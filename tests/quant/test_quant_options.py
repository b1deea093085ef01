"""Tests for the quantisation options (static QDQ, sensitivity, int8 and 4-bit weights) on a
tiny hand-built MatMul chain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lrt_deploy.graph.ops import model_bytes, op_counts  # noqa: E402
from lrt_deploy.quant.passes.dynamic import quantize_int8  # noqa: E402
from lrt_deploy.quant.passes.sensitivity import rank_int8_damage  # noqa: E402
from lrt_deploy.quant.passes.static import quantize_static_int8  # noqa: E402
from lrt_deploy.quant.passes.weight_only import (  # noqa: E402
    quantize_weights_4bit,
    quantize_weights_int8,
)

# in -> (mm_in: 64x64) -> Relu -> (mm_mid: 64x128) -> Relu -> (mm_out: 128x64)
SHAPES = {"mm_in": (64, 64), "mm_mid": (64, 128), "mm_out": (128, 64)}


def _chain(path: Path) -> Path:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), f"w_{name}"
        )
        for name, shape in SHAPES.items()
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w_mm_in"], ["a"], name="mm_in"),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("MatMul", ["ra", "w_mm_mid"], ["b"], name="mm_mid"),
        helper.make_node("Relu", ["b"], ["rb"], name="relu_b"),
        helper.make_node("MatMul", ["rb", "w_mm_out"], ["y"], name="mm_out"),
    ]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, str(path))
    return path


def _batches(
    count: int = 4, seed: int = 1, outlier: bool = False
) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        x = rng.standard_normal((16, 64)).astype(np.float32)
        if outlier:
            x[:, 0] *= 200.0  # an outlier channel: per-tensor activation scales suffer at mm_in
        batches.append({"x": x})
    return batches


def _cosine(source: Path, target: Path, outlier: bool = False) -> float:
    feeds = _batches(2, seed=7, outlier=outlier)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    runs = [
        np.concatenate([
            ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
            .run(None, f)[0] for f in feeds
        ])
        for p in (source, target)
    ]
    ref, got = runs
    return float(((ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1))
                 .min())


@pytest.fixture()
def chain(tmp_path: Path) -> Path:
    return _chain(tmp_path / "chain.onnx")


@pytest.mark.parametrize("per_channel", [True, False])
def test_static_qdq_quantizes_every_matmul(chain: Path, tmp_path: Path, per_channel: bool) -> None:
    target = tmp_path / "qdq.onnx"
    result = quantize_static_int8(chain, target, _batches(), per_channel=per_channel)
    after = op_counts(target)
    assert after["MatMul"] == 3  # QDQ keeps float MatMuls between Q/DQ pairs
    # One DQ per weight, one Q/DQ pair per quantised activation input.
    assert after["DequantizeLinear"] == 6 and after["QuantizeLinear"] == 3
    assert result.mode == "static-qdq" and result.per_channel is per_channel
    assert result.quantized_ops == {"QuantizeLinear": 3, "DequantizeLinear": 6}
    assert result.to_dict()["settings"]["calibrate_method"] == "minmax"
    assert _cosine(chain, target) > 0.9
    axes = {
        numpy_helper.to_array(i).size
        for i in onnx.load(str(target)).graph.initializer
        if i.name.endswith("_scale") and i.name.startswith("w_")
    }
    assert (max(axes) > 1) is per_channel


def test_static_qdq_excludes_named_nodes(chain: Path, tmp_path: Path) -> None:
    target = tmp_path / "qdq-excl.onnx"
    result = quantize_static_int8(chain, target, _batches(), nodes_to_exclude=["mm_in"])
    after = op_counts(target)
    assert after["DequantizeLinear"] == 4 and after["QuantizeLinear"] == 2
    assert result.excluded_nodes == ["mm_in"]


def test_sensitivity_ranks_the_outlier_node_first(chain: Path, tmp_path: Path) -> None:
    ranked = rank_int8_damage(chain, _batches(outlier=True), activations="static")
    assert [s.node for s in ranked][0] == "mm_in"
    assert sorted(s.node for s in ranked) == sorted(SHAPES)
    assert ranked[0].mean_cosine < ranked[-1].mean_cosine
    assert all(a.mean_cosine <= b.mean_cosine for a, b in zip(ranked, ranked[1:], strict=False))
    assert ranked[0].to_dict()["node"] == "mm_in"
    # Excluding the worst node improves the end result.
    plain, kept = tmp_path / "plain.onnx", tmp_path / "kept.onnx"
    quantize_static_int8(chain, plain, _batches(outlier=True))
    quantize_static_int8(chain, kept, _batches(outlier=True), nodes_to_exclude=[ranked[0].node])
    assert _cosine(chain, kept, outlier=True) > _cosine(chain, plain, outlier=True) + 0.05


@pytest.mark.parametrize("block_size", [32, 128])
def test_weight_only_4bit(chain: Path, tmp_path: Path, block_size: int) -> None:
    target = tmp_path / f"q4-{block_size}.onnx"
    result = quantize_weights_4bit(chain, target, block_size=block_size, min_elements=64 * 100)
    after = op_counts(target)
    # mm_in (64x64 = 4096 weights) is below min_elements and stays a MatMul.
    assert after["MatMulNBits"] == 2 and after["MatMul"] == 1
    assert result.quantized_ops == {"MatMulNBits": 2}
    assert result.excluded_nodes == ["mm_in"]
    assert result.weight_type == "int4" and result.settings["block_size"] == block_size
    assert model_bytes(target) < model_bytes(chain)
    assert _cosine(chain, target) > 0.95


def test_weight_only_4bit_rejects_bad_block(chain: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="power of 2"):
        quantize_weights_4bit(chain, tmp_path / "bad.onnx", block_size=48)


def _outputs(path: Path, feeds: dict[str, np.ndarray], level: str) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_weight_only_int8(chain: Path, tmp_path: Path) -> None:
    target = tmp_path / "w8.onnx"
    result = quantize_weights_int8(chain, target, block_size=32, min_elements=64 * 100)
    after = op_counts(target)
    # mm_in (4096 weights) stays fp32; no activation is quantised anywhere.
    assert after["MatMulNBits"] == 2 and after["MatMul"] == 1
    assert not {"DynamicQuantizeLinear", "QuantizeLinear", "MatMulInteger"} & set(after)
    assert result.mode == "weight-only" and result.weight_type == "int8"
    assert result.excluded_nodes == ["mm_in"]
    for node in onnx.load(str(target)).graph.node:
        if node.op_type == "MatMulNBits":
            attributes = {a.name: a.i for a in node.attribute}
            assert attributes["bits"] == 8 and attributes.get("accuracy_level", 0) == 0
    assert model_bytes(target) < 0.5 * model_bytes(chain)
    assert _cosine(chain, target) > 0.9995
    # ORT's extended optimisations must not turn it into int8-activation compute.
    feeds = _batches(1, seed=5)[0]
    np.testing.assert_array_equal(
        _outputs(target, feeds, "ORT_DISABLE_ALL"), _outputs(target, feeds, "ORT_ENABLE_ALL")
    )


def test_weight_only_int8_gathers_int8_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    table = rng.standard_normal((100, 32)).astype(np.float32)
    table[:, 5] *= 50.0  # one wide column: per-column scales keep the others fine
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed", axis=0)], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", 32])],
        [numpy_helper.from_array(table, "table")],
    )
    source, target = tmp_path / "g.onnx", tmp_path / "g8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                ir_version=10), str(source))
    quantize_weights_int8(source, target)
    np.testing.assert_array_equal(
        _outputs(target, {"ids": np.array([3, 1], np.int64)}, "ORT_DISABLE_ALL"),
        _outputs(target, {"ids": np.array([3, 1], np.int64)}, "ORT_ENABLE_ALL"),
    )
    model = onnx.load(str(target))
    assert [node.op_type for node in model.graph.node] == ["Gather", "DequantizeLinear"]
    ids = np.array([0, 7, 99, 7], np.int64)
    got = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(
        None, {"ids": ids})[0]
    step = np.abs(table).max(axis=0) / 127.0
    assert np.all(np.abs(got - table[ids]) <= step / 2 + 1e-6)


def test_dynamic_int8_still_reports_as_before(chain: Path, tmp_path: Path) -> None:
    result = quantize_int8(chain, tmp_path / "dyn.onnx")
    assert result.quantized_ops["MatMulInteger"] == 3
    assert result.to_dict()["mode"] == "dynamic" and result.excluded_nodes == []


def test_histogram_calibration_needs_batches_of_one_shape(chain: Path, tmp_path: Path) -> None:
    ragged = [*_batches(1), {"x": np.zeros((3, 64), np.float32)}]
    with pytest.raises(ValueError, match="one shape"):
        quantize_static_int8(chain, tmp_path / "pct.onnx", ragged, calibrate_method="percentile")
