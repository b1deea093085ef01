"""Readers that turn text or ``.npz`` into calibration, held-out and latency batches.

Calibration batches fit statistics and healing; held-out batches (never calibrated on) measure
fidelity; the latency batch is the one fixed input every variant is timed on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lrt_deploy.errors import LrtDeployError, UnsupportedOperationError

if TYPE_CHECKING:
    from lrt_deploy.load import LoadedModel

__all__ = [
    "CALIBRATION_TEXT",
    "DOMAIN_HELDOUT_TEXT",
    "HELDOUT_TEXT",
    "calibration_batches",
    "evaluation_batches",
    "example_at_batch",
    "latency_inputs",
    "read_npz_inputs",
    "read_text_lines",
    "to_numpy_batches",
    "validation_batches",
]

CALIBRATION_TEXT = "calibration.txt"
HELDOUT_TEXT = "heldout.txt"
#: The second shipped held-out set, of a domain the calibration corpus does not cover.
DOMAIN_HELDOUT_TEXT = "heldout_domain.txt"


def read_text_lines(path: str | Path | None, default: str) -> list[str]:
    """Non-empty lines of ``path``, or of the shipped corpus file ``default``; at least one."""
    if path is None:
        from lrt_deploy.data.stream import shipped_lines

        lines = shipped_lines(default)
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


def read_npz_inputs(loaded: LoadedModel, calibration: str | Path) -> dict[str, np.ndarray]:
    """One checked array per model input from an ``.npz`` (no pickles): numeric, the example's
    rank and kind, one row count, ids in range."""
    import zipfile

    path = Path(calibration)
    if not path.is_file():
        raise LrtDeployError(f"calibration file '{path}' does not exist")
    fix = "save one array per input with numpy.savez(path, input_name=array, ...)"
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("a single array, not named arrays")
            missing = [n for n in loaded.input_names if n not in data.files]
            if missing:
                raise LrtDeployError(
                    f"calibration file '{path}' lacks inputs {', '.join(missing)}; it must hold "
                    f"one array per model input ({', '.join(loaded.input_names)})"
                )
            arrays = {n: np.asarray(data[n]) for n in loaded.input_names}
    except LrtDeployError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LrtDeployError(
            f"calibration file '{path}' is not a readable .npz of numeric arrays ({reason}): "
            f"{fix}"
        ) from None
    rows = set()
    vocab = (loaded.text_limits or {}).get("vocab_size")
    for name, array in arrays.items():
        example = loaded.example_inputs[name]
        expected = str(example.dtype).removeprefix("torch.")
        integer = not example.dtype.is_floating_point
        problem = None
        if array.ndim != example.dim():
            problem = f"has {array.ndim} axes but the model's input has {example.dim()}"
        elif array.ndim == 0 or array.shape[0] == 0:
            problem = "has no rows"
        elif array.dtype.kind not in "biuf":
            problem = f"has dtype {array.dtype} (numbers only)"
        elif integer and array.dtype.kind == "f":
            problem = f"holds floats but the model takes {expected}"
        elif name == "input_ids" and vocab and (array.min() < 0 or array.max() >= vocab):
            problem = f"holds ids outside the vocabulary [0, {vocab - 1}]"
        elif integer and array.dtype.kind == "i" and array.min() < 0 and name.endswith("ids"):
            problem = "holds negative ids"
        if problem:
            raise LrtDeployError(f"calibration input '{name}' in '{path}' {problem}: {fix}")
        rows.add(array.shape[0])
        arrays[name] = array.astype(expected, copy=False)
    if len(rows) > 1:
        raise LrtDeployError(
            f"calibration inputs in '{path}' have different row counts {sorted(rows)}: give "
            "every input the same number of rows"
        )
    return arrays


def calibration_batches(
    loaded: LoadedModel,
    calibration: str | Path | None,
    batch_size: int = 16,
    max_lines: int | None = None,
) -> list[dict[str, Any]]:
    """Named input batches for activation statistics: text lines (shipped corpus by default) for
    text models, an ``.npz`` of named arrays for any model; ``max_lines`` reads only a text
    file's head (a large healing corpus is streamed separately)."""
    import torch

    if calibration is not None and str(calibration).endswith(".npz"):
        arrays = {n: torch.from_numpy(a) for n, a in read_npz_inputs(loaded, calibration).items()}
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
            "calibration='inputs.npz' (one array per input) or use solver='svd'"
        )
    if calibration is not None and max_lines is not None:
        from lrt_deploy.data.stream import read_head

        lines = read_head(calibration, max_lines)
        if not lines:
            raise LrtDeployError(f"calibration file '{calibration}' has no text lines")
    else:
        lines = read_text_lines(calibration, CALIBRATION_TEXT)
    return [loaded.tokenize(chunk) for chunk in _chunks(lines, batch_size)]


def evaluation_batches(
    loaded: LoadedModel,
    batch_size: int = 16,
    fixed_shape: dict[str, int] | None = None,
    corpus: str = HELDOUT_TEXT,
) -> list[dict[str, Any]]:
    """Held-out inputs for fidelity: a shipped held-out ``corpus`` for text models, the example
    inputs otherwise; a fixed-shape graph gets only full batches of its shape."""
    if not loaded.is_text:
        return [example_at_batch(loaded, (fixed_shape or {}).get("batch"))]
    lines = read_text_lines(None, corpus)
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
    loaded: LoadedModel, batch: int, sequence: int
) -> dict[str, np.ndarray]:
    """The fixed batch every variant is timed on: ``batch`` held-out texts of ``sequence``
    tokens, or the example inputs at ``batch`` rows."""
    if loaded.is_text:
        lines = read_text_lines(None, HELDOUT_TEXT)
        text = " ".join(lines)  # long enough to fill the sequence without padding
        encoded = loaded.tokenize([text] * batch, pad_to=sequence)
        return {n: t.numpy() for n, t in encoded.items()}
    example = example_at_batch(loaded, batch)
    return {n: t.detach().numpy() for n, t in example.items()}


def validation_batches(
    loaded: LoadedModel, evaluation: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The export example plus two held-out batches of other shapes, so that shapes the
    exporter baked into the graph are caught."""
    return [dict(loaded.example_inputs), *evaluation[:2]]


def to_numpy_batches(batches: Iterable[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
    """Torch tensor batches as numpy arrays, as ONNX Runtime takes them."""
    return [{name: tensor.numpy() for name, tensor in batch.items()} for batch in batches]
