"""Size / latency / fidelity of LRT variants of all-MiniLM-L6-v2 against the dense baseline.

Each rank is a full ``export_bundle`` run, so its dense fp32 and dense int8 rows are measured in
the same process run, on the same inputs, threads and provider as its LRT rows; every ratio
printed is against that run's dense fp32.

    python benchmarks/bench_minilm.py [--ranks 0.25 0.5] [--target cpu] [--runs 30]

Writes ``benchmarks/results/minilm.json`` and a size-vs-fidelity chart ``minilm.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=float, nargs="+", default=[0.25, 0.375, 0.5])
    parser.add_argument("--target", default="cpu", choices=("cpu", "mobile"))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    from lrt_deploy.compress import LowRankConfig
    from lrt_deploy.export.targets import Target
    from lrt_deploy.load import load_model
    from lrt_deploy.pipeline import BenchmarkSettings, export_bundle

    settings = BenchmarkSettings(runs=args.runs, threads=args.threads)
    rows = []
    for rank in args.ranks:
        print(f"== rank {rank}: compress, export, measure (dense measured in the same run)",
              file=sys.stderr, flush=True)
        loaded = load_model("all-MiniLM-L6-v2")
        with tempfile.TemporaryDirectory() as tmp:
            result = export_bundle(
                loaded, Path(tmp) / "bundle", Target.from_name(args.target, quantize="int8"),
                compress=LowRankConfig(rank=rank), settings=settings,
                progress=lambda line: print("   " + line, file=sys.stderr, flush=True),
            )
        base = next(v for v in result.variants if v.is_baseline)
        for v in result.variants:
            if v.label.startswith("dense") and rows and rank != args.ranks[0]:
                continue  # dense rows are shown once (the first run's); each run has its own
            rows.append({
                "variant": v.label if v.label.startswith("dense") else f"{v.label} r={rank}",
                "rank": None if v.label.startswith("dense") else rank,
                "size_mb": v.file_bytes / 1e6,
                "size_ratio": v.file_bytes / base.file_bytes,
                "median_ms": v.latency["median_ms"],
                "p90_ms": v.latency["p90_ms"],
                "speedup": base.latency["median_ms"] / v.latency["median_ms"],
                "mean_cosine": v.fidelity["mean_cosine"],
                "worst_cosine": v.fidelity["worst_cosine"],
            })

    header = (f"{'variant':<18} {'size MB':>8} {'size x':>7} {'median ms':>9} {'p90 ms':>7} "
              f"{'speedup':>7} {'mean cos':>8} {'worst cos':>9}")
    print(f"all-MiniLM-L6-v2, target {args.target}, batch 1, sequence 128, "
          f"{args.threads} threads, CPU provider; ratios vs dense fp32 of the same run")
    print(header)
    for r in rows:
        print(f"{r['variant']:<18} {r['size_mb']:>8.2f} {r['size_ratio']:>7.3f} "
              f"{r['median_ms']:>9.2f} {r['p90_ms']:>7.2f} {r['speedup']:>7.2f} "
              f"{r['mean_cosine']:>8.4f} {r['worst_cosine']:>9.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "minilm.json").write_text(json.dumps(rows, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)
        return 0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        marker = "s" if r["variant"].startswith("dense") else "o"
        ax.scatter(r["size_mb"], r["mean_cosine"], marker=marker)
        ax.annotate(r["variant"], (r["size_mb"], r["mean_cosine"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("model file size (MB)")
    ax.set_ylabel("mean cosine to dense fp32 (held-out)")
    ax.set_title("all-MiniLM-L6-v2: size vs fidelity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "minilm.png", dpi=120)
    print(f"chart: {args.out / 'minilm.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
