"""lrt-deploy's dynamic int8 graph of all-MiniLM-L6-v2 against the int8 graphs peers make, timed
side by side in one run, with node/op counts and fidelity against PyTorch.

    python benchmarks/bench_int8_peers.py [--runs 300] [--threads 2]

Graphs (all per-channel dynamic int8, weights int8, on the same sentence-embedding model):
  stock     torch.onnx.export (dynamo) + onnxruntime.quantization.quantize_dynamic (the baseline)
  olive     ORT's transformers optimizer (model_type bert) on a TorchScript export with eager
            attention, then quantize_dynamic: the recipe Olive applies (QAttention,
            QEmbedLayerNormalization)
  ours      what ``lrt-export --target cpu --quantize int8`` ships: export_onnx ->
            fuse_transformer -> quantize_int8
  LRT-r     the same after ``factorize_(model, LowRankConfig(rank=r, solver="svd"))``
optimum (optimum-cli export + onnxruntime quantize) is not included: it pins transformers<4.58
and this environment has transformers 5.

Latency: batch 1, sequence 128 (real tokens), CPU provider, thread-pool spinning off; every run
times each graph once (order alternating), ratios are medians against ``stock`` with their
range over five blocks of runs. Fidelity: cosine of sentence embeddings against PyTorch on the
shipped held-out sentences, one sentence per run (b1) and in batches of 16 padded to 128 tokens
(b16: the padding mask matters, and dynamic quantisation's per-tensor input scales then span
the whole batch, padding included).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from interleave import interleaved_latency

SEQUENCE = 128


def _quantize_stock(source: Path, target: Path) -> None:
    """quantize_dynamic as a user calls it: per channel, int8 weights, all op types it knows."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _olive_like(loaded: Any, folder: Path) -> Path:
    """TorchScript export with eager attention -> ORT transformers optimizer -> dynamic int8."""
    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    config = next(m.config for m in loaded.module.modules() if hasattr(m, "config"))
    previous = config._attn_implementation
    config._attn_implementation = "eager"  # the optimizer matches the eager attention subgraph
    try:
        example = loaded.tokenize(["a sentence to trace the graph with"], pad_to=SEQUENCE)
        raw = folder / "olive.raw.onnx"
        names = loaded.input_names
        torch.onnx.export(
            loaded.graph_module(), tuple(example[n] for n in names), str(raw), dynamo=False,
            input_names=names, output_names=loaded.output_names, opset_version=17,
            dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names},
        )
    finally:
        config._attn_implementation = previous
    heads, hidden = loaded.attention_shape
    optimized = folder / "olive.fp32.onnx"
    optimize_model(str(raw), model_type="bert", num_heads=heads,
                   hidden_size=hidden).save_model_to_file(str(optimized))
    target = folder / "olive.int8.onnx"
    _quantize_stock(optimized, target)
    return target


def _ours(loaded: Any, folder: Path, tag: str, check: dict[str, np.ndarray]) -> tuple[Path, Path]:
    from lrt_deploy.export.onnx_export import export_onnx
    from lrt_deploy.export.passes.fusion import fuse_transformer
    from lrt_deploy.quant.passes.dynamic import quantize_int8

    raw = export_onnx(loaded, folder / f"{tag}.raw.onnx")
    heads, hidden = loaded.attention_shape
    fp32 = folder / f"{tag}.fp32.onnx"
    fuse_transformer(raw, fp32, num_heads=heads, hidden_size=hidden, check_inputs=check)
    int8 = folder / f"{tag}.int8.onnx"
    quantize_int8(fp32, int8, per_channel=True)
    return raw, int8


def _embeddings(path: Path, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    from interleave import cpu_session

    session = cpu_session(path, 2)
    names = [i.name for i in session.get_inputs()]
    return np.concatenate([session.run(None, {n: b[n] for n in names})[0] for b in batches])


def _cosines(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    from lrt_deploy.metrics import cosine_per_row

    values = cosine_per_row(reference, candidate)
    return float(np.mean(values)), float(np.min(values))


def _ops(path: Path) -> str:
    from lrt_deploy.graph.ops import op_counts

    counts = op_counts(path)
    shown = ("QAttention", "Attention", "MultiHeadAttention", "QEmbedLayerNormalization",
             "EmbedLayerNormalization", "MatMulInteger", "DynamicQuantizeLinear", "MatMul",
             "Softmax")
    return f"{sum(counts.values()):4d} nodes: " + ", ".join(
        f"{op} {counts[op]}" for op in shown if counts.get(op)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ranks", type=float, nargs="*", default=[0.5, 0.25],
                        help="LRT ranks (fractions); at 0.5 MiniLM's square Q/K/V stay dense")
    parser.add_argument("--extra", nargs="*", default=[], metavar="NAME=PATH",
                        help="more int8 graphs to time alongside (e.g. an older build)")
    args = parser.parse_args()

    import onnxruntime
    import torch
    import transformers

    import lrt_deploy.data
    from lrt_deploy.compress import LowRankConfig, factorize_
    from lrt_deploy.load import load_model

    loaded = load_model("all-MiniLM-L6-v2")
    lines = [
        line.strip()
        for line in (Path(lrt_deploy.data.__file__).parent / "heldout.txt").read_text().splitlines()
        if line.strip()
    ]
    padded = [
        {n: t.numpy() for n, t in loaded.tokenize(lines[i:i + 16], pad_to=SEQUENCE).items()}
        for i in range(0, len(lines), 16)
    ]
    single = [{n: t.numpy() for n, t in loaded.tokenize([line]).items()} for line in lines]
    encoded = loaded.tokenize([" ".join(lines)], pad_to=SEQUENCE)  # 128 real tokens
    feeds = {n: t.numpy() for n, t in encoded.items()}
    check = padded[0]

    def reference(model: Any) -> dict[str, np.ndarray]:
        return {
            tag: np.concatenate([
                model.forward({n: torch.from_numpy(v) for n, v in b.items()})[
                    model.output_names[0]].numpy()
                for b in batches
            ])
            for tag, batches in (("b1", single), ("b16", padded))
        }

    folder = Path(tempfile.mkdtemp(prefix="bench-int8-peers-"))
    dense_ref = reference(loaded)
    graphs: dict[str, Path] = {}
    raw, graphs["ours"] = _ours(loaded, folder, "dense", check)
    graphs["stock"] = folder / "stock.int8.onnx"
    _quantize_stock(raw, graphs["stock"])
    # A model of its own: the eager-attention switch must not leak into the other exports.
    graphs["olive"] = _olive_like(load_model("all-MiniLM-L6-v2"), folder)
    refs = {name: dense_ref for name in graphs}
    for extra in args.extra:
        name, _, path = extra.partition("=")
        graphs[name], refs[name] = Path(path), dense_ref
    lrt_names = []
    for rank in args.ranks:
        name = f"LRT-{rank:g}"
        lrt = load_model("all-MiniLM-L6-v2")
        factorize_(lrt.module, LowRankConfig(rank=rank, solver="svd"))
        refs[name] = reference(lrt)
        _, graphs[name] = _ours(lrt, folder, name, check)
        lrt_names.append(name)

    print(f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; LRT by svd, no healing; cosine vs the PyTorch model "
          f"each graph came from, {len(single)} held-out sentences")
    order = ["stock", "olive", "ours", *(e.partition("=")[0] for e in args.extra), *lrt_names]
    print("cosine mean / worst, b1 | b16")
    for name in order:
        cells = []
        for tag, batches in (("b1", single), ("b16", padded)):
            mean, worst = _cosines(refs[name][tag], _embeddings(graphs[name], batches))
            cells.append(f"{mean:.4f} / {worst:.4f}")
        print(f"{name:<9} {' | '.join(cells)} | {_ops(graphs[name])}")
    for name in lrt_names:
        mean, worst = _cosines(dense_ref["b1"], refs[name]["b1"])
        print(f"({name} PyTorch vs dense PyTorch, b1: cosine mean {mean:.4f} worst {worst:.4f})")
    timings = interleaved_latency({n: graphs[n] for n in order}, feeds, baseline="stock",
                                  runs=args.runs, threads=args.threads)
    print(f"batch 1, sequence {SEQUENCE}, {args.threads} threads, spinning off, {args.runs} "
          "interleaved runs; median and ratio to stock [range over 5 blocks]")
    for name in order:
        print(f"{name:<9} {timings[name].cell()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
