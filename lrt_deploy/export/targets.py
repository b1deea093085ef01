"""Target presets: what a deployment target needs from export, as overridable dataclasses.

Target names and their execution providers come from one table,
:data:`lrt_deploy.runtime.providers.TARGET_PROVIDERS`, which the runtime uses too. The numeric
precision of the deployed graph is one typed recipe (:mod:`lrt_deploy.quant.recipes`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lrt_deploy.errors import LrtDeployError, UnknownTargetError
from lrt_deploy.quant.recipes import Float16, Precision
from lrt_deploy.runtime.providers import (
    TARGET_PROVIDERS,
    TARGETS,
    TENSORRT_PROVIDER,
    check_target_name,
)

__all__ = ["Target", "TARGET_NAMES", "UnknownTargetError"]

TARGET_NAMES = TARGETS


@dataclass(frozen=True)
class Target:
    """How to build a bundle for one kind of device.

    Attributes:
        name: Preset name: ``cpu``, ``cuda`` or ``mobile``.
        providers: ONNX Runtime execution providers to try, best first (written to the manifest;
            the runtime falls back to CPU and says so when one is missing). Empty: the preset's
            list from ``TARGET_PROVIDERS``.
        opset: ONNX opset of the exported graph.
        optimization_level: Offline ORT graph optimisation: ``basic`` or ``extended``. ``all``
            adds layout transforms specific to the exporting machine, so it is never saved.
        precision: The deployed variant's precision recipe (``Float16()``, ``DynamicInt8()``,
            ``StaticInt8(...)``, ``Int4WeightOnly(...)``), or ``None`` to deploy fp32.
        ort_format: Also write ``model.ort`` and ``required_operators.config`` for ORT Mobile.
        fixed_shape: Symbolic dimension name -> size, fixed in the graph (NNAPI/CoreML need it).
        check_mobile_usability: Run ONNX Runtime's NNAPI/CoreML usability checker.
        fusion: Fuse attention/GELU/LayerNorm with ``export.passes.fusion.TransformerFusion`` before
            ORT's optimisation (transformers only; needs the head count and width).
        tensorrt: List TensorRT before CUDA in the provider hints (``cuda`` only).
    """

    name: str
    providers: tuple[str, ...] = ()
    opset: int = 18
    optimization_level: str = "extended"
    precision: Precision | None = None
    ort_format: bool = False
    fixed_shape: dict[str, int] = field(default_factory=dict)
    check_mobile_usability: bool = False
    fusion: bool = False
    tensorrt: bool = False

    def __post_init__(self) -> None:
        check_target_name(self.name)
        if not self.providers:
            object.__setattr__(self, "providers", TARGET_PROVIDERS[self.name])
        if self.optimization_level not in ("basic", "extended"):
            raise LrtDeployError(
                f"optimization_level '{self.optimization_level}' is not portable: use basic or "
                "extended"
            )
        if self.precision is not None and not isinstance(self.precision, Precision):
            raise LrtDeployError(
                f"precision must be a recipe such as DynamicInt8() or None, got "
                f"{self.precision!r}"
            )
        if self.tensorrt and self.name != "cuda":
            raise LrtDeployError("tensorrt applies to the cuda target only")
        if any(size < 1 for size in self.fixed_shape.values()):
            raise LrtDeployError("fixed shape sizes must be positive, e.g. batch=1,sequence=128")

    @classmethod
    def cpu(cls, **overrides: Any) -> Target:
        """Desktop/server CPU: transformer fusions, then ORT's portable optimisation."""
        return cls(name="cpu", **{"fusion": True, **overrides})

    @classmethod
    def cuda(cls, **overrides: Any) -> Target:
        """NVIDIA GPU: CUDA provider first, CPU as fallback; fp16 unless another precision is
        given (``precision=None`` keeps fp32)."""
        defaults: dict[str, Any] = {"fusion": True, "precision": Float16()}
        return cls(name="cuda", **{**defaults, **overrides})

    @classmethod
    def mobile(cls, **overrides: Any) -> Target:
        """ONNX Runtime Mobile: ORT format, operator config, mobile provider hints."""
        defaults: dict[str, Any] = {
            "ort_format": True, "check_mobile_usability": True, "fusion": True,
        }
        return cls(name="mobile", **{**defaults, **overrides})

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Target:
        """The preset called ``name`` with ``overrides`` applied field by field."""
        return getattr(cls, check_target_name(name))(**overrides)

    def provider_hints(self) -> list[tuple[str, dict[str, str]]]:
        """``(provider, options)`` pairs for ``onnxruntime.InferenceSession(providers=...)``.

        TensorRT (when ``tensorrt``) builds an engine per input shape on first run, so the
        engine cache is switched on (``trt_engine_cache_path`` is relative to the app's working
        folder) and fp16 kernels are allowed when the graph is fp16 anyway.
        """
        hints: list[tuple[str, dict[str, str]]] = []
        for provider in self.providers:
            if provider == "CUDAExecutionProvider" and self.tensorrt:
                fp16 = isinstance(self.precision, Float16)
                hints.append((TENSORRT_PROVIDER, {
                    "trt_fp16_enable": "True" if fp16 else "False",
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": "trt_cache",
                }))
            hints.append((provider, {}))
        return hints

    def with_options(self, **overrides: Any) -> Target:
        """A copy with ``overrides`` applied field by field (validated like any Target)."""
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; ``precision`` as its recipe dict (or ``None``)."""
        data = asdict(self)
        data["providers"] = list(self.providers)
        data["precision"] = None if self.precision is None else self.precision.to_dict()
        return data
