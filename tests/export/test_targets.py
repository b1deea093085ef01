"""Tests for the target additions: new Target fields, provider hints, fp16 for cuda, external
data, and reproducible exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tiny_models import make_tiny_encoder  # noqa: E402

from lrt_deploy.errors import LrtDeployError  # noqa: E402
from lrt_deploy.export.onnx_export import export_onnx  # noqa: E402
from lrt_deploy.export.passes.reproducibility import normalize_for_reproducibility  # noqa: E402
from lrt_deploy.export.targets import Target  # noqa: E402
from lrt_deploy.graph.external_data import (  # noqa: E402
    initializer_bytes,
    load_model_proto,
    save_model_proto,
)
from lrt_deploy.graph.ops import model_bytes, op_counts  # noqa: E402
from lrt_deploy.load import load_model  # noqa: E402
from lrt_deploy.quant.passes.float16 import convert_float16  # noqa: E402
from lrt_deploy.quant.recipes import (  # noqa: E402
    DynamicInt8,
    Float16,
    Int4WeightOnly,
    Int8WeightOnly,
    StaticInt8,
    precision_from_dict,
)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(
        None, feeds
    )[0]


def _norm_block(path: Path, hidden: int = 16, width: int = 64) -> Path:
    """x -> MatMul -> Add -> LayerNormalization -> MatMul -> Softmax."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((hidden, width)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "b1"),
        numpy_helper.from_array(np.ones(width, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(width, np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal((width, 8)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias"),
        helper.make_node("LayerNormalization", ["hb", "gamma", "beta"], ["n"], name="ln"),
        helper.make_node("MatMul", ["n", "w2"], ["logits"], name="mm2"),
        helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, str(path))
    return path


# --- Target fields -----------------------------------------------------------------------------


def test_preset_defaults() -> None:
    for name in ("cpu", "cuda", "mobile"):
        target = Target.from_name(name)
        assert target.fusion is True
        assert target.precision == (Float16() if name == "cuda" else None)
        assert target.tensorrt is False
        expected = {"kind": "float16"} if name == "cuda" else None
        assert target.to_dict()["precision"] == expected
    # A quantised cuda target holds that precision instead of fp16; precision=None keeps fp32.
    assert Target.cuda(precision=DynamicInt8()).precision == DynamicInt8()
    assert Target.cuda(precision=Int4WeightOnly()).precision == Int4WeightOnly(block=32)
    assert Target.cuda(precision=None).precision is None
    # Plain construction changes nothing the caller did not ask for; providers from the table.
    plain = Target(name="cpu")
    assert plain.fusion is False and plain.precision is None
    assert plain.providers == ("CPUExecutionProvider",)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("cpu", {"precision": "int8"}),
        ("cpu", {"precision": {"kind": "dynamic-int8"}}),
        ("cpu", {"tensorrt": True}),
    ],
)
def test_invalid_new_fields_raise(name: str, overrides: dict) -> None:
    with pytest.raises(LrtDeployError):
        Target.from_name(name, **overrides)


@pytest.mark.parametrize(
    "make",
    [
        lambda: DynamicInt8(per_channel="yes"),
        lambda: StaticInt8(exclude_sensitive=-1),
        lambda: DynamicInt8(exclude_sensitive=-2),
        lambda: DynamicInt8(exclude_sensitive=True),
        lambda: DynamicInt8(smooth="yes"),
        lambda: StaticInt8(exclude_sensitive=1.5),
        lambda: Int4WeightOnly(block=24),
        lambda: Int4WeightOnly(block=8),
    ],
)
def test_invalid_precision_recipes_raise(make) -> None:
    with pytest.raises(LrtDeployError):
        make()


@pytest.mark.parametrize(
    "recipe",
    [Float16(), DynamicInt8(per_channel=False), DynamicInt8(exclude_sensitive=3),
     DynamicInt8(smooth=False),
     StaticInt8(per_channel=True, exclude_sensitive=6),
     Int8WeightOnly(), Int4WeightOnly(block=64), Int4WeightOnly(embeddings=False)],
)
def test_precision_round_trips_through_dict(recipe) -> None:
    data = recipe.to_dict()
    assert data["kind"] == recipe.kind
    assert precision_from_dict(data) == recipe
    assert precision_from_dict(None) is None
    with pytest.raises(LrtDeployError, match="unknown precision kind"):
        precision_from_dict({"kind": "int3"})
    with pytest.raises(LrtDeployError, match="unknown"):
        precision_from_dict({**data, "bits": 3})


def test_int4_manifests_from_before_table_quantisation_read_as_float_tables() -> None:
    old = {"kind": "int4-weight-only", "block": 32}
    assert precision_from_dict(old) == Int4WeightOnly(block=32, embeddings=False)


def test_provider_hints() -> None:
    assert Target.cpu().provider_hints() == [("CPUExecutionProvider", {})]
    plain = Target.cuda().provider_hints()
    assert [p for p, _ in plain] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = Target.cuda(tensorrt=True, precision=Float16()).provider_hints()
    assert [p for p, _ in trt] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider",
    ]
    assert trt[0][1]["trt_fp16_enable"] == "True"
    assert trt[0][1]["trt_engine_cache_enable"] == "True"
    fp32 = Target.cuda(tensorrt=True, precision=None)
    assert fp32.provider_hints()[0][1]["trt_fp16_enable"] == "False"


# --- fp16 for cuda -----------------------------------------------------------------------------


def test_float16_keeps_norm_and_softmax_fp32_and_runs_on_cpu(tmp_path: Path) -> None:
    source = _norm_block(tmp_path / "block.onnx")
    target = tmp_path / "block.fp16.onnx"
    result = convert_float16(source, target)
    model = onnx.load(str(target))
    by_name = {n.name: n for n in model.graph.node}
    assert {"ln", "softmax", "mm1", "mm2"} <= set(by_name)
    assert result.kept_fp32_ops == ["LayerNormalization", "Softmax"]
    inits = {i.name: i.data_type for i in model.graph.initializer}
    assert inits["w1"] == inits["w2"] == TensorProto.FLOAT16
    assert inits["gamma"] == inits["beta"] == TensorProto.FLOAT  # LayerNorm's own inputs
    # io types kept: the app still feeds and reads fp32.
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert result.casts_added == op_counts(target)["Cast"] > 0
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(target, {"x": x}), _run(source, {"x": x}), atol=2e-2)
    assert model_bytes(target) < model_bytes(source)


# --- external data -----------------------------------------------------------------------------


def test_external_data_above_threshold(tmp_path: Path) -> None:
    source = _norm_block(tmp_path / "block.onnx")
    model = load_model_proto(source)
    weights = initializer_bytes(model)
    assert weights == 4 * (16 * 64 + 64 * 3 + 64 * 8)

    inline = save_model_proto(model, tmp_path / "inline.onnx", threshold=weights + 1)
    assert not inline.external and not (tmp_path / "inline.onnx.data").exists()

    out = tmp_path / "ext" / "model.onnx"
    out.parent.mkdir()
    result = save_model_proto(load_model_proto(source), out, threshold=weights - 1,
                              size_threshold=1024)
    data = out.with_name("model.onnx.data")
    assert result.external and result.data_path == data and data.is_file()
    assert result.to_dict()["data_file"] == "model.onnx.data"
    stored = onnx.load(str(out), load_external_data=False)
    external = {i.name for i in stored.graph.initializer
                if i.data_location == TensorProto.EXTERNAL}
    assert external == {"w1", "w2"}  # the 256-byte vectors stay inline (size_threshold)
    assert out.stat().st_size < data.stat().st_size
    assert model_bytes(out) > data.stat().st_size
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(out, {"x": x}), _run(source, {"x": x}), atol=1e-6)
    assert initializer_bytes(load_model_proto(out)) == weights
    # Saving again replaces (rather than appends to) the side file.
    save_model_proto(load_model_proto(out), out, threshold=weights - 1)
    assert data.stat().st_size == result.initializer_bytes - 4 * 64 * 3


# --- reproducibility ---------------------------------------------------------------------------


def _stack_traces(path: Path) -> list[str]:
    graph = onnx.load(str(path)).graph
    return [p.value for n in graph.node for p in n.metadata_props
            if p.key == "pkg.torch.onnx.stack_trace"]


def test_export_is_reproducible_after_normalization(tmp_path: Path) -> None:
    torch.save(make_tiny_encoder(), tmp_path / "enc.pt")
    loaded = load_model(tmp_path / "enc.pt", trust_pickle=True)
    first = export_onnx(loaded, tmp_path / "a.onnx")
    second = export_onnx(loaded, tmp_path / "b.onnx")
    # Stack traces name this checkout's absolute paths: bytes depend on where it was built.
    traces = _stack_traces(first)
    assert traces and any(str(Path(__file__).resolve().parents[1]) in t for t in traces)

    result = normalize_for_reproducibility(first)
    normalize_for_reproducibility(second)
    assert result.details["metadata_removed"] == len(traces)
    assert not _stack_traces(first)
    assert first.read_bytes() == second.read_bytes()
    # Idempotent, and the graph computes the same.
    before = first.read_bytes()
    again = normalize_for_reproducibility(first, tmp_path / "c.onnx")
    assert again.details["metadata_removed"] == 0 and (tmp_path / "c.onnx").read_bytes() == before
    feeds = {"input_ids": loaded.example_inputs["input_ids"].numpy()}
    np.testing.assert_array_equal(_run(first, feeds), _run(second, feeds))


def test_dynamic_int8_calibrates_only_to_exclude() -> None:
    assert DynamicInt8().needs_calibration is False
    assert DynamicInt8(exclude_sensitive=2).needs_calibration is True
    # Smoothing uses calibration where there is some, and is skipped (said so) where not.
    assert DynamicInt8().uses_calibration is True
    assert DynamicInt8(smooth=False).uses_calibration is False


def test_manifests_from_before_smoothing_read_as_plain_int8() -> None:
    old = {"kind": "dynamic-int8", "per_channel": True, "exclude_sensitive": 0}
    # and before pair-safe weights: their int8 weights span [-127, 127]
    assert precision_from_dict(old) == DynamicInt8(smooth=False, weight_grid="full-range")


def test_heal_quantized_simulates_the_int8_recipe_it_deploys() -> None:
    from lrt_deploy.compress.recipe import simulated_quantization
    from lrt_deploy.quant.simulate import FakeQuantization

    assert simulated_quantization(DynamicInt8()) == FakeQuantization("int8", smooth=True)
    assert simulated_quantization(DynamicInt8(smooth=False)) == FakeQuantization("int8")
    with pytest.raises(LrtDeployError, match="per channel and int4"):
        simulated_quantization(DynamicInt8(per_channel=False))
