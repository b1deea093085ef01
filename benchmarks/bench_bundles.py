"""What lrt-export shipped, compared on two runtimes: bundles against a baseline bundle, on
native ONNX Runtime (this CPU) and on onnxruntime-web's WebAssembly backend (in Node), in one run.

    python benchmarks/bench_bundles.py "dense int8=out/dense" "LRT 0.95 healed=out/lrt" ...
        [--seq 32 128] [--runs 60] [--wasm-runs 60] [--wasm-threads 1] [--out results]

The first NAME=PATH is the baseline of every ratio. PATH is a bundle folder (its manifest names
the model file: model.ort for ``--target mobile``) or a .onnx/.ort file. Unlike
``bench_backends.py``, nothing is re-exported: the files measured are the ones an app ships.

Per bundle: file size; fidelity (mean / worst cosine to the dense fp32 PyTorch model on both
shipped held-out sets) natively and in WebAssembly; latency as the median paired ratio to the
baseline (interleaved runs, thread-pool spinning off, range over 5 blocks) at each ``--seq``
on both runtimes; the share of native kernel time in weight-matrix nodes; and, from the
manifest, how the bundle was healed (device, steps, seconds, batch, learning rate).

Writes ``results/bundles-minilm.json`` and ``.png``. WebAssembly needs node and
``samples/js/node_modules`` (``scripts/setup_tests.sh``); without them those columns are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_backends as backends

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", metavar="NAME=PATH",
                        help="bundle folders or model files; the first is the baseline")
    backends.add_runtime_arguments(parser, runs=60, wasm_runs=60)
    parser.add_argument("--name", default="bundles-minilm", help="output file stem")
    args = parser.parse_args()
    if len(args.bundles) < 2:
        raise SystemExit("give a baseline and at least one bundle to compare with it")

    from healed import heldout_scorer

    from lrt_deploy.load import load_model

    graphs = dict(_resolve(spec) for spec in args.bundles)
    baseline = next(iter(graphs))
    dense = load_model(args.model_dir)
    sets, fidelity = heldout_scorer(dense)
    wasm = backends.wasm_available(args.wasm_runs)
    rows = [{"variant": name, "file": path.name, **_from_manifest(path),
             "size_mb": path.stat().st_size / 1e6,
             **backends.native_scores(path, dense, fidelity, args.threads)}
            for name, path in graphs.items()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if wasm:
            backends.add_wasm_fidelity(rows, graphs, sets, fidelity, work, args.wasm_threads)
        backends.time_rows(rows, graphs, baseline, dense, work, args, wasm)
    for row in rows:
        row["size_vs_int8"] = row["size_mb"] / rows[0]["size_mb"]
    setting = {"baseline": baseline, "threads": args.threads, "wasm_threads": args.wasm_threads,
               "native_runs": args.runs, "wasm_runs": args.wasm_runs, "batch": 1,
               "ratios": "to the baseline bundle (column names say int8: the usual baseline)"}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(
        json.dumps({"setting": setting, "rows": rows}, indent=2) + "\n")
    backends._print(rows, args.seq, baseline)
    for row in rows:
        if row.get("healing"):
            h = row["healing"]
            print(f"  {row['variant']}: healed {h['steps_run']} steps (kept {h['best_step']}), "
                  f"batch {h['batch_size']}, lr {h['lr']}, {h['seconds']:.0f} s on "
                  f"{h['device']} ({h['precision']}), {h['quantization'] or 'float'} simulated")
    backends._chart(rows, args.seq, args.out / f"{args.name}.png", baseline,
                    title=f"{Path(args.model_dir).name}, the bundles lrt-export wrote "
                    "(lower is faster)")
    return 0


def _resolve(spec: str) -> tuple[str, Path]:
    name, _, where = spec.partition("=")
    path = Path(where)
    if not name or not where:
        raise SystemExit(f"bundles are NAME=PATH, got {spec!r}")
    if path.is_dir():
        manifest = path / "manifest.json"
        model = (json.loads(manifest.read_text())["files"]["model"] if manifest.is_file()
                 else next((m for m in ("model.ort", "model.onnx") if (path / m).is_file()), ""))
        path = path / model
    if not path.is_file() or path.suffix not in (".onnx", ".ort"):
        raise SystemExit(f"{spec!r}: no model.ort or model.onnx there; give a bundle folder "
                         "written by lrt-export or the model file itself")
    return name, path


def _from_manifest(path: Path) -> dict[str, Any]:
    """How the bundle was made, where its manifest says so (none beside a bare model file)."""
    manifest = path.parent / "manifest.json"
    if not manifest.is_file():
        return {}
    m = json.loads(manifest.read_text())
    lowrank = m.get("lowrank") or {}
    keep = ("steps", "steps_run", "best_step", "seconds", "device", "precision", "lr",
            "batch_size", "quantization", "trainable", "lines_read", "passes")
    healing = lowrank.get("healing") or {}
    return {"target": m["target"]["name"], "precision": m["target"]["precision"],
            "budget": (lowrank.get("config") or {}).get("budget"),
            "params": (m.get("params") or {}),
            "healing": {k: healing.get(k) for k in keep} if healing else None}


if __name__ == "__main__":
    sys.exit(main())
