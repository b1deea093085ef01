"""Run an ONNX model in WebAssembly: onnxruntime-web in Node, the ``.wasm`` a page loads.

Uses ``samples/js/wasm-bench.js`` (``npm ci`` in ``samples/js`` installs onnxruntime-web) with
onnxruntime-web's default session options and one thread. Standard library and numpy only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lrt_deploy.verify.emulate import EmulationError

__all__ = ["js_dir", "run_wasm", "wasm_unavailable"]


def js_dir() -> Path:
    """``$LRT_JS_DIR``, else the checkout's ``samples/js``."""
    env = os.environ.get("LRT_JS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "samples" / "js"


def wasm_unavailable() -> str | None:
    """None when WebAssembly runs here, else one line saying why not and what to do."""
    if shutil.which("node") is None:
        return "node not found: install Node 20+ to run the WebAssembly class"
    if not (js_dir() / "node_modules" / "onnxruntime-web").is_dir():
        return (f"onnxruntime-web is not installed in {js_dir()}: run npm ci in a checkout's "
                "samples/js (scripts/setup_tests.sh does) and point LRT_JS_DIR at it")
    return None


def _feeds_json(feed: Mapping[str, np.ndarray]) -> dict[str, object]:
    return {name: {"dims": list(value.shape), "data": value.reshape(-1).tolist(),
                   **({"type": "float32"} if value.dtype.kind == "f" else {})}
            for name, value in feed.items()}


def run_wasm(model: Path, feeds: Sequence[Mapping[str, np.ndarray]], *,
             timeout: float = 600) -> list[np.ndarray]:
    """The model's first output (float32) for each feed, computed by onnxruntime-web."""
    reason = wasm_unavailable()
    if reason is not None:
        raise EmulationError(reason)
    with tempfile.TemporaryDirectory(prefix="lrt-wasm-") as scratch:
        work = Path(scratch)
        (work / "batches.json").write_text(json.dumps([_feeds_json(f) for f in feeds]))
        try:
            done = subprocess.run(
                ["node", "wasm-bench.js", "--models", str(Path(model).resolve()), "--runs", "0",
                 "--threads", "1", "--outputs", str(work / "batches.json"),
                 "--out", str(work / "out")],
                cwd=js_dir(), capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise EmulationError(f"onnxruntime-web took over {timeout:.0f} s") from None
        if done.returncode:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise EmulationError(f"onnxruntime-web failed (exit {done.returncode}): {tail}")
        outputs = []
        for index, feed in enumerate(feeds):
            raw = (work / "out" / f"0-{index}.bin").read_bytes()
            rows = next(iter(feed.values())).shape[0]
            outputs.append(np.frombuffer(raw, dtype=np.float32).reshape(rows, -1).copy())
    return outputs
