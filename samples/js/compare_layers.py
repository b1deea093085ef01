"""Find where onnxruntime-web (WebAssembly) and native ONNX Runtime part on a bundle.

Every intermediate tensor of the bundle's graph (optimised at the level ``model.ort`` is saved
at) becomes a graph output; native ORT (Python) and ``dump-tensors.js`` (onnxruntime-web's wasm
backend in Node, the same .wasm the page loads) run it on the same batch with no optimisation
at load, and the tensors are compared node by node::

    python samples/js/compare_layers.py out/all-MiniLM-L6-v2-mobile [--runtime web|node]

Prints the first nodes whose outputs differ, what each ``DynamicQuantizeLinear`` rounded
differently, and the final cosines (samples/js/README.md quotes its output).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from compare import JS_DIR, SENTENCES, _node, cosines

__all__ = ["all_tensors_model", "compare_tensors", "load_dump", "run_both"]

_DTYPES = {"float32": np.float32, "uint8": np.uint8, "int8": np.int8, "int32": np.int32,
           "int64": np.int64, "bool": np.bool_}


def all_tensors_model(bundle: Path, target: Path) -> Any:
    """Write ``bundle/model.onnx`` optimised at ORT's basic level (as ``model.ort`` is) with
    every node output made a graph output; return the ``onnx.ModelProto``."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(target))
    outputs = {value.name for value in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in outputs:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
                outputs.add(name)
    onnx.save(model, str(target))
    return model


def load_dump(folder: Path) -> dict[str, np.ndarray]:
    """The tensors ``dump-tensors.js`` wrote to ``folder``."""
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    return {
        name: np.fromfile(folder / entry["file"], dtype=_DTYPES[entry["type"]])
        .reshape(entry["dims"])
        for name, entry in index.items()
    }


def compare_tensors(model: Any, native: dict[str, np.ndarray],
                    other: dict[str, np.ndarray], first: int = 8) -> list[str]:
    """Lines describing, in graph order, the first ``first`` nodes whose outputs differ and
    every ``DynamicQuantizeLinear`` (int8 values rounded differently, scale, zero point)."""
    lines, shown = [], 0
    for node in model.graph.node:
        if node.op_type == "DynamicQuantizeLinear":
            values, scale, zero = node.output
            a, b = native[values].astype(np.int64), other[values].astype(np.int64)
            lines.append(
                f"DynamicQuantizeLinear {node.input[0]}: {(a != b).sum()} of {a.size} int8 "
                f"values differ (max {np.abs(a - b).max()} steps); scale {native[scale]:.9g} "
                f"vs {other[scale]:.9g}; zero point {native[zero]} vs {other[zero]}"
            )
            continue
        for name in node.output:
            if shown >= first or not name or name not in other:
                continue
            a, b = native[name], other[name]
            if a.dtype.kind != "f" or np.array_equal(a, b):
                continue
            relative = np.abs(a.astype(np.float64) - b).max() / max(np.abs(a).max(), 1e-30)
            lines.append(f"{node.op_type} {node.name} -> {name}: max relative difference "
                         f"{relative:.3g}, {np.mean(a != b):.1%} of values differ")
            shown += 1
    return lines


def run_both(bundle: Path, folder: Path, runtime: str = "web"
             ) -> tuple[Any, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Run every tensor of ``bundle``'s graph in native ORT and in ``runtime`` (``web``: the
    wasm backend in Node; ``node``: onnxruntime-node) on :data:`SENTENCES`, working in
    ``folder``. Returns the model and both runs' tensors by name."""
    import onnxruntime as ort

    from lrt_deploy.runtime import TextEncoder

    model = all_tensors_model(bundle, folder / "all.onnx")
    names = {value.name for value in model.graph.input}
    feeds = {key: value for key, value in TextEncoder.from_bundle(bundle).encode(SENTENCES)
             .items() if key in names}
    (folder / "feeds.json").write_text(json.dumps(
        {key: {"dims": list(value.shape), "data": value.ravel().tolist()}
         for key, value in feeds.items()}))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(folder / "all.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    outputs = [value.name for value in session.get_outputs()]
    native = dict(zip(outputs, session.run(None, feeds), strict=True))
    subprocess.run(
        [_node(), "dump-tensors.js", "--model", str(folder / "all.onnx"),
         "--feeds", str(folder / "feeds.json"), "--out", str(folder / "dump"),
         "--runtime", runtime],
        cwd=JS_DIR, check=True, capture_output=True, text=True,
    )
    return model, native, load_dump(folder / "dump")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--runtime", choices=("web", "node"), default="web")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, native, other = run_both(args.bundle.resolve(), Path(tmp), args.runtime)
    for line in compare_tensors(model, native, other):
        print(line)
    output = model.graph.output[0].name
    print(f"{output}: cosine per sentence", np.round(cosines(native[output], other[output]), 6))


if __name__ == "__main__":
    main()
