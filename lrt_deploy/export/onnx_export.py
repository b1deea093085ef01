"""PyTorch -> ONNX: the dynamo exporter for ``nn.Module`` and ``.pt2``, TorchScript's for
TorchScript archives (which ``torch.export`` cannot take).

The TorchScript exporter traces Python branches (e.g. attention-mask code) with the example's
shapes baked in, so its graphs can be wrong for other sequence lengths; dynamo's keep them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lrt_deploy._logs import quiet_loggers
from lrt_deploy.errors import LrtDeployError
from lrt_deploy.graph.ops import default_opset

if TYPE_CHECKING:
    from lrt_deploy.load import LoadedModel

__all__ = ["export_onnx", "ExportError"]

logger = logging.getLogger(__name__)

# Above this many bytes of weights the graph cannot be one protobuf (2 GiB limit).
_EXTERNAL_DATA_BYTES = 1_800_000_000


class ExportError(LrtDeployError):
    """torch could not turn the model into an ONNX graph."""


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints and known-harmless warnings; restore afterwards."""
    with (
        quiet_loggers("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


def _weight_bytes(module: object) -> int:
    import torch

    if isinstance(module, torch.export.ExportedProgram):
        tensors = list(module.state_dict.values())
    elif isinstance(module, torch.nn.Module):
        tensors = list(module.state_dict().values())
    else:
        return 0
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def export_onnx(loaded: LoadedModel, path: str | Path, *, opset: int = 18) -> Path:
    """Export ``loaded`` to ``path`` (weights over ~1.8 GB in ``.onnx.data`` beside it) with
    the loader's dynamic axes; raises ExportError with the exporter's first line on failure."""
    import torch

    path = Path(path)
    module = loaded.graph_module()
    args = tuple(loaded.example_inputs.values())
    external = _weight_bytes(module) > _EXTERNAL_DATA_BYTES
    try:
        with _quiet_exporter():
            if isinstance(module, torch.jit.ScriptModule):
                axes = {n: dict(a) for n, a in loaded.dynamic_axes.items()}
                axes.update({name: {0: "batch"} for name in loaded.output_names})
                torch.onnx.export(
                    module,
                    args,
                    str(path),
                    dynamo=False,
                    input_names=loaded.input_names,
                    output_names=loaded.output_names,
                    dynamic_axes=axes,
                    opset_version=opset,
                )
            else:
                program = torch.onnx.export(
                    module,
                    () if isinstance(module, torch.export.ExportedProgram) else args,
                    dynamo=True,
                    input_names=loaded.input_names,
                    output_names=loaded.output_names,
                    dynamic_shapes=_dynamic_shapes(loaded, module),
                    opset_version=opset,
                )
                program.save(str(path), external_data=external)
    except LrtDeployError:
        raise
    except Exception as exc:  # the exporter raises many types; all mean "cannot export this"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"torch.onnx.export failed for '{loaded.name}': {first}; see the torch.onnx docs for "
            "unsupported operators, or simplify forward() to tensor operations"
        ) from exc
    written = _default_opset(path)
    if written != opset:
        raise ExportError(
            f"the exporter could not produce opset {opset} for '{loaded.name}' (it wrote opset "
            f"{written}): use Target.opset={written} or newer"
        )
    logger.info("exported %s to %s (opset %d)", loaded.name, path, opset)
    return path


def _default_opset(path: Path) -> int:
    import onnx

    return default_opset(onnx.load(str(path), load_external_data=False))


def _dynamic_shapes(loaded: LoadedModel, module: object) -> object:
    import torch

    if isinstance(module, torch.export.ExportedProgram) or not loaded.dynamic_axes:
        return None
    dims: dict[str, torch.export.Dim] = {}
    specs = []
    for name in loaded.input_names:
        axes = loaded.dynamic_axes.get(name, {})
        specs.append({axis: dims.setdefault(dim, torch.export.Dim(dim)) for axis, dim in
                      axes.items()})
    # The wrapper's forward takes *args, so the shapes are keyed by that parameter's name.
    return {"args": tuple(specs)}
