"""Every command reads bundle files through one checked resolver (inside the bundle, checksums
matching), and every bad input is one line, exit 2, nothing written.

The bundles are built in code (the tiny encoder of test_runtime, a report from test_report),
so no export runs here; each case goes through the public entry points (``Session``,
``TextEncoder``, ``lrt-bench``, ``lrt-report``, ``lrt-verify``'s ``verify_bundle``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from fake_reports import make_report  # noqa: E402
from test_runtime_hardening import _bundle, _rewrite_manifest, _sha  # noqa: E402

from lrt_deploy.cli.bench import main as bench_main  # noqa: E402
from lrt_deploy.cli.report import main as report_main  # noqa: E402
from lrt_deploy.errors import BundleError  # noqa: E402
from lrt_deploy.report import write_json  # noqa: E402
from lrt_deploy.runtime import Session, TextEncoder  # noqa: E402
from lrt_deploy.runtime.bundle import external_data_names  # noqa: E402

NESTED = "[" * 100_000 + "]" * 100_000


def _run(main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def _one_line_error(code: int, err: str, prog: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _bench(bundle: Path, *extra) -> tuple[int, str, str]:
    return _run(bench_main, [bundle, "--runs", "2", "--warmup", "1", "--no-memory", "-q",
                             *extra])


def _report_bundle(folder: Path, *, text: dict | None = None, model: str | None = None) -> Path:
    """A checksummed bundle of the tiny encoder with a report.json, as lrt-export lays it out."""
    _bundle(folder, text=text)
    write_json(make_report(), folder / "report.json")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["report"] = "report.json"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _legacy(folder: Path) -> Path:
    """Make a bundle look written before checksums existed (no checksums, no text section)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for key in ("checksums", "text"):
        manifest.pop(key, None)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- 1. lrt-report reads only the bundle's own files ----------------------------------------------


@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("mode", [[], ["--compare"]])
def test_report_never_renders_a_report_outside_the_bundle(tmp_path: Path, escape: str,
                                                          mode: list[str]) -> None:
    other = _report_bundle(tmp_path / "other")
    bundle = _report_bundle(tmp_path / "bundle")
    if escape == "dotdot":
        name = "../other/report.json"
    elif escape == "absolute":
        name = str(other / "report.json")
    else:
        (bundle / "report.json").unlink()
        (bundle / "report.json").symlink_to(other / "report.json")
        name = "report.json"
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["report"] = name
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = _run(report_main, [bundle, *mode, "-o", out / "r.html"])
    assert "outside the bundle" in _one_line_error(code, err, "lrt-report")
    assert _leftovers(out) == []


def test_report_rebuild_and_comparison_work_on_an_intact_bundle(tmp_path: Path) -> None:
    bundle = _report_bundle(tmp_path / "bundle")
    for argv in ([bundle, "-o", tmp_path / "r.md"], [bundle, "--compare", "-o", tmp_path / "c.md"]):
        code, out, err = _run(report_main, argv)
        assert code == 0, err
    assert "tiny-minilm" in (tmp_path / "r.md").read_text()


def test_report_comparison_checks_the_model_checksum(tmp_path: Path) -> None:
    bundle = _report_bundle(tmp_path / "bundle")
    with open(bundle / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    code, _, err = _run(report_main, [bundle, "--compare", "-o", tmp_path / "c.html"])
    assert "does not match the SHA-256" in _one_line_error(code, err, "lrt-report")
    assert not (tmp_path / "c.html").exists()


# --- 2. checksums cannot be stripped; every file opened is covered --------------------------------


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("strip", ["deleted", "empty", "null"])
def test_stripped_checksums_are_refused_everywhere(tmp_path: Path, strip: str,
                                                   tiny_bert_dir: Path) -> None:
    bundle = _bundle(tmp_path / "bundle", text={"vocab_size": 10, "max_sequence": 16},
                     tokenizer=tiny_bert_dir / "tokenizer.json")
    _tamper(bundle / "model.onnx")
    manifest = json.loads((bundle / "manifest.json").read_text())
    if strip == "deleted":
        del manifest["checksums"]
    else:
        manifest["checksums"] = {} if strip == "empty" else None
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    refusal = "no checksums although its format" if strip != "null" else "malformed 'checksums'"
    with pytest.raises(BundleError, match=refusal):
        Session(bundle)
    with pytest.raises(BundleError, match="re-export"):
        TextEncoder.from_bundle(bundle)
    code, _, err = _bench(bundle, "--sequence", "4")
    assert "checksums" in _one_line_error(code, err, "lrt-bench")


@pytest.mark.parametrize("marker", ["runtimes", "devices"])
def test_later_sections_mark_the_current_format_too(tmp_path: Path, marker: str) -> None:
    bundle = _legacy(_bundle(tmp_path / "bundle"))
    _rewrite_manifest(bundle, **{marker: {}})
    with pytest.raises(BundleError, match=repr(marker)):
        Session(bundle)


def test_a_bundle_from_before_checksums_still_opens_with_a_warning(tmp_path: Path,
                                                                    caplog) -> None:
    bundle = _legacy(_bundle(tmp_path / "bundle"))
    with caplog.at_level(logging.WARNING):
        Session(bundle)
    assert "records no checksums" in caplog.text


def _external_bundle(folder: Path, *, list_data: bool) -> Path:
    """The tiny encoder with its weights in model.onnx.data (as lrt-export writes > 2 GB)."""
    _bundle(folder)
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=64)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["checksums"] = {"model.onnx": _sha(folder / "model.onnx")}
    if list_data:
        manifest["files"]["onnx_data"] = "model.onnx.data"
        manifest["checksums"]["model.onnx.data"] = _sha(folder / "model.onnx.data")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_external_weights_are_verified_even_when_the_manifest_omits_them(tmp_path: Path) -> None:
    listed = _external_bundle(tmp_path / "listed", list_data=True)
    assert external_data_names(listed / "model.onnx") == ["model.onnx.data"]
    ids = np.array([[1, 2]])
    Session(listed).run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    _tamper(listed / "model.onnx.data")
    with pytest.raises(BundleError, match="model.onnx.data.*does not match"):
        Session(listed)
    unlisted = _external_bundle(tmp_path / "unlisted", list_data=False)
    with pytest.raises(BundleError, match="no checksum for 'model.onnx.data'"):
        Session(unlisted)
    code, _, err = _bench(unlisted, "--sequence", "4")
    assert "model.onnx.data" in _one_line_error(code, err, "lrt-bench")


def test_external_weights_outside_the_bundle_are_refused(tmp_path: Path) -> None:
    bundle = _external_bundle(tmp_path / "bundle", list_data=True)
    shutil.move(bundle / "model.onnx.data", tmp_path / "model.onnx.data")
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../model.onnx.data"
    onnx.save(model, str(bundle / "model.onnx"))
    _rewrite_manifest(bundle, checksums={"model.onnx": _sha(bundle / "model.onnx")})
    with pytest.raises(BundleError, match="outside the bundle"):
        Session(bundle)


def test_external_data_names_across_read_blocks(tmp_path: Path) -> None:
    from lrt_deploy.runtime import bundle as bundle_module

    marker = bundle_module._LOCATION
    # Entries at the start, straddling the 4 MiB block boundary, and at the very end.
    blob = marker + b"\x05a.bin" + b"x" * ((1 << 22) - 12) + marker + b"\x05b.bin"
    blob += b"y" * 1000 + marker + b"\x05c.bin"
    (tmp_path / "m.onnx").write_bytes(blob)
    assert external_data_names(tmp_path / "m.onnx") == ["a.bin", "b.bin", "c.bin"]


def test_bench_verifies_the_tokenizer(tmp_path: Path, tiny_bert_dir: Path) -> None:
    pytest.importorskip("tokenizers")
    bundle = _bundle(tmp_path / "bundle", text={"vocab_size": 10, "max_sequence": 16},
                     tokenizer=tiny_bert_dir / "tokenizer.json")
    with open(bundle / "tokenizer.json", "a") as handle:
        handle.write(" ")
    code, _, err = _bench(bundle, "--sequence", "4")
    assert "'tokenizer.json'" in _one_line_error(code, err, "lrt-bench")
    with pytest.raises(BundleError, match="tokenizer.json"):
        TextEncoder.from_bundle(bundle)


def test_verification_file_is_resolved_and_checksummed(tmp_path: Path) -> None:
    from lrt_deploy.cli.verify import verify_bundle

    bundle = _bundle(tmp_path / "bundle")
    np.savez(bundle / "verification.npz", ids=np.zeros(3))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["verification"] = "verification.npz"
    manifest["checksums"]["verification.npz"] = _sha(bundle / "verification.npz")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    _tamper(bundle / "verification.npz")
    with pytest.raises(BundleError, match="verification.npz.*does not match"):
        verify_bundle(bundle)
    manifest["files"]["verification"] = "../verification.npz"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle"):
        verify_bundle(bundle)
    # A manifest naming the verification file is of the checksummed format.
    manifest["files"]["verification"] = "verification.npz"
    manifest.pop("checksums")
    manifest.pop("text")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="files.verification"):
        Session(bundle)


# --- 6. one line, exit 2, nothing written ---------------------------------------------------------

MANIFEST_DAMAGE = {
    "corrupt": b"{not json",
    "list": b"[1, 2]",
    "non-utf8": b"\xff\xfe\x00garbage",
    "nested": NESTED.encode(),
    "nested-object": ('{"files": ' + '{"a": ' * 50_000 + "1" + "}" * 50_001).encode(),
    "model-dot": None,  # files.model = "."
    "model-slash": None,  # files.model = "sub/"
}


def _damage_manifest(bundle: Path, how: str) -> None:
    if MANIFEST_DAMAGE[how] is not None:
        (bundle / "manifest.json").write_bytes(MANIFEST_DAMAGE[how])
        return
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["model"] = "." if how == "model-dot" else "sub/"
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", list(MANIFEST_DAMAGE))
def test_unreadable_manifest_is_one_error_everywhere(tmp_path: Path, how: str) -> None:
    bundle = _report_bundle(tmp_path / "bundle")
    _damage_manifest(bundle, how)
    with pytest.raises(BundleError) as info:
        Session(bundle)
    assert "\n" not in str(info.value)
    out = tmp_path / "out"
    out.mkdir()
    for mode in ([], ["--compare"]):
        code, _, err = _run(report_main, [bundle, *mode, "-o", out / "r.html"])
        _one_line_error(code, err, "lrt-report")
    code, _, err = _bench(bundle, "--json", out / "b.json")
    _one_line_error(code, err, "lrt-bench")
    assert _leftovers(out) == []


REPORT_DAMAGE = {
    "corrupt": b"{not json",
    "list": b"[]",
    "non-utf8": b"\xff\xfe\x00",
    "nested": NESTED.encode(),
    "missing-keys": b'{"format_version": 1}',
    "wrong-types": b'{"format_version": 1, "model": 3, "variants": "many"}',
    "folder": None,
}


@pytest.mark.parametrize("how", list(REPORT_DAMAGE))
@pytest.mark.parametrize("mode", [[], ["--compare"]])
def test_unreadable_report_json_is_one_line(tmp_path: Path, how: str, mode: list[str]) -> None:
    bundle = _report_bundle(tmp_path / "bundle")
    (bundle / "report.json").unlink()
    if REPORT_DAMAGE[how] is None:
        (bundle / "report.json").mkdir()
    else:
        (bundle / "report.json").write_bytes(REPORT_DAMAGE[how])
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = _run(report_main, [bundle, *mode, "-o", out / "r.md"])
    _one_line_error(code, err, "lrt-report")
    assert _leftovers(out) == []


def _unwritable_outputs(tmp_path: Path) -> dict[str, Path]:
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    folder = tmp_path / "a-folder.html"
    folder.mkdir()
    return {"read-only": readonly / "r.html", "folder": folder,
            "proc": Path("/proc/lrt-report-test.html")}


@pytest.mark.parametrize("where", ["read-only", "folder", "proc"])
@pytest.mark.parametrize("mode", [[], ["--compare"]])
def test_report_output_that_cannot_be_written(tmp_path: Path, where: str,
                                              mode: list[str]) -> None:
    if where == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    if where == "proc" and not Path("/proc").is_dir():
        pytest.skip("no /proc")
    bundle = _report_bundle(tmp_path / "bundle")
    target = _unwritable_outputs(tmp_path)[where]
    code, _, err = _run(report_main, [bundle, *mode, "-o", target])
    assert "-o" in _one_line_error(code, err, "lrt-report")
    if where == "read-only":
        assert _leftovers(target.parent) == []
    if where == "folder":
        assert _leftovers(target) == []


def test_garbage_model_in_comparison_mode(tmp_path: Path) -> None:
    bundle = _legacy(_report_bundle(tmp_path / "bundle"))  # no checksums to catch it first
    (bundle / "model.onnx").write_bytes(b"\x08\x07garbage" * 50)
    code, _, err = _run(report_main, [bundle, "--compare", "-o", tmp_path / "c.html"])
    assert "not a readable ONNX model" in _one_line_error(code, err, "lrt-report")
    assert not (tmp_path / "c.html").exists()


def _bench_file(bundle: Path) -> dict:
    return {
        "format_version": 1, "tool": "lrt-bench", "machine": {},
        "settings": {"batches": [1], "sequences": [4], "threads": [None], "runs": 2,
                     "warmup": 1},
        "bundles": [{"label": "bundle", "path": str(bundle)}],
        "results": [{"bundle": "bundle", "threads": None, "batch": 1, "sequence": 4,
                     "median_ms": 1.0, "p90_ms": 1.0, "p99_ms": 1.0, "mean_ms": 1.0,
                     "min_ms": 1.0, "max_ms": 1.0, "runs": 2, "throughput_per_s": 1000.0,
                     "ratio_vs_first": 1.0, "ratio_p10": 1.0, "ratio_p90": 1.0}],
    }


BENCH_DAMAGE = {
    "no-settings": lambda d: d.pop("settings"),
    "no-results": lambda d: d.pop("results"),
    "sequences-text": lambda d: d["settings"].update(sequences="128"),
    "empty-batches": lambda d: d["settings"].update(batches=[]),
    "no-runs": lambda d: d["settings"].pop("runs"),
    "bundles-dict": lambda d: d.update(bundles={"label": "x"}),
    "label-number": lambda d: d["bundles"][0].update(label=3),
    "result-no-median": lambda d: d["results"][0].pop("median_ms"),
    "result-text-median": lambda d: d["results"][0].update(median_ms="fast"),
    "result-no-batch": lambda d: d["results"][0].pop("batch"),
    "result-list": lambda d: d.update(results=[[1, 2]]),
    "ratio-text": lambda d: d["results"][0].update(ratio_p10="low"),
    "machine-list": lambda d: d.update(machine=[1]),
    "not-lrt-bench": lambda d: d.update(tool="other"),
}


@pytest.mark.parametrize("how", [*BENCH_DAMAGE, "folder", "nested", "non-utf8", "list"])
def test_malformed_bench_json_is_one_line(tmp_path: Path, how: str) -> None:
    bundle = _report_bundle(tmp_path / "bundle")
    bench = tmp_path / "bench.json"
    if how == "folder":
        bench.mkdir()
    elif how == "nested":
        bench.write_text(NESTED)
    elif how == "non-utf8":
        bench.write_bytes(b"\xff\xfe\x00")
    elif how == "list":
        bench.write_text("[]")
    else:
        data = _bench_file(bundle)
        BENCH_DAMAGE[how](data)
        bench.write_text(json.dumps(data))
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = _run(report_main, [bundle, "--bench", bench, "-o", out / "c.html"])
    _one_line_error(code, err, "lrt-report")
    assert _leftovers(out) == []


def test_well_formed_bench_json_is_accepted(tmp_path: Path) -> None:
    bundle = _report_bundle(tmp_path / "bundle")
    (tmp_path / "bench.json").write_text(json.dumps(_bench_file(bundle)))
    code, _, err = _run(report_main, [bundle, "--bench", tmp_path / "bench.json",
                                      "-o", tmp_path / "c.html"])
    assert code == 0, err


# --- 6. lrt-bench ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["folder", "no-parent", "read-only", "proc"])
def test_bench_json_that_cannot_be_written_is_refused_first(tmp_path: Path, where: str) -> None:
    if where == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    bundle = _bundle(tmp_path / "bundle", text={"vocab_size": 10, "max_sequence": 16})
    targets = {"folder": tmp_path / "bench.json", "no-parent": tmp_path / "nope" / "b.json",
               "read-only": tmp_path / "readonly" / "b.json",
               "proc": Path("/proc/lrt-bench-test.json")}
    (tmp_path / "bench.json").mkdir()
    (tmp_path / "readonly").mkdir()
    (tmp_path / "readonly").chmod(0o555)
    code, out, err = _bench(bundle, "--sequence", "4", "--json", targets[where])
    assert "--json" in _one_line_error(code, err, "lrt-bench")
    assert out == ""  # refused before benchmarking
    assert not (tmp_path / "nope").exists() and _leftovers(tmp_path / "readonly") == []


def test_bench_sequence_beyond_the_models_positions(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle", text={"vocab_size": 10, "max_sequence": 64})
    code, _, err = _bench(bundle, "--sequence", "8,65")
    line = _one_line_error(code, err, "lrt-bench")
    assert "--sequence 65" in line and "--sequence 64 or less" in line
    # The default (128) does not apply to a bundle with 64 positions: it runs at 64.
    code, out, err = _bench(bundle)
    assert code == 0, err
    assert "| 64 |" in out.replace("  ", " ").replace("  ", " ")


def test_bench_random_ids_stay_inside_a_tiny_vocabulary(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle", text={"vocab_size": 10, "max_sequence": 16})
    for sequence in ("1", "16"):
        code, _, err = _bench(bundle, "--sequence", sequence)
        assert code == 0, err


def test_bench_ids_outside_an_unstated_vocabulary_are_one_line(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle")  # the manifest does not state the vocabulary (10)
    code, _, err = _bench(bundle, "--sequence", "64")
    assert "text.vocab_size" in _one_line_error(code, err, "lrt-bench")


def test_bench_batch_too_large_for_memory(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle")
    code, _, err = _bench(bundle, "--batch", str(10**13), "--sequence", "8")
    assert "smaller --batch" in _one_line_error(code, err, "lrt-bench")


# --- 7. lrt-report's format from the suffix, in any case ----------------------------------------


@pytest.mark.parametrize("mode", [[], ["--compare"]])
def test_report_suffix_case_does_not_change_the_format(tmp_path: Path, mode: list[str]) -> None:
    bundle = _report_bundle(tmp_path / "bundle")
    for name in ("r.MD", "r.Md", "r.HTML"):
        code, _, err = _run(report_main, [bundle, *mode, "-o", tmp_path / name])
        assert code == 0, err
        text = (tmp_path / name).read_text()
        assert ("<html" in text.lower()) == name.lower().endswith(".html"), name


# --- 8. lrt-bench defaults to the bundle's own fixed sequence length ------------------------------


def _fixed_bundle(folder: Path, sequence: int) -> Path:
    from test_runtime import build_encoder

    _bundle(folder, text={"vocab_size": 10, "max_sequence": 64})
    build_encoder(folder / "model.onnx", fixed=(1, sequence))
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["inputs"]:
        entry["shape"] = [1, sequence]
    manifest["checksums"] = {"model.onnx": _sha(folder / "model.onnx")}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_bench_defaults_to_the_fixed_sequence(tmp_path: Path) -> None:
    bundle = _fixed_bundle(tmp_path / "fixed16", 16)
    code, out, err = _bench(bundle, "--json", tmp_path / "b.json")
    assert code == 0, err
    assert json.loads((tmp_path / "b.json").read_text())["settings"]["sequences"] == [16]
    # Asked for another length, it still says which one to use.
    code, _, err = _bench(bundle, "--sequence", "8")
    assert "--sequence 16" in _one_line_error(code, err, "lrt-bench")


def test_bench_bundles_fixing_different_sequences(tmp_path: Path) -> None:
    first = _fixed_bundle(tmp_path / "fixed16", 16)
    second = _fixed_bundle(tmp_path / "fixed8", 8)
    code, _, err = _run(bench_main, [first, second, "--runs", "2", "--no-memory", "-q"])
    line = _one_line_error(code, err, "lrt-bench")
    assert "different sequence lengths (8, 16)" in line
    # A fixed bundle beside a free one: the fixed length is the default for both.
    free = _bundle(tmp_path / "free", text={"vocab_size": 10, "max_sequence": 64})
    code, _, err = _run(bench_main, [first, free, "--runs", "2", "--no-memory", "-q",
                                     "--json", tmp_path / "b.json"])
    assert code == 0, err
    assert json.loads((tmp_path / "b.json").read_text())["settings"]["sequences"] == [16]
