"""Target presets: what a deployment target needs from export, as overridable dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lrt_deploy.errors import LrtDeployError

__all__ = ["Target", "TARGET_NAMES", "UnknownTargetError"]

TARGET_NAMES = ("cpu", "cuda", "mobile")


class UnknownTargetError(LrtDeployError):
    """The target name is not one of the presets."""


@dataclass(frozen=True)
class Target:
    """How to build a bundle for one kind of device.

    Attributes:
        name: Preset name: ``cpu``, ``cuda`` or ``mobile``.
        providers: ONNX Runtime execution providers to try, best first (written to the manifest;
            the runtime falls back to CPU and says so when one is missing).
        opset: ONNX opset of the exported graph.
        optimization_level: Offline ORT graph optimisation: ``basic`` or ``extended``. ``all``
            adds layout transforms specific to the exporting machine, so it is never saved.
        quantize: ``None`` or ``"int8"`` (dynamic, weights int8, activations quantised at run time).
        per_channel: Quantise weights per output channel (keeps MiniLM at ~0.99 cosine, where
            per-tensor drops it to ~0.96).
        ort_format: Also write ``model.ort`` and ``required_operators.config`` for ORT Mobile.
        fixed_shape: Symbolic dimension name -> size, fixed in the graph (NNAPI/CoreML need it).
        check_mobile_usability: Run ONNX Runtime's NNAPI/CoreML usability checker.
    """

    name: str
    providers: tuple[str, ...]
    opset: int = 18
    optimization_level: str = "extended"
    quantize: str | None = None
    per_channel: bool = True
    ort_format: bool = False
    fixed_shape: dict[str, int] = field(default_factory=dict)
    check_mobile_usability: bool = False

    def __post_init__(self) -> None:
        if self.name not in TARGET_NAMES:
            raise UnknownTargetError(
                f"unknown target '{self.name}': choose one of {', '.join(TARGET_NAMES)}"
            )
        if self.optimization_level not in ("basic", "extended"):
            raise LrtDeployError(
                f"optimization_level '{self.optimization_level}' is not portable: use basic or "
                "extended"
            )
        if self.quantize not in (None, "int8"):
            raise LrtDeployError(f"quantize '{self.quantize}' is not supported: use int8 or none")
        if any(size < 1 for size in self.fixed_shape.values()):
            raise LrtDeployError("fixed shape sizes must be positive, e.g. batch=1,sequence=128")

    @classmethod
    def cpu(cls, **overrides: Any) -> Target:
        """Desktop/server CPU: the ONNX graph optimised offline, CPU provider."""
        return cls(name="cpu", providers=("CPUExecutionProvider",), **overrides)

    @classmethod
    def cuda(cls, **overrides: Any) -> Target:
        """NVIDIA GPU: CUDA provider first, CPU as fallback."""
        return cls(
            name="cuda", providers=("CUDAExecutionProvider", "CPUExecutionProvider"), **overrides
        )

    @classmethod
    def mobile(cls, **overrides: Any) -> Target:
        """ONNX Runtime Mobile: ORT format, operator config, mobile provider hints."""
        defaults: dict[str, Any] = {"ort_format": True, "check_mobile_usability": True}
        defaults.update(overrides)
        return cls(
            name="mobile",
            providers=(
                "NnapiExecutionProvider",
                "CoreMLExecutionProvider",
                "XnnpackExecutionProvider",
                "CPUExecutionProvider",
            ),
            **defaults,
        )

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Target:
        """The preset called ``name`` with ``overrides`` applied field by field."""
        if name not in TARGET_NAMES:
            raise UnknownTargetError(
                f"unknown target '{name}': choose one of {', '.join(TARGET_NAMES)}"
            )
        return getattr(cls, name)(**overrides)

    def with_options(self, **overrides: Any) -> Target:
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["providers"] = list(self.providers)
        return data
