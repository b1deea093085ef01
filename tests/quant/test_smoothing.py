"""Tests for outlier-channel smoothing before dynamic int8 (``smooth_outlier_channels``): the
float model is unchanged, the int8 error drops where an input has outlier channels, and
nothing moves where none has."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lrt_deploy.graph.ops import op_counts  # noqa: E402
from lrt_deploy.quant.passes.dynamic import quantize_int8  # noqa: E402
from lrt_deploy.quant.passes.smoothing import (  # noqa: E402
    input_channel_peaks,
    smooth_outlier_channels,
)

WIDTH = 32


def _model(nodes: list, inits: list, inputs: list, path: Path, opsets=(("", 18),)) -> Path:
    graph = helper.make_graph(
        nodes, "g", inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", WIDTH])],
        inits)
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    onnx.save(model, str(path))
    return path


def _tokens(name: str) -> object:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "tokens", WIDTH])


def _weight(rng: np.random.Generator, name: str, columns: int = WIDTH) -> object:
    return numpy_helper.from_array(
        (rng.standard_normal((WIDTH, columns)) / np.sqrt(WIDTH)).astype(np.float32), name)


def _shared_and_tied(path: Path) -> Path:
    """y = x @ wa + x @ wb + z @ wa + x: two MatMuls read x, wa is tied to a MatMul reading z,
    and x also feeds the residual Add."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="mm_a"),
             helper.make_node("MatMul", ["x", "wb"], ["b"], name="mm_b"),
             helper.make_node("MatMul", ["z", "wa"], ["c"], name="mm_c"),
             helper.make_node("Add", ["a", "b"], ["ab"]),
             helper.make_node("Add", ["ab", "c"], ["abc"]),
             helper.make_node("Add", ["abc", "x"], ["y"], name="residual")]
    return _model(nodes, [_weight(rng, "wa"), _weight(rng, "wb")], [_tokens("x"), _tokens("z")],
                  path)


def _feeds(seed: int, outliers: bool, count: int = 4) -> list[dict[str, np.ndarray]]:
    """Batches of 2 rows x 12 tokens; with ``outliers``, x's channels 3 and 17 spike to ~60x
    the rest on a few tokens, as trained transformers' GELU and LayerNorm outputs do."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        x = rng.standard_normal((2, 12, WIDTH)).astype(np.float32)
        if outliers:
            x[:, ::4, 3] *= 60.0
            x[:, 1::5, 17] *= -40.0
        feeds.append({"x": x, "z": rng.standard_normal((2, 12, WIDTH)).astype(np.float32)})
    return feeds


def _run(path: Path, feeds: list[dict]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["y"], f)[0] for f in feeds]).reshape(-1, WIDTH)


def _error(reference: np.ndarray, output: np.ndarray) -> float:
    return float(np.linalg.norm(reference - output) / np.linalg.norm(reference))


def test_outlier_channels_move_into_the_weights_and_int8_error_drops(tmp_path: Path) -> None:
    source = _shared_and_tied(tmp_path / "source.onnx")
    smoothed = tmp_path / "smoothed.onnx"
    result = smooth_outlier_channels(source, smoothed, _feeds(1, outliers=True))

    assert result.nodes == ["mm_a", "mm_b"] and result.inputs == 1 and result.channels == 2
    assert result.rows == 8 and result.skipped is None
    assert 10 < result.largest_scale < 30  # ~60x the median channel brought to 3x
    graph = onnx.load(str(smoothed)).graph
    (mul,) = [node for node in graph.node if node.op_type == "Mul"]  # one, shared
    assert mul.input[0] == "x"
    residual = next(node for node in graph.node if node.name == "residual")
    assert residual.input[1] == "x"  # other readers keep the original activation
    mm_c = next(node for node in graph.node if node.name == "mm_c")
    assert mm_c.input == ["z", "wa"]  # the tied weight keeps its values for z

    held_out = _feeds(7, outliers=True)
    reference = _run(source, held_out)
    np.testing.assert_allclose(_run(smoothed, held_out), reference, rtol=1e-4, atol=1e-4)

    quantize_int8(source, tmp_path / "plain_int8.onnx")
    quantize_int8(smoothed, tmp_path / "smoothed_int8.onnx")
    assert op_counts(tmp_path / "smoothed_int8.onnx").get("MatMul", 0) == 0  # all int8
    plain = _error(reference, _run(tmp_path / "plain_int8.onnx", held_out))
    smooth = _error(reference, _run(tmp_path / "smoothed_int8.onnx", held_out))
    assert smooth < plain / 2, (smooth, plain)


def test_no_outliers_changes_nothing(tmp_path: Path) -> None:
    source = _shared_and_tied(tmp_path / "source.onnx")
    smoothed = tmp_path / "smoothed.onnx"
    result = smooth_outlier_channels(source, smoothed, _feeds(1, outliers=False))
    assert result.channels == 0 and result.nodes == [] and result.rows == 8
    assert op_counts(smoothed) == op_counts(source)
    feeds = _feeds(2, outliers=False)
    np.testing.assert_array_equal(_run(smoothed, feeds), _run(source, feeds))


def test_padded_tokens_do_not_count(tmp_path: Path) -> None:
    """A spike on padded positions (attention_mask 0) is not an outlier of the real text."""
    rng = np.random.default_rng(0)
    mask_input = helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                               ["batch", "tokens"])
    nodes = [helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
             helper.make_node("Mul", ["x", "m3"], ["xm"]),
             helper.make_node("Add", ["x", "xm"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")]
    axis = numpy_helper.from_array(np.array([-1], np.int64), "axis")
    source = _model(nodes, [_weight(rng, "w"), axis], [_tokens("x"), mask_input],
                    tmp_path / "masked.onnx")
    x = rng.standard_normal((2, 10, WIDTH)).astype(np.float32)
    mask = np.ones((2, 10), np.int64)
    mask[:, 7:] = 0
    x[:, 7:, 5] = 500.0  # only where the mask is 0
    batch = [{"x": x, "attention_mask": mask}]
    peaks, rows = input_channel_peaks(onnx.load(str(source)), batch, ["h"])
    assert rows == 2 and peaks["h"][5] < 10
    unmasked = [{"x": x, "attention_mask": np.ones_like(mask)}]
    peaks, _ = input_channel_peaks(onnx.load(str(source)), unmasked, ["h"])
    assert peaks["h"][5] == pytest.approx(1000.0)
    result = smooth_outlier_channels(source, tmp_path / "out.onnx", batch)
    assert result.channels == 0


def test_packed_attention_weight_is_smoothed(tmp_path: Path) -> None:
    """The fused ``Attention`` (packed QKV, which dynamic int8 makes ``QAttention``) reads its
    input through the same kind of weight: its rows are the input channels."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Attention", ["x", "wqkv", "bqkv"], ["y"], name="attention",
                              domain="com.microsoft", num_heads=4)]
    inits = [_weight(rng, "wqkv", 3 * WIDTH),
             numpy_helper.from_array(np.zeros(3 * WIDTH, np.float32), "bqkv")]
    source = _model(nodes, inits, [_tokens("x")], tmp_path / "attention.onnx",
                    opsets=(("", 18), ("com.microsoft", 1)))
    feeds = [{"x": f["x"]} for f in _feeds(1, outliers=True)]
    smoothed = tmp_path / "smoothed.onnx"
    result = smooth_outlier_channels(source, smoothed, feeds)
    assert result.nodes == ["attention"] and result.channels == 2
    held_out = [{"x": f["x"]} for f in _feeds(9, outliers=True)]
    reference = _run(source, held_out)
    np.testing.assert_allclose(_run(smoothed, held_out), reference, rtol=1e-4, atol=1e-4)
    quantize_int8(source, tmp_path / "plain_int8.onnx")
    quantize_int8(smoothed, tmp_path / "smoothed_int8.onnx")
    assert op_counts(tmp_path / "smoothed_int8.onnx").get("QAttention") == 1
    plain = _error(reference, _run(tmp_path / "plain_int8.onnx", held_out))
    smooth = _error(reference, _run(tmp_path / "smoothed_int8.onnx", held_out))
    assert smooth < plain / 2, (smooth, plain)


def test_target_must_not_exceed_the_threshold(tmp_path: Path) -> None:
    source = _shared_and_tied(tmp_path / "source.onnx")
    with pytest.raises(ValueError, match="target_ratio"):
        smooth_outlier_channels(source, tmp_path / "out.onnx", [], ratio=4.0, target_ratio=6.0)
