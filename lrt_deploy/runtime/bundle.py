"""Reading a deployment bundle safely: the manifest, files inside the bundle only, checksums.

A bundle is a folder an app may have downloaded, so nothing in its ``manifest.json`` is taken on
trust: every file it names must resolve (symbolic links followed) to a file inside the bundle
folder, and, when the manifest records SHA-256 checksums (``checksums``: relative path -> hex
digest), the bytes must match before a model is opened. Any
problem is a :class:`~lrt_deploy.errors.BundleError` with one line saying what is wrong.
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
    "MANIFEST_NAME",
    "bundle_file",
    "file_sha256",
    "read_manifest",
    "verify_checksums",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parse ``folder/manifest.json`` and check it against the bundle contract
    (:func:`~lrt_deploy.runtime.contract.check_manifest`) and the sections the runtime reads
    (``checksums``, ``text``); raise :class:`BundleError` (or a subclass) otherwise."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(
            f"'{folder}' has no {MANIFEST_NAME}: pass a bundle folder written by lrt-export, or "
            "the .onnx/.ort file itself"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BundleError(
            f"'{path}' is not readable JSON ({type(exc).__name__}): re-export the bundle"
        ) from None
    # Format version, files inside the bundle, inputs/outputs, providers: the contract.
    check_manifest(manifest, folder)
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


def bundle_file(folder: Path, manifest: dict[str, Any], *keys: str) -> Path | None:
    """The file the manifest names under the first of ``keys`` present in ``files``.

    Returns None when none of the keys is present. Raises :class:`BundleError` when the name is
    absolute, climbs out of the bundle (``..``, a symbolic link elsewhere) or the file is missing.
    """
    files = manifest.get("files", {})
    key = next((k for k in keys if files.get(k)), None)
    if key is None:
        return None
    name = files[key]
    root = folder.resolve()
    candidate = Path(name)
    resolved = (root / candidate).resolve()
    if candidate.is_absolute() or not resolved.is_relative_to(root):
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


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checksums(folder: Path, manifest: dict[str, Any], paths: list[Path]) -> None:
    """Check each of ``paths`` (files inside ``folder``) against the manifest's checksums.

    A bundle written before checksums existed is opened with a warning; a file whose bytes do not
    match, or that a checksummed manifest does not cover, is a :class:`BundleError`.
    """
    checksums: dict[str, str] = manifest.get("checksums") or {}
    if not checksums:
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
