"""The pair-safe int8 grid: exact on every device class, the export and the healing loop agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lrt_deploy.quant import rules  # noqa: E402
from lrt_deploy.quant.kernels import (  # noqa: E402
    SAFE_PAIR_BOUND,
    exact_classes,
    integer_nodes,
    matmul_integer,
    pair_bound,
)
from lrt_deploy.quant.passes.dynamic import quantize_int8  # noqa: E402
from lrt_deploy.quant.passes.static import quantize_static_int8  # noqa: E402
from lrt_deploy.quant.recipes import DynamicInt8, StaticInt8, precision_from_dict  # noqa: E402
from lrt_deploy.quant.simulate import pair_safe_row_scale  # noqa: E402
from lrt_deploy.runtime.devices import DEVICE_CLASSES  # noqa: E402


@pytest.mark.parametrize(("shape", "k_axis"), [((385, 40), 0), ((40, 384), 1), ((7, 3), 0)])
def test_grid_keeps_every_pair_within_the_safe_bound(shape: tuple[int, int], k_axis: int) -> None:
    weight = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    codes, scale = rules.pair_safe_int8(weight, k_axis)
    assert pair_bound(codes, k_axis) <= SAFE_PAIR_BOUND < pair_bound(
        np.clip(np.rint(weight / (np.abs(weight).max(k_axis, keepdims=True) / 127)), -127,
                127).astype(np.int8), k_axis)  # the [-127, 127] grid would not be
    assert np.abs(codes).max() <= 127
    # within half a step of the weight: a grid, not a clamp
    assert np.abs(codes * scale - weight).max() <= 0.5 * scale.max() + 1e-7


def test_grid_settles_pairs_a_too_small_scale_would_push_over(monkeypatch) -> None:
    weight = np.random.default_rng(1).standard_normal((9, 5)).astype(np.float32)
    honest = rules.pair_safe_scale
    monkeypatch.setattr(rules, "pair_safe_scale", lambda w, k, p: honest(w, k, p) * 0.9)
    codes, _ = rules.pair_safe_int8(weight, 0)
    assert pair_bound(codes, 0) == SAFE_PAIR_BOUND


def test_torch_simulation_uses_the_same_scale() -> None:
    weight = torch.randn(24, 97, generator=torch.Generator().manual_seed(2))  # out x in, odd K
    ours = pair_safe_row_scale(weight).numpy().ravel()
    theirs = rules.pair_safe_scale(weight.numpy().T, k_axis=0).ravel()  # (K, N) layout
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def _matmul_model(path: Path, k: int = 384, n: int = 48) -> np.ndarray:
    rng = np.random.default_rng(3)
    weight = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
        [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), str(path))
    return weight


def _run(path: Path, x: np.ndarray, exact: bool = False) -> np.ndarray:
    options = ort.SessionOptions()
    if exact:  # onnxruntime's own exact kernel on x86 (a no-op where the kernel is exact)
        options.add_session_config_entry("session.x64quantprecision", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("static", [False, True])
def test_int8_export_is_exact_on_every_device_class(tmp_path: Path, static: bool) -> None:
    _matmul_model(tmp_path / "m.onnx")
    # activations spanning uint8's whole range: where full-range weights saturate on AVX2
    x = np.random.default_rng(4).uniform(-4, 4, (16, 384)).astype(np.float32)
    paths = {}
    for grid in ("pair-safe", "full-range"):
        paths[grid] = tmp_path / f"{grid}.onnx"
        if static:
            quantize_static_int8(tmp_path / "m.onnx", paths[grid], [{"x": x}], weight_grid=grid)
        else:
            quantize_int8(tmp_path / "m.onnx", paths[grid], weight_grid=grid)
    # every class running onnxruntime's integer GEMM (not SME's kernel of its own)
    gemm = [name for name, c in DEVICE_CLASSES.items() if not c.own_int8_kernel]
    assert exact_classes(paths["pair-safe"]) == gemm
    saturating = {c.name for c in DEVICE_CLASSES.values() if c.saturates_u8s8}
    assert set(exact_classes(paths["full-range"])) == set(gemm) - saturating
    # The host's default kernel computes what the exact kernel does, whichever the host has.
    np.testing.assert_array_equal(_run(paths["pair-safe"], x), _run(paths["pair-safe"], x, True))
    # The reference's saturating kernel changes nothing on the pair-safe codes; it does on the
    # full-range ones (so the check above is not vacuous on an AVX2 host).
    a = np.random.default_rng(5).integers(0, 256, (8, 384)).astype(np.uint8)
    for grid, same in (("pair-safe", True), ("full-range", False)):
        codes = _codes(paths[grid])
        saturated = matmul_integer(a, codes, saturating=True)
        assert np.array_equal(saturated, matmul_integer(a, codes, saturating=False)) == same


def _codes(path: Path) -> np.ndarray:
    model = onnx.load(str(path))
    (node,) = integer_nodes(model)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}[node.weight]


def test_pair_safe_costs_little_against_full_range_on_an_exact_kernel(tmp_path: Path) -> None:
    weight = _matmul_model(tmp_path / "m.onnx")
    x = np.random.default_rng(6).uniform(-4, 4, (64, 384)).astype(np.float32)
    error = {}
    for grid in ("pair-safe", "full-range"):
        quantize_int8(tmp_path / "m.onnx", tmp_path / f"{grid}.onnx", weight_grid=grid)
        error[grid] = np.abs(_run(tmp_path / f"{grid}.onnx", x, exact=True) - x @ weight).mean()
    # coarser than [-127, 127] by the pair bound (~1.3x here), far finer than 7 bits (2x)
    assert error["full-range"] < error["pair-safe"] < 1.6 * error["full-range"]


def test_recipes_record_the_grid_and_old_manifests_read_as_full_range() -> None:
    assert DynamicInt8().weight_grid == "pair-safe"
    assert precision_from_dict(DynamicInt8(weight_grid="full-range").to_dict()) == DynamicInt8(
        weight_grid="full-range")
    old = {"kind": "dynamic-int8", "per_channel": True, "exclude_sensitive": 0, "smooth": True}
    assert precision_from_dict(old).weight_grid == "full-range"
    assert precision_from_dict({"kind": "static-int8"}).weight_grid == "full-range"
    with pytest.raises(ValueError, match="pair-safe"):
        StaticInt8(weight_grid="7-bit")
