"""Emulated device classes (lrt_deploy.verify.emulate): qemu's CPU models make onnxruntime pick
the kernel of the class asked for. A MatMulInteger with full-range int8 weights saturates on
x86-avx2 only; 7-bit weights are exact everywhere. A dynamically quantized matmul (what
onnxruntime fuses into DynamicQuantizeMatMul) computes the integer path's result everywhere but
on arm64-sme, whose SME kernel (KleidiAI's, under qemu >= 10) rounds otherwise yet stays close
to the float product. One emulated launch per class, all feeds in it. Skips (saying why) when
scripts/setup_devices.sh has not run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lrt_deploy.errors import LrtDeployError  # noqa: E402
from lrt_deploy.runtime.devices import DEVICE_CLASSES, classify_cpu  # noqa: E402
from lrt_deploy.verify import EMULATED, EmulationError, run_model, unavailable  # noqa: E402
from lrt_deploy.verify.emulate import qemu_binary  # noqa: E402

K, N, M = 384, 16, 4
N_DQ, W_SCALE = 64, np.float32(0.02)


def _weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    full = rng.integers(-128, 128, size=(K, N), dtype=np.int8)
    full[:, 0] = -128  # with activations at 255, every pair is -65280: below int16
    seven = rng.integers(-64, 65, size=(K, N), dtype=np.int8)
    return full, seven


def _dq_weights() -> np.ndarray:
    """7-bit, so every class's integer GEMM is exact on them: only SME's kernel differs."""
    return np.random.default_rng(2).integers(-63, 64, size=(K, N_DQ), dtype=np.int8)


def _feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    feeds = [{"a": rng.integers(0, 256, size=(M, K), dtype=np.uint8)} for _ in range(2)]
    feeds.append({"a": np.full((M, K), 255, dtype=np.uint8)})
    for feed in feeds:
        feed["x"] = rng.standard_normal((M, K)).astype(np.float32)
    return feeds


@pytest.fixture(scope="module")
def matmul_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    full, seven = _weights()
    nodes = [helper.make_node("MatMulInteger", ["a", "w_full"], ["y_full"]),
             helper.make_node("MatMulInteger", ["a", "w_seven"], ["y_seven"]),
             # onnxruntime.quantization's dynamic int8 MatMul, fused into DynamicQuantizeMatMul
             helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("Mul", ["xs", "w_scale"], ["s"]),
             helper.make_node("MatMulInteger", ["xq", "w_dq", "xz", "w_zero"], ["yi"]),
             helper.make_node("Cast", ["yi"], ["yf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["yf", "s"], ["y_dq"])]
    graph = helper.make_graph(
        nodes, "u8s8",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, K]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info(n, TensorProto.INT32, [None, N])
         for n in ("y_full", "y_seven")]
        + [helper.make_tensor_value_info("y_dq", TensorProto.FLOAT, [None, N_DQ])],
        [numpy_helper.from_array(full, "w_full"), numpy_helper.from_array(seven, "w_seven"),
         numpy_helper.from_array(_dq_weights(), "w_dq"),
         numpy_helper.from_array(np.array(W_SCALE), "w_scale"),
         numpy_helper.from_array(np.array(0, np.int8), "w_zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    path = tmp_path_factory.mktemp("emulate") / "u8s8.onnx"
    path.write_bytes(model.SerializeToString())
    return path


_runs: dict[str, list] = {}


@pytest.fixture(params=sorted(EMULATED))
def emulated(request: pytest.FixtureRequest, matmul_model: Path) -> tuple[str, list]:
    name = request.param
    reason = unavailable(name)
    if reason is not None:
        pytest.skip(reason)
    if name not in _runs:  # one launch per class for the whole file
        _runs[name] = run_model(name, matmul_model, _feeds(), timeout=300)
    return name, _runs[name]


def _exact(feed: dict[str, np.ndarray], weights: np.ndarray) -> np.ndarray:
    return feed["a"].astype(np.int64) @ weights.astype(np.int64)


def test_numpy_reference_predicts_each_class_bit_for_bit(emulated: tuple[str, list]) -> None:
    """lrt_deploy.quant.kernels predicts what each class computes, without emulation."""
    from lrt_deploy.quant.kernels import matmul_integer

    name, runs = emulated
    full, seven = _weights()
    saturating = DEVICE_CLASSES[name].saturates_u8s8
    for out, feed in zip(runs, _feeds(), strict=True):
        for got, weights in ((out[0], full), (out[1], seven)):
            np.testing.assert_array_equal(
                got, matmul_integer(feed["a"], weights, saturating=saturating))


def test_full_range_weights_saturate_on_avx2_only(emulated: tuple[str, list]) -> None:
    name, runs = emulated
    full, _ = _weights()
    feeds = _feeds()
    assert len(runs) == len(feeds)
    exact = [np.array_equal(out[0], _exact(feed, full))
             for out, feed in zip(runs, feeds, strict=True)]
    if DEVICE_CLASSES[name].saturates_u8s8:
        assert not any(exact), f"{name} computed full-range int8 weights exactly"
        # column 0 of the all-255 feed: each pair saturates at -32768, 192 pairs
        assert runs[2][0][0, 0] == -32768 * (K // 2)
    else:
        assert all(exact), f"{name} is not exact on full-range int8 weights"


def test_seven_bit_weights_exact_everywhere(emulated: tuple[str, list]) -> None:
    name, runs = emulated
    _, seven = _weights()
    for out, feed in zip(runs, _feeds(), strict=True):
        assert out[1].dtype == np.int32
        np.testing.assert_array_equal(out[1], _exact(feed, seven), err_msg=name)


def test_worker_reports_the_emulated_class(emulated: tuple[str, list]) -> None:
    name, runs = emulated
    cpu = runs.cpu
    assert cpu["machine"] == EMULATED[name].machine
    assert classify_cpu(cpu["machine"], set(cpu["flags"])) == name
    assert cpu["onnxruntime"] == ort.__version__
    if cpu["machine"] == "aarch64":
        # SME (HWCAP2 bit 23) with SVE on arm64-sme only: elsewhere it changes the kernel
        assert ("sme" in cpu["flags"]) == (name == "arm64-sme"), cpu
        assert ("sve" in cpu["flags"]) == (name == "arm64-sme"), cpu
        assert (int(cpu["hwcap2"], 16) >> 23 & 1) == (name == "arm64-sme")


def _dq_integer_path(x: np.ndarray) -> np.ndarray:
    """DynamicQuantizeLinear then the exact integer product, scaled: what every integer GEMM
    computes (ONNX's definition; float32 scale, round half to even)."""
    x = x.astype(np.float32)
    low, high = np.float32(min(0.0, x.min())), np.float32(max(0.0, x.max()))
    scale = np.float32((high - low) / np.float32(255))
    zero = np.clip(np.rint(-low / scale), 0, 255)
    q = np.clip(np.rint(x / scale) + zero, 0, 255)
    acc = (q.astype(np.int64) - int(zero)) @ _dq_weights().astype(np.int64)
    return acc.astype(np.float32) * np.float32(scale * W_SCALE)


def test_dynamic_quantized_matmul_is_close_to_the_float_product(
        emulated: tuple[str, list]) -> None:
    name, runs = emulated
    own_kernel = DEVICE_CLASSES[name].own_int8_kernel
    for out, feed in zip(runs, _feeds(), strict=True):
        y = out[2].astype(np.float64)
        dense = feed["x"].astype(np.float64) @ (_dq_weights() * np.float64(W_SCALE))
        scale = np.abs(dense).max()
        # not garbage (qemu 7.2 under SME: ~150%): activation rounding only, ~1% here
        assert np.abs(y - dense).max() / scale < 0.02, name
        # integer path: exact but for a rare rounding tie of one activation code
        apart = np.abs(y - _dq_integer_path(feed["x"])).max() / scale
        if own_kernel:
            assert apart > 1e-3, f"{name} computed the integer GEMM's result, not its own"
        else:
            assert apart < 1e-4, f"{name} is {apart:.2e} from the integer path"


def test_unavailable_says_why_without_launching() -> None:
    assert "AVX-512" in unavailable("x86-avx512")
    assert "VNNI" in unavailable("x86-vnni")
    assert "Node" in unavailable("wasm")
    assert "unknown device class" in unavailable("x86-mmx")
    with pytest.raises(EmulationError, match="cannot be emulated"):
        run_model("x86-vnni", Path("missing.onnx"), [])
    assert issubclass(EmulationError, LrtDeployError)


def test_sme_needs_qemu_10(monkeypatch: pytest.MonkeyPatch) -> None:
    sme = dataclasses.replace(EMULATED["arm64-sme"], binary="missing/qemu-aarch64")
    if qemu_binary(sme) is not None:
        pytest.skip(f"the system's qemu is >= 10 ({qemu_binary(sme)})")
    monkeypatch.setitem(EMULATED, "arm64-sme", sme)
    reason = unavailable("arm64-sme")
    assert reason is not None and "qemu >= 10" in reason and "setup_devices.sh" in reason
    with pytest.raises(EmulationError, match="qemu >= 10"):
        run_model("arm64-sme", Path("missing.onnx"), [])


def test_a_failing_run_raises_with_the_worker_stderr(tmp_path: Path) -> None:
    name = "x86-sse"
    reason = unavailable(name)
    if reason is not None:
        pytest.skip(reason)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(EmulationError,
                       match=r"x86-sse: worker .* exited 1: .*(onnxruntime|ONNX|Protobuf)"):
        run_model(name, broken, [{"a": np.zeros((1, K), np.uint8)}], timeout=300)


def test_a_cpu_model_of_another_class_is_refused(matmul_model: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    name = "x86-avx2"
    reason = unavailable(name)
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setitem(EMULATED, name, dataclasses.replace(EMULATED[name], cpu="Nehalem"))
    with pytest.raises(EmulationError, match="which is x86-sse, not x86-avx2"):
        run_model(name, matmul_model, _feeds()[:1], timeout=300)


# onnxruntime refuses an .onnx file under this entry: proof that a session applied the config.
_ORT_ONLY = {"session.load_model_format": "ORT"}


def test_worker_applies_the_bundle_session_config(matmul_model: Path, tmp_path: Path) -> None:
    from lrt_deploy.verify import worker

    feeds = _feeds()[:1]
    np.savez(tmp_path / "feeds.npz", **{f"0/{k}": v for k, v in feeds[0].items()})
    (tmp_path / "model_path.txt").write_text(str(matmul_model))
    (tmp_path / "session_config.json").write_text('{"session.intra_op.allow_spinning": "0"}')
    worker.main(tmp_path)
    with np.load(tmp_path / "outputs.npz") as out:
        np.testing.assert_array_equal(out["0/1"], _exact(feeds[0], _weights()[1]))
    (tmp_path / "session_config.json").write_text(json.dumps(_ORT_ONLY))
    with pytest.raises(Exception, match="ORT model verification failed"):
        worker.main(tmp_path)


def test_an_emulated_run_applies_the_session_config(matmul_model: Path) -> None:
    name = "x86-sse"
    reason = unavailable(name)
    if reason is not None:
        pytest.skip(reason)
    with pytest.raises(EmulationError, match="ORT model verification failed"):
        run_model(name, matmul_model, _feeds()[:1], timeout=300, session_config=_ORT_ONLY)


@pytest.fixture
def text_model(tmp_path: Path) -> tuple[Path, Path]:
    """A graph of ``input_ids`` and ``attention_mask`` and a matching ``verification.npz``."""
    from lrt_deploy.verify.check import write_reference

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["y"], to=TensorProto.FLOAT),
         helper.make_node("Identity", ["attention_mask"], ["mask"])], "text",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
         for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence"]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "sequence"])])
    model = tmp_path / "model.onnx"
    model.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                        ir_version=8).SerializeToString())
    ids = np.arange(1, 13, dtype=np.int64).reshape(3, 4)
    mask = np.ones_like(ids)
    write_reference(tmp_path / "verification.npz",
                    {"heldout": ({"input_ids": ids, "attention_mask": mask},
                                 ids.astype(np.float32))})
    return model, tmp_path / "verification.npz"


def test_device_verification_opens_sessions_with_the_bundle_config(
        text_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from lrt_deploy.errors import BundleError
    from lrt_deploy.verify import check

    model, reference = text_model
    table = check.verify_model(model, reference, [], classes=["host"], sample=2,
                               session_config={"session.intra_op.allow_spinning": "0"})
    host = table.check(table.host or "host")
    assert host.verified and host.figures["heldout"]["worst"] > 0.9999
    with pytest.raises(BundleError, match="cannot open model.onnx: .*ORT model verification"):
        check.verify_model(model, reference, [], classes=["host"], session_config=_ORT_ONLY)
    # onnxruntime-web is run without config entries: a bundle that sets some is not verified there
    monkeypatch.setattr(check, "wasm_unavailable", lambda: None)
    monkeypatch.setattr(check, "run_wasm", lambda *_: pytest.fail("wasm ran"))
    table = check.verify_model(model, reference, [], classes=["wasm"], sample=1,
                               session_config={"session.intra_op.allow_spinning": "0"})
    wasm = table.check("wasm")
    assert not wasm.verified and "session.intra_op.allow_spinning" in wasm.reason


def test_an_unclassified_host_is_verified_without_a_reason(
        text_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU no device class describes still runs natively: its row is verified, no reason."""
    from lrt_deploy.verify import check

    model, reference = text_model
    monkeypatch.setattr(check, "host_class", lambda: None)
    table = check.verify_model(model, reference, [], classes=["host"], sample=1)
    host = table.check("host")
    assert host.verified and host.reason is None
    assert host.figures["heldout"]["worst"] > 0.9999


def test_the_manifest_session_config_is_read_once_for_session_and_verification() -> None:
    from lrt_deploy.errors import BundleError
    from lrt_deploy.runtime.bundle import session_config

    assert session_config(None) == {}
    assert session_config({"devices": {"session_config": {"a.b": "1"}}}) == {"a.b": "1"}
    with pytest.raises(BundleError, match="devices.session_config"):
        session_config({"devices": {"session_config": {"a.b": 1}}})
