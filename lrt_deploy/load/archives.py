"""PyTorch archives: ``torch.save`` (pickled module only when trusted, or a state dict with a
factory), TorchScript, and ``torch.export`` .pt2 (its pickles held to ``weights_only``)."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lrt_deploy._unpickle import was_refused
from lrt_deploy.errors import (
    CorruptModelError,
    ExampleInputsError,
    UnsupportedFormatError,
    UntrustedPickleError,
)

from .model import InputSpec, LoadedModel, first_line, last_line, tensor_from_spec

if TYPE_CHECKING:
    import torch

__all__ = ["load_file", "untrusted"]


def load_file(
    path: Path, trust_pickle: bool, factory: str | None, input_specs: Sequence[InputSpec]
) -> LoadedModel:
    """Load a PyTorch archive by its content; a pickled module only with ``trust_pickle``."""
    import torch

    if not zipfile.is_zipfile(path):
        raise UnsupportedFormatError(
            f"'{path.name}' is not a PyTorch archive (.pt from torch.save/torch.jit.save, .pt2 "
            "from torch.export.save); for ONNX files use onnxruntime directly"
        )
    try:
        entries = zipfile.ZipFile(path).namelist()
    except zipfile.BadZipFile as exc:
        raise CorruptModelError(f"'{path.name}' is a damaged archive: {exc}") from exc

    if any(e.endswith("archive_format") or "/models/" in e for e in entries) and not any(
        e.endswith("data.pkl") for e in entries
    ):
        return _load_torch_export(path, trust_pickle)
    if any("/code/" in e for e in entries):
        return _load_torchscript(path, input_specs)

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch prefixes every safe-unpickler failure with "Weights only load failed"; only an
        # unsupported global (a class to import and run) means "this is a pickled module".
        if "Unsupported global" not in str(exc):
            raise CorruptModelError(
                f"cannot read '{path.name}': its pickle data is damaged ({last_line(exc)})"
            ) from exc
        if not trust_pickle:
            raise untrusted(path, "is a pickled nn.Module") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as inner:  # any failure while running the user's pickle
            raise CorruptModelError(
                f"cannot unpickle '{path.name}' (is its class importable here?): "
                f"{first_line(inner)}"
            ) from inner
        return _from_module(obj, path, "pickle", input_specs)
    except Exception as exc:  # torch raises many types for truncated or damaged archives
        raise CorruptModelError(f"cannot read '{path.name}': {first_line(exc)}") from exc

    if isinstance(obj, torch.nn.Module):
        return _from_module(obj, path, "pickle", input_specs)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if factory is None:
            raise UnsupportedFormatError(
                f"'{path.name}' holds only weights (a state dict) and no architecture: pass "
                "factory=package.module:function that builds the model, or save the whole model "
                "with torch.jit.save / torch.export.save"
            )
        module = _call_factory(factory)
        try:
            module.load_state_dict(obj)
        except RuntimeError as exc:
            raise CorruptModelError(
                f"the weights in '{path.name}' do not fit the model built by {factory}: "
                f"{first_line(exc)}"
            ) from exc
        return _from_module(module, path, "state-dict", input_specs)
    raise UnsupportedFormatError(
        f"'{path.name}' holds a {type(obj).__name__}, not a model or a state dict"
    )


def untrusted(path: Path, what: str) -> UntrustedPickleError:
    """The one message for every file whose loading would run code from it."""
    return UntrustedPickleError(
        f"'{path.name}' {what} and unpickling it runs code from the file; pass trust_pickle=True "
        "only if you trust its source, or save the model with torch.jit.save or "
        "torch.export.save (plain tensors) instead"
    )


def _call_factory(factory: str) -> Any:
    import torch

    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise UnsupportedFormatError(
            f"factory='{factory}' must look like package.module:function"
        )
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # ImportError, AttributeError, or the module failing on import
        raise UnsupportedFormatError(
            f"cannot import factory='{factory}': {first_line(exc)}"
        ) from exc
    if not callable(builder):
        raise UnsupportedFormatError(
            f"factory='{factory}' is a {type(builder).__name__}, not a function: name one "
            "that builds the model"
        )
    try:
        built = builder()
    except (Exception, SystemExit) as exc:  # the user's code: any failure, an exit included
        what = f"exited ({exc.code})" if isinstance(exc, SystemExit) else first_line(exc)
        raise UnsupportedFormatError(
            f"factory='{factory}' failed when called with no arguments: {what}; it must build "
            "the model without arguments"
        ) from None
    if not isinstance(built, torch.nn.Module):
        raise UnsupportedFormatError(
            f"factory='{factory}' returned {type(built).__name__}, not an nn.Module"
        )
    return built


def _example_from_module(
    module: Any, input_specs: Sequence[InputSpec], forward: Any
) -> dict[str, torch.Tensor]:
    import torch

    if input_specs:
        return {spec.name: tensor_from_spec(spec) for spec in input_specs}
    maker = getattr(module, "example_inputs", None)
    if not callable(maker):
        raise ExampleInputsError(
            "the model has no example_inputs() method: describe its inputs with "
            "input_specs=NAME=DIM,DIM[:DTYPE] (one per input)"
        )
    example = maker()
    if isinstance(example, torch.Tensor):
        example = (example,)
    if isinstance(example, dict):
        return dict(example)
    names = [
        p.name
        for p in inspect.signature(forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(names) < len(example):
        raise ExampleInputsError(
            f"example_inputs() returned {len(example)} tensors but forward() names {len(names)}"
        )
    return dict(zip(names, example, strict=False))


def _batch_of_two(example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch.export specialises size-1 dimensions, so a dynamic batch needs an example of 2+."""
    import torch

    return {
        name: torch.cat([t, t], dim=0) if t.dim() > 0 and t.shape[0] == 1 else t
        for name, t in example.items()
    }


def _from_module(
    module: Any, path: Path, fmt: str, input_specs: Sequence[InputSpec]
) -> LoadedModel:
    import torch

    from lrt_deploy.nn.adapters import flatten_outputs

    module.eval()
    example = _batch_of_two(_example_from_module(module, input_specs, module.forward))
    try:
        with torch.no_grad():
            outputs = module(**example)
    except Exception as exc:  # the user's forward rejected our inputs
        raise ExampleInputsError(
            f"the model's forward() failed on the example inputs "
            f"({_describe(example)}): {first_line(exc)}; check input_specs"
        ) from exc
    output_names = list(flatten_outputs(outputs))
    axes = {name: {0: "batch"} for name, t in example.items() if t.dim() > 0}
    return LoadedModel(
        module=module,
        format=fmt,
        name=path.stem,
        example_inputs=example,
        output_names=output_names,
        dynamic_axes=axes,
    )


def _describe(example: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{n}={tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}" for n, t in
                     example.items())


def _load_torchscript(path: Path, input_specs: Sequence[InputSpec]) -> LoadedModel:
    import torch

    from lrt_deploy.nn.adapters import flatten_outputs

    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # TorchScript raises RuntimeError subclasses of many kinds
        raise CorruptModelError(
            f"cannot load TorchScript '{path.name}': {first_line(exc)}"
        ) from exc
    if not input_specs:
        raise ExampleInputsError(
            f"TorchScript '{path.name}' does not record its input shapes: pass "
            "input_specs=NAME=DIM,DIM[:DTYPE] for each input"
        )
    example = _batch_of_two({spec.name: tensor_from_spec(spec) for spec in input_specs})
    try:
        with torch.no_grad():
            outputs = module(*example.values())
    except Exception as exc:  # the scripted forward rejected the inputs
        raise ExampleInputsError(
            f"TorchScript '{path.name}' failed on inputs {_describe(example)}: "
            f"{first_line(exc)}; check input_specs"
        ) from exc
    return LoadedModel(
        module=module,
        format="torchscript",
        name=path.stem,
        example_inputs=example,
        output_names=list(flatten_outputs(outputs)),
        dynamic_axes={name: {0: "batch"} for name, t in example.items() if t.dim() > 0},
    )


def _load_torch_export(path: Path, trust_pickle: bool) -> LoadedModel:
    import torch

    from lrt_deploy._unpickle import weights_only_unpickling
    from lrt_deploy.nn.adapters import flatten_outputs

    # The archive's example inputs, constants and some weights are pickles that torch would
    # unpickle in full: without --trust-pickle they are held to what weights_only allows.
    guard = contextlib.nullcontext() if trust_pickle else weights_only_unpickling()
    try:
        with guard, open(path, "rb") as handle:
            # A file object, so torch does not insist on the .pt2 suffix (format is by content).
            program = torch.export.load(handle)
    except Exception as exc:  # torch.export raises several types for bad archives
        if was_refused(exc):
            raise untrusted(path, "holds pickled objects beyond plain tensors") from None
        raise CorruptModelError(
            f"cannot load torch.export archive '{path.name}': {first_line(exc)}"
        ) from exc
    if program.example_inputs is None:
        raise ExampleInputsError(
            f"'{path.name}' was saved without example inputs; re-export with torch.export.export"
        )
    args, kwargs = program.example_inputs
    input_specs = [
        s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"
    ]
    names = [spec.arg.name for spec in input_specs]
    tensors = list(args) + list(kwargs.values())
    example = dict(zip(names, tensors, strict=True))
    with torch.no_grad():
        outputs = program.module()(*args, **kwargs)
    return LoadedModel(
        module=program,
        format="torch-export",
        name=path.stem,
        example_inputs=example,
        output_names=list(flatten_outputs(outputs)),
        dynamic_axes={},
    )
