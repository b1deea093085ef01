"""The part of the bundle contract the runtime relies on, checked with the standard library.

``lrt_deploy/schemas/manifest.schema.json`` describes the whole manifest; an app embedding the
runtime has no ``jsonschema``, so the format version, files and inputs/outputs are checked here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from lrt_deploy.errors import BundleError

__all__ = [
    "SUPPORTED_FORMAT_VERSION",
    "BundleContractError",
    "UnsupportedFormatVersionError",
    "check_format_version",
    "check_manifest",
]

#: The newest ``manifest.json`` / ``report.json`` ``format_version`` this lrt-deploy reads.
SUPPORTED_FORMAT_VERSION = 1

_FILE_KEYS = ("model", "onnx", "onnx_data", "ort", "tokenizer", "report", "required_operators",
              "verification")
_TENSOR_DTYPES = frozenset(
    {
        "float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64",
        "uint8", "uint16", "uint32", "uint64", "bool", "str", "object",
    }
)


class BundleContractError(BundleError):
    """A ``manifest.json`` does not follow the bundle contract (a broken or edited bundle)."""


class UnsupportedFormatVersionError(BundleContractError):
    """The bundle was written by a newer lrt-deploy than the one reading it."""


def check_manifest(data: Any, bundle_dir: str | os.PathLike[str]) -> None:
    """Check ``format_version``, ``files`` (inside the bundle), ``inputs``/``outputs`` and
    ``target.providers`` of a parsed manifest; unknown extra fields are allowed."""
    where = Path(bundle_dir) / "manifest.json"
    if not isinstance(data, Mapping):
        raise BundleContractError(f"{where} is not a JSON object; re-export the bundle")
    check_format_version(data.get("format_version"), where)
    _check_files(data.get("files"), Path(bundle_dir), where)
    for key in ("inputs", "outputs"):
        _check_tensors(data.get(key), key, where)
    target = data.get("target")
    if target is not None:
        if not isinstance(target, Mapping):
            raise BundleContractError(f"{where}: target must be an object, got {target!r}")
        providers = target.get("providers")
        if providers is not None and not (
            isinstance(providers, list) and all(isinstance(p, str) for p in providers)
        ):
            raise BundleContractError(
                f"{where}: target.providers must be a list of provider names, got {providers!r}"
            )


def check_format_version(version: Any, where: str | os.PathLike[str], what: str = "bundle") -> None:
    """An integer ``format_version`` from 1 to :data:`SUPPORTED_FORMAT_VERSION`, else an error
    naming ``where`` (``what``: ``bundle`` or ``report``)."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BundleContractError(
            f"{where}: format_version must be an integer >= 1, got {version!r}; re-export the "
            "bundle with lrt-export"
        )
    if version > SUPPORTED_FORMAT_VERSION:
        raise UnsupportedFormatVersionError(
            f"{what} format {version} is newer than this lrt-deploy (supports up to "
            f"{SUPPORTED_FORMAT_VERSION}): upgrade lrt-deploy"
        )


def _check_files(files: Any, folder: Path, where: Path) -> None:
    if not isinstance(files, Mapping) or not isinstance(files.get("model"), str):
        raise BundleContractError(
            f"{where}: files.model (the model file to open) is missing; re-export the bundle"
        )
    for key in _FILE_KEYS:
        name = files.get(key)
        if name is None:
            continue
        if not isinstance(name, str) or not name:
            raise BundleContractError(f"{where}: files.{key} must be a file name, got {name!r}")
        path = PurePosixPath(name.replace("\\", "/"))
        if not path.parts or name.endswith(("/", "\\")):
            raise BundleContractError(
                f"{where}: files.{key} is {name!r}, which names a folder, not a file; "
                "re-export the bundle"
            )
        # A manifest must not send the runtime to files outside its own folder.
        if path.is_absolute() or ".." in path.parts or ":" in path.parts[0]:
            raise BundleContractError(
                f"{where}: files.{key} is {name!r}, which is outside the bundle; a bundle names "
                "only files inside its own folder"
            )
    for key in ("model", "tokenizer"):
        name = files.get(key)
        if name is not None and not (folder / name).is_file():
            raise BundleContractError(
                f"{where}: files.{key} names {name!r} but it is not in {folder}; copy the whole "
                "bundle folder"
            )


def _check_tensors(entries: Any, key: str, where: Path) -> None:
    if not isinstance(entries, list) or not entries:
        raise BundleContractError(f"{where}: {key} must be a non-empty list; re-export the bundle")
    names: set[str] = set()
    for index, entry in enumerate(entries):
        label = f"{key}[{index}]"
        if not isinstance(entry, Mapping):
            raise BundleContractError(f"{where}: {label} must be an object, got {entry!r}")
        name, dtype, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
        if not isinstance(name, str) or not name:
            raise BundleContractError(f"{where}: {label}.name must be a non-empty string")
        if name in names:
            raise BundleContractError(f"{where}: {key} names {name!r} twice")
        names.add(name)
        if dtype not in _TENSOR_DTYPES:
            raise BundleContractError(
                f"{where}: {label} ({name}) has dtype {dtype!r}; expected one of "
                f"{', '.join(sorted(_TENSOR_DTYPES))}"
            )
        valid_shape = isinstance(shape, list) and all(
            dim is None
            or isinstance(dim, str)
            or (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0)
            for dim in shape
        )
        if not valid_shape:
            raise BundleContractError(
                f"{where}: {label} ({name}) shape must be a list of sizes (int), axis names "
                f"(str) or null, got {shape!r}"
            )
