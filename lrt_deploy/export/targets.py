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
        fusion: Fuse attention/GELU/LayerNorm with ``export.fusion.fuse_transformer`` before
            ORT's optimisation (transformers only; needs the head count and width).
        float16: Convert to fp16 with normalisation and softmax kept in fp32
            (``export.float16.convert_float16``); meant for ``cuda``.
        quant_format: With ``quantize="int8"``: ``dynamic`` (``quantize_int8``) or ``qdq``
            (static, calibrated: ``quantize_static_int8``).
        weight_bits: 8, or 4 for weight-only ``MatMulNBits`` (``quantize_weights_4bit``) in
            place of int8.
        tensorrt: List TensorRT before CUDA in the provider hints (``cuda`` only).
        exclude_sensitive: With ``quant_format="qdq"``: keep this many MatMuls, those int8
            hurts most on the calibration data, in fp32.
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
    fusion: bool = False
    float16: bool = False
    quant_format: str = "dynamic"
    weight_bits: int = 8
    tensorrt: bool = False
    exclude_sensitive: int = 0

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
        if self.quant_format not in ("dynamic", "qdq"):
            raise LrtDeployError(
                f"quant_format '{self.quant_format}' is not supported: use dynamic or qdq"
            )
        if self.weight_bits not in (8, 4):
            raise LrtDeployError(f"weight_bits must be 8 or 4, got {self.weight_bits!r}")
        if self.float16 and (self.quantize or self.weight_bits == 4):
            raise LrtDeployError(
                "float16 and quantisation exclude each other: choose fp16 weights or int8/int4"
            )
        if self.exclude_sensitive < 0 or (self.exclude_sensitive and self.quant_format != "qdq"):
            raise LrtDeployError(
                "exclude_sensitive applies to static QDQ int8 (quant_format qdq) and is a count "
                ">= 0"
            )
        if self.tensorrt and self.name != "cuda":
            raise LrtDeployError("tensorrt applies to the cuda target only")
        if any(size < 1 for size in self.fixed_shape.values()):
            raise LrtDeployError("fixed shape sizes must be positive, e.g. batch=1,sequence=128")

    @classmethod
    def cpu(cls, **overrides: Any) -> Target:
        """Desktop/server CPU: transformer fusions, then ORT's portable optimisation."""
        return cls(name="cpu", providers=("CPUExecutionProvider",),
                   **{"fusion": True, **overrides})

    @classmethod
    def cuda(cls, **overrides: Any) -> Target:
        """NVIDIA GPU: CUDA provider first, CPU as fallback; fp16 weights unless quantised."""
        quantised = overrides.get("quantize") or overrides.get("weight_bits", 8) == 4
        defaults: dict[str, Any] = {"fusion": True, "float16": not quantised}
        return cls(
            name="cuda",
            providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
            **{**defaults, **overrides},
        )

    @classmethod
    def mobile(cls, **overrides: Any) -> Target:
        """ONNX Runtime Mobile: ORT format, operator config, mobile provider hints."""
        defaults: dict[str, Any] = {
            "ort_format": True, "check_mobile_usability": True, "fusion": True,
        }
        return cls(
            name="mobile",
            providers=(
                "NnapiExecutionProvider",
                "CoreMLExecutionProvider",
                "XnnpackExecutionProvider",
                "CPUExecutionProvider",
            ),
            **{**defaults, **overrides},
        )

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Target:
        """The preset called ``name`` with ``overrides`` applied field by field."""
        if name not in TARGET_NAMES:
            raise UnknownTargetError(
                f"unknown target '{name}': choose one of {', '.join(TARGET_NAMES)}"
            )
        return getattr(cls, name)(**overrides)

    def provider_hints(self) -> list[tuple[str, dict[str, str]]]:
        """``(provider, options)`` pairs for ``onnxruntime.InferenceSession(providers=...)``.

        TensorRT (when ``tensorrt``) builds an engine per input shape on first run, so the
        engine cache is switched on (``trt_engine_cache_path`` is relative to the app's working
        folder) and fp16 kernels are allowed when the graph is fp16 anyway.
        """
        hints: list[tuple[str, dict[str, str]]] = []
        for provider in self.providers:
            if provider == "CUDAExecutionProvider" and self.tensorrt:
                hints.append(("TensorrtExecutionProvider", {
                    "trt_fp16_enable": "True" if self.float16 else "False",
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": "trt_cache",
                }))
            hints.append((provider, {}))
        return hints

    def with_options(self, **overrides: Any) -> Target:
        """A copy with ``overrides`` applied field by field (validated like any Target)."""
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["providers"] = list(self.providers)
        return data
