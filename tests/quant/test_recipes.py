"""Each recipe is a list of graph passes; applying it writes one graph and one manifest record."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lrt_deploy.quant.recipes import (  # noqa: E402
    DynamicInt8,
    Float16,
    Int4WeightOnly,
    Int8WeightOnly,
    PrecisionContext,
    StaticInt8,
    apply_precision,
    precision_passes,
)

RECORD_KEYS = {"mode", "per_channel", "weight_type", "quantized_ops", "op_changes",
               "excluded_nodes", "settings"}


def _chain(path: Path) -> Path:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="mm_a"),
             helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("MatMul", ["ra", "wb"], ["y"], name="mm_b")]
    inits = [numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), n)
             for n in ("wa", "wb")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                ir_version=10), str(path))
    return path


def _calibration() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    batches = []
    for _ in range(2):
        x = rng.standard_normal((8, 64)).astype(np.float32)
        x[:, 3] *= 100.0  # an outlier channel for smoothing to find
        batches.append({"x": x})
    return batches


@pytest.mark.parametrize(("recipe", "names"), [
    (Float16(), ["float16"]),
    (DynamicInt8(), ["smooth", "dynamic-int8"]),
    (DynamicInt8(smooth=False, exclude_sensitive=2), ["sensitivity", "dynamic-int8"]),
    (StaticInt8(), ["static-int8"]),
    (StaticInt8(exclude_sensitive=1), ["sensitivity", "static-int8"]),
    (Int8WeightOnly(), ["int8-weight-only"]),
    (Int4WeightOnly(), ["int4-weight-only"]),
])
def test_each_recipe_is_a_list_of_passes(recipe: object, names: list[str]) -> None:
    assert [graph_pass.name for graph_pass in precision_passes(recipe)] == names


def test_static_exclusion_ranks_with_static_rounding() -> None:
    sensitivity = precision_passes(StaticInt8(exclude_sensitive=1))[0]
    assert sensitivity.activations == "static"


@pytest.mark.parametrize("recipe", [DynamicInt8(exclude_sensitive=1),
                                    StaticInt8(exclude_sensitive=1)])
def test_applying_writes_the_graph_and_the_record_only(tmp_path: Path, recipe: object) -> None:
    source = _chain(tmp_path / "model.onnx")
    target = tmp_path / "model.int8.onnx"
    lines: list[str] = []
    record = apply_precision(recipe, source, target,
                             PrecisionContext(_calibration(), "dense", lines.append))
    smoothed = isinstance(recipe, DynamicInt8)
    assert set(record) == RECORD_KEYS | ({"smoothing"} if smoothed else set())
    assert len(record["excluded_nodes"]) == 1
    if smoothed:
        assert record["smoothing"]["channels"] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx", "model.onnx"]
    assert any("keeping the 1 MatMuls" in line for line in lines)
    assert any(line.startswith("quantising dense to") for line in lines)


def test_smoothing_without_calibration_is_recorded_as_skipped(tmp_path: Path) -> None:
    source = _chain(tmp_path / "model.onnx")
    record = apply_precision(DynamicInt8(), source, tmp_path / "q.onnx", PrecisionContext())
    assert record["smoothing"]["skipped"].startswith("no calibration data")
    assert record["smoothing"]["channels"] == 0
