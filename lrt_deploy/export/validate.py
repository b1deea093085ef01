"""Check an exported graph against PyTorch on the same inputs before anything is written."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lrt_deploy.errors import ExportValidationError

__all__ = ["OutputCheck", "validate_onnx"]


@dataclass(frozen=True)
class OutputCheck:
    """One output's worst disagreement over all validation batches."""

    name: str
    max_abs_diff: float
    atol: float
    rtol: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_abs_diff": self.max_abs_diff,
            "atol": self.atol,
            "rtol": self.rtol,
            "passed": self.passed,
        }


def validate_onnx(
    onnx_path: str | Path,
    reference: Any,
    batches: Sequence[Mapping[str, Any]],
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> list[OutputCheck]:
    """One check per output of the graph run on ``batches`` (named torch tensors, best of
    other shapes than the export example's) against ``reference(batch)``, elementwise
    ``|diff| <= atol + rtol * |reference|``; raises ExportValidationError naming each failure."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    graph_inputs = [i.name for i in session.get_inputs()]
    worst: dict[str, float] = {}
    failed: dict[str, bool] = {}
    for batch in batches:
        feeds = {name: batch[name].detach().cpu().numpy() for name in graph_inputs}
        expected = reference(batch)
        names = list(expected)
        got = dict(zip(names, session.run(names, feeds), strict=True))
        for name in names:
            ref = expected[name].detach().cpu().numpy()
            if got[name].shape != ref.shape:
                raise ExportValidationError(
                    f"output '{name}' has shape {got[name].shape} in ONNX but {ref.shape} in "
                    "PyTorch: a dimension was baked in at export; check the dynamic axes"
                )
            diff = np.abs(got[name].astype(np.float64) - ref.astype(np.float64))
            worst[name] = max(worst.get(name, 0.0), float(diff.max(initial=0.0)))
            bad = bool((diff > atol + rtol * np.abs(ref)).any()) or not np.isfinite(diff).all()
            failed[name] = failed.get(name, False) or bad
    checks = [OutputCheck(n, worst[n], atol, rtol, not failed[n]) for n in worst]
    failures = [c for c in checks if not c.passed]
    if failures:
        detail = "; ".join(
            f"output '{c.name}' max |diff| {c.max_abs_diff:.3g} > atol {atol:g} + rtol {rtol:g}"
            for c in failures
        )
        raise ExportValidationError(
            f"the ONNX graph does not match PyTorch: {detail}; the exporter mistranslated an "
            "operator (try another Target.opset) or the model has shape-dependent Python branches"
        )
    return checks
