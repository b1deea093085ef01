"""The one shape of a graph pass: ``run(model, context) -> PassResult``, applied as a list."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = ["GraphPass", "PassContext", "PassResult", "run_passes"]


def _quiet(_line: str) -> None:
    return None


@dataclass(frozen=True)
class PassContext:
    """What a pass may use besides its input graph; ``output`` is where it writes its graph."""

    output: Path
    label: str = "model"
    check_inputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    calibration: Sequence[Mapping[str, np.ndarray]] = ()
    progress: Callable[[str], None] = _quiet

    def writing(self, output: Path) -> PassContext:
        """The same context writing to ``output``."""
        return replace(self, output=output)


@dataclass
class PassResult:
    """A pass's graph and its record; ``details`` is what the manifest stores for it, ``seconds``
    the time of the pass's own work when it measures one (not stored)."""

    name: str
    output: Path
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.details)


class GraphPass(Protocol):
    """A named step from one ONNX file to another."""

    name: str

    def run(self, model: Path, context: PassContext) -> PassResult: ...


def run_passes(
    passes: Sequence[GraphPass], model: Path, context: PassContext
) -> list[PassResult]:
    """Run ``passes`` in order, each on the previous one's graph; the last writes ``output``."""
    results: list[PassResult] = []
    for index, graph_pass in enumerate(passes):
        last = index == len(passes) - 1
        output = context.output if last else context.output.with_name(
            f"{context.output.stem}.{index}-{graph_pass.name}.onnx")
        result = graph_pass.run(model, context.writing(output))
        results.append(result)
        model = result.output
    return results
