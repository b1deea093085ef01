"""Save and load ONNX models whose weights go to a side file (``model.onnx.data``).

A protobuf cannot exceed 2 GiB, so a model over that must keep its initializers outside the
``.onnx`` file. The threshold is a parameter so the same code path is tested on tiny models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "ExternalDataResult",
    "initializer_bytes",
    "load_model_proto",
    "save_model_proto",
]

logger = logging.getLogger(__name__)

# Below 2 GiB with room for the graph itself, which stays in the protobuf.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass(frozen=True)
class ExternalDataResult:
    """Where a model was saved and whether its weights went to a side file."""

    path: Path
    external: bool
    data_path: Path | None
    initializer_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path.name,
            "external": self.external,
            "data_file": self.data_path.name if self.data_path else None,
            "initializer_bytes": self.initializer_bytes,
        }


def initializer_bytes(model: Any) -> int:
    """Bytes of weights held by ``model``'s top-level initializers (inline or external)."""
    from onnx import TensorProto, helper

    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            length = {e.key: e.value for e in tensor.external_data}.get("length")
            if length is not None:
                total += int(length)
                continue
        if tensor.raw_data:
            total += len(tensor.raw_data)
        else:
            count = 1
            for dim in tensor.dims:
                count *= dim
            total += count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def save_model_proto(
    model: Any,
    path: str | Path,
    *,
    threshold: int = EXTERNAL_DATA_THRESHOLD,
    size_threshold: int = 1024,
) -> ExternalDataResult:
    """Save ``model`` to ``path``; when its weights exceed ``threshold`` bytes, every
    initializer of at least ``size_threshold`` bytes goes to ``<path name>.data`` beside it.

    A stale ``.data`` file from an earlier save is removed first: ``onnx`` appends to it.

    Args:
        model: An ``onnx.ModelProto`` (modified: external tensors get data-location fields).
        path: The ``.onnx`` file to write.
        threshold: Total initializer bytes above which the weights are written externally.
        size_threshold: Initializers smaller than this stay inline even then.

    Returns:
        What was written.
    """
    import onnx

    path = Path(path)
    data_path = path.with_name(path.name + ".data")
    weights = initializer_bytes(model)
    external = weights > threshold
    if data_path.exists():
        data_path.unlink()
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_path.name,
            size_threshold=size_threshold,
            convert_attribute=False,
        )
    else:
        onnx.save_model(model, str(path))
    logger.info("saved %s (%d weight bytes%s)", path.name, weights,
                f", external in {data_path.name}" if external else "")
    return ExternalDataResult(path, external, data_path if external else None, weights)


def load_model_proto(path: str | Path, *, load_external_data: bool = True) -> Any:
    """Load an ONNX model, with its external weights (resolved beside ``path``) by default."""
    import onnx

    return onnx.load(str(path), load_external_data=load_external_data)
