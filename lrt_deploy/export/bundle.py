"""The deployment bundle: the output folder's safety, the manifest, the atomic write.

A bundle is written into a private staging folder beside the destination and renamed into
place only when complete (:func:`staging_folder`, :func:`commit`), so a failed or interrupted
export leaves nothing behind and a replaced bundle is never seen half-written.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from lrt_deploy import __version__
from lrt_deploy.errors import BundleExistsError, LrtDeployError
from lrt_deploy.export.build import Variant
from lrt_deploy.export.targets import Target
from lrt_deploy.graph.ops import default_opset, model_bytes
from lrt_deploy.runtime.contract import SUPPORTED_FORMAT_VERSION

__all__ = [
    "FORMAT_VERSION",
    "check_ort_runs",
    "commit",
    "prepare_out_dir",
    "staging_folder",
    "write_bundle",
    "write_error",
]

logger = logging.getLogger(__name__)

#: The manifest/report format written; the runtime reads up to the same number.
FORMAT_VERSION = SUPPORTED_FORMAT_VERSION


def prepare_out_dir(out_dir: Path, force: bool, source: Path | None = None) -> None:
    """Refuse output folders whose replacement would destroy something that is not a bundle:
    the input model (or a folder holding it, or one inside it), the working directory or one of
    its parents, or any existing folder that is not an lrt-deploy bundle."""
    if str(out_dir).strip() in ("", "."):
        raise BundleExistsError(
            "the output folder cannot be the working directory: give -o a new folder name"
        )
    resolved = out_dir.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or cwd.is_relative_to(resolved):
        raise BundleExistsError(
            f"output folder '{out_dir}' is the working directory or contains it: give -o a new "
            "folder"
        )
    if source is not None:
        src = source.resolve()
        if resolved == src or src.is_relative_to(resolved) or resolved.is_relative_to(src):
            raise BundleExistsError(
                f"output folder '{out_dir}' is, holds or lies inside the input model '{source}': "
                "write the bundle somewhere else with -o"
            )
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not force:
        raise BundleExistsError(
            f"output folder '{out_dir}' already exists: pass force=True to replace it or choose "
            "another out_dir"
        )
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise BundleExistsError(
            f"output path '{out_dir}' is a file or a link: choose a folder as out_dir"
        )
    if any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file():
        raise BundleExistsError(
            f"'{out_dir}' exists and is not an lrt-deploy bundle (no manifest.json): force=True "
            "replaces only bundles; choose another out_dir"
        )


def _missing_ancestors(path: Path) -> list[Path]:
    """Folders above ``path`` that do not exist yet, nearest first (to remove on failure)."""
    missing = []
    for parent in path.absolute().parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def write_error(exc: BaseException, out_dir: Path) -> LrtDeployError | None:
    """A failure to write files (full disk, read-only or vanished folder), as a user error."""
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    elif "serialization failed" in str(exc).lower() or "no space left" in str(exc).lower():
        # onnxruntime and protobuf report a failed write of a graph this way.
        reason = str(exc).strip().splitlines()[0]
    else:
        return None
    try:
        free = shutil.disk_usage(out_dir.absolute().parent).free
        where = f" ({free / 2**20:.0f} MiB free there)"
    except OSError:
        where = ""
    return LrtDeployError(
        f"cannot write the bundle under '{out_dir.absolute().parent}'{where}: {reason}; free "
        "space or choose another -o"
    )


@contextmanager
def staging_folder(out_dir: Path, force: bool, source: Path | None = None) -> Iterator[Path]:
    """Check ``out_dir`` (:func:`prepare_out_dir`), then yield a fresh staging folder beside it.

    When the block raises, the staging folder and any parent folders created for it are
    removed, and a failed write (full disk, read-only folder) becomes a one-line
    :class:`LrtDeployError`; a finished bundle is moved away by :func:`commit` first.
    """
    prepare_out_dir(out_dir, force, source)
    created = _missing_ancestors(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".lrt-export-", dir=out_dir.parent))
    except OSError as exc:
        _remove_if_empty(created)
        raise BundleExistsError(
            f"cannot create the output folder '{out_dir}': {exc.strerror or exc}; choose another -o"
        ) from exc
    try:
        yield staging
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_if_empty(created)
        translated = None if isinstance(exc, LrtDeployError) else write_error(exc, out_dir)
        if translated is not None:
            raise translated from exc
        raise


def commit(staging: Path, out_dir: Path) -> None:
    """Move the finished bundle into place; an existing one (with --force) is replaced whole.

    The old folder is renamed aside and deleted, never written into: a Session that has it
    open (onnxruntime maps external weights; rewriting a mapped file is a SIGBUS) keeps
    reading the old inodes until it closes them.
    """
    # mkdtemp/mkstemp create private (0700/0600) entries; a bundle is shared like any output.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    for path in staging.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=".lrt-old-", dir=out_dir.parent))
        os.replace(out_dir, trash / "old")
        os.replace(staging, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


def check_ort_runs(
    ort_path: Path, onnx_path: Path, feeds: Mapping[str, np.ndarray], threads: int
) -> None:
    """The .ort file must load and agree with the .onnx it came from.

    Raises:
        LrtDeployError: An output differs by more than 1e-4.
    """
    from lrt_deploy.runtime import Session

    ort_out = Session(ort_path, threads=threads).run(dict(feeds))
    onnx_out = Session(onnx_path, threads=threads).run(dict(feeds))
    for name, value in onnx_out.items():
        diff = float(np.abs(ort_out[name] - value).max(initial=0.0))
        if diff > 1e-4:
            raise LrtDeployError(
                f"model.ort output '{name}' differs from model.onnx by {diff:.3g}; report this "
                "as a bug with the model"
            )


def _tensor_info(values: Iterable[Any]) -> list[dict[str, Any]]:
    import onnx

    out = []
    for value in values:
        tensor = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
        out.append({
            "name": value.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name,
            "shape": shape,
        })
    return out


def add_to_manifest(staging: Path, manifest: dict[str, Any], *,
                    files: Mapping[str, str] = (), sections: Mapping[str, Any] = ()) -> None:
    """Add staged ``files`` (key -> name, checksummed) and top-level ``sections`` to
    ``manifest`` and rewrite ``manifest.json``."""
    from lrt_deploy.runtime.bundle import file_sha256

    for key, name in dict(files).items():
        manifest["files"][key] = name
        manifest["checksums"][name] = file_sha256(staging / name)
    manifest.update(dict(sections))
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def write_bundle(
    staging: Path,
    *,
    target: Target,
    deployed: Variant,
    reference: Variant,
    source: dict[str, Any],
    tokenizer_file: Path | None,
    text_limits: dict[str, Any] | None,
    benchmark: dict[str, Any],
    feeds: Mapping[str, np.ndarray],
    threads: int,
    lowrank: dict[str, Any] | None,
) -> dict[str, Any]:
    """Write the deployed graph (with ``.ort`` and operator config when ``target`` asks, the
    tokenizer when given) and ``manifest.json`` into ``staging``; returns the manifest.

    ``reference`` is the run's fp32 baseline (its validation and size are recorded); ``feeds``
    and ``threads`` check the ``.ort`` file against the ``.onnx``.
    """
    from lrt_deploy.export.runtimes import supported_runtimes
    from lrt_deploy.runtime.bundle import file_sha256

    files, model, mobile = _stage_files(
        staging, target, deployed.onnx_path, tokenizer_file, feeds, threads)
    # The runtime checks these before opening the bundle (tampered or damaged files).
    checksums = {
        name: file_sha256(staging / name) for key, name in files.items() if key != "report"
    }
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "tool": {"name": "lrt-deploy", "version": __version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": dict(source),
        "target": {
            **target.to_dict(),
            "provider_hints": [
                {"provider": name, "options": options}
                for name, options in target.provider_hints()
            ],
        },
        "files": files,
        "checksums": checksums,
        "inputs": _tensor_info(model.graph.input),
        "outputs": _tensor_info(model.graph.output),
        "text": text_limits,
        # Which ONNX Runtime packages (Python, Node, WebAssembly, Android) run this graph.
        "runtimes": supported_runtimes(model),
        "opset": default_opset(model),
        "variant": deployed.label,
        "quantization": deployed.quantization.to_dict() if deployed.quantization else None,
        "optimization": deployed.optimization,
        "lowrank": lowrank,
        "fidelity": deployed.fidelity,
        "validation": deployed.validation or reference.validation,
        "sizes": {
            "model_onnx_bytes": model_bytes(staging / "model.onnx"),
            **({"model_ort_bytes": mobile["ort_bytes"]} if "ort_bytes" in mobile else {}),
            "dense_fp32_onnx_bytes": reference.file_bytes,
        },
        "params": {"deployed": deployed.params, "dense": reference.params},
        "mobile": mobile or None,
        "benchmark": dict(benchmark),
        "reproducibility": _reproducibility(target),
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _stage_files(
    staging: Path, target: Target, onnx_path: Path, tokenizer_file: Path | None,
    feeds: Mapping[str, np.ndarray], threads: int,
) -> tuple[dict[str, str], Any, dict[str, Any]]:
    """Copy the graph (and ``.ort``, operator config, tokenizer) into ``staging``; returns the
    manifest's ``files``, the graph's proto and the ``mobile`` section."""
    from lrt_deploy.graph.external_data import load_model_proto, save_model_proto

    files: dict[str, str] = {"onnx": "model.onnx"}
    model = load_model_proto(onnx_path)
    # Weights above the 2 GB protobuf limit go to model.onnx.data beside the graph.
    if save_model_proto(model, staging / "model.onnx").external:
        files["onnx_data"] = "model.onnx.data"
    mobile: dict[str, Any] = {}
    if target.ort_format:
        from lrt_deploy.export.mobile import to_ort_format, write_required_operators

        to_ort_format(staging / "model.onnx", staging / "model.ort")
        files["ort"] = "model.ort"
        files["required_operators"] = "required_operators.config"
        mobile["required_operators"] = write_required_operators(
            staging / "model.ort", staging / "required_operators.config"
        )
        check_ort_runs(staging / "model.ort", onnx_path, feeds, threads)
        mobile["ort_bytes"] = (staging / "model.ort").stat().st_size
    if target.check_mobile_usability:
        from lrt_deploy.export.mobile import check_mobile_usability

        mobile["usability"] = check_mobile_usability(staging / "model.onnx").to_dict()
    files["model"] = files.get("ort", "model.onnx")
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, staging / "tokenizer.json")
        files["tokenizer"] = "tokenizer.json"
    files["report"] = "report.json"
    return files, model, mobile


def _reproducibility(target: Target) -> dict[str, str]:
    """The manifest's note on which bundle files are byte-reproducible."""
    note = {
        "onnx": "byte-identical for the same model, options and package versions: the "
        "exporter's stack traces (local paths) are stripped",
    }
    if target.ort_format:
        note["ort"] = ("ONNX Runtime's ORT-format writer lays out its kernel tables from an "
                       "unordered map, so model.ort bytes can differ between conversions of "
                       "the same model.onnx while the graph and kernels are identical")
    return note
