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
from lrt_deploy.config import HealConfig  # noqa: E402
from lrt_deploy.errors import BundleExistsError, ExportValidationError  # noqa: E402
from lrt_deploy.export.targets import Target  # noqa: E402
from lrt_deploy.load import load_model, parse_input_spec  # noqa: E402
from lrt_deploy.pipeline import BenchmarkSettings, export_bundle  # noqa: E402
from lrt_deploy.quant.recipes import DynamicInt8  # noqa: E402

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
    assert manifest["target"]["precision"] == {"kind": "dynamic-int8", "per_channel": True,
                                                  "exclude_sensitive": 0, "smooth": True,
                                                  "weight_grid": "pair-safe"}
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


class _LEDBlocks(torch.nn.Module):
    """Blocks whose projection and FFN are greenformer LED pairs ``Sequential(Linear(no
    bias), Linear)``: a model trained low-rank, with no dense twin of its own."""

    def __init__(self, hidden: int = 32, rank: int = 4) -> None:
        super().__init__()

        def led(inp: int, out: int) -> torch.nn.Sequential:
            return torch.nn.Sequential(
                torch.nn.Linear(inp, rank, bias=False), torch.nn.Linear(rank, out)
            )

        self.proj, self.up, self.down = led(hidden, hidden), led(hidden, 96), led(96, hidden)
        self.norm = torch.nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.proj(x)
        return self.norm(x + self.down(torch.relu(self.up(x))))


def _by_design(tmp_path: Path, case: str):
    torch.manual_seed(0)
    if case == "lowranklinear":
        return load_model(
            _pickled(tmp_path, TinyLowRankMLP().eval(), "lowrank"), trust_pickle=True
        )
    model = _LEDBlocks().eval()
    example = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(4))
    if case == "torchscript":
        path = tmp_path / "led.ts.pt"
        torch.jit.trace(model, example).save(str(path))
        return load_model(path, input_specs=[parse_input_spec("x=2,7,32")])
    path = tmp_path / "led.pt2"
    program = torch.export.export(
        model, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
    )
    torch.export.save(program, str(path))
    return load_model(path)


@pytest.mark.parametrize(
    ("case", "made_from"),
    [("torchscript", "onnx graph"), ("pt2", "onnx graph"), ("lowranklinear", "module")],
)
def test_lowrank_by_design_model_is_compared_with_its_dense_equivalent(
    tmp_path: Path, case: str, made_from: str
) -> None:
    loaded = _by_design(tmp_path, case)
    out = tmp_path / "bundle"
    result = export_bundle(loaded, out, Target.cpu(precision=DynamicInt8()), settings=FAST)

    labels = [v.label for v in result.variants]
    assert labels == ["dense fp32", "dense int8", "LRT fp32", "LRT int8"]
    assert [v.is_baseline for v in result.variants] == [True, False, False, False]
    assert [v.deployed for v in result.variants] == [False, False, False, True]
    rows = {v.label: v for v in result.variants}
    # Multiplying the pairs out computes the same function as the deployed model.
    assert rows["dense fp32"].fidelity["mean_cosine"] >= 0.9999
    assert rows["LRT fp32"].fidelity["mean_cosine"] >= 0.9999
    assert rows["dense int8"].fidelity["mean_cosine"] > 0.99
    # fp32 only: on models this tiny each quantised MatMul's scales and casts outweigh the
    # bytes int8 saves, so the int8 LRT graph need not be the smaller one.
    assert result.report.size_ratio(result.report.variants[2]) < 1.0
    assert rows["dense fp32"].validation and all(c["passed"] for c in rows["dense fp32"].validation)

    baseline = result.manifest["lowrank"]["baseline"]
    assert baseline["kind"] == "dense-equivalent" and baseline["fidelity_comparable"]
    assert baseline["made_from"] == made_from
    if made_from == "onnx graph":
        fold = baseline["fold"]
        assert fold["pairs"] == 3
        # Dense parameters: the factors replaced by their products (32x32, 32x96, 96x32).
        assert fold["params_after"] == 32 * 32 + 2 * 32 * 96
        if rows["LRT fp32"].params is not None:
            assert rows["dense fp32"].params == (
                rows["LRT fp32"].params - fold["params_before"] + fold["params_after"])
    else:
        assert baseline["fold"] is None and baseline["units"] == 2
        assert result.manifest["params"]["deployed"] < result.manifest["params"]["dense"]
    assert result.manifest["variant"] == "LRT int8"
    jsonschema = pytest.importorskip("jsonschema")
    from lrt_deploy.schemas import load_schema

    validator = jsonschema.Draft202012Validator(load_schema("manifest"))
    assert list(validator.iter_errors(result.manifest)) == []

    markdown = (out / "report.md").read_text()
    assert "Baseline: dense-equivalent (low-rank pairs multiplied out)" in markdown
    assert "by-design PyTorch fp32 model" in markdown
    table = markdown.split("| Variant | Size (MB)")[1].split("\n\n")[0].splitlines()
    assert [row.split(" | ")[0] for row in table[2:]] == [
        "| dense fp32 (baseline)", "| dense int8", "| LRT fp32", "| LRT int8 (deployed)"]
    assert "Baseline: dense-equivalent" in (out / "report.html").read_text()


class _LinformerBlocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from lrt_deploy.nn import LinformerSelfAttention

        self.attention = torch.nn.ModuleList(
            LinformerSelfAttention(32, 4, 16, 4) for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.attention:
            x = x + layer(x)
        return x

    def example_inputs(self) -> tuple[torch.Tensor]:
        return (torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(5)),)


def test_linformer_by_design_baseline_fidelity_is_not_comparable(tmp_path: Path) -> None:
    torch.manual_seed(0)
    loaded = load_model(
        _pickled(tmp_path, _LinformerBlocks().eval(), "linformer"), trust_pickle=True
    )
    out = tmp_path / "bundle"
    result = export_bundle(loaded, out, Target.cpu(), settings=FAST)

    assert [v.label for v in result.variants] == ["dense fp32", "Linformer fp32"]
    dense, linformer = result.variants
    assert dense.is_baseline and linformer.deployed
    # No cosine for a different function; the Linformer graph still matches its PyTorch.
    assert dense.fidelity == {} and result.report.variants[0].fidelity == {}
    assert linformer.fidelity["mean_cosine"] == pytest.approx(1.0, abs=1e-5)
    baseline = result.manifest["lowrank"]["baseline"]
    assert baseline["kind"] == "standard-attention" and not baseline["fidelity_comparable"]
    assert baseline["units"] == 2

    markdown = (out / "report.md").read_text()
    assert "Baseline: standard attention over the same weights; fidelity not comparable" in (
        markdown)
    assert "fidelity not comparable: standard attention is a different function" in markdown
    dense_row = next(line for line in markdown.splitlines()
                     if line.startswith("| dense fp32"))
    assert dense_row.rstrip(" |").split("|")[-1].strip() == "-"


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
    with pytest.raises(BundleExistsError, match="force=True"):
        export_bundle(loaded, out, Target.cpu(), settings=FAST)
    with pytest.raises(RuntimeError):
        export_bundle(loaded, out, Target.cpu(), settings=FAST, force=True, progress=fail_late)
    assert (out / "manifest.json").read_text() == before
    assert _leftovers(tmp_path) == []


def test_heal_corpus_needs_a_text_model_that_heals(tmp_path: Path) -> None:
    from lrt_deploy.errors import LrtDeployError

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one sentence\n", encoding="utf-8")
    loaded = load_model(_pickled(tmp_path, make_tiny_encoder(), "encoder"), trust_pickle=True)
    for options, message in (
        ({}, "needs a factorization"),
        ({"compress": LowRankConfig(rank=0.5)}, "HealConfig.corpus is text that healing streams"),
    ):
        with pytest.raises(LrtDeployError, match=message):
            export_bundle(loaded, tmp_path / "bundle", Target.cpu(), settings=FAST,
                          heal=HealConfig(2, corpus=corpus), **options)
        assert not (tmp_path / "bundle").exists() and _leftovers(tmp_path) == []
