"""fp16 weights and compute, with normalisation, softmax and reductions kept in fp32.

Those ops reduce over many values, where fp16's 10-bit mantissa and 65504 range lose the most;
they stay fp32 with Casts around them. Inputs and outputs keep their types, so feeds do not change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lrt_deploy.graph.ops import count_changes, op_counts
from lrt_deploy.graph.passes import PassContext, PassResult

__all__ = ["FP32_OPS", "Float16Pass", "Float16Result", "convert_float16"]

logger = logging.getLogger(__name__)

FP32_OPS = (
    "LayerNormalization",
    "SkipLayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "EmbedLayerNormalization",
    "Softmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceL2",
    "Pow",
    "Sqrt",
    "Erf",
)


@dataclass
class Float16Result:
    """What the fp16 conversion did."""

    kept_fp32_ops: list[str]
    casts_added: int
    fp16_initializers: int
    changes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``quantization`` record of an fp16 variant."""
        return {
            "kept_fp32_ops": self.kept_fp32_ops,
            "casts_added": self.casts_added,
            "fp16_initializers": self.fp16_initializers,
            "op_changes": self.changes,
        }


def convert_float16(
    source: str | Path,
    target: str | Path,
    *,
    keep_fp32_ops: tuple[str, ...] = FP32_OPS,
    keep_io_types: bool = True,
) -> Float16Result:
    """Write ``target``: ``source`` in fp16 but for ``keep_fp32_ops`` and onnxruntime's own
    block list; with ``keep_io_types`` inputs and outputs stay fp32."""
    import onnx
    from onnx import TensorProto
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(source))
    blocked = sorted({*DEFAULT_OP_BLOCK_LIST, *keep_fp32_ops})
    converted = convert_float_to_float16(
        model, keep_io_types=keep_io_types, op_block_list=blocked
    )
    onnx.save(converted, str(target))
    before, after = op_counts(source), op_counts(target)
    present = sorted(op for op in keep_fp32_ops if after.get(op))
    result = Float16Result(
        kept_fp32_ops=present,
        casts_added=after.get("Cast", 0) - before.get("Cast", 0),
        fp16_initializers=sum(
            1 for init in converted.graph.initializer if init.data_type == TensorProto.FLOAT16
        ),
        changes=count_changes(before, after),
    )
    logger.info("converted to fp16: %d initializers, %d Casts, fp32 kept for %s",
                result.fp16_initializers, result.casts_added, present)
    return result


@dataclass(frozen=True)
class Float16Pass:
    """Graph pass: :func:`convert_float16` with its defaults."""

    name: ClassVar[str] = "float16"

    def run(self, model: Path, context: PassContext) -> PassResult:
        """Convert ``model`` into ``context.output``."""
        context.progress(f"converting {context.label} to fp16 (LayerNorm/Softmax kept fp32)")
        return PassResult(self.name, context.output,
                          convert_float16(model, context.output).to_dict())
