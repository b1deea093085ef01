"""Tests for the int8 damage ranking (``rank_int8_damage``) and the pass that keeps the worst
nodes float: its simulated int8 is ONNX Runtime's own (dynamic and static), and it sees what a
node-local SQNR cannot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lrt_deploy.graph.passes import PassContext, run_passes  # noqa: E402
from lrt_deploy.quant.passes.dynamic import DynamicInt8Pass, quantize_int8  # noqa: E402
from lrt_deploy.quant.passes.sensitivity import (  # noqa: E402
    MASK_INPUT,
    ExcludeSensitive,
    activation_ranges,
    build_probe,
    rank_int8_damage,
)
from lrt_deploy.quant.passes.static import quantize_static_int8  # noqa: E402
from lrt_deploy.quant.rules import symmetric_int8, uint8_grid  # noqa: E402


def _save(nodes: list, inits: list, inputs: list[str], path: Path) -> Path:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 32])
                     for n in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                ir_version=10), str(path))
    return path


def _weights(rng: np.random.Generator, *names: str) -> list:
    return [numpy_helper.from_array((rng.standard_normal((32, 32)) / np.sqrt(32))
                                    .astype(np.float32), name) for name in names]


def _chain(path: Path) -> Path:
    """x -> mm_a -> Tanh -> mm_b -> Relu -> mm_c -> y."""
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="mm_a"),
             helper.make_node("Tanh", ["a"], ["ta"]),
             helper.make_node("MatMul", ["ta", "wb"], ["b"], name="mm_b"),
             helper.make_node("Relu", ["b"], ["rb"]),
             helper.make_node("MatMul", ["rb", "wc"], ["y"], name="mm_c")]
    return _save(nodes, _weights(np.random.default_rng(0), "wa", "wb", "wc"), ["x"], path)


def _feeds(seed: int, outlier: bool = False, names: tuple[str, ...] = ("x",)) -> list[dict]:
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(3):
        batch = {n: rng.standard_normal((8, 32)).astype(np.float32) for n in names}
        if outlier:
            batch[names[0]][:, 0] *= 300.0
        feeds.append(batch)
    return feeds


def _run(path: Path, feeds: list[dict]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["y"], f)[0] for f in feeds])


def _local_sqnr(source: Path, feeds: list[dict], node: str, x: str, w: str) -> float:
    """SQNR (dB) of one MatMul's own output with its input and weight rounded through int8."""
    model = onnx.load(str(source))
    weight = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == w)
    inputs = np.concatenate([f[x] for f in feeds]).astype(np.float64)
    scale, zero = uint8_grid(inputs.min(), inputs.max())
    rounded = (np.clip(np.rint(inputs / scale) + zero, 0, 255) - zero) * scale
    codes, w_scale = symmetric_int8(weight, k_axis=0)
    exact, approx = inputs @ weight, rounded @ (codes * w_scale)
    return 10 * np.log10((exact**2).sum() / ((exact - approx) ** 2).sum())


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("per_channel", [True, False])
def test_probe_is_onnx_runtimes_own_int8(tmp_path: Path, per_channel: bool) -> None:
    source = _chain(tmp_path / "chain.onnx")
    feeds = _feeds(3)
    probe = onnx.load(str(source))
    probed = build_probe(probe, per_channel)
    assert probed == ["mm_a", "mm_b", "mm_c"]
    path = tmp_path / "probe.onnx"
    onnx.save(probe, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def probe_run(mask: list[bool]) -> np.ndarray:
        return np.concatenate([session.run(["y"], {**f, MASK_INPUT: np.array(mask)})[0]
                               for f in feeds])

    np.testing.assert_array_equal(probe_run([False] * 3), _run(source, feeds))
    for i, name in enumerate(probed):
        quantized = tmp_path / f"only-{name}.onnx"
        quantize_int8(source, quantized, per_channel=per_channel,
                      nodes_to_exclude=[other for other in probed if other != name])
        mask = [j == i for j in range(3)]
        expected = _run(quantized, feeds)
        assert not np.allclose(expected, _run(source, feeds), atol=1e-4)  # int8 did change it
        np.testing.assert_allclose(probe_run(mask), expected, rtol=1e-4, atol=1e-5)


def test_damage_ranks_what_hurts_the_output_not_the_node(tmp_path: Path) -> None:
    """``p`` reads an input with an outlier channel (poor local SQNR) but reaches y scaled by
    1e-3; ``q`` reads a plain input (good local SQNR) and is all of y. The local measure puts
    p first, the output says q."""
    nodes = [helper.make_node("MatMul", ["x", "wp"], ["p"], name="p"),
             helper.make_node("Mul", ["p", "tiny"], ["ps"]),
             helper.make_node("MatMul", ["z", "wq"], ["q"], name="q"),
             helper.make_node("Add", ["ps", "q"], ["y"])]
    inits = [*_weights(np.random.default_rng(1), "wp", "wq"),
             numpy_helper.from_array(np.array(1e-3, np.float32), "tiny")]
    source = _save(nodes, inits, ["x", "z"], tmp_path / "two.onnx")
    feeds = _feeds(5, outlier=True, names=("x", "z"))
    assert _local_sqnr(source, feeds, "p", "x", "wp") < _local_sqnr(source, feeds, "q", "z", "wq")
    ranked = rank_int8_damage(source, feeds)
    assert [d.node for d in ranked] == ["q", "p"]
    assert ranked[0].mean_cosine < ranked[1].mean_cosine <= 1.0
    assert ranked[0].worst_cosine <= ranked[0].mean_cosine
    assert ranked[0].to_dict()["node"] == "q"


def test_excluding_the_worst_node_helps_the_quantised_model(tmp_path: Path) -> None:
    source = _chain(tmp_path / "chain.onnx")
    ranked = rank_int8_damage(source, _feeds(1, outlier=True), max_rows=16)
    assert ranked[0].node == "mm_a"  # the outlier channel enters there
    plain, kept = tmp_path / "plain.onnx", tmp_path / "kept.onnx"
    quantize_int8(source, plain)
    result = quantize_int8(source, kept, nodes_to_exclude=[ranked[0].node])
    assert result.excluded_nodes == ["mm_a"]
    held = _feeds(9, outlier=True)
    reference = _run(source, held)
    lost_kept = 1.0 - _cosine(reference, _run(kept, held)).mean()
    lost_plain = 1.0 - _cosine(reference, _run(plain, held)).mean()
    assert 10 * lost_kept < lost_plain  # measured: 2e-5 against 3e-3


@pytest.mark.parametrize("per_channel", [True, False])
def test_static_probe_is_onnx_runtimes_own_qdq(tmp_path: Path, per_channel: bool) -> None:
    source = _chain(tmp_path / "chain.onnx")
    feeds = _feeds(4)
    probe = onnx.load(str(source))
    ranges = activation_ranges(probe, feeds, ["x", "ta", "rb"])
    probed = build_probe(probe, per_channel, ranges=ranges)
    path = tmp_path / "probe.onnx"
    onnx.save(probe, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for i, name in enumerate(probed):
        quantized = tmp_path / f"qdq-{name}.onnx"
        quantize_static_int8(source, quantized, feeds, per_channel=per_channel,
                             nodes_to_exclude=[other for other in probed if other != name])
        mask = np.array([j == i for j in range(3)])
        got = np.concatenate([session.run(["y"], {**f, MASK_INPUT: mask})[0] for f in feeds])
        np.testing.assert_allclose(got, _run(quantized, feeds), rtol=1e-4, atol=1e-5)


def test_exclusion_pass_hands_the_worst_node_to_the_quantiser(tmp_path: Path) -> None:
    source = _chain(tmp_path / "chain.onnx")
    kept: list[str] = []
    passes = [ExcludeSensitive(1, kept), DynamicInt8Pass(keep_float=kept)]
    lines: list[str] = []
    results = run_passes(passes, source, PassContext(
        output=tmp_path / "q.onnx", calibration=_feeds(1, outlier=True), progress=lines.append))
    assert kept == ["mm_a"] and results[0].output == source
    assert results[-1].details["excluded_nodes"] == ["mm_a"]
    assert any("keeping the 1 MatMuls" in line for line in lines)


def test_unknown_activation_rounding_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="activations"):
        rank_int8_damage(_chain(tmp_path / "chain.onnx"), _feeds(1), activations="float")
