"""Compare exported bundles side by side: size by component, latency, fidelity vs size.

``lrt-report A B C -o compare.html`` builds a :class:`BundleComparison` from each bundle's
``manifest.json``, ``report.json`` and ``model.onnx`` (for the size split, which needs
``onnx``), plus, when given, the JSON that ``lrt-bench`` wrote for the same bundles. Every
figure comes from those files; fidelity is what the export measured against the dense model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from lrt_deploy.errors import LrtDeployError

from .components import COMPONENTS, size_by_component
from .model import ComparisonReport
from .render.html import html_page, html_table
from .render.markdown import markdown_table
from .render.svg import line_chart_svg, pareto_front, pareto_svg, stacked_bar_svg
from .render.tables import metric_title

__all__ = ["BundleComparison", "BundleSummary", "ReportInputError", "load_bundle"]

logger = logging.getLogger(__name__)

_MB = 1e6
_COMPONENT_TITLES = {"embeddings": "Embeddings", "attention": "Attention", "ffn": "FFN",
                     "other": "Other"}


class ReportInputError(LrtDeployError):
    """A bundle or benchmark file given to ``lrt-report`` cannot be read."""


@dataclass
class BundleSummary:
    """What one bundle says about itself.

    Attributes:
        label: Display name.
        path: Bundle folder.
        manifest: ``manifest.json``.
        report: The bundle's ``report.json``, when present.
        model_file: File a runtime opens (``model.ort`` or ``model.onnx``).
        model_bytes: Its size.
        components: :func:`~lrt_deploy.report.components.size_by_component` of
            ``model.onnx``, or None when it was not computed.
    """

    label: str
    path: Path
    manifest: dict[str, Any]
    report: ComparisonReport | None
    model_file: str
    model_bytes: int
    components: dict[str, Any] | None = None

    @property
    def variant(self) -> str:
        """The deployed variant's name (e.g. "LRT int8")."""
        return str(self.manifest.get("variant") or "-")

    @property
    def fidelity(self) -> dict[str, Any]:
        """Fidelity of the deployed variant against the dense fp32 model."""
        return self.manifest.get("fidelity") or {}

    @property
    def params(self) -> int | None:
        """Parameter count of the deployed model."""
        return (self.manifest.get("params") or {}).get("deployed")


def load_bundle(
    path: str | os.PathLike[str], label: str | None = None, *, components: bool = True
) -> BundleSummary:
    """Read a bundle's manifest, report and (optionally) its size by component.

    Every file is opened through the runtime's checked resolver
    (:func:`~lrt_deploy.runtime.bundle.checked_file`): inside the bundle, checksums matching.

    Raises:
        ReportInputError: If the folder is not a bundle or a file in it cannot be read.
        BundleError: If its manifest breaks the bundle contract or a file its checksum.
    """
    from lrt_deploy.runtime.bundle import MANIFEST_NAME, checked_file, read_manifest

    folder = Path(path)
    if not (folder / MANIFEST_NAME).is_file():
        raise ReportInputError(
            f"{folder} is not a bundle (no manifest.json); pass folders written by lrt-export"
        )
    manifest = read_manifest(folder)
    report_path = checked_file(folder, manifest, "report")
    report = read_report(report_path) if report_path is not None else None
    model_path = checked_file(folder, manifest, "model")
    split = None
    onnx_path = checked_file(folder, manifest, "onnx") if components else None
    if onnx_path is not None:
        try:
            split = size_by_component(onnx_path)
        except Exception as error:  # onnx's parse errors have no common LrtDeployError base
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            raise ReportInputError(
                f"{onnx_path} in bundle {folder} is not a readable ONNX model ({reason}); "
                "re-export or re-download the bundle"
            ) from None
    return BundleSummary(
        label=label or folder.resolve().name,
        path=folder,
        manifest=manifest,
        report=report,
        model_file=manifest["files"]["model"],
        model_bytes=model_path.stat().st_size,
        components=split,
    )


def read_report(path: Path) -> ComparisonReport:
    """Parse a bundle's ``report.json``; anything unreadable is one :class:`ReportInputError`."""
    from lrt_deploy.runtime.bundle import read_json
    from lrt_deploy.runtime.contract import check_format_version

    data = read_json(path, "report", "re-export the bundle")
    if not isinstance(data, dict):
        raise ReportInputError(f"{path} is not a report (a JSON object); re-export the bundle")
    check_format_version(data.get("format_version"), path, "report")
    try:
        return ComparisonReport.from_dict(data)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError, RecursionError) as error:
        raise ReportInputError(
            f"{path} is not a readable report ({type(error).__name__}: "
            f"{str(error)[:120]}); re-export the bundle"
        ) from None


_BENCH_FIX = "write it with lrt-bench --json"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _load_bench(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``lrt-bench --json`` output and check every field the comparison uses, so a file
    that is not one (or was edited) is one :class:`ReportInputError` line, not a KeyError."""
    from lrt_deploy.runtime.bundle import read_json

    bench_path = Path(path)
    data = read_json(bench_path, "benchmark file", _BENCH_FIX)
    problem = _bench_problem(data)
    if problem:
        raise ReportInputError(f"{bench_path} is not lrt-bench --json output ({problem}); "
                               f"{_BENCH_FIX}")
    return data


def _bench_problem(data: Any) -> str | None:
    """What is wrong with a parsed ``lrt-bench --json`` file, or None."""
    if not isinstance(data, dict) or data.get("tool") != "lrt-bench":
        return "no \"tool\": \"lrt-bench\""
    settings = data.get("settings")
    if not isinstance(settings, dict):
        return "settings missing"
    for key in ("batches", "sequences", "threads"):
        values = settings.get(key)
        if not isinstance(values, list) or not values or not all(
            _is_int(v) or (key == "threads" and v is None) for v in values
        ):
            return f"settings.{key} is not a list of whole numbers"
    if not _is_int(settings.get("runs")):
        return "settings.runs is not a whole number"
    if not isinstance(data.get("machine") or {}, dict):
        return "machine is not an object"
    bundles = data.get("bundles")
    if not isinstance(bundles, list) or not all(
        isinstance(b, dict) and isinstance(b.get("label"), str)
        and isinstance(b.get("path") or "", str) for b in bundles
    ):
        return "bundles is not a list of {label, path}"
    results = data.get("results")
    if not isinstance(results, list):
        return "results is not a list"
    for index, entry in enumerate(results):
        if not isinstance(entry, dict) or not isinstance(entry.get("bundle"), str):
            return f"results[{index}] has no bundle name"
        if not all(_is_int(entry.get(k)) for k in ("batch", "sequence")) or not (
            entry.get("threads") is None or _is_int(entry.get("threads"))
        ):
            return f"results[{index}] has no whole-number batch, sequence and threads"
        numbers = ("median_ms", "p90_ms", "p99_ms", "throughput_per_s", "ratio_vs_first")
        missing = [k for k in numbers if not _is_number(entry.get(k))]
        missing += [k for k in ("ratio_p10", "ratio_p90")
                    if k in entry and not _is_number(entry[k])]
        if missing:
            return f"results[{index}].{missing[0]} is not a number"
    return None


@dataclass
class BundleComparison:
    """Several bundles in one table and three charts.

    Attributes:
        bundles: The bundles, the first being the reference for ratios.
        bench: ``lrt-bench --json`` output covering (some of) the bundles, or None.
        metric: Fidelity metric for the Pareto chart (a key of the manifests' ``fidelity``).
    """

    bundles: list[BundleSummary]
    bench: dict[str, Any] | None = None
    metric: str = "mean_cosine"
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_paths(
        cls,
        paths: Sequence[str | os.PathLike[str]],
        *,
        labels: Sequence[str] | None = None,
        bench: str | os.PathLike[str] | None = None,
        metric: str = "mean_cosine",
    ) -> BundleComparison:
        """Load bundles (and an ``lrt-bench`` JSON file) into a comparison."""
        if labels is not None and len(labels) != len(paths):
            raise ReportInputError(f"got {len(labels)} labels for {len(paths)} bundles")
        names = list(labels) if labels is not None else [None] * len(paths)
        bundles = [load_bundle(p, name) for p, name in zip(paths, names, strict=True)]
        return cls(bundles, _load_bench(bench) if bench is not None else None, metric)

    # --- benchmark lookups -------------------------------------------------------------------

    def _bench_label(self, bundle: BundleSummary) -> str | None:
        """The label ``lrt-bench`` gave this bundle: same label, else same folder (each
        benchmarked bundle matched once, in order)."""
        if self.bench is None:
            return None
        infos = self.bench.get("bundles", [])
        matched: dict[int, str] = {}
        used: set[str] = set()
        for index, candidate in enumerate(self.bundles):
            same = next((i["label"] for i in infos if i["label"] == candidate.label), None)
            if same is not None:
                matched[index] = same
                used.add(same)
        for index, candidate in enumerate(self.bundles):
            if index in matched:
                continue
            for info in infos:
                path = info.get("path")
                if info["label"] in used or not path:
                    continue
                if Path(path).resolve() == candidate.path.resolve():
                    matched[index] = info["label"]
                    used.add(info["label"])
                    break
        return matched.get(self.bundles.index(bundle))

    def _bench_point(self) -> tuple[int, int, Any] | None:
        """(batch, sequence, threads) shown in the table: smallest batch, 128 or longest."""
        if not self.bench or not self.bench["results"]:
            return None
        settings = self.bench["settings"]
        sequences = settings["sequences"]
        sequence = 128 if 128 in sequences else max(sequences)
        return min(settings["batches"]), sequence, settings["threads"][0]

    def _bench_entry(self, label: str, batch: int, sequence: int, threads: Any) -> dict | None:
        for entry in (self.bench or {}).get("results", []):
            if (entry["bundle"], entry["batch"], entry["sequence"], entry["threads"]) == (
                label, batch, sequence, threads
            ):
                return entry
        return None

    # --- table ------------------------------------------------------------------------------

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Return headers and formatted rows of the comparison table (one row per bundle)."""
        metrics = list(dict.fromkeys(m for b in self.bundles for m in b.fidelity
                                     if m in ("mean_cosine", "worst_cosine", self.metric)))
        point = self._bench_point()
        headers = ["Bundle", "Variant", "File", "Size (MB)", "Size vs first",
                   *(f"{_COMPONENT_TITLES[c]} (MB)" for c in COMPONENTS), "Params",
                   *(metric_title(m) for m in metrics)]
        if point:
            batch, sequence, threads = point
            headers += [f"Median (ms) b{batch} s{sequence}", "Latency vs first"]
        reference = self.bundles[0].model_bytes or 1
        rows = []
        for bundle in self.bundles:
            split = bundle.components or {}
            row = [
                bundle.label,
                bundle.variant,
                bundle.model_file,
                f"{bundle.model_bytes / _MB:.2f}",
                f"{bundle.model_bytes / reference:.3g}x",
                *(f"{split[c] / _MB:.2f}" if c in split else "-" for c in COMPONENTS),
                f"{bundle.params:,}" if bundle.params else "-",
                *(_format_metric(bundle.fidelity.get(m)) for m in metrics),
            ]
            if point:
                label = self._bench_label(bundle)
                entry = self._bench_entry(label, *point) if label else None
                row += [
                    f"{entry['median_ms']:.2f}" if entry else "-",
                    f"{entry['ratio_vs_first']:.2f}x" if entry else "-",
                ]
            rows.append(row)
        return headers, rows

    def bench_table(self) -> tuple[list[str], list[list[str]]] | None:
        """Every ``lrt-bench`` result as rows, or None without benchmark data."""
        if not self.bench:
            return None
        headers = ["Bundle", "Threads", "Batch", "Seq", "Median (ms)", "p90 (ms)", "p99 (ms)",
                   "Samples/s", "vs first (p10-p90)"]
        rows = [
            [
                entry["bundle"], str(entry["threads"] or "default"), str(entry["batch"]),
                str(entry["sequence"]), f"{entry['median_ms']:.2f}", f"{entry['p90_ms']:.2f}",
                f"{entry['p99_ms']:.2f}", f"{entry['throughput_per_s']:.1f}",
                f"{entry['ratio_vs_first']:.2f}x ({entry.get('ratio_p10', 0):.2f}-"
                f"{entry.get('ratio_p90', 0):.2f})",
            ]
            for entry in self.bench["results"]
        ]
        return headers, rows

    # --- charts -----------------------------------------------------------------------------

    def pareto_points(self) -> tuple[list[str], list[tuple[float, float]]]:
        """Names and (size MB, fidelity) of every bundle with the metric, plus the dense fp32
        reference from the first bundle's report (fidelity 1 against itself)."""
        names, points = [], []
        for bundle in self.bundles:
            value = bundle.fidelity.get(self.metric)
            if isinstance(value, int | float):
                names.append(bundle.label)
                points.append((bundle.model_bytes / _MB, float(value)))
        report = next((b.report for b in self.bundles if b.report and b.report.baseline), None)
        if report is not None:
            baseline = report.baseline
            value = baseline.fidelity.get(self.metric) if baseline else None
            if baseline and isinstance(value, int | float):
                names.append(f"{baseline.name} (reference)")
                points.append((baseline.size_mb, float(value)))
        return names, points

    def charts(self) -> list[str]:
        """The SVG charts: size by component, latency vs sequence length, fidelity vs size."""
        charts = []
        with_split = [b for b in self.bundles if b.components]
        if with_split:
            charts.append(stacked_bar_svg(
                "Size by component (MB, from model.onnx)",
                [b.label for b in with_split],
                [_COMPONENT_TITLES[c] for c in COMPONENTS],
                [[b.components[c] / _MB for c in COMPONENTS] for b in with_split],
                unit=" MB",
            ))
        if self.bench and self.bench["results"]:
            settings = self.bench["settings"]
            threads = settings["threads"][0]
            # Series in bundle order, named as in the table, so colours match the Pareto chart.
            matched = [(b.label, self._bench_label(b)) for b in self.bundles]
            for batch in settings["batches"][:3]:
                series = [
                    (name, [
                        (float(e["sequence"]), e["median_ms"])
                        for e in self.bench["results"]
                        if e["bundle"] == label and e["batch"] == batch
                        and e["threads"] == threads
                    ])
                    for name, label in matched
                    if label is not None
                ]
                charts.append(line_chart_svg(
                    f"Median latency vs sequence length (batch {batch}, "
                    f"threads {threads or 'default'})",
                    series, x_label="sequence length (tokens, log scale)",
                    y_label="median latency (ms)", x_log=True,
                ))
        names, points = self.pareto_points()
        if points:
            charts.append(pareto_svg(
                f"{metric_title(self.metric)} vs size: Pareto front",
                names, points, x_label="model file size (MB)",
                y_label=metric_title(self.metric),
            ))
        return charts

    # --- rendering --------------------------------------------------------------------------

    def _explanations(self) -> list[str]:
        lines = [
            "Size: the file a runtime opens (model.ort for mobile bundles). Components are the "
            "weights in model.onnx, classified by what the graph does with them; Other includes "
            "LayerNorm and pooling weights and the graph itself.",
            f"Fidelity: {_fidelity_source(self.bundles)}.",
        ]
        names, points = self.pareto_points()
        front = [names[i] for i in pareto_front(points)] if points else []
        if front:
            lines.append(
                f"Pareto front ({metric_title(self.metric)} vs size, nothing both smaller and "
                f"better): {', '.join(front)}."
            )
        if self.bench:
            settings, machine = self.bench["settings"], self.bench.get("machine") or {}
            lines.append(
                f"Latency: lrt-bench, {settings['runs']} interleaved rounds per setting, ratios "
                f"vs {settings.get('reference')}; {machine.get('cpu_count')} CPUs, onnxruntime "
                f"{machine.get('onnxruntime')}, load average {machine.get('load_average_1min')} "
                "at the start."
            )
        else:
            lines.append("Latency: run lrt-bench on these bundles and pass --bench to add it.")
        return lines + self.notes

    def to_markdown(self) -> str:
        """Render the comparison as Markdown (tables and explanations, no charts)."""
        lines = ["# Bundle comparison", "", markdown_table(*self.table()), ""]
        lines += [f"- {line}" for line in self._explanations()] + [""]
        bench = self.bench_table()
        if bench:
            lines += ["## lrt-bench", "", markdown_table(*bench), ""]
        return "\n".join(lines)

    def to_html(self) -> str:
        """Render the comparison as one self-contained HTML page (inline SVG, no scripts)."""
        title = "Bundle comparison: " + ", ".join(b.label for b in self.bundles)
        body = [
            f"<h1>{escape(title)}</h1>",
            f'<div id="comparison">{html_table(*self.table())}</div>',
            f'<div class="charts">{"".join(self.charts())}</div>',
            "<ul>" + "".join(f"<li>{escape(line)}</li>" for line in self._explanations())
            + "</ul>",
        ]
        bench = self.bench_table()
        if bench:
            body += ["<h2>lrt-bench</h2>", f'<div id="bench">{html_table(*bench)}</div>']
        return html_page(title, body)


def _format_metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def _fidelity_source(bundles: Sequence[BundleSummary]) -> str:
    for bundle in bundles:
        if bundle.report and bundle.report.settings.fidelity_inputs:
            return str(bundle.report.settings.fidelity_inputs)
    return "as measured by lrt-export against the dense model"
