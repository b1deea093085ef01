"""The bundle writer replaces a bundle by writing a new folder and swapping it in; it never
writes into the old folder (onnxruntime maps a bundle's external weights, and rewriting a
mapped file in place kills the app with SIGBUS)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import pytest

pytest.importorskip("onnx")

from lrt_deploy.export.bundle import commit, staging_folder  # noqa: E402

FILES = ("manifest.json", "model.onnx", "model.onnx.data")


def _old_bundle(folder: Path) -> Path:
    folder.mkdir()
    for name in FILES:
        (folder / name).write_bytes(f"old {name}".encode() * 1000)
    return folder


def test_forced_replacement_leaves_the_old_files_as_they_were(tmp_path: Path) -> None:
    out_dir = _old_bundle(tmp_path / "bundle")
    handles = {name: open(out_dir / name, "rb") for name in FILES}
    try:
        before = {name: (os.fstat(h.fileno()), h.read()) for name, h in handles.items()}
        mapped = mmap.mmap(handles["model.onnx.data"].fileno(), 0, access=mmap.ACCESS_READ)
        with staging_folder(out_dir, force=True) as staging:
            assert staging.parent == out_dir.parent and staging != out_dir
            for name in FILES:
                (staging / name).write_bytes(f"new {name}".encode())
            commit(staging, out_dir)
        for name, handle in handles.items():
            old_stat, old_bytes = before[name]
            now = os.fstat(handle.fileno())
            assert now.st_nlink == 0  # unlinked with its folder, never truncated or rewritten
            assert (now.st_mtime_ns, now.st_size) == (old_stat.st_mtime_ns, old_stat.st_size)
            handle.seek(0)
            assert handle.read() == old_bytes
            assert (out_dir / name).read_bytes() == f"new {name}".encode()
        assert mapped[:] == before["model.onnx.data"][1]  # the mapping stays readable
        mapped.close()
    finally:
        for handle in handles.values():
            handle.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_a_failed_replacement_leaves_the_old_bundle_untouched(tmp_path: Path) -> None:
    out_dir = _old_bundle(tmp_path / "bundle")
    before = {name: ((out_dir / name).stat(), (out_dir / name).read_bytes()) for name in FILES}
    with pytest.raises(RuntimeError), staging_folder(out_dir, force=True) as staging:
        (staging / "model.onnx").write_bytes(b"half")
        raise RuntimeError("export failed")
    for name, (stat, data) in before.items():
        now = (out_dir / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
        assert (out_dir / name).read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
