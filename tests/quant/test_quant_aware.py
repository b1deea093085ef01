"""Quantisation-aware healing: the fake quantisers equal ONNX Runtime's quantised kernels, the
switch is undone, and healing with them in the loop makes the real quantised export better."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from lrt_deploy.compress import LowRankConfig, factorize_, heal_
from lrt_deploy.compress.factor_shards import load_lowrank_factors, save_lowrank_factors
from lrt_deploy.metrics import cosine_per_row
from lrt_deploy.quant.passes.dynamic import quantize_int8
from lrt_deploy.quant.passes.smoothing import smooth_outlier_channels
from lrt_deploy.quant.passes.weight_only import quantize_weights_4bit
from lrt_deploy.quant.rules import outlier_scales
from lrt_deploy.quant.simulate import (
    FakeQuantization,
    fake_int4_blocks,
    fake_int8_per_channel,
    fake_uint8_dynamic,
    quantization_aware,
    smoothing_scales,
)


def _matmul_graph(weight: torch.Tensor, rows: int, path: Path) -> None:
    out_features, in_features = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, out_features])],
        [numpy_helper.from_array(weight.T.numpy().copy(), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, str(path))


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]


def test_fake_int8_equals_dynamic_int8_matmul(tmp_path: Path) -> None:
    torch.manual_seed(0)
    weight, x = torch.randn(40, 96), torch.randn(5, 96) * 2 + 0.3
    _matmul_graph(weight, 5, tmp_path / "m.onnx")
    quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx", per_channel=True)
    ours = nn.functional.linear(fake_uint8_dynamic(x), fake_int8_per_channel(weight)).numpy()
    exact = (x @ weight.T).numpy()
    ort_int8 = _run(tmp_path / "q.onnx", x)
    # float rounding apart, the same numbers; the quantisation error itself is 1000x larger
    assert np.abs(ort_int8 - ours).max() < 1e-4
    assert np.abs(ort_int8 - exact).max() > 0.1


@pytest.mark.parametrize("in_features", [96, 40])  # 40: a last block padded with zeros
def test_fake_int4_equals_matmul_nbits(tmp_path: Path, in_features: int) -> None:
    torch.manual_seed(1)
    weight, x = torch.randn(24, in_features), torch.randn(3, in_features)
    _matmul_graph(weight, 3, tmp_path / "m.onnx")
    quantize_weights_4bit(tmp_path / "m.onnx", tmp_path / "q.onnx", block_size=32,
                          symmetric=True)
    ours = nn.functional.linear(x, fake_int4_blocks(weight, 32)).numpy()
    ort_int4 = _run(tmp_path / "q.onnx", x)
    assert np.abs(ort_int4 - ours).max() < 1e-4
    assert np.abs(ort_int4 - (x @ weight.T).numpy()).max() > 0.1


def test_straight_through_gradient_and_restore() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 8))
    ids = torch.randint(0, 50, (4, 7))
    plain = model(ids).detach()
    with quantization_aware(model, "int8") as switched:
        assert switched == 2
        simulated = model(ids)
        simulated.square().sum().backward()
    assert not torch.allclose(simulated.detach(), plain)
    assert model[1].weight.grad is not None and model[1].weight.grad.abs().sum() > 0
    assert torch.equal(model(ids).detach(), plain)  # the class forwards are back


def test_fake_quantization_rejects_unknown_settings() -> None:
    with pytest.raises(ValueError, match="quantization must be one of"):
        FakeQuantization("int3")
    with pytest.raises(ValueError, match="power of two"):
        FakeQuantization("int4", block=24)
    with pytest.raises(ValueError, match="goes with int8"):
        FakeQuantization("int4", smooth=True)
    with pytest.raises(ValueError, match="needs the scales"):
        with quantization_aware(nn.Linear(4, 4), FakeQuantization("int8", smooth=True)):
            pass
    with pytest.raises(ValueError, match="smoothing_batches"):
        heal_(nn.Linear(4, 4), nn.Linear(4, 4), [{"input": torch.randn(2, 4)}], steps=1,
              quantization=FakeQuantization("int8", smooth=True), progress=False)


def test_outlier_scales_are_powers_of_two_for_outliers_only() -> None:
    peak = np.array([1.0, 1.2, 0.9, 1.1, 9.5, 40.0, 1.0])  # median 1.1: above 8.8 is an outlier
    scale = outlier_scales(peak)
    assert scale.tolist() == [1, 1, 1, 1, 4, 16, 1]  # 9.5/3.3 = 2.9 -> 4; 40/3.3 = 12.1 -> 16
    assert outlier_scales(np.array([1.0, 2.0, 3.0])) is None
    assert outlier_scales(np.zeros(4)) is None
    with pytest.raises(ValueError, match="target_ratio"):
        outlier_scales(peak, ratio=4.0, target=6.0)


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def _export_int4(model: nn.Module, folder: Path, name: str) -> Path:
    raw = folder / f"{name}.onnx"
    # 3-d inputs: Linear exports as MatMul + Add (a 2-d Linear would be a Gemm, left float)
    torch.onnx.export(model, (torch.randn(2, 4, 64),), str(raw), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}}, dynamo=False)
    quantized = folder / f"{name}.int4.onnx"
    quantize_weights_4bit(raw, quantized, block_size=32, symmetric=True)
    return quantized


def test_quantization_aware_healing_improves_the_real_int4_export(tmp_path: Path) -> None:
    torch.manual_seed(3)
    teacher = _Mlp().eval()
    student = copy.deepcopy(teacher)
    batches = [{"x": torch.randn(16, 4, 64)} for _ in range(8)]
    held = [{"x": torch.randn(16, 4, 64)} for _ in range(2)]
    before = _export_int4(student, tmp_path, "before")
    result = heal_(student, teacher, batches, steps=150, lr=1e-3, eval_batches=held,
                   eval_every=25, trainable="layers", quantization="int4", progress=False)
    assert result.quantization == "4-bit weights, block 32"
    assert result.improved and result.after_mean_cosine > result.before_mean_cosine
    for layer in (student.up, student.down):  # returned on the export's grid, fp16-proof
        weight = layer.weight.detach()
        assert torch.equal(fake_int4_blocks(weight, 32), weight)
        assert torch.allclose(fake_int4_blocks(weight.half().float(), 32), weight, rtol=1e-3)
    after = _export_int4(student, tmp_path, "after")
    test = torch.randn(64, 4, 64)
    reference = teacher(test).detach().numpy().reshape(-1, 64)
    gap_before = 1 - cosine_per_row(reference, _run(before, test).reshape(-1, 64)).mean()
    gap_after = 1 - cosine_per_row(reference, _run(after, test).reshape(-1, 64)).mean()
    # on inputs healing never saw, the ONNX Runtime 4-bit model is at least 2x closer
    assert gap_after < 0.5 * gap_before, (gap_before, gap_after)
    # and the simulated figure heal_ chose the step by is the real one
    x = held[0]["x"]
    with quantization_aware(student, "int4"):
        fake = student(x).detach().numpy()
    assert np.abs(_run(after, x) - fake).max() < 1e-4


def test_layers_heal_and_shards_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(4)
    teacher = nn.Sequential(nn.Embedding(30, 16), nn.Linear(16, 32), nn.Tanh(),
                            nn.Linear(32, 16)).eval()
    student = copy.deepcopy(teacher)
    factorize_(student, LowRankConfig(rank=4, solver="svd"), filter_fn=lambda m, n: n == "1")
    table_before = student[0].weight.clone()
    batches = [{"input": torch.randint(0, 30, (16, 5))} for _ in range(4)]
    result = heal_(student, teacher, batches, steps=40, lr=3e-3,
                   eval_batches=[{"input": torch.randint(0, 30, (16, 5))}], eval_every=10,
                   trainable="layers", quantization="int8", progress=False)
    assert result.steps_run == 40
    assert torch.equal(student[0].weight, table_before)  # tables never train under "layers"
    save_lowrank_factors(student, tmp_path, dtype=torch.float32, layers=True)
    rebuilt = copy.deepcopy(teacher)
    load_lowrank_factors(rebuilt, tmp_path)
    ids = torch.randint(0, 30, (3, 5))
    assert torch.equal(rebuilt(ids), student(ids))
    # a dense model healed this way travels too (shards with no low-rank unit in them)
    dense = copy.deepcopy(teacher)
    with torch.no_grad():
        dense[3].weight.add_(0.5)
    save_lowrank_factors(dense, tmp_path / "dense", dtype=torch.float32, layers=True)
    restored = copy.deepcopy(teacher)
    load_lowrank_factors(restored, tmp_path / "dense")
    assert torch.equal(restored(ids), dense(ids))


def test_int4_tables_are_uint8_pairs_equal_to_the_simulation(tmp_path: Path) -> None:
    """Embedding tables leave as GatherBlockQuantized on uint8 pairs (the ORT format has no
    INT4 tensors) and gather exactly the rows the healing loop simulated."""
    torch.manual_seed(5)
    table = torch.randn(50, 64)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], name="gather")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 64])],
        [numpy_helper.from_array(table.numpy(), "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, str(tmp_path / "g.onnx"))
    quantize_weights_4bit(tmp_path / "g.onnx", tmp_path / "q.onnx", block_size=32,
                          symmetric=True, embeddings=True)
    quantized = onnx.load(str(tmp_path / "q.onnx"))
    data = next(t for t in quantized.graph.initializer if t.name.endswith("_Q4"))
    assert data.data_type == TensorProto.UINT8 and list(data.dims) == [50, 32]
    ids = np.array([[0, 7, 49], [3, 3, 12]], dtype=np.int64)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "q.ort")
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    expected = fake_int4_blocks(table, 32)[torch.from_numpy(ids)].numpy()
    for path in ("q.onnx", "q.ort"):
        got = ort.InferenceSession(str(tmp_path / path), providers=["CPUExecutionProvider"]).run(
            None, {"ids": ids})[0]
        assert np.array_equal(got, expected), path


class _OutlierMlp(nn.Module):
    """An MLP whose input and hidden activations both have outlier channels."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 96)
        self.down = nn.Linear(96, 64)
        with torch.no_grad():
            self.up.weight[7] *= 25.0  # hidden channel 7 peaks far above the others

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))


def _outlier_inputs(seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        x = torch.randn(16, 4, 64, generator=generator)
        x[:, 1, 3] *= 30.0  # input channel 3 spikes on one token of each row
        batches.append({"x": x})
    return batches


def _export_smoothed_int8(model: nn.Module, calibration: list[dict], folder: Path,
                          name: str) -> Path:
    raw = folder / f"{name}.onnx"
    torch.onnx.export(model, (calibration[0]["x"],), str(raw), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}}, dynamo=False)
    smoothed, quantized = folder / f"{name}.smooth.onnx", folder / f"{name}.int8.onnx"
    feeds = [{"x": batch["x"].numpy()} for batch in calibration]
    result = smooth_outlier_channels(raw, smoothed, feeds)
    assert result.inputs == 2 and result.rows == 64
    quantize_int8(smoothed, quantized, per_channel=True)
    return quantized


def test_smoothed_int8_simulation_equals_the_smoothed_export(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = _OutlierMlp().eval()
    calibration = _outlier_inputs(0, 5)  # the export reads 64 rows: 4 batches of 16
    scales = smoothing_scales(model, calibration)
    assert set(scales) == {model.up, model.down}
    assert scales[model.up][3] > 1 and scales[model.down][7] > 1
    assert int((scales[model.up] != 1).sum()) == 1 and int((scales[model.down] != 1).sum()) == 1
    exported = _export_smoothed_int8(model, calibration, tmp_path, "m")
    x = _outlier_inputs(1, 1)[0]["x"]
    ort_int8 = _run(exported, x)
    with torch.no_grad():
        with quantization_aware(model, FakeQuantization("int8", smooth=True), scales):
            smoothed = model(x).numpy()
            # measured in float even while the simulation is in force
            assert all(torch.equal(scales[k], v)
                       for k, v in smoothing_scales(model, calibration).items())
        with quantization_aware(model, "int8"):
            plain = model(x).numpy()
    assert np.abs(ort_int8 - smoothed).max() < 1e-4
    # the plain simulation is far from what the smoothed export computes
    assert np.abs(ort_int8 - plain).max() > 100 * np.abs(ort_int8 - smoothed).max()


def test_padded_tokens_and_rows_past_the_limit_do_not_count() -> None:
    layer = nn.Linear(8, 4)
    x = torch.ones(4, 3, 8)
    x[0, 2, 5] = 100.0  # a padded token
    x[3, 0, 6] = 100.0  # the fourth row, past max_rows=3
    mask = torch.ones(4, 3, dtype=torch.long)
    mask[0, 2] = 0

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.layer(x)

    wrapped = Wrapped()
    assert smoothing_scales(wrapped, [{"x": x, "attention_mask": mask}], max_rows=3) == {}
    x[1, 1, 5] = 100.0  # a real token of a counted row
    scales = smoothing_scales(wrapped, [{"x": x, "attention_mask": mask}], max_rows=3)
    assert scales[layer].tolist() == [1, 1, 1, 1, 1, 32, 1, 1]  # 100/3 = 33 -> 32


def test_smoothed_int8_healing_lands_on_the_smoothed_export(tmp_path: Path) -> None:
    torch.manual_seed(7)
    teacher = _OutlierMlp().eval()
    student = copy.deepcopy(teacher)
    factorize_(student, LowRankConfig(rank=24, solver="svd"))
    calibration = _outlier_inputs(2, 4)
    spec = FakeQuantization("int8", smooth=True)
    before = _export_smoothed_int8(student, calibration, tmp_path, "before")
    result = heal_(student, teacher, _outlier_inputs(3, 8), steps=120, lr=2e-3,
                   eval_batches=_outlier_inputs(4, 2), eval_every=20, trainable="layers",
                   quantization=spec, smoothing_batches=calibration, progress=False)
    assert result.quantization == "dynamic int8, pair-safe weights, outlier channels smoothed"
    assert result.improved
    scales = smoothing_scales(student, calibration)
    assert scales  # the outliers are still there after healing
    for layer in student.modules():  # returned on the smoothed export's grid
        if isinstance(layer, nn.Linear):
            scale = scales.get(layer, torch.ones(layer.in_features))
            smoothed = layer.weight.detach() * scale
            assert torch.allclose(fake_int8_per_channel(smoothed), smoothed, rtol=1e-6, atol=0)
    after = _export_smoothed_int8(student, calibration, tmp_path, "after")
    test = _outlier_inputs(5, 4)[0]["x"]
    reference = teacher(test).detach().numpy().reshape(-1, 64)
    gap_before = 1 - cosine_per_row(reference, _run(before, test).reshape(-1, 64)).mean()
    gap_after = 1 - cosine_per_row(reference, _run(after, test).reshape(-1, 64)).mean()
    assert gap_after < 0.5 * gap_before, (gap_before, gap_after)
    with torch.no_grad(), quantization_aware(student, spec, scales):
        simulated = student(test).numpy()
    assert np.abs(_run(after, test) - simulated).max() < 1e-3
