"""The numpy integer GEMM equals onnxruntime's on this host, and the pair bound is the exact
condition for the saturating U8S8 kernel to match the exact one."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from lrt_deploy.quant.kernels import (
    SAFE_PAIR_BOUND,
    exact_classes,
    integer_nodes,
    is_pair_safe,
    matmul_integer,
    pair_bound,
    saturation_by_node,
)
from lrt_deploy.runtime.devices import DEVICE_CLASSES, device_class, host_class

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

HOST = host_class()
HOST_SATURATES = HOST is not None and device_class(HOST).saturates_u8s8
needs_known_host = pytest.mark.skipif(HOST is None, reason="host device class unknown")


def _model(nodes, inputs, outputs, initializers, opset=13):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, ir_version=8, opset_imports=[
        helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])


def _session(model, optimize=True):
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _ort_matmul_integer(a, b, za, zb, b_initializer):
    inputs = [helper.make_tensor_value_info("a", TensorProto.UINT8, a.shape)]
    inits = [numpy_helper.from_array(np.asarray(za, np.uint8), "za"),
             numpy_helper.from_array(np.asarray(zb, np.int8), "zb")]
    feeds = {"a": a}
    if b_initializer:
        inits.append(numpy_helper.from_array(b, "b"))
    else:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.INT8, b.shape))
        feeds["b"] = b
    node = helper.make_node("MatMulInteger", ["a", "b", "za", "zb"], ["y"], name="mm")
    out = helper.make_tensor_value_info("y", TensorProto.INT32, None)
    return _session(_model([node], inputs, [out], inits)).run(None, feeds)[0]


@needs_known_host
@pytest.mark.parametrize("k", [1, 2, 7, 128, 129, 384])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("b_initializer", [False, True])
def test_reference_matches_onnxruntime(k, batched, b_initializer):
    rng = np.random.default_rng(k)
    a = rng.integers(0, 256, (3, 5, k) if batched else (5, k), dtype=np.uint8)
    a[..., ::2] |= 0xC0  # large activations make full-range int8 weights saturate
    b = rng.integers(-128, 128, (k, 11), dtype=np.int8)
    for za, zb in [(0, np.int8(0)), (131, np.int8(-7)),
                   (17, rng.integers(-30, 30, 11).astype(np.int8))]:
        got = _ort_matmul_integer(a, b, za, zb, b_initializer)
        want = matmul_integer(a, b, np.uint8(za), zb, saturating=HOST_SATURATES)
        np.testing.assert_array_equal(got, want)
    if k >= 128:  # the data do exercise saturation, whatever this host computes
        assert not np.array_equal(matmul_integer(a, b, saturating=True),
                                  matmul_integer(a, b, saturating=False))


def test_exact_equals_int64_product():
    rng = np.random.default_rng(0)
    for a_type, b_type in itertools.product((np.uint8, np.int8), repeat=2):
        info_a, info_b = np.iinfo(a_type), np.iinfo(b_type)
        a = rng.integers(info_a.min, info_a.max + 1, (2, 4, 77), dtype=a_type)
        b = rng.integers(info_b.min, info_b.max + 1, (77, 6), dtype=b_type)
        za, zb = a_type(3), rng.integers(0, 9, 6).astype(b_type)
        want = (a.astype(np.int64) - 3) @ (b.astype(np.int64) - zb.astype(np.int64))
        got = matmul_integer(a, b, za, zb, saturating=False)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
        if (a_type, b_type) != (np.uint8, np.int8):  # only U8S8 has a saturating kernel
            np.testing.assert_array_equal(matmul_integer(a, b, za, zb, saturating=True), want)


def _boundary_columns() -> np.ndarray:
    """(2, N) int8 weight pairs around the bound 128, both signs, plus the extremes."""
    pairs = set()
    for total in (127, 128, 129, 130):
        for w0 in range(total - 127, 128, 3):
            w1 = total - w0
            if 0 <= w1 <= 127:
                pairs.add((w0, w1))
            if -128 <= -w0 and -128 <= -w1:
                pairs.add((-w0, -w1))
    pairs.update({(-128, -128), (127, 127), (-128, 127), (127, -128), (-128, 0), (-1, -128),
                  (1, 127), (0, 0)})
    return np.array(sorted(pairs), np.int8).T


def test_pair_safe_is_exact_condition_by_brute_force():
    b = _boundary_columns()
    grid = np.arange(256, dtype=np.uint8)
    a = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)  # every uint8 pair
    sat = matmul_integer(a, b, saturating=True)
    exact = matmul_integer(a, b, saturating=False)
    for n in range(b.shape[1]):
        column = b[:, n:n + 1]
        differs = not np.array_equal(sat[:, n], exact[:, n])
        assert is_pair_safe(column) == (not differs), column.ravel()
        assert (pair_bound(column) <= SAFE_PAIR_BOUND) == is_pair_safe(column)
    assert {is_pair_safe(b[:, n:n + 1]) for n in range(b.shape[1])} == {True, False}
    if HOST is not None:  # the same brute force through the host's kernel
        got = _ort_matmul_integer(a, b, 0, np.int8(0), b_initializer=True)
        np.testing.assert_array_equal(got, sat if HOST_SATURATES else exact)


def test_pair_bound_pairs_along_axis_and_pads_odd_k():
    w = np.array([[100, 28], [29, 0], [-128, 0]], np.int8)  # K=3 along axis 0
    assert pair_bound(w) == 129  # (100, 29) in column 0; row 2 pairs with padding
    assert pair_bound(w.T, axis=1) == 129
    assert pair_bound(np.array([[127], [-128], [-128]], np.int8)) == 128
    assert is_pair_safe(np.array([[-128], [127]], np.int8))  # mixed signs never add up
    assert not is_pair_safe(np.array([[-1], [-128]], np.int8))
    with pytest.raises(TypeError):
        pair_bound(np.zeros((2, 2), np.uint8))


@pytest.fixture(scope="module")
def quantized_models(tmp_path_factory) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = tmp_path_factory.mktemp("kernels")
    rng = np.random.default_rng(1)
    weight = rng.uniform(-1, 1, (96, 24)).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 96])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   [numpy_helper.from_array(weight, "w")])
    onnx.save(model, folder / "float.onnx")
    paths = {}
    for name, reduce_range in (("full", False), ("7bit", True)):
        paths[name] = folder / f"{name}.onnx"
        quantize_dynamic(folder / "float.onnx", paths[name], weight_type=QuantType.QInt8,
                         reduce_range=reduce_range)
    return paths


def test_exact_classes_full_range_vs_7bit(quantized_models):
    full = integer_nodes(onnx.load(quantized_models["full"]))
    seven = integer_nodes(onnx.load(quantized_models["7bit"]))
    assert [(n.op_type, n.kernel, n.k) for n in full] == [("MatMulInteger", "u8s8", 96)]
    assert not full[0].pair_safe and full[0].pair_bound > SAFE_PAIR_BOUND
    assert seven[0].pair_safe and seven[0].pair_bound <= SAFE_PAIR_BOUND
    gemm = [name for name, c in DEVICE_CLASSES.items() if not c.own_int8_kernel]
    assert exact_classes(quantized_models["7bit"]) == gemm
    assert exact_classes(quantized_models["full"]) == [
        name for name in gemm if not DEVICE_CLASSES[name].saturates_u8s8]


def test_saturation_by_node_finds_error_only_at_full_range(quantized_models):
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.uniform(0, 1, (16, 96)).astype(np.float32) ** 0.2} for _ in range(2)]
    full = saturation_by_node(quantized_models["full"], feeds)
    seven = saturation_by_node(quantized_models["7bit"], feeds)
    assert [r["op_type"] for r in full] == ["MatMulInteger"]
    assert full[0]["max_abs_error"] > 0 and 0 < full[0]["fraction_differ"] <= 1
    assert full[0]["outputs"] == 2 * 16 * 24 and full[0]["k"] == 96
    assert seven[0]["max_abs_error"] == 0 and seven[0]["fraction_differ"] == 0


def test_integer_nodes_qdq_and_weight_only():
    rng = np.random.default_rng(3)
    w = rng.integers(-128, 128, (40, 8), dtype=np.int8)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(0.01), "sw"),
             numpy_helper.from_array(np.int8(0), "zw"),
             numpy_helper.from_array(np.float32(0.01), "sx"),
             numpy_helper.from_array(np.int8(0), "zx")]
    x = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 40])]
    y = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    dq_w = helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"])
    qdq = _model([helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]), dq_w,
                  helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")], x, y, inits, 21)
    weight_only = _model([dq_w, helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")],
                         x, y, inits, 21)
    [node] = integer_nodes(qdq)
    assert (node.name, node.kernel, node.k) == ("mm", "u8s8", 40)
    assert node.pair_bound == pair_bound(w)
    assert integer_nodes(weight_only) == []
    assert exact_classes(weight_only) == list(DEVICE_CLASSES)


@needs_known_host
def test_qattention_gemm_matches_reference():
    rng = np.random.default_rng(5)
    batch, seq, hidden, heads = 2, 6, 64, 2
    x = rng.integers(0, 256, (batch, seq, hidden), dtype=np.uint8)
    x[..., ::2] |= 0xC0
    w = rng.integers(-128, 128, (hidden, 3 * hidden), dtype=np.int8)
    bias = rng.normal(0, 0.1, 3 * hidden).astype(np.float32)
    si, sw, zi, zw = np.float32(0.01), np.float32(0.0005), np.uint8(100), np.int8(3)
    inits = [numpy_helper.from_array(v, n) for v, n in
             ((w, "w"), (bias, "bias"), (si, "si"), (sw, "sw"), (zi, "zi"), (zw, "zw"))]
    node = helper.make_node("QAttention", ["x", "w", "bias", "si", "sw", "", "zi", "zw"], ["y"],
                            domain="com.microsoft", num_heads=heads, name="qa")
    model = _model([node], [helper.make_tensor_value_info("x", TensorProto.UINT8, x.shape)],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    got = _session(model).run(None, {"x": x})[0]

    def attention(saturating):
        qkv = matmul_integer(x, w, zi, zw, saturating=saturating) * float(si * sw) + bias
        size = hidden // heads
        q, k, v = (t.reshape(batch, seq, heads, size).transpose(0, 2, 1, 3)
                   for t in np.split(qkv, 3, -1))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(size)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return (p @ v).transpose(0, 2, 1, 3).reshape(batch, seq, hidden)

    np.testing.assert_allclose(got, attention(HOST_SATURATES), atol=1e-5)
    assert np.abs(attention(True) - attention(False)).max() > 1e-2
    [found] = integer_nodes(model)
    assert (found.op_type, found.kernel, found.k, found.pair_safe) == ("QAttention", "u8s8", 64,
                                                                      False)
