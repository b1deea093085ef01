"""Does LRT + int8 pay on this runtime? Dense int8 per channel against LRT int8 variants on
native ONNX Runtime (this CPU) and on onnxruntime-web's WebAssembly backend (in Node: the
.wasm a page loads), in one run.

    python benchmarks/bench_backends.py [--factors NAME=DIR ...] [--ffn-ranks 192 128]
        [--seq 32 128] [--runs 30] [--wasm-runs 15] [--threads 2] [--out results]

Variants: dense fp32 and dense int8 per channel (the baseline of every ratio); ``--factors``
low-rank factor shards (``heal_run.py``/``save_lowrank_factors`` output: a healed or a plain
factorization, the real candidates); ``--ffn-ranks`` shape probes (plain SVD of every FFN
matrix at that rank, not healed: they say what a shape costs, their fidelity is no candidate).
Every variant is exported the way ``lrt-export --target cpu --quantize int8`` does (ONNX,
transformer fusion, dynamic int8 per channel).

Per variant: file size; fidelity (mean / worst cosine to the dense fp32 PyTorch model on both
shipped held-out sets) of the native int8 graph and of the same graph run in WebAssembly;
latency as the median paired ratio to dense int8 (interleaved runs, thread-pool spinning off,
range over 5 blocks of runs) at each ``--seq`` on both runtimes; and, from ONNX Runtime's
profiler on the native runtime, the share of kernel time spent in nodes that multiply by a
weight matrix (the only work a factorization can shrink). And one FFN matrix alone, dense
against the ``--ffn-ranks`` pairs, fp32 and int8, on both runtimes: what the product itself
costs once the rest of the model is gone.

Writes ``results/backends-minilm.json`` and ``.png``. WebAssembly needs node and
``samples/js/node_modules`` (``scripts/setup_tests.sh``); without them those columns are skipped.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

JS_DIR = Path(__file__).resolve().parent.parent / "samples" / "js"
# Kernels that multiply by a weight matrix (with their own activation rounding, for int8).
MATRIX_OPS = {"MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "DynamicQuantizeMatMul",
              "MatMulIntegerToFloat", "QAttention", "Attention", "MatMulNBits"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factors", nargs="*", default=(), metavar="NAME=DIR",
                        help="low-rank factor shards to rebuild (healed or plain)")
    parser.add_argument("--ffn-ranks", nargs="*", type=int, default=(192, 128),
                        help="shape probes: every FFN matrix factorized at this rank (plain SVD)")
    add_runtime_arguments(parser, runs=30, wasm_runs=15)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from healed import export_int8, heldout_scorer

    from lrt_deploy.graph.ops import model_bytes
    from lrt_deploy.load import load_model

    dense = load_model(args.model_dir)
    sets, fidelity = heldout_scorer(dense)
    wasm = wasm_available(args.wasm_runs)

    rows: list[dict[str, Any]] = []
    graphs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, model, info in _variants(dense, args.factors, args.ffn_ranks):
            print(f"== exporting {name}", file=sys.stderr, flush=True)
            fp32, int8 = export_int8(model, work, _key(name))
            for label, path in ([("dense fp32", fp32)] if name == "dense" else []) + [
                    (f"{name} int8", int8)]:
                graphs[label] = path
                rows.append({"variant": label, **info, "size_mb": model_bytes(path) / 1e6,
                             **native_scores(path, dense, fidelity, args.threads,
                                             dense.output_names[0])})
        baseline = "dense int8"
        if wasm:
            add_wasm_fidelity(rows, graphs, sets, fidelity, work, args.wasm_threads)
        layers = _layer_probe(work, max(args.seq), args.ffn_ranks, args.runs,
                              args.wasm_runs, args.threads,
                              args.wasm_threads if wasm else None)
        time_rows(rows, graphs, baseline, dense, work, args, wasm)
    base_mb = next(r["size_mb"] for r in rows if r["variant"] == baseline)
    for row in rows:
        row["size_vs_int8"] = row["size_mb"] / base_mb
    setting = {"threads": args.threads, "wasm_threads": args.wasm_threads,
               "native_runs": args.runs, "wasm_runs": args.wasm_runs, "batch": 1}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backends-minilm.json").write_text(
        json.dumps({"setting": setting, "rows": rows, "layers": layers}, indent=2) + "\n")
    _print_layers(layers)
    _print(rows, args.seq)
    _chart(rows, args.seq, args.out / "backends-minilm.png")
    return 0


def add_runtime_arguments(parser: argparse.ArgumentParser, *, runs: int, wasm_runs: int) -> None:
    """The options both runtime benchmarks share: the dense model, shapes, runs, threads, out."""
    parser.add_argument("--model-dir", default="all-MiniLM-L6-v2",
                        help="the dense model every fidelity is measured against")
    parser.add_argument("--seq", nargs="+", type=int, default=(32, 128))
    parser.add_argument("--runs", type=int, default=runs, help="native timed runs per graph")
    parser.add_argument("--wasm-runs", type=int, default=wasm_runs,
                        help="WebAssembly timed runs (0: native only)")
    parser.add_argument("--threads", type=int, default=2, help="native intra-op threads")
    parser.add_argument("--wasm-threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results"))


def wasm_available(runs: int = 1) -> bool:
    """Whether the WebAssembly side runs: asked for (``runs`` > 0), and node and
    onnxruntime-web are there (says so on stderr when not)."""
    if runs <= 0:
        return False
    if shutil.which("node") and (JS_DIR / "node_modules" / "onnxruntime-web").is_dir():
        return True
    print("node or samples/js/node_modules missing (scripts/setup_tests.sh): native only",
          file=sys.stderr)
    return False


def native_scores(path: Path, dense: Any, fidelity: Any, threads: int,
                  output: str | None = None) -> dict[str, Any]:
    """Fidelity of the graph at ``path`` on native ONNX Runtime (``output``, else its first
    output, scored by ``fidelity`` from ``healed.heldout_scorer``) and its kernel-time share in
    matrix ops."""
    from interleave import cpu_session

    session = cpu_session(path, threads)
    inputs = {i.name for i in session.get_inputs()}
    names = [output] if output else None
    return {"fidelity": fidelity(lambda b: session.run(
                names, {k: v.numpy() for k, v in b.items() if k in inputs})[0]),
            "matrix_share": _matrix_share(path, dense, threads)}


def add_wasm_fidelity(rows: list[dict[str, Any]], graphs: dict[str, Path],
                      sets: dict[str, list[Any]], fidelity: Any, work: Path,
                      threads: int) -> None:
    """``row["fidelity_wasm"]`` for every row (in ``graphs`` order), run in WebAssembly."""
    print("== WebAssembly fidelity", file=sys.stderr, flush=True)
    for row, scores in zip(rows, _wasm_fidelity(graphs, sets, fidelity, work, threads),
                           strict=True):
        row["fidelity_wasm"] = scores


def time_rows(rows: list[dict[str, Any]], graphs: dict[str, Path], baseline: str, dense: Any,
              work: Path, args: argparse.Namespace, wasm: bool) -> None:
    """Latency of every graph at each ``args.seq``, natively and (``wasm``) in WebAssembly, as
    the median paired ratio to ``baseline`` with its spread, into ``row["latency"]``."""
    from interleave import interleaved_latency

    for seq in args.seq:
        feeds = {k: v.numpy() for k, v in dense.tokenize(["lrt " * (seq - 2)]).items()}
        print(f"== latency, sequence {seq}: native", file=sys.stderr, flush=True)
        timed = {"native": interleaved_latency(graphs, feeds, baseline=baseline,
                                               runs=args.runs, threads=args.threads)}
        if wasm:
            print(f"== latency, sequence {seq}: WebAssembly", file=sys.stderr, flush=True)
            timed["wasm"] = _wasm_latency(graphs, baseline, feeds, work, args.wasm_runs,
                                          args.wasm_threads)
        for row in rows:
            for runtime, timings in timed.items():
                t = timings[row["variant"]]
                row.setdefault("latency", {}).setdefault(runtime, {})[str(seq)] = {
                    "median_ms": t.median_ms, "ratio_vs_int8": t.ratio,
                    "ratio_spread": [t.ratio_low, t.ratio_high]}


def _key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def _variants(dense: Any, factors: list[str], ranks: list[int]) -> list[tuple[str, Any, dict]]:
    from healed import build_variant

    from lrt_deploy.compress import LowRankConfig, factorize_

    out = [("dense", dense, {"kind": "baseline"})]
    for spec in factors:
        name, _, folder = spec.partition("=")
        if not folder:
            raise SystemExit(f"--factors takes NAME=DIR, got {spec!r}")
        model, info = build_variant(dense, folder, None)  # the shards and their result.json
        out.append((name, model, {"kind": "candidate", **info}))
    for rank in ranks:
        module = copy.deepcopy(dense.module)
        factorize_(module, LowRankConfig(rank=rank, solver="svd",
                                         skip=("*attention*", "*embeddings*", "*pooler*")))
        out.append((f"probe ffn rank {rank}", dataclasses.replace(dense, module=module.eval()),
                    {"kind": "shape probe (plain SVD, not healed)"}))
    for _, model, info in out:
        info["params"] = sum(p.numel() for p in model.module.parameters())
    return out


def _matrix_share(path: Path, dense: Any, threads: int) -> float:
    """Share of the native kernel time spent in nodes that multiply by a weight matrix, from
    ONNX Runtime's profiler over 20 runs at sequence 128."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v.numpy() for k, v in dense.tokenize(["lrt " * 126]).items() if k in names}
    for _ in range(20):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    spent: collections.Counter[str] = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"]
    trace.unlink()
    total = sum(spent.values())
    return sum(v for k, v in spent.items() if k in MATRIX_OPS) / total if total else 0.0


def _feeds_json(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: {"dims": list(v.shape), "data": v.reshape(-1).tolist(),
                **({"type": "float32"} if v.dtype.kind == "f" else {})}
            for k, v in batch.items()}


def _node(args: list[str]) -> dict[str, Any]:
    done = subprocess.run(["node", "wasm-bench.js", *args], cwd=JS_DIR, capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise SystemExit(f"wasm-bench.js failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _wasm_fidelity(graphs: dict[str, Path], sets: dict[str, list[Any]], fidelity: Any,
                   work: Path, threads: int) -> list[dict[str, Any]]:
    """Run every graph on both held-out sets in WebAssembly and score it like the native."""
    import numpy as np

    order = [(name, i) for name, batches in sets.items() for i in range(len(batches))]
    (work / "batches.json").write_text(json.dumps(
        [_feeds_json({k: v.numpy() for k, v in sets[name][i].items()}) for name, i in order]))
    files = list(graphs.values())
    _node(["--models", ",".join(str(f) for f in files), "--runs", "0", "--threads", str(threads),
           "--outputs", str(work / "batches.json"), "--out", str(work / "wasm-out")])
    scores = []
    for g in range(len(files)):
        served = itertools.count()  # fidelity() walks the sets in ``order``'s order

        def run_batch(batch: Any, g: int = g, served: Any = served) -> Any:
            raw = (work / "wasm-out" / f"{g}-{next(served)}.bin").read_bytes()
            return np.frombuffer(raw, dtype=np.float32).reshape(batch["input_ids"].shape[0], -1)

        scores.append(fidelity(run_batch))
    return scores


def _wasm_latency(graphs: dict[str, Path], baseline: str, feeds: dict[str, Any], work: Path,
                  runs: int, threads: int) -> dict[str, Any]:
    from interleave import Timing

    names = [baseline, *(n for n in graphs if n != baseline)]
    (work / "feeds.json").write_text(json.dumps(_feeds_json(feeds)))
    result = _node(["--models", ",".join(str(graphs[n]) for n in names),
                    "--feeds", str(work / "feeds.json"), "--runs", str(runs),
                    "--warmup", "5", "--threads", str(threads)])
    return {n: Timing(**{k: result[str(graphs[n])][k] for k in (
        "median_ms", "ratio", "ratio_low", "ratio_high")}) for n in names}


def _layer_probe(work: Path, seq: int, ranks: list[int], runs: int, wasm_runs: int,
                 threads: int, wasm_threads: int | None) -> list[dict[str, Any]]:
    """One FFN matrix of MiniLM alone (384->1536 and 1536->384, random weights, ``seq``
    tokens): dense against low-rank pairs, fp32 and dynamic int8 per channel (the pipeline's
    ``quantize_int8``), so the time of the matrix product is seen without the rest of a model."""
    import numpy as np
    import onnx
    from interleave import interleaved_latency
    from onnx import TensorProto, helper, numpy_helper

    from lrt_deploy.quant.passes.dynamic import quantize_int8

    rng = np.random.default_rng(0)
    rows = []
    for n_in, n_out in ((384, 1536), (1536, 384)):
        graphs: dict[str, Path] = {}
        for rank in (None, *ranks):
            shapes = [(n_in, n_out)] if rank is None else [(n_in, rank), (rank, n_out)]
            inits, nodes, current = [], [], "x"
            for i, (k, n) in enumerate(shapes):
                weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
                inits.append(numpy_helper.from_array(weight, f"w{i}"))
                nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"]))
                current = f"h{i}"
            graph = helper.make_graph(
                nodes, "layer",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, n_in])],
                [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)], inits)
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            model.ir_version = 9
            name = "dense" if rank is None else f"rank {rank}"
            fp32 = work / f"layer-{n_in}-{n_out}-{_key(name)}.onnx"
            onnx.save(model, str(fp32))
            int8 = fp32.with_suffix(".int8.onnx")
            quantize_int8(fp32, int8, per_channel=True)
            graphs[f"{name} int8"], graphs[f"{name} fp32"] = int8, fp32
        feeds = {"x": rng.standard_normal((1, seq, n_in)).astype(np.float32)}
        timed = {"native": interleaved_latency(graphs, feeds, baseline="dense int8",
                                               runs=runs * 3, threads=threads)}
        if wasm_threads is not None:
            timed["wasm"] = _wasm_latency(graphs, "dense int8", feeds, work, wasm_runs * 3,
                                          wasm_threads)
        for name in graphs:
            rows.append({"layer": f"{n_in}->{n_out}", "variant": name, "sequence": seq,
                         **{f"{rt}_us": 1e3 * t[name].median_ms for rt, t in timed.items()},
                         **{f"{rt}_ratio_vs_int8": t[name].ratio for rt, t in timed.items()}})
    return rows


def _print_layers(rows: list[dict[str, Any]]) -> None:
    wasm = "wasm_us" in rows[0]
    print(f"\n{'one FFN matrix, ' + str(rows[0]['sequence']) + ' tokens':<30} {'native':>14}"
          + (f" {'WebAssembly':>16}" if wasm else ""))
    for r in rows:
        cell = f"{r['native_us']:7.0f} us {r['native_ratio_vs_int8']:.2f}x"
        if wasm:
            cell += f" {r['wasm_us']:8.0f} us {r['wasm_ratio_vs_int8']:.2f}x"
        print(f"{r['layer'] + ' ' + r['variant']:<30} {cell}")
    print("ratios: to the dense int8 matrix of the same shape, same run")


def _print(rows: list[dict[str, Any]], seqs: list[int], baseline: str = "dense int8") -> None:
    runtimes = [r for r in ("native", "wasm") if r in rows[0]["latency"]]
    head = " ".join(f"{rt} s{s:<4}" for rt in runtimes for s in seqs)
    print(f"\n{'variant':<24} {'MB':>6} {'x int8':>6} {'matmul %':>8}  {head}   "
          "other-domain mean/worst (native; wasm)")
    for r in rows:
        cells = " ".join(f"{r['latency'][rt][str(s)]['ratio_vs_int8']:>5.3f}x    "
                         for rt in runtimes for s in seqs)
        f = r["fidelity"]["heldout_domain.txt"]
        w = r.get("fidelity_wasm", {}).get("heldout_domain.txt")
        wasm = f"; {w['mean_cosine']:.4f}/{w['worst_cosine']:.4f}" if w else ""
        print(f"{r['variant']:<24} {r['size_mb']:>6.2f} {r['size_vs_int8']:>6.3f} "
              f"{100 * r['matrix_share']:>7.0f}%  {cells}  "
              f"{f['mean_cosine']:.4f}/{f['worst_cosine']:.4f}{wasm}")
    print(f"latency: median paired ratio to {baseline} in the same run (spread in the JSON)")


def _chart(rows: list[dict[str, Any]], seqs: list[int], path: Path,
           baseline: str = "dense int8 per channel", title: str = (
               "all-MiniLM-L6-v2, int8: does a low-rank model run faster? (lower is faster)"),
           ) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)
        return
    runtimes = [r for r in ("native", "wasm") if r in rows[0]["latency"]]
    shown = [r for r in rows if r["variant"] != "dense fp32"]
    fig, axes = plt.subplots(1, len(seqs), figsize=(5.5 * len(seqs), 4.5), squeeze=False)
    width = 0.8 / len(runtimes)
    for ax, seq in zip(axes[0], seqs, strict=True):
        for k, runtime in enumerate(runtimes):
            cells = [r["latency"][runtime][str(seq)] for r in shown]
            x = [i + (k - (len(runtimes) - 1) / 2) * width for i in range(len(shown))]
            ratios = [c["ratio_vs_int8"] for c in cells]
            low = [c["ratio_vs_int8"] - c["ratio_spread"][0] for c in cells]
            high = [c["ratio_spread"][1] - c["ratio_vs_int8"] for c in cells]
            label = "native ORT (x86, AVX-512 VNNI/AMX)" if runtime == "native" else \
                "onnxruntime-web (WebAssembly, Node)"
            ax.bar(x, ratios, width, yerr=[low, high], capsize=2, label=label)
        tops = [max(r["latency"][rt][str(seq)]["ratio_spread"][1] for rt in runtimes)
                for r in shown]
        for i, (r, top) in enumerate(zip(shown, tops, strict=True)):
            f = r["fidelity"]["heldout_domain.txt"]
            ax.annotate(f"{f['mean_cosine']:.4f}\n{f['worst_cosine']:.4f}", (i, top),
                        xytext=(0, 3), textcoords="offset points", ha="center", fontsize=6)
        ax.set_ylim(0, max(tops) * 1.35)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels([r["variant"].replace(" int8", "") for r in shown], rotation=25,
                           ha="right", fontsize=8)
        ax.set_ylabel(f"latency / {baseline} (same run)")
        ax.set_title(f"batch 1, sequence {seq} (numbers: other-domain mean / worst cosine)",
                     fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"chart: {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
