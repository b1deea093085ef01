"""A comparison report with fixed figures, for tests of the renderers and lrt-report."""

from __future__ import annotations

from lrt_deploy.report import ComparisonReport, VariantResult

FALLBACK_REPORT = {
    "requested": ["XnnpackExecutionProvider", "CPUExecutionProvider"],
    "available": ["CPUExecutionProvider"],
    "active": ["CPUExecutionProvider"],
    "missing": ["XnnpackExecutionProvider"],
    "fell_back": True,
    "message": "XnnpackExecutionProvider is not in this onnxruntime build "
    "(available: CPUExecutionProvider); running on CPUExecutionProvider",
}
CPU_REPORT = {
    "requested": ["CPUExecutionProvider"],
    "available": ["CPUExecutionProvider"],
    "active": ["CPUExecutionProvider"],
    "missing": [],
    "fell_back": False,
    "message": "running on CPUExecutionProvider",
}


class FakeLatency:
    """Stands in for runtime.LatencyStats: anything with to_dict() is accepted."""

    def __init__(self, median_ms: float, p90_ms: float) -> None:
        self.median_ms, self.p90_ms = median_ms, p90_ms

    def to_dict(self) -> dict[str, float]:
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms}


def make_report(provider_report: dict | None = None, layers: list | None = None):
    provider_report = provider_report or CPU_REPORT
    variants = [
        VariantResult(
            name="dense fp32",
            is_baseline=True,
            file_bytes=80_000_000,
            params=20_000_000,
            latency={"median_ms": 12.0, "p90_ms": 13.5},
            provider_report=provider_report,
        ),
        VariantResult(
            name="LRT fp32",
            file_bytes=40_000_000,
            params=10_000_000,
            latency=FakeLatency(6.0, 7.0),
            fidelity={"mean_cosine": 0.9991, "worst_cosine": 0.9812},
            provider_report=provider_report,
        ),
        VariantResult(
            name="LRT int8",
            file_bytes=10_000_000,
            latency={"median_ms": 4.0, "p90_ms": 4.4},
            fidelity={"mean_cosine": 0.995, "worst_cosine": 0.97},
            provider_report=provider_report,
            notes=["dynamic int8, per-channel weights"],
        ),
    ]
    return ComparisonReport(
        model="tiny-minilm",
        variants=variants,
        settings={
            "batch": 1,
            "sequence": 128,
            "threads": 2,
            "provider_requested": provider_report["requested"],
            "provider_active": provider_report["active"],
            "fidelity_inputs": "32 held-out sentences",
        },
        layers=layers
        or [
            {
                "name": "encoder.layer.0.attention.self.query",
                "shape": [384, 384],
                "rank": 96,
                "action": "factorized",
                "reason": "energy 0.95",
            },
            {
                "name": "pooler.dense",
                "shape": [384, 384],
                "rank": None,
                "action": "kept dense",
                "reason": "excluded by filter",
            },
        ],
        optimisation={"LRT fp32": {"FusedMatMul": 12, "SkipLayerNormalization": 13}},
        quantisation={"mode": "dynamic", "weight_type": "int8", "per_channel": True},
        provider_messages=[provider_report["message"]] if provider_report["fell_back"] else [],
    )
