"""Readers that turn text or ``.npz`` into the input batches every stage measures on.

Three kinds of batches, never mixed: *calibration* batches (the shipped ``calibration.txt``
or the user's file) fit activation statistics, budgets and healing; *held-out* batches (the
shipped ``heldout.txt``, never used for calibration) measure fidelity; the *latency* batch is
one fixed input every variant is timed on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lrt_deploy.errors import LrtDeployError, UnsupportedOperationError

if TYPE_CHECKING:
    from lrt_deploy.load import LoadedModel

__all__ = [
    "CALIBRATION_TEXT",
    "HELDOUT_TEXT",
    "calibration_batches",
    "evaluation_batches",
    "example_at_batch",
    "latency_inputs",
    "read_text_lines",
    "to_numpy_batches",
    "validation_batches",
]

CALIBRATION_TEXT = "calibration.txt"
HELDOUT_TEXT = "heldout.txt"


def read_text_lines(path: str | Path | None, default: str) -> list[str]:
    """Non-empty lines of ``path``, or of the shipped corpus file ``default``.

    Raises:
        LrtDeployError: The file is missing, not UTF-8 text, or has no text lines.
    """
    if path is None:
        text = resources.files("lrt_deploy.data").joinpath(default).read_text(encoding="utf-8")
    else:
        file = Path(path)
        if not file.is_file():
            raise LrtDeployError(f"calibration file '{file}' does not exist")
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise LrtDeployError(
                f"calibration file '{file}' is not UTF-8 text: give one sentence per line, or an "
                ".npz of named input arrays"
            ) from exc
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise LrtDeployError(f"calibration file '{path}' has no text lines")
    return lines


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def calibration_batches(
    loaded: LoadedModel, calibration: str | Path | None, batch_size: int = 16
) -> list[dict[str, Any]]:
    """Named input batches for activation statistics: text lines (shipped corpus by default) for
    text models, an ``.npz`` of named arrays for any model.

    Raises:
        LrtDeployError: The file is missing or lacks an input; text given for a non-text model.
        UnsupportedOperationError: A non-text model and no ``.npz``.
    """
    import torch

    if calibration is not None and str(calibration).endswith(".npz"):
        path = Path(calibration)
        if not path.is_file():
            raise LrtDeployError(f"calibration file '{path}' does not exist")
        with np.load(path) as data:
            missing = [n for n in loaded.input_names if n not in data]
            if missing:
                raise LrtDeployError(
                    f"calibration file '{path}' lacks inputs {', '.join(missing)}; it must hold "
                    f"one array per model input ({', '.join(loaded.input_names)})"
                )
            arrays = {n: torch.from_numpy(np.asarray(data[n])) for n in loaded.input_names}
        count = next(iter(arrays.values())).shape[0]
        return [
            {n: a[i : i + batch_size] for n, a in arrays.items()}
            for i in range(0, count, batch_size)
        ]
    if not loaded.is_text:
        if calibration is not None:
            raise LrtDeployError(
                "text calibration needs a text model; for this model give an .npz of named inputs"
            )
        raise UnsupportedOperationError(
            "activation-aware factorization needs calibration data for a non-text model: pass "
            "--calibration inputs.npz (one array per input) or use --solver svd"
        )
    lines = read_text_lines(calibration, CALIBRATION_TEXT)
    return [loaded.tokenize(chunk) for chunk in _chunks(lines, batch_size)]


def evaluation_batches(
    loaded: LoadedModel, batch_size: int = 16, fixed_shape: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """Held-out inputs for fidelity: the shipped held-out corpus for text models (never used for
    calibration), the example inputs otherwise. A fixed-shape graph gets batches of its shape
    (only full batches, padded to its sequence length)."""
    if not loaded.is_text:
        return [example_at_batch(loaded, (fixed_shape or {}).get("batch"))]
    lines = read_text_lines(None, HELDOUT_TEXT)
    if fixed_shape:
        size = fixed_shape.get("batch", batch_size)
        pad_to = fixed_shape.get("sequence")
        return [
            loaded.tokenize(chunk, pad_to=pad_to)
            for chunk in _chunks(lines, size)
            if len(chunk) == size
        ]
    return [loaded.tokenize(chunk) for chunk in _chunks(lines, batch_size)]


def example_at_batch(loaded: LoadedModel, batch: int | None) -> dict[str, Any]:
    """The example inputs, cut or repeated along the batch axis to ``batch`` rows."""
    import torch

    example = dict(loaded.example_inputs)
    if batch is None:
        return example
    resized = {}
    for name, tensor in example.items():
        if tensor.dim() == 0 or 0 not in loaded.dynamic_axes.get(name, {}):
            resized[name] = tensor
            continue
        repeats = -(-batch // tensor.shape[0])
        resized[name] = torch.cat([tensor] * repeats, dim=0)[:batch]
    return resized


def latency_inputs(
    loaded: LoadedModel, batch: int, sequence: int, fixed_batch: bool = False
) -> dict[str, np.ndarray]:
    """The fixed batch the latency of every variant is measured on: ``batch`` held-out texts of
    ``sequence`` tokens for text models, else the example inputs (resized to ``batch`` rows when
    the graph's batch is fixed)."""
    if loaded.is_text:
        lines = read_text_lines(None, HELDOUT_TEXT)
        text = " ".join(lines)  # long enough to fill the sequence without padding
        encoded = loaded.tokenize([text] * batch, pad_to=sequence)
        return {n: t.numpy() for n, t in encoded.items()}
    example = example_at_batch(loaded, batch if fixed_batch else None)
    return {n: t.detach().numpy() for n, t in example.items()}


def validation_batches(
    loaded: LoadedModel, evaluation: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The export example plus two held-out batches of other shapes, so shapes baked into the
    graph by the exporter are caught when the graph is checked against PyTorch."""
    return [dict(loaded.example_inputs), *evaluation[:2]]


def to_numpy_batches(batches: Iterable[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
    """Torch tensor batches as numpy arrays, as ONNX Runtime takes them."""
    return [{name: tensor.numpy() for name, tensor in batch.items()} for batch in batches]
