"""Int8 weight grids of the quick start's models, measured in one run: fidelity with this host's
default int8 kernel and with onnxruntime's exact one, and interleaved latency.

    python benchmarks/bench_int8_grids.py [--sentences 80] [--runs 300] [--json out.json]

Models: all-MiniLM-L6-v2 dense, and the quick start's LRT (budget 0.9, embeddings factorized),
both fused and outlier-smoothed as ``lrt-export --quantize int8`` does. Grids, all dynamic int8
per channel (weights of MatMul/packed Attention; embedding tables int8 per tensor):
  full-range  [-127, 127] (onnxruntime's quantize_dynamic; what lrt-export shipped before)
  pair-safe   lrt-export's default (lrt_deploy/quant/rules.py)
  7-bit       [-64, 64] (onnxruntime's reduce_range=True; tables 7-bit too)
  uint8       asymmetric uint8 weights (the U8U8 kernel)
Fidelity: cosine of sentence embeddings to the dense PyTorch fp32 model on the first
``--sentences`` of each shipped held-out set, one sentence per run, with onnxruntime's default
session options ("host") and with ``session.x64quantprecision=1`` ("exact": x86's exact kernel;
the same numbers a VNNI, ARM64 or WebAssembly device computes, up to float rounding). Latency:
batch 1, sequence 128, 2 threads, spinning off, every graph timed once per run in alternating
order; ratio = median paired ratio to full-range with its range over five blocks.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from interleave import interleaved_latency

GRIDS = ("full-range", "pair-safe", "7-bit", "uint8")


def _fp32_graphs(work: Path) -> tuple[dict[str, Path], object, list]:
    """The fused fp32 graphs of dense and LRT MiniLM, the loaded dense model, calibration."""
    from lrt_deploy import load_model
    from lrt_deploy.compress import LowRankConfig
    from lrt_deploy.config import BudgetRank
    from lrt_deploy.data import readers
    from lrt_deploy.export.targets import Target
    from lrt_deploy.pipeline import export_bundle

    graphs = {}
    for name, compress in (("dense", None), ("LRT", LowRankConfig(
            BudgetRank(0.9), solver="asvd", factorize_embeddings=True))):
        loaded = load_model("all-MiniLM-L6-v2")
        out = work / name
        print(f"== exporting {name} fp32", file=sys.stderr, flush=True)
        export_bundle(loaded, out, Target.from_name("cpu"), compress=compress,
                      verify_on_devices=False)
        graphs[name] = out / "model.onnx"
    dense = load_model("all-MiniLM-L6-v2")
    calibration = readers.to_numpy_batches(readers.calibration_batches(dense, None))
    return graphs, dense, calibration


def _quantize(source: Path, target: Path, grid: str) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from lrt_deploy._logs import quiet_loggers
    from lrt_deploy.quant.passes.dynamic import quantize_int8

    if grid in ("full-range", "pair-safe"):
        quantize_int8(source, target, weight_grid=grid)
        return
    with quiet_loggers(""):
        quantize_dynamic(str(source), str(target), per_channel=True,
                         weight_type=QuantType.QUInt8 if grid == "uint8" else QuantType.QInt8,
                         reduce_range=grid == "7-bit",
                         op_types_to_quantize=["MatMul", "Gather", "Attention"],
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _embed(path: Path, feeds: list[dict], exact: bool) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    if exact:
        options.add_session_config_entry("session.x64quantprecision", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return [session.run(None, {k: v for k, v in f.items() if k in names})[0] for f in feeds]


def _cosine(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, float]:
    x, y = np.concatenate(a).astype(np.float64), np.concatenate(b).astype(np.float64)
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    return {"mean": round(float(cos.mean()), 4), "worst": round(float(cos.min()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=80)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from lrt_deploy.data import readers
    from lrt_deploy.quant.passes.smoothing import smooth_outlier_channels
    from lrt_deploy.runtime.devices import host_class

    with tempfile.TemporaryDirectory(prefix="bench-grids-") as scratch:
        work = Path(scratch)
        fp32, dense, calibration = _fp32_graphs(work)
        sets = {}
        for key, corpus in (("heldout", readers.HELDOUT_TEXT),
                            ("other domain", readers.DOMAIN_HELDOUT_TEXT)):
            batches = readers.evaluation_batches(dense, 1, corpus=corpus)[: args.sentences]
            sets[key] = ([{k: v.numpy() for k, v in b.items()} for b in batches],
                         [dense.forward(b)[dense.output_names[0]].numpy() for b in batches])
        graphs, rows = {}, []
        for model, source in fp32.items():
            smoothed = work / f"{model}-smoothed.onnx"
            smooth_outlier_channels(source, smoothed, calibration)
            for grid in GRIDS:
                path = work / f"{model}-{grid}.onnx"
                print(f"== {model} {grid}", file=sys.stderr, flush=True)
                _quantize(smoothed, path, grid)
                graphs[f"{model} {grid}"] = path
                row = {"model": model, "grid": grid, "mb": round(path.stat().st_size / 1e6, 2)}
                for kernel in ("host", "exact"):
                    for key, (feeds, reference) in sets.items():
                        row[f"{key} {kernel}"] = _cosine(_embed(path, feeds, kernel == "exact"),
                                                         reference)
                rows.append(row)
        feeds = {k: v.numpy() for k, v in dense.tokenize(["lrt " * 126]).items()}
        for model in fp32:
            print(f"== latency {model}", file=sys.stderr, flush=True)
            timed = interleaved_latency(
                {g: graphs[f"{model} {g}"] for g in GRIDS}, feeds, baseline="full-range",
                runs=args.runs)
            for row in rows:
                if row["model"] == model:
                    t = timed[row["grid"]]
                    row["latency"] = {"median_ms": round(t.median_ms, 2),
                                      "ratio": round(t.ratio, 3),
                                      "ratio_range": [round(t.ratio_low, 3),
                                                      round(t.ratio_high, 3)]}
    print(f"host class: {host_class()}")
    print("| model | grid | MB | heldout host | heldout exact | other domain host | "
          "other domain exact | latency x full-range [range] |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [f"{r[k]['mean']:.4f} / {r[k]['worst']:.4f}" for k in (
            "heldout host", "heldout exact", "other domain host", "other domain exact")]
        lat = r["latency"]
        print(f"| {r['model']} | {r['grid']} | {r['mb']} | {' | '.join(cells)} | "
              f"{lat['ratio']:.3f} [{lat['ratio_range'][0]:.3f}-{lat['ratio_range'][1]:.3f}] |")
    if args.json:
        args.json.write_text(json.dumps({"host": host_class(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
