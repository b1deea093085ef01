"""Tests for lrt_deploy.export on tiny models: ONNX export, validation, optimisation, int8,
mobile packaging and target presets."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("transformers")
import onnxruntime as ort  # noqa: E402
from tiny_models import (  # noqa: E402
    TinyLowRankMLP,
    make_tiny_encoder,
    make_tiny_mlp,
)

from lrt_deploy.errors import ExportValidationError, LrtDeployError  # noqa: E402
from lrt_deploy.export import mobile  # noqa: E402
from lrt_deploy.export.onnx_export import export_onnx  # noqa: E402
from lrt_deploy.export.passes.fixed_shape import fix_input_shapes  # noqa: E402
from lrt_deploy.export.passes.optimize import optimize_graph  # noqa: E402
from lrt_deploy.export.targets import TARGET_NAMES, Target, UnknownTargetError  # noqa: E402
from lrt_deploy.export.validate import validate_onnx  # noqa: E402
from lrt_deploy.graph.ops import count_changes, model_bytes, op_counts  # noqa: E402
from lrt_deploy.load import load_model, parse_input_spec  # noqa: E402
from lrt_deploy.nn import LowRankLinear  # noqa: E402
from lrt_deploy.quant.passes.dynamic import quantize_int8  # noqa: E402
from lrt_deploy.quant.recipes import DynamicInt8  # noqa: E402

SENTENCES = [
    "the cat sat on the mat",
    "a small dog runs fast and it is low rank",
    "this phone runs the model",
]


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _io_dims(path: Path) -> dict[str, list[int | str]]:
    graph = onnx.load(str(path)).graph
    return {v.name: _dims(v) for v in list(graph.input) + list(graph.output)}


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _numpy(batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in batch.items()}


# --- shared exports (module scope: each tiny model is exported once) -------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def bert(tiny_bert_dir: Path):
    return load_model(tiny_bert_dir)


@pytest.fixture(scope="module")
def bert_onnx(bert, work: Path) -> Path:
    return export_onnx(bert, work / "bert.raw.onnx")


@pytest.fixture(scope="module")
def bert_optimized(bert_onnx: Path, work: Path):
    target = work / "bert.opt.onnx"
    return target, optimize_graph(bert_onnx, target, "extended")


@pytest.fixture(scope="module")
def encoder(work: Path):
    path = work / "encoder.pt"
    torch.save(make_tiny_encoder(), path)
    return load_model(path, trust_pickle=True)


@pytest.fixture(scope="module")
def encoder_onnx(encoder, work: Path) -> Path:
    return export_onnx(encoder, work / "encoder.onnx")


# --- export + validation -----------------------------------------------------------------------


def test_text_export_has_dynamic_batch_and_sequence(bert, bert_onnx: Path) -> None:
    dims = _io_dims(bert_onnx)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert dims[name] == ["batch", "sequence"]
    assert dims["sentence_embedding"] == ["batch", 32]
    opsets = {o.domain: o.version for o in onnx.load(str(bert_onnx)).opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == 18
    onnx.checker.check_model(str(bert_onnx))


def test_text_export_matches_pytorch_on_other_batch_and_length(bert, bert_onnx: Path) -> None:
    example = bert.example_inputs["input_ids"].shape
    batches = [bert.tokenize(SENTENCES), bert.tokenize(SENTENCES[:1], pad_to=20)]
    shapes = {tuple(b["input_ids"].shape) for b in batches}
    assert tuple(example) not in shapes
    assert {s[0] for s in shapes} != {example[0]}
    checks = validate_onnx(bert_onnx, bert.forward, batches)
    assert [c.name for c in checks] == ["sentence_embedding"]
    assert all(c.passed for c in checks)
    assert checks[0].max_abs_diff < 1e-4
    assert checks[0].to_dict()["passed"] is True


def test_generic_export_has_dynamic_batch(encoder, encoder_onnx: Path) -> None:
    dims = _io_dims(encoder_onnx)
    assert dims["input_ids"] == ["batch", 8]
    assert dims["output"] == ["batch", 8, 8]
    batch = {"input_ids": torch.randint(0, 50, (5, 8), generator=torch.Generator().manual_seed(9))}
    checks = validate_onnx(encoder_onnx, encoder.forward, [batch])
    assert checks and all(c.passed for c in checks)


def test_torchscript_export_has_dynamic_batch(tmp_path: Path) -> None:
    traced = torch.jit.trace(make_tiny_mlp(), torch.randn(2, 16))
    path = tmp_path / "mlp.pt"
    traced.save(str(path))
    loaded = load_model(path, input_specs=[parse_input_spec("x=2,16")])
    onnx_path = export_onnx(loaded, tmp_path / "mlp.onnx")
    dims = _io_dims(onnx_path)
    assert dims["x"][0] == "batch" and dims["x"][1] == 16
    assert dims["output"][0] == "batch"
    batch = {"x": torch.randn(7, 16, generator=torch.Generator().manual_seed(3))}
    assert all(c.passed for c in validate_onnx(onnx_path, loaded.forward, [batch]))


def test_torch_export_archive_exports(tmp_path: Path) -> None:
    example = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    program = torch.export.export(make_tiny_mlp(), (example,))
    path = tmp_path / "mlp.pt2"
    torch.export.save(program, str(path))
    loaded = load_model(path)
    onnx_path = export_onnx(loaded, tmp_path / "mlp2.onnx")
    checks = validate_onnx(onnx_path, loaded.forward, [loaded.example_inputs])
    assert all(c.passed for c in checks)


def test_unreachable_opset_is_an_error_or_honoured(encoder, tmp_path: Path) -> None:
    try:
        path = export_onnx(encoder, tmp_path / "old.onnx", opset=7)
    except LrtDeployError:
        return
    opsets = {o.domain: o.version for o in onnx.load(str(path)).opset_import}
    assert opsets[""] == 7


def test_validate_reports_output_and_max_diff(encoder, encoder_onnx: Path) -> None:
    def off_by_one(batch):
        return {name: value + 1.0 for name, value in encoder.forward(batch).items()}

    with pytest.raises(ExportValidationError) as info:
        validate_onnx(encoder_onnx, off_by_one, [encoder.example_inputs])
    message = str(info.value)
    assert "output 'output'" in message
    assert "max |diff|" in message
    diff = float(re.search(r"max \|diff\| ([0-9.e+-]+)", message).group(1))
    assert diff == pytest.approx(1.0, abs=1e-3)
    assert "\n" not in message


def test_validate_reports_baked_in_shape(encoder, encoder_onnx: Path) -> None:
    def wrong_shape(batch):
        return {name: value[:1] for name, value in encoder.forward(batch).items()}

    with pytest.raises(ExportValidationError, match="shape"):
        validate_onnx(encoder_onnx, wrong_shape, [encoder.example_inputs])


def test_validate_tolerances_are_configurable(encoder, encoder_onnx: Path) -> None:
    def nudged(batch):
        return {name: value + 1e-3 for name, value in encoder.forward(batch).items()}

    with pytest.raises(ExportValidationError):
        validate_onnx(encoder_onnx, nudged, [encoder.example_inputs])
    checks = validate_onnx(encoder_onnx, nudged, [encoder.example_inputs], atol=1e-2)
    assert checks[0].passed and checks[0].atol == 1e-2


def test_lowrank_layers_export_as_two_matmuls(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyLowRankMLP().eval()
    path = tmp_path / "lowrank.pt"
    torch.save(model, path)
    loaded = load_model(path, trust_pickle=True)
    onnx_path = export_onnx(loaded, tmp_path / "lowrank.onnx")
    layers = sum(isinstance(m, LowRankLinear) for m in model.modules())
    assert layers == 2
    counts = op_counts(onnx_path)
    assert counts["MatMul"] == 2 * layers
    assert counts["Gemm"] == 0
    # The factors stay separate: each MatMul's weight is one rank-4 factor.
    graph = onnx.load(str(onnx_path)).graph
    shapes = sorted(tuple(init.dims) for init in graph.initializer if len(init.dims) == 2)
    assert shapes == sorted([(32, 4), (4, 48), (48, 4), (4, 8)])
    batch = {"x": torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(8))}
    assert all(c.passed for c in validate_onnx(onnx_path, loaded.forward, [batch]))


# --- graph helpers -----------------------------------------------------------------------------


def test_op_counts_and_changes(encoder_onnx: Path) -> None:
    counts = op_counts(encoder_onnx)
    assert counts["MatMul"] == 3 and counts["Gather"] == 1
    assert sum(counts.values()) == len(onnx.load(str(encoder_onnx)).graph.node)
    changes = count_changes(Counter(MatMul=3, Add=2), Counter(MatMulInteger=3, Add=2))
    assert changes == {"MatMul": -3, "MatMulInteger": 3}
    assert model_bytes(encoder_onnx) == encoder_onnx.stat().st_size


# --- optimisation ------------------------------------------------------------------------------


def test_optimize_fuses_skip_layernorm(bert, bert_onnx: Path, bert_optimized) -> None:
    target, result = bert_optimized
    fused = result.details["fused"]
    assert result.details["level"] == "extended"
    assert fused.get("SkipLayerNormalization", 0) > 0
    assert result.details["nodes_after"] < result.details["nodes_before"]
    assert op_counts(target)["SkipLayerNormalization"] == fused["SkipLayerNormalization"]
    assert result.to_dict()["fused"] == fused
    # Still the same function.
    batch = bert.tokenize(SENTENCES)
    before, after = _run(bert_onnx, _numpy(batch)), _run(target, _numpy(batch))
    np.testing.assert_allclose(after[0], before[0], atol=1e-5)


def test_optimize_basic_level_and_invalid_level(encoder_onnx: Path, tmp_path: Path) -> None:
    result = optimize_graph(encoder_onnx, tmp_path / "basic.onnx", "basic")
    assert result.details["level"] == "basic"
    assert (tmp_path / "basic.onnx").is_file()
    with pytest.raises(ValueError, match="optimization level"):
        optimize_graph(encoder_onnx, tmp_path / "all.onnx", "all")


# --- int8 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [True, False])
def test_quantize_int8_replaces_matmuls(
    encoder, encoder_onnx: Path, tmp_path: Path, per_channel: bool
) -> None:
    target = tmp_path / f"encoder.int8.{per_channel}.onnx"
    result = quantize_int8(encoder_onnx, target, per_channel=per_channel)
    before, after = op_counts(encoder_onnx), op_counts(target)
    replaced = before["MatMul"] - after["MatMul"]
    assert replaced > 0
    assert after["MatMulInteger"] == replaced
    assert after["DynamicQuantizeLinear"] > 0
    assert result.per_channel is per_channel
    assert result.to_dict()["per_channel"] is per_channel
    assert result.quantized_ops["MatMulInteger"] == replaced
    assert result.changes["MatMul"] == -replaced
    assert model_bytes(target) < model_bytes(encoder_onnx)
    # Close to fp32 on the example inputs.
    feeds = _numpy(encoder.example_inputs)
    ref = _run(encoder_onnx, feeds)[0].reshape(-1, 8)
    got = _run(target, feeds)[0].reshape(-1, 8)
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.min() > 0.95


def test_quantize_optimised_bert(bert_optimized, tmp_path: Path) -> None:
    source, _ = bert_optimized
    target = tmp_path / "bert.int8.onnx"
    quantize_int8(source, target)
    before, after = op_counts(source), op_counts(target)
    assert after["MatMulInteger"] == before["MatMul"] - after["MatMul"] > 0
    assert after["DynamicQuantizeLinear"] > 0
    assert target.stat().st_size < source.stat().st_size


# --- mobile packaging --------------------------------------------------------------------------


def test_ort_format_loads_and_matches_onnx(bert, bert_optimized, tmp_path: Path) -> None:
    source, _ = bert_optimized
    ort_path = mobile.to_ort_format(source, tmp_path / "model.ort")
    assert ort_path == tmp_path / "model.ort" and ort_path.is_file()
    feeds = _numpy(bert.tokenize(SENTENCES))
    np.testing.assert_allclose(_run(ort_path, feeds)[0], _run(source, feeds)[0], atol=1e-5)

    config = tmp_path / "required_operators.config"
    lines = mobile.write_required_operators(ort_path, config)
    text = config.read_text()
    assert lines and all(line in text for line in lines)
    pattern = re.compile(r"^[a-z][a-z.]*;\d+;[A-Za-z0-9_]+(,[A-Za-z0-9_]+)*$")
    assert all(pattern.match(line) for line in lines), lines
    assert any(line.startswith("ai.onnx;") for line in lines)
    ops = {op for line in lines for op in line.split(";")[2].split(",")}
    assert {"MatMul", "Softmax"} <= ops
    assert "SkipLayerNormalization" in ops  # the fused contrib op is kept in the config
    assert str(tmp_path) not in text
    assert not any(re.search(r"(^|\s)/[^\s]", line) for line in text.splitlines())
    assert "# - model.ort" in text


def test_fix_input_shapes(bert, bert_optimized, tmp_path: Path) -> None:
    source, _ = bert_optimized
    fixed = tmp_path / "fixed.onnx"
    names = fix_input_shapes(source, fixed, {"batch": 1, "sequence": 16})
    assert names == ["batch", "sequence"]
    dims = _io_dims(fixed)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert dims[name] == [1, 16]
    assert dims["sentence_embedding"] == [1, 32]
    feeds = _numpy(bert.tokenize(SENTENCES[:1], pad_to=16))
    np.testing.assert_allclose(_run(fixed, feeds)[0], _run(source, feeds)[0], atol=1e-5)


def test_fix_input_shapes_unknown_name(bert_optimized, tmp_path: Path) -> None:
    source, _ = bert_optimized
    with pytest.raises(LrtDeployError, match="tokens") as info:
        fix_input_shapes(source, tmp_path / "bad.onnx", {"tokens": 16})
    assert "batch" in str(info.value) and "sequence" in str(info.value)
    assert not (tmp_path / "bad.onnx").exists()


def test_check_mobile_usability(bert_optimized, tmp_path: Path) -> None:
    source, _ = bert_optimized
    report = mobile.check_mobile_usability(source)
    assert report.ran and report.error is None
    assert "NNAPI" in report.verdicts
    assert any(key.startswith("CoreML") for key in report.verdicts)
    assert set(report.verdicts.values()) <= {"YES", "NO", "MAYBE"}
    assert isinstance(report.usable_with_mobile_ep, bool)
    assert report.dynamic_inputs is True
    assert report.to_dict()["verdicts"] == report.verdicts


def test_check_mobile_usability_failure_is_advisory(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not an onnx file")
    report = mobile.check_mobile_usability(bogus)
    assert report.ran is False
    assert report.error is not None and "\n" not in report.error


# --- targets -----------------------------------------------------------------------------------


def test_target_presets() -> None:
    assert TARGET_NAMES == ("cpu", "cuda", "mobile")
    cpu = Target.from_name("cpu")
    assert cpu.providers == ("CPUExecutionProvider",)
    assert not cpu.ort_format and cpu.precision is None
    cuda = Target.from_name("cuda")
    assert cuda.providers[0] == "CUDAExecutionProvider"
    assert cuda.providers[-1] == "CPUExecutionProvider"
    phone = Target.from_name("mobile")
    assert phone.ort_format is True
    assert phone.check_mobile_usability is True
    assert "XnnpackExecutionProvider" in phone.providers
    assert "NnapiExecutionProvider" in phone.providers
    assert phone.providers[-1] == "CPUExecutionProvider"
    data = phone.to_dict()
    assert data["name"] == "mobile" and isinstance(data["providers"], list)


def test_target_overrides() -> None:
    target = Target.from_name(
        "mobile", precision=DynamicInt8(per_channel=False), opset=17, fixed_shape={"batch": 1},
        ort_format=False,
    )
    assert target.precision == DynamicInt8(per_channel=False)
    assert target.opset == 17 and target.fixed_shape == {"batch": 1}
    assert target.ort_format is False  # an override beats the preset default
    assert target.check_mobile_usability is True
    again = Target.cpu().with_options(optimization_level="basic")
    assert again.optimization_level == "basic" and again.name == "cpu"


def test_unknown_target_raises() -> None:
    with pytest.raises(UnknownTargetError, match="tpu") as info:
        Target.from_name("tpu")
    assert isinstance(info.value, LrtDeployError)
    assert "cpu, cuda, mobile" in str(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"precision": "int4"},
        {"precision": "fp16"},
        {"optimization_level": "all"},
        {"fixed_shape": {"batch": 0}},
    ],
)
def test_invalid_target_options_raise(overrides: dict) -> None:
    with pytest.raises(LrtDeployError):
        Target.from_name("cpu", **overrides)
