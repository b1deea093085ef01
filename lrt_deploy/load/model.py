"""A loaded model with the example inputs, names and axes export needs, and input specs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrt_deploy.errors import ExampleInputsError

if TYPE_CHECKING:
    import torch

__all__ = ["InputSpec", "LoadedModel", "first_line", "last_line", "parse_input_spec",
           "tensor_from_spec"]

#: dtypes an example input can have: what ONNX export and ONNX Runtime take as graph inputs.
_EXAMPLE_DTYPES = (
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8",
    "bool",
)
#: The example is only traced and validated on: a bound that still allows any sane shape.
_MAX_EXAMPLE_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class InputSpec:
    """An example input described by name, shape and dtype (``name=2,16:int64``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass
class LoadedModel:
    """A model ready for compression and export; ``example_inputs`` are in graph input order.

    Attributes:
        module: ``nn.Module`` (compression swaps its layers in place),
            ``torch.jit.ScriptModule`` or ``torch.export.ExportedProgram``.
        format: ``huggingface``, ``sentence-transformers``, ``torchscript``, ``torch-export``,
            ``pickle`` or ``state-dict``.
        kind: ``text-embedding``, ``text-hidden``, ``text-logits`` (a classifier) or
            ``generic``: decides how fidelity is scored.
        text_limits: ``vocab_size`` and ``max_sequence`` the graph accepts (text models).
    """

    module: Any
    format: str
    name: str
    example_inputs: dict[str, torch.Tensor]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    kind: str = "generic"
    tokenizer_file: Path | None = None
    source_hash: str = ""
    source_path: Path | None = None
    tokenizer: Any = None
    max_length: int = 128
    attention_shape: tuple[int, int] | None = None
    text_limits: dict[str, int] | None = None

    @property
    def input_names(self) -> list[str]:
        return list(self.example_inputs)

    @property
    def is_text(self) -> bool:
        return self.tokenizer is not None

    @property
    def can_compress(self) -> bool:
        import torch

        return isinstance(self.module, torch.nn.Module) and not isinstance(
            self.module, torch.jit.ScriptModule
        )

    def tokenize(self, texts: Sequence[str], *, pad_to: int | None = None) -> dict[str, Any]:
        """Tokenize ``texts`` into the model's named input tensors (text models only)."""
        padding: Any = "max_length" if pad_to else True
        encoded = self.tokenizer(
            list(texts),
            padding=padding,
            truncation=True,
            max_length=pad_to or self.max_length,
            return_tensors="pt",
        )
        return {name: encoded[name] for name in self.input_names}

    def graph_module(self) -> Any:
        """What the exporter consumes: positional inputs in ``input_names`` order, tuple outputs."""
        import torch

        if isinstance(self.module, (torch.jit.ScriptModule, torch.export.ExportedProgram)):
            return self.module
        from lrt_deploy.nn.adapters import OutputsAsTuple

        return OutputsAsTuple(self.module, self.input_names, self.output_names)

    def forward(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Run the PyTorch model on named inputs; returns named outputs (no grad, eval mode)."""
        import torch

        module = self.graph_module()
        if isinstance(module, torch.export.ExportedProgram):
            module = module.module()
        with torch.no_grad():
            outputs = module(*[inputs[name] for name in self.input_names])
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return dict(zip(self.output_names, outputs, strict=True))


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``name=2,16`` or ``name=2,16:int64`` into an :class:`InputSpec`."""
    try:
        name, rest = text.split("=", 1)
        dims, _, dtype = rest.partition(":")
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError as exc:
        raise ExampleInputsError(
            f"cannot read input shape '{text}': write NAME=DIM,DIM[:DTYPE], e.g. x=2,16:float32"
        ) from exc
    if not name or any(d < 1 for d in shape):
        raise ExampleInputsError(
            f"input shape '{text}' needs a name and positive dimensions, e.g. x=2,16"
        )
    dtype = dtype or "float32"
    if dtype not in _EXAMPLE_DTYPES:
        raise ExampleInputsError(
            f"dtype '{dtype}' of input '{name}' is not supported for example inputs: use one of "
            f"{', '.join(_EXAMPLE_DTYPES)}"
        )
    elements = math.prod(shape)
    if elements > _MAX_EXAMPLE_ELEMENTS:
        raise ExampleInputsError(
            f"input shape '{text}' has {elements:,} elements; an example input only needs the "
            f"right rank and small sizes (at most {_MAX_EXAMPLE_ELEMENTS:,} elements), e.g. x=2,16"
        )
    return InputSpec(name=name, shape=shape, dtype=dtype)


def tensor_from_spec(spec: InputSpec) -> torch.Tensor:
    """A seeded example tensor of ``spec``'s shape and dtype."""
    import torch

    try:
        dtype = getattr(torch, spec.dtype)
        if not isinstance(dtype, torch.dtype):
            raise AttributeError(spec.dtype)
    except AttributeError as exc:
        raise ExampleInputsError(
            f"unknown dtype '{spec.dtype}' for input '{spec.name}': use float32, float16, int64, "
            "int32 or bool"
        ) from exc
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(spec.shape, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.ones(spec.shape, dtype=torch.bool)
    return torch.randint(0, 2, spec.shape, generator=generator, dtype=dtype)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def last_line(exc: BaseException) -> str:
    text = [line for line in str(exc).strip().splitlines() if line.strip()]
    return text[-1].strip() if text else type(exc).__name__
