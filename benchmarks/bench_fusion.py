"""What the transformer fusion buys on MiniLM fp32 graphs, dense and LRT (rank 0.5: FFN factors,
Q/K/V stay dense; rank 0.25: every projection a factor pair): ORT's own extended optimisation
alone against ``fuse_transformer`` (onnxscript's rewriter + our mask pass, then ORT extended),
node and fused-op counts, max |diff| against the unfused graph, and latency, all in one run.

    python benchmarks/bench_fusion.py [--runs 200] [--extra dense:old=old-dense.onnx ...]

``--extra KIND:NAME=PATH`` times another fp32 graph of the same model beside them (e.g. one an
older lrt-deploy fused from this run's ``KIND.raw.onnx``, kept with ``--keep DIR``).
Latency: batch 1, sequence 128, thread-pool spinning off, interleaved runs; ratios against the
dense ORT-extended graph with their range over five blocks of runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from interleave import interleaved_latency

KINDS = {"dense": None, "LRT-0.5": 0.5, "LRT-0.25": 0.25}
SHOWN = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "FusedMatMul",
         "MatMul", "Softmax")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="write the graphs here (default: a temp dir)")
    parser.add_argument("--extra", nargs="*", default=[], metavar="KIND:NAME=PATH")
    args = parser.parse_args()

    import lrt_deploy.data
    from lrt_deploy.compress import LowRankConfig, factorize_
    from lrt_deploy.export.onnx_export import export_onnx
    from lrt_deploy.export.passes.fusion import fuse_transformer, max_output_difference
    from lrt_deploy.export.passes.optimize import optimize_graph
    from lrt_deploy.graph.ops import op_counts
    from lrt_deploy.load import load_model

    text = (Path(lrt_deploy.data.__file__).parent / "heldout.txt").read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-fusion-"))
    folder.mkdir(parents=True, exist_ok=True)
    graphs, raws = {}, {}
    for kind, rank in KINDS.items():
        loaded = load_model("all-MiniLM-L6-v2")
        if kind == "dense":
            feeds = {n: t.numpy() for n, t in loaded.tokenize([" ".join(lines)],
                                                              pad_to=128).items()}
            padded = {n: t.numpy() for n, t in loaded.tokenize(lines[:8]).items()}
        if rank is not None:
            factorize_(loaded.module, LowRankConfig(rank=rank, solver="svd"))
        heads, hidden = loaded.attention_shape
        raws[kind] = export_onnx(loaded, folder / f"{kind}.raw.onnx")
        plain, fused = folder / f"{kind}.ort-extended.onnx", folder / f"{kind}.fused.onnx"
        optimize_graph(raws[kind], plain, "extended")
        result = fuse_transformer(raws[kind], fused, num_heads=heads, hidden_size=hidden,
                                  check_inputs=padded)
        graphs[f"{kind} ORT-ext"], graphs[f"{kind} fused"] = plain, fused
        print(f"{kind}: fused in {result.seconds:.1f} s; rewrites {result.details['rewrites']}")
    for extra in args.extra:
        kind, _, rest = extra.partition(":")
        name, _, path = rest.partition("=")
        graphs[f"{kind} {name}"] = Path(path)
    print(f"{'graph':<22} nodes  max|diff| (8 padded sentences)  ops")
    for name, path in graphs.items():
        counts = op_counts(path)
        diff = max_output_difference(raws[name.split()[0]], path, padded)
        ops = ", ".join(f"{op} {counts[op]}" for op in SHOWN if counts.get(op))
        print(f"{name:<22} {sum(counts.values()):5d}  {diff:9.2g}  {ops}")
    timings = interleaved_latency(graphs, feeds, baseline="dense ORT-ext", runs=args.runs,
                                  threads=args.threads)
    print(f"batch 1, sequence 128, {args.threads} threads, spinning off, {args.runs} interleaved "
          "runs; median and ratio to dense ORT-ext [range over 5 blocks]")
    for name, timing in timings.items():
        print(f"{name:<22} {timing.cell()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
