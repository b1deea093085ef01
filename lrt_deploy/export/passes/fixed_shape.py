"""Fix symbolic input dimensions (``batch``, ``sequence``) to sizes, as NNAPI and CoreML need."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lrt_deploy.errors import LrtDeployError
from lrt_deploy.graph.passes import PassContext, PassResult

__all__ = ["FixedShape", "fix_input_shapes"]


@dataclass(frozen=True)
class FixedShape:
    """Pass: each symbolic dimension named in ``sizes`` becomes that size; outputs re-inferred."""

    sizes: Mapping[str, int] = field(default_factory=dict)
    name = "fixed_shape"

    def run(self, model: Path, context: PassContext) -> PassResult:
        """Write ``model`` with fixed shapes to ``context.output``; ``details["fixed"]`` names
        the dimensions fixed."""
        fixed = fix_input_shapes(model, context.output, dict(self.sizes))
        return PassResult(self.name, context.output, {"fixed": fixed})


def fix_input_shapes(source: str | Path, target: str | Path, sizes: dict[str, int]) -> list[str]:
    """Write ``source`` with the symbolic dimensions in ``sizes`` fixed to ``target``; returns
    the names fixed.

    Raises:
        LrtDeployError: A requested name is not a symbolic dimension of the graph's inputs.
    """
    import onnx
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    model = onnx.load(str(source))
    present = {
        dim.dim_param
        for value in model.graph.input
        for dim in value.type.tensor_type.shape.dim
        if dim.dim_param
    }
    unknown = sorted(set(sizes) - present)
    if unknown:
        raise LrtDeployError(
            f"Target.fixed_shape names {', '.join(unknown)}, but the graph's symbolic input "
            f"dimensions are {', '.join(sorted(present)) or 'none'}"
        )
    for name, size in sizes.items():
        make_dim_param_fixed(model.graph, name, size)
    fix_output_shapes(model)
    onnx.save(model, str(target))
    return sorted(sizes)
