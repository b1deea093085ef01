"""Tests for lrt_deploy.report: ratios come from the measured values, files are written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fake_reports import CPU_REPORT, FALLBACK_REPORT, make_report  # noqa: E402

from lrt_deploy.export.build import ModelKind, PrecisionRecord, ProviderReport, Variant
from lrt_deploy.report import (
    ComparisonReport,
    VariantResult,
    format_table,
    to_html,
    to_markdown,
    write_json,
    write_report,
)
from lrt_deploy.report.render.tables import MAX_LAYER_ROWS, layer_table

DENSE, LRT = ModelKind.DENSE, ModelKind.LRT


def variant_entry(data: dict, name: str) -> dict:
    return next(v for v in data["variants"] if v["name"] == name)


def test_ratios_are_computed_from_measurements():
    data = make_report().to_dict()
    assert data["baseline"] == "dense fp32"
    dense, lrt, int8 = (variant_entry(data, n) for n in ("dense fp32", "LRT fp32", "LRT int8"))
    assert dense["size_ratio"] == 1.0 and dense["speedup"] == 1.0
    assert lrt["size_ratio"] == 0.5
    assert lrt["speedup"] == 2.0
    assert lrt["params_ratio"] == 0.5
    assert int8["size_ratio"] == 0.125
    assert int8["speedup"] == 3.0
    assert int8["params_ratio"] is None
    assert lrt["size_mb"] == 40.0
    assert lrt["latency"] == {"median_ms": 6.0, "p90_ms": 7.0}


def test_ratios_follow_the_data_not_constants():
    report = make_report()
    report.variants[1].file_bytes = 20_000_000
    report.variants[1].latency["median_ms"] = 3.0
    data = report.to_dict()
    assert variant_entry(data, "LRT fp32")["size_ratio"] == 0.25
    assert variant_entry(data, "LRT fp32")["speedup"] == 4.0


def test_markdown_table():
    markdown = to_markdown(make_report())
    assert "batch 1 · sequence 128 · threads 2 · provider CPUExecutionProvider" in markdown
    assert (
        "| Variant | Size (MB) | Size vs baseline | Median (ms) | p90 (ms) | Speedup "
        "| Mean cosine | Worst cosine |" in markdown
    )
    assert "| dense fp32 (baseline) | 80.00 | 1x | 12.00 | 13.50 | 1x | - | - |" in markdown
    assert "| LRT fp32 | 40.00 | 0.5x | 6.00 | 7.00 | 2x | 0.9991 | 0.9812 |" in markdown
    assert "| LRT int8 | 10.00 | 0.125x | 4.00 | 4.40 | 3x | 0.9950 | 0.9700 |" in markdown
    assert "| encoder.layer.0.attention.self.query | 384x384 | 96 | factorized |" in markdown
    assert "| pooler.dense | 384x384 | - | kept dense |" in markdown
    assert "FusedMatMul 12" in markdown
    assert "- LRT int8: dynamic int8, per-channel weights" in markdown
    assert "Fidelity measured on: 32 held-out sentences" in markdown
    assert "fallback" not in markdown.lower()
    assert format_table(make_report()) in markdown


def test_fallback_line_when_provider_fell_back():
    report = make_report(FALLBACK_REPORT)
    expected = "requested XnnpackExecutionProvider, ran on CPUExecutionProvider (fallback)"
    assert report.fallback_line() == expected
    assert f"**Provider fallback:** {expected}" in to_markdown(report)
    assert FALLBACK_REPORT["message"] in to_markdown(report)
    assert report.to_dict()["provider_fallback"] == expected


def test_fallback_line_from_settings_alone():
    report = ComparisonReport(
        model="m",
        variants=[VariantResult("dense fp32", 100, is_baseline=True)],
        settings={
            "provider_requested": "CUDAExecutionProvider",
            "provider_active": ["CPUExecutionProvider"],
        },
    )
    assert report.fallback_line() == (
        "requested CUDAExecutionProvider, ran on CPUExecutionProvider (fallback)"
    )


def test_no_baseline_shows_no_ratios():
    report = ComparisonReport(
        model="m",
        variants=[VariantResult("a", 100, latency={"median_ms": 1.0}), VariantResult("b", 50)],
    )
    data = report.to_dict()
    assert data["baseline"] is None
    assert all(v["size_ratio"] is None and v["speedup"] is None for v in data["variants"])
    assert "No variant is marked as baseline" in to_markdown(report)


def test_validation():
    with pytest.raises(ValueError, match="only one variant can be the baseline"):
        ComparisonReport(
            "m", [VariantResult("a", 1, is_baseline=True), VariantResult("b", 1, is_baseline=True)]
        )
    with pytest.raises(ValueError, match="unique"):
        ComparisonReport("m", [VariantResult("a", 1), VariantResult("a", 2)])
    with pytest.raises(ValueError, match="file_bytes"):
        VariantResult("a", -1)


def test_json_round_trip(tmp_path):
    report = make_report(FALLBACK_REPORT)
    report.variants[2].fidelity["sqnr_db"] = math.nan
    path = write_json(report, tmp_path / "report.json")
    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(report.to_dict()))
    assert variant_entry(data, "LRT int8")["fidelity"]["sqnr_db"] is None
    assert variant_entry(data, "LRT fp32")["size_ratio"] == 0.5
    rebuilt = ComparisonReport.from_dict(data)
    assert rebuilt.to_dict() == data
    assert "SQNR (dB)" in to_markdown(rebuilt)


def test_layer_table_groups_repeated_blocks():
    layers = [
        {
            "name": f"encoder.layer.{i}.{part}",
            "shape": [384, 384],
            "rank": rank,
            "action": "factorized",
            "reason": "energy 0.95",
        }
        for i in range(12)
        for part, rank in (
            ("attention.self.query", 96),
            ("attention.self.key", 96),
            ("intermediate.dense", 128),
        )
    ]
    layers[0] = {**layers[0], "rank": 64}
    assert len(layers) > MAX_LAYER_ROWS
    _, rows = layer_table(make_report(layers=layers).layers)
    names = [row[0] for row in rows]
    assert names == [
        "encoder.layer.0.attention.self.query",  # a group of one keeps its real name
        "encoder.layer.*.attention.self.key (x12)",
        "encoder.layer.*.intermediate.dense (x12)",
        "encoder.layer.*.attention.self.query (x11)",
    ]
    assert rows[0][2] == "64" and rows[3][2] == "96"
    markdown = to_markdown(make_report(layers=layers))
    assert "| encoder.layer.*.intermediate.dense (x12) | 384x384 | 128 | factorized |" in markdown
    assert len(layer_table(make_report(layers=layers[:MAX_LAYER_ROWS]).layers)[1]) == MAX_LAYER_ROWS


def test_write_creates_all_files(tmp_path):
    report = make_report(FALLBACK_REPORT)
    written = write_report(report, tmp_path / "out")
    assert set(written) == {"json", "markdown", "html"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "report.html",
        "report.json",
        "report.md",
    ]
    assert json.loads(written["json"].read_text())["model"] == "tiny-minilm"
    assert written["markdown"].read_text() == to_markdown(report)
    page = written["html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 2
    assert "Provider fallback" in page and "0.5x" in page
    without_html = write_report(report, tmp_path / "plain", html=False)
    assert set(without_html) == {"json", "markdown"}


def test_html_escapes_names():
    report = make_report()
    report.model = "<script>alert(1)</script>"
    assert "<script>" not in to_html(report)


def test_report_does_not_import_torch():
    # A fresh interpreter: other tests in this process may have imported torch already.
    code = "import sys, lrt_deploy.report; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert completed.returncode == 0, completed.stderr


def _kept_dense(block: int, rank: int, energy: str, gain: str) -> dict[str, Any]:
    return {
        "name": f"encoder.layer.{block}.output.dense",
        "shape": [384, 1536],
        "rank": None,
        "action": "kept_dense",
        "reason": f"budget: dense is worth its parameters (rank {rank}, keeps only {energy}% "
        f"of whitened energy) (output gain {gain})",
    }


def test_grouped_layer_rows_show_the_range_of_each_number():
    figures = [(96, "97.5", "1.8"), (128, "91.2", "3.1"), (112, "94", "2.25")]
    layers = [_kept_dense(i, *figures[i % 3]) for i in range(MAX_LAYER_ROWS + 1)]
    _, rows = layer_table(make_report(layers=layers).layers)
    assert len(rows) == 1
    assert rows[0][0] == f"encoder.layer.*.output.dense (x{MAX_LAYER_ROWS + 1})"
    assert rows[0][4] == (
        "budget: dense is worth its parameters (rank 96-128, keeps only 91.2-97.5% of whitened "
        "energy) (output gain 1.8-3.1)"
    )
    # A number every member shares is shown once; the shape's numbers are not a range.
    same = [_kept_dense(i, 307, "99.1", f"0.00{i % 9 + 1}") for i in range(MAX_LAYER_ROWS + 1)]
    (row,) = layer_table(make_report(layers=same).layers)[1]
    assert row[4].startswith("budget: dense is worth its parameters (rank 307, keeps only 99.1%")
    assert row[4].endswith("(output gain 0.001-0.009)") and "…" not in row[4]


def test_layers_whose_reasons_are_worded_differently_are_not_merged():
    layers = [_kept_dense(i, 96, "97.5", "1.8") for i in range(MAX_LAYER_ROWS + 1)]
    layers[3] = {**layers[3], "reason": "skipped by pattern 'output'"}
    _, rows = layer_table(make_report(layers=layers).layers)
    assert [row[0] for row in rows] == [
        f"encoder.layer.*.output.dense (x{MAX_LAYER_ROWS})", "encoder.layer.3.output.dense"
    ]
    assert rows[1][4] == "skipped by pattern 'output'"


def _built(model: ModelKind, precision: str, median_ms: float, fused: dict[str, int], *,
           deployed: bool = False) -> Variant:
    return Variant(onnx_path=Path(f"{model.key}-{precision}.onnx"), model=model,
                   precision=precision, is_baseline=(model, precision) == (DENSE, "fp32"),
                   deployed=deployed, optimization={"fused": fused},
                   latency={"median_ms": median_ms}, provider=ProviderReport.from_dict(CPU_REPORT))


def test_report_says_when_the_deployed_lrt_model_is_slower_than_dense_and_why() -> None:
    """The budget-0.95 MiniLM case: LRT int8 7.32 ms against dense int8 5.86 ms, QAttention
    lost to MultiHeadAttention; the line goes under the deployed row, with both causes."""
    from lrt_deploy.report.summary import run_report, speed_notes

    variants = [
        _built(DENSE, "fp32", 13.7, {"Attention": 6}),
        _built(DENSE, "int8", 5.86, {"QAttention": 6}),
        _built(LRT, "fp32", 13.6, {"MultiHeadAttention": 6}),
        _built(LRT, "int8", 7.32, {"MultiHeadAttention": 6}, deployed=True),
    ]
    (line,) = speed_notes(variants)
    assert line.startswith("1.25x the latency of dense int8 in this run (7.32 vs 5.86 ms")
    assert "packed into one Attention/QAttention" in line and "quantises its activations" in line
    report = run_report(title="t", variants=variants, measured_on={"batch": 1, "sequence": 8},
                        threads=2, fidelity_inputs="x")
    assert report.variants[-1].notes[-1] == line
    assert all(line not in v.notes for v in report.variants[:-1])


def test_report_is_silent_when_lrt_is_as_fast_or_has_no_dense_twin() -> None:
    from lrt_deploy.report.summary import SLOWER_THAN_DENSE, speed_notes

    dense = _built(DENSE, "int8", 6.0, {"QAttention": 6})
    within_noise = _built(LRT, "int8", 6.0 * SLOWER_THAN_DENSE, {"QAttention": 6}, deployed=True)
    assert speed_notes([dense, within_noise]) == []
    assert speed_notes([dense, _built(LRT, "int8", 5.0, {}, deployed=True)]) == []
    # fp32 deployed: compared with dense fp32, not dense int8; no int8 cause is named.
    fp32 = [_built(DENSE, "fp32", 10.0, {"Attention": 6}), dense,
            _built(LRT, "fp32", 12.0, {"Attention": 6}, deployed=True)]
    (line,) = speed_notes(fp32)
    assert line == "1.20x the latency of dense fp32 in this run (12.00 vs 10.00 ms median)"
    assert speed_notes([_built(LRT, "int8", 9.0, {}, deployed=True)]) == []


def _scored(model: ModelKind, precision: str, cosine: float, excluded: int = 0,
            deployed: bool = False) -> Variant:
    variant = _built(model, precision, 5.0, {}, deployed=deployed)
    variant.fidelity = {"mean_cosine": cosine}
    variant.quantization = PrecisionRecord({"excluded_nodes": [f"mm{i}" for i in range(excluded)]})
    return variant


def test_report_says_when_int8_costs_the_output_and_what_to_do() -> None:
    """The all-mpnet-base-v2 case: plain dynamic int8 at 0.8777 against 1.0 for fp32."""
    from lrt_deploy.report.summary import run_report

    variants = [_scored(DENSE, "fp32", 1.0), _scored(DENSE, "int8", 0.8777, deployed=True)]
    report = run_report(title="t", variants=variants, measured_on={"batch": 1, "sequence": 8},
                        threads=2, fidelity_inputs="x")
    (line,) = report.variants[-1].notes
    assert line.startswith("int8 costs this model 0.122 of mean cosine (0.8777 against 1.0000 "
                           "for dense fp32)")
    assert "--exclude-sensitive N" in line
    assert report.variants[0].notes == []


def test_int8_note_compares_with_the_same_models_fp32_and_knows_exclusions() -> None:
    from lrt_deploy.report.summary import INT8_COSINE_LOSS, int8_notes

    # The quick start's MiniLM: LRT int8 0.9902 against LRT fp32 0.9968: silent.
    assert int8_notes([_scored(DENSE, "fp32", 1.0), _scored(DENSE, "int8", 0.9929),
                       _scored(LRT, "fp32", 0.9968),
                       _scored(LRT, "int8", 0.9902, deployed=True)]) == []
    # A factorization's loss is not int8's: LRT fp32 0.95, LRT int8 0.945.
    assert int8_notes([_scored(DENSE, "fp32", 1.0), _scored(LRT, "fp32", 0.95),
                       _scored(LRT, "int8", 0.945, deployed=True)]) == []
    (line,) = int8_notes([_scored(DENSE, "fp32", 1.0),
                          _scored(DENSE, "int8", 0.97, excluded=4, deployed=True)])
    assert line.endswith("with 4 MatMuls kept fp32: raise --exclude-sensitive")
    edge = 1.0 - INT8_COSINE_LOSS
    assert int8_notes([_scored(DENSE, "fp32", 1.0), _scored(DENSE, "int8", edge + 1e-6,
                                                           deployed=True)]) == []
    assert int8_notes([_scored(DENSE, "fp32", 1.0), _scored(DENSE, "fp16", 0.5,
                                                           deployed=True)]) == []


def test_report_says_what_outlier_smoothing_did_and_when_it_was_off() -> None:
    from lrt_deploy.report.summary import int8_notes, run_report

    smoothing = {"nodes": ["mm_a", "mm_b", "mm_c"], "inputs": 2, "channels": 5,
                 "largest_scale": 19.2, "ratio": 8.0, "target": 3.0, "rows": 64,
                 "skipped": None}
    variants = [_scored(DENSE, "fp32", 1.0), _scored(DENSE, "int8", 0.9942, deployed=True)]
    variants[0].quantization = None  # fp32 variants have none
    variants[1].quantization = PrecisionRecord({"mode": "dynamic", "excluded_nodes": [],
                                                "smoothing": smoothing})
    report = run_report(title="t", variants=variants, measured_on={"batch": 1, "sequence": 8},
                        threads=2, fidelity_inputs="x")
    (line,) = report.variants[-1].notes
    assert line.startswith("int8 outlier smoothing: 5 input channels peaking above 8x")
    assert "weights of 3 MatMuls, one Mul on each of 2 inputs" in line
    # The report counts the smoothed MatMuls; the manifest keeps their names.
    assert report.quantisation["smoothing"]["matmuls"] == 3
    assert "nodes" not in report.quantisation["smoothing"]
    # all-mpnet-base-v2 with --no-smoothing: the fix named first is to smooth.
    variants[1].quantization = PrecisionRecord({"mode": "dynamic", "excluded_nodes": []})
    variants[1].fidelity = {"mean_cosine": 0.9191}
    (line,) = int8_notes(variants)
    assert line.startswith("int8 costs this model 0.081") and "drop --no-smoothing" in line
    # A non-text model without an .npz: smoothing could not measure, and says so.
    variants[1].quantization = PrecisionRecord({"mode": "dynamic",
                                                "smoothing": {"skipped": "no data"}})
    variants[1].fidelity = {"mean_cosine": 0.995}
    assert int8_notes(variants) == ["int8 outlier smoothing skipped: no data"]


def test_variant_key_and_label_are_rendered_from_model_and_precision() -> None:
    variant = Variant(onnx_path=Path("x.onnx"), model=ModelKind.LINFORMER, precision="int8")
    assert (variant.key, variant.label) == ("lrt-int8", "Linformer int8")
    assert Variant(onnx_path=Path("y.onnx"), model=DENSE).label == "dense fp32"


def test_incomparable_models_get_no_fidelity_and_a_note() -> None:
    from lrt_deploy.report.summary import INCOMPARABLE_NOTE, run_report

    variants = [_scored(DENSE, "fp32", 0.5), _scored(ModelKind.LINFORMER, "fp32", 1.0,
                                                     deployed=True)]
    report = run_report(title="t", variants=variants, measured_on={"batch": 1, "sequence": 8},
                        threads=2, fidelity_inputs="x", incomparable={DENSE})
    dense, linformer = report.variants
    assert dense.fidelity == {} and dense.notes == [INCOMPARABLE_NOTE]
    assert linformer.fidelity == {"mean_cosine": 1.0} and INCOMPARABLE_NOTE not in linformer.notes


def test_the_report_names_the_cpu_it_was_measured_on(monkeypatch, tmp_path) -> None:
    from lrt_deploy.report import summary
    from lrt_deploy.report.summary import run_report

    monkeypatch.setattr(summary, "host_cpu_name", lambda: "Example CPU 9000 @ 3.00GHz")
    monkeypatch.setattr(summary, "host_class", lambda: "x86-avx2")
    variants = [_scored(DENSE, "fp32", 1.0, deployed=True)]
    report = run_report(title="t", variants=variants, measured_on={"batch": 1, "sequence": 8},
                        threads=2, fidelity_inputs="x")
    line = "Measured on Example CPU 9000 @ 3.00GHz (device class x86-avx2)"
    assert line in to_markdown(report).splitlines()[:6]
    assert f"<p>{line}</p>" in to_html(report)
    data = json.loads(write_json(report, tmp_path / "report.json").read_text())
    assert data["settings"]["cpu"] == "Example CPU 9000 @ 3.00GHz"
    assert data["settings"]["device_class"] == "x86-avx2"
    assert ComparisonReport.from_dict(data).to_dict() == data
    # A report written before the CPU was recorded shows no such line.
    assert "Measured on" not in to_markdown(make_report())


def test_host_cpu_name_reads_cpuinfo_then_falls_back(monkeypatch, tmp_path) -> None:
    from lrt_deploy.runtime import devices

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example  CPU\t9000\nflags\t: avx2\n")
    monkeypatch.setattr(devices, "Path", lambda _path: cpuinfo)
    assert devices.host_cpu_name.__wrapped__() == "Example CPU 9000"
    cpuinfo.write_text("processor\t: 0\nFeatures\t: asimd\n")  # ARM64 Linux names no model
    monkeypatch.setattr(devices.platform, "processor", lambda: "aarch64")
    assert devices.host_cpu_name.__wrapped__() == "aarch64"
    monkeypatch.setattr(devices, "Path", lambda _path: tmp_path / "missing")
    monkeypatch.setattr(devices.platform, "processor", lambda: "")
    assert devices.host_cpu_name.__wrapped__() is None
