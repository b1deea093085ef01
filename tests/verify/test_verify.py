"""Device classes end to end: lrt-export records where the bundle is exact and how it computes on
each class, lrt-verify re-runs it, the runtime says where it runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from lrt_deploy.cli.export import main as export_main  # noqa: E402
from lrt_deploy.cli.verify import main as verify_main  # noqa: E402
from lrt_deploy.runtime import Session  # noqa: E402
from lrt_deploy.runtime.devices import DEVICE_CLASSES, classify_cpu, host_class  # noqa: E402
from lrt_deploy.verify.check import REFERENCE_FILE, DeviceVerification  # noqa: E402
from lrt_deploy.verify.wasm import wasm_unavailable  # noqa: E402

HOST = host_class()
GEMM = [name for name, c in DEVICE_CLASSES.items() if not c.own_int8_kernel]


@pytest.fixture(scope="module")
def bundles(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("verify")
    made = {}
    for grid in ("pair-safe", "full-range"):
        made[grid] = out / grid
        code = export_main([str(tiny_bert_dir), "--quantize", "int8", "--int8-weights", grid,
                            "--runs", "3", "-q", "-o", str(made[grid])])
        assert code == 0
    return made


def test_export_records_exact_classes_and_the_host_run(bundles: dict[str, Path]) -> None:
    manifest = json.loads((bundles["pair-safe"] / "manifest.json").read_text())
    devices = manifest["devices"]
    assert devices["exact_on"] == GEMM
    assert manifest["target"]["precision"]["weight_grid"] == "pair-safe"
    assert manifest["files"]["verification"] == REFERENCE_FILE
    assert REFERENCE_FILE in manifest["checksums"]
    table = DeviceVerification.from_dict(devices["verification"])
    host = table.check(HOST or "host")
    assert host is not None and host.verified and host.how == "native"
    for figures in host.figures.values():
        assert -1 <= figures["worst"] <= figures["mean"] <= 1
    assert set(host.figures) == {"heldout", "domain"}
    full = json.loads((bundles["full-range"] / "manifest.json").read_text())["devices"]
    assert set(full["exact_on"]) == {n for n in GEMM if not DEVICE_CLASSES[n].saturates_u8s8}
    report = (bundles["pair-safe"] / "report.md").read_text()
    assert "## Device classes" in report and "Integer kernels exact on:" in report
    assert "Device classes" in (bundles["pair-safe"] / "report.html").read_text()


def test_lrt_verify_reruns_the_table_and_judges_the_floor(bundles: dict[str, Path], capsys,
                                                          tmp_path: Path) -> None:
    classes = [HOST or "host", "wasm"]
    code = verify_main([str(bundles["pair-safe"]), "--classes", ",".join(classes),
                        "--json", str(tmp_path / "t.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    table = DeviceVerification.from_dict(json.loads((tmp_path / "t.json").read_text()))
    recorded = DeviceVerification.from_dict(
        json.loads((bundles["pair-safe"] / "manifest.json").read_text())["devices"]
        ["verification"])
    # the same sentences, the same host: the same figures as the export recorded
    assert table.check(HOST or "host").figures == recorded.check(HOST or "host").figures
    wasm = table.check("wasm")
    assert wasm.verified == (wasm_unavailable() is None), wasm.reason
    if wasm.verified:  # pair-safe int8: WebAssembly parts from the host by float rounding only
        assert wasm.agreement > 0.99
    assert "| wasm |" in out
    code = verify_main([str(bundles["pair-safe"]), "--classes", HOST or "host",
                        "--fidelity-floor", "1.0000001"])
    assert code == 3 and "below 1" in capsys.readouterr().err


def test_lrt_verify_refuses_bad_bundles_in_one_line(bundles: dict[str, Path], capsys,
                                                    tmp_path: Path) -> None:
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(bundles["pair-safe"], tampered)
    with np.load(tampered / REFERENCE_FILE) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["heldout/reference"] = arrays["heldout/reference"] * 0 + 1
    np.savez(tampered / REFERENCE_FILE, **arrays)
    for argv in ([str(tampered)], [str(tmp_path / "missing")],
                 [str(bundles["pair-safe"]), "--classes", "x86-quantum"],
                 [str(bundles["pair-safe"]), "--sample", "0"]):
        assert verify_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lrt-verify: error:"), err


def test_session_reports_its_class_and_warns_where_the_bundle_is_not_exact(
        bundles: dict[str, Path], caplog, tmp_path: Path) -> None:
    session = Session(bundles["pair-safe"])
    report = session.device_report()
    assert report["class"] == HOST == session.device_class
    assert report["exact"] is (True if HOST else None) and report["message"] is None
    if HOST is None:
        return
    import shutil

    other = tmp_path / "narrowed"
    shutil.copytree(bundles["pair-safe"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["devices"]["exact_on"] = [n for n in GEMM if n != HOST]
    manifest["devices"]["session_config"] = {"session.intra_op.allow_spinning": "0"}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="lrt_deploy.runtime"):
        narrowed = Session(other)
    assert narrowed.device_report()["exact"] is False
    assert any(HOST in r.getMessage() and "not exact" in r.getMessage() for r in caplog.records)
    manifest["devices"]["session_config"] = {"session.intra_op.allow_spinning": 0}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="session_config"):
        Session(other)


@pytest.mark.parametrize(("machine", "flags", "expected"), [
    ("x86_64", {"avx2", "avx512bw", "avx512_vnni"}, "x86-vnni"),
    ("x86_64", {"avx2", "avx_vnni"}, "x86-vnni"),
    ("x86_64", {"avx2", "avx512bw"}, "x86-avx512"),
    ("x86_64", {"avx2", "fma"}, "x86-avx2"),
    ("AMD64", {"sse4_1"}, "x86-sse"),
    ("aarch64", {"asimd", "asimddp", "i8mm", "sve", "sme"}, "arm64-sme"),
    ("aarch64", {"asimd", "asimddp", "i8mm"}, "arm64-i8mm"),
    ("arm64", {"asimd", "asimddp"}, "arm64-dotprod"),
    ("aarch64", {"asimd"}, "arm64-neon"),
    ("riscv64", {"rvv"}, None),
])
def test_cpu_classes_from_flags(machine: str, flags: set[str], expected: str | None) -> None:
    assert classify_cpu(machine, flags) == expected


def test_int8_weights_flag_needs_int8(tiny_bert_dir: Path, capsys, tmp_path: Path) -> None:
    for argv in (["--int8-weights", "full-range"],
                 ["--quantize", "int8", "--quant-format", "weight-only", "--int8-weights",
                  "pair-safe"]):
        code = export_main([str(tiny_bert_dir), *argv, "-o", str(tmp_path / "b")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and "--int8-weights applies" in err[-1]
        assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("grid", ["pair-safe", "full-range"])
def test_emulated_classes_agree_only_on_pair_safe_weights(bundles: dict[str, Path],
                                                          grid: str) -> None:
    """CI's emulated AVX2 and ARM64 check: the same bundle on the saturating and an exact
    kernel. Pair-safe weights agree to float rounding; full-range weights are not claimed
    exact on AVX2 (the table says so, whatever they compute on this tiny model)."""
    from lrt_deploy.verify import unavailable
    from lrt_deploy.verify.check import verify_model

    classes = ["x86-avx2", "arm64-dotprod"]
    missing = [f"{c}: {unavailable(c)}" for c in classes if c != HOST and unavailable(c)]
    if missing:
        pytest.skip("; ".join(missing))
    bundle = bundles[grid]
    manifest = json.loads((bundle / "manifest.json").read_text())
    table = verify_model(bundle / manifest["files"]["model"], bundle / REFERENCE_FILE,
                         manifest["devices"]["exact_on"], classes=classes, sample=4)
    for name in classes:
        check = table.check(name)
        assert check.verified, check.reason
        assert check.exact_kernel == (grid == "pair-safe" or name != "x86-avx2")
    if grid == "pair-safe":
        assert table.worst_agreement > 0.999, table.worst_pair
