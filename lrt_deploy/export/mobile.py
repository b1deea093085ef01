"""ONNX Runtime Mobile packaging: fixed shapes, ORT format, operator config, usability check."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrt_deploy._logs import quiet_loggers
from lrt_deploy.errors import LrtDeployError

__all__ = [
    "MobileUsability",
    "check_mobile_usability",
    "fix_input_shapes",
    "to_ort_format",
    "write_required_operators",
]

logger = logging.getLogger(__name__)


def fix_input_shapes(source: str | Path, target: str | Path, sizes: dict[str, int]) -> list[str]:
    """Replace symbolic dimensions (``batch``, ``sequence``) by fixed sizes, as NNAPI and CoreML
    need; output shapes are re-inferred. Returns the dimension names fixed.

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


def to_ort_format(source: str | Path, target: str | Path) -> Path:
    """Convert an ONNX file to ORT format (what a minimal ORT Mobile build loads).

    The conversion applies ORT's portable optimisations (basic level: the graph was optimised
    offline already; hardware-specific layout transforms are never baked in).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return Path(target)


def write_required_operators(ort_model: str | Path, target: str | Path) -> list[str]:
    """Write the operator config for a reduced ORT build (``--include_ops_by_config``).

    Returns the ``domain;opset;ops`` lines written (without the comment header).
    """
    from onnxruntime.tools.ort_format_model.utils import create_config_from_models

    # It announces each config file it writes at INFO.
    with quiet_loggers("ort_format_model.utils", level=logging.WARNING):
        create_config_from_models([Path(ort_model)], Path(target), enable_type_reduction=False)
    lines = Path(target).read_text().splitlines()
    # The generated header names the absolute path of the model on this machine; keep only the
    # file name so the bundle does not leak local paths and is reproducible.
    cleaned = [
        f"# - {Path(ort_model).name}" if line.startswith("# - ") else line for line in lines
    ]
    Path(target).write_text("\n".join(cleaned) + "\n")
    return [line for line in cleaned if line and not line.startswith("#")]


@dataclass
class MobileUsability:
    """ONNX Runtime's verdict on NNAPI/CoreML suitability, from its own checker."""

    ran: bool
    usable_with_mobile_ep: bool | None = None
    verdicts: dict[str, str] = field(default_factory=dict)
    dynamic_inputs: bool | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ran": self.ran,
            "usable_with_mobile_ep": self.usable_with_mobile_ep,
            "verdicts": self.verdicts,
            "dynamic_inputs": self.dynamic_inputs,
            "error": self.error,
        }


def check_mobile_usability(onnx_model: str | Path) -> MobileUsability:
    """Run ``onnxruntime.tools.mobile_helpers.usability_checker`` and keep its verdicts.

    The checker reports, per execution provider (NNAPI, CoreML NeuralNetwork, CoreML MLProgram),
    whether the model should perform well as is (``YES``/``MAYBE``/``NO``).
    """
    from onnxruntime.tools.mobile_helpers import usability_checker

    stream = io.StringIO()
    checker_logger = logging.getLogger("lrt_deploy.usability_checker")
    handler = logging.StreamHandler(stream)
    checker_logger.addHandler(handler)
    checker_logger.setLevel(logging.INFO)
    checker_logger.propagate = False
    try:
        usable = usability_checker.analyze_model(Path(onnx_model), logger=checker_logger)
    except Exception as exc:  # the checker is advisory; its failure must not stop the export
        logger.warning("ONNX Runtime's mobile usability checker failed: %s", exc)
        return MobileUsability(ran=False, error=str(exc).splitlines()[0] if str(exc) else "")
    finally:
        checker_logger.removeHandler(handler)
    verdicts: dict[str, str] = {}
    dynamic = None
    prefix = "Model should perform well with "
    for line in stream.getvalue().splitlines():
        if line.startswith(prefix) and " as is: " in line:
            provider, _, verdict = line[len(prefix):].partition(" as is: ")
            verdicts[provider] = verdict.strip()
        if "dynamic" in line.lower() and "input" in line.lower() and dynamic is None:
            dynamic = "no dynamic" not in line.lower()
    return MobileUsability(
        ran=True, usable_with_mobile_ep=bool(usable), verdicts=verdicts, dynamic_inputs=dynamic
    )
