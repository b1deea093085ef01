"""Tests for the bundle contract (JSON Schemas, the runtime's manifest check), ``lrt-bench`` and
``lrt-report``, on bundles freshly exported from a tiny BERT (a dense int8 CPU bundle and a
low-rank int8 mobile bundle)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("transformers")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lrt_deploy.cli.bench import main as bench_main  # noqa: E402
from lrt_deploy.cli.export import main as export_main  # noqa: E402
from lrt_deploy.cli.report import main as report_main  # noqa: E402
from lrt_deploy.report.bundles import BundleComparison  # noqa: E402
from lrt_deploy.report.components import size_by_component  # noqa: E402
from lrt_deploy.report.render.svg import pareto_front  # noqa: E402
from lrt_deploy.runtime.contract import (  # noqa: E402
    SUPPORTED_FORMAT_VERSION,
    BundleContractError,
    UnsupportedFormatVersionError,
    check_manifest,
)
from lrt_deploy.runtime.sweep import (  # noqa: E402
    BENCH_TEXT,
    BenchInputError,
    open_for_benchmark,
    synthetic_feeds,
)
from lrt_deploy.runtime.text import TextEncoder  # noqa: E402
from lrt_deploy.runtime.timing import LatencyStats  # noqa: E402
from lrt_deploy.schemas import load_schema  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The first chart colour (Okabe-Ito blue), used by the first segment of the size bars.
CHART_BLUE = (0x00, 0x72, 0xB2)


def _run(main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse errors
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def _assert_one_line_error(code: int, err: str, prog: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def bundles(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    argv = {
        "dense-int8": ["--target", "cpu", "--quantize", "int8"],
        "lrt-int8-mobile": ["--target", "mobile", "--rank", "0.5", "--quantize", "int8"],
    }
    paths = {}
    for name, options in argv.items():
        code, _, err = _run(export_main, [str(tiny_bert_dir), *options, "--runs", "3", "-q",
                                          "-o", str(root / name)])
        assert code == 0, err
        paths[name] = root / name
    return paths


@pytest.fixture(scope="module")
def bench_json(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    code, stdout, stderr = _run(bench_main, [
        str(bundles["dense-int8"]), str(bundles["lrt-int8-mobile"]),
        "--batch", "1,2", "--sequence", "8,16", "--threads", "1", "--runs", "4",
        "--warmup", "2", "--json", str(out),
    ])
    assert code == 0, stderr
    return out, stdout, stderr


# --- the contract ------------------------------------------------------------------------------


def _validator(name: str):
    jsonschema = pytest.importorskip("jsonschema")
    schema = load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("bundle", ["dense-int8", "lrt-int8-mobile"])
def test_fresh_bundles_match_the_schemas(bundles: dict[str, Path], bundle: str) -> None:
    folder = bundles[bundle]
    for name in ("manifest", "report"):
        data = json.loads((folder / f"{name}.json").read_text())
        errors = [error.message for error in _validator(name).iter_errors(data)]
        assert errors == [], f"{bundle}/{name}.json: {errors}"
    manifest = json.loads((folder / "manifest.json").read_text())
    check_manifest(manifest, folder)
    if bundle == "lrt-int8-mobile":
        # The schema's optional parts are really exercised: ORT file, low-rank layers.
        assert manifest["files"]["model"] == "model.ort"
        assert manifest["lowrank"]["layers"]


def test_schemas_reject_what_breaks_the_contract(bundles: dict[str, Path]) -> None:
    manifest = json.loads((bundles["dense-int8"] / "manifest.json").read_text())
    validator = _validator("manifest")
    newer = {**manifest, "format_version": SUPPORTED_FORMAT_VERSION + 1}
    outside = copy.deepcopy(manifest)
    outside["files"]["model"] = "../elsewhere/model.onnx"
    no_inputs = {**manifest, "inputs": []}
    bad_dtype = copy.deepcopy(manifest)
    bad_dtype["inputs"][0]["dtype"] = "tensor(int64)"
    for broken in (newer, outside, no_inputs, bad_dtype):
        assert list(validator.iter_errors(broken)), broken
    report = json.loads((bundles["dense-int8"] / "report.json").read_text())
    report["variants"][0]["file_bytes"] = -1
    assert list(_validator("report").iter_errors(report))


def test_runtime_refuses_a_newer_format_with_an_upgrade_message(bundles: dict[str, Path]) -> None:
    folder = bundles["dense-int8"]
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = SUPPORTED_FORMAT_VERSION + 1
    with pytest.raises(UnsupportedFormatVersionError) as error:
        check_manifest(manifest, folder)
    assert str(error.value) == (
        f"bundle format {SUPPORTED_FORMAT_VERSION + 1} is newer than this lrt-deploy "
        f"(supports up to {SUPPORTED_FORMAT_VERSION}): upgrade lrt-deploy"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("format_version"), "format_version must be an integer"),
        (lambda m: m["files"].pop("model"), "files.model"),
        (lambda m: m["files"].update(model="/etc/passwd"), "outside the bundle"),
        (lambda m: m["files"].update(tokenizer="..\\tokenizer.json"), "outside the bundle"),
        (lambda m: m["files"].update(model="missing.onnx"), "is not in"),
        (lambda m: m.update(inputs=[]), "inputs must be a non-empty list"),
        (lambda m: m["inputs"][0].update(dtype="tensor(int64)"), "has dtype"),
        (lambda m: m["outputs"][0].update(shape="batch"), "shape must be a list"),
        (lambda m: m["inputs"].append(dict(m["inputs"][0])), "twice"),
        (lambda m: m["target"].update(providers="CPUExecutionProvider"), "target.providers"),
    ],
)
def test_runtime_manifest_check_names_the_problem(bundles, change, message: str) -> None:
    folder = bundles["dense-int8"]
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    with pytest.raises(BundleContractError, match=message):
        check_manifest(manifest, folder)


def test_bench_refuses_a_bundle_from_a_newer_format(bundles, tmp_path: Path, capsys) -> None:
    copy_dir = tmp_path / "newer"
    shutil.copytree(bundles["dense-int8"], copy_dir)
    manifest = json.loads((copy_dir / "manifest.json").read_text())
    manifest["format_version"] = SUPPORTED_FORMAT_VERSION + 1
    (copy_dir / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = _run(bench_main, [str(copy_dir), "--runs", "1", "--no-memory", "-q"])
    line = _assert_one_line_error(code, err, "lrt-bench")
    assert "upgrade lrt-deploy" in line


# --- lrt-bench ---------------------------------------------------------------------------------


def test_bench_json_table_and_progress(bundles: dict[str, Path], bench_json) -> None:
    path, stdout, stderr = bench_json
    data = json.loads(path.read_text())
    assert [e.message for e in _validator("bench").iter_errors(data)] == []
    labels = ["dense-int8", "lrt-int8-mobile"]
    assert [b["label"] for b in data["bundles"]] == labels
    assert [b["model_file"] for b in data["bundles"]] == ["model.onnx", "model.ort"]
    assert len(data["results"]) == 2 * 2 * 2
    for entry in data["results"]:
        assert entry["runs"] == 4
        assert entry["min_ms"] <= entry["median_ms"] <= entry["p90_ms"] <= entry["p99_ms"]
        assert entry["p99_ms"] <= entry["max_ms"]
        assert entry["throughput_per_s"] == pytest.approx(
            entry["batch"] * 1e3 / entry["median_ms"]
        )
        if entry["bundle"] == labels[0]:
            assert entry["ratio_vs_first"] == 1.0
        assert entry["ratio_p10"] <= entry["ratio_p90"]
    for info in data["bundles"]:
        assert info["inputs"] == "tokenizer"
        assert info["load_s"]["1"] > 0 and info["first_run_ms"]["1"] > 0
        memory = info["memory"]
        assert "error" not in memory, memory
        assert memory["batch"] == 2 and memory["sequence"] == 16
        assert memory["peak_rss_mb"] >= memory["after_load_rss_mb"] > memory["baseline_rss_mb"]
        assert memory["model_mb"] > 0
    assert data["settings"]["intra_op_spinning"] is False
    for label in labels:
        assert label in stdout
    assert "vs first (p10-p90)" in stdout
    assert "[1/4] threads 1, batch 1, sequence 8" in stderr
    assert "[4/4] threads 1, batch 2, sequence 16" in stderr


def test_bench_session_turns_spinning_off(bundles: dict[str, Path]) -> None:
    bundle = open_for_benchmark(bundles["lrt-int8-mobile"], threads=2)
    options = bundle.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 2
    assert bundle.model_path.name == "model.ort"


def test_text_feeds_come_from_the_tokenizer(bundles: dict[str, Path]) -> None:
    bundle = open_for_benchmark(bundles["dense-int8"])
    feeds = synthetic_feeds(bundle.inputs, 3, 12, tokenizer_path=bundle.tokenizer_path)
    assert {name: array.shape for name, array in feeds.items()} == {
        "input_ids": (3, 12), "attention_mask": (3, 12), "token_type_ids": (3, 12)
    }
    assert (feeds["attention_mask"] == 1).all()
    # The bundle's own tokenizer on the benchmark text, cut to length, never padded.
    encoder = TextEncoder(bundle.tokenizer_path, max_length=12)
    expected = encoder.encode(" ".join([BENCH_TEXT] * 4))["input_ids"][0]
    for row in feeds["input_ids"]:
        assert row.tolist() == expected.tolist()
    pad_id = encoder.encode(["a", "a a a"])["input_ids"][0, -1]
    assert pad_id not in feeds["input_ids"]
    without = synthetic_feeds(bundle.inputs, 2, 5)
    assert without["input_ids"].shape == (2, 5)
    assert without["input_ids"].min() >= 1 and without["input_ids"].max() < 100


def test_run_stats_percentiles() -> None:
    stats = LatencyStats.of([float(v) for v in range(1, 101)])
    assert stats.median_ms == 50.5 and stats.runs == 100
    assert stats.p90_ms == pytest.approx(90.1) and stats.p99_ms == pytest.approx(99.01)
    assert stats.throughput(4) == pytest.approx(4e3 / 50.5)


def _fixed_batch_model(path: Path) -> None:
    table = np.arange(200, dtype=np.float32).reshape(100, 2)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["y"])],
        "lookup",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "sequence", 2])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--batch", "0"], "--batch"),
        (["--batch", "1,x"], "--batch"),
        (["--sequence", ""], "--sequence"),
        (["--threads", "-1"], "--threads"),
        (["--runs", "0"], "--runs"),
    ],
)
def test_bench_bad_options_are_one_line(bundles, argv: list[str], needle: str) -> None:
    code, _, err = _run(bench_main, [str(bundles["dense-int8"]), *argv])
    assert needle in _assert_one_line_error(code, err, "lrt-bench")


def test_bench_missing_bundle_and_fixed_batch(tmp_path: Path) -> None:
    code, _, err = _run(bench_main, [str(tmp_path / "nope")])
    assert "does not exist" in _assert_one_line_error(code, err, "lrt-bench")
    model = tmp_path / "fixed.onnx"
    _fixed_batch_model(model)
    code, _, err = _run(bench_main, [str(model), "--batch", "4", "--no-memory", "-q"])
    assert "--batch 1" in _assert_one_line_error(code, err, "lrt-bench")
    with pytest.raises(BenchInputError):
        synthetic_feeds(open_for_benchmark(model).inputs, 4, 8)
    code, out, err = _run(bench_main, [str(model), "--sequence", "6", "--runs", "2",
                                       "--no-memory", "-q"])
    assert code == 0, err
    assert "fixed" in out


# --- lrt-report --------------------------------------------------------------------------------


def _component_model(path: Path) -> dict[str, int]:
    """A graph with one weight per component; returns the expected bytes per component."""
    rng = np.random.default_rng(0)
    weights = {
        "table": rng.standard_normal((50, 8)).astype(np.float32),  # embeddings (Gather)
        "w_query": rng.standard_normal((8, 8)).astype(np.float32),  # attention (-> Softmax)
        "w_up": rng.standard_normal((8, 16)).astype(np.float32),  # ffn (-> Gelu)
        "w_down": rng.standard_normal((16, 8)).astype(np.float32),  # ffn (Gelu ->)
        "ln_scale": np.ones(8, dtype=np.float32),  # other
    }
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["h"]),
        helper.make_node("MatMul", ["h", "w_query"], ["q"]),
        helper.make_node("Softmax", ["q"], ["p"], axis=-1),
        helper.make_node("LayerNormalization", ["p", "ln_scale"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "w_up"], ["u"]),
        helper.make_node("Gelu", ["u"], ["g"], domain="com.microsoft"),
        helper.make_node("MatMul", ["g", "w_down"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "parts",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 8])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    onnx.save(helper.make_model(graph), str(path))
    return {
        "embeddings": weights["table"].nbytes,
        "attention": weights["w_query"].nbytes,
        "ffn": weights["w_up"].nbytes + weights["w_down"].nbytes,
        "other": weights["ln_scale"].nbytes,
    }


def test_size_by_component_follows_the_graph(tmp_path: Path) -> None:
    expected = _component_model(tmp_path / "parts.onnx")
    sizes = size_by_component(tmp_path / "parts.onnx")
    assert sizes["file_bytes"] == (tmp_path / "parts.onnx").stat().st_size
    assert {k: sizes[k] for k in ("embeddings", "attention", "ffn")} == {
        k: expected[k] for k in ("embeddings", "attention", "ffn")
    }
    assert sizes["other"] == expected["other"] + sizes["graph_bytes"]
    assert sum(sizes[k] for k in ("embeddings", "attention", "ffn", "other")) == sizes["file_bytes"]


def test_size_by_component_of_exported_bundles(bundles: dict[str, Path]) -> None:
    for folder in bundles.values():
        sizes = size_by_component(folder / "model.onnx")
        for component in ("embeddings", "attention", "ffn"):
            assert sizes[component] > 0, (folder.name, sizes)
        assert sizes["graph_bytes"] < sizes["file_bytes"]
        assert sum(sizes[c] for c in ("embeddings", "attention", "ffn", "other")) == (
            sizes["file_bytes"]
        )


def test_pareto_front() -> None:
    points = [(10.0, 0.99), (5.0, 0.95), (7.0, 0.94), (20.0, 1.0), (10.0, 0.98)]
    assert pareto_front(points) == [1, 0, 3]


def test_rebuilt_report_matches_the_bundle(bundles: dict[str, Path], tmp_path: Path) -> None:
    folder = bundles["dense-int8"]
    for name in ("report.md", "report.html"):
        code, out, err = _run(report_main, [str(folder), "-o", str(tmp_path / name)])
        assert code == 0, err
        assert (tmp_path / name).read_text() == (folder / name).read_text()


def test_report_refuses_a_newer_report_format(bundles, tmp_path: Path) -> None:
    copy_dir = tmp_path / "newer"
    shutil.copytree(bundles["dense-int8"], copy_dir)
    report = json.loads((copy_dir / "report.json").read_text())
    report["format_version"] = SUPPORTED_FORMAT_VERSION + 1
    (copy_dir / "report.json").write_text(json.dumps(report))
    for extra in ([], ["--compare"]):
        code, _, err = _run(report_main, [str(copy_dir), *extra, "-o", str(tmp_path / "r.md")])
        line = _assert_one_line_error(code, err, "lrt-report")
        assert f"report format {SUPPORTED_FORMAT_VERSION + 1} is newer" in line
    assert not (tmp_path / "r.md").exists()


def test_report_errors_are_one_line(bundles: dict[str, Path], tmp_path: Path) -> None:
    folder = str(bundles["dense-int8"])
    cases = [
        [str(tmp_path / "nope"), "-o", str(tmp_path / "r.html")],
        [folder, "-o", str(tmp_path / "r.pdf")],
        [folder, "-o", str(tmp_path / "missing-dir" / "r.html")],
        [folder, "--bench", str(tmp_path / "nope.json"), "-o", str(tmp_path / "r.html")],
        [folder, "--bench", folder + "/manifest.json", "-o", str(tmp_path / "r.html")],
        [folder],
    ]
    for argv in cases:
        code, _, err = _run(report_main, argv)
        _assert_one_line_error(code, err, "lrt-report")
    assert not list(tmp_path.iterdir())


def _compare(bundles: dict[str, Path], bench_json, out: Path) -> Path:
    code, _, err = _run(report_main, [
        str(bundles["dense-int8"]), str(bundles["lrt-int8-mobile"]),
        "--bench", str(bench_json[0]), "-o", str(out),
    ])
    assert code == 0, err
    return out


def test_comparison_page_content(bundles: dict[str, Path], bench_json, tmp_path: Path) -> None:
    html = _compare(bundles, bench_json, tmp_path / "compare.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html and "<script" not in html
    assert html.count("<svg") == 2 + 2  # size, latency at batch 1 and 2, Pareto
    comparison = BundleComparison.from_paths(
        [bundles["dense-int8"], bundles["lrt-int8-mobile"]], bench=bench_json[0]
    )
    headers, rows = comparison.table()
    assert [row[0] for row in rows] == ["dense-int8", "lrt-int8-mobile"]
    dense, lrt = (json.loads((bundles[n] / "manifest.json").read_text())
                  for n in ("dense-int8", "lrt-int8-mobile"))
    assert rows[1][headers.index("Size (MB)")] == f"{(bundles['lrt-int8-mobile'] / 'model.ort').stat().st_size / 1e6:.2f}"  # noqa: E501
    assert rows[0][headers.index("Mean cosine")] == f"{dense['fidelity']['mean_cosine']:.4f}"
    assert rows[1][headers.index("Mean cosine")] == f"{lrt['fidelity']['mean_cosine']:.4f}"
    assert rows[0][-1] == "1.00x" and rows[1][-1] != "-"
    names, points = comparison.pareto_points()
    assert names[-1] == "dense fp32 (reference)" and points[-1][1] == pytest.approx(1.0)
    markdown = _compare(bundles, bench_json, tmp_path / "compare.md").read_text()
    assert "| dense-int8 | dense int8 |" in markdown and "## lrt-bench" in markdown


def _png_pixels(path: Path) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA, non-interlaced PNG (what Chromium writes) with zlib only."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat, header = 8, b"", None
    while position < len(data):
        (length,), kind = struct.unpack(">I", data[position:position + 4]), \
            data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    channels = 3 if colour == 2 else 4
    stride = width * channels
    raw = zlib.decompress(idat)
    rows = np.zeros((height, stride), dtype=np.int64)
    previous = np.zeros(stride, dtype=np.int64)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int64)
        if kind == 0:
            current = line
        elif kind == 2:
            current = (line + previous) % 256
        else:
            current = np.zeros(stride, dtype=np.int64)
            for x in range(stride):
                left = current[x - channels] if x >= channels else 0
                up = previous[x]
                corner = previous[x - channels] if x >= channels else 0
                if kind == 1:
                    predictor = left
                elif kind == 3:
                    predictor = (left + up) // 2
                else:
                    estimate = left + up - corner
                    pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - corner)
                    predictor = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                current[x] = (line[x] + predictor) % 256
        rows[y] = current
        previous = current
    return rows.reshape(height, width, channels)[:, :, :3].astype(np.uint8)


def test_comparison_page_in_headless_chromium(bundles, bench_json, tmp_path: Path) -> None:
    if CHROMIUM is None:
        # CI installs Debian's chromium; elsewhere the test is skipped, never silently in CI.
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; the setup script must install it in CI")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    page = _compare(bundles, bench_json, tmp_path / "compare.html")
    flags = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=900,700",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
        check=True,
    ).stdout
    # What the browser parsed: one table row per bundle, the four charts, the Pareto front.
    table = dom.split('<div id="comparison">', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 1 + 2
    assert "<td>dense-int8</td>" in table and "<td>lrt-int8-mobile</td>" in table
    assert dom.count("<svg") == 4
    assert 'class="pareto-front"' in dom
    assert dom.count("<polyline") >= 2 * 2 + 1
    screenshot = tmp_path / "compare.png"
    subprocess.run([*flags, f"--screenshot={screenshot}", page.as_uri()], capture_output=True,
                   timeout=120, check=True)
    pixels = _png_pixels(screenshot)
    assert pixels.shape[:2] == (700, 900)
    not_white = (pixels < 240).any(axis=2).mean()
    assert not_white > 0.03, not_white
    blue = (np.abs(pixels.astype(int) - CHART_BLUE).sum(axis=2) < 30).sum()
    assert blue > 500, "the first size bar (embeddings, chart blue) is not on screen"


def test_bench_runs_in_a_fresh_interpreter_via_python_m(bundles: dict[str, Path]) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "lrt_deploy.cli.bench", str(bundles["dense-int8"]),
         "--runs", "2", "--warmup", "1", "--sequence", "8", "--no-memory", "-q"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "| dense-int8" in completed.stdout
