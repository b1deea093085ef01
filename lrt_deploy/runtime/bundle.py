"""Reading a deployment bundle safely: the manifest, files inside the bundle only, checksums.

Every file a manifest names must resolve inside the bundle folder and match its SHA-256 before
use (:func:`checked_file`). Checksums catch damaged or swapped files, not a rewritten manifest:
a bundle from an untrusted source needs a trusted copy of its manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from lrt_deploy.errors import BundleError

from .contract import check_manifest

__all__ = [
    "CHECKSUM_MARKERS",
    "MANIFEST_NAME",
    "UNCHECKSUMMED_KEYS",
    "bundle_file",
    "checked_file",
    "external_data_names",
    "file_sha256",
    "read_json",
    "read_manifest",
    "session_config",
    "verify_checksums",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"

#: Manifest keys always written together with ``checksums``: a manifest with one of them and no
#: checksums has had them removed.
CHECKSUM_MARKERS = ("text", "runtimes", "devices")
#: ``files`` keys without a checksum: ``report.json`` is written after the manifest and never
#: feeds a model.
UNCHECKSUMMED_KEYS = frozenset({"report"})


def read_json(path: Path, what: str, fix: str = "re-export the bundle") -> Any:
    """Parse a JSON file; any failure is one :class:`BundleError` naming ``what`` and ``fix``."""
    try:
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise BundleError(f"{what} '{path}' is a folder, not a file: {fix}") from None
    except OSError as exc:
        raise BundleError(
            f"cannot read {what} '{path}': {exc.strerror or type(exc).__name__}; {fix}"
        ) from None
    except UnicodeDecodeError:
        raise BundleError(f"{what} '{path}' is not readable JSON (not UTF-8 text): {fix}") \
            from None
    try:
        return json.loads(text)
    except RecursionError:
        raise BundleError(f"{what} '{path}' is not readable JSON (nested too deeply): {fix}") \
            from None
    except ValueError as exc:
        raise BundleError(
            f"{what} '{path}' is not readable JSON ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120]}): {fix}"
        ) from None


def read_manifest(folder: Path) -> dict[str, Any]:
    """``folder/manifest.json``, checked against the contract and the ``checksums`` and
    ``text`` sections the runtime reads; :class:`BundleError` otherwise."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(
            f"'{folder}' has no {MANIFEST_NAME}: pass a bundle folder written by lrt-export, or "
            "the .onnx/.ort file itself"
        )
    manifest = read_json(path, "manifest")
    try:
        check_manifest(manifest, folder)
    except BundleError:
        raise
    except (TypeError, AttributeError, IndexError, KeyError, ValueError, RecursionError) as exc:
        # Whatever shape a hand-edited manifest takes, the caller gets one error type.
        raise BundleError(
            f"'{path}' is malformed ({type(exc).__name__}): re-export the bundle"
        ) from None
    text = manifest.get("text") or {}
    if not isinstance(text, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in text.values()
    ):
        raise BundleError(f"'{path}' has a malformed 'text' section: re-export the bundle")
    checksums = manifest.get("checksums", {})
    if not isinstance(checksums, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in checksums.items()
    ):
        raise BundleError(f"'{path}' has a malformed 'checksums' section: re-export the bundle")
    return manifest


def session_config(manifest: dict[str, Any] | None) -> dict[str, str]:
    """The session config entries the bundle asks for (``devices.session_config``), names to
    strings; :class:`BundleError` when malformed."""
    config = ((manifest or {}).get("devices") or {}).get("session_config") or {}
    if not isinstance(config, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in config.items()
    ):
        raise BundleError("manifest's devices.session_config must map names to strings: "
                          "re-export the bundle")
    return config


def bundle_file(folder: Path, manifest: dict[str, Any], *keys: str) -> Path | None:
    """The file named under the first of ``keys`` present in ``files`` (None when none is);
    :class:`BundleError` when it lies outside the bundle or is missing."""
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise BundleError(f"manifest of '{folder}' has no 'files' object: re-export the bundle")
    key = next((k for k in keys if files.get(k)), None)
    if key is None:
        return None
    name = files[key]
    if not isinstance(name, str):
        raise BundleError(
            f"manifest of '{folder}' names {key}={name!r}, not a file name: re-export the bundle"
        )
    resolved = _inside(folder, folder, name)
    if resolved is None:
        raise BundleError(
            f"manifest of '{folder}' names {key}={name!r}, outside the bundle: a bundle may only "
            "refer to its own files; re-export it"
        )
    if not resolved.is_file():
        raise BundleError(
            f"manifest of '{folder}' names {key}={name!r} but that file is missing: copy the "
            "whole bundle folder"
        )
    return resolved


def checked_file(
    folder: Path, manifest: dict[str, Any], *keys: str, verify: bool = True
) -> Path | None:
    """:func:`bundle_file` with its SHA-256 (and an ``.onnx`` model's external-data files')
    checked against the manifest: the one way to open a bundle's file."""
    path = bundle_file(folder, manifest, *keys)
    if path is None or not verify:
        return path
    key = next(k for k in keys if manifest["files"].get(k))
    if key in UNCHECKSUMMED_KEYS:
        return path
    covered = [path]
    if path.suffix == ".onnx":
        covered += _external_data_files(folder, path)
    verify_checksums(folder, manifest, covered)
    return path


_LOCATION = b"\x0a\x08location\x12"  # StringStringEntryProto: key="location", then value


def external_data_names(model: Path) -> list[str]:
    """The ``location`` of every external-data entry of an ``.onnx`` file, read from the raw
    protobuf bytes (the runtime has no ``onnx`` package)."""
    names: list[str] = []
    overlap = len(_LOCATION) + 10 + 4096  # marker, length varint, a name of up to 4 KiB
    tail = b""
    with open(model, "rb") as handle:
        while True:
            block = handle.read(1 << 22)
            data = tail + block
            # Markers near the end are parsed with the next block (unless this is the last).
            limit = len(data) if not block else max(len(data) - overlap, 0)
            at = data.find(_LOCATION)
            while 0 <= at < limit:
                value = _length_delimited(data, at + len(_LOCATION))
                if value is not None:
                    names.append(value.decode("utf-8", "replace"))
                at = data.find(_LOCATION, at + 1)
            if not block:
                break
            tail = data[limit:]
    return list(dict.fromkeys(names))


def _length_delimited(data: bytes, at: int) -> bytes | None:
    length, shift = 0, 0
    while at < len(data):
        byte = data[at]
        at += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return data[at:at + length] if at + length <= len(data) else None
        shift += 7
    return None


def _inside(folder: Path, base: Path, name: str) -> Path | None:
    """``name`` resolved against ``base`` (symbolic links followed), or None when it is
    absolute or lands outside the bundle ``folder``."""
    resolved = (base.resolve() / name).resolve()
    if Path(name).is_absolute() or not resolved.is_relative_to(folder.resolve()):
        return None
    return resolved


def _external_data_files(folder: Path, model: Path) -> list[Path]:
    paths = []
    for name in external_data_names(model):
        path = _inside(folder, model.parent, name)
        if path is None:
            raise BundleError(
                f"'{model.name}' in bundle '{folder}' loads weights from {name!r}, outside the "
                "bundle: re-export the bundle"
            )
        if not path.is_file():
            raise BundleError(
                f"'{model.name}' in bundle '{folder}' needs its weights file {name!r}, which is "
                "missing: copy the whole bundle folder"
            )
        paths.append(path)
    return paths


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(folder: Path, manifest: dict[str, Any], paths: list[Path]) -> None:
    """Check ``paths`` against the manifest's checksums; a manifest of the oldest format without
    any only warns, any other gap or mismatch is a :class:`BundleError`."""
    checksums: dict[str, str] = manifest.get("checksums") or {}
    if not checksums:
        current = [key for key in CHECKSUM_MARKERS if key in manifest]
        if "verification" in (manifest.get("files") or {}):
            current.append("files.verification")
        if current:
            raise BundleError(
                f"manifest of '{folder}' has no checksums although its format always records "
                f"them (it has {', '.join(map(repr, current))}): they were removed or the "
                "manifest edited; re-export the bundle with lrt-export, or re-download it"
            )
        logger.warning(
            "bundle '%s' records no checksums (written before lrt-deploy recorded them): its "
            "files are not verified; re-export it to get them", folder,
        )
        return
    root = folder.resolve()
    for path in paths:
        relative = path.resolve().relative_to(root).as_posix()
        expected = checksums.get(relative)
        if expected is None:
            raise BundleError(
                f"manifest of '{folder}' has no checksum for '{relative}': re-export the bundle"
            )
        if file_sha256(path) != expected.lower():
            raise BundleError(
                f"'{relative}' in bundle '{folder}' does not match the SHA-256 in its manifest "
                "(modified or damaged): re-export or re-download the bundle"
            )
