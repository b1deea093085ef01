"""export_bundle driven from Python, without the CLI, on tiny seeded models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("transformers")
from tiny_models import NoisyEncoder, TinyLowRankMLP, make_tiny_encoder  # noqa: E402

import lrt_deploy  # noqa: E402
from lrt_deploy.compress import LowRankConfig  # noqa: E402
from lrt_deploy.errors import BundleExistsError, ExportValidationError  # noqa: E402
from lrt_deploy.export.precision import DynamicInt8  # noqa: E402
from lrt_deploy.export.targets import Target  # noqa: E402
from lrt_deploy.load import load_model  # noqa: E402
from lrt_deploy.pipeline import BenchmarkSettings, export_bundle  # noqa: E402

FAST = BenchmarkSettings(runs=3, warmup=1)


def _pickled(tmp_path: Path, module: torch.nn.Module, name: str) -> Path:
    path = tmp_path / f"{name}.pt"
    torch.save(module, path)
    return path


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith((".lrt-export-", ".lrt-old-"))]


def test_plain_export_writes_bundle_with_baseline_and_exact_fidelity(tmp_path: Path) -> None:
    loaded = load_model(_pickled(tmp_path, make_tiny_encoder(), "encoder"), trust_pickle=True)
    out = tmp_path / "bundle"
    result = export_bundle(loaded, out, Target.cpu(), settings=FAST)

    for name in ("model.onnx", "manifest.json", "report.json", "report.md", "report.html"):
        assert (out / name).is_file(), name
    assert not (out / ".work").exists() and not _leftovers(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == result.manifest
    assert manifest["tool"] == {"name": "lrt-deploy", "version": lrt_deploy.__version__}
    assert manifest["target"]["name"] == "cpu"
    assert manifest["target"]["providers"] == ["CPUExecutionProvider"]
    assert manifest["target"]["precision"] is None
    assert manifest["variant"] == "dense fp32" and manifest["quantization"] is None
    assert manifest["lowrank"] is None
    assert manifest["sizes"]["model_onnx_bytes"] == (out / "model.onnx").stat().st_size
    assert manifest["benchmark"]["runs"] == 3

    # One variant: the dense fp32 graph is the baseline and is deployed.
    assert [v.label for v in result.variants] == ["dense fp32"]
    baseline = result.report.baseline
    assert baseline is not None and baseline.name == "dense fp32 (deployed)"
    assert result.report.speedup(baseline) == pytest.approx(1.0)
    # The ONNX graph of an uncompressed fp32 model reproduces PyTorch.
    fidelity = result.variants[0].fidelity
    assert fidelity["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert fidelity["worst_cosine"] > 0.9999
    assert fidelity["sqnr_db"] > 60
    assert result.variants[0].latency["runs"] == 3
    assert result.factorization is None and result.compression is None


def test_compressed_int8_export_has_four_measured_variants(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    loaded = load_model(tiny_bert_dir)
    out = tmp_path / "bundle"
    result = export_bundle(
        loaded, out, Target.cpu(precision=DynamicInt8()),
        compress=LowRankConfig(rank=0.5, solver="svd"), settings=FAST,
    )
    labels = [v.label for v in result.variants]
    assert labels == ["dense fp32", "dense int8", "LRT fp32", "LRT int8"]
    assert [v.is_baseline for v in result.variants] == [True, False, False, False]
    assert [v.deployed for v in result.variants] == [False, False, False, True]
    for variant in result.variants:
        assert variant.file_bytes > 0 and variant.latency["median_ms"] > 0
    sizes = {v.label: v.file_bytes for v in result.variants}
    assert sizes["dense int8"] < sizes["dense fp32"] and sizes["LRT int8"] < sizes["LRT fp32"]
    dense = result.variants[0].fidelity["mean_cosine"]
    assert dense == pytest.approx(1.0, abs=1e-5)
    assert 0.5 < result.variants[-1].fidelity["mean_cosine"] < dense

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["variant"] == "LRT int8"
    assert manifest["target"]["precision"] == {"kind": "dynamic-int8", "per_channel": True}
    assert manifest["quantization"]["mode"] == "dynamic"
    assert manifest["quantization"]["quantized_ops"]["MatMulInteger"] > 0
    assert manifest["lowrank"]["origin"] == "post-training factorization"
    assert manifest["lowrank"]["config"]["solver"] == "svd"
    assert manifest["params"]["deployed"] < manifest["params"]["dense"]
    assert result.factorization is not None and result.factorization.factorized

    # The report prints settings as words, never Python reprs, and SQNR to 0.1 dB.
    markdown = (out / "report.md").read_text()
    assert "MatMulInteger " in markdown
    assert "{'" not in markdown and "['" not in markdown
    html = (out / "report.html").read_text()
    assert "{&#x27;" not in html and "{'" not in html
    sqnr = result.variants[-1].fidelity["sqnr_db"]
    assert f"| {sqnr:.1f} |" in markdown

    # The manifest (target precision as its recipe dict) matches the shipped schema.
    jsonschema = pytest.importorskip("jsonschema")
    from lrt_deploy.schemas import load_schema

    validator = jsonschema.Draft202012Validator(load_schema("manifest"))
    assert list(validator.iter_errors(manifest)) == []
    broken = {**manifest, "target": {**manifest["target"], "precision": {"kind": "int3"}}}
    assert list(validator.iter_errors(broken))


def test_lowrank_by_design_model_is_its_own_baseline(tmp_path: Path) -> None:
    torch.manual_seed(0)
    loaded = load_model(_pickled(tmp_path, TinyLowRankMLP().eval(), "led"), trust_pickle=True)
    result = export_bundle(loaded, tmp_path / "bundle", Target.cpu(), settings=FAST)
    assert [v.label for v in result.variants] == ["LRT fp32"]
    assert result.variants[0].is_baseline and result.variants[0].deployed
    lowrank = result.manifest["lowrank"]
    assert lowrank["origin"] == "by design"
    assert sorted(layer["rank"] for layer in lowrank["layers"]) == [4, 4]
    assert [row["action"] for row in result.report.layers] == ["low-rank by design"] * 2


def test_failure_leaves_no_staging_folder_and_keeps_existing_bundle(tmp_path: Path) -> None:
    loaded = load_model(_pickled(tmp_path, make_tiny_encoder(), "encoder"), trust_pickle=True)
    out = tmp_path / "bundle"

    def fail_late(line: str) -> None:
        if line.startswith("packaging"):
            raise RuntimeError("interrupted while packaging")

    with pytest.raises(RuntimeError, match="interrupted"):
        export_bundle(loaded, out, Target.cpu(), settings=FAST, progress=fail_late)
    assert not out.exists()
    assert _leftovers(tmp_path) == []

    torch.manual_seed(0)
    noisy = load_model(_pickled(tmp_path, NoisyEncoder().eval(), "noisy"), trust_pickle=True)
    with pytest.raises(ExportValidationError):
        export_bundle(noisy, out, Target.cpu(), settings=FAST)
    assert not out.exists() and _leftovers(tmp_path) == []

    # An existing bundle is refused without force, and survives a failed forced replacement.
    export_bundle(loaded, out, Target.cpu(), settings=FAST)
    before = (out / "manifest.json").read_text()
    with pytest.raises(BundleExistsError, match="--force"):
        export_bundle(loaded, out, Target.cpu(), settings=FAST)
    with pytest.raises(RuntimeError):
        export_bundle(loaded, out, Target.cpu(), settings=FAST, force=True, progress=fail_late)
    assert (out / "manifest.json").read_text() == before
    assert _leftovers(tmp_path) == []
