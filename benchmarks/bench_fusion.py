"""What the attention/GELU fusion buys: MiniLM dense and LRT (rank 0.5) fp32 graphs, ORT's own
extended optimisation alone against lrt-deploy's fusion passes followed by it, timed in one run.

    python benchmarks/bench_fusion.py [--runs 100] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from lrt_deploy.compress import LowRankConfig, factorize_
    from lrt_deploy.data.readers import calibration_batches, latency_inputs
    from lrt_deploy.export.fusion import fuse_transformer
    from lrt_deploy.export.graph import op_counts
    from lrt_deploy.export.onnx_export import export_onnx
    from lrt_deploy.export.optimize import optimize_graph
    from lrt_deploy.load import load_model
    from lrt_deploy.runtime import Session, measure_latency

    model = load_model("all-MiniLM-L6-v2")
    feeds = latency_inputs(model, batch=1, sequence=128)
    heads, hidden = model.attention_shape
    folder = Path(tempfile.mkdtemp(prefix="bench-fusion-"))
    graphs = {}
    for kind in ("dense", "LRT"):
        if kind == "LRT":
            factorize_(model.module, LowRankConfig(rank=0.5), calibration=calibration_batches(
                model, None))
        raw = export_onnx(model, folder / f"{kind}.onnx")
        plain, fused = folder / f"{kind}.ort-extended.onnx", folder / f"{kind}.fused.onnx"
        optimize_graph(raw, plain, "extended")
        result = fuse_transformer(raw, fused, num_heads=heads, hidden_size=hidden,
                                  check_inputs=feeds)
        graphs[kind] = (plain, fused)
        print(f"{kind}: {sum(op_counts(plain).values())} nodes with ORT extended, "
              f"{result.nodes_after} fused ({result.fused}); max |diff| {result.max_abs_diff:.2g}")
    print(f"batch 1, sequence 128, {args.threads} threads, median of {args.runs} runs")
    for repeat in range(args.repeats):
        for kind, (plain, fused) in graphs.items():
            before = measure_latency(Session(plain, threads=args.threads), feeds, warmup=10,
                                     runs=args.runs)
            after = measure_latency(Session(fused, threads=args.threads), feeds, warmup=10,
                                    runs=args.runs)
            print(f"[{repeat}] {kind:<5} ORT extended {before.median_ms:6.2f} ms -> fused "
                  f"{after.median_ms:6.2f} ms: {before.median_ms / after.median_ms:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
