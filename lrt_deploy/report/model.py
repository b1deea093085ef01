"""The comparison report as typed data: variants, settings, layers, device classes.

Pure Python (no torch, no numpy) and free of rendering: every ratio is computed from the
stored measurements, and :meth:`ComparisonReport.to_dict` / :meth:`~ComparisonReport.from_dict`
round-trip ``report.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "ComparisonReport",
    "DeviceSection",
    "LayerRow",
    "ReportSettings",
    "VariantResult",
]

#: The version of ``report.json`` written; readers accept up to the runtime's supported one.
FORMAT_VERSION = 1
_BYTES_PER_MB = 1e6


@dataclass
class VariantResult:
    """Measurements of one model variant; ``name`` is unique within a report.

    Attributes:
        name: Display name, e.g. "LRT int8".
        file_bytes: Size of the deployable model file(s) in bytes, >= 0.
        is_baseline: True for the one variant the others are compared with.
        params: Parameter count, when known.
        latency: Latency in ms, at least ``median_ms`` and ``p90_ms`` (an object with
            ``to_dict()`` is converted).
        fidelity: Metric name -> agreement with the reference outputs.
        provider_report: ``Session.provider_report()`` of the run that produced ``latency``.
        notes: Remarks shown under the table.
    """

    name: str
    file_bytes: int
    is_baseline: bool = False
    params: int | None = None
    latency: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)
    provider_report: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if hasattr(self.latency, "to_dict"):
            self.latency = self.latency.to_dict()
        if self.file_bytes < 0:
            raise ValueError(f"variant {self.name!r}: file_bytes must be >= 0")

    @property
    def size_mb(self) -> float:
        """File size in megabytes (10^6 bytes)."""
        return self.file_bytes / _BYTES_PER_MB

    @property
    def median_ms(self) -> float | None:
        """Median latency in ms, or None when not measured."""
        return self.latency.get("median_ms")

    def to_dict(self) -> dict[str, Any]:
        """The variant's stored fields as a JSON-ready dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VariantResult:
        """Rebuild a variant from :meth:`to_dict` output (computed keys are ignored)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


# Written whenever set; the rest only when not None (as report.json has always had them).
_ALWAYS = ("threads", "provider_requested", "provider_active", "fidelity_inputs")


@dataclass
class ReportSettings:
    """How the numbers of a report were measured; unknown keys survive in ``extra``.

    Attributes:
        batch: Batch size of the latency inputs (text models).
        sequence: Sequence length of the latency inputs (text models).
        inputs: The latency inputs' names and shapes (other models).
        threads: Intra-op threads of every measurement.
        provider_requested: Execution provider(s) asked for.
        provider_active: Execution provider(s) that ran.
        fidelity_inputs: What the fidelity columns compare, on which inputs.
        baseline: How the baseline was made, when it is not the user's own dense model.
        latency: How the latency columns were timed.
        cpu: Model name of the CPU the run was measured on.
        device_class: That CPU's device class (``lrt_deploy.runtime.devices``).
        extra: Keys this version does not know, kept for the round trip.
    """

    batch: int | None = None
    sequence: int | None = None
    inputs: str | None = None
    threads: int | None = None
    provider_requested: str | list[str] | None = None
    provider_active: str | list[str] | None = None
    fidelity_inputs: str | None = None
    baseline: str | None = None
    latency: str | None = None
    cpu: str | None = None
    device_class: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The settings as ``report.json`` stores them."""
        data = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "extra" and (f.name in _ALWAYS or getattr(self, f.name) is not None)
        }
        return {**data, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReportSettings:
        """Rebuild settings from :meth:`to_dict` output (or any mapping of the same keys)."""
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{key: value for key, value in data.items() if key in known},
            extra={key: value for key, value in data.items() if key not in known},
        )


@dataclass
class LayerRow:
    """What the compression decided for one layer."""

    name: str
    shape: list[int] | str | None = None
    rank: int | None = None
    action: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The row as ``report.json`` stores it."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerRow:
        """Rebuild a row from :meth:`to_dict` output; ``name`` is required."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class DeviceSection:
    """The deployed model per device class: the manifest's ``devices`` section.

    Attributes:
        classes: Every device class known when the bundle was made.
        exact_on: The classes its integer kernels are exact on (checked from the weights).
        skipped: Why the model was not run on other device classes, when it was not.
        verification: ``DeviceVerification.to_dict()`` of the runs, when they happened.
        extra: Other keys of the section, kept for the round trip.
    """

    classes: list[str] = field(default_factory=list)
    exact_on: list[str] = field(default_factory=list)
    skipped: str | None = None
    verification: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The section as the manifest and ``report.json`` store it."""
        data: dict[str, Any] = {"classes": self.classes, "exact_on": self.exact_on,
                                **self.extra}
        if self.skipped is not None:
            data["skipped"] = self.skipped
        if self.verification is not None:
            data["verification"] = self.verification
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceSection:
        """Rebuild the section from :meth:`to_dict` output (or a manifest's ``devices``)."""
        known = ("classes", "exact_on", "skipped", "verification")
        return cls(
            classes=list(data.get("classes") or []),
            exact_on=list(data.get("exact_on") or []),
            skipped=data.get("skipped"),
            verification=data.get("verification"),
            extra={key: value for key, value in data.items() if key not in known},
        )


@dataclass
class ComparisonReport:
    """Size, latency and fidelity of variants against the baseline; at most one baseline.

    Attributes:
        model: Model name or path (the title).
        variants: Measured variants, names unique.
        settings: How the numbers were measured (a mapping is converted).
        layers: Per-layer decisions (mappings are converted).
        optimisation: Variant name -> {op type: count} after graph optimisation.
        quantisation: Quantisation settings used for the quantised variants.
        provider_messages: Provider fallback messages.
        devices: The deployed model per device class, or None (a mapping is converted).
    """

    model: str
    variants: list[VariantResult]
    settings: ReportSettings = field(default_factory=ReportSettings)
    layers: list[LayerRow] = field(default_factory=list)
    optimisation: dict[str, dict[str, int]] = field(default_factory=dict)
    quantisation: dict[str, Any] = field(default_factory=dict)
    provider_messages: list[str] = field(default_factory=list)
    devices: DeviceSection | None = None

    def __post_init__(self) -> None:
        if isinstance(self.settings, Mapping):
            self.settings = ReportSettings.from_dict(self.settings)
        self.layers = [
            row if isinstance(row, LayerRow) else LayerRow.from_dict(row) for row in self.layers
        ]
        if isinstance(self.devices, Mapping):
            self.devices = DeviceSection.from_dict(self.devices) if self.devices else None
        names = [variant.name for variant in self.variants]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(duplicates)}")
        baselines = [variant.name for variant in self.variants if variant.is_baseline]
        if len(baselines) > 1:
            raise ValueError(f"only one variant can be the baseline, got {', '.join(baselines)}")

    @property
    def baseline(self) -> VariantResult | None:
        """The variant marked ``is_baseline``, or None."""
        return next((variant for variant in self.variants if variant.is_baseline), None)

    def size_ratio(self, variant: VariantResult) -> float | None:
        """``variant`` file size / baseline file size (0.5 means half the size)."""
        baseline = self.baseline
        if baseline is None or baseline.file_bytes == 0:
            return None
        return variant.file_bytes / baseline.file_bytes

    def speedup(self, variant: VariantResult) -> float | None:
        """Baseline median latency / ``variant`` median latency (2.0 means twice as fast)."""
        baseline = self.baseline
        if baseline is None or not baseline.median_ms or not variant.median_ms:
            return None
        return baseline.median_ms / variant.median_ms

    def params_ratio(self, variant: VariantResult) -> float | None:
        """``variant`` parameter count / baseline parameter count, when both are known."""
        baseline = self.baseline
        if baseline is None or not baseline.params or variant.params is None:
            return None
        return variant.params / baseline.params

    def fallback_line(self) -> str | None:
        """"requested X, ran on Y (fallback)" when a requested provider was not used."""
        for variant in self.variants:
            report = variant.provider_report
            if report.get("fell_back"):
                requested = report.get("missing") or report.get("requested") or []
                return _fallback_text(requested, report.get("active", []))
        requested = _as_list(self.settings.provider_requested)
        active = _as_list(self.settings.provider_active)
        if requested and active and requested[0] not in active:
            return _fallback_text([p for p in requested if p not in active], active)
        return None

    def active_provider(self) -> str:
        """The provider(s) the measurements ran on, for the header line."""
        active = _as_list(self.settings.provider_active)
        if not active:
            active = next(
                (v.provider_report["active"] for v in self.variants
                 if v.provider_report.get("active")),
                [],
            )
        return ", ".join(active) if active else "unknown"

    def to_dict(self) -> dict[str, Any]:
        """The report with computed ratios per variant, ready for ``json.dumps``."""
        variants = [
            {
                **variant.to_dict(),
                "size_mb": variant.size_mb,
                "size_ratio": self.size_ratio(variant),
                "speedup": self.speedup(variant),
                "params_ratio": self.params_ratio(variant),
            }
            for variant in self.variants
        ]
        baseline = self.baseline
        return _json_safe({
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "baseline": baseline.name if baseline else None,
            "settings": self.settings.to_dict(),
            "provider_fallback": self.fallback_line(),
            "provider_messages": self.provider_messages,
            "variants": variants,
            "layers": [row.to_dict() for row in self.layers],
            "optimisation": self.optimisation,
            "quantisation": self.quantisation,
            "devices": self.devices.to_dict() if self.devices else None,
        })

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ComparisonReport:
        """Rebuild a report from :meth:`to_dict` output (computed keys are ignored)."""
        return cls(
            model=data["model"],
            variants=[VariantResult.from_dict(v) for v in data.get("variants", [])],
            settings=ReportSettings.from_dict(data.get("settings") or {}),
            layers=[LayerRow.from_dict(row) for row in data.get("layers", [])],
            optimisation=data.get("optimisation", {}),
            quantisation=data.get("quantisation", {}),
            provider_messages=data.get("provider_messages", []),
            devices=DeviceSection.from_dict(data["devices"]) if data.get("devices") else None,
        )


def _as_list(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _fallback_text(requested: Sequence[str], active: Sequence[str]) -> str:
    ran_on = ", ".join(active) if active else "CPUExecutionProvider"
    return f"requested {', '.join(requested)}, ran on {ran_on} (fallback)"


def _json_safe(value: Any) -> Any:
    """``value`` with NaN/inf as None (JSON has no such numbers), tuples and arrays as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays, without importing numpy
        return _json_safe(value.tolist())
    return value
