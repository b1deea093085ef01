"""``lrt-verify BUNDLE``: run an existing bundle on every device class this machine can reach.

Reads the bundle's ``verification.npz`` (held-out token ids and the dense model's outputs,
checksummed in the manifest), runs the deployed model on the host, under qemu for other CPU
classes and in WebAssembly, and prints the device table. Exit 0; 2 for bad input; 3 when
``--fidelity-floor`` is missed on a class that ran, or with ``--strict`` when a class neither
ran nor is exact by the weight check. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lrt_deploy.cli.base import EXIT_FLOOR_MISSED, EXIT_OK, EXIT_USAGE, Parser, print_error
from lrt_deploy.errors import BundleError, LrtDeployError

__all__ = ["EXIT_FLOOR_MISSED", "EXIT_USAGE", "build_parser", "main"]

_PROG = "lrt-verify"


def build_parser() -> argparse.ArgumentParser:
    """Return the ``lrt-verify`` argument parser."""
    from lrt_deploy.runtime.devices import DEVICE_CLASSES
    from lrt_deploy.verify.check import SAMPLE_SENTENCES

    parser = Parser(
        prog=_PROG,
        description="Run an lrt-export bundle on every device class this machine can reach "
        "(natively, other CPUs under qemu, WebAssembly in Node) and compare each with the "
        "dense model and with each other.")
    parser.add_argument("bundle", type=Path, help="bundle folder written by lrt-export")
    parser.add_argument("--classes", metavar="A,B", type=lambda text: text.split(","),
                        help=f"device classes to list (default: all: {', '.join(DEVICE_CLASSES)})")
    parser.add_argument("--sample", type=int, default=SAMPLE_SENTENCES, metavar="N",
                        help=f"sentences of each held-out set (default {SAMPLE_SENTENCES}; at "
                        "most what the bundle stores)")
    parser.add_argument("--jobs", type=int, default=2, metavar="N",
                        help="emulated classes run at once (default 2)")
    parser.add_argument("--fidelity-floor", type=float, metavar="COSINE",
                        help="exit 3 when a class that ran has a mean cosine below this")
    parser.add_argument("--strict", action="store_true",
                        help="also exit 3 when a class did not run and its int8 kernel is not "
                        "exact by the weight check")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the table as JSON")
    return parser


def _exact_on(folder: Path, manifest: dict, model: Path) -> list[str]:
    recorded = (manifest.get("devices") or {}).get("exact_on")
    if isinstance(recorded, list):
        return [str(name) for name in recorded]
    from lrt_deploy.quant.kernels import exact_classes
    from lrt_deploy.runtime.bundle import checked_file

    onnx_file = checked_file(folder, manifest, "onnx") or model
    return exact_classes(onnx_file)


def verify_bundle(folder: Path, *, classes: Sequence[str] | None = None,
                  sample: int | None = None, jobs: int = 2, progress=lambda _line: None):
    """The :class:`~lrt_deploy.verify.check.DeviceVerification` of the bundle at ``folder``
    (its files checked against the manifest's checksums first); ``sample`` defaults to
    :data:`~lrt_deploy.verify.check.SAMPLE_SENTENCES`."""
    from lrt_deploy.runtime.bundle import checked_file, read_manifest, session_config
    from lrt_deploy.verify.check import SAMPLE_SENTENCES, verify_model

    if not folder.is_dir():
        raise BundleError(f"{folder} is not a folder: pass a bundle folder written by lrt-export")
    manifest = read_manifest(folder)
    model = checked_file(folder, manifest, "model", "onnx")
    if model is None:
        raise BundleError(f"manifest of '{folder}' names no model: re-export it")
    reference = checked_file(folder, manifest, "verification")
    if reference is None:
        skipped = (manifest.get("devices") or {}).get("skipped")
        raise BundleError(
            f"'{folder}' has no held-out reference (verification.npz)"
            + (f": {skipped}" if skipped else ": exported before device verification")
            + "; re-export the text model with lrt-export (without --no-verify-devices)")
    return verify_model(model, reference, _exact_on(folder, manifest, model), classes=classes,
                        sample=SAMPLE_SENTENCES if sample is None else sample, jobs=jobs,
                        session_config=session_config(manifest), progress=progress)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lrt-verify``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.sample < 1 or args.jobs < 1:
            raise LrtDeployError("--sample and --jobs take a count of at least 1, e.g. 8")
        if args.json is not None and not args.json.parent.is_dir():
            raise LrtDeployError(f"{args.json.parent} does not exist: create it first")
        result = verify_bundle(args.bundle, classes=args.classes, sample=args.sample,
                               jobs=args.jobs, progress=lambda line: print(line, file=sys.stderr))
    except LrtDeployError as error:
        return print_error(_PROG, error)
    from lrt_deploy.runtime.files import write_atomic

    print("\n".join(result.markdown()))
    if args.json is not None:
        try:
            write_atomic(args.json, json.dumps(result.to_dict(), indent=2))
        except OSError as error:
            return print_error(_PROG, f"cannot write {args.json}: {error.strerror}")
    missed = result.failures(args.fidelity_floor, strict=args.strict)
    if missed:
        print(f"{_PROG}: {'; '.join(missed)}", file=sys.stderr)
        return EXIT_FLOOR_MISSED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
